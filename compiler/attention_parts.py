"""What the Attention / MultiHeadAttention fusion (fuse-attention) and the key canonicalization
(canonicalize-attention-key) read: head splits, the scale, the softmax, linear projections, and the mask and bias
analysis that turns the additive terms of the scores into mask_index, unidirectional, mask_filter_value and
attention_bias; plus the rule-builder helpers their rewrites share.

The mask is recognized by what it computes (masks.probe_padding_mask); a position bias R that reads no input
data, or an additive term that is no mask the analysis recognizes, becomes attention_bias when its shape is proved
to fit the scores (statically, else on probe inputs: masks.probe_bias_fits). See passes/fuse_attention.py.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxc import masks, probe
from onnxc.coverage import Refusal
from onnxc.ir import derived_tensor
from onnxc.rules import attr_value, const_tensor
from onnxc.shapes import Unknown, dims_equal, dims_of, same_dim, sym_value


ORT_MASK_FILTER = -10000.0     # ORT's default mask_filter_value


MASK_KEY = "onnxc.fuse_attention.mask"


BIAS_KEY = "onnxc.fuse_attention.bias"


def same(a: Any, b: Any) -> bool:
    """Two dims (int, symbol name or Unknown) are provably equal."""
    if isinstance(a, Unknown) or isinstance(b, Unknown):
        return a is b
    return a is not None and a == b


def split_heads(node: ir.Node, what: str) -> tuple[int, int, tuple]:
    """(N, H, dims of the (B, S, D) input) for Reshape (B, S, D) -> (B, S, N, H)."""
    xd, od = dims_of(node.inputs[0]), dims_of(node.outputs[0])
    target = sym_value(node.inputs[1])
    if xd is None or len(xd) != 3 or not isinstance(xd[2], int):
        raise Refusal(f"{what} is not (batch, sequence, hidden) with a static hidden size")
    if target is None or len(target) != 4:
        raise Refusal(f"{what} head split target is not a known 4-element shape")
    if od is None or len(od) != 4:
        od = (None,) * 4
    hidden = xd[2]
    pick = [next((d for d in (od[i], target[i]) if isinstance(d, int) and d > 0), None) for i in (2, 3)]
    n, h = pick
    if h is None and n:
        h = hidden // n
    if n is None and h:
        n = hidden // h
    if not n or not h or n * h != hidden:
        raise Refusal(f"{what} head split {target} does not divide hidden size {hidden}")
    allowzero = node.attributes.get("allowzero")
    for i in (0, 1):
        if not (same(od[i], xd[i]) or same(target[i], xd[i]) or (target[i] == 0 and not (allowzero and
                                                                                           allowzero.as_int()))):
            raise Refusal(f"cannot prove the {what} head split keeps batch and sequence ({target})")
    return n, h, xd


def heads_of(m) -> tuple[int, int, tuple]:
    nq, hq, qd = split_heads(m.node("q_reshape"), "query")
    nk, hk, _ = split_heads(m.node("k_reshape"), "key")
    nv, hv, _ = split_heads(m.node("v_reshape"), "value")
    if nk != nq or nv != nq:
        raise Refusal(f"grouped KV heads ({nq} query heads, {nk} key heads, {nv} value heads)")
    if hk != hq or hv != hq:
        raise Refusal(f"head sizes differ (query {hq}, key {hk}, value {hv})")
    return nq, hq, qd


def scale_of(m, head_size: int) -> float | None:
    """The product of the scale factors; None when it is ORT's default 1/sqrt(head_size)."""
    s = 1.0
    for var, divide in (("q_mul", False), ("q_div", True), ("k_mul", False), ("k_div", True), ("s_mul", False),
                        ("s_div", True)):
        if var in m.binds:
            c = m.scalar(var)
            if c is None or not math.isfinite(c) or c == 0:
                raise Refusal(f"scale factor '{var}' is not a finite nonzero scalar constant")
            s = s / c if divide else s * c
    if s <= 0:
        raise Refusal(f"scale {s} is not positive")
    default = 1.0 / math.sqrt(head_size)
    return None if abs(s - default) <= 1e-6 * default else s


