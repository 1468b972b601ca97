"""Property fuzzing of rule passes: random graphs that contain each rule's pattern, four checks per graph.

A graph is built from the rule's pattern itself (the same `op.X(...)` description the matcher walks):

    Var        a graph input of shape (B, S, H), a per-channel constant (H,), or a one-element constant, drawn;
               a name in the rule's `examples` takes the declared value instead (a number, a tuple of numbers to
               draw from, "input" or "channel"): how a rule whose check needs particular constants (GELU's 0.5,
               an epsilon) gets graphs that match as well as graphs it refuses
    Lit        a one-element constant of that value
    Or(...)    one alternative, drawn
    optional   present or absent, drawn (an optional Cast toggles float16 <-> float32, float32 <-> double)
    Add/Mul..  either operand order, drawn

around it: float32 or float16; B and S static or symbolic, H static; a random unary op before each graph input and
after the root; sometimes an extra reader (a graph output) of one intermediate value. A graph onnxruntime refuses
to run is discarded (a pattern alone does not say every shape its ops need: such rules mostly exercise refusals).

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
from onnx import TensorProto, helper

from . import pass_manager as pm
from . import rules as _rules
from .errors import UsageError
from .verifier import Signature, check_model
from .verify import compare

OPSET = 18
HIDDEN = (4, 8)
CONCRETE = {"batch": 3, "seq": 5}           # sizes fed for symbolic dims (static dims are 2 and 3)
DISCARD_LIMIT = 40                          # invalid graphs in a row, with none valid yet, before a rule is given up
PRE_OPS = (None, "Neg", "Tanh", "Sigmoid")
POST_OPS = (None, "Neg", "Relu", "Sigmoid")
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"})
BOOL_OUT = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor"})
INT_OUT = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
       TensorProto.INT64: np.int64, TensorProto.BOOL: np.bool_}


class FuzzFailure(AssertionError):
    """One generated graph broke a check."""


class Discard(Exception):
    """The generated graph is not a valid model (onnxruntime refuses it)."""


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


# ---------------------------------------------------------------------------------------------------- graph builder
class _Builder:
    """Instantiates one pattern as an ONNX graph, every choice drawn from `draw`."""

    def __init__(self, draw: Callable[[Any], Any], rule: _rules.Rule, dtype: int, dims: list[int | str],
                 seed: int):
        self.draw = draw
        self.examples = getattr(rule, "examples", None) or {}
        self.dtype = dtype
        self.dims = dims
        self.hidden = int(dims[-1])
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.vars: dict[str, tuple[str, int]] = {}
        self.built: dict[int, list[tuple[str, int]]] = {}
        self.pattern_values: list[tuple[str, int]] = []      # outputs of nodes built for pattern nodes
        self.names: dict[str, str] = {}                      # pattern node name -> graph node name
        self.choices: list[str] = []
        self.counter = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def const(self, arr: np.ndarray, stem: str = "c") -> str:
        name = self.fresh(stem)
        self.inits.append(onnx.numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: list[str], dtype: int, domain: str = "", attrs: dict | None = None,
             outputs: int = 1, stem: str = "v") -> list[tuple[str, int]]:
        outs = [self.fresh(stem) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"n_{op}_"), domain=domain or None,
                                           **(attrs or {})))
        return [(o, dtype) for o in outs]

    def graph_input(self, stem: str, dtype: int) -> str:
        name = self.fresh(stem)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, self.dims))
        pre = self.draw(PRE_OPS)
        if pre is None or dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            return name
        self.choices.append(f"{pre} before input {name}")
        return self.node(pre, [name], dtype)[0][0]

    # -- pattern values
    def leaf(self, pv: _rules.PValue, dtype: int, parent: str, position: int) -> tuple[str, int]:
        if isinstance(pv, _rules.Lit):
            if pv.value is None:
                return "", dtype
            return self.const(np.array(pv.value, dtype=_NP.get(dtype, np.float32))), dtype
        assert isinstance(pv, _rules.Var)
        if pv.name in self.vars:
            return self.vars[pv.name]
        if parent in ("MatMul", "Gemm") and position == 1 or parent == "Transpose":
            kind: Any = "matrix"
        elif pv.name in self.examples:
            kind = self.examples[pv.name]
            if isinstance(kind, tuple):
                kind = self.draw(kind)
        elif not self.vars:
            kind = "input"
        else:
            kind = self.draw(("input", "channel", "scalar"))
        np_dtype = _NP.get(dtype, np.float32)
        if kind == "input":
            name = self.graph_input(f"{pv.name}_in", dtype)
        elif kind == "channel":
            name = self.const(self.rng.uniform(0.5, 1.5, self.hidden).astype(np_dtype), f"{pv.name}_c")
        elif kind == "matrix":
            name = self.const(self.rng.normal(0, 0.5, (self.hidden, self.hidden)).astype(np_dtype), f"{pv.name}_m")
        elif kind == "scalar":
            name = self.const(np.array(self.rng.uniform(0.5, 1.5), dtype=np_dtype), f"{pv.name}_c")
        else:
            name = self.const(np.array(kind, dtype=np_dtype), f"{pv.name}_c")
        self.choices.append(f"{pv.name} = {kind if kind in ('input', 'channel', 'matrix', 'scalar') else repr(kind)}")
        self.vars[pv.name] = (name, dtype)
        return name, dtype

    def value(self, pv: _rules.PValue, dtype: int, parent: str = "", position: int = 0) -> tuple[str, int]:
        if isinstance(pv, _rules.AnyOf):
            i = self.draw(range(len(pv.alternatives)))
            return self.value(pv.alternatives[i], dtype, parent, position)
        if isinstance(pv, _rules.Out):
            return self.out(pv, dtype)
        return self.leaf(pv, dtype, parent, position)

    def out(self, pv: _rules.Out, dtype: int) -> tuple[str, int]:
        pn = pv.node
        if id(pn) not in self.built:
            if pn.optional and not self.draw((True, False)):
                self.choices.append(f"optional {pn.op_type} absent")
                self.built[id(pn)] = [self.value(pn.inputs[0], dtype)] * max(1, pn.num_outputs)
            else:
                self.built[id(pn)] = self.make(pn, dtype)
        return self.built[id(pn)][pv.index]

    def make(self, pn: _rules.PNode, dtype: int) -> list[tuple[str, int]]:
        leafy = (_rules.Var, _rules.Lit)
        names: list[str | None] = [None] * len(pn.inputs)
        compute = None
        for i, p in enumerate(pn.inputs):          # computed inputs first: leaves take their dtype
            if not isinstance(p, leafy):
                names[i], d = self.value(p, dtype, pn.op_type, i)
                compute = compute or d
        compute = compute or dtype
        for i, p in enumerate(pn.inputs):
            if isinstance(p, leafy):
                names[i] = self.leaf(p, compute, pn.op_type, i)[0]
        if pn.commutative and self.draw((False, True)):
            names.reverse()
            self.choices.append(f"{pn.op_type} operands swapped")
        if pn.op_type in REDUCE_OPS and pn.domain == "" and len(names) == 1 and pn.allow_other_inputs:
            names.append(self.const(np.array([-1], dtype=np.int64), "axes"))
        attrs = {}
        out_dtype = compute
        for k, v in pn.attrs.items():
            if isinstance(v, _rules.Attr):
                if pn.op_type == "Cast" and k == "to":
                    v = self._cast_to(compute)
                elif v.default is None:
                    continue
                else:
                    v = v.default
            attrs[k] = v
        if pn.op_type == "Cast":
            out_dtype = attrs.get("to", compute)
        elif pn.op_type in BOOL_OUT:
            out_dtype = TensorProto.BOOL
        elif pn.op_type in INT_OUT:
            out_dtype = TensorProto.INT64
        outs = self.node(pn.op_type, [n or "" for n in names], out_dtype, pn.domain, attrs, pn.num_outputs)
        if pn.name:
            self.names[pn.name] = self.nodes[-1].name
        self.pattern_values.extend(outs)
        return outs

    def _cast_to(self, src: int) -> int:
        """A Cast that widens from the graph's dtype and narrows back to it."""
        if self.dtype == TensorProto.FLOAT16:
            return TensorProto.FLOAT if src == TensorProto.FLOAT16 else TensorProto.FLOAT16
        return TensorProto.DOUBLE if src == TensorProto.FLOAT else TensorProto.FLOAT


