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

The key reaches this pass in canonical form (canonicalize-attention-key, before it): Kt as a transpose of the
head split, and Shape(K) read from the projection input.

Variants inside one pattern: Kt = Transpose(heads(k), (0,1,3,2)) or Transpose(Reshape(k), (0,2,3,1)) (or, with
past, Transpose(K, (0,1,3,2))); the scale as Mul or Div on Q, on Kt, on both, or on the scores (product checked
against 1/sqrt(H); `scale` is set when it differs); M as Add(scores, bias), Where(cond, scores, neg), or both;
optional Casts around Softmax; the SDPA NaN guard Where(IsNaN(P), 0, P); bias Adds optional; Split sizes as input,
attribute or equal default; Reshape targets constant or computed (proved from inferred or symbolic shapes).

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

The mask and bias analysis is compiler/attention_parts.py's. A position bias R added to the scaled scores before the mask, softmax(scaled + R + M) (MPNet's and T5's relative
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

import onnx_ir as ir
from onnxc.attention_parts import (attention_attrs, bnsh_view, checked, heads_of, lazy_concat, mask_index,
                                   require_linear, same, unique_names, zeros_like_bias)
from onnxc.coverage import Refusal
from onnxc.domains import MS
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import Rule, apply_rules
from onnxc.shapes import dims_of, sym_value


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


# ---------------------------------------------------------------------------------------------------- checks


def _weight(m, name: str, rows: int | None, cols: int) -> None:
    shape = m.shape(name)
    if shape is None or len(shape) != 2 or shape[1] != cols or (rows is not None and shape[0] != rows):
        raise Refusal(f"weight '{name}' shape {shape} is not ({rows}, {cols})")


def _bias(m, name: str, size: int) -> None:
    if name in m.binds and (m.shape(name) is None or tuple(m.shape(name)) != (size,)):
        raise Refusal(f"bias '{name}' shape {m.shape(name)} is not ({size},)")


@checked
def check_separate(m):
    n, h, xd = heads_of(m)
    hidden = n * h
    d_in = dims_of(m["x"])
    if d_in is None or len(d_in) != 3 or not isinstance(d_in[2], int):
        raise Refusal("input is not (batch, sequence, hidden) with a static hidden size")
    for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")):
        _weight(m, w, d_in[2], hidden)
        _bias(m, b, hidden)
    return {"num_heads": n, "head_size": h, "bsd": xd, **attention_attrs(m, False, h)}


@checked
def check_packed(m):
    n, h, xd = heads_of(m)
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
        if out is None or len(out) != 3 or not (same(out[0], d_in[0]) and same(out[1], d_in[1])):
            raise Refusal("cannot prove the Gemm reshapes restore (batch, sequence)")
    ws = m.shape("w")
    want = (3 * hidden, d_in[2]) if trans_b else (d_in[2], 3 * hidden)
    if ws is None or tuple(ws) != want:
        raise Refusal(f"packed weight shape {ws} is not {want}")
    _bias(m, "b", 3 * hidden)
    return {"num_heads": n, "head_size": h, "bsd": xd, "trans_b": trans_b, **attention_attrs(m, False, h)}


@checked
def check_past(m):
    n, h, xd = heads_of(m)
    for name in ("k_concat", "v_concat"):
        axis = m.attr(name, "axis")
        if axis not in (2, -2):
            raise Refusal(f"{name} concatenates on axis {axis}, not the sequence axis")
    for name in ("past_k", "past_v"):
        pd = dims_of(m[name])
        if pd is None or len(pd) != 4 or any(isinstance(d, int) and d != want for d, want in ((pd[1], n), (pd[3], h))):
            raise Refusal(f"{name} shape {pd} is not (batch, {n}, past, {h})")
    require_linear(m["q"], "query")
    require_linear(m["k"], "key")
    return {"num_heads": n, "head_size": h, "bsd": xd, **attention_attrs(m, True, h)}


