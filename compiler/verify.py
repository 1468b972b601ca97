"""Numeric verification: run the input and the compiled model in onnxruntime on the same inputs and compare.

Inputs follow the model's signature. Each graph input gets a role from its name and from how the graph uses it:
token ids (an integer input that indexes a constant table through Gather: values stay below the table's size),
attention masks (ones over past + new tokens), position ids (past .. past + seq), past key/values (random, with
the past length on their first symbolic dim after the batch), anything else (random of its type). Symbolic dims are
sized by role, so the same symbol gets the same size everywhere. Models with a KV cache are checked on a prefill
and a decode step with a non-empty past.

Both sessions use the CPU execution provider and run one after the other, so peak memory stays near one model's
size. The compiled model runs with onnxruntime's own graph optimizations off (what is checked is what onnxc wrote);
the input runs at onnxruntime's basic level (constant folding, redundant-node removal: what onnxruntime does to any
model it runs by default), so its constant subgraphs are computed once, not at every run. On an exporter's
Transpose of a tied embedding that halves the input's run time and keeps the transposed copy from coexisting with
every weight page the run touches (docs/architecture.md, "What verification costs").
"""
from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .errors import InvalidModelError, UsageError, VerificationError, first_line
from .loader import check_regular_file

# dtype -> (relative tolerance, absolute tolerance as a fraction of the reference's largest magnitude)
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (2e-2, 2e-2),
    "bfloat16": (5e-2, 5e-2),
}


@dataclass
class Scenario:
    name: str
    batch: int
    seq: int
    past: int
    pad: int = 0     # the last batch row's attention mask ends in this many zeros (right padding)


# What each scenario covers (docs/architecture.md, "Verification"). A model with a KV cache:
# - prefill: batch 2 x 6 tokens on an empty cache, the first row whole and the second right-padded by 2 (a batch
#   of unequal lengths: per-row sequence lengths, the mask's zeros; a whole row as well);
# - decode: batch 2, one token after 6 cached (the step a runtime repeats; the in-place cache check runs on it);
# - chunk: batch 1 (the only batch ORT's GQA takes with a past and several tokens), 4 tokens after 3 cached.
# A whole-row prefill of its own would add no path the padded batch's first row and the decode step do not take.
# A model without one: a batch of 2 x 7 tokens and a padded batch of 2 x 6 (two lengths). A padded scenario
# compares only the outputs of non-padded positions (padded rows are unspecified in fused attention kernels).
DEFAULT_SCENARIOS = (Scenario("prefill", 2, 6, 0, pad=2), Scenario("decode", 2, 1, 6), Scenario("chunk", 1, 4, 3))
NO_CACHE_SCENARIOS = (Scenario("forward", 2, 7, 0), Scenario("padded", 2, 6, 0, pad=2))


@dataclass
class OutputCheck:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    ok: bool
    min_tol: float = 0.0     # the smallest t for which rtol = t, atol = t * max|reference| would pass


@dataclass
class VerifyReport:
    status: str                       # "passed", "failed", "skipped"
    reason: str = ""
    seed: int = 0
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # scenarios shrunk or skipped to fit the memory budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- inputs
def _gather_bound(v: ir.Value, depth: int = 4) -> int | None:
    """If v (through Cast/Reshape/Unsqueeze/...) indexes a constant table with Gather, the table's size."""
    frontier = [v]
    for _ in range(depth):
        nxt = []
        for val in frontier:
            for use in val.uses():
                node = use.node
                if node.op_type == "Gather" and use.idx == 1:
                    data = node.inputs[0]
                    t = data.const_value if data is not None else None
                    if t is None and data is not None and data.producer() is not None:
                        # a dequantized or cast table: follow one step up
                        p = data.producer()
                        t = p.inputs[0].const_value if p.inputs and p.inputs[0] is not None else None
                    if t is not None and len(t.shape) >= 1:
                        axis = node.attributes.get("axis")
                        axis = axis.as_int() if axis is not None else 0
                        return int(t.shape[axis])
                if node.op_type in ("GatherBlockQuantized",) and use.idx == 1:
                    t = node.inputs[0].const_value
                    p = node.inputs[0].producer()
                    if t is None and p is not None and p.op_type == "Reshape":  # a MatMulNBits B as its table
                        t = p.inputs[0].const_value
                    if t is not None:
                        return int(t.shape[0])
                if node.op_type == "EmbedLayerNormalization" and use.idx in (0, 1):
                    t = node.inputs[2 if use.idx == 0 else 4].const_value
                    if t is not None:
                        return int(t.shape[0])
                if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return None


