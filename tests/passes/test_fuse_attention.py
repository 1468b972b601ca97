"""fuse-attention: BERT/GPT-2 self-attention -> Attention / MultiHeadAttention; structure, refusals, numbers, fixtures.

Masks are 0/1 with padding (the fused graph is equivalent for attention masks, not for arbitrary integers), so the
numeric checks feed their own inputs instead of helpers.random_feeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxc
import pytest
from helpers import assert_unchanged_by, assert_valid, canonical, counting, parse, run_ort, run_passes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnxc.passes import canonicalize_attention_key as cak
from onnxc.passes import fuse_attention as fa
from onnxc import masks
from onnxc.coverage import Refusal
from onnxc.shapes import dims_of
from onnxc.pipeline import CLEANUP, O1
from onnxc.rules import explain
from onnxc.verify import Scenario, make_inputs

N, H = 4, 8
D = N * H
HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "models"
CLEAN = ("fold-constants", "remove-noops", "eliminate-dead")
KEY = counting("canonicalize-attention-key", before=("infer-shapes", *CLEAN))
ATTENTION = counting("fuse-attention", after=CLEAN)


def FUSE(model: ir.Model) -> dict[str, int]:
    """The key brought to canonical form, then fused: both passes' counts."""
    return {**KEY(model), **ATTENTION(model)}
NP = {"float": np.float32, "float16": np.float16}
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2}  # fp16: the original rounds every step to fp16


# ------------------------------------------------------------------------------------------------ graph builders
def _weights(dtype, rng, *names_shapes) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) / np.sqrt(s[0] if len(s) == 2 else 10)).astype(dtype) for n, s in names_shapes}