def softmax_ok(m) -> None:
    sm = m.node("softmax")
    axis = m.attr("softmax", "axis", -1)
    rank = len(dims_of(sm.inputs[0]) or ()) or 4
    if axis not in (-1, rank - 1) or rank != 4:
        raise Refusal(f"softmax axis {axis} is not the key axis of a 4-D score")
    for name in ("cast_in", "cast_out"):
        if name in m.named:
            to = ir.DataType(m.attr(name, "to"))
            if not to.is_floating_point():
                raise Refusal(f"{name} casts the scores to {to.name}")


def require_linear(v: ir.Value | None, what: str) -> None:
    """v comes from a MatMul/Gemm through Split/Reshape/bias Add/Cast only (no rotary or other transform)."""
    for _ in range(6):
        p = v.producer() if v is not None else None
        if p is None:
            break
        if p.op_type in ("MatMul", "Gemm") and p.domain == "":
            return
        if p.op_type in ("Split", "Reshape", "Cast") and p.domain == "":
            v = p.inputs[0]
            continue
        if p.op_type == "Add" and p.domain == "" and len(p.inputs) == 2:
            consts = [const_tensor(i) is not None for i in p.inputs]
            if consts.count(True) == 1:
                v = p.inputs[consts.index(False)]
                continue
        break
    raise Refusal(f"{what} is not a linear projection (rotary embedding or other transform in between)")


# -- the mask
def analyze_mask(m, graph: ir.Graph, past: bool) -> dict[str, Any]:
    """{mask_input, causal, hidden} for the matched mask operands, or Refusal."""
    operands = [(m.binds[n], kind) for n, kind in (("bias", "bias"), ("cond", "cond")) if n in m.binds]
    hidden_extra: set[float] = set()
    if "neg" in m.binds:
        neg = m.scalar("neg")
        if neg is None or not neg <= masks.LARGE_NEGATIVE:
            raise Refusal("the Where mask fill is not a large negative constant")
        hidden_extra.add(float(neg))
    if not operands:
        return {"mask_input": None, "causal": False, "hidden": hidden_extra}
    primary = operands[0][0]
    cache = primary.meta.setdefault(MASK_KEY, {})
    key = tuple(v.name for v, _ in operands) + (past,)
    if key not in cache:
        try:
            cache[key] = masks.probe_padding_mask([v for v, _ in operands], [k for _, k in operands], graph, past)
        except Refusal as exc:
            cache[key] = str(exc)
    result = cache[key]
    if isinstance(result, str):
        raise Refusal(result)
    return {**result, "hidden": result["hidden"] | hidden_extra}


def attention_attrs(m, past: bool, head_size: int) -> dict[str, Any]:
    softmax_ok(m)
    scale = scale_of(m, head_size)
    try:
        mask = analyze_mask(m, m.graph, past)
    except Refusal as exc:
        return {"scale": scale, "unidirectional": None, "mask_input": None, "mask_filter_value": None,
                "attention_bias": whole_bias(m, exc)}
    mfv = None
    finite = {h for h in mask["hidden"] if math.isfinite(h)}
    if not mask["causal"] and len(mask["hidden"]) == 1 and finite and finite != {ORT_MASK_FILTER}:
        mfv = finite.pop()
    return {"scale": scale, "unidirectional": 1 if mask["causal"] else None, "mask_input": mask["mask_input"],
            "mask_filter_value": mfv, "attention_bias": position_bias(m, past)}


