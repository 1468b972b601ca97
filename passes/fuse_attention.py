"""fuse-attention: BERT- and GPT-2-style multi-head self-attention -> com.microsoft Attention / MultiHeadAttention

With heads(t) = Transpose(Reshape(t, (B, S, N, H)), perm=(0, 2, 1, 3)) and M the additive mask:

    P = Softmax(s_q*heads(q) @ s_k*Kt * s (+ R) + M),   out = P @ V
    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv           ->  Attention(x, [Wq|Wk|Wv], [bq|bk|bv], mask)   fuse-attention
    q, k, v = Split(x W + b)  (MatMul+Add or Gemm)      ->  Attention(x, W, b, mask)                     fuse-attention-packed
    K = Concat(past_k, heads(k)), V = Concat(past_v, heads(v)), present = (K, V)
                                                        ->  MultiHeadAttention(q, k, v, mask, past_k, past_v)
                                                            -> (out, present_k, present_v)                fuse-attention-past

The fused node's output y (B, S, N*H) replaces `out` as Transpose(Reshape(y, (0, 0, N, H)), (0, 2, 1, 3)), with
its shapes written out; rule fuse-attention-output folds that into the exporter's Transpose/Reshape back to
(B, S, hidden), and the cleanup after this pass does the rest (e.g. TorchScript's no-op Reshape sized by Shape(out)).

Before the fusion rules, two preparations make exporter shape plumbing stop reading attention internals (the rule
engine refuses a match whose intermediate values have outside users): fuse-attention-key-transpose (below) and
fuse-attention-key-shape, Shape(heads(k)) = (B, N, S, H) and Shape(Concat(past, heads(k))) = (B, N, P + S, H)
rebuilt from Shape(x) of the projection input x (and Shape(past)); dead nodes they leave are dropped.

Variants inside one pattern: Kt = Transpose(heads(k), (0,1,3,2)) or Transpose(Reshape(k), (0,2,3,1)) (or, with
past, Transpose(K, (0,1,3,2))); the scale as Mul or Div on Q, on Kt, on both, or on the scores (product checked
against 1/sqrt(H); `scale` is set when it differs); M as Add(scores, bias), Where(cond, scores, neg), or both;
optional Casts around Softmax; the SDPA NaN guard Where(IsNaN(P), 0, P); bias Adds optional; Split sizes as input,
attribute or equal default; Reshape targets constant or computed (proved from inferred or symbolic shapes). Dynamo's
Kt, Reshape(Transpose(Reshape(K, (-1, T, H)), (0, 2, 1)), (B, N, H, T)), is first rewritten to
Transpose(K, (0,1,3,2)) (rule fuse-attention-key-transpose, only where K is a head split feeding a Softmax).

The mask is recognized by what it computes, not by how an exporter spells it: its producers (up to graph inputs
and constants) are evaluated by compiler/probe.py on probe inputs (two sizes, random 0/1 masks; other inputs sized
as onnxc.verify sizes them; large constants read only for their shape replaced by zeros) and must read the data of
one 2-D graph input m (B, T) and give keep[b, i, j] = m[b, j] != 0, optionally AND j <= T - S + i (causal), with
hidden entries >= 1e4 below zero (or -inf). Then mask_index = Cast(m, int32) and unidirectional = causal.
ORT adds mask_filter_value (-10000) for padding instead of -inf: equal wherever a query sees at least one key.
Fully masked rows (a query whose visible keys are all padding: an all-zero mask row, or left-padding before the
first token with causal masks) can only occur at padded positions; there the original gives 0 (SDPA NaN guard) or a
uniform average (finite large negative), ORT a softmax of the unmasked scores. For bidirectional masks with a finite
hidden value c, mask_filter_value = c, which reproduces the original exactly; otherwise the default is kept.

A position bias R added to the scaled scores before the mask, softmax(scaled + R + M) (MPNet's and T5's relative
position buckets), becomes the op's attention_bias (input 5) when its producers read no graph input's data (a
function of shapes and constants, evaluated by compiler/probe.py's cone) and it has rank 4 (batch or 1, heads,
queries, keys); one that reads input data is an additive mask, analysed as one. An additive term the mask analysis
does not recognize (T5 folds the padding mask into its position bias once and adds the sum in every layer; a
per-query 3-D mask) still adds exactly its values as attention_bias, with no mask_index, when it has rank 4 and its
dims are provably the scores' (or 1 for batch and heads); not beside an SDPA NaN guard.

Requires: N equal for Q, K and V (grouped KV heads are refused), head split keeping (B, S), softmax on the last
axis, scale factors scalar constants, q and k straight from a linear projection (rotary embeddings are refused).
Reference: kernels/attention.py.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxc import masks, probe
from onnxc.coverage import Refusal
from onnxc.domains import MS
from onnxc.ir import derived_tensor
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import Rule, apply_rules, attr_value, const_tensor
from onnxc.shapes import Unknown, dims_equal, dims_of, same_dim, sym_value

ORT_MASK_FILTER = -10000.0     # ORT's default mask_filter_value
_MASK_KEY = "onnxc.fuse_attention.mask"
_BIAS_KEY = "onnxc.fuse_attention.bias"


# ---------------------------------------------------------------------------------------------------- patterns
def _core(op, qh, kt, vh, q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg):
    """softmax(scale(Q) @ scale(Kt) * s (+ R) + M) @ V, with the SDPA NaN guard optional; R a position bias."""
    qs = op.Or(op.Mul(qh, q_mul), op.Div(qh, q_div), qh)
    ks = op.Or(op.Mul(kt, k_mul), op.Div(kt, k_div), kt)
    scores = op.MatMul(qs, ks, _name="scores")
    scaled = op.Or(op.Mul(scores, s_mul), op.Div(scores, s_div), scores)
    scaled = op.Or(op.Add(scaled, pos_bias, _name="pos_add"), scaled)
    where = op.Where(cond, scaled, neg)
    masked = op.Or(op.Add(where, bias), op.Add(scaled, bias), where, scaled)
    p = op.Cast(op.Softmax(op.Cast(masked, _optional=True, _name="cast_in"), _name="softmax"), _optional=True,
                _name="cast_out")
    p = op.Or(op.Where(op.IsNaN(p), 0.0, p), p)
    return op.MatMul(p, vh)


def _heads(op, t, shape, name):
    return op.Transpose(op.Reshape(t, shape, _name=name), perm=[0, 2, 1, 3])


def _key_t(op, k, k_shape):
    """Kt (B, N, H, S) from k (B, S, N*H): through BNSH, or straight from BSNH."""
    kr = op.Reshape(k, k_shape, _name="k_reshape")
    return op.Or(op.Transpose(op.Transpose(kr, perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2]),
                 op.Transpose(kr, perm=[0, 2, 3, 1]))


def pattern_separate(op, x, wq, bq, wk, bk, wv, bv, q_shape, k_shape, v_shape,
                     q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg):
    q = op.Add(op.MatMul(x, wq), bq, _optional=True)
    k = op.Add(op.MatMul(x, wk), bk, _optional=True)
    v = op.Add(op.MatMul(x, wv), bv, _optional=True)
    return _core(op, _heads(op, q, q_shape, "q_reshape"), _key_t(op, k, k_shape), _heads(op, v, v_shape, "v_reshape"),
                 q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg)


def pattern_packed(op, x, w, b, x_shape, qkv_shape, q_shape, k_shape, v_shape,
                   q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg):
    qkv = op.Or(op.Add(op.MatMul(x, w), b, _optional=True),
                op.Reshape(op.Gemm(op.Reshape(x, x_shape), w, b, _name="gemm"), qkv_shape))
    q, k, v = op.Split(qkv, _outputs=3, _allow_other_inputs=True, _name="split")
    return _core(op, _heads(op, q, q_shape, "q_reshape"), _key_t(op, k, k_shape), _heads(op, v, v_shape, "v_reshape"),
                 q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg)


def pattern_past(op, q, k, v, past_k, past_v, q_shape, k_shape, v_shape,
                 q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg):
    key = op.Concat(past_k, _heads(op, k, k_shape, "k_reshape"), _name="k_concat")
    value = op.Concat(past_v, _heads(op, v, v_shape, "v_reshape"), _name="v_concat")
    out = _core(op, _heads(op, q, q_shape, "q_reshape"), op.Transpose(key, perm=[0, 1, 3, 2]), value,
                q_mul, q_div, k_mul, k_div, s_mul, s_div, pos_bias, bias, cond, neg)
    return out, key, value


def pattern_output(op, y, heads, target):
    return op.Reshape(op.Transpose(op.Transpose(op.Reshape(y, heads), perm=[0, 2, 1, 3]), perm=[0, 2, 1, 3]), target,
                      _name="out")


def pattern_key_transpose(op, key, r1, r2):
    return op.Reshape(op.Transpose(op.Reshape(key, r1, _name="r1"), perm=[0, 2, 1]), r2)


# ---------------------------------------------------------------------------------------------------- checks
def _same(a: Any, b: Any) -> bool:
    """Two dims (int, symbol name or Unknown) are provably equal."""
    if isinstance(a, Unknown) or isinstance(b, Unknown):
        return a is b
    return a is not None and a == b


def _split_heads(node: ir.Node, what: str) -> tuple[int, int, tuple]:
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
        if not (_same(od[i], xd[i]) or _same(target[i], xd[i]) or (target[i] == 0 and not (allowzero and
                                                                                           allowzero.as_int()))):
            raise Refusal(f"cannot prove the {what} head split keeps batch and sequence ({target})")
    return n, h, xd


def _heads_of(m) -> tuple[int, int, tuple]:
    nq, hq, qd = _split_heads(m.node("q_reshape"), "query")
    nk, hk, _ = _split_heads(m.node("k_reshape"), "key")
    nv, hv, _ = _split_heads(m.node("v_reshape"), "value")
    if nk != nq or nv != nq:
        raise Refusal(f"grouped KV heads ({nq} query heads, {nk} key heads, {nv} value heads)")
    if hk != hq or hv != hq:
        raise Refusal(f"head sizes differ (query {hq}, key {hk}, value {hv})")
    return nq, hq, qd


def _scale(m, head_size: int) -> float | None:
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


def _softmax_ok(m) -> None:
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


def _linear(v: ir.Value | None, what: str) -> None:
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
def _analyze_mask(m, graph: ir.Graph, past: bool) -> dict[str, Any]:
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
    cache = primary.meta.setdefault(_MASK_KEY, {})
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


def _attention_attrs(m, past: bool, head_size: int) -> dict[str, Any]:
    _softmax_ok(m)
    scale = _scale(m, head_size)
    try:
        mask = _analyze_mask(m, m.graph, past)
    except Refusal as exc:
        return {"scale": scale, "unidirectional": None, "mask_input": None, "mask_filter_value": None,
                "attention_bias": _whole_bias(m, exc)}
    mfv = None
    finite = {h for h in mask["hidden"] if math.isfinite(h)}
    if not mask["causal"] and len(mask["hidden"]) == 1 and finite and finite != {ORT_MASK_FILTER}:
        mfv = finite.pop()
    return {"scale": scale, "unidirectional": 1 if mask["causal"] else None, "mask_input": mask["mask_input"],
            "mask_filter_value": mfv, "attention_bias": _position_bias(m, past)}


def _whole_bias(m, refused: Refusal) -> ir.Value:
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
    cache = a.meta.setdefault(_BIAS_KEY, {})     # one proof per term (T5 adds the same one in every layer)
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


def _position_bias(m, past: bool) -> ir.Value | None:
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


def _checked(fn):
    def check(m):
        try:
            return fn(m)
        except Refusal as exc:
            return m.fail(str(exc))
    check.__name__ = fn.__name__
    return check


def _weight(m, name: str, rows: int | None, cols: int) -> None:
    shape = m.shape(name)
    if shape is None or len(shape) != 2 or shape[1] != cols or (rows is not None and shape[0] != rows):
        raise Refusal(f"weight '{name}' shape {shape} is not ({rows}, {cols})")


def _bias(m, name: str, size: int) -> None:
    if name in m.binds and (m.shape(name) is None or tuple(m.shape(name)) != (size,)):
        raise Refusal(f"bias '{name}' shape {m.shape(name)} is not ({size},)")


@_checked
def check_separate(m):
    n, h, xd = _heads_of(m)
    hidden = n * h
    d_in = dims_of(m["x"])
    if d_in is None or len(d_in) != 3 or not isinstance(d_in[2], int):
        raise Refusal("input is not (batch, sequence, hidden) with a static hidden size")
    for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")):
        _weight(m, w, d_in[2], hidden)
        _bias(m, b, hidden)
    return {"num_heads": n, "head_size": h, "bsd": xd, **_attention_attrs(m, False, h)}


@_checked
def check_packed(m):
    n, h, xd = _heads_of(m)
    hidden = n * h
    split = m.node("split")
    if len(split.outputs) != 3:
        raise Refusal(f"Split has {len(split.outputs)} outputs")
    axis = m.attr("split", "axis", 0)
    if axis not in (-1, 2):
        raise Refusal(f"Split axis {axis} is not the hidden axis")
    sizes = split.attributes.get("split")
    sizes = list(sizes.value) if sizes is not None else None
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = sym_value(split.inputs[1])
    if sizes is not None and list(sizes) != [hidden] * 3:
        raise Refusal(f"Split sizes {sizes} are not three equal parts of {3 * hidden}")
    d_in = dims_of(m["x"])
    if d_in is None or len(d_in) != 3 or not isinstance(d_in[2], int):
        raise Refusal("input is not (batch, sequence, hidden) with a static hidden size")
    trans_b = 0
    if "gemm" in m.named:
        if m.attr("gemm", "alpha", 1.0) != 1.0 or m.attr("gemm", "beta", 1.0) != 1.0 or m.attr("gemm", "transA", 0):
            raise Refusal("Gemm has alpha/beta != 1 or transA")
        trans_b = m.attr("gemm", "transB", 0)
        out = dims_of(m.node("split").inputs[0])
        if out is None or len(out) != 3 or not (_same(out[0], d_in[0]) and _same(out[1], d_in[1])):
            raise Refusal("cannot prove the Gemm reshapes restore (batch, sequence)")
    ws = m.shape("w")
    want = (3 * hidden, d_in[2]) if trans_b else (d_in[2], 3 * hidden)
    if ws is None or tuple(ws) != want:
        raise Refusal(f"packed weight shape {ws} is not {want}")
    _bias(m, "b", 3 * hidden)
    return {"num_heads": n, "head_size": h, "bsd": xd, "trans_b": trans_b, **_attention_attrs(m, False, h)}


@_checked
def check_past(m):
    n, h, xd = _heads_of(m)
    for name in ("k_concat", "v_concat"):
        axis = m.attr(name, "axis")
        if axis not in (2, -2):
            raise Refusal(f"{name} concatenates on axis {axis}, not the sequence axis")
    for name in ("past_k", "past_v"):
        pd = dims_of(m[name])
        if pd is None or len(pd) != 4 or any(isinstance(d, int) and d != want for d, want in ((pd[1], n), (pd[3], h))):
            raise Refusal(f"{name} shape {pd} is not (batch, {n}, past, {h})")
    _linear(m["q"], "query")
    _linear(m["k"], "key")
    return {"num_heads": n, "head_size": h, "bsd": xd, **_attention_attrs(m, True, h)}


@_checked
def check_key_transpose(m):
    kd, mid, out = dims_of(m["key"]), dims_of(m.node("r1").outputs[0]), dims_of(m.outputs[0])
    if kd is None or len(kd) != 4:
        raise Refusal("key is not 4-D")
    want = (kd[0], kd[1], kd[3], kd[2])
    ok_mid = mid is not None and len(mid) == 3 and _same(mid[1], kd[2]) and _same(mid[2], kd[3])
    t1, t2 = sym_value(m["r1"]), sym_value(m["r2"])
    if not ok_mid and t1 is not None and len(t1) == 3:
        ok_mid = t1[0] == -1 and _same(t1[1], kd[2]) and _same(t1[2], kd[3])
    ok_out = out is not None and len(out) == 4 and all(_same(a, b) for a, b in zip(out, want))
    if not ok_out and t2 is not None and len(t2) == 4:
        ok_out = sum(x == -1 for x in t2) <= 1 and all(x == -1 or _same(x, w) for x, w in zip(t2, want))
    if not (ok_mid and ok_out):
        raise Refusal("cannot prove the reshapes around the transpose swap the last two axes of the key")
    _key_parts(m["key"])
    if not _feeds_softmax(m.outputs[0]):
        raise Refusal("the transposed key does not feed an attention Softmax")


def _key_parts(key: ir.Value) -> tuple[ir.Value, ir.Node, ir.Value | None]:
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


def _source(v: ir.Value) -> ir.Value:
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
                    or not (_same(od[0], xd[0]) and _same(od[1], xd[1])):
                break
            v = x
        else:
            break
    return v


@_checked
def check_key_shape(m):
    k, reshape, past = _key_parts(m["key"])
    n, h, _ = _split_heads(reshape, "key")
    k = _source(k)
    if len(dims_of(k) or ()) != 3:
        raise Refusal("the key's projection input is not (batch, sequence, hidden)")
    if not any(_feeds_softmax(u.node.outputs[0]) for u in m["key"].uses() if u.node.op_type == "Transpose") \
            and not any(_feeds_softmax(v) for u in m["key"].uses() for v in u.node.outputs
                        if u.node.op_type == "Reshape"):
        raise Refusal("the key does not feed an attention Softmax")
    start, end = m.attr("shape", "start", 0), m.attr("shape", "end", None)
    return {"k": k, "past": past, "num_heads": n, "head_size": h, "start": start, "end": end}


def rewrite_key_shape(op, k, past, num_heads, head_size, start, end):
    """Shape(key) = (B, N, [P +] S, H) from Shape(k) = (B, S, D) (and Shape(past) = (B, N, P, H))."""
    seq = op.Shape(k, start=1, end=2)
    if past is not None:
        seq = op.Add(op.Shape(past, start=2, end=3), seq)
    parts = [op.Shape(k, start=0, end=1), op.const(np.array([num_heads], np.int64)), seq,
             op.const(np.array([head_size], np.int64))]
    out = op.Concat(*parts[slice(start, end)], axis=0)
    _unique_names(op)
    return out


@_checked
def check_output(m):
    fused = m["y"].producer()
    if fused is None or fused.domain != MS or fused.op_type not in ("Attention", "MultiHeadAttention"):
        raise Refusal("not the output of a fused attention")
    heads, target = sym_value(m["heads"]), sym_value(m["target"])
    if heads is None or len(heads) != 4 or list(heads[:2]) != [0, 0]:
        raise Refusal(f"head split {heads} is not (0, 0, N, H)")
    if target is None or len(target) < 2 or any(t == 0 for t in target[2:]) or m.attr("out", "allowzero", 0):
        raise Refusal(f"target {target} copies a dim past batch and sequence")
    yd = dims_of(m["y"])
    if target[:2] == (0, 0) and len(target) == 3 and (target[2] == -1 or (yd and target[2] == yd[-1])):
        return {"direct": True}
    return {"direct": False}


def rewrite_output(op, y, target, direct):
    if direct:
        return y
    out = op.Reshape(y, target)
    _unique_names(op)
    return out


def _feeds_softmax(v: ir.Value) -> bool:
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


# ---------------------------------------------------------------------------------------------------- rewrites
def _shape(dims: tuple) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else (d if isinstance(d, str) else None) for d in dims])


def _mask_index(op, mask_input: ir.Value | None) -> ir.Value | None:
    if mask_input is None or mask_input.dtype == ir.DataType.INT32:
        return mask_input
    return op.Cast(mask_input, to=int(ir.DataType.INT32))


def _bnsh(op, y: ir.Value, like: ir.Value, num_heads: int, head_size: int, bsd: tuple) -> ir.Value:
    """(B, S, N*H) -> (B, N, S, H), with the shapes written out so the cleanup can fold the exporter's tail."""
    b, s, d = bsd
    r = op.Reshape(y, op.const(np.array([0, 0, num_heads, head_size], np.int64), "heads"))
    t = op.Transpose(r, perm=[0, 2, 1, 3])
    for v, dims in ((y, (b, s, d)), (r, (b, s, num_heads, head_size)), (t, (b, num_heads, s, head_size))):
        v.shape = _shape(dims)
        if like.dtype is not None:
            v.type = ir.TensorType(like.dtype)
    return t