def bert(dtype="float", dims=("B", "S"), scale="scores_div", mask="add", kt="bsnh", bias_first=False,
         nan_guard=False, extra=None, hidden_value=-10000.0, softmax_axis=-1, seed=0, rel_bias=None):
    """BERT-style self-attention: separate q/k/v MatMul+Add, padding mask, (B, S, D) -> (B, S, D)."""
    t, npd = dtype, NP[dtype]
    rng = np.random.default_rng(seed)
    inits = _weights(npd, rng, ("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("bq", (D,)), ("bk", (D,)),
                     ("bv", (D,)))
    inits.update(hs=np.array([0, 0, N, H], np.int64), os=np.array([0, 0, D], np.int64),
                 ax12=np.array([1, 2], np.int64), one=np.array(1, npd), hid=np.array(hidden_value, npd))
    b, s = dims
    lines = []
    for p in "qkv":
        lines.append(f"{p}0 = MatMul(x, w{p})")
        lines.append(f"{p} = Add(b{p}, {p}0)" if bias_first else f"{p} = Add({p}0, b{p})")
        lines.append(f"{p}r = Reshape({p}, hs)")
    lines += ["qh = Transpose <perm = [0, 2, 1, 3]> (qr)", "vh = Transpose <perm = [0, 2, 1, 3]> (vr)"]
    if kt == "bsnh":
        lines.append("kt = Transpose <perm = [0, 2, 3, 1]> (kr)")
    else:
        lines += ["kh = Transpose <perm = [0, 2, 1, 3]> (kr)", "kt = Transpose <perm = [0, 1, 3, 2]> (kh)"]
    q, k = "qh", "kt"
    c = 1.0 / np.sqrt(H)
    if scale == "scores_div":
        inits["c"] = np.array(np.sqrt(H), npd)
        lines += [f"sc0 = MatMul({q}, {k})", "sc = Div(sc0, c)"]
    elif scale == "scores_mul":
        inits["c"] = np.array(c, npd)
        lines += [f"sc0 = MatMul({q}, {k})", "sc = Mul(c, sc0)"]
    elif scale == "both":
        inits["c"] = np.array(np.sqrt(c), npd)
        lines += ["qs = Mul(qh, c)", "ks = Mul(kt, c)", "sc = MatMul(qs, ks)"]
    elif scale == "q_div":
        inits["c"] = np.array(np.sqrt(H), npd)
        lines += ["qs = Div(qh, c)", "sc = MatMul(qs, kt)"]
    elif scale == "k_mul":
        inits["c"] = np.array(c, npd)
        lines += ["ks = Mul(kt, c)", "sc = MatMul(qh, ks)"]
    elif scale == "custom":
        inits["c"] = np.array(0.1, npd)
        lines += [f"sc0 = MatMul({q}, {k})", "sc = Mul(sc0, c)"]
    elif scale == "input":
        lines += [f"sc0 = MatMul({q}, {k})", "sc = Div(sc0, cin)"]
    if rel_bias:    # MPNet/T5-style: a bias table gathered by clipped |i - j| (from Shape(x) alone, or, with
        # "data", from the mask's values: not a position bias), (1, N, S, S), added to the scaled scores
        inits.update(rtab=rng.standard_normal((4, N)).astype(npd), i0=np.array(0, np.int64),
                     i1=np.array(1, np.int64), ax0=np.array([0], np.int64), ax1=np.array([1], np.int64),
                     mx=np.array(3, np.int64))
        src = "mask" if rel_bias == "data" else "x"
        lines += [f"rsx = Shape({src})", "rsl = Gather <axis = 0> (rsx, i1)", "rpos = Range(i0, rsl, i1)"]
        if rel_bias == "data":
            lines += ["rm = ReduceMax <keepdims = 0> (mask)", "rpos1 = Add(rpos, rm)"]
        else:
            lines += ["rpos1 = Identity(rpos)"]
        lines += ["rpa = Unsqueeze(rpos1, ax0)", "rpb = Unsqueeze(rpos, ax1)", "rrel = Sub(rpa, rpb)",
                  "rab = Abs(rrel)", "rcl = Min(rab, mx)", "rg = Gather <axis = 0> (rtab, rcl)",
                  "rt = Transpose <perm = [2, 0, 1]> (rg)", "rb = Unsqueeze(rt, ax0)"]
        lines += ["scr = Identity(sc)"] if rel_bias.startswith("folded") else ["scr = Add(sc, rb)"]
        lines = [ln.replace("m = Add(sc, madd)", "m = Add(scr, madd)") for ln in lines]
        sc_name = "scr"
    else:
        sc_name = "sc"
    if mask == "add":      # (1 - mask) * large_negative, broadcast (B, 1, 1, S)
        lines += ["mu = Unsqueeze(mask, ax12)", f"mf = Cast <to = {1 if t == 'float' else 10}> (mu)",
                  "inv = Sub(one, mf)", "madd = Mul(inv, hid)"]
        if rel_bias == "folded":     # T5: the mask folded into the position bias once, the sum added to the scores
            lines += ["comb = Add(rb, madd)", f"m = Add({sc_name}, comb)"]
        elif rel_bias == "folded_expand":   # ... expanded to (B, N, S, S) by a computed shape: dims inference loses
            inits.update(nh=np.array([N], np.int64), e0=np.array([0], np.int64), e1=np.array([1], np.int64),
                         e2=np.array([2], np.int64))
            lines += ["comb0 = Add(rb, madd)", "esh = Shape(mask)", "eb = Slice(esh, e0, e1)", "es = Slice(esh, e1, e2)",
                      "e4 = Concat <axis = 0> (eb, nh, es, es)", "comb = Expand(comb0, e4)", f"m = Add({sc_name}, comb)"]
        else:
            lines.append(f"m = Add({sc_name}, madd)")
    elif mask == "where":  # Where(mask, scores, -inf)
        inits["hid"] = np.array(-np.inf, npd)
        lines += ["mu = Unsqueeze(mask, ax12)", "mb = Cast <to = 9> (mu)", f"m = Where(mb, {sc_name}, hid)"]
    else:
        lines.append(f"m = Identity({sc_name})")
    lines.append(f"p = Softmax <axis = {softmax_axis}> (m)")
    if nan_guard:
        inits["zero"] = np.array(0, npd)
        lines += ["isn = IsNaN(p)", "pg = Where(isn, zero, p)"]
    else:
        lines.append("pg = Identity(p)")
    lines += ["o = MatMul(pg, vh)", "ot = Transpose <perm = [0, 2, 1, 3]> (o)", "y = Reshape(ot, os)"]
    outs = [f"{t}[{b}, {s}, {D}] y"]
    if extra == "x":
        lines.append("z = Relu(x)")
        outs.append(f"{t}[{b}, {s}, {D}] z")
    elif extra == "softmax":
        lines.append("z = Relu(pg)")
        outs.append(f"{t}[{b}, {N}, {s}, {s}] z")
    ins = [f"{t}[{b}, {s}, {D}] x", f"int64[{b}, {s}] mask"] + ([f"{t} cin"] if scale == "input" else [])
    text = f"{HEADER}\ng ({', '.join(ins)}) => ({', '.join(outs)}) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, inits


def gpt2(dtype="float", past=False, dims=("B", "S"), dynamo_kt=False, split_sizes=(D, D, D), gemm=False, seed=1,
         query_op=None, legacy_mask=False):
    """GPT-2-style causal self-attention: packed QKV, Split, Where(causal & padding, scores, -inf), NaN guard.

    legacy_mask: transformers 4's form, Where(causal slice of a constant buffer, scores, -10000) + (1 - mask) * min,
    the slice sized by the key's own shape (so the key has a Shape user outside the attention).
    """
    t, npd = dtype, NP[dtype]
    rng = np.random.default_rng(seed)
    inits = _weights(npd, rng, ("w", (D, 3 * D)), ("bias", (3 * D,)))
    inits.update(hs=np.array([0, 0, N, H], np.int64), os=np.array([0, 0, D], np.int64),
                 split=np.array(split_sizes, np.int64), c=np.array(1 / np.sqrt(np.sqrt(H)), npd),
                 ninf=np.array(-np.inf, npd), zero=np.array(0, npd), i0=np.array(0, np.int64),
                 i1=np.array(1, np.int64), i2=np.array(2, np.int64), a0=np.array([0], np.int64),
                 a1=np.array([1], np.int64), a01=np.array([0, 1], np.int64), a12=np.array([1, 2], np.int64),
                 flat=np.array([-1, D], np.int64), kt1=np.array([-1, 0, H], np.int64))
    b, s = dims
    if gemm:
        lines = ["x2 = Reshape(x, flat)", "g = Gemm(x2, w, bias)", "sh3 = Shape(x)", "bs = Slice(sh3, i0v, i2v)",
                 "qkvs = Concat <axis = 0> (bs, d3)", "qkv = Reshape(g, qkvs)"]
        inits.update(i0v=np.array([0], np.int64), i2v=np.array([2], np.int64), d3=np.array([3 * D], np.int64))
    else:
        lines = ["qkv0 = MatMul(x, w)", "qkv = Add(qkv0, bias)"]
    lines += ["q, k, v = Split <axis = 2> (qkv, split)"]
    qin = "q"
    if query_op == "scaled":   # a transform the fusion must not look through
        lines.append("qx = Mul(q, c)")
        qin = "qx"
    lines += [f"qr = Reshape({qin}, hs)", "kr = Reshape(k, hs)", "vr = Reshape(v, hs)",
              "qh = Transpose <perm = [0, 2, 1, 3]> (qr)", "kh = Transpose <perm = [0, 2, 1, 3]> (kr)",
              "vh = Transpose <perm = [0, 2, 1, 3]> (vr)"]
    if past:
        lines += ["key = Concat <axis = -2> (past_k, kh)", "value = Concat <axis = -2> (past_v, vh)",
                  "psh = Shape(past_k)", "plen = Gather <axis = 0> (psh, i2)"]
    else:
        lines += ["key = Identity(kh)", "value = Identity(vh)", "plen = Identity(i0)"]
    if dynamo_kt:
        lines += ["ksh = Shape(key)", "tl = Slice(ksh, m2, m1)", "bn = Slice(ksh, a0, m2)",
                  "r1 = Concat <axis = 0> (m1, tl, hh)", "k3 = Reshape(key, r1)",
                  "k3t = Transpose <perm = [0, 2, 1]> (k3)", "r2 = Concat <axis = 0> (bn, hh, tl)",
                  "kt = Reshape(k3t, r2)"]
        inits.update(m1=np.array([-1], np.int64), m2=np.array([-2], np.int64), hh=np.array([H], np.int64))
    else:
        lines.append("kt = Transpose <perm = [0, 1, 3, 2]> (key)")
    lines += ["qs = Mul(qh, c)", "ks = Mul(kt, c)", "sc = MatMul(qs, ks)",
              # causal: key j <= past + i, and the padding lookup, as in HF's sdpa mask
              "xsh = Shape(x)", "slen = Gather <axis = 0> (xsh, i1)", "tlen = Add(plen, slen)",
              "ri0 = Range(i0, slen, i1)", "ri = Add(ri0, plen)", "rj = Range(i0, tlen, i1)",
              "ric = Unsqueeze(ri, a1)", "rjr = Unsqueeze(rj, a0)", "causal = LessOrEqual(rjr, ric)",
              "c4 = Unsqueeze(causal, a01)", "mb = Cast <to = 9> (mask)", "pad = Unsqueeze(mb, a12)"]
    if legacy_mask:
        inits.update(buf=np.tril(np.ones((1, 1, 64, 64), bool)), fill=np.array(-10000.0, npd),
                     lowest=np.array(np.finfo(npd).min, npd), onef=np.array(1, npd), a23=np.array([2, 3], np.int64))
        lines += ["ksh2 = Shape(key)", "klen = Gather <axis = 0> (ksh2, i2)",   # key.size(-2), as transformers 4
                  "st0 = Sub(klen, slen)", "st0u = Unsqueeze(st0, a0)", "tlu = Unsqueeze(klen, a0)",
                  "starts = Concat <axis = 0> (st0u, a0)", "ends = Concat <axis = 0> (tlu, tlu)",
                  "cslice = Slice(buf, starts, ends, a23)", "wc = Where(cslice, sc, fill)",
                  f"mf = Cast <to = {1 if t == 'float' else 10}> (pad)", "inv = Sub(onef, mf)",
                  "madd = Mul(inv, lowest)", "m = Add(wc, madd)"]
    else:
        lines += ["cond = And(c4, pad)", "m = Where(cond, sc, ninf)"]
    lines += ["p = Softmax <axis = -1> (m)",
              "isn = IsNaN(p)", "pg = Where(isn, zero, p)", "o = MatMul(pg, value)",
              "ot = Transpose <perm = [0, 2, 1, 3]> (o)", "y = Reshape(ot, os)"]
    tot = "T" if past else s
    ins = [f"{t}[{b}, {s}, {D}] x", f"int64[{b}, {tot}] mask"]
    outs = [f"{t}[{b}, {s}, {D}] y"]
    if past:
        ins += [f"{t}[{b}, {N}, P, {H}] past_k", f"{t}[{b}, {N}, P, {H}] past_v"]
        outs += [f"{t}[{b}, {N}, T, {H}] present_k", f"{t}[{b}, {N}, T, {H}] present_v"]
        lines += ["present_k = Identity(key)", "present_v = Identity(value)"]
    text = f"{HEADER}\ng ({', '.join(ins)}) => ({', '.join(outs)}) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, inits


# ------------------------------------------------------------------------------------------------ numbers
def padded_feeds(model: ir.Model, batch=3, seq=6, past=0, seed=0) -> dict[str, np.ndarray]:
    """Inputs with an attention mask of ones except trailing zeros in row 1 (and row 2 when seq > 2)."""
    feeds = make_inputs(model, Scenario("test", batch, seq, past), seed)
    mask = next(k for k in feeds if "mask" in k)
    m = np.ones_like(feeds[mask])
    m[1, -2:] = 0
    if seq > 2 and batch > 2:
        m[2, past + seq // 2:] = 0
    feeds[mask] = m
    return feeds


def assert_fused_matches(before: ir.Model, after: ir.Model, *, past=0, seq=6, batch=3, seeds=(0, 1)) -> None:
    """Same outputs on padded batches at every non-padded query position (present outputs: everywhere)."""
    for seed in seeds:
        feeds = padded_feeds(before, batch, seq, past, seed)
        mask = next(v for k, v in feeds.items() if "mask" in k)
        valid = mask[:, past:].astype(bool)
        want = run_ort(before, feeds)
        got = run_ort(after, feeds)
        for v, e, a in zip(before.graph.outputs, want, got):
            assert a.dtype == e.dtype and a.shape == e.shape, v.name
            if a.ndim == 3 and a.shape[:2] == valid.shape:
                e, a = e[valid], a[valid]
            tol = TOL[e.dtype]
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol,
                                       atol=tol * float(np.abs(e.astype(np.float64)).max()), err_msg=v.name)


def fuse(text: str, inits: dict) -> tuple[ir.Model, ir.Model, dict[str, int]]:
    before = parse(text, inits)
    run_passes(before, ["infer-shapes"])
    after = parse(text, inits)
    counts = FUSE(after)
    assert_valid(after, before)
    return before, after, counts


def ops(model: ir.Model) -> list[str]:
    return sorted(n.op_type for n in model.graph)


def refused(model: ir.Model, rule) -> list[str]:
    run_passes(model, ["infer-shapes", *CLEAN])
    return [r for _, r in explain(model, rule)]


# ------------------------------------------------------------------------------------------------ before / after
def test_fuse_attention_bert_additive_mask_to_packed_attention():
    text, inits = bert()
    before, after, counts = fuse(text, inits)
    assert counts == {"fuse-attention": 1, "fuse-attention-output": 1}
    packed = {"W": np.concatenate([inits["wq"], inits["wk"], inits["wv"]], 1),
              "b": np.concatenate([inits["bq"], inits["bk"], inits["bv"]])}
    want = parse(f"""{HEADER}
    g (float[B, S, {D}] x, int64[B, S] mask) => (float[B, S, {D}] y) {{
      mi = Cast <to = 6> (mask)
      y = com.microsoft.Attention <num_heads = {N}> (x, W, b, mi)
    }}""", packed)
    assert canonical(after) == canonical(want)
    assert_fused_matches(before, after)
    assert_unchanged_by(after, "fuse-attention")


def test_fuse_attention_gpt2_causal_where_to_unidirectional_attention():
    text, inits = gpt2()
    before, after, counts = fuse(text, inits)
    assert counts == {"fuse-attention-packed": 1, "fuse-attention-output": 1}
    want = parse(f"""{HEADER}
    g (float[B, S, {D}] x, int64[B, S] mask) => (float[B, S, {D}] y) {{
      mi = Cast <to = 6> (mask)
      y = com.microsoft.Attention <num_heads = {N}, unidirectional = 1> (x, w, bias, mi)
    }}""", {"w": inits["w"], "bias": inits["bias"]})
    assert canonical(after) == canonical(want)
    assert_fused_matches(before, after)


def test_fuse_attention_gpt2_past_to_multi_head_attention_with_presents():
    text, inits = gpt2(past=True)
    before, after, counts = fuse(text, inits)
    assert counts == {"fuse-attention-past": 1, "fuse-attention-output": 1}
    want = parse(f"""{HEADER}
    g (float[B, S, {D}] x, int64[B, T] mask, float[B, {N}, P, {H}] past_k, float[B, {N}, P, {H}] past_v)
      => (float[B, S, {D}] y, float[B, {N}, T, {H}] present_k, float[B, {N}, T, {H}] present_v) {{
      qkv0 = MatMul(x, w)
      qkv = Add(qkv0, bias)
      q, k, v = Split <axis = 2> (qkv, split)
      mi = Cast <to = 6> (mask)
      y, present_k, present_v = com.microsoft.MultiHeadAttention <num_heads = {N}, unidirectional = 1>
                                  (q, k, v, , mi, , past_k, past_v)
    }}""", {k: inits[k] for k in ("w", "bias", "split")})
    assert canonical(after) == canonical(want)
    for past in (3, 1):
        assert_fused_matches(before, after, past=past, seq=4)
    assert_fused_matches(before, after, past=5, seq=1, batch=2)   # decode


@pytest.mark.parametrize("past", [False, True])
def test_fuse_attention_legacy_causal_buffer_plus_additive_padding(past):
    text, inits = gpt2(past=past, legacy_mask=True)
    before, after, counts = fuse(text, inits)
    assert counts["fuse-attention-past" if past else "fuse-attention-packed"] == 1
    if past:  # Shape(present) sizes the causal slice; without past the cleanup already reads S from Shape(x)
        assert counts["attention-key-shape"] == 1
    node = next(n for n in after.graph if n.domain == "com.microsoft")
    assert node.attributes["unidirectional"].as_int() == 1 and "mask_filter_value" not in node.attributes
    assert_fused_matches(before, after, past=3 * past, seq=4)


@pytest.mark.parametrize("past", [False, True])
def test_fuse_attention_dynamo_key_transpose_is_normalized_first(past):
    text, inits = gpt2(past=past, dynamo_kt=True)
    before, after, counts = fuse(text, inits)
    assert counts["attention-key-transpose"] == 1
    assert counts["fuse-attention-past" if past else "fuse-attention-packed"] == 1
    assert ops(after) == (["Add", "Cast", "MatMul", "MultiHeadAttention", "Split"] if past else ["Attention", "Cast"])
    assert_fused_matches(before, after, past=2 * past, seq=4)


def test_fuse_attention_gemm_projection_with_reshapes():
    text, inits = gpt2(gemm=True)
    before, after, counts = fuse(text, inits)
    assert counts["fuse-attention-packed"] == 1
    assert ops(after) == ["Attention", "Cast"]
    assert_fused_matches(before, after)


@pytest.mark.parametrize("scale, want", [("scores_div", None), ("scores_mul", None), ("both", None),
                                         ("q_div", None), ("k_mul", None), ("custom", 0.1)])
def test_fuse_attention_scale_forms(scale, want):
    text, inits = bert(scale=scale)
    before, after, _ = fuse(text, inits)
    node = next(n for n in after.graph if n.op_type == "Attention")
    got = node.attributes.get("scale")
    assert (got is None) if want is None else got.as_float() == pytest.approx(want, rel=1e-6)
    assert_fused_matches(before, after)


@pytest.mark.parametrize("hidden, mfv", [(-10000.0, None), (float(np.finfo(np.float32).min), np.finfo(np.float32).min),
                                         (-1e9, -1e9)])
def test_fuse_attention_keeps_a_finite_hidden_value_as_mask_filter_value(hidden, mfv):
    before, after, _ = fuse(*bert(hidden_value=hidden))
    node = next(n for n in after.graph if n.op_type == "Attention")
    got = node.attributes.get("mask_filter_value")
    assert (got is None) if mfv is None else got.as_float() == pytest.approx(float(mfv), rel=1e-6)
    assert_fused_matches(before, after)


def test_fuse_attention_fully_padded_row_matches_with_finite_fill():
    """An all-zero mask row: with a finite fill the original averages V uniformly, and so does the fused node."""
    before, after, _ = fuse(*bert(hidden_value=float(np.finfo(np.float32).min)))
    feeds = padded_feeds(before)
    feeds["mask"][0] = 0
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(before, feeds)[0], rtol=1e-5, atol=1e-5)


