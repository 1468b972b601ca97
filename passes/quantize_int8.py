"""quantize-int8

    int8           MatMul(A, W)  ->  MatMulNBits(A, B, s, z?, bias?; bits = 8)               weight-only
    int8:dynamic   MatMul(A, W)  ->  DynamicQuantizeMatMul(A, Wq, s, bias?)                 A quantized per call
    int8:static    MatMul(A, W)  ->  MatMul(DQ(Q(A, sa, za)), DQ(Wq, s, z; axis = 1)) (+ Add(y, bias))

with W (K, N) as find_sites reads it (MatMul, MatMul of a transposed constant, Gemm, FusedMatMul; a Gemm C or a
following constant Add is the bias). Weight-only uses MatMulNBits' layout at 8 bits (kernels/quantize.py rtn, block
and symmetry as int4's). dynamic and static quantize W symmetrically per output column into int8 (Wq = round(W / s),
s = max |W[:, n]| / 127, 63 with reduce_range; kernels/quantize_linear.quantize_weight): DynamicQuantizeMatMul
quantizes A to uint8 on every call; static fixes A's scale and zero point per tensor from the --calibration batches
(uint8 asymmetric by default, int8 symmetric with option activation_type "int8"), with the range chosen by
minmax, percentile (option percentile, 99.999) or entropy (kernels/calibrate.py). One QuantizeLinear /
DequantizeLinear pair serves every layer that reads the same activation (Q, K and V). onnxruntime runs the QDQ
form as MatMulIntegerToFloat (its QDQ fusion), int8 x int8 or uint8 x int8 products with float scales.

Static quality (option smooth, "auto" by default): SmoothQuant divides each activation by per-channel factors c
and multiplies the weight rows by them (a Mul before QuantizeLinear), alpha chosen per activation by the layer's
output error on the calibration sample (kernels/calibrate.choose_alpha). Each activation's effect on the model's
outputs is then measured alone, fake-quantized in one onnxruntime session of the float graph
(calibration_ranges.output_sensitivity); the activations of largest effect keep their layers in float until the
rest sum to at most option error_budget (1e-3, relative squared output error; inf: every layer int8).

Requires: A float32 for dynamic and static (DynamicQuantizeMatMul and ORT's int8 kernels take float32), float or
float16 for weight-only. Skipped, with a note: excluded names, float16 activations (dynamic, static), K < block size
(weight-only). Each new node keeps what it stands for in node.meta[QUANT_META] (a QuantSource; Int8Source for the
int8 ops) for the float twins that verification builds (compiler/verify.py, compiler/quant_twins.py).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir
from onnxc.calibration import load_calibration
from onnxc.calibration_ranges import observe, output_sensitivity
from onnxc.domains import MS
from onnxc.kernels import calibrate as kcal
from onnxc.kernels import quantize as kq
from onnxc.kernels import quantize_linear as ql
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.quant_options import QuantOptions, options_of
from onnxc.quant_sites import QuantSource, Site, find_sites
from onnxc.quant_store import QuantStore, add_initializer
from onnxc.quant_twins import Int8Source
from onnxc.verify import QUANT_META as META

ACTIVATION_TYPES = {"uint8": np.uint8, "int8": np.int8}
SENSITIVITY_BATCHES = 2            # calibration batches the output sensitivity of each activation is measured on
FLOAT = "onnxc.quantize-int8.float"   # node.meta key: a layer the error budget keeps in float (a rerun leaves it)


def _keep(site: Site, opts: QuantOptions, notes: list[str]) -> bool:
    """Whether the int8 ops take this site (dynamic and static compute in float32)."""
    if opts.method != "weight" and site.dtype != ir.DataType.FLOAT:
        notes.append(f"quantize-int8: kept {site.node.op_type} '{site.node.name}' ({site.name}) in float: "
                     f"{site.dtype} activations (int8:{opts.method} takes float32)")
        return False
    return True


def _calibrate_layers(stats: dict[str, kcal.RangeStats], sites: list[Site], opts: QuantOptions,
                      chosen: dict[str, dict]) -> None:
    """Per activation (the layers that read it): SmoothQuant's divisor c with alpha opts.smooth, or ("auto") the
    alpha of least output error on the calibration sample (kernels/calibrate.choose_alpha); and that error
    (smoothed_error), recorded in `chosen` as {"alpha", "error"}."""
    readers: dict[str, list[Site]] = {}
    for site in sites:
        readers.setdefault(site.node.inputs[0].name, []).append(site)
    dtype = ACTIVATION_TYPES[opts.activation_type]
    for name, group in readers.items():
        st = stats[name]
        if st.ch_lo is None or st.ch_lo.shape != (group[0].shape[0],) or not st.samples:
            continue
        weights = [np.asarray(s.load(), np.float32) for s in {s.key: s for s in group}.values()]
        alphas = kcal.ALPHAS if opts.smooth == "auto" else (float(opts.smooth),)
        alpha, st.divisor, error = kcal.choose_alpha(st, weights, alphas, dtype)
        chosen[name] = {"alpha": alpha, "error": error}
        del weights


def _over_budget(chosen: dict[str, dict], budget: float) -> list[str]:
    """The activations whose layers stay in float: those of largest effect on the outputs ("output_error", else the
    layer's own "error"), until the effects of the rest sum to at most `budget` (small errors add)."""
    effect = {n: c.get("output_error", c["error"]) for n, c in chosen.items()}
    total = sum(effect.values())
    kept = []
    for name in sorted(effect, key=lambda n: -effect[n]):
        if total <= budget:
            break
        kept.append(name)
        total -= effect[name]
    return kept


def _replace(graph: ir.Graph, site: Site, new: list[ir.Node]) -> None:
    """Replace the site's node (and the Add folded into its bias) by `new`, whose last node gives the result."""
    old = [site.node] + ([site.add] if site.add is not None else [])
    out = old[-1].outputs[0]
    new[-1].outputs[0].shape, new[-1].outputs[0].type = out.shape, out.type
    ir.convenience.replace_nodes_and_values(graph, site.node, old, new, [out], [new[-1].outputs[0]])


class _Rewriter:
    """The rewrite of each site under one mode; weights shared by several nodes are quantized once."""

    def __init__(self, graph: ir.Graph, opts: QuantOptions, store: QuantStore,
                 ranges: dict[str, tuple[float, float]], divisors: dict[str, np.ndarray]):
        self.graph, self.opts, self.store, self.ranges, self.divisors = graph, opts, store, ranges, divisors
        self.taken = {v.name for v in graph.initializers.values()} | {v.name for n in graph for v in n.outputs}
        self.weights: dict[tuple, tuple[ir.Value | None, ...]] = {}
        self.inputs: dict[int, ir.Value] = {}      # activation -> its DequantizeLinear(QuantizeLinear(.)) (static)

    def init(self, arr: np.ndarray | None, name: str) -> ir.Value | None:
        if arr is None:
            return None
        tensor = ir.tensor(arr, name=name) if arr.ndim == 0 else self.store.tensor(arr, name)  # scalars stay 0-D
        return add_initializer(self.graph, tensor, name, self.taken)

    def bias(self, site: Site) -> ir.Value | None:
        return None if site.bias is None else self.init(site.bias, f"{site.name}_bias")

    def weight(self, site: Site) -> tuple[ir.Value | None, ...]:
        c = self.divisors.get(site.node.inputs[0].name)
        key = site.key if c is None else (site.key, site.node.inputs[0].name)   # c W: one per activation
        if key not in self.weights:
            w, o = site.load(), self.opts
            if o.method == "weight":
                parts = kq.quantize(w, "rtn", o.block_size, o.symmetric, bits=8)
                tags = ("q8", "scales", "zero_points")
            else:
                q, s, z = ql.quantize_weight(w if c is None else w * c[:, None].astype(w.dtype), o.reduce_range)
                parts = (q, s, z if o.method == "static" else None)
                tags = ("int8", "scales", "zero_points")
            del w
            self.weights[key] = tuple(self.init(x, f"{site.name}_{t}") for x, t in zip(parts, tags))
        return self.weights[key]

    def rewrite(self, site: Site) -> str:
        """Rewrite one site; returns the op it became."""
        getattr(self, f"_{self.opts.method}")(site)
        return {"weight": "MatMulNBits", "dynamic": "DynamicQuantizeMatMul", "static": "QDQ"}[self.opts.method]

    def _weight(self, site: Site) -> None:
        b, s, z = self.weight(site)
        k, n = site.shape
        inputs = [site.node.inputs[0], b, s, z, None, self.bias(site)]
        while inputs[-1] is None:
            inputs.pop()
        new = ir.Node(MS, "MatMulNBits", inputs, name=f"{site.node.name or site.name}_MatMulNBits", attributes=[
            ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 8),
            ir.AttrInt64("block_size", self.opts.block_size), ir.AttrInt64("accuracy_level", self.opts.accuracy_level)])
        new.meta[META] = QuantSource(site.source, site.bias, "matmul")
        _replace(self.graph, site, [new])

    def _dynamic(self, site: Site) -> None:
        q, s, _ = self.weight(site)
        inputs = [site.node.inputs[0], q, s, None, self.bias(site)]
        while inputs[-1] is None:
            inputs.pop()
        new = ir.Node(MS, "DynamicQuantizeMatMul", inputs, name=f"{site.node.name or site.name}_DynamicQuantizeMatMul")
        new.meta[META] = Int8Source(site.source, site.bias, "dynamic")
        _replace(self.graph, site, [new])

    def _static(self, site: Site) -> None:
        q, s, z = self.weight(site)
        a = site.node.inputs[0]
        new: list[ir.Node] = []
        if id(a) not in self.inputs:
            dtype = ACTIVATION_TYPES[self.opts.activation_type]
            scale, zp = ql.activation_params(*self.ranges[a.name], dtype)
            sv, zv = self.init(scale, f"{a.name}_scale"), self.init(zp, f"{a.name}_zero_point")
            c = self.divisors.get(a.name)
            x = a
            if c is not None:   # A / c (a per-axis QuantizeLinear with scales s c would be the same codes, but
                                # onnxruntime runs it several times slower than a Mul and a per-tensor one)
                inv = self.init((np.float32(1) / c).astype(np.float32), f"{a.name}_smoothing")
                smooth = ir.Node("", "Mul", [a, inv], name=f"{a.name}_smoothing")
                smooth.outputs[0].shape, smooth.outputs[0].type = a.shape, a.type
                smooth.meta[META] = Int8Source(None, None, "smooth")
                new.append(smooth)
                x = smooth.outputs[0]
            quant = ir.Node("", "QuantizeLinear", [x, sv, zv], name=f"{a.name}_QuantizeLinear")
            deq = ir.Node("", "DequantizeLinear", [quant.outputs[0], sv, zv], name=f"{a.name}_DequantizeLinear")
            deq.outputs[0].shape, deq.outputs[0].type = a.shape, a.type
            deq.meta[META] = Int8Source(None, None, "activation")
            new += [quant, deq]
            self.inputs[id(a)] = deq.outputs[0]
        dw = ir.Node("", "DequantizeLinear", [q, s, z], attributes=[ir.AttrInt64("axis", 1)],
                     name=f"{site.name}_DequantizeLinear")
        dw.outputs[0].shape, dw.outputs[0].type = ir.Shape(list(site.shape)), ir.TensorType(site.dtype)
        dw.meta[META] = Int8Source(site.source, None, "weight")
        new += [dw, ir.Node("", "MatMul", [self.inputs[id(a)], dw.outputs[0]], name=site.node.name or site.name)]
        bias = self.bias(site)
        if bias is not None:
            new.append(ir.Node("", "Add", [new[-1].outputs[0], bias], name=f"{site.node.name or site.name}_bias"))
        _replace(self.graph, site, new)


