"""quantize-int4

    MatMul(A, W)                          ->  MatMulNBits(A, B, s, z?)                  W constant (K, N)
    MatMul(A, Transpose(Wt))              ->  MatMulNBits(A, B, s, z?)                  W = Wt^T
    FusedMatMul(A, W; alpha, transB)      ->  MatMulNBits(A, B, s, z?)                  W = alpha op(W)
    Gemm(A, W, C?; alpha, beta, transB)   ->  MatMulNBits(A, B, s, z?, bias = beta C)   W = alpha op(W)
    MatMulNBits(A, ...) + b               ->  MatMulNBits(A, ..., bias = b)             b constant, N elements
    Gather(E, ids), E^T == some W above   ->  GatherBlockQuantized(Reshape(B, [N, K/2]), ids, s, z?)

with W[k, n] ~ (code[n, k] - z[n, k / block]) * s[n, k / block] (kernels/quantize.py: rtn, lsq, hqq, gptq), B the codes
packed two per byte (N, ceil(K / block), block / 2). MatMulNBits computes A @ W for any rank of A, so every
constant-weight linear layer is covered, packed QKV and gate-up MatMuls included (the pass runs after the fusions).
A tied embedding (its table equal to the lm_head's weight transposed, compared by value) becomes a
GatherBlockQuantized over the lm_head's own B, so the model stores the table once (a lm_head whose K the block does
not divide takes the largest power-of-two block >= 16 that does).

Requires: A float or float16 with rank >= 2 when known; Gemm transA = 0; FusedMatMul transA = transBatchA =
transBatchB = 0; a Gemm C that is constant and broadcasts to (N,). Skipped, with a note: K < block_size (a block of
mostly padding buys nothing), excluded names (--exclude globs, on node and weight names).

The concerns around the rewrite live in the core: the options (compiler/quant_options.py: "int4",
"int4:uniform|rtn|lsq|hqq|gptq", "int4:awq[:METHOD]" whose AWQ scales the pass fold-awq-scales folds in before this
one, block_size, symmetric, exclude, accuracy_level, mixed, mixed_budget, calibration, damp, act_order), the sites
and tied tables (compiler/quant_sites.py), the choice of 8-bit layers under mixed precision
(compiler/quant_precision.py, ranked by each weight's output error on synthetic inputs, measured in
compiler/sensitivity.py; the choices go to ctx.results["quantize-int4"]["layers"]), GPTQ's Hessians from one
onnxruntime session of the float graph as this pass finds it, closed before the first weight is quantized
(compiler/calibration.py), and the scratch file quantized tensors stream to (compiler/quant_store.py, option
scratch_dir). Each weight is read alone (memory-mapped weights are released after), so peak memory stays a few times
the largest weight. Each new node keeps its float source in node.meta["onnxc.quantize"] for verification
(compiler/verify.py).
"""
from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
from onnxc.calibration import GPTQ_ROWS_PER_K, Hessians, load_calibration, trim_heap
from onnxc.domains import MS
from onnxc.kernels import quantize as kq
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.quant_options import DEFAULT_METHOD, HIGH_BITS, SENSITIVITY_MAX_BYTES, QuantOptions, options_of
from onnxc.quant_precision import LayerChoice, choose_bits, dequantized_rtn
from onnxc.quant_sites import (TABLE_ROWS, QuantSource, Site, find_sites, table_block, table_digest, table_key,
                               tables, tied)
from onnxc.quant_store import QuantStore, add_initializer
from onnxc.sensitivity import output_errors
from onnxc.verify import QUANT_META as META  # node.meta key: the QuantSource a node replaced

Quantized = tuple[ir.Value, ir.Value, ir.Value | None]   # codes, scales, zero points


def _blocks(sites: list[Site], shapes: set[tuple], opts: QuantOptions, notes: list[str]) -> dict[tuple, int]:
    """Each weight's block: opts.block_size, or for a weight that may be a tied table one its K is a multiple of."""
    blocks: dict[tuple, int] = {}
    for site in sites:
        if site.key not in blocks:
            block = opts.block_size
            if (site.shape[::-1], site.dtype) in shapes and site.shape[0] % block:
                block = table_block(site.shape[0], block) or block
                notes.append(f"quantize-int4: '{site.name}' may be a tied table of width {site.shape[0]}: "
                             f"block {block} so the table can be shared")
            blocks[site.key] = block
    return blocks