def test_fuse_attention_no_mask_and_nan_guard():
    before, after, counts = fuse(*bert(mask="none", nan_guard=True, kt="bnsh"))
    assert counts["fuse-attention"] == 1
    node = next(n for n in after.graph if n.op_type == "Attention")
    assert len([i for i in node.inputs if i is not None]) == 3
    assert_fused_matches(before, after)


# ------------------------------------------------------------------------------------------------ refusals
def test_fuse_attention_rejects_position_bias():
    text, inits = bert(hidden_value=-3.0)   # a bias, not a mask (it reads the mask's data: no position bias either)
    rows = refused(parse(text, inits), fa.separate)
    assert any("values other than 0 and large negatives" in r for r in rows), rows


@pytest.mark.parametrize("mask", ["add", "where"])
def test_fuse_attention_takes_a_relative_position_bias(mask):
    """MPNet: softmax(scores / sqrt(H) + R + M) with R (1, N, S, S) gathered by relative position from shapes
    alone -> Attention with attention_bias = R (input 5)."""
    text, inits = bert(rel_bias="shape", mask=mask)
    before, after, counts = fuse(text, inits)
    assert counts.get("fuse-attention") == 1, counts
    att = next(n for n in after.graph if n.op_type == "Attention")
    assert len(att.inputs) > 5 and att.inputs[5] is not None and att.inputs[5].producer().op_type == "Unsqueeze"
    assert "Softmax" not in ops(after)
    assert_fused_matches(before, after)
    assert_unchanged_by(after, "fuse-attention")