def _lazy_concat(op, parts: list[ir.Value], axis: int, name: str) -> ir.Value:
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


def _zeros(op, like: ir.Value, size: int, name: str = "zero_bias") -> ir.Value:
    return op.const(np.zeros(size, dtype=like.dtype.numpy()), name)


def _unique_names(op) -> None:
    """Name new nodes and values `prefix/k`: the builder's `prefix_k` can equal another rewrite's prefix."""
    for k, node in enumerate(op.nodes):
        node.name = f"{op.prefix}/{k}"
        for out in node.outputs:
            out.name = f"{op.prefix}/{k}:{out.index()}"


def _attention(op, x, weights, bias, kw) -> ir.Value:
    y = op.Attention(x, weights, bias, _mask_index(op, kw["mask_input"]), None, kw.get("attention_bias"), _domain=MS,
                     num_heads=kw["num_heads"],
                     scale=kw["scale"], unidirectional=kw["unidirectional"], mask_filter_value=kw["mask_filter_value"])
    out = _bnsh(op, y, x, kw["num_heads"], kw["head_size"], kw["bsd"])
    _unique_names(op)
    return out


def rewrite_separate(op, **kw):
    hidden = kw["num_heads"] * kw["head_size"]
    w = _lazy_concat(op, [kw["wq"], kw["wk"], kw["wv"]], 1, "qkv_weight")
    if not any(kw.get(n) for n in ("bq", "bk", "bv")):     # T5: no projection biases
        return _attention(op, kw["x"], w, _zeros(op, kw["x"], 3 * hidden), kw)
    b = _lazy_concat(op, [kw.get(n) or _zeros(op, kw["x"], hidden, f"zero_bias_{n}") for n in ("bq", "bk", "bv")],
                     0, "qkv_bias")
    return _attention(op, kw["x"], w, b, kw)


