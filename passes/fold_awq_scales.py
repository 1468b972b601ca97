"""fold-awq-scales

    y = Norm(x; g, b?)                 ->  Norm(x; g / s, b / s)        y W_i = (y diag(1/s)) (diag(s) W_i)
    y = Mul(z, g)                      ->  Mul(z, g / s)                     for every use y W_i of y
    y = MatMul(x, W0)                  ->  MatMul(x, W0 diag(1/s))
    y W_i  (MatMul / Gemm / FusedMatMul)  ->  MatMul(y', diag(s) W_i)     (Gemm, FusedMatMul: transB and alpha in W_i)

Algebra: each producer is linear in its scaled parameters along the last axis (a norm's output is n(x) g + b, a
Mul's z g, a MatMul's x W0), so dividing them by s gives y' = y diag(1/s), and y' (diag(s) W_i) = y W_i: the graph
computes the same function, up to the rounding of the new constants (a few ulps). Norm is LayerNormalization
(axis -1), SimplifiedLayerNormalization, com.microsoft SkipLayerNormalization (g, beta) or
SkipSimplifiedLayerNormalization (g): only their output 0 carries g and b; the mean, inverse deviation and
input + skip sum outputs do not change.

Requires, else the group is left as it is with a note: every use of y is the input of a linear node that
quantize-int4 rewrites (compiler/quant_sites.find_sites) and y is no graph output: a residual Add, an activation or
an attention op that read y would see y diag(1/s) (a post-norm encoder's norm output feeds its residual, so BERT
folds nothing; through an activation or attention no scale commutes in general); each W_i is read by its node
alone (scaling a tied lm_head would untie its table, a shared weight its other reader); g, b constant of shape
(K,) or K elements with leading 1s; W0 a constant 2-D weight read by this MatMul alone.

The weights that share y (Q, K and V; gate and up; a packed QKV) share one s, AWQ's search on the --calibration
batches (compiler/awq.py: alpha on a grid, least output error ||X W - (X/s) Q(diag(s) W)||^2; X^T X and mean |x|
from compiler/calibration.Hessians, one onnxruntime session of the float graph as this pass finds it). The scaled
weights stream to the scratch file (compiler/quant_store.py). Runs with --quantize int4:awq[:METHOD] only, before
quantize-int4 (whose GPTQ, when asked, calibrates on the folded graph). Each fold and refusal goes to
ctx.results["fold-awq-scales"].
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxc.awq import confirm, search
from onnxc.calibration import Hessians, load_calibration, trim_heap
from onnxc.domains import MS
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.quant_options import options_of
from onnxc.quant_sites import Site, find_sites
from onnxc.quant_store import QuantStore, add_initializer
from onnxc.rules import const_tensor

# (domain, op) -> the inputs that scale its output 0 along the last axis
PRODUCERS = {("", "LayerNormalization"): (1, 2), ("", "SimplifiedLayerNormalization"): (1,),
             (MS, "SkipLayerNormalization"): (2, 3), (MS, "SkipSimplifiedLayerNormalization"): (2,),
             ("", "Mul"): (0, 1), ("", "MatMul"): (1,)}


@dataclass
class Fold:
    y: ir.Value                   # the input the group's weights read
    producer: ir.Node
    params: list[int]             # producer inputs divided by s (Mul: the constant one)
    sites: list[Site]
    weights: list[ir.Value]       # each site's weight input when found (a fold before may replace it)


def weight(site: Site, found: ir.Value) -> np.ndarray:
    """The site's W (K, N) now: as found, or the plain (K, N) constant an earlier fold put in its place."""
    w = site.node.inputs[1]
    return site.load() if w is found else np.asarray(const_tensor(w).numpy())


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _vector(v: ir.Value | None, k: int) -> bool:
    t = const_tensor(v)
    return t is not None and int(np.prod(t.shape)) == k and all(d == 1 for d in t.shape[:-1]) and \
        int(t.shape[-1]) == k


def _sole_reader(site: Site) -> bool:
    """The site's weight (and the Transpose it is read through) has no other reader."""
    w = site.node.inputs[1]
    if len(w.uses()) != 1 or w.is_graph_output():
        return False
    p = w.producer()
    return p is None or p.op_type != "Transpose" or len(p.inputs[0].uses()) == 1


def check(y: ir.Value, readers: list[Site]) -> Fold | str:
    """The fold of y's scales into its producer, or why it does not hold."""
    k = readers[0].shape[0]
    p = y.producer()
    if p is None:
        return "a graph input"
    op = (_domain(p), p.op_type)
    if op not in PRODUCERS or p.outputs[0] is not y:
        return f"produced by {p.op_type} (output {p.outputs.index(y) if y in p.outputs else '?'})"
    if y.is_graph_output():
        return "a graph output"
    if len(y.uses()) != len(readers) or any(u.idx != 0 for u in y.uses()):
        others = sorted({u.node.op_type for u in y.uses() if all(u.node is not s.node for s in readers)})
        return f"also read by {', '.join(others) or 'a weight input'}"
    shared = [s.name for s in readers if not _sole_reader(s)]
    if shared:
        return f"weight {shared[0]} has another reader (a tied table or a shared weight)"
    if p.op_type == "LayerNormalization" and p.attributes.get("axis") is not None and \
            p.attributes["axis"].value not in (-1, None if y.shape is None else len(y.shape) - 1):
        return "LayerNormalization over more than the last axis"
    if op == ("", "Mul"):
        params = [i for i in (0, 1) if _vector(p.inputs[i], k)]
        if len(params) != 1 or const_tensor(p.inputs[1 - params[0]]) is not None:
            consts = [i for i in (0, 1) if const_tensor(p.inputs[i]) is not None]
            return "Mul of two computed values (no constant takes s)" if not consts else \
                "Mul by a constant that is no (K,) vector"
        return Fold(y, p, params, readers, [s.node.inputs[1] for s in readers])
    if op == ("", "MatMul"):
        w0 = const_tensor(p.inputs[1])
        if w0 is None or len(w0.shape) != 2 or int(w0.shape[1]) != k or len(p.inputs[1].uses()) != 1:
            return "MatMul whose weight is not a constant (., K) read by it alone"
        return Fold(y, p, [1], readers, [s.node.inputs[1] for s in readers])
    params = [i for i in PRODUCERS[op] if i < len(p.inputs) and p.inputs[i] is not None]
    if not all(_vector(p.inputs[i], k) for i in params):
        return f"{p.op_type} whose scale or bias is not a constant of K = {k} elements"
    return Fold(y, p, params, readers, [s.node.inputs[1] for s in readers])


