"""canonicalize-merged-heads: attention computed with batch and heads merged (B*N, S, T) -> per-head 4-D, then
fused (BLOOM's ALiBi, DeBERTa's scaled K^T)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_unchanged_by, assert_valid, parse, run_ort, run_passes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxc.pipeline import CLEANUP, O1
from onnxc import pass_manager as pm

N, H = 4, 8
D = N * H
PREP = ["infer-shapes", "fold-constants", "remove-noops", "eliminate-dead"]


def merged(alibi=True, mask="add", k_scale=False, swap_k=False, seed=0, ts=False, rel=False, sum_view=False,
           scale_of="head"):
    """x (B, S, D) -> q/k/v heads (B, N, S, H) -> merged (B*N, S, H) products; ALiBi (B*N, 1, T) added to the
    scaled scores, the padding mask added (or Where) in 4-D, Softmax, merged P @ V, split back, (B, S, D).

    DeBERTa's TorchScript form: `ts` views q/k/v as (B, S, N, -1) (inference loses the head size) and divides K^T by
    sqrt(3 * H) computed from the view's shape (`scale_of="seq"`: from the sequence length instead, not a constant);
    `rel` adds its content-to-position term GatherElements(Q @ Tile(P)^T, clip(i - j + k)) / sqrt(3 * H), (B*N, S,
    S), to the scores; `sum_view` reads the 4-D view's last two dims from the shape of the merged sum."""
    rng = np.random.default_rng(seed)
    inits = {f"w{p}": (rng.standard_normal((D, D)) * 0.3).astype(np.float32) for p in "qkv"}
    inits.update(hs=np.array([0, 0, N, H], np.int64), os=np.array([0, 0, D], np.int64), m1=np.array([-1], np.int64),
                 one1=np.array([1], np.int64), i0=np.array([0], np.int64), i1=np.array([1], np.int64),
                 i2=np.array([2], np.int64), i4=np.array([4], np.int64), ax12=np.array([1, 2], np.int64),
                 c=np.array(1 / np.sqrt(H), np.float32), sq=np.array(np.sqrt(np.sqrt(H)), np.float32),
                 one=np.array(1.0, np.float32), neg=np.array(-1e4, np.float32),
                 slopes=(2.0 ** -np.arange(1, N + 1)).reshape(1, N, 1, 1).astype(np.float32),
                 big=np.array([2 ** 62], np.int64), m2=np.array([-2], np.int64), nn=np.array([N], np.int64))
    if ts:
        inits.update(hs=np.array([0, 0, N, -1], np.int64), three=np.array(3.0, np.float32),
                     z0=np.array(0, np.int64), o0=np.array(1, np.int64), kk=np.array(3, np.int64),
                     hi=np.array(5, np.int64), pos=(rng.standard_normal((N, 6, H)) * 0.3).astype(np.float32))
    lines = []
    if ts:          # view(B, S, N, -1) from the input's shape: no dim but N is known to inference
        lines += ["hxs = Shape(x)", "hbs = Slice(hxs, i0, i2)", "hst = Concat <axis = 0> (hbs, nn, m1)"]
    for p in "qkv":
        lines += [f"{p}0 = MatMul(x, w{p})", f"{p}r = Reshape({p}0, {'hst' if ts else 'hs'})", f"{p}4 = Transpose <perm = [0, 2, 1, 3]> ({p}r)",
                  f"{p}sh = Shape({p}4)", f"{p}tl = Slice({p}sh, i2, i4)", f"{p}t3 = Concat <axis = 0> (m1, {p}tl)"]
    lines += ["q3 = Reshape(q4, qt3)"]
    if swap_k:    # heads and batch swapped before the merge: rows no longer pair with Q's
        lines += ["ksw = Transpose <perm = [1, 0, 2, 3]> (k4)", "k3 = Reshape(ksw, kt3)"]
    else:
        lines += ["k3 = Reshape(k4, kt3)"]
    lines += ["kt = Transpose <perm = [0, 2, 1]> (k3)"]
    if ts:          # DeBERTa TorchScript: K^T / sqrt(3 * H), H read from Q's view (inference lost it)
        dim = "qrs = Shape(qr)\n      hd = Slice(qrs, m1, big)" if scale_of == "head" else \
            "qrs = Shape(x)\n      hd = Slice(qrs, i1, i2)"
        lines += [dim, "hq = Squeeze(hd, i0)", "hf = Cast <to = 1> (hq)", "h3 = Mul(hf, three)", "sqs = Sqrt(h3)",
                  "kts = Div(kt, sqs)", "sc3 = MatMul(q3, kts)"]
    elif k_scale:   # DeBERTa: MatMul(Q, K^T / s) with s = sqrt(H) split... here the whole scale on K^T
        lines += ["kts = Div(kt, sq)", "qs = Div(q3, sq)", "sc3 = MatMul(qs, kts)"]
    else:
        lines += ["s0 = MatMul(q3, kt)", "sc3 = Mul(s0, c)"]
    if rel:         # c2p = GatherElements(Q @ Tile(P, (B, 1, 1))^T, clip(i - j + 3, 0, 5)) / sqrt(3 * H)
        lines += ["rxs = Shape(x)", "rsl = Slice(rxs, i1, i2)", "rs0 = Squeeze(rsl, i0)", "rr = Range(z0, rs0, o0)",
                  "ra = Unsqueeze(rr, i1)", "rb = Unsqueeze(rr, i0)", "rd = Sub(ra, rb)", "rdk = Add(rd, kk)",
                  "ridx = Clip(rdk, z0, hi)", "ridx3 = Unsqueeze(ridx, i0)", "q3sh = Shape(q3)",
                  "bn1 = Slice(q3sh, i0, i1)", "it3 = Concat <axis = 0> (bn1, rsl, rsl)", "idx3 = Expand(ridx3, it3)",
                  "tb = Div(bn1, nn)", "trep = Concat <axis = 0> (tb, one1, one1)", "pt = Tile(pos, trep)",
                  "ptt = Transpose <perm = [0, 2, 1]> (pt)", "c2p = MatMul(q3, ptt)",
                  "g = GatherElements <axis = -1> (c2p, idx3)", "rel3 = Div(g, sqs)", "base = Add(sc3, rel3)"]
    else:
        lines += ["base = Identity(sc3)"]
    lines += ["mf = Cast <to = 1> (mask)", "mu = Unsqueeze(mf, ax12)"]          # (B, 1, 1, T)
    if alibi:
        lines += ["al4 = Mul(slopes, mu)", "msh = Shape(mask)", "tlen = Slice(msh, i1, i2)",
                  "at3 = Concat <axis = 0> (m1, one1, tlen)", "al3 = Reshape(al4, at3)", "z3 = Add(base, al3)"]
    else:
        lines += ["z3 = Identity(base)"]
    lines += ["xsh = Shape(x)", "slen = Slice(xsh, i1, i2)", "msh2 = Shape(mask)", "tl2 = Slice(msh2, i1, i2)",
              "bn = Slice(qsh, i0, i2)"]
    if sum_view:    # TorchScript: view(-1, N, sum.size(-2), sum.size(-1))
        lines += ["zsh = Shape(z3)", "zs = Slice(zsh, m2, m1)", "zt = Slice(zsh, m1, big)",
                  "s4t = Concat <axis = 0> (m1, nn, zs, zt)", "s4 = Reshape(z3, s4t)"]
    else:
        lines += ["s4t = Concat <axis = 0> (bn, slen, tl2)", "s4 = Reshape(z3, s4t)"]
    if mask == "add":
        lines += ["inv = Sub(one, mu)", "madd = Mul(inv, neg)", "lg = Add(s4, madd)"]
    else:
        lines += ["mb = Cast <to = 9> (mu)", "lg = Where(mb, s4, neg)"]
    lines += ["p = Softmax <axis = -1> (lg)", "pt3 = Concat <axis = 0> (m1, slen, tl2)", "p3 = Reshape(p, pt3)", "v3 = Reshape(v4, vt3)",
              "o3 = MatMul(p3, v3)", "hh = Slice(hs, i2, i4)", "hl = Slice(hh, i1, i2)", "o4t = Concat <axis = 0> (bn, slen, hl)",
              "o4 = Reshape(o3, o4t)", "ot = Transpose <perm = [0, 2, 1, 3]> (o4)", "y = Reshape(ot, os)"]
    body = "\n      ".join(lines)
    text = f"""
    g (float[B, S, {D}] x, int64[B, S] mask) => (float[B, S, {D}] y) {{
      {body}
    }}"""
    return text, inits