def test_fuse_attention_takes_a_bias_with_the_mask_folded_in():
    """T5: position bias + padding mask summed once, the sum added to the (unscaled) scores: no mask the analysis
    recognizes, so the whole sum becomes attention_bias (no mask_index)."""
    text, inits = bert(rel_bias="folded")
    before, after, counts = fuse(text, inits)
    assert counts.get("fuse-attention") == 1, counts
    att = next(n for n in after.graph if n.op_type == "Attention")
    assert att.inputs[3] is None and att.inputs[5].producer().op_type == "Add"
    assert_fused_matches(before, after)


def test_fuse_attention_proves_a_bias_fits_the_scores_by_evaluation():
    """TorchScript's T5: the folded bias is expanded by a shape computed from the mask, so inference leaves its dims
    unknown; evaluated on probe inputs it is (B, N, S, S), the scores' shape, and it becomes attention_bias."""
    text, inits = bert(rel_bias="folded_expand")
    before, after, counts = fuse(text, inits)
    assert counts.get("fuse-attention") == 1, counts
    att = next(n for n in after.graph if n.op_type == "Attention")
    assert att.inputs[3] is None and att.inputs[5].producer().op_type == "Expand"
    assert_fused_matches(before, after)


def test_fuse_attention_refuses_a_bias_that_does_not_fit_the_scores():
    # the padding term expanded to (B, N, 1, S) only: it broadcasts onto the scores, but attention_bias must give
    # every query row, so the probe's shape refuses it
    text, inits = bert(rel_bias="folded_expand")
    text = text.replace("e4 = Concat <axis = 0> (eb, nh, es, es)", "e4 = Concat <axis = 0> (eb, nh, e1, es)")
    text = text.replace("comb0 = Add(rb, madd)", "comb0 = Mul(madd, hid)")
    model = parse(text, inits)
    run_passes(model, ["infer-shapes", *CLEAN])
    add = next(n for n in model.graph if n.op_type == "Softmax").inputs[0].producer()
    with pytest.raises(Refusal, match=r"has shape \(2, 4, 1, 5\) where the scores are \(2, 4, 5, 5\)"):
        masks.probe_bias_fits(model.graph, add.inputs[1], add.inputs[0], False)
    assert not run_passes(model, ["fuse-attention"]).get("fuse-attention")