def rewrite_packed(op, **kw):
    w = op.Transpose(kw["w"], perm=[1, 0]) if kw["trans_b"] else kw["w"]
    b = kw.get("b") or _zeros(op, kw["x"], 3 * kw["num_heads"] * kw["head_size"])
    return _attention(op, kw["x"], w, b, kw)


def rewrite_past(op, **kw):
    y, present_k, present_v = op.MultiHeadAttention(
        kw["q"], kw["k"], kw["v"], None, _mask_index(op, kw["mask_input"]), kw.get("attention_bias"), kw["past_k"],
        kw["past_v"],
        _domain=MS, _outputs=3, num_heads=kw["num_heads"], scale=kw["scale"], unidirectional=kw["unidirectional"],
        mask_filter_value=kw["mask_filter_value"])
    out = _bnsh(op, y, kw["q"], kw["num_heads"], kw["head_size"], kw["bsd"])
    _unique_names(op)
    return out, present_k, present_v


# ---------------------------------------------------------------------------------------------------- the pass
separate = Rule("fuse-attention", pattern_separate, rewrite_separate, check_separate,
                summary="q/k/v MatMul+Add projections, softmax(QK^T*s + M)V -> Attention (packed QKV)")
packed = Rule("fuse-attention-packed", pattern_packed, rewrite_packed, check_packed,
              summary="Split of one QKV projection (MatMul+Add or Gemm), softmax(QK^T*s + M)V -> Attention")
