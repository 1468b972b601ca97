"""fuse-embed-layer-norm

    e = W[ids] + P[pos] (+ T[seg])            (Gathers on axis 0, summed in any order and association)
    LayerNormalization(e, gamma, beta, eps)   ->  EmbedLayerNormalization(ids32, seg32?, W, P, T?, gamma, beta,
                                                                          , pos32?, epsilon=eps)   (com.microsoft)
                                                                          fuse-embed-layer-norm
    e = W[ids] (+ T[seg]) + C, C a constant (1, S, H) with S the ids' static sequence length (fold-constants' fold
    of P[0..S-1])                             ->  the same with P = C as (S, H), no position ids
                                                                          fuse-embed-layer-norm-folded

Outputs: 0 replaces the LayerNorm, 2 (embedding_sum) replaces e where e has other users (GPT-2's residual);
output 1 (mask_index) is left unused: no mask is wired (see below).

Requires (ORT's EmbedLayerNormalization checks and kernel): the tables are 2-D with the same static hidden size H,
gamma and beta (zeros when the LayerNorm has none) 1-D of H; the LayerNorm normalizes the last axis only, with
epsilon >= 0 (the kernel refuses a negative one); ids and segment ids are 2-D (B, S) with equal dims, int32 or
int64 (int64 is cast to int32: ids index tables far below 2^31 rows); position ids are either provably 0..S-1 and
dropped (the kernel's default), or 2-D (1, S) / (B, S) and passed on (a 1-D position_ids aborts ORT's CPU kernel).
"Provably 0..S-1": a constant arange, a Slice [0, S) with step 1 of a constant arange buffer on its last axis
(HF's registered `position_ids` buffer), or Range(0, S, 1), optionally Unsqueezed to (1, S); S must be the ids'
sequence dim (symbolically). Tables float32 (ORT CPU's only kernel) or float16 (CPU runs it through inserted Casts;
CUDA has float and float16).

Not modelled: the attention mask. ORT's mask_index differs by provider (CPU counts the ones of each mask row, CUDA
returns the position of the first 0), so an attention fusion should not rely on it; it is not produced here.
Where the two differ from Gather: a negative id indexes from the end for Gather but fails in the fused kernel;
exported token ids are never negative, and constant ids with a negative entry are refused.
Reference: kernels/norms.py (embed_layer_norm).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.domains import MS
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, const_array
from onnxc.shapes import dims_of, sym_value

TABLE_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
ID_TYPES = (ir.DataType.INT32, ir.DataType.INT64)
ARANGE_MAX = 1 << 20   # largest constant position buffer read


def _layer_norm(op, e, gamma):
    return op.LayerNormalization(e, gamma, _allow_other_inputs=True, _name="ln", axis=Attr("axis", -1),
                                 epsilon=Attr("epsilon", 1e-5))


def _words(op, t1, i1, t2, i2):
    """W[ids] + T[seg], or W[ids] alone."""
    g1 = op.Gather(t1, i1, axis=0)
    return op.Or(op.Add(g1, op.Gather(t2, i2, axis=0)), g1)


def pattern(op, t1, i1, t2, i2, t3, i3, gamma):
    e = op.Add(_words(op, t1, i1, t2, i2), op.Gather(t3, i3, axis=0))   # three embeddings or two, any order
    return _layer_norm(op, e, gamma), e


def pattern_folded(op, t1, i1, t2, i2, slab, gamma):
    """With static S, fold-constants turns P[0..S-1] into a constant (1, S, H) slab: (W[ids] + T[seg]) + slab, as HF
    BERT associates it, or W[ids] + slab."""
    e = op.Add(_words(op, t1, i1, t2, i2), slab)
    return _layer_norm(op, e, gamma), e


# ---------------------------------------------------------------------------------------------------- positions
def _ints(v: ir.Value | None) -> tuple | None:
    return sym_value(v) if v is not None else None


def arange_length(v: ir.Value) -> int | str | None:
    """L when v provably holds 0..L-1 as (L,) or (1, L); L is an int or a symbolic dim name."""
    arr = const_array(v, ARANGE_MAX)
    if arr is not None:
        if arr.ndim in (1, 2) and arr.shape[0] == (1 if arr.ndim == 2 else arr.size) and arr.dtype.kind in "iu" \
                and np.array_equal(arr.reshape(-1), np.arange(arr.size)):
            return arr.size
        return None
    node = v.producer()
    if node is None:
        return None
    ins = list(node.inputs) + [None] * 5
    if node.op_type == "Unsqueeze" and node.domain == "":
        axes = node.attributes.get("axes")
        axes = tuple(axes.value) if axes is not None else _ints(ins[1])
        inner = ins[0]
        one_d = inner is not None and ((inner.shape is not None and inner.shape.rank() == 1) or (
            inner.producer() is not None and inner.producer().op_type == "Range"))
        if axes in ((0,), (-2,)) and one_d:
            return arange_length(inner)
        return None
    if node.op_type == "Range" and node.domain == "":
        if _ints(ins[0]) == (0,) and _ints(ins[2]) == (1,) and _ints(ins[1]) is not None and len(_ints(ins[1])) == 1:
            length = _ints(ins[1])[0]
            return length if isinstance(length, (int, str)) else None
        return None
    if node.op_type == "Slice" and node.domain == "":
        data = const_array(ins[0], ARANGE_MAX)
        if data is None or data.ndim not in (1, 2) or (data.ndim == 2 and data.shape[0] != 1):
            return None
        n = data.shape[-1]
        if data.dtype.kind not in "iu" or not np.array_equal(data.reshape(-1), np.arange(n)):
            return None
        axes = _ints(ins[3]) if ins[3] is not None else tuple(range(data.ndim))
        last = data.ndim - 1
        ends = _ints(ins[2])
        if axes not in ((last,), (-1,)) and not (data.ndim == 1 and axes == (0,)):
            return None
        if _ints(ins[1]) != (0,) or (ins[4] is not None and _ints(ins[4]) != (1,)) or ends is None or len(ends) != 1:
            return None
        length = ends[0]
        if isinstance(length, int):
            return length if 0 < length <= n else None
        return length if isinstance(length, str) else None
    return None


# ---------------------------------------------------------------------------------------------------- check
def _rank2(v: ir.Value) -> tuple | None:
    d = dims_of(v)
    return d if d is not None and len(d) == 2 else None


def _check_common(m, gathers: list, extra_tables: list):
    """LayerNorm, tables, gamma/beta and id types; returns (beta, epsilon, hidden) or a failure."""
    ln = m.node("ln")
    beta = (list(ln.inputs) + [None])[2]
    rank = len(dims_of(ln.inputs[0]) or ())
    if m["axis"] not in (-1, rank - 1) or rank != 3:
        return m.fail(f"LayerNormalization axis {m['axis']} on a rank-{rank} sum: EmbedLayerNormalization normalizes "
                      "the last axis of (B, S, H)")
    eps = float(m["epsilon"])
    if eps < 0:
        return m.fail(f"epsilon {eps:.3g} < 0 (ORT's kernel refuses it)")
    tables = [t for t, _ in gathers] + extra_tables
    hidden = {d[-1] if d is not None and len(d) == 2 else None for d in map(dims_of, tables)}
    h = hidden.pop() if len(hidden) == 1 else None
    if not isinstance(h, int):
        return m.fail("the embedding tables are not 2-D with one static hidden size", "t1")
    dtypes = {t.dtype for t in tables} | {m["gamma"].dtype} | ({beta.dtype} if beta is not None else set())
    if len(dtypes) != 1 or next(iter(dtypes)) not in TABLE_TYPES:
        return m.fail(f"tables/gamma/beta types {sorted(d.name for d in dtypes if d)}: ORT's kernel takes one of "
                      "float (float16 through inserted Casts)")
    for v, what in ((m["gamma"], "gamma"), (beta, "beta")):
        if v is not None and dims_of(v) != (h,):
            return m.fail(f"{what} is not 1-D of the hidden size {h}", what)
    if any(i.dtype not in ID_TYPES for _, i in gathers):
        return m.fail("ids are not int32 or int64")
    for _, i in gathers:    # Gather counts a negative id from the end; the fused kernel fails on it
        ids = const_array(i)
        if ids is not None and ids.size and int(ids.min()) < 0:
            return m.fail(f"constant ids include {int(ids.min())}: the fused kernel refuses negative ids")
    return beta, eps, h


def _word_and_segment(m, gathers: list):
    """The largest table is the word table; segment ids must have the input ids' dims."""
    word, *segment = sorted(gathers, key=lambda g: -_rows(g[0]))
    ids_dims = _rank2(word[1])
    if ids_dims is None:
        return m.fail("input ids are not 2-D (B, S)", "i1")
    if segment and _rank2(segment[0][1]) != ids_dims:
        return m.fail(f"segment ids dims {dims_of(segment[0][1])} differ from input ids dims {ids_dims}")
    seg = segment[0] if segment else (None, None)
    return {"word": word[0], "ids": word[1], "seg_table": seg[0], "seg_ids": seg[1]}, ids_dims