def input_role(v: ir.Value) -> str:
    """What graph input `v` is in a language model's signature, read from its name, then from how the graph uses it:
    "past" (a past key/value), "mask" (an attention mask), "position" (position ids), "ids" (integers that index a
    constant table through Gather) or "other". Inputs are sized and filled by role (see make_inputs)."""
    name = (v.name or "").lower()
    if "past" in name or name.startswith("cache") or ".key" in name or ".value" in name:
        return "past"
    if "mask" in name:
        return "mask"
    if "position" in name:
        return "position"
    if v.dtype is not None and v.dtype.is_integer() and _gather_bound(v) is not None:
        return "ids"
    return "other"


def _assign_dims(inputs: list[ir.Value], sc: Scenario, has_past: bool) -> dict[str, int]:
    sizes: dict[str, int] = {}
    total = sc.seq + sc.past

    def put(d: Any, n: int) -> None:
        if isinstance(d, ir.SymbolicDim) and d.value is not None:
            sizes.setdefault(d.value, n)

    for v in sorted(inputs, key=lambda v: ["ids", "past", "mask", "position", "other"].index(input_role(v))):
        if v.shape is None:
            continue
        role, dims = input_role(v), list(v.shape)
        if not dims:
            continue
        put(dims[0], sc.batch)
        if role in ("ids", "position") and len(dims) >= 2:
            put(dims[1], sc.seq)
        elif role == "mask" and len(dims) >= 2:
            put(dims[-1], total if has_past else sc.seq)
            for d in dims[1:-1]:
                put(d, sc.seq)
        elif role == "past":
            for d in dims[1:]:
                put(d, sc.past)
    return sizes


def make_inputs(model: ir.Model | ir.Graph, sc: Scenario, seed: int, only: set[str] | None = None
                ) -> dict[str, np.ndarray]:
    """Seeded inputs for the graph inputs of `model` (or of a graph) in scenario `sc`, each filled by its role.
    With `only`, just those inputs and the masks are made (sized as with all of them; a probe that reads the
    position ids need not pay for a long cache's random past)."""
    rng = np.random.default_rng(seed)
    graph = model if isinstance(model, ir.Graph) else model.graph
    inputs = [v for v in graph.inputs if not v.is_initializer()]
    has_past = any(input_role(v) == "past" for v in inputs)
    sizes = _assign_dims(inputs, sc, has_past)
    feeds: dict[str, np.ndarray] = {}
    positions: dict[str, tuple[list[int], np.dtype]] = {}
    for v in inputs:
        role = input_role(v)
        if only is not None and v.name not in only and role != "mask":    # the mask sizes the positions
            continue
        shape = []
        for i, d in enumerate(v.shape or []):
            if isinstance(d, int):
                shape.append(d)
            elif d.value is not None and d.value in sizes:
                shape.append(sizes[d.value])
            else:
                shape.append(sc.batch if i == 0 else (sc.past if role == "past" else sc.seq))
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        if role == "mask":
            arr = np.ones(shape, dtype=dtype)
            if sc.pad and len(shape) == 2 and shape[0] > 1:
                arr[-1, shape[1] - sc.pad:] = 0
        elif role == "position":
            positions[v.name] = (shape, dtype)      # filled below, once the past's length is known
            continue
        elif role == "ids":
            arr = rng.integers(0, _gather_bound(v) or 2, size=shape).astype(dtype)
        elif np.dtype(dtype).kind == "f" or v.dtype in (ir.DataType.BFLOAT16,):
            arr = rng.standard_normal(shape).astype(dtype)
        elif np.dtype(dtype).kind == "b":
            arr = np.ones(shape, dtype=dtype)
        else:
            arr = rng.integers(0, 2, size=shape).astype(dtype)
        feeds[v.name] = arr
    for name, (shape, dtype) in positions.items():
        n = shape[-1] if shape else 1
        start = _past_length(inputs, feeds, n, sc.past)
        feeds[name] = np.broadcast_to(np.arange(start, start + n, dtype=dtype), shape).copy()
    return {v.name: feeds[v.name] for v in inputs if v.name in feeds}


def _past_length(inputs: list[ir.Value], feeds: dict[str, np.ndarray], seq: int, default: int) -> int:
    """How many positions the cache already holds: from a rank-4 past (B, N, P, H), else from a 2-D mask
    (B, P + S), else the scenario's own count. A static past (a fixed-shape export) may differ from the scenario."""
    for v in inputs:
        a = feeds.get(v.name)
        if a is not None and input_role(v) == "past" and a.ndim == 4:
            return int(a.shape[2])
    for v in inputs:
        a = feeds.get(v.name)
        if a is not None and input_role(v) == "mask" and a.ndim == 2:
            return max(int(a.shape[1]) - seq, 0)
    return default


def scenarios_for(model: ir.Model) -> tuple[Scenario, ...]:
    has_past = any(input_role(v) == "past" for v in model.graph.inputs)
    return DEFAULT_SCENARIOS if has_past else NO_CACHE_SCENARIOS