@dataclass
class Example:
    proto: onnx.ModelProto
    root: str                          # the built root node's name
    extra_reader: str | None           # the intermediate value given an extra reader
    feeds: dict[str, np.ndarray]
    choices: list[str]
    precision: str                     # the graph's compute dtype: its outputs carry that precision, even widened

    def describe(self) -> str:
        text = onnx.printer.to_text(self.proto.graph)
        return "choices: " + ("; ".join(self.choices) or "none") + "\n" + text


def build_example(draw: Callable[[Any], Any], rule: _rules.Rule, seed: int) -> Example:
    """One random graph containing `rule`'s pattern."""
    dtype = draw((TensorProto.FLOAT, TensorProto.FLOAT16))
    dims: list[int | str] = [draw((2, "batch")), draw((3, "seq")), draw(HIDDEN)]
    b = _Builder(draw, rule, dtype, dims, seed)
    b.choices.append(f"{TensorProto.DataType.Name(dtype).lower()} {dims}")
    outs, _, _ = rule.compiled()
    built = [b.value(o, dtype) for o in outs]
    root_name, root_dtype = built[0]
    root_node = next((n.name for n in b.nodes if root_name in n.output), None)
    if root_node is None:
        raise Discard
    graph_outs: list[tuple[str, int]] = []
    post = draw(POST_OPS)
    if post is not None and root_dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        b.choices.append(f"{post} after the root")
        graph_outs.append(b.node(post, [root_name], root_dtype, stem="y")[0])
    else:
        graph_outs.append(built[0])
    inputs_and_consts = {v.name for v in b.inputs} | {t.name for t in b.inits}
    for v in built[1:]:
        if v[0] not in inputs_and_consts and v not in graph_outs:
            graph_outs.append(v)
    extra = None
    exported = {v[0] for v in built}
    inner = [v for v in b.pattern_values if v[0] not in exported and v[0] not in inputs_and_consts]
    if inner and draw((False, True)):
        v = inner[draw(range(len(inner)))]
        extra = v[0]
        b.choices.append(f"extra reader of {extra}")
        graph_outs.append(b.node("Identity", [extra], v[1], stem="extra")[0])
    graph = helper.make_graph(b.nodes, f"fuzz_{rule.name}", b.inputs,
                              [helper.make_tensor_value_info(n, d, None) for n, d in graph_outs], b.inits)
    domains = {n.domain for n in b.nodes if n.domain}
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    rng = np.random.default_rng(seed + 1)
    feeds = {}
    for vi in b.inputs:
        shape = [CONCRETE[d] if isinstance(d, str) else d for d in dims]
        feeds[vi.name] = rng.normal(0, 1, shape).astype(_NP[vi.type.tensor_type.elem_type])
    precision = "float16" if dtype == TensorProto.FLOAT16 else "float32"
    return Example(proto, root_node, extra, feeds, b.choices, precision)


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

