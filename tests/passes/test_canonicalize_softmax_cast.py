"""canonicalize-softmax-cast: a float32 softmax over float16 scores (TorchScript float16 BERT at opset 14, layer 0)
-> the float16 attention core with one Cast after its output's layout ops; then fused."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import assert_unchanged_by, assert_valid, parse, parse_proto, run_ort, run_passes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

N, H = 4, 8
D = N * H
PREP = ["infer-shapes", "fold-constants", "remove-noops", "eliminate-dead"]
F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def encoder(dtype="float16", fill="-inf", guard=True, restate=True, v_cast=True, seed=0):
    """BERT self-attention as TorchScript writes it in float16 at opset 14: float16 projections and scores, the
    scores cast to float32 and a float32 padding mask added (Where(keep, 0, fill), or (1 - m) * fill with fill
    "add"), the softmax (and its NaN guard) in float32, P @ Cast(V, float32), the output (a view re-stated from its
    own shape with `restate`) back to (B, S, D) and a float32 output projection. `dtype="float"`: all float32."""
    rng = np.random.default_rng(seed)
    npd = np.float16 if dtype == "float16" else np.float32
    inits = {f"w{p}": (rng.standard_normal((D, D)) * 0.3).astype(npd) for p in "qkv"}
    inits.update({f"b{p}": (rng.standard_normal(D) * 0.1).astype(npd) for p in "qkv"})
    inits.update(wo=(rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), m1=np.array([-1], np.int64),
                 i0=np.array([0], np.int64), i1=np.array([1], np.int64), i2=np.array([2], np.int64),
                 i4=np.array([4], np.int64), hs=np.array([0, 0, N, H], np.int64),
                 os=np.array([0, 0, D], np.int64), ax12=np.array([1, 2], np.int64),
                 c=np.array(H ** -0.25, npd), zero=np.array([0.0], np.float32), one=np.array(1.0, np.float32),
                 fill=np.array([{"-inf": -np.inf, "min": np.finfo(np.float32).min, "add": -1e4}[fill]], np.float32))
    lines = []
    for p in "qkv":
        lines += [f"{p}0 = MatMul(x, w{p})", f"{p} = Add({p}0, b{p})", f"{p}r = Reshape({p}, hs)"]
    lines += ["qh = Transpose <perm = [0, 2, 1, 3]> (qr)", "kt = Transpose <perm = [0, 2, 3, 1]> (kr)",
              "vh = Transpose <perm = [0, 2, 1, 3]> (vr)", "qs = Mul(qh, c)", "ks = Mul(kt, c)", "sc = MatMul(qs, ks)",
              "sc32 = Cast <to = 1> (sc)" if dtype == "float16" else "sc32 = Identity(sc)",
              "mu = Unsqueeze(mask, ax12)"]
    if fill == "add":
        lines += ["mf = Cast <to = 1> (mu)", "inv = Sub(one, mf)", "madd = Mul(inv, fill)"]
    else:
        lines += ["mb = Cast <to = 9> (mu)", "madd = Where(mb, zero, fill)"]
    lines += ["lg = Add(sc32, madd)", "p = Softmax <axis = -1> (lg)"]
    lines += ["isn = IsNaN(p)", "pg = Where(isn, zero, p)"] if guard else ["pg = Identity(p)"]
    if v_cast:
        lines += ["v32 = Cast <to = 1> (vh)" if dtype == "float16" else "v32 = Identity(vh)", "o = MatMul(pg, v32)"]
    else:       # P cast back to float16 for P @ V: not this form
        lines += ["p16 = Cast <to = 10> (pg)", "o16 = MatMul(p16, vh)", "o = Cast <to = 1> (o16)"]
    if restate:     # view(B, -1, S, H) of o, its dims read from o's shape
        lines += ["osh = Shape(o)", "ob = Slice(osh, i0, i1)", "osl = Slice(osh, i2, i4)",
                  "ort = Concat <axis = 0> (ob, m1, osl)", "orv = Reshape(o, ort)"]
    else:
        lines += ["orv = Identity(o)"]
    lines += ["ot = Transpose <perm = [0, 2, 1, 3]> (orv)", "of = Reshape(ot, os)", "y = MatMul(of, wo)"]
    body = "\n      ".join(lines)
    text = f"""
    g ({dtype}[B, S, {D}] x, int64[B, S] mask) => (float[B, S, {D}] y) {{
      {body}
    }}"""
    return text, inits


def feeds(batch=2, seq=5, seed=0, pad=2, dtype=np.float16):
    rng = np.random.default_rng(seed)
    m = np.ones((batch, seq), np.int64)
    if batch > 1:
        m[-1, seq - pad:] = 0
    return {"x": rng.standard_normal((batch, seq, D)).astype(dtype), "mask": m}


def assert_same(before, after, dtype=np.float16):
    """Equal within two float16 roundings (the rewrite rounds P and P @ V to float16: 2e-3, relative and absolute,
    on a unit-gain output projection), or float32's tolerance where the graph is float32; padded rows left out."""
    for b, s in ((2, 5), (3, 4), (1, 7)):
        f = feeds(b, s, pad=1, dtype=dtype)
        want, got = run_ort(before, f)[0], run_ort(after, f)[0]
        assert np.isfinite(got).all()
        if b > 1:
            want[-1, -1:] = got[-1, -1:] = 0
        tol = 2e-3 if dtype == np.float16 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def canonical(text, inits, prep=tuple(PREP)):
    """The pass after `prep`, then the cleanup. Shape inference alone keeps the re-stated view of the output (the
    cleanup proves it a no-op on this small graph; in the export, inference lost the dims it would need)."""
    model = parse(text, inits)
    run_passes(model, prep)
    counts = run_passes(model, ["canonicalize-softmax-cast", *PREP[1:]])
    return model, counts