# ---------------------------------------------------------------------------------------------------- running
def session_for(path: str | os.PathLike, threads: int = 2, reference: bool = False) -> Any:
    """An onnxruntime CPU session as verification runs models: weights not prepacked (a verified model runs a few
    times only: prepacked copies would double its memory), no memory arena, no spinning threads. A compiled model runs with onnxruntime's
    own graph optimizations off, so what is checked is what onnxc wrote. The `reference` (the input) runs with
    onnxruntime's basic level: constant folding and the removal of redundant nodes, which onnxruntime applies to
    every model it runs by default; a constant subgraph (an exporter's Transpose of a tied embedding) is then
    computed once at load instead of at every run (module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if reference else
                                   ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    # Worker threads sleep between parallel ops instead of spinning: on a machine shared with other work, spinning
    # threads take the cores the main thread needs (the input's runs took 2x as long at a load of 10 on 2 cores)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:
        if not reference:
            raise
    # an optimizer of the basic level refused a model onnxruntime may still run as written
    return session_for(path, threads, reference=False)


def narrow_feeds(feeds: dict[str, np.ndarray], session: Any) -> dict[str, np.ndarray]:
    """`feeds` for the session's inputs: a model with float16 I/O (--io-fp16) takes the same values as its
    float32 reference, cast; names the session does not take are dropped."""
    types = {i.name: i.type for i in session.get_inputs()}
    narrow = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
    return {k: (v.astype(narrow[types[k]]) if types[k] in narrow and v.dtype.kind == "f" else v)
            for k, v in feeds.items() if k in types}


def run_model(path: str | os.PathLike, feeds_list: list[dict[str, np.ndarray]], threads: int = 2,
              inspect: Callable[[Any, list[dict[str, np.ndarray]]], None] | None = None, reference: bool = False
              ) -> list[dict[str, np.ndarray]]:
    """Every output of the model at `path` on each feed; `inspect(session, outputs)` runs before the session
    closes. `reference`: the model is the input, run as session_for runs a reference."""
    session = session_for(path, threads, reference)
    names = [o.name for o in session.get_outputs()]
    results = [dict(zip(names, session.run(names, narrow_feeds(feeds, session)))) for feeds in feeds_list]
    if inspect is not None:
        inspect(session, results)
    del session
    gc.collect()
    return results


def computed_in(model: ir.Model | None, name: str) -> str | None:
    """The narrowest float type among the values graph output `name` is computed from (node outputs in its cone, not
    the inputs both models are fed), by tolerance: a float32 result Cast to float64 is computed in float32."""
    return computed_in_all(model).get(name)


def computed_in_all(model: ir.Model | None) -> dict[str, str | None]:
    """computed_in for every graph output, each node's cone walked once (memoized over the nodes)."""
    if model is None:
        return {}

    def wider(a: str | None, b: str | None) -> str | None:
        return b if a is None or (b is not None and TOLERANCES[b][0] > TOLERANCES[a][0]) else a

    at: dict[int, str | None] = {}      # id(node) -> the narrowest float type in its cone, its own outputs included
    opened: set[int] = set()
    for out in model.graph.outputs:
        stack = [out.producer()] if out.producer() is not None else []
        while stack:                    # each node is settled on its second visit, after its producers
            node = stack[-1]
            producers = [i.producer() for i in node.inputs if i is not None and i.producer() is not None]
            if id(node) not in at and id(node) not in opened:
                opened.add(id(node))
                stack.extend(p for p in producers if id(p) not in at and id(p) not in opened)
                continue
            stack.pop()
            if id(node) in at:
                continue
            narrowest = None
            for o in node.outputs:
                kind = str(o.dtype.numpy()) if o.dtype is not None and o.dtype.is_floating_point() else None
                narrowest = wider(narrowest, kind if kind in TOLERANCES else None)
            for p in producers:
                narrowest = wider(narrowest, at.get(id(p)))
            at[id(node)] = narrowest
    return {v.name: (at.get(id(v.producer())) if v.producer() is not None else None) for v in model.graph.outputs}


def _judged_as(ref: np.ndarray, tolerance_dtype: str | None, computed: str | None) -> str | None:
    """The precision an output is judged at: `tolerance_dtype` (or the output's own dtype), or the narrower one it
    was computed in when that one's tolerance is looser."""
    own = tolerance_dtype or str(ref.dtype)
    if computed is not None and own in TOLERANCES and TOLERANCES[computed][0] > TOLERANCES[own][0]:
        return computed
    return tolerance_dtype