def _plan(model: ir.Model, sites: list[Site], blocks: dict[tuple, int], shapes: set[tuple], opts: QuantOptions,
          store: QuantStore, notes: list[str]) -> dict[tuple, LayerChoice]:
    """Mixed precision's choice per weight (empty when every weight stays at 4 bits)."""
    if not opts.mixed:
        return {}
    outputs = {id(v) for v in model.graph.outputs}
    logits = {s.key for s in sites if (s.shape[::-1], s.dtype) in shapes
              or any(id((s.add or s.node).outputs[0]) == o for o in outputs)}
    errors = None
    if opts.sensitivity == "output":
        size = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in {s.key: s for s in sites}.values())
        if size > SENSITIVITY_MAX_BYTES:
            notes.append(f"quantize-int4: mixed precision ranks weights by their int4 weight error: running the "
                         f"float model for output errors is done up to {SENSITIVITY_MAX_BYTES >> 20} MiB of weights")
        else:
            started = time.perf_counter()
            errors = output_errors(model, sites, lambda s: dequantized_rtn(s, blocks[s.key], opts.symmetric),
                                   store.scratch())
            notes.append(f"quantize-int4: output errors of {len(errors)} weights on synthetic inputs, "
                         f"{time.perf_counter() - started:.2f} s")
    plan = choose_bits(sites, blocks, logits, opts, errors)
    high = [c for c in plan.values() if c.bits != 4]
    notes.append(f"quantize-int4: mixed precision: {len(high)} of {len(plan)} weights at {HIGH_BITS} bits "
                 f"({', '.join(c.name for c in high[:8])}{', ...' if len(high) > 8 else ''})")
    return plan


def _hessians(model: ir.Model, sites: list[Site], store: QuantStore, opts: QuantOptions, notes: list[str]
              ) -> Hessians | None:
    """GPTQ's Hessians from the calibration file (None for a data-free method), with notes on what they saw."""
    if opts.method not in kq.CALIBRATED:
        return None
    started = time.perf_counter()
    label = f"--calibration {opts.calibration}"
    hessians = Hessians(model, sites, load_calibration(opts.calibration, model.graph), store.scratch(), label, opts)
    notes.append(f"quantize-int4: calibration {opts.calibration}: {hessians.rows} rows at the first "
                 f"weight, {hessians.runs} onnxruntime runs, {time.perf_counter() - started:.2f} s")
    widest = max(site.shape[0] for site in sites)
    if hessians.rows < GPTQ_ROWS_PER_K * widest:
        notes.append(f"quantize-int4: {hessians.rows} calibration rows for inputs up to K = {widest} wide: "
                     f"GPTQ fits the calibration set and generalizes poorly below about "
                     f"{GPTQ_ROWS_PER_K} K = {GPTQ_ROWS_PER_K * widest} rows")
    return hessians


def _quantize(w: np.ndarray, bits: int, block: int, opts: QuantOptions, hessians: Hessians | None,
              factor: tuple | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scales, zero points) of one weight W (K, N) in MatMulNBits' layout."""
    if bits != 4:  # 8 bits: round-to-nearest is within a few percent of the best fit at this precision
        return kq.quantize(w, "rtn", block, opts.symmetric, bits=bits)
    if factor is not None:
        return kq.gptq(w, None, block, opts.symmetric, factor=factor)
    return kq.quantize(w, opts.method if hessians is None else DEFAULT_METHOD, block, opts.symmetric)


def _matmul_nbits(graph: ir.Graph, site: Site, q: Quantized, bits: int, block: int, opts: QuantOptions,
                  taken: set[str]) -> str:
    """Replace the site's node (and its folded Add) by MatMulNBits; returns the rewrite's count key."""
    qb, qs, qz = q
    k, n = site.shape
    bias = None if site.bias is None else add_initializer(graph, ir.tensor(site.bias), f"{site.name}_bias", taken)
    inputs = [site.node.inputs[0], qb, qs, qz, None, bias]  # read now: an earlier rewrite may feed it
    while inputs[-1] is None:
        inputs.pop()
    new = ir.Node(MS, "MatMulNBits", inputs, attributes=[
        ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
        ir.AttrInt64("block_size", block), ir.AttrInt64("accuracy_level", opts.accuracy_level)],
        name=f"{site.node.name or site.name}_MatMulNBits")
    new.meta[META] = QuantSource(site.source, site.bias, "matmul")
    old_nodes = [site.node] + ([site.add] if site.add is not None else [])
    old_out = old_nodes[-1].outputs[0]
    new.outputs[0].shape, new.outputs[0].type = old_out.shape, old_out.type
    ir.convenience.replace_nodes_and_values(graph, site.node, old_nodes, [new], [old_out], [new.outputs[0]])
    return f"{site.node.op_type}+bias" if site.bias is not None else site.node.op_type


