"""Build small decoder self-attention graphs in the variants exporters produce (for fuse-gqa's tests).

One layer: x (B, S, hidden) -> Q/K/V projections -> BSNH views -> BNSH -> rotary -> [KV cache Concat] ->
[repeat KV] -> scaled scores -> causal + padding mask -> Softmax -> @ V -> BSNH -> (B, S, N*H). The graph's
inputs follow a Hugging Face decoder: x stands for the embedded tokens, attention_mask (B, past + S) and
position_ids (B, S), past_key_values.0.key/value when cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Variant:
    heads: int = 4
    kv_heads: int = 2
    head: int = 16
    past: bool = True
    rotary: bool = True
    scale_on: str = "qk"          # "qk": sqrt(scale) on Q and on K; "scores": Div of the scores; "q": Mul on Q;
    #                               "after_mask": Div of (scores + mask) (CodeGen), with mask_form "add"
    mask_form: str = "add"        # "add": Add(scores, Where(keep, 0, min)); "where": Where(keep, scores, min)
    k_transpose: str = "perm"     # "perm": Transpose(0,1,3,2); "reshape": Reshape/Transpose(0,2,1)/Reshape
    window: int = 0               # sliding window (keys a query sees), 0 = none
    nan_guard: bool = True
    dtype: int = TensorProto.FLOAT
    bias_value: float = 0.0       # a non-zero value makes the mask a bias that GQA cannot express
    noncausal: bool = False       # every key visible (an encoder's bidirectional attention)
    pad_only: bool = False        # the mask is the padding alone, (B, 1, 1, T): one row for every query
    rotary_f32: bool = False      # OLMo: rotary in float32 on Cast(q), rotate_half taken before the Cast, cast back
    k_cast: bool = False          # GPT-J: Q and K cast to float32 (K before its transposition), scores and softmax
    #                               in float32, P cast back to the values' type
    past_fp16: bool = False       # a float32 layer reading a float16 cache, cast up before the Concat
    static: tuple[int, int, int] | None = None   # (batch, seq, past): every input dim fixed
    softcap: float = 0.0          # Gemma2: c * tanh(scores / c) between the scale and the mask
    qk_norm: bool = False         # Gemma3: RMS norm (SimplifiedLayerNormalization) of BNSH q and k after the transpose
    interleaved: bool = False     # GPT-J: rotate_every_two on the BSNH views, before the head transpose
    upcast: bool = False          # fp16 TorchScript: Cast(scores, fp32) + mask, Softmax, MatMul(P, Cast(V, fp32))
    opset: int = 18
    longrope: int = 0             # Phi-3 longrope: inv_freq = Where(max(position_ids) + 1 > longrope, long, short)
    rotate: str = "slice"         # rotate_half(x) as: "slice" Concat(Neg(x[h:]), x[:h]); "split" Split then Concat;
    #                               "matmul" x @ R (a signed permutation); "gather" Gather(x, perm) * signs
    tables_per_use: bool = False  # Q and K read cos/sin computed twice (equal values, distinct nodes)
    positions: bool = True        # a position_ids input; False: positions are Range(past, total) from the shapes
    mask_input: bool = True       # an attention_mask input; False: the mask is causal from the shapes (no padding)
    broadcast_kv: bool = False    # kv_heads 1 read by the MatMuls as it is (broadcast over the heads, Falcon)
    lost_heads: bool = False      # CodeGen TorchScript: a wider projection viewed (B, S, 2, -1) by a computed
    #                               shape, Split on the last axis, one part viewed (B, S, -1, H): inference knows
    #                               neither the head count nor the KV head count


def build(v: Variant, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    hidden = 32
    n, kv, h = v.heads, v.kv_heads, v.head
    npdt = helper.tensor_dtype_to_np_dtype(v.dtype)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def const(arr, name=None) -> str:
        count[0] += 1
        name = name or f"c{count[0]}"
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(kind, *ins, **attrs) -> str:
        count[0] += 1
        out = f"{kind.lower()}{count[0]}"
        nodes.append(helper.make_node(kind, list(ins), [out], **attrs))
        return out

    def i64(*xs):
        return const(np.array(xs, dtype=np.int64))

    def scalar(x):
        return const(np.array(x, dtype=npdt))

    x, mask, pos = "x", "attention_mask", "position_ids"
    b = op("Gather", op("Shape", x), const(np.array(0, dtype=np.int64)), axis=0)
    s = op("Gather", op("Shape", x), const(np.array(1, dtype=np.int64)), axis=0)
    if v.mask_input:
        t = op("Gather", op("Shape", mask), const(np.array(1, dtype=np.int64)), axis=0)
    elif v.past:             # total = S + the cache's length
        t = op("Add", s, op("Gather", op("Shape", "past_key_values.0.key"), const(np.array(2, np.int64)), axis=0))
    else:
        t = s
    p = op("Sub", t, s)
    if not v.positions:      # the model numbers its tokens itself: past .. total - 1 (HF's cache_position)
        pos = op("Unsqueeze", op("Range", p, t, const(np.array(1, np.int64))), i64(0))

    def proj(width, heads, bnsh=True):
        w = const((rng.standard_normal((hidden, width)) * 0.2).astype(npdt))
        y = op("MatMul", x, w)
        shape = op("Concat", op("Unsqueeze", b, i64(0)), op("Unsqueeze", s, i64(0)), i64(heads, h), axis=0)
        if v.lost_heads:
            wide = op("MatMul", x, const((rng.standard_normal((hidden, 2 * width)) * 0.2).astype(npdt)))
            bs = op("Slice", op("Shape", wide), i64(0), i64(2))
            grouped = op("Reshape", wide, op("Concat", bs, i64(2, -1), axis=0))          # (B, S, 2, width)
            count[0] += 1
            y, rest = f"part{count[0]}", f"rest{count[0]}"
            nodes.append(helper.make_node("Split", [grouped, i64(width // 2, width // 2)], [y, rest], axis=-1))
            shape = op("Concat", bs, i64(-1, h), axis=0)
        y4 = op("Reshape", y, shape)
        return op("Transpose", y4, perm=[0, 2, 1, 3]) if bnsh else y4

    bsnh_rot = v.rotary and v.interleaved          # q and k stay BSNH until rotated
    q, k, val = proj(n * h, n, not bsnh_rot), proj(kv * h, kv, not bsnh_rot), proj(kv * h, kv)
    typed: list[onnx.ValueInfoProto] = []       # ONNX shape inference does not know ORT's norm: state its type
    if v.qk_norm:
        q, k = (op("SimplifiedLayerNormalization", z, const((1 + 0.1 * rng.standard_normal(h)).astype(npdt)),
                   axis=-1, epsilon=1e-6) for z in (q, k))
        typed += [helper.make_tensor_value_info(z, v.dtype, None) for z in (q, k)]
    if v.rotary and v.interleaved:     # cos/sin (B, S, 1, h) repeated pairwise; out[2i] = -x[2i+1], out[2i+1] = x[2i]
        inv = const((1.0 / (10000 ** (np.arange(0, h, 2) / h))).astype(np.float32))
        f = op("Unsqueeze", op("Mul", op("Cast", op("Unsqueeze", pos, i64(2)), to=TensorProto.FLOAT), inv), i64(-1))
        pairs = op("Concat", f, f, axis=-1)                                                   # (B, S, h/2, 2)
        emb = op("Reshape", pairs, i64(0, 0, 1, h))
        cos, sin = (op("Cast", op(kind, emb), to=v.dtype) for kind in ("Cos", "Sin"))

        def rot2(z):
            odd = op("Slice", z, i64(1), i64(2 ** 62), i64(-1), i64(2))
            even = op("Slice", z, i64(0), i64(2 ** 62), i64(-1), i64(2))
            stack = op("Concat", op("Unsqueeze", op("Neg", odd), i64(-1)), op("Unsqueeze", even, i64(-1)), axis=-1)
            flat = op("Reshape", stack, op("Shape", z))
            return op("Transpose", op("Add", op("Mul", z, cos), op("Mul", flat, sin)), perm=[0, 2, 1, 3])

        q, k = rot2(q), rot2(k)
    elif v.rotary:
        inv = const((1.0 / (10000 ** (np.arange(0, h, 2) / h))).astype(np.float32))
        if v.longrope:      # the long factors stretch the low frequencies; both scaled by an attention factor
            factors = np.linspace(1.0, 8.0, h // 2).astype(np.float32)
            long_inv = const((1.0 / (factors * 10000 ** (np.arange(0, h, 2) / h))).astype(np.float32))
            top = op("Add", op("ReduceMax", pos, keepdims=0), const(np.array(1, np.int64)))
            inv = op("Where", op("Greater", top, const(np.array(v.longrope, np.int64))), long_inv, inv)
        f = op("Mul", op("Cast", op("Unsqueeze", pos, i64(2)), to=TensorProto.FLOAT), inv)
        emb = op("Concat", f, f, axis=-1)
        cos, sin = op("Cos", emb), op("Sin", emb)
        if v.longrope:
            cos, sin = (op("Mul", t, const(np.array(1.19, np.float32))) for t in (cos, sin))
        cos_f, sin_f = cos, sin

        def tables():
            return (op("Unsqueeze", op("Cast", cos_f, to=v.dtype), i64(1)),
                    op("Unsqueeze", op("Cast", sin_f, to=v.dtype), i64(1)))
        cos, sin = tables()

        def rotate_half(z):
            if v.rotate == "split":
                lo, hi = f"{z}_lo", f"{z}_hi"
                nodes.append(helper.make_node("Split", [z, i64(h // 2, h // 2)], [lo, hi], axis=-1))
                return op("Concat", op("Neg", hi), lo, axis=-1)
            if v.rotate == "matmul":      # out[j] = -x[j + h/2] (j < h/2), x[j - h/2] (j >= h/2)
                r = np.zeros((h, h), npdt)
                r[np.arange(h // 2) + h // 2, np.arange(h // 2)] = -1
                r[np.arange(h // 2), np.arange(h // 2) + h // 2] = 1
                return op("MatMul", z, const(r))
            if v.rotate == "gather":
                perm = np.concatenate([np.arange(h // 2, h), np.arange(h // 2)]).astype(np.int64)
                signs = np.concatenate([-np.ones(h // 2), np.ones(h // 2)]).astype(npdt)
                return op("Mul", op("Gather", z, const(perm), axis=-1), const(signs))
            lo = op("Slice", z, i64(0), i64(h // 2), i64(-1))
            hi = op("Slice", z, i64(h // 2), i64(2 ** 62), i64(-1))
            return op("Concat", op("Neg", hi), lo, axis=-1)

        def rot(z):
            c, s_ = tables() if v.tables_per_use and z == k else (cos, sin)
            if v.rotary_f32:
                c32, s32 = op("Unsqueeze", cos_f, i64(1)), op("Unsqueeze", sin_f, i64(1))
                wide = op("Add", op("Mul", op("Cast", z, to=TensorProto.FLOAT), c32),
                          op("Mul", op("Cast", rotate_half(z), to=TensorProto.FLOAT), s32))
                return op("Cast", wide, to=v.dtype)
            return op("Add", op("Mul", z, c), op("Mul", rotate_half(z), s_))

        q, k = rot(q), rot(k)
    present_k, present_v = k, val
    if v.past:
        pk, pv = "past_key_values.0.key", "past_key_values.0.value"
        if v.past_fp16:
            pk, pv = op("Cast", pk, to=TensorProto.FLOAT), op("Cast", pv, to=TensorProto.FLOAT)
        present_k = op("Concat", pk, k, axis=-2)
        present_v = op("Concat", pv, val, axis=-2)
        nodes.append(helper.make_node("Identity", [present_k], ["present.0.key"]))
        nodes.append(helper.make_node("Identity", [present_v], ["present.0.value"]))

    def repeat(z):
        if n == kv or (v.broadcast_kv and kv == 1):
            return z
        shape5 = op("Concat", op("Unsqueeze", b, i64(0)), i64(kv, n // kv), op("Unsqueeze", t, i64(0)), i64(h), axis=0)
        shape4 = op("Concat", op("Unsqueeze", b, i64(0)), i64(n), op("Unsqueeze", t, i64(0)), i64(h), axis=0)
        return op("Reshape", op("Expand", op("Unsqueeze", z, i64(2)), shape5), shape4)

    kf, vf = repeat(present_k), repeat(present_v)
    if v.k_cast:
        q, kf = op("Cast", q, to=TensorProto.FLOAT), op("Cast", kf, to=TensorProto.FLOAT)
    if v.k_transpose == "perm":
        kt = op("Transpose", kf, perm=[0, 1, 3, 2])
    else:
        flat = op("Reshape", kf, op("Concat", i64(-1), op("Unsqueeze", t, i64(0)), i64(h), axis=0))
        tr = op("Transpose", flat, perm=[0, 2, 1])
        kt = op("Reshape", tr, op("Concat", op("Unsqueeze", b, i64(0)), i64(n, h), op("Unsqueeze", t, i64(0)),
                                  axis=0))
    scale = 1.0 / np.sqrt(h)
    if v.scale_on == "qk":
        q, kt = op("Mul", q, scalar(np.sqrt(scale))), op("Mul", kt, scalar(np.sqrt(scale)))
        scores = op("MatMul", q, kt)
    elif v.scale_on == "after_mask":
        scores = op("MatMul", q, kt)
    elif v.scale_on == "q":
        scores = op("MatMul", op("Mul", q, scalar(scale)), kt)
    else:
        scores = op("Div", op("MatMul", q, kt), const(np.array(np.sqrt(h), np.float32 if v.k_cast else npdt)))
    if v.softcap:
        scores = op("Mul", op("Tanh", op("Div", scores, scalar(v.softcap))), scalar(v.softcap))
    # mask: keys j <= past + i, inside the window, not padded
    zero, one = const(np.array(0, dtype=np.int64)), const(np.array(1, dtype=np.int64))
    qi = op("Unsqueeze", op("Add", op("Range", zero, s, one), p), i64(1))            # (S, 1)
    kj = op("Unsqueeze", op("Range", zero, t, one), i64(0))                          # (1, T)
    keep = op("LessOrEqual", kj, qi) if not v.noncausal else op("LessOrEqual", kj, op("Add", qi, t))
    if v.window:
        keep = op("And", keep, op("Greater", kj, op("Sub", qi, i64(v.window))))
    keep = op("Unsqueeze", keep, i64(0, 1))                                           # (1, 1, S, T)
    if v.mask_input:
        padm = op("Unsqueeze", op("Cast", mask, to=TensorProto.BOOL), i64(1, 2))       # (B, 1, 1, T)
        keep = padm if v.pad_only else op("And", keep, padm)                          # (B, 1, S, T)
    sdt = np.float32 if v.upcast or v.k_cast else npdt     # the type scores, mask and softmax are computed in
    if v.upcast:
        scores, vf = op("Cast", scores, to=TensorProto.FLOAT), op("Cast", vf, to=TensorProto.FLOAT)
    lowest = float(np.finfo(sdt).min)
    if v.mask_form == "add":
        bias = op("Where", keep, const(np.array(v.bias_value, sdt)), const(np.array(lowest, sdt)))
        logits = op("Add", scores, bias)
        if v.scale_on == "after_mask":
            logits = op("Div", logits, const(np.array(np.sqrt(h), sdt)))
    else:
        logits = op("Where", keep, scores, const(np.array(lowest, sdt)))
    probs = op("Softmax", logits, axis=-1)
    if v.nan_guard:
        probs = op("Where", op("IsNaN", probs), const(np.array(0.0, sdt)), probs)
    if v.k_cast:
        probs = op("Cast", probs, to=v.dtype)
    o = op("Transpose", op("MatMul", probs, vf), perm=[0, 2, 1, 3])
    o = op("Reshape", o, op("Concat", op("Unsqueeze", b, i64(0)), op("Unsqueeze", s, i64(0)), i64(n * h), axis=0))
    if v.upcast:
        o = op("Cast", o, to=v.dtype)
    wo = const((rng.standard_normal((n * h, hidden)) * 0.2).astype(npdt))
    nodes.append(helper.make_node("MatMul", [o, wo], ["out"]))

    bd, sd, td, pd = ("batch", "seq", "total", "past") if v.static is None else \
        (v.static[0], v.static[1], v.static[1] + v.static[2], v.static[2])
    inputs = [helper.make_tensor_value_info("x", v.dtype, [bd, sd, hidden])]
    if v.mask_input:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [bd, td]))
    if v.positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [bd, sd]))
    outputs = [helper.make_tensor_value_info("out", v.dtype, [bd, sd, hidden])]
    if v.past:
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{kind}",
                                                        TensorProto.FLOAT16 if v.past_fp16 else v.dtype,
                                                        [bd, kv, pd, h]))
            outputs.append(helper.make_tensor_value_info(f"present.0.{kind}", v.dtype, [bd, kv, td, h]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits, value_info=typed)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", v.opset)], ir_version=10)