def compare(ref: np.ndarray, got: np.ndarray, name: str, tolerance_dtype: str | None = None,
            rtol: float | None = None, atol: float | None = None) -> OutputCheck:
    """|got - ref| <= atol + rtol * |ref| element-wise. By default rtol and atol (a fraction of max|ref|) come from
    TOLERANCES for the reference's dtype, or for `tolerance_dtype` (the precision the candidate computes in);
    `rtol`/`atol` given override them, atol then absolute."""
    dtype = str(ref.dtype)
    if ref.shape != got.shape:
        return OutputCheck(name, dtype, list(ref.shape), float("inf"), float("inf"), 0, 0, False, float("inf"))
    if ref.dtype.kind not in "fc":
        ok = bool(np.array_equal(ref, got))
        return OutputCheck(name, dtype, list(ref.shape), 0.0 if ok else float("inf"), 0.0, 0, 0, ok,
                           0.0 if ok else float("inf"))
    default_rtol, atol_frac = TOLERANCES.get(tolerance_dtype or dtype, TOLERANCES["float32"])
    r, g = ref.astype(np.float64), got.astype(np.float64)
    nan_ok = bool(np.array_equal(np.isnan(r), np.isnan(g)))
    finite = np.isfinite(r) & np.isfinite(g)
    scale = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    rtol = default_rtol if rtol is None else rtol
    atol = atol_frac * max(scale, 1e-6) if atol is None else atol
    err = np.abs(r - g)[finite]
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = max_abs / max(scale, 1e-30)
    inf_ok = bool(np.array_equal(np.where(np.isinf(r), r, 0), np.where(np.isinf(g), g, 0)))
    same_specials = nan_ok and inf_ok
    ok = same_specials and bool(np.all(err <= atol + rtol * np.abs(r[finite])))
    min_tol = float(np.max(err / (max(scale, 1e-6) + np.abs(r[finite])))) if err.size else 0.0
    return OutputCheck(name, dtype, list(ref.shape), max_abs, max_rel, rtol, atol, ok,
                       min_tol if same_specials else float("inf"))


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def weights_budget(weight_bytes: int, memory_budget: int | None, seed: int = 0) -> tuple[int, VerifyReport | None]:
    """(bytes left for activations, None), or (0, a "skipped" report) when one model's weights (2.5x, for the
    runtime's copies) are over the memory budget (default: 70% of available memory). Checked before anything is
    written or run for verification."""
    budget = memory_budget if memory_budget is not None else int(available_memory() * 0.7)
    need = int(weight_bytes * 2.5)
    if need > budget:
        return 0, VerifyReport("skipped", f"one model needs about {need >> 20} MiB, over the {budget >> 20} MiB "
                               "memory budget; per-rewrite checks still ran", seed)
    return budget - need, None


def verify_files(reference: str | os.PathLike, candidate: str | os.PathLike, model: ir.Model, *, seed: int = 0,
                 inputs: list[dict[str, np.ndarray]] | None = None, weight_bytes: int = 0,
                 memory_budget: int | None = None, tolerance_dtype: str | None = None,
                 scenarios: tuple[Scenario, ...] | None = None,
                 candidate_check: Callable[[Any, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], None]
                 | None = None,
                 rtol: float | None = None, atol: float | None = None) -> VerifyReport:
    """Compare `candidate` with `reference` (paths). `model` supplies the signature used to make inputs.
    `candidate_check(session, feeds_list, outputs)` runs on the candidate's session before it closes (one load, not
    two), with the candidate's outputs on each feed (not computed twice)."""
    budget, over = weights_budget(weight_bytes, memory_budget, seed)
    if over is not None:
        return over
    scenarios = scenarios or scenarios_for(model)
    feeds_list, names, notes = fit_scenarios([Path(reference), Path(candidate)], model, scenarios, seed, inputs,
                                             budget)
    if not feeds_list:
        return VerifyReport("skipped", notes[0] if len(notes) == 1 else
                            f"every scenario is over the memory budget ({notes[0]}; +{len(notes) - 1} more)",
                            seed, notes=notes)
    try:
        refs = run_model(reference, feeds_list, reference=True)
    except Exception as exc:
        raise _input_refused(exc, inputs is not None) from None
    try:
        gots = run_model(candidate, feeds_list, inspect=None if candidate_check is None else
                         (lambda session, outputs: candidate_check(session, feeds_list, outputs)))
    except Exception as exc:
        raise VerificationError(f"verification failed: onnxruntime cannot run the compiled model ({first_line(exc)})"
                                ) from None
    report = VerifyReport("passed", "", seed, notes=notes)
    computed = computed_in_all(model)
    for sc, feeds, ref, got in zip(names, feeds_list, refs, gots):
        if sc.get("pad"):
            ref, got = _valid_rows(ref, sc), _valid_rows(got, sc)
        checks = [compare(ref[n], got[n], n, _judged_as(ref[n], tolerance_dtype, computed.get(n)), rtol, atol)
                  for n in ref]
        report.scenarios.append({**sc, "inputs": {k: list(v.shape) for k, v in feeds.items()},
                                 "outputs": [asdict(c) for c in checks]})
        bad = [c for c in checks if not c.ok]
        if bad and report.status == "passed":
            report.status = "failed"
            worst = max(bad, key=lambda c: c.max_rel)
            report.reason = (f"output '{worst.name}' differs in scenario '{sc['name']}': max abs error "
                             f"{worst.max_abs:.3g} (relative {worst.max_rel:.3g}), tolerance rtol={worst.rtol:g} "
                             f"atol={worst.atol:.3g}")
    if report.status == "failed" and budget >= int(weight_bytes * 2.5 * 2):
        second_opinion(Path(reference), report, names, feeds_list, refs, gots)
    return report