def feeds(batch=2, seq=5, seed=0, pad=2):
    rng = np.random.default_rng(seed)
    m = np.ones((batch, seq), np.int64)
    m[-1, seq - pad:] = 0
    return {"x": rng.standard_normal((batch, seq, D)).astype(np.float32), "mask": m}


def assert_same(before, after):
    for b, s in ((2, 5), (3, 4), (1, 7)):
        f = feeds(b, s, pad=1 if b > 1 else 0)
        want, got = run_ort(before, f), run_ort(after, f)
        for w, g in zip(want, got):
            w, g = w.copy(), g.copy()
            if b > 1:
                w[-1, -1:] = g[-1, -1:] = 0         # padded rows are unspecified in fused attention
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def canonical(text, inits):
    model = parse(text, inits)
    run_passes(model, PREP)
    counts = run_passes(model, ["canonicalize-merged-heads", *PREP[1:]])
    return model, counts


def test_merged_heads_products_become_4d():
    text, inits = merged()
    model, counts = canonical(text, inits)
    assert counts["merged-heads-bmm"] == 2 and counts["merged-heads-split"] >= 1 and counts["merged-heads-unmerge"] >= 1
    mms = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is None]
    assert len(mms) == 2 and all(len(n.outputs[0].shape or ()) == 4 for n in mms), [n.outputs[0].shape for n in mms]
    sm = next(n for n in model.graph if n.op_type == "Softmax")
    assert [u.op_type for u, _ in sm.outputs[0].uses()] == ["MatMul"]
    assert_valid(model)
    assert_same(parse(text, inits), model)
    assert_unchanged_by(model, "canonicalize-merged-heads")