def _rows(t: ir.Value) -> int:
    d = dims_of(t)
    return d[0] if d and isinstance(d[0], int) else 0


def check(m):
    gathers = [(m["t1"], m["i1"])] + ([(m["t2"], m["i2"])] if "t2" in m.binds else []) + [(m["t3"], m["i3"])]
    common = _check_common(m, gathers, [])
    if not isinstance(common, tuple):
        return common
    beta, eps, h = common
    # Roles (numerically interchangeable; chosen for a readable graph): position = the gather with arange ids, else
    # with (1, S) ids, else by table size (vocabulary > positions > segment types).
    lengths = [arange_length(i) for _, i in gathers]
    ranked = sorted(range(len(gathers)), key=lambda k: (-_rows(gathers[k][0]), k))
    forced = [k for k in ranked if lengths[k] is not None] + [k for k in ranked if lengths[k] is None
                                                             and (_rank2(gathers[k][1]) or (0,))[0] == 1]
    p = forced[0] if forced else ranked[1]
    roles = _word_and_segment(m, [g for k, g in enumerate(gathers) if k != p])
    if not isinstance(roles, tuple):
        return roles
    roles, ids_dims = roles
    pos_ids = gathers[p][1]
    if lengths[p] is not None:
        if lengths[p] != ids_dims[1]:
            return m.fail(f"position ids are 0..{lengths[p]}-1, not 0..S-1 for S = {ids_dims[1]}")
        pos_ids = None
    elif _rank2(pos_ids) not in ((1, ids_dims[1]), ids_dims):
        return m.fail(f"position ids dims {dims_of(pos_ids)} are neither (1, S) nor (B, S) = {ids_dims}")
    return {**roles, "pos_table": gathers[p][0], "pos_ids": pos_ids, "slab": None, "beta": beta, "eps": eps,
            "hidden": h}


