"""Property fuzzing of rule passes: random graphs that contain each rule's pattern, four checks per graph.

A graph is built from the rule's pattern itself (compiler/fuzz_graph.py, fuzz_node.py): each pattern variable drawn
by what its position holds, shape-carrying inputs (Reshape targets, Gather indices, Split sizes, perms, axes)
drawn from the shapes flowing into them (compiler/fuzz_shapes.py), alternatives, optional nodes and operand orders
drawn, random ops around it. A graph onnxruntime refuses to run is discarded.

Each graph must pass, after infer-shapes (as every pipeline runs first):
    1. the IR verifier (compiler/verifier.py) on the pass's result;
    2. onnxruntime outputs before and after agree within the tolerances of compiler/verify.py for the graph's
       dtype (float32 or float16; an output Cast up to double carries no more precision than that);
    3. a second run of the pass changes nothing (same serialized model);
    4. the rule fires exactly when its match (pattern + check, what `--explain` prints) succeeds at the built
       root: a graph built without an extra reader matches the pattern structurally (only the check may refuse);
       where the match succeeds, the pass rewrites the root (for a RulePass, whose rules all run unconditionally);
       the rule never fires more often than `--explain` found sites, plus sites other rewrites made.

hypothesis drives the draws, so a failure is shrunk to a minimal graph and printed with the seed and the command
that replays it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from . import pass_manager as pm
from . import rules as _rules
from .errors import UsageError
from .fuzz_graph import Discard, Example
from .fuzz_node import build_example
from .verifier import Signature, check_model
from .verify import compare

DISCARD_LIMIT = 40                          # invalid graphs in a row, with none valid yet, before a rule is given up


class FuzzFailure(AssertionError):
    """One generated graph broke a check."""


class _GiveUp(BaseException):
    """Ends a rule's campaign early (a BaseException, so hypothesis does not take it for a failing example)."""


@dataclass
class RuleStats:
    pass_name: str
    rule: str
    graphs: int = 0                   # valid graphs checked
    fired: int = 0                    # graphs where the pass rewrote the built root
    discarded: int = 0                # graphs onnxruntime refused before the pass ran
    refusals: Counter = field(default_factory=Counter)   # --explain reason at the root -> graphs
    failure: str | None = None        # the shrunk failure, printed
    note: str | None = None

    def line(self) -> str:
        text = f"{self.pass_name}/{self.rule}: {self.graphs} graphs, fired {self.fired}, discarded {self.discarded}"
        if self.refusals:
            top = ", ".join(f"{n}x {r}" for r, n in self.refusals.most_common(2))
            text += f"; refused {sum(self.refusals.values())} (most: {top})"
        if self.note:
            text += f"; {self.note}"
        return text