def test_fuse_attention_refuses_a_score_bias_that_reads_input_data():
    # positions offset by max(mask): the bias reads the mask's data, so it is no position bias; as a mask it is
    # refused for the mask analysis' reason
    model = parse(*bert(rel_bias="data"))
    rows = refused(model, fa.separate)
    assert any("check: mask" in r for r in rows), rows
    assert not run_passes(model, ["fuse-attention"]).get("fuse-attention")


def test_fuse_attention_rejects_wrong_softmax_axis():
    rows = refused(parse(*bert(softmax_axis=2)), fa.separate)
    assert any("softmax axis 2" in r for r in rows), rows


def test_fuse_attention_rejects_non_constant_scale():
    rows = refused(parse(*bert(scale="input")), fa.separate)
    assert any("scale factor 's_div' is not a finite nonzero scalar constant" in r for r in rows), rows


def test_fuse_attention_rejects_softmax_with_outside_users():
    model = parse(*bert(extra="softmax"))
    rows = refused(model, fa.separate)
    assert any("has outside users" in r for r in rows), rows
    assert not run_passes(model, ["fuse-attention"])


def test_fuse_attention_rejects_unequal_split():
    rows = refused(parse(*gpt2(split_sizes=(D + H, D - H, D))), fa.packed)
    assert any("does not divide" in r or "Split sizes" in r for r in rows), rows