def check_folded(m):
    """slab is a constant (1, S, H) or (S, H) for the static sequence length S of the ids: rows 0..S-1 of a
    position table, which the fused op indexes with its default positions."""
    gathers = [(m["t1"], m["i1"])] + ([(m["t2"], m["i2"])] if "t2" in m.binds else [])
    arr = m.const("slab")
    if arr is None or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[0] != 1):
        return m.fail("the third term is not a constant (1, S, H) position slab", "slab")
    table = arr.reshape(arr.shape[-2:])
    common = _check_common(m, gathers, [m["slab"]] if arr.ndim == 2 else [])
    if not isinstance(common, tuple):
        return common
    beta, eps, h = common
    roles = _word_and_segment(m, gathers)
    if not isinstance(roles, tuple):
        return roles
    roles, ids_dims = roles
    if table.shape != (ids_dims[1], h) or m["slab"].dtype != roles["word"].dtype:
        return m.fail(f"position slab {tuple(arr.shape)} is not (1, S, H) = (1, {ids_dims[1]}, {h})", "slab")
    return {**roles, "pos_table": m["slab"], "pos_ids": None, "slab": table if arr.ndim == 3 else None,
            "beta": beta, "eps": eps, "hidden": h}


# ---------------------------------------------------------------------------------------------------- rewrite
def rewrite(op, word, ids, pos_table, pos_ids, slab, seg_table, seg_ids, gamma, beta, eps, hidden):
    def int32(v: ir.Value | None) -> ir.Value | None:
        if v is None or v.dtype == ir.DataType.INT32:
            return v
        out = op.Cast(v, to=int(ir.DataType.INT32))
        out.type, out.shape = ir.TensorType(ir.DataType.INT32), v.shape
        return out

    if beta is None:
        beta = op.const(np.zeros(hidden, gamma.dtype.numpy()), "beta")
    if slab is not None:
        pos_table = op.const(slab, "position_embedding")
    inputs = [int32(ids), int32(seg_ids), word, pos_table, seg_table, gamma, beta, None, int32(pos_ids)]
    while inputs[-1] is None:
        inputs.pop()
    y, mask_index, total = op.EmbedLayerNormalization(*inputs, epsilon=eps, _domain=MS, _outputs=3)
    mask_index.type = ir.TensorType(ir.DataType.INT32)
    return y, total


RULE = Rule("fuse-embed-layer-norm", pattern, rewrite, check,
            summary="LayerNorm(W[ids] + P[pos] (+ T[seg])) -> EmbedLayerNormalization")
RULE_FOLDED = Rule("fuse-embed-layer-norm-folded", pattern_folded, rewrite, check_folded,
                   summary="LayerNorm(W[ids] (+ T[seg]) + constant (1, S, H) positions) -> EmbedLayerNormalization")

register_pass(RulePass("fuse-embed-layer-norm", [RULE, RULE_FOLDED], level=2, targets=("cpu", "cuda"),
                       summary="BERT/GPT-2 embeddings + LayerNorm -> EmbedLayerNormalization"))