past = Rule("fuse-attention-past", pattern_past, rewrite_past, check_past,
            summary="Concat(past, new) K/V, softmax(QK^T*s + M)V -> MultiHeadAttention with present outputs")
def rewrite_key_transpose(op, key):
    out = op.Transpose(key, perm=[0, 1, 3, 2])
    _unique_names(op)
    return out


key_transpose = Rule("fuse-attention-key-transpose", pattern_key_transpose, rewrite_key_transpose,
                     check_key_transpose,
                     summary="Reshape(Transpose(Reshape(K, (-1,T,H)), (0,2,1)), (B,N,H,T)) -> Transpose(K, (0,1,3,2))")

output = Rule("fuse-attention-output", pattern_output, rewrite_output, check_output,
              summary="Reshape(Transpose(Transpose(Reshape(y, (0,0,N,H)))), t) -> Reshape(y, t) for a fused y")

key_shape = Rule("fuse-attention-key-shape", lambda op, key: op.Shape(key, _name="shape"), rewrite_key_shape,
                 check_key_shape, summary="Shape(heads(k)) -> (B, N, S, H) from Shape(k), so the key's shape is "
                                          "read outside the attention (exporters size masks and Kt from it)")

PREPARE = [key_transpose, key_shape]
RULES = [separate, packed, past]
FINISH = [output]


def _drop_dead(graph: ir.Graph) -> None:
    """Remove nodes none of whose outputs is used (what the key-transpose rewrite leaves behind)."""
    for node in reversed(list(graph)):
        if not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)


@register_pass
class FuseAttention(Pass):
    """BERT/GPT-2 self-attention -> com.microsoft Attention (packed QKV) or MultiHeadAttention (with past)"""

    name = "fuse-attention"
    level = 2
    targets = ("cpu", "cuda")

    def rules(self):
        return PREPARE + RULES + FINISH

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        prepared = apply_rules(model, PREPARE, disabled=ctx.disabled_rules).applied
        if prepared:
            _drop_dead(model.graph)
        fused = apply_rules(model, RULES, disabled=ctx.disabled_rules).applied
        if fused:
            counts.update(apply_rules(model, FINISH, disabled=ctx.disabled_rules).applied)
        counts.update(prepared)
        counts.update(fused)
        return PassResult(model, bool(counts), counts)