def test_canonicalize_softmax_cast_computes_the_core_in_float16():
    text, inits = encoder()
    model, counts = canonical(text, inits, prep=("infer-shapes",))
    assert counts["softmax-in-scores-type"] == 1 and counts["attention-cast-shape"] == 1, counts
    assert counts["attention-cast-below-reshape"] == 2 and counts["attention-cast-below-transpose"] == 1, counts
    sm = next(n for n in model.graph if n.op_type == "Softmax")
    assert sm.inputs[0].dtype == F16 and sm.outputs[0].dtype == F16
    pv = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None
              and n.inputs[1].producer().op_type == "Transpose")
    assert [i.dtype for i in pv.inputs] == [F16, F16]       # V read as it is, not cast up
    casts = [n for n in model.graph if n.op_type == "Cast" and n.attributes["to"].value == int(F32)]
    # the mask's own Cast to float, and the one after the output's layout ops, before the float32 projection
    out_cast = next(n for n in casts if n.inputs[0].producer().op_type == "Reshape")
    assert [u.op_type for u, _ in out_cast.outputs[0].uses()] == ["MatMul"]
    assert_valid(model)
    assert_same(parse(text, inits), model)
    assert_unchanged_by(model, "canonicalize-softmax-cast")


@pytest.mark.parametrize("kw", [dict(dtype="float"), dict(v_cast=False)], ids=["float32", "p-cast-back"])
def test_canonicalize_softmax_cast_refuses_other_forms(kw):
    text, inits = encoder(**kw)
    model, counts = canonical(text, inits)
    assert "softmax-in-scores-type" not in counts and "attention-cast-below-reshape" not in counts, counts


@pytest.mark.parametrize("level,target", [(2, "cpu"), (3, "cuda")])
def test_canonicalize_softmax_cast_lets_the_encoder_fuse(level, target):
    text, inits = encoder()
    result = onnxc.compile(parse_proto(text, inits), level=level, target=target)
    fused = Counter(n.op_type for n in result.model.graph.node)
    assert fused["Attention"] == 1 and "Softmax" not in fused, fused
    assert result.report["coverage"]["attention"] == {"found": 1, "fused": 1, "misses": []}
    assert_same(parse(text, inits), ir.serde.deserialize_model(result.model))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from(["float16", "float"]), fill=st.sampled_from(["-inf", "min", "add"]),
       guard=st.booleans(), restate=st.booleans(), seed=st.integers(0, 50))
def test_canonicalize_softmax_cast_property(dtype, fill, guard, restate, seed):
    """Every variant stays equal within float16's tolerance (float32's where nothing fires), the result verifies,
    a second run changes nothing, and the core is rewritten exactly when scores and V are float16."""
    guard = guard or fill == "-inf"         # a -inf mask without the guard gives NaN rows in the original
    text, inits = encoder(dtype=dtype, fill=fill, guard=guard, restate=restate, seed=seed)
    model, counts = canonical(text, inits)
    assert counts.get("softmax-in-scores-type", 0) == (dtype == "float16"), counts
    assert_valid(model)
    assert_same(parse(text, inits), model, np.float16 if dtype == "float16" else np.float32)
    assert_unchanged_by(model, "canonicalize-softmax-cast")