def _apply(graph: ir.Graph, fold: Fold, s: np.ndarray, store: QuantStore, taken: set[str]) -> None:
    """Divide the producer's parameters by s and scale each reader's weight rows by s (new initializers)."""
    p = fold.producer
    for i in fold.params:
        t = const_tensor(p.inputs[i])
        a = np.asarray(t.numpy())
        axis = 1 if p.op_type == "MatMul" else a.ndim - 1   # W0 (., K): its columns; a vector: its last axis
        shape = [1] * a.ndim
        shape[axis] = -1
        new = (a.astype(np.float64) / s.reshape(shape)).astype(a.dtype)
        name = f"{p.inputs[i].name or p.name}_awq"
        p.replace_input_with(i, add_initializer(graph, store.tensor(new, name), name, taken))
    for site, found in zip(fold.sites, fold.weights):
        w = weight(site, found)
        new = (w.astype(np.float64) * s[:, None]).astype(w.dtype)
        del w
        name = f"{site.name}_awq"
        node = site.node
        node.replace_input_with(1, add_initializer(graph, store.tensor(new, name), name, taken))
        for attr, plain in (("transB", ir.AttrInt64("transB", 0)), ("alpha", ir.AttrFloat32("alpha", 1.0))):
            if attr in node.attributes:   # Gemm / FusedMatMul: W_i already holds op(B) times alpha
                node.attributes[attr] = plain


@register_pass
class FoldAwqScales(Pass):
    """AWQ: per-input-channel scales from calibration, folded into the producer of the linear layers' input."""

    name = "fold-awq-scales"
    level = 0          # every row holds it in its optional quantize stage (compiler/pipeline.py)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = options_of(ctx)
        if opts.scheme != "int4" or not opts.awq:
            return PassResult(model, False, {})
        graph = model.graph
        started = time.perf_counter()
        by_input: dict[int, list[Site]] = {}
        for site in find_sites(graph, opts, [], self.name):
            by_input.setdefault(id(site.node.inputs[0]), []).append(site)
        folds, refused = [], []
        for readers in by_input.values():
            got = check(readers[0].node.inputs[0], readers)
            if isinstance(got, str):
                refused.append({"input": readers[0].node.inputs[0].name, "weights": [s.name for s in readers],
                                "reason": got})
            else:
                folds.append(got)
        done = []
        if folds:
            store = QuantStore(ctx.option("scratch_dir"))
            sites = [s for f in folds for s in f.sites]
            label = f"--calibration {opts.calibration}"
            stats = Hessians(model, sites, load_calibration(opts.calibration, graph), store.scratch(), label, opts)
            taken = {v.name for v in graph.initializers.values()} | {v.name for n in graph for v in n.outputs}
            for fold in folds:
                h, mean_abs = stats.gram(fold.sites[0].key)
                weights = [weight(s, w) for s, w in zip(fold.sites, fold.weights)]
                found = search(h, mean_abs, weights, opts.block_size, opts.symmetric)
                found = confirm(h, weights, found, opts.block_size, opts.symmetric,
                                "rtn" if opts.method == "rtn" else "lsq")
                del weights
                del h
                entry = {"input": fold.y.name, "producer": fold.producer.op_type,
                         "weights": [s.name for s in fold.sites], "alpha": found.alpha,
                         "error_ratio": round(found.gain, 4), "confirmed_ratio": round(found.confirmed, 4)}
                if found.alpha == 0:   # no scale helps the rounding used: the graph stays as it is
                    refused.append({**entry, "reason": "no scale lowers the output error of the rounding used"})
                    continue
                _apply(graph, fold, found.s, store, taken)
                done.append(entry)
            trim_heap()
        for v in list(graph.initializers.values()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                graph.initializers.pop(v.name)
        ctx.results[self.name] = {"folded": done, "refused": refused}
        ctx.notes.append(f"{self.name}: {len(done)} of {len(done) + len(refused)} inputs scaled "
                         f"({sum(len(d['weights']) for d in done)} weights), {time.perf_counter() - started:.2f} s"
                         + (f"; left: {refused[0]['input']} ({refused[0]['reason']})"
                            + (f" and {len(refused) - 1} more" if len(refused) > 1 else "") if refused else ""))
        counts: dict[str, int] = {}
        for d in done:
            counts[d["producer"]] = counts.get(d["producer"], 0) + 1
        return PassResult(model, bool(done), counts)