# ---------------------------------------------------------------------------------------------------- checking
def _session(proto: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = _session(proto)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def check_example(p: pm.Pass, rule: _rules.Rule, ex: Example, stats: RuleStats) -> None:
    """The four checks on one graph; raises FuzzFailure, or Discard for a graph onnxruntime refuses."""
    try:
        want = _run(ex.proto, ex.feeds)
    except Exception as exc:
        raise Discard from exc
    ctx = pm.PassContext(level=3, target="cpu")
    model = ir.from_proto(ex.proto)
    model = pm.get_pass("infer-shapes").run(model, ctx).model
    signature = Signature.of(model)
    rows = dict(_rules.explain(model, rule))
    at_root = rows.get(ex.root, "the built root is not a candidate")
    sites = sum(1 for r in rows.values() if r == "matched")
    if ex.extra_reader is None and not at_root.startswith(("matched", "check: ")):
        raise FuzzFailure(f"the graph built from the pattern does not match it at {ex.root}: {at_root}")
    try:
        result = p.run(model, ctx)
    except Exception as exc:
        raise FuzzFailure(f"the pass raised {type(exc).__name__}: {exc}") from None
    model = result.model
    problems = check_model(model, signature)
    if problems:
        raise FuzzFailure("IR verifier: " + "; ".join(problems[:3]))
    fired_here = result.modified and all(n.name != ex.root for n in model.graph)
    count = result.counts.get(rule.name, 0)
    others = sum(n for r, n in result.counts.items() if r != rule.name)
    if at_root == "matched" and not fired_here and isinstance(p, pm.RulePass):
        raise FuzzFailure(f"--explain says {rule.name} matches at {ex.root}, but the pass left it")
    if count > sites + others:
        raise FuzzFailure(f"{rule.name} fired {count} times; --explain found {sites} sites and other rules "
                          f"made {others} rewrites")
    after = ir.to_proto(model)
    try:
        got = _run(after, ex.feeds)
    except Exception as exc:
        raise FuzzFailure(f"onnxruntime cannot run the result: {str(exc).splitlines()[0]}") from None
    for name, ref in want.items():
        with np.errstate(invalid="ignore"):
            c = compare(ref, got[name], name, ex.precision)
        if not c.ok:
            raise FuzzFailure(f"output {name} differs: max_abs={c.max_abs:.3g} max_rel={c.max_rel:.3g} "
                              f"(rtol={c.rtol:g}, atol={c.atol:.3g})")
    once = after.SerializeToString()
    second = p.run(model, ctx)
    twice = ir.to_proto(second.model).SerializeToString()
    if second.modified or once != twice:
        raise FuzzFailure(f"a second run of {p.name} changed the model again ({dict(second.counts)})")
    stats.graphs += 1
    if fired_here and count:
        stats.fired += 1
    elif at_root != "matched":
        stats.refusals[at_root] += 1
    else:   # a pass of its own (not a RulePass) may run a rule only under an option or condition of its own
        stats.refusals["matched; the pass did not apply it (an option or condition of the pass)"] += 1


# ---------------------------------------------------------------------------------------------------- campaign
def fuzzable_passes() -> dict[str, pm.Pass]:
    """Registered passes with pattern rules."""
    import onnxc.passes  # noqa: F401  (registers the built-in passes)
    return {name: p for name, p in pm.registered_passes().items() if list(p.rules())}


def select(pass_name: str | None, all_passes: bool, rule_name: str | None = None
           ) -> list[tuple[pm.Pass, _rules.Rule]]:
    if (pass_name is None) == (not all_passes):
        raise UsageError("give --pass NAME or --all")
    passes = fuzzable_passes()
    if pass_name is not None:
        p = pm.get_pass(pass_name)
        if pass_name not in passes:
            raise UsageError(f"pass '{pass_name}' has no pattern rules to fuzz")
        passes = {pass_name: p}
    chosen = [(p, r) for p in passes.values() for r in p.rules() if rule_name in (None, r.name)]
    if not chosen:
        names = [r.name for p in passes.values() for r in p.rules()]
        raise UsageError(f"unknown rule '{rule_name}'" + _rules.suggest(rule_name or "", names))
    return chosen


def fuzz_rule(p: pm.Pass, rule: _rules.Rule, examples: int, seed: int) -> RuleStats:
    """Run hypothesis over `rule`'s graphs; a failure is shrunk and kept in the stats' `failure`."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import assume, seed as hseed
    from hypothesis.errors import Unsatisfiable

    stats = RuleStats(p.name, rule.name)
    last: list[str] = []

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=(Phase.generate, Phase.shrink))
    @given(st.data(), st.integers(0, 2**31 - 1))
    def prop(data, value_seed):
        if stats.graphs == 0 and stats.discarded >= DISCARD_LIMIT:
            raise _GiveUp    # the bare pattern makes no valid graph: stop paying for more tries
        def draw(options):
            return data.draw(st.sampled_from(list(options)))
        try:
            ex = build_example(draw, rule, value_seed)
        except Discard:
            stats.discarded += 1
            assume(False)
            return
        try:
            check_example(p, rule, ex, stats)
        except Discard:
            stats.discarded += 1
            assume(False)
        except FuzzFailure as exc:
            last[:] = [f"{exc}\n{ex.describe()}"]
            raise

    try:
        prop()
    except FuzzFailure:
        stats.failure = last[0] if last else "a check failed"
    except (Unsatisfiable, _GiveUp):
        pass
    if stats.graphs == 0 and not stats.failure:
        stats.note = "no valid graph from the bare pattern"
    return stats


def replay_command(p: pm.Pass, rule: _rules.Rule, examples: int, seed: int) -> str:
    plugin = pm.PLUGIN_FILES.get(p.name)
    return (f"onnxc fuzz --pass {p.name} --rule {rule.name} --examples {examples} --seed {seed}"
            + (f" --plugin {plugin}" if plugin is not None else ""))


def run(chosen: Sequence[tuple[pm.Pass, _rules.Rule]], examples: int, seed: int,
        progress: Callable[[str], None] = print) -> list[RuleStats]:
    """Fuzz each rule; returns the stats, failures included (the caller decides the exit code)."""
    if examples < 1:
        raise UsageError("--examples must be at least 1")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise UsageError("onnxc fuzz needs hypothesis: pip install 'onnxc[fuzz]'") from None
    out = []
    for p, rule in chosen:
        stats = fuzz_rule(p, rule, examples, seed)
        progress(stats.line())
        if stats.failure:
            progress(f"FAILED {p.name}/{rule.name} (seed {seed}), shrunk to:\n{stats.failure}\n"
                     f"replay: {replay_command(p, rule, examples, seed)}")
        out.append(stats)
    return out