def whole_bias(m, refused: Refusal) -> ir.Value:
    """An additive term that is no mask the analysis recognizes (T5: the relative position bias with the padding
    mask folded in) still adds exactly its values as attention_bias, when it is one Add operand of rank 4 whose
    last two dims are provably the scores' (queries, keys) and whose first two are the scores' or 1. Otherwise the
    mask analysis' refusal stands. Dims the shapes cannot prove equal are proved on probe inputs
    (masks.probe_bias_fits). Refused too beside an SDPA NaN guard (a fully masked row would differ)."""
    a = m.binds.get("bias")
    if a is None or "cond" in m.binds or "neg" in m.binds or "pos_bias" in m.binds or \
            any(n.op_type == "IsNaN" for n in m.nodes):
        raise refused
    scores = m.node("scores").outputs[0]
    d, ds = dims_of(a), dims_of(scores)
    if d is None or ds is None or len(d) != 4 or len(ds) != 4:
        raise refused
    memo: dict = {}
    if all(same_dim(a, i, scores, i, memo=memo) or dims_equal(d[i], ds[i]) or i < 2 and d[i] == 1
           for i in range(4)):
        return a
    cache = a.meta.setdefault(BIAS_KEY, {})     # one proof per term (T5 adds the same one in every layer)
    key = (scores.name, "past_k" in m.binds)
    if key not in cache:
        try:
            masks.probe_bias_fits(m.graph, a, scores, key[1])
            cache[key] = None
        except Refusal as exc:
            cache[key] = f"{refused}; {exc}"
    if cache[key] is not None:
        raise Refusal(cache[key])
    return a


def position_bias(m, past: bool) -> ir.Value | None:
    """R of softmax(scaled + R + M): a bias computed from shapes and constants alone (a relative position bias:
    no graph input's data), of rank 4 (batch or 1, heads, queries, keys) -> the fused op's attention_bias. An R
    that reads input data is an additive mask the mask analysis refused: its reason is the one reported."""
    r = m.binds.get("pos_bias")
    if r is None:
        return None
    try:
        reads = probe.cone(m.graph, [r]).data_inputs
    except probe.ProbeError as exc:
        raise Refusal(f"the bias added to the scores cannot be evaluated: {exc}") from None
    if reads:
        masks.probe_padding_mask([r], ["bias"], m.graph, past)
        raise Refusal("the bias added to the scores reads graph input data: "
                       + ", ".join(sorted(v.name or "?" for v in reads)))
    d = dims_of(r)
    if d is None or len(d) != 4:
        raise Refusal(f"the bias added to the scores is not (batch or 1, heads, queries, keys) (dims {d})")
    return r


def checked(fn):
    def check(m):
        try:
            return fn(m)
        except Refusal as exc:
            return m.fail(str(exc))
    check.__name__ = fn.__name__
    return check


def key_parts(key: ir.Value) -> tuple[ir.Value, ir.Node, ir.Value | None]:
    """(k, head-split Reshape, past or None) for key = heads(k) or Concat(past, heads(k)) on the sequence axis."""
    node, past = key.producer(), None
    if node is not None and node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[1] is not None:
        axis = node.attributes.get("axis")
        if axis is None or axis.as_int() not in (2, -2):
            raise Refusal("key Concat is not on the sequence axis")
        past, node = node.inputs[0], node.inputs[1].producer()
    perm = node.attributes.get("perm") if node is not None else None
    reshape = node.inputs[0].producer() if node is not None and node.inputs[0] is not None else None
    if node is None or node.op_type != "Transpose" or perm is None or list(perm.value) != [0, 2, 1, 3] \
            or reshape is None or reshape.op_type != "Reshape":
        raise Refusal("key is not a head split of a projection (rotary, grouped KV heads or other transform)")
    return reshape.inputs[0], reshape, past