def _gather_block_quantized(graph: ir.Graph, gather: ir.Node, site: Site, q: Quantized, bits: int, block: int,
                            taken: set[str]) -> None:
    """Replace a tied table's Gather by GatherBlockQuantized over the site's own codes, reshaped (N, K * bits / 8)."""
    qb, qs, qz = q
    k, n = site.shape
    shape = add_initializer(graph, ir.tensor(np.array([n, k * bits // 8], np.int64)), f"{site.name}_table_shape",
                            taken)
    table = ir.Node("", "Reshape", [qb, shape], name=f"{gather.name or site.name}_table")
    inputs = [table.outputs[0], gather.inputs[1], qs] + ([qz] if qz is not None else [])
    new = ir.Node(MS, "GatherBlockQuantized", inputs, attributes=[
        ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
        ir.AttrInt64("block_size", block), ir.AttrInt64("bits", bits)],
        name=f"{gather.name or site.name}_GatherBlockQuantized")
    new.meta[META] = QuantSource(site.source, None, "gather")
    old_out = gather.outputs[0]
    new.outputs[0].shape, new.outputs[0].type = old_out.shape, old_out.type
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], [table, new], [old_out], [new.outputs[0]])


@register_pass
class QuantizeInt4(Pass):
    """Linear layers with constant weights -> int4 MatMulNBits (tied embedding -> GatherBlockQuantized)."""

    name = "quantize-int4"
    level = 0          # every row holds it in its optional quantize stage (compiler/pipeline.py)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = options_of(ctx)
        if opts.scheme != "int4":      # another format's pass (quantize-int8) serves this --quantize
            return PassResult(model, False, {})
        graph = model.graph
        sites = find_sites(graph, opts, ctx.notes)
        if not sites:
            return PassResult(model, False, {})
        store = QuantStore(ctx.option("scratch_dir"))
        taken = {v.name for v in graph.initializers.values()} | {v.name for n in graph for v in n.outputs}
        done: dict[tuple, Quantized] = {}
        counts: dict[str, int] = {}
        transposes: list[ir.Node] = []   # Transpose(weight) nodes the rewrite may leave unused
        tie = opts.tied_embedding and opts.method != "hqq"  # GatherBlockQuantized takes no float zero points
        found = tables(graph, opts.block_size) if tie else []
        shapes = {table_key(e) for _, e in found}
        same = {(id(e), True, 1.0) for _, e in found}
        digests: dict[tuple, bytes] = {}
        external = [v.const_value for v in graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
        started = time.perf_counter()
        hessians = _hessians(model, sites, store, opts, ctx.notes)
        blocks = _blocks(sites, shapes, opts, ctx.notes)
        plan = _plan(model, sites, blocks, shapes, opts, store, ctx.notes)
        bits_of = {key: c.bits for key, c in plan.items()}
        blocks.update({key: c.block_size for key, c in plan.items()})
        for site in sites:
            if site.key not in done:
                w = site.load()
                if (site.shape[::-1], site.dtype) in shapes and site.key not in same:
                    digests[site.key] = table_digest(w[:, c:c + TABLE_ROWS].T for c in range(0, w.shape[1], TABLE_ROWS))
                factor = hessians.factor(site.key) if hessians is not None else None
                if hessians is not None and factor is None:
                    ctx.notes.append(f"quantize-int4: '{site.name}' saw no calibration rows: {DEFAULT_METHOD} instead")
                arrays = _quantize(w, bits_of.get(site.key, 4), blocks[site.key], opts, hessians, factor)
                del w, factor
                for t in external:  # tensors mapped by an earlier pass (a lazy concatenation's parts) leave memory
                    t.release()
                done[site.key] = tuple(None if x is None else add_initializer(
                    graph, store.tensor(x, f"{site.name}_{tag}"), f"{site.name}_{tag}", taken)
                    for x, tag in zip(arrays, ("q4", "scales", "zero_points")))
            w_in = site.node.inputs[1]
            if w_in.producer() is not None and w_in.producer().op_type == "Transpose":
                transposes.append(w_in.producer())
            kind = _matmul_nbits(graph, site, done[site.key], bits_of.get(site.key, 4), blocks[site.key], opts, taken)
            counts[kind] = counts.get(kind, 0) + 1
        if hessians is not None:
            trim_heap()
        for gather, site in tied(found, {s.key: s for s in sites}, digests):
            _gather_block_quantized(graph, gather, site, done[site.key], bits_of.get(site.key, 4), blocks[site.key],
                                    taken)
            counts["Gather-tied"] = counts.get("Gather-tied", 0) + 1
        model.opset_imports.setdefault(MS, 1)
        ctx.results["quantize-int4"] = {"layers": [c.as_dict() for c in plan.values()]} if plan else {}
        ctx.notes.append(f"quantize-int4: {len(done)} weights, int4:{opts.method}"
                         f"{' mixed' if opts.mixed else ''}, block {opts.block_size}, "
                         f"{'symmetric' if opts.symmetric else 'asymmetric'}, accuracy_level {opts.accuracy_level}, "
                         f"{time.perf_counter() - started:.2f} s")
        for t in transposes:
            if t.graph is graph and not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
                graph.remove(t, safe=True)
        for v in list(graph.initializers.values()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                graph.initializers.pop(v.name)
        return PassResult(model, True, counts)
