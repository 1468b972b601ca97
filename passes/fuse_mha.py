"""fuse-mha: self-attention whose mask GroupQueryAttention cannot express -> com.microsoft MultiHeadAttention

    o = Reshape(Transpose(Softmax(s * q' @ K^T + M) @ V, [0,2,1,3]), [B, S, N*H])           (N query = N KV)
    K = Concat(past_k, k'), V = Concat(past_v, v) with a cache (K = k', V = v without)
      ->  o, K, V = MultiHeadAttention(flat(q'), flat(k'), flat(v), attention_bias = M', past_k, past_v,
                                       num_heads = N, scale = s)

with q', k' the query and key as the scores read them (rotated, per-head normed) and flat(x) = the (B, S, N*H)
view of BSNH x. M' is the site's mask as the additive term the op adds to the scaled scores, of shape
(B or 1, N or 1, S, T):

    additive M                    M' = M
    Where(keep, scores, fill)     M' = Where(keep, 0, fill)
    Where(drop, fill, scores)     M' = Where(drop, fill, 0)
    then M' + R for each term R added to the scaled scores besides the mask (ALiBi: BLOOM; the relative terms
    DeBERTa computes from Q), and M' * c for a scale c that follows the mask (Softmax((S + M) * c)),

and, when M has one row for all queries, M' = Expand(M', (b, n, S, T)). Softmax(x + M') = Softmax(Where(keep, x,
fill)) wherever a query sees a key; an -inf fill is written as the dtype's lowest finite value, so a query that
sees no key averages its values instead of giving NaN (such rows are padded positions, whose outputs nothing
reads; a NaN there would reach every query through 0 * NaN in P @ V). The term's shape is proved on probe inputs
(masks.probe_bias_fits). The site is read by compiler/attention_core.py, as fuse-gqa reads it.

This takes what fuse-gqa leaves: bidirectional or two-sided window masks with rotary (ModernBERT and other
rotary encoders) and masks that are no causal + padding rule. It runs after fuse-gqa and fuse-attention, so a site
either of them fuses is never seen here. With a cache, the op is given the new K as the graph concatenates it (rotated, normed: what parse_site reads as
the Concat's second input), so its present equals the graph's. Refused: grouped KV heads (the op has one head count), a
softcap, scores computed in a wider type than Q, and float16 on the CPU target (the op's CPU kernel is float32).
Reference: kernels/attention.py (multi_head_attention).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc import masks
from onnxc.attention_core import Site, parse_site
from onnxc.attention_emit import flat_qkv
from onnxc.coverage import Refusal
from onnxc.domains import MS
from onnxc.ir import GraphWriter
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import replace_value


def _check(site: Site, target: str) -> None:
    if site.kv_heads != site.num_heads:
        raise Refusal(f"grouped KV heads ({site.num_heads} query, {site.kv_heads} KV) with a mask "
                      f"GroupQueryAttention cannot express")
    if site.softcap:
        raise Refusal("a softcap (MultiHeadAttention has none)")
    dtype = site.q.dtype
    if site.out.dtype is not None and dtype is not None and site.out.dtype != dtype:
        raise Refusal(f"the scores are computed in {site.out.dtype.name}, Q in {dtype.name}")
    # onnxruntime's CPU kernel is float32 only; for a float16 node it inserts Casts and runs that kernel (as for
    # fuse-attention's float16 Attention), so float16 is hosted there too, computed in float32
    if target == "cpu" and dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise Refusal(f"MultiHeadAttention's CPU kernel takes float32 (float16 through inserted Casts), not "
                      f"{dtype.name if dtype else 'unknown'}")


def _bias(b: GraphWriter, site: Site, q: ir.Value, k: ir.Value, one_row: bool) -> ir.Value:
    """M' (module docstring), in Q's dtype."""
    anchor, dtype = site.anchor, site.q.dtype
    np_dtype = dtype.numpy()
    if site.mask_kind == "bias":
        bias = site.mask
    else:
        fill = site.mask_fill.const_value.numpy().astype(np_dtype)
        fill = np.where(np.isneginf(fill), np.finfo(np_dtype).min, fill).astype(np_dtype)
        zero = b.const(np.array(0, np_dtype), "zero")
        fv = b.const(fill, "mask_fill")
        ins = [site.mask, zero, fv] if site.mask_kind == "keep" else [site.mask, fv, zero]
        bias = b.node("Where", ins, anchor).outputs[0]
    for term in site.extra:          # ALiBi, DeBERTa's relative terms: added to the scaled scores with the mask
        bias = b.node("Add", [bias, term], anchor).outputs[0]
    if site.mask_scale != 1.0:
        bias = b.node("Mul", [bias, b.const(np.array(site.mask_scale, np_dtype), "mask_scale")], anchor).outputs[0]
    if one_row:     # (b, n, 1, T) -> (b, n, S, T): S from Q's (B, S, N*H) view
        def dim(v: ir.Value, lo: int, hi: int) -> ir.Value:
            return b.node("Slice", [b.node("Shape", [v], anchor).outputs[0],
                                    b.const(np.array([lo], np.int64), "start"),
                                    b.const(np.array([hi], np.int64), "end")], anchor).outputs[0]
        shape = b.node("Concat", [dim(bias, 0, 2), dim(q, 1, 2), dim(bias, 3, 4)], anchor, axis=0).outputs[0]
        bias = b.node("Expand", [bias, shape], anchor).outputs[0]
    bias.dtype = dtype
    return bias


def _fill_ok(site: Site) -> None:
    if site.mask_kind != "bias":
        f = site.mask_fill.const_value if site.mask_fill is not None else None
        if f is None or f.size != 1 or not float(f.numpy().reshape(-1)[0]) <= masks.LARGE_NEGATIVE:
            raise Refusal("the Where mask fill is not a large negative constant")
    for term in (site.mask, *site.extra) if site.mask_kind == "bias" else site.extra:
        if term.dtype != site.q.dtype:
            raise Refusal(f"a term added to the scores is {term.dtype.name if term.dtype else 'untyped'}, Q is "
                          f"{site.q.dtype.name}")


@register_pass
class FuseMHA(Pass):
    """Self-attention with a mask GroupQueryAttention cannot express (bidirectional, rotary) -> MultiHeadAttention."""

    name = "fuse-mha"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        b = GraphWriter(graph, "fuse-mha")
        plans: list[tuple[Site, bool]] = []
        fits: dict[tuple, bool | Refusal] = {}
        for sm in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
            try:
                site = parse_site(sm)
                _check(site, ctx.target)
                _fill_ok(site)
                one_row = True      # the sum has one row for all queries only when every term has
                for term in (site.mask, *site.extra):
                    key = (id(term), id(site.scores))
                    if key not in fits:
                        try:
                            fits[key] = masks.probe_bias_fits(graph, term, site.scores, site.past_k is not None,
                                                              rows=True)
                        except Refusal as exc:
                            fits[key] = exc
                    if isinstance(fits[key], Refusal):
                        raise fits[key]
                    one_row = one_row and fits[key]
            except (Refusal, ValueError, IndexError, TypeError, AttributeError) as exc:
                if sm.outputs[0].uses():
                    why = exc if isinstance(exc, Refusal) else f"unexpected graph ({type(exc).__name__}: {exc})"
                    ctx.notes.append(f"fuse-mha: attention at {sm.name} not fused: {why}")
                continue
            plans.append((site, one_row))
        for site, one_row in plans:
            q, k, v = flat_qkv(b, site, rotated=True)
            bias = _bias(b, site, q, k, one_row)
            cached = site.past_k is not None
            node = b.node("MultiHeadAttention", [q, k, v, None, None, bias] + ([site.past_k, site.past_v] if cached
                                                                             else []),
                          site.anchor, domain=MS, n_out=3 if cached else 1, num_heads=site.num_heads,
                          scale=float(site.scale))
            out = node.outputs[0]
            out.dtype, out.shape = site.out.dtype or site.q.dtype, site.out.shape
            replace_value(site.out, out)
            if cached:      # present = Concat(past, new) on the sequence axis, as the graph computed it
                for new, old in zip(node.outputs[1:], (site.present_k, site.present_v)):
                    new.dtype, new.shape = old.dtype or site.v.dtype, old.shape
                    replace_value(old, new)
        if plans:
            if MS not in model.opset_imports:
                model.opset_imports[MS] = 1
            graph.sort()
        return PassResult(model, bool(plans), {"fuse-mha": len(plans)} if plans else {})
