"""fuse-gqa

    q' = rot(q),  K = Concat(past_k, rot(k)),  V = Concat(past_v, v)           (BNSH; rot = rotary, optional)
    o  = Reshape(Transpose(Softmax(s * q' @ repeat(K)^T + mask) @ repeat(V), [0,2,1,3]), [B, S, N*H])
      ->  o, K, V = GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                                        num_heads=N, kv_num_heads=KV, scale=s, do_rotary, local_window_size=W)
    with seqlens_k = ReduceSum(attention_mask, 1) - 1 and total_len = Gather(Shape(attention_mask), 1), computed
    once (nodes valid at every opset from 11: ReduceSum's axes input from 13, no Shape start/end). A model without
    an attention_mask input (its mask made from shapes alone, nothing padded): total_len = S + P from the shapes the
    mask reads (input_ids, the cache) and seqlens_k = total_len - 1 in every row.

The parts are read by shared pieces in compiler/: the attention core (compiler/attention_core.py: scaling, K's
transposition, the repeat-KV chain, the cache Concat, softcap, head norms, rotary forms), the mask as a canonical
description proved by evaluation (compiler/masks.py) and the rotary tables (compiler/rotary_tables.py). Exporter
variants of rotary are brought to one form before this pass (canonicalize-rotary).

Rotary goes inside the op (do_rotary=1) where ORT's kernel takes it (head size a multiple of 16, cache width a
multiple of 8); otherwise the rotated q/k stay outside and the op gets them rotated.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxc.attention_core import Site, parse_site
from onnxc.attention_emit import flat_qkv
from onnxc.coverage import Refusal
from onnxc.domains import DEFAULT_OPSET, MS
from onnxc.ir import GraphWriter
from onnxc.masks import Lengths, lengths, probe_mask
from onnxc.pass_manager import Part, Pass, PassContext, PassResult, register_pass
from onnxc.rotary_tables import Tables, probe_rotary
from onnxc.rules import replace_value
from onnxc.shapes import dims_of
from onnxc.verify import input_role

DEFAULT_MAX_SEQ_LEN = 4096


_Builder = GraphWriter


def _cache_values(b: _Builder, t: Tables, total: ir.Value, dtype) -> tuple[ir.Value, ir.Value]:
    """cos_cache / sin_cache inputs. Switched tables are stored stacked, [short; long] (2L rows), and each run
    slices the L rows its total length selects: start = L * (total > threshold)."""
    if t.long is None:
        return b.const(t.cos.astype(dtype), "cos_cache"), b.const(t.sin.astype(dtype), "sin_cache")
    n = len(t.cos)
    over = b.node("Greater", [total, b.const(np.array(t.threshold, np.int32), "threshold")], None).outputs[0]
    start = b.node("Mul", [b.node("Cast", [over], None, to=ir.DataType.INT64).outputs[0],
                           b.const(np.array([n], np.int64), "rows")], None).outputs[0]
    end = b.node("Add", [start, b.const(np.array([n], np.int64), "rows")], None).outputs[0]
    axes = b.const(np.array([0], np.int64), "axes")
    out = []
    for stem, short, long in (("cos_cache", t.cos, t.long[0]), ("sin_cache", t.sin, t.long[1])):
        both = b.const(np.concatenate([short, long]).astype(dtype), f"{stem}_short_long")
        v = b.node("Slice", [both, start, end, axes], None).outputs[0]
        v.dtype, v.shape = ir.DataType.from_numpy(np.dtype(dtype)), ir.Shape([n, short.shape[1]])
        out.append(v)
    return out[0], out[1]


def _seq_inputs(b: _Builder, src: Lengths, opset: int) -> tuple[ir.Value, ir.Value]:
    """seqlens_k and total_sequence_length (int32), computed once.

    From a mask: seqlens_k = ReduceSum(mask, 1) - 1, total = Gather(Shape(mask), 1). From shapes (no mask): total =
    S + P (S = rows' axis 1, P = the past's axis 2, 0 without one) and seqlens_k = ConstantOfShape([B], 0) +
    (total - 1). Opset-correct for 11..23: ReduceSum takes axes as an input from opset 13 (an attribute before),
    and dims are Gathers of the whole Shape (Shape's start/end exist only from opset 15)."""
    def dim(v: ir.Value, axis, stem: str) -> ir.Value:
        shp = b.node("Shape", [v], None).outputs[0]
        return b.node("Gather", [shp, b.const(np.array(axis, dtype=np.int64), stem)], None, axis=0).outputs[0]

    one = b.const(np.array(1, dtype=np.int64), "one")
    if src.mask is not None:
        m64 = b.node("Cast", [src.mask], None, to=ir.DataType.INT64).outputs[0]
        if opset >= 13:
            total = b.node("ReduceSum", [m64, b.const(np.array([1], dtype=np.int64), "axes")], None, keepdims=0)
        else:
            total = b.node("ReduceSum", [m64], None, axes=[1], keepdims=0)
        last = b.node("Sub", [total.outputs[0], one], None).outputs[0]
        width, batch = dim(src.mask, 1, "one"), src.mask.shape[0]
    else:
        width = dim(src.rows, 1, "one")
        if src.past is not None:
            width = b.node("Add", [width, dim(src.past, 2, "two")], None).outputs[0]
        zeros = b.node("ConstantOfShape", [dim(src.rows, [0], "zero")], None,
                       value=ir.tensor(np.array([0], dtype=np.int64))).outputs[0]
        last = b.node("Add", [zeros, b.node("Sub", [width, one], None).outputs[0]], None).outputs[0]
        batch = src.rows.shape[0] if src.rows.shape is not None else None
    seqlens = b.node("Cast", [last], None, to=ir.DataType.INT32).outputs[0]
    tot = b.node("Cast", [width], None, to=ir.DataType.INT32).outputs[0]
    seqlens.dtype, seqlens.shape = ir.DataType.INT32, ir.Shape([batch])
    tot.dtype, tot.shape = ir.DataType.INT32, ir.Shape([])
    return seqlens, tot


SITE, MASK, ROTARY, LENGTHS = "fuse-gqa/site", "fuse-gqa/mask", "fuse-gqa/rotary-inside", "fuse-gqa/lengths"
_EXPLAINED = "onnxc.fuse_gqa.explained"      # model.meta: what each part found at each site (--explain)


class _Reader:
    """Reads each Softmax's site part by part, sharing the probes between sites (one mask, one set of tables); what
    each part found, or why it refused, is kept for --explain."""

    def __init__(self, model: ir.Model, ctx: PassContext):
        self.model, self.ctx = model, ctx
        self.max_len = int(ctx.option("max_seq_len") or DEFAULT_MAX_SEQ_LEN)
        self.has_past = any(input_role(v) == "past" for v in model.graph.inputs)
        self.masks: dict[tuple, tuple[ir.Value | None, int, list[ir.Value]] | Refusal] = {}
        self.tables: dict[tuple, Tables | Refusal] = {}

    def read(self, sm: ir.Node, found: dict[str, str]) -> tuple | None:
        """(site, mask input, window, mask reads, rotary inside, tables), or None with the refusal in `found`."""
        try:
            site = parse_site(sm)
            if site.head % 8:
                raise Refusal(f"head size {site.head} is not a multiple of 8 (GroupQueryAttention)")
            if site.past_k is not None and dims_of(site.past_k)[1] != site.kv_heads:
                raise Refusal("the past KV is not BNSH with the KV head count")
            if site.extra:
                raise Refusal("a term is added to the scores besides the mask (ALiBi or a relative position bias): "
                              "the op takes none")
        except (Refusal, ValueError, IndexError, TypeError) as exc:   # an unexpected graph is refused, never fatal
            found[SITE] = str(exc) if isinstance(exc, Refusal) else f"unexpected graph ({type(exc).__name__}: {exc})"
            return None
        found[SITE] = (f"{site.num_heads} query heads, {site.kv_heads} KV heads, head size {site.head}, scale "
                       f"{site.scale:.4g}" + (", KV cache" if site.past_k is not None else "")
                       + (f", softcap {site.softcap:g}" if site.softcap else ""))
        mkey = (id(site.mask), site.mask_kind, site.mask_scale)
        if mkey not in self.masks:
            try:
                self.masks[mkey] = probe_mask(self.model, site, self.has_past, self.max_len)
            except Refusal as exc:
                self.masks[mkey] = exc
        if isinstance(self.masks[mkey], Refusal):
            found[MASK] = str(self.masks[mkey])
            return None
        mask_in, window, mask_reads = self.masks[mkey]
        found[MASK] = ("causal" + (f" + padding of '{mask_in.name}'" if mask_in is not None else ", nothing padded")
                       + (f" + a window of {window} keys" if window > 0 else ""))
        src = lengths(site, mask_in, mask_reads)
        found[LENGTHS] = (f"from '{src.mask.name}' (row sums, width)" if src.mask is not None else
                          f"from the shapes of '{src.rows.name}'" + (f" and '{src.past.name}'" if src.past else ""))
        do_rotary, tables = self._rotary(site, sm, found)
        return site, mask_in, window, mask_reads, do_rotary, tables

    def _rotary(self, site: Site, sm: ir.Node, found: dict[str, str]) -> tuple[bool, Tables | None]:
        if site.rotary is None:
            found[ROTARY] = "no rotary"
            return False, None
        if ROTARY in self.ctx.disabled_rules:
            found[ROTARY] = "outside: disabled (--disable fuse-gqa/rotary-inside)"
            return False, None
        if site.head % 16 or (site.rotary.dim // 2) % 8:
            found[ROTARY] = (f"outside: the kernel rotates head sizes that are multiples of 16 with a cache width "
                             f"that is a multiple of 8 (head {site.head}, rotary dims {site.rotary.dim})")
            return False, None
        key = (id(site.rotary.cos), id(site.rotary.sin))
        if key not in self.tables:
            try:
                self.tables[key] = probe_rotary(self.model, site.rotary, self.max_len)
            except Refusal as exc:   # the kernel cannot derive these tables; the graph's own rotation stays outside
                self.tables[key] = exc
                self.ctx.notes.append(f"fuse-gqa: rotary at {sm.name} stays outside GroupQueryAttention: "
                                      f"{exc}")
        t = self.tables[key]
        if isinstance(t, Refusal):
            found[ROTARY] = f"outside: {t}"
            return False, None
        found[ROTARY] = (f"inside: tables proved a function of the position ({len(t.cos)} rows"
                         + (", switched short/long" if t.long is not None else "") + ")")
        return True, t


def _explain_part(part: str) -> Callable[[ir.Model, PassContext], list[tuple[str, str]]]:
    def explain(model: ir.Model, ctx: PassContext) -> list[tuple[str, str]]:
        if _EXPLAINED not in model.meta:      # every part reads the same sites: read them once
            reader, readings = _Reader(model, ctx), []
            for sm in [n for n in model.graph if n.op_type == "Softmax" and n.domain == ""]:
                found: dict[str, str] = {}
                reader.read(sm, found)
                readings.append((sm.name or "<Softmax>", found))
            model.meta[_EXPLAINED] = readings
        rows = []
        for site, found in model.meta[_EXPLAINED]:
            last = list(found)[-1]          # parts in order: the last one found is the one that refused
            rows.append((site, found[part] if part in found else f"not reached: {last} refused ({found[last]})"))
        return rows
    return explain


PARTS = (
    Part(SITE, "the Softmax-outward reader: P @ V, scores, scale, softcap, cache, KV repetition, head views",
         _explain_part(SITE)),
    Part(MASK, "the mask proved causal + padding (+ a window) by evaluation", _explain_part(MASK)),
    Part(LENGTHS, "where seqlens_k and the total length are read: the mask input, or the shapes", _explain_part(LENGTHS)),
    Part(ROTARY, "rotary inside the op: the tables proved a function of the position alone", _explain_part(ROTARY),
         can_disable=True),
)


@register_pass
class FuseGQA(Pass):
    """Causal self-attention with rotary and KV cache -> com.microsoft GroupQueryAttention."""

    name = "fuse-gqa"
    level = 2

    def parts(self):
        return PARTS

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", DEFAULT_OPSET)
        b = _Builder(graph, "fuse-gqa")
        reader = _Reader(model, ctx)
        seq_cache: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        cache_values: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        counts: dict[str, int] = {}
        plans: list[tuple] = []
        for sm in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
            found: dict[str, str] = {}
            plan = reader.read(sm, found)
            if plan is None:
                if sm.outputs[0].uses():
                    ctx.notes.append(f"fuse-gqa: attention at {sm.name} not fused: {list(found.values())[-1]}")
                continue
            plans.append(plan)
        # every site is read (and its probes run) on the graph as it came; then each is rewritten
        for site, mask_in, window, mask_reads, do_rotary, tables in plans:
            src = lengths(site, mask_in, mask_reads)
            skey = (id(src.mask), id(src.rows), id(src.past))
            if skey not in seq_cache:
                seq_cache[skey] = _seq_inputs(b, src, opset)
            seqlens, total = seq_cache[skey]
            caches = None
            if tables is not None:
                ckey = (id(tables), id(total) if tables.long is not None else None)
                if ckey not in cache_values:
                    cache_values[ckey] = _cache_values(b, tables, total, site.q.dtype.numpy())
                caches = cache_values[ckey]
            anchor = site.anchor
            q, k, v = flat_qkv(b, site, rotated=not do_rotary)
            inputs = [q, k, v, site.past_k, site.past_v, seqlens, total]
            attrs = {"num_heads": site.num_heads, "kv_num_heads": site.kv_heads, "scale": float(site.scale),
                     "local_window_size": window, "do_rotary": int(do_rotary),
                     "rotary_interleaved": int(do_rotary and site.rotary.interleaved)}
            if site.softcap:
                attrs["softcap"] = float(site.softcap)
            if caches:
                inputs += list(caches)
            node = b.node("GroupQueryAttention", inputs, anchor, domain=MS, n_out=3, **attrs)
            out, pk, pv = node.outputs
            out.dtype = site.v.dtype
            if site.out.dtype is not None and site.out.dtype != out.dtype:    # attention computed in a wider type
                out.shape = site.out.shape
                out = b.node("Cast", [out], anchor, to=site.out.dtype).outputs[0]
                out.dtype = site.out.dtype
            for new, old in ((pk, site.present_k), (pv, site.present_v)):
                new.dtype = old.dtype or site.v.dtype
                new.shape = old.shape
            replace_value(site.out, out)
            if site.past_k is not None or site.present_k.is_graph_output():
                replace_value(site.present_k, pk)
                replace_value(site.present_v, pv)
            counts["fuse-gqa"] = counts.get("fuse-gqa", 0) + 1
            if site.rotary is not None:
                key = "fuse-gqa/rotary-inside" if do_rotary else "fuse-gqa/rotary-outside"
                counts[key] = counts.get(key, 0) + 1
        if counts:
            if MS not in model.opset_imports:
                model.opset_imports[MS] = 1
            graph.sort()
        return PassResult(model, bool(counts), counts)