def test_fuse_attention_rejects_query_that_is_not_a_projection():
    rows = refused(parse(*gpt2(past=True, query_op="scaled")), fa.past)
    assert any("query is not a linear projection" in r for r in rows), rows


def test_fuse_attention_rejects_mask_reading_two_inputs():
    text, inits = bert()
    text = text.replace("int64[B, S] mask)", "int64[B, S] mask, int64[B, S] mask2)")
    text = text.replace("madd = Mul(inv, hid)", "madd0 = Mul(inv, hid)\n  m2 = Cast <to = 1> (mask2)\n"
                        "  madd = Mul(madd0, m2)")
    rows = refused(parse(text, inits), fa.separate)
    assert any("reads the data of several graph inputs" in r for r in rows), rows


def test_fuse_attention_takes_a_3d_mask_as_attention_bias():
    """A per-query mask (B, S, S) is no key-padding mask_index ("is not 2-D"), but its additive form (B, 1, S, S)
    adds exactly the same values as attention_bias."""
    text, inits = bert()
    text = text.replace("int64[B, S] mask", "int64[B, S, S] mask").replace("mu = Unsqueeze(mask, ax12)",
                                                                         "mu = Unsqueeze(mask, a1)")
    inits["a1"] = np.array([1], np.int64)
    model = parse(text, inits)
    run_passes(model, ["infer-shapes"])
    before, after, counts = fuse(text, inits)
    assert counts.get("fuse-attention") == 1, counts
    att = next(n for n in after.graph if n.op_type == "Attention")
    assert att.inputs[3] is None and att.inputs[5] is not None
    assert_fused_matches(before, after)