NOISE_FACTOR = 4.0   # a float16 output may be this many times as far from the float32 twin's as the input's is


def second_opinion(reference: Path, report: VerifyReport, names: list[dict[str, Any]],
                   feeds_list: list[dict[str, np.ndarray]], refs: list[dict[str, np.ndarray]],
                   gots: list[dict[str, np.ndarray]]) -> None:
    """Float16 outputs over their tolerance against a float16 input are judged again against the input's float32
    twin (compiler/widen.py): each passes when its distance from the twin's output is within its atol plus
    NOISE_FACTOR times the input's own distance from it (how ill-conditioned the scenario is in float16). The
    report passes when every failed check passes so, with a note; each such check records both distances."""
    import tempfile

    from . import widen

    failed = [(k, c) for k, sc in enumerate(report.scenarios) for c in sc["outputs"] if not c["ok"]]
    if not failed or any(refs[k][c["name"]].dtype != np.float16 for k, c in failed):
        return
    if not widen.has_float16(ir.load(reference)):
        return
    scenarios = sorted({k for k, _ in failed})
    with tempfile.TemporaryDirectory(prefix="onnxc-twin-") as work:
        try:
            twin = widen.save_twin(reference, Path(work) / "twin.onnx")
            wides = run_model(twin, [feeds_list[k] for k in scenarios], reference=True)
        except Exception:           # a twin onnxruntime cannot run gives no second opinion
            return
    wide_of = dict(zip(scenarios, wides))
    worst = 0.0
    for k, c in failed:
        ref, got, wide = refs[k], gots[k], wide_of[k]
        if names[k].get("pad"):
            ref, got, wide = (_valid_rows(o, names[k]) for o in (ref, got, wide))
        n = c["name"]
        own = float(np.max(np.abs(ref[n].astype(np.float64) - wide[n]), initial=0.0))
        err = float(np.max(np.abs(got[n].astype(np.float64) - wide[n]), initial=0.0))
        ok = bool(np.isfinite(err) and err <= c["atol"] + NOISE_FACTOR * own)
        c["float32_twin"] = {"input_error": own, "compiled_error": err}
        c["ok"] = ok
        if not ok:
            return
        worst = max(worst, err / max(own, 1e-30))
    report.status, report.reason = "passed", ""
    report.notes.append(f"{len(failed)} float16 output check(s) over tolerance against the float16 input were "
                        f"judged against its float32 twin: the compiled model is at most {worst:.2g}x as far from "
                        f"the float32 result as the input is (allowed {NOISE_FACTOR:g}x, plus atol)")


def _input_refused(exc: Exception, user_inputs: bool) -> InvalidModelError | UsageError:
    """onnxruntime refused the input model on inputs made from its own signature: the model is invalid (exit 3),
    not the compile; on --verify-inputs arrays, the arrays may be what is wrong (exit 2)."""
    if user_inputs:
        return UsageError(f"onnxruntime cannot run the input model on the --verify-inputs arrays: {first_line(exc)}")
    return InvalidModelError(f"onnxruntime cannot load or run the input model: {first_line(exc)} (use --no-verify "
                             "to compile without running it)")