def test_merged_heads_refuses_a_key_whose_batch_and_heads_are_swapped():
    text, inits = merged(swap_k=True)
    model, counts = canonical(text, inits)
    assert counts.get("merged-heads-bmm", 0) == 1          # P @ V only; Q @ K^T pairs other rows
    assert_same(parse(text, inits), model)


def test_merged_heads_ts_deberta_core_becomes_4d():
    """DeBERTa's TorchScript form: the K^T scale sqrt(3 * H) is computed from a view whose head size inference lost
    (proved constant by evaluation), and the 4-D view of scores + relative term reads the sum's shape."""
    text, inits = merged(alibi=False, mask="where", ts=True, rel=True, sum_view=True)
    before = parse(text, inits)
    run_passes(before, PREP)
    assert ops(before)["Sqrt"] == 1         # not folded: the head size is not known to inference
    model, counts = canonical(text, inits)
    assert counts["merged-heads-bmm"] == 2 and counts["merged-heads-sum-shape"] >= 1, counts
    assert counts["merged-heads-split"] >= 1 and counts["merged-heads-unmerge"] >= 1, counts
    sm = next(n for n in model.graph if n.op_type == "Softmax")
    assert [u.op_type for u, _ in sm.outputs[0].uses()] == ["MatMul"]
    qk = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None
              and n.inputs[1].producer().op_type == "Div")
    scale = qk.inputs[1].producer().inputs[1]           # K^T / c with c = sqrt(3 * H), now a constant
    assert scale.const_value is not None and np.isclose(float(scale.const_value.numpy()), np.sqrt(3 * H))
    assert len(qk.outputs[0].shape or ()) == 4
    assert_valid(model)
    assert_same(parse(text, inits), model)
    assert_unchanged_by(model, "canonicalize-merged-heads")


def test_merged_heads_refuses_a_scale_that_depends_on_the_length():
    text, inits = merged(alibi=False, mask="where", ts=True, rel=True, sum_view=True, scale_of="seq")
    model, counts = canonical(text, inits)
    assert counts.get("merged-heads-bmm", 0) == 1          # P @ V only: sqrt(3 * S) differs with the length
    assert ops(model)["Sqrt"] == 1
    assert_same(parse(text, inits), model)


def _fuse(model):
    ctx = pm.PassContext(level=2, target="cpu")
    for p in pm.flatten(pm.parse_pipeline(f"{O1},canonicalize-merged-heads,canonicalize-attention-key,fuse-attention,"
                                          f"fuse-gqa,fuse-mha,{CLEANUP}")):
        model = p.run(model, ctx).model
    return model, ctx


@pytest.mark.parametrize("mask", ["add", "where"])
def test_merged_heads_ts_deberta_fuses_to_multi_head_attention(mask):
    text, inits = merged(alibi=False, mask=mask, ts=True, rel=True, sum_view=True)
    model, ctx = _fuse(parse(text, inits))
    fused = ops(model)
    assert fused["MultiHeadAttention"] == 1 and "Softmax" not in fused, (fused, ctx.notes)
    assert_valid(model)
    assert_same(parse(text, inits), model)


@pytest.mark.parametrize("alibi,mask,k_scale", [(True, "add", False), (True, "where", False), (False, "add", True)])
def test_merged_heads_attention_fuses_to_multi_head_attention(alibi, mask, k_scale):
    text, inits = merged(alibi=alibi, mask=mask, k_scale=k_scale)
    model = parse(text, inits)
    ctx = pm.PassContext(level=2, target="cpu")
    for p in pm.flatten(pm.parse_pipeline(f"{O1},canonicalize-merged-heads,canonicalize-attention-key,fuse-attention,"
                                          f"fuse-gqa,fuse-mha,{CLEANUP}")):
        model = p.run(model, ctx).model
    fused = ops(model)
    assert fused["MultiHeadAttention"] + fused["Attention"] == 1 and "Softmax" not in fused, (fused, ctx.notes)
    assert_valid(model)
    assert_same(parse(text, inits), model)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(alibi=st.booleans(), mask=st.sampled_from(["add", "where"]), k_scale=st.booleans(), seed=st.integers(0, 50),
       ts=st.booleans(), rel=st.booleans(), sum_view=st.booleans(), scale_of=st.sampled_from(["head", "seq"]))
def test_merged_heads_property(alibi, mask, k_scale, seed, ts, rel, sum_view, scale_of):
    """Every variant stays equal; Q @ K^T is rewritten exactly when its scale is a constant (or proved one)."""
    rel = rel and ts
    text, inits = merged(alibi=alibi and not rel, mask=mask, k_scale=k_scale, seed=seed, ts=ts, rel=rel,
                         sum_view=sum_view, scale_of=scale_of)
    model, counts = canonical(text, inits)
    assert counts.get("merged-heads-bmm") == (1 if ts and scale_of == "seq" else 2), counts
    assert_valid(model)
    assert_unchanged_by(model, "canonicalize-merged-heads")
    assert_same(parse(text, inits), model)
    assert isinstance(model, ir.Model)