def test_fuse_attention_refuses_rotary_and_grouped_kv_heads():
    """A rotated query (Mul/Add with cos/sin) and repeated KV heads (Expand) do not match; nothing changes."""
    text, inits = gpt2()
    text = text.replace("qs = Mul(qh, c)", "qc = Mul(qh, cos)\n  qsn = Mul(qh, sin)\n  qrot = Add(qc, qsn)\n"
                        "  qs = Mul(qrot, c)")
    inits.update(cos=np.ones((1, 1, 1, H), np.float32), sin=np.zeros((1, 1, 1, H), np.float32))
    rows = refused(parse(text, inits), fa.packed)
    assert all("found Add" in r or "expected" in r for r in rows) and rows, rows
    text, inits = gpt2()
    text = text.replace("kt = Transpose <perm = [0, 1, 3, 2]> (key)",
                        "ku = Unsqueeze(key, a2)\n  ke = Expand(ku, rep)\n  kg = Reshape(ke, kgs)\n"
                        "  kt = Transpose <perm = [0, 1, 3, 2]> (kg)")
    inits.update(a2=np.array([2], np.int64), rep=np.array([1, 1, 1, 1, 1], np.int64),
                 kgs=np.array([0, N, -1, H], np.int64))
    model = parse(text, inits)
    rows = refused(model, fa.packed)
    assert rows and all("matched" != r for r in rows), rows
    assert not run_passes(model, ["fuse-attention"])


def test_fuse_attention_key_transpose_needs_an_attention_consumer():
    text = f"""{HEADER}
    g (float[B, {N}, S, {H}] key) => (float[B, {N}, {H}, S] y) {{
      ksh = Shape(key)
      tl = Slice(ksh, m2, m1)
      bn = Slice(ksh, a0, m2)
      r1 = Concat <axis = 0> (m1, tl, hh)
      k3 = Reshape(key, r1)
      k3t = Transpose <perm = [0, 2, 1]> (k3)
      r2 = Concat <axis = 0> (bn, hh, tl)
      y = Reshape(k3t, r2)
    }}"""
    inits = {"m1": np.array([-1], np.int64), "m2": np.array([-2], np.int64), "a0": np.array([0], np.int64),
             "hh": np.array([H], np.int64)}
    model = parse(text, inits)
    run_passes(model, ["infer-shapes", "fold-constants"])
    rows = [r for _, r in explain(model, cak.key_transpose)]
    assert any("key is not a head split" in r for r in rows), rows


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(scale="scores_div", mask="add", kt="bsnh", bias_first=False, nan_guard=True, dtype="float", static=False,
         extra=None, rel_bias="folded")
@given(scale=st.sampled_from(["scores_div", "scores_mul", "both", "q_div", "k_mul", "custom"]),
       mask=st.sampled_from(["add", "where", "none"]), kt=st.sampled_from(["bsnh", "bnsh"]),
       bias_first=st.booleans(), nan_guard=st.booleans(), dtype=st.sampled_from(["float", "float16"]),
       static=st.booleans(), extra=st.sampled_from([None, "x", "softmax"]),
       rel_bias=st.sampled_from([None, None, "shape", "folded", "folded_expand"]))
