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


def merged(alibi=True, mask="add", k_scale=False, swap_k=False, seed=0):
    """x (B, S, D) -> q/k/v heads (B, N, S, H) -> merged (B*N, S, H) products; ALiBi (B*N, 1, T) added to the
    scaled scores, the padding mask added (or Where) in 4-D, Softmax, merged P @ V, split back, (B, S, D)."""
    rng = np.random.default_rng(seed)
    inits = {f"w{p}": (rng.standard_normal((D, D)) * 0.3).astype(np.float32) for p in "qkv"}
    inits.update(hs=np.array([0, 0, N, H], np.int64), os=np.array([0, 0, D], np.int64), m1=np.array([-1], np.int64),
                 one1=np.array([1], np.int64), i0=np.array([0], np.int64), i1=np.array([1], np.int64),
                 i2=np.array([2], np.int64), i4=np.array([4], np.int64), ax12=np.array([1, 2], np.int64),
                 c=np.array(1 / np.sqrt(H), np.float32), sq=np.array(np.sqrt(np.sqrt(H)), np.float32),
                 one=np.array(1.0, np.float32), neg=np.array(-1e4, np.float32),
                 slopes=(2.0 ** -np.arange(1, N + 1)).reshape(1, N, 1, 1).astype(np.float32))
    lines = []
    for p in "qkv":
        lines += [f"{p}0 = MatMul(x, w{p})", f"{p}r = Reshape({p}0, hs)", f"{p}4 = Transpose <perm = [0, 2, 1, 3]> ({p}r)",
                  f"{p}sh = Shape({p}4)", f"{p}tl = Slice({p}sh, i2, i4)", f"{p}t3 = Concat <axis = 0> (m1, {p}tl)"]
    lines += ["q3 = Reshape(q4, qt3)"]
    if swap_k:    # heads and batch swapped before the merge: rows no longer pair with Q's
        lines += ["ksw = Transpose <perm = [1, 0, 2, 3]> (k4)", "k3 = Reshape(ksw, kt3)"]
    else:
        lines += ["k3 = Reshape(k4, kt3)"]
    lines += ["kt = Transpose <perm = [0, 2, 1]> (k3)"]
    if k_scale:     # DeBERTa: MatMul(Q, K^T / s) with s = sqrt(H) split... here the whole scale on K^T
        lines += ["kts = Div(kt, sq)", "qs = Div(q3, sq)", "sc3 = MatMul(qs, kts)"]
    else:
        lines += ["s0 = MatMul(q3, kt)", "sc3 = Mul(s0, c)"]
    lines += ["mf = Cast <to = 1> (mask)", "mu = Unsqueeze(mf, ax12)"]          # (B, 1, 1, T)
    if alibi:
        lines += ["al4 = Mul(slopes, mu)", "msh = Shape(mask)", "tlen = Slice(msh, i1, i2)",
                  "at3 = Concat <axis = 0> (m1, one1, tlen)", "al3 = Reshape(al4, at3)", "z3 = Add(sc3, al3)"]
    else:
        lines += ["z3 = Identity(sc3)"]
    lines += ["xsh = Shape(x)", "slen = Slice(xsh, i1, i2)", "msh2 = Shape(mask)", "tl2 = Slice(msh2, i1, i2)",
              "bn = Slice(qsh, i0, i2)", "s4t = Concat <axis = 0> (bn, slen, tl2)", "s4 = Reshape(z3, s4t)"]
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
@given(alibi=st.booleans(), mask=st.sampled_from(["add", "where"]), k_scale=st.booleans(), seed=st.integers(0, 50))
def test_merged_heads_property(alibi, mask, k_scale, seed):
    text, inits = merged(alibi=alibi, mask=mask, k_scale=k_scale, seed=seed)
    model, counts = canonical(text, inits)
    assert counts.get("merged-heads-bmm") == 2
    assert_same(parse(text, inits), model)
    assert isinstance(model, ir.Model)