def projection_source(v: ir.Value) -> ir.Value:
    """The activation (B, S, D_in) a projection output (B, S, D) was computed from: back through a bias Add, MatMul
    by a 2-D weight, Split on the last axis, Cast, and Reshape(Gemm(Reshape(x))) restoring (B, S)."""
    for _ in range(8):
        p = v.producer()
        if p is None or p.domain != "":
            break
        if p.op_type == "Add" and len(p.inputs) == 2:
            consts = [const_tensor(i) for i in p.inputs]
            if sum(t is not None for t in consts) != 1 or len(next(t for t in consts if t is not None).shape) != 1:
                break
            v = p.inputs[0] if consts[1] is not None else p.inputs[1]
        elif p.op_type == "MatMul" and p.inputs[1] is not None and p.inputs[1].shape is not None \
                and len(p.inputs[1].shape) == 2 or p.op_type == "Split" and attr_value(p, "axis", default=0) in (-1, 2) or p.op_type == "Cast":
            v = p.inputs[0]
        elif p.op_type == "Reshape" and p.inputs[0] is not None and p.inputs[0].producer() is not None \
                and p.inputs[0].producer().op_type == "Gemm":
            inner = p.inputs[0].producer().inputs[0]
            x = inner.producer().inputs[0] if inner is not None and inner.producer() is not None \
                and inner.producer().op_type == "Reshape" else None
            od, xd = dims_of(v), dims_of(x)
            if x is None or od is None or xd is None or len(od) != 3 or len(xd) != 3 \
                    or not (same(od[0], xd[0]) and same(od[1], xd[1])):
                break
            v = x
        else:
            break
    return v


def feeds_softmax(v: ir.Value) -> bool:
    """v -> [Mul|Div] -> MatMul (as B) -> [Mul|Div] -> [Where|Add]* -> [Cast] -> Softmax."""
    frontier, seen_matmul = [v], False
    for _ in range(7):
        nxt = []
        for val in frontier:
            for use in val.uses():
                op = use.node.op_type
                if op == "Softmax" and seen_matmul:
                    return True
                if op == "MatMul" and not seen_matmul and use.idx == 1:
                    seen_matmul = True
                    nxt.extend(use.node.outputs)
                elif op in ("Mul", "Div", "Add", "Where", "Cast"):
                    nxt.extend(use.node.outputs)
        frontier = nxt
    return False


def ir_shape(dims: tuple) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else (d if isinstance(d, str) else None) for d in dims])


def mask_index(op, mask_input: ir.Value | None) -> ir.Value | None:
    if mask_input is None or mask_input.dtype == ir.DataType.INT32:
        return mask_input
    return op.Cast(mask_input, to=int(ir.DataType.INT32))


def bnsh_view(op, y: ir.Value, like: ir.Value, num_heads: int, head_size: int, bsd: tuple) -> ir.Value:
    """(B, S, N*H) -> (B, N, S, H), with the shapes written out so the cleanup can fold the exporter's tail."""
    b, s, d = bsd
    r = op.Reshape(y, op.const(np.array([0, 0, num_heads, head_size], np.int64), "heads"))
    t = op.Transpose(r, perm=[0, 2, 1, 3])
    for v, dims in ((y, (b, s, d)), (r, (b, s, num_heads, head_size)), (t, (b, num_heads, s, head_size))):
        v.shape = ir_shape(dims)
        if like.dtype is not None:
            v.type = ir.TensorType(like.dtype)
    return t


def lazy_concat(op, parts: list[ir.Value], axis: int, name: str) -> ir.Value:
    """Concat of constants as one lazily computed initializer (a Concat node when some part is not constant)."""
    tensors = [const_tensor(p) for p in parts]
    if any(t is None for t in tensors):
        return op.Concat(*parts, axis=axis)
    shapes = [list(t.shape) for t in tensors]
    shape = list(shapes[0])
    shape[axis] = sum(s[axis] for s in shapes)
    lazy = derived_tensor(lambda *arrays: np.concatenate(arrays, axis=axis), tensors, tensors[0].dtype, shape)
    v = ir.Value(name=f"{op.prefix}/{name}", shape=ir.Shape(shape), type=ir.TensorType(tensors[0].dtype),
                 const_value=lazy)
    op.initializers.append(v)
    return v


def zeros_like_bias(op, like: ir.Value, size: int, name: str = "zero_bias") -> ir.Value:
    return op.const(np.zeros(size, dtype=like.dtype.numpy()), name)


def unique_names(op) -> None:
    """Name new nodes and values `prefix/k`: the builder's `prefix_k` can equal another rewrite's prefix."""
    for k, node in enumerate(op.nodes):
        node.name = f"{op.prefix}/{k}"
        for out in node.outputs:
            out.name = f"{op.prefix}/{k}:{out.index()}"