@register_pass
class QuantizeInt8(Pass):
    """Linear layers with constant weights -> int8: weight-only MatMulNBits, DynamicQuantizeMatMul or QDQ."""

    name = "quantize-int8"
    level = 0          # every row holds it in its optional quantize stage (compiler/pipeline.py)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = options_of(ctx)
        if opts.scheme != "int8":
            return PassResult(model, False, {})
        graph = model.graph
        started = time.perf_counter()
        block = opts.block_size if opts.method == "weight" else 1   # only MatMulNBits has blocks
        sites = [s for s in find_sites(graph, dataclasses.replace(opts, block_size=block), ctx.notes, "quantize-int8")
                 if FLOAT not in s.node.meta and _keep(s, opts, ctx.notes)]
        if not sites:
            return PassResult(model, False, {})
        store = QuantStore(ctx.option("scratch_dir"))
        ranges: dict[str, tuple[float, float]] = {}
        divisors: dict[str, np.ndarray] = {}
        summary: dict[str, object] = {"mode": f"int8:{opts.method}"}
        if opts.method == "static":
            values = list({id(s.node.inputs[0]): s.node.inputs[0] for s in sites}.values())
            t0 = time.perf_counter()
            layers: dict[str, dict] = {}
            batches = load_calibration(opts.calibration, graph)
            width = sum(int(v.shape[-1]) if v.shape is not None and isinstance(v.shape[-1], int) else 4096
                        for v in values)
            keep = max(8, min(kcal.SAMPLE_ROWS, kcal.SAMPLE_BYTES // (4 * width)) // len(batches))
            stats, rows = observe(model, values, batches, store.scratch(), f"--calibration {opts.calibration}",
                                  opts.calibrate != "minmax", lambda st: _calibrate_layers(st, sites, opts, layers),
                                  keep)
            ranges = {n: st.range(opts.calibrate, opts.percentile) for n, st in stats.items()}
            divisors = {n: st.divisor for n, st in stats.items() if st.divisor is not None}
            if opts.error_budget != float("inf"):     # each activation's effect on the outputs, alone
                dtype = ACTIVATION_TYPES[opts.activation_type]
                groups = {v.name: (v, *ql.activation_params(*ranges[v.name], dtype), divisors.get(v.name))
                          for v in values if v.name in layers}
                effect = output_sensitivity(model, groups, batches[:SENSITIVITY_BATCHES], store.scratch(),
                                            f"--calibration {opts.calibration}")
                for name, e in effect.items():
                    layers[name]["output_error"] = e
            floats = set(_over_budget(layers, opts.error_budget))
            for site in [s for s in sites if s.node.inputs[0].name in floats]:
                site.node.meta[FLOAT] = "error budget"
                c = layers[site.node.inputs[0].name]
                ctx.notes.append(f"quantize-int8: kept {site.node.op_type} '{site.node.name}' ({site.name}) in float: "
                                 f"output error {c.get('output_error', c['error']):.2e} of its activation, over the "
                                 f"error budget {opts.error_budget:g}")
            sites = [s for s in sites if s.node.inputs[0].name not in floats]
            summary.update(calibration=opts.calibrate, activation_type=opts.activation_type, smooth=opts.smooth,
                           error_budget=opts.error_budget, rows=rows, activations=len(values),
                           layers=[{"activation": n, "alpha": c["alpha"], "error": float(f"{c['error']:.4g}"),
                                    **({"output_error": float(f"{c['output_error']:.4g}")} if "output_error" in c
                                       else {}),
                                    "int8": n not in floats} for n, c in layers.items()],
                           seconds=round(time.perf_counter() - t0, 3))
            if opts.calibrate == "percentile":
                summary["percentile"] = opts.percentile
            ctx.notes.append(f"quantize-int8: calibration {opts.calibration}: {len(values)} activations, {rows} rows, "
                             f"{opts.calibrate} ranges, smoothing {opts.smooth}, {len(floats)} in float (error "
                             f"budget {opts.error_budget:g}), {time.perf_counter() - t0:.2f} s")
        rewriter = _Rewriter(graph, opts, store, ranges, divisors)
        counts: dict[str, int] = {}
        for site in sites:
            w_in = site.node.inputs[1]
            transpose = w_in.producer() if w_in.producer() is not None else None
            kind = f"{site.node.op_type}->{rewriter.rewrite(site)}"
            counts[kind] = counts.get(kind, 0) + 1
            if transpose is not None and not transpose.outputs[0].uses() and transpose.graph is graph:
                graph.remove(transpose, safe=True)
        model.opset_imports.setdefault(MS, 1)
        if opts.method == "static" and model.opset_imports.get("", 0) < 13:
            model.opset_imports[""] = 13          # per-axis DequantizeLinear
        summary["weights"] = len(rewriter.weights)
        ctx.results["quantize-int8"] = summary
        ctx.notes.append(f"quantize-int8: {len(rewriter.weights)} weights, int8:{opts.method}"
                         f"{':' + opts.calibrate if opts.method == 'static' else ''}, "
                         f"{time.perf_counter() - started:.2f} s")
        for v in list(graph.initializers.values()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                graph.initializers.pop(v.name)
        return PassResult(model, True, counts)