def _smaller(sc: Scenario) -> Scenario | None:
    """The next smaller scenario: batch 1 first, then half the tokens and half the past (a past stays non-empty)."""
    if sc.batch > 1:
        return Scenario(sc.name, 1, sc.seq, sc.past, 0)
    if sc.seq > 1 or sc.past > 1:
        return Scenario(sc.name, 1, max(1, sc.seq // 2), max(1, sc.past // 2) if sc.past else 0, 0)
    return None


def fit_scenarios(model_files: list[Path], model: ir.Model, scenarios: tuple[Scenario, ...], seed: int,
                  inputs: list[dict[str, np.ndarray]] | None, budget: int
                  ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]], list[str]]:
    """Feeds and names for the scenarios whose activations (compiler/activation.py, the larger of the models'
    estimates) fit `budget` bytes: a scenario over it is shrunk (batch 1, then fewer tokens) until it fits, or
    skipped; user inputs are kept or skipped. Returns (feeds_list, names, notes on what was shrunk or skipped)."""
    from . import activation

    cache: dict[Path, Any] = {}
    notes: list[str] = []

    def need(feeds: dict[str, np.ndarray]) -> activation.Estimate:
        try:
            return activation.peak_of(model_files, {k: v.shape for k, v in feeds.items()}, cache)
        except Exception:      # a model the estimate cannot read is run as before
            return activation.Estimate(0, ("", 0), 0)

    def mib(n: int) -> str:
        return f"{n / 2**20:.0f} MiB"

    if inputs is not None:
        kept, names = [], []
        for k, feeds in enumerate(inputs):
            e = need(feeds)
            if e.peak_bytes > budget:
                notes.append(f"inputs {k} skipped: activations need about {mib(e.peak_bytes)} (largest "
                             f"'{e.largest[0]}' {mib(e.largest[1])}), over the {mib(max(budget, 0))} left after the "
                             "weights")
            else:
                kept.append(feeds)
                names.append({"name": f"user-{k}"})
        return kept, names, notes
    # One estimate at the largest batch, tokens and past of all scenarios bounds them all (activation sizes grow
    # with the dims); only when that bound is over the budget is each scenario estimated on its own.
    bound = Scenario("bound", max(sc.batch for sc in scenarios), max(sc.seq for sc in scenarios),
                     max(sc.past for sc in scenarios))
    if need(make_inputs(model, bound, seed)).peak_bytes <= budget:
        return ([make_inputs(model, sc, seed + k) for k, sc in enumerate(scenarios)], [asdict(sc) for sc in scenarios],
                [])
    feeds_list, names = [], []
    for k, sc in enumerate(scenarios):
        first, cur = None, sc
        while cur is not None:
            feeds = make_inputs(model, cur, seed + k)
            e = need(feeds)
            first = first or e
            if e.peak_bytes <= budget:
                break
            cur = _smaller(cur)
        if cur is None:
            notes.append(f"scenario '{sc.name}' skipped: activations need about {mib(first.peak_bytes)} (largest "
                         f"'{first.largest[0]}' {mib(first.largest[1])}) even at batch 1 x 1 token, over the "
                         f"{mib(max(budget, 0))} left after the weights")
            continue
        if cur != sc:
            notes.append(f"scenario '{sc.name}' shrunk from batch {sc.batch} x {sc.seq} tokens (past {sc.past}) to "
                         f"batch {cur.batch} x {cur.seq} (past {cur.past}): activations need about "
                         f"{mib(first.peak_bytes)}, over the {mib(max(budget, 0))} left after the weights")
        feeds_list.append(feeds)
        names.append(asdict(cur))
    return feeds_list, names, notes


def _valid_rows(outs: dict[str, np.ndarray], sc: dict) -> dict[str, np.ndarray]:
    """Zero the padded positions of the last batch row in (B, S, ...) outputs."""
    b, s, pad = sc["batch"], sc["seq"], sc["pad"]
    res = {}
    for k, v in outs.items():
        if v.ndim >= 2 and v.shape[0] == b and v.shape[1] == s:
            v = v.copy()
            v[-1, s - pad:] = 0
        res[k] = v
    return res


def compute_precision(model: ir.Model) -> str | None:
    """"float16" or "bfloat16" when a float32-I/O model computes in a narrower float (onnxc -O3 --target cuda), so
    it is compared with that precision's tolerances; None otherwise."""
    narrow = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    for v in model.graph.initializers.values():
        if v.dtype in narrow:
            return narrow[v.dtype]
    for node in model.graph:
        if node.op_type == "Cast" and node.attributes.get("to") is not None:
            to = ir.DataType(node.attributes["to"].as_int())
            if to in narrow:
                return narrow[to]
    return None


def is_quantized(model: ir.Model) -> bool:
    """The model holds quantized weights (MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul, QDQ)."""
    return any(n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "QuantizeLinear")
               for n in model.graph)