@checked
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
    unique_names(op)
    return out


# ---------------------------------------------------------------------------------------------------- rewrites


def _attention(op, x, weights, bias, kw) -> ir.Value:
    y = op.Attention(x, weights, bias, mask_index(op, kw["mask_input"]), None, kw.get("attention_bias"), _domain=MS,
                     num_heads=kw["num_heads"],
                     scale=kw["scale"], unidirectional=kw["unidirectional"], mask_filter_value=kw["mask_filter_value"])
    out = bnsh_view(op, y, x, kw["num_heads"], kw["head_size"], kw["bsd"])
    unique_names(op)
    return out


def rewrite_separate(op, **kw):
    hidden = kw["num_heads"] * kw["head_size"]
    w = lazy_concat(op, [kw["wq"], kw["wk"], kw["wv"]], 1, "qkv_weight")
    if not any(kw.get(n) for n in ("bq", "bk", "bv")):     # T5: no projection biases
        return _attention(op, kw["x"], w, zeros_like_bias(op, kw["x"], 3 * hidden), kw)
    b = lazy_concat(op, [kw.get(n) or zeros_like_bias(op, kw["x"], hidden, f"zero_bias_{n}") for n in ("bq", "bk", "bv")],
                     0, "qkv_bias")
    return _attention(op, kw["x"], w, b, kw)


def rewrite_packed(op, **kw):
    w = op.Transpose(kw["w"], perm=[1, 0]) if kw["trans_b"] else kw["w"]
    b = kw.get("b") or zeros_like_bias(op, kw["x"], 3 * kw["num_heads"] * kw["head_size"])
    return _attention(op, kw["x"], w, b, kw)


def rewrite_past(op, **kw):
    y, present_k, present_v = op.MultiHeadAttention(
        kw["q"], kw["k"], kw["v"], None, mask_index(op, kw["mask_input"]), kw.get("attention_bias"), kw["past_k"],
        kw["past_v"],
        _domain=MS, _outputs=3, num_heads=kw["num_heads"], scale=kw["scale"], unidirectional=kw["unidirectional"],
        mask_filter_value=kw["mask_filter_value"])
    out = bnsh_view(op, y, kw["q"], kw["num_heads"], kw["head_size"], kw["bsd"])
    unique_names(op)
    return out, present_k, present_v


# ---------------------------------------------------------------------------------------------------- the pass
separate = Rule("fuse-attention", pattern_separate, rewrite_separate, check_separate,
                summary="q/k/v MatMul+Add projections, softmax(QK^T*s + M)V -> Attention (packed QKV)")
packed = Rule("fuse-attention-packed", pattern_packed, rewrite_packed, check_packed,
              summary="Split of one QKV projection (MatMul+Add or Gemm), softmax(QK^T*s + M)V -> Attention")
past = Rule("fuse-attention-past", pattern_past, rewrite_past, check_past,
            summary="Concat(past, new) K/V, softmax(QK^T*s + M)V -> MultiHeadAttention with present outputs")


output = Rule("fuse-attention-output", pattern_output, rewrite_output, check_output,
              summary="Reshape(Transpose(Transpose(Reshape(y, (0,0,N,H)))), t) -> Reshape(y, t) for a fused y")


RULES = [separate, packed, past]
FINISH = [output]


@register_pass
class FuseAttention(Pass):
    """BERT/GPT-2 self-attention -> com.microsoft Attention (packed QKV) or MultiHeadAttention (with past)"""

    name = "fuse-attention"
    level = 2
    targets = ("cpu", "cuda")

    def rules(self):
        return RULES + FINISH

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        counts = dict(apply_rules(model, RULES, disabled=ctx.disabled_rules).applied)
        if counts:
            counts.update(apply_rules(model, FINISH, disabled=ctx.disabled_rules).applied)
        return PassResult(model, bool(counts), counts)