def test_fuse_attention_property(scale, mask, kt, bias_first, nan_guard, dtype, static, extra, rel_bias):
    text, inits = bert(dtype=dtype, dims=(3, 6) if static else ("B", "S"), scale=scale, mask=mask, kt=kt,
                       bias_first=bias_first, nan_guard=nan_guard, extra=extra, rel_bias=rel_bias)
    before, after, counts = fuse(text, inits)
    # a folded bias (the position bias summed with the additive mask) is taken whole only without the SDPA NaN
    # guard (a fully masked row would differ); with a Where mask or none, "folded" leaves no bias at all
    fires = extra != "softmax" and not (rel_bias in ("folded", "folded_expand") and mask == "add" and nan_guard)
    assert counts.get("fuse-attention", 0) == int(fires), counts
    assert ("Softmax" in ops(after)) != fires
    assert_fused_matches(before, after)
    assert_unchanged_by(after, "fuse-attention")


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(past=st.booleans(), dynamo_kt=st.booleans(), gemm=st.booleans(), dtype=st.sampled_from(["float", "float16"]),
       static=st.booleans(), legacy_mask=st.booleans())
def test_fuse_attention_gpt2_property(past, dynamo_kt, gemm, dtype, static, legacy_mask):
    dims = (3, 4) if static else ("B", "S")
    text, inits = gpt2(dtype=dtype, past=past, dynamo_kt=dynamo_kt, gemm=gemm, dims=dims, legacy_mask=legacy_mask)
    if static and past:
        text = text.replace("P,", "2,").replace("T]", "6]").replace("T,", "6,")
    before, after, counts = fuse(text, inits)
    assert counts.get("fuse-attention-past" if past else "fuse-attention-packed") == 1, counts
    assert "Softmax" not in ops(after)
    assert_fused_matches(before, after, past=2 if past else 0, seq=4)
    assert_unchanged_by(after, "fuse-attention")


# ------------------------------------------------------------------------------------------------ fixtures
FIXTURE_CASES = {
    "bert_ts": ("Attention", {"fuse-attention": 2}),
    "bert_dynamo": ("Attention", {"fuse-attention": 2, "attention-key-transpose": 2}),
    "gpt2_ts": ("Attention", {"fuse-attention-packed": 2}),
    "gpt2_dynamo": ("Attention", {"fuse-attention-packed": 2, "attention-key-transpose": 2}),
    "gpt2_ts_past": ("MultiHeadAttention", {"fuse-attention-past": 2}),
    "gpt2_dynamo_past": ("MultiHeadAttention", {"fuse-attention-past": 2, "attention-key-transpose": 2}),
}


@pytest.fixture(scope="module")
def fused_fixture():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = onnxc.compile(FIXTURES / f"{name}.onnx", 2, "cpu",
                                        passes=f"{O1},canonicalize-attention-key,fuse-attention,{CLEANUP}")
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(FIXTURE_CASES))
def test_fuse_attention_fixture_fires_and_verifies(name, fused_fixture):
    op, want = FIXTURE_CASES[name]
    result = fused_fixture(name)
    report = result.report
    assert report["verification"]["status"] == "passed", report["verification"]
    counts = {k: v for p in report["passes"] if p["name"] in ("canonicalize-attention-key", "fuse-attention")
              for k, v in p["counts"].items()}
    assert {k: counts.get(k) for k in want} == want, counts
    after = report["ops_after"]
    assert after.get(f"com.microsoft.{op}") == 2 and "Softmax" not in after and "Transpose" not in after, after


@pytest.mark.parametrize("name", sorted(FIXTURE_CASES))
def test_fuse_attention_fixture_padded_batch(name, fused_fixture):
    before = ir.load(FIXTURES / f"{name}.onnx")
    after = ir.serde.deserialize_model(fused_fixture(name).model)
    if "past" in name:
        assert_fused_matches(before, after, past=3, seq=4, seeds=(0,))
        assert_fused_matches(before, after, past=6, seq=1, batch=2, seeds=(0,))
    else:
        assert_fused_matches(before, after, seq=7, seeds=(0,))


@pytest.mark.parametrize("name", ["llama_ts", "llama_dynamo_past", "phi3_ts", "gemma_dynamo"])
def test_fuse_attention_leaves_rotary_gqa_models_alone(name):
    model = ir.load(FIXTURES / f"{name}.onnx")
    run_passes(model, ["infer-shapes", *CLEAN])
    result = run_passes(model, ["fuse-attention"])
    assert result == {}


@pytest.mark.parametrize("name, dims", [("bert_ts", {"batch_size": 1, "sequence_length": 7}),
                                        ("gpt2_dynamo_past", {"batch_size": 2, "sequence_length": 5,
                                                              "past_sequence_length": 3, "total_sequence_length": 8})])
def test_fuse_attention_fixture_with_static_dims(name, dims):
    proto = onnx.load(FIXTURES / f"{name}.onnx")
    for v in [*proto.graph.input, *proto.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                d.dim_value = dims[d.dim_param]
    result = onnxc.compile(proto, 2, "cpu", passes=f"{O1},canonicalize-attention-key,fuse-attention,{CLEANUP}")
    assert result.report["verification"]["status"] == "passed"
    ops_after = result.report["ops_after"]
    assert "Softmax" not in ops_after
    assert ops_after.get("com.microsoft.Attention", 0) + ops_after.get("com.microsoft.MultiHeadAttention", 0) == 2