def load_inputs(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Read --verify-inputs: an .npz whose arrays are named after graph inputs (one scenario)."""
    path = check_regular_file(path, "--verify-inputs")
    try:
        with np.load(path, allow_pickle=False) as data:
            return [{k: data[k] for k in data.files}]
    except Exception as exc:
        raise UsageError(f"--verify-inputs {path}: cannot read ({first_line(exc)})") from None


# ---------------------------------------------------------------------------------------------------- quantized
# A quantized model is checked against two float twins built from it (float_twins): the same graph with each
# quantized weight replaced by its dequantized values (must agree with the quantized model run at accuracy_level 0,
# to float tolerance), and with each quantized weight replaced by the float weight it came from (must agree with
# the input model: that checks every other pass). The error of the model as emitted against the input is reported,
# never failed on.
QUANT_META = "onnxc.quantize"   # node.meta key set by quantize passes: .weight (K, N) float tensor, .bias, .kind


def float_twins(model: ir.Model) -> list[tuple[ir.Value, ir.TensorProtocol, ir.TensorProtocol]]:
    """Rewrite, in place, every MatMulNBits / GatherBlockQuantized node that carries QUANT_META into
    MatMul(A, W) (+ bias) / Gather(table, ids) (int8 nodes: compiler/quant_twins.py). Returns (weight value,
    dequantized tensor, source tensor) for each, so the caller picks a twin with `value.const_value = ...`. Both
    tensors are lazy."""
    from onnxc.kernels.matmul_nbits import dequantize

    from . import quant_twins

    graph = model.graph
    swaps = []

    def lazy(fn, dtype, shape):
        return ir.LazyTensor(lambda: ir.tensor(fn()), dtype=dtype, shape=ir.Shape(list(shape)))

    for node in list(graph):
        src = node.meta.get(QUANT_META)
        if src is not None and node.op_type in quant_twins.OPS:     # int8: DynamicQuantizeMatMul, QDQ
            swaps.extend(quant_twins.twin(graph, node, src))
            continue
        if src is None or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        bits, block = int(attrs.get("bits", 4)), int(attrs.get("block_size", 128 if node.op_type != "MatMulNBits"
                                                                              else 32))
        data = node.inputs[0] if node.op_type == "GatherBlockQuantized" else node.inputs[1]
        reshape = data.producer() if data.const_value is None else None
        b = (reshape.inputs[0] if reshape is not None else data).const_value
        s = node.inputs[2].const_value
        z = node.inputs[3].const_value if len(node.inputs) > 3 and node.inputs[3] is not None else None
        n, kb = (int(d) for d in s.shape)
        k = int(attrs["K"]) if "K" in attrs else kb * block
        dt = s.dtype

        def deq(b=b, s=s, z=z, k=k, n=n, bits=bits, block=block, dt=dt):
            return dequantize(b.numpy(), s.numpy(), None if z is None else z.numpy(), K=k, N=n, bits=bits,
                              block_size=block).astype(dt.numpy())

        if node.op_type == "MatMulNBits":
            w = ir.Value(name=f"{node.name}_float_weight", shape=ir.Shape([k, n]), type=ir.TensorType(dt))
            new = [ir.Node("", "MatMul", [node.inputs[0], w])]
            if len(node.inputs) > 5 and node.inputs[5] is not None:
                new.append(ir.Node("", "Add", [new[0].outputs[0], node.inputs[5]]))
            swaps.append((w, lazy(deq, dt, (k, n)), src.weight))
        else:
            w = ir.Value(name=f"{node.name}_float_table", shape=ir.Shape([n, k]), type=ir.TensorType(dt))
            new = [ir.Node("", "Gather", [w, node.inputs[1]], attributes=[ir.AttrInt64("axis", 0)])]
            swaps.append((w, lazy(lambda f=deq: np.ascontiguousarray(f().T), dt, (n, k)),
                          lazy(lambda t=src.weight: np.ascontiguousarray(np.asarray(t.numpy()).T), dt, (n, k))))
        w.const_value = swaps[-1][1]
        graph.register_initializer(w)
        out = node.outputs[0]
        new[-1].outputs[0].shape, new[-1].outputs[0].type = out.shape, out.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, [out], [new[-1].outputs[0]])
        if reshape is not None and not reshape.outputs[0].uses():
            graph.remove(reshape, safe=True)
    for v in list(graph.initializers.values()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            graph.initializers.pop(v.name)
    return swaps


def accuracy_level_zero_copy(model_file: Path) -> Path:
    """A copy of a saved model (beside it, sharing its external data) with every MatMulNBits at accuracy_level 0:
    exact float compute, so it can be compared with the dequantized twin to float tolerance."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    changed = False
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level" and a.i != 0:
                    a.i, changed = 0, True
    if not changed:
        return model_file
    out = model_file.with_name(".acc0." + model_file.name)
    onnx.save(proto, str(out))
    return out


def quality(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Error of each float output against the reference: max abs, relative (to max |ref|), mean cosine over rows
    of the last axis; for 3-D outputs the cosine of mean-pooled rows (sentence embeddings); for logits, the share
    of positions whose top-1 token agrees."""
    rows = []
    for name, r in ref.items():
        g = got[name]
        if r.dtype.kind != "f" or r.shape != g.shape or r.size == 0:
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        err = float(np.abs(r64 - g64).max())
        row: dict[str, Any] = {"name": name, "max_abs": err, "max_rel": err / max(float(np.abs(r64).max()), 1e-30)}
        if r.ndim >= 2:
            row["cosine"] = _mean_cosine(r64.reshape(-1, r.shape[-1]), g64.reshape(-1, r.shape[-1]))
        if r.ndim == 3:
            row["pooled_cosine"] = _mean_cosine(r64.mean(axis=1), g64.mean(axis=1))
        if "logits" in name.lower():
            row["top1_agreement"] = float((r.argmax(-1) == g.argmax(-1)).mean())
        rows.append(row)
    return rows


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    ok = (na > 0) & (nb > 0)
    return float(((a * b).sum(-1)[ok] / (na[ok] * nb[ok])).mean()) if ok.any() else 1.0


def verify_quantized(reference: str | os.PathLike, compiled: str | os.PathLike, exact: str | os.PathLike,
                     dequantized: str | os.PathLike, unquantized: str | os.PathLike, model: ir.Model, *,
                     seed: int = 0, inputs: list[dict[str, np.ndarray]] | None = None, weight_bytes: int = 0,
                     memory_budget: int | None = None, tolerance_dtype: str | None = None
                     ) -> tuple[VerifyReport, dict[str, Any]]:
    """Check a quantized model and measure its error (module section comment). `exact` is the compiled model at
    accuracy_level 0, `dequantized` and `unquantized` its float twins. Returns (report, quality)."""
    budget, over = weights_budget(weight_bytes, memory_budget, seed)
    if over is not None:
        return over, {}
    feeds_list, names, notes = fit_scenarios([Path(reference), Path(unquantized)], model, scenarios_for(model), seed,
                                             inputs, budget)
    if not feeds_list:
        return VerifyReport("skipped", notes[0], seed, notes=notes), {}

    def run(path, what):
        try:
            return run_model(path, feeds_list)
        except Exception as exc:
            raise VerificationError(f"verification failed: onnxruntime cannot run the {what} ({first_line(exc)})"
                                    ) from None

    try:
        refs = run_model(reference, feeds_list, reference=True)
    except Exception as exc:
        raise _input_refused(exc, inputs is not None) from None
    report = VerifyReport("passed", "", seed, notes=notes)
    steps = (("outputs", run(unquantized, "compiled model with float weights"), refs,
              "the compiled model with its float weights differs from the input"),
             ("quantized_outputs", run(exact, "quantized model"), run(dequantized, "dequantized-weights model"),
              "the quantized model (accuracy_level 0) differs from the same model with dequantized weights"))
    computed = computed_in_all(model)
    for k, (sc, feeds) in enumerate(zip(names, feeds_list)):
        entry: dict[str, Any] = {**sc, "inputs": {n: list(v.shape) for n, v in feeds.items()}}
        for key, gots, wants, what in steps:
            want, got = wants[k], gots[k]
            if sc.get("pad"):
                want, got = _valid_rows(want, sc), _valid_rows(got, sc)
            checks = [compare(want[n], got[n], n, _judged_as(want[n], tolerance_dtype, computed.get(n)))
                      for n in want]
            entry[key] = [asdict(c) for c in checks]
            bad = [c for c in checks if not c.ok]
            if bad and report.status == "passed":
                worst = max(bad, key=lambda c: c.max_rel)
                report.status = "failed"
                report.reason = (f"{what}: output '{worst.name}' in scenario '{sc['name']}', max abs error "
                                 f"{worst.max_abs:.3g} (relative {worst.max_rel:.3g}), tolerance rtol={worst.rtol:g} "
                                 f"atol={worst.atol:.3g}")
        report.scenarios.append(entry)
    emitted = run(compiled, "quantized model")
    per = [{"name": sc["name"], "outputs": quality(_valid_rows(r, sc) if sc.get("pad") else r,
                                                    _valid_rows(g, sc) if sc.get("pad") else g)}
           for sc, r, g in zip(names, refs, emitted)]
    return report, {"against": "input model", "scenarios": per, "summary": summarize_quality(per)}


def summarize_quality(per: list[dict[str, Any]]) -> dict[str, float]:
    """The first output's worst relative error, lowest cosine / pooled cosine / top-1 agreement over scenarios."""
    out: dict[str, float] = {}
    firsts = [s["outputs"][0] for s in per if s["outputs"]]
    for key, pick in (("max_rel", max), ("max_abs", max), ("cosine", min), ("pooled_cosine", min),
                      ("top1_agreement", min)):
        vals = [o[key] for o in firsts if key in o]
        if vals:
            out[key] = pick(vals)
    if firsts:
        out["output"] = firsts[0]["name"]
    return out
