"""expand-standard-ops: each expansion against onnxruntime's own kernels of the opset-23 standard ops."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc.pass_manager import PassContext, get_pass

from tests.helpers import (
    assert_close,
    assert_unchanged_by,
    assert_valid,
    canonical,
    op_types,
    parse,
    parse_proto,
    run_ort,
    run_pass,
)

H23 = '<ir_version: 10, opset_import: ["" : 23]>'
PASS = "expand-standard-ops"


def _run(text: str, inits: dict | None = None) -> tuple[ir.Model, dict[str, int], list[str]]:
    model = parse(H23 + "\n" + text, inits)
    run_pass(model, "infer-shapes")
    ctx = PassContext(level=2)
    counts = get_pass(PASS).run(model, ctx).counts
    return model, counts, ctx.notes


def _same(text: str, inits: dict | None, feeds: dict[str, np.ndarray], model: ir.Model, precision=None) -> None:
    expected = run_ort(parse_proto(H23 + "\n" + text, inits), feeds)
    actual = run_ort(model, feeds)
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        if a.dtype == np.float16 and "Attention" in text:
            # onnxruntime's fused float16 Attention keeps its scores and softmax in float32; the expansion rounds
            # each to float16, so they differ by several float16 units: compile's float16 tolerance (2e-2), halved
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=1e-2, atol=1e-2,
                                       err_msg=f"output {k}")
        else:
            assert_close(a, e, f"output {k}", precision)


# ---------------------------------------------------------------------------------------------------- RMSNormalization
RMS = """
g (float[B, S, 8] x, float[8] w) => (float[B, S, 8] y) {
    y = RMSNormalization<axis=-1, epsilon=1e-6>(x, w)
}
"""


def test_expand_standard_ops_rms_norm_to_simplified_layer_norm() -> None:
    model, counts, _ = _run(RMS)
    assert counts == {"expand-standard-ops/rms-norm": 1}
    want = parse(H23 + """
g (float[B, S, 8] x, float[8] w) => (float[B, S, 8] y) {
    y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6, stash_type=1>(x, w)
}""")
    assert canonical(model) == canonical(want)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "w": rng.standard_normal(8).astype(np.float32)}
    _same(RMS, None, feeds, model)
    assert_unchanged_by(model, PASS)


@pytest.mark.parametrize("dtype,axis", [("float16", -1), ("float", 1), ("float16", 1)])
def test_expand_standard_ops_rms_norm_primitive_chain(dtype: str, axis: int) -> None:
    """Several normalized axes (or a scale that is not 1-D) -> the spec's function body, exact in fp32/fp16."""
    w_shape = "[8]" if axis == -1 else "[S, 8]"
    text = f"""
g ({dtype}[2, 3, 8] x, {dtype}{w_shape.replace('S', '3')} w) => ({dtype}[2, 3, 8] y) {{
    y = RMSNormalization<axis={axis}, epsilon=1e-5>(x, w)
}}"""
    if axis == -1:   # fp16 with stash_type=0 is the primitive chain in fp16
        text = text.replace("epsilon=1e-5", "epsilon=1e-5, stash_type=0")
    model, counts, _ = _run(text)
    assert counts == {"expand-standard-ops/rms-norm": 1}
    assert "RMSNormalization" not in op_types(model) and "ReduceMean" in op_types(model)
    rng = np.random.default_rng(1)
    np_dt = np.float16 if dtype == "float16" else np.float32
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np_dt),
             "w": rng.standard_normal((8,) if axis == -1 else (3, 8)).astype(np_dt)}
    _same(text, None, feeds, model)


# ---------------------------------------------------------------------------------------------------- RotaryEmbedding
def _rotary_text(layout: str, rot: int, pos: bool, interleaved: int = 0) -> str:
    x = "float[B, 2, S, 8] x" if layout == "bnsh" else "float[B, S, 16] x"
    attrs = f"interleaved={interleaved}" + (f", rotary_embedding_dim={rot}" if rot != 8 else "") \
        + (", num_heads=2" if layout == "bsd" else "")
    tables = f"float[16, {rot // 2}] cos, float[16, {rot // 2}] sin, int64[B, S] pos" if pos \
        else f"float[B, S, {rot // 2}] cos, float[B, S, {rot // 2}] sin"
    args = "x, cos, sin, pos" if pos else "x, cos, sin"
    return f"""
g ({x}, {tables}) => ({x.rsplit(" ", 1)[0]} y) {{
    y = RotaryEmbedding<{attrs}>({args})
}}"""


def _rotary_feeds(layout: str, rot: int, pos: bool, b: int = 2, s: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, 2, s, 8) if layout == "bnsh" else (b, s, 16)).astype(np.float32)
    n = 16 if pos else None
    theta = rng.standard_normal((n, rot // 2) if pos else (b, s, rot // 2)).astype(np.float32)
    feeds = {"x": x, "cos": np.cos(theta), "sin": np.sin(theta)}
    if pos:
        feeds["pos"] = rng.integers(0, 16, size=(b, s)).astype(np.int64)
    return feeds


def test_expand_standard_ops_rotary_before_after() -> None:
    text = _rotary_text("bnsh", 8, False)
    model, counts, _ = _run(text)
    assert counts == {"expand-standard-ops/rotary": 1}
    want = parse(H23 + """
g (float[B, 2, S, 8] x, float[B, S, 4] cos, float[B, S, 4] sin) => (float[B, 2, S, 8] y) {
    ax = Constant<value=int64[1] {1}>()
    cc = Concat<axis=-1>(cos, cos)
    c = Unsqueeze(cc, ax)
    ax2 = Constant<value=int64[1] {1}>()
    ss = Concat<axis=-1>(sin, sin)
    s = Unsqueeze(ss, ax2)
    h4 = Constant<value=int64[1] {4}>()
    h8 = Constant<value=int64[1] {8}>()
    last = Constant<value=int64[1] {-1}>()
    hi = Slice(x, h4, h8, last)
    z = Constant<value=int64[1] {0}>()
    h4b = Constant<value=int64[1] {4}>()
    lastb = Constant<value=int64[1] {-1}>()
    lo = Slice(x, z, h4b, lastb)
    neg = Neg(hi)
    half = Concat<axis=-1>(neg, lo)
    xc = Mul(x, c)
    hs = Mul(half, s)
    y = Add(xc, hs)
}""")
    assert op_types(model) == [t for t in op_types(want) if t != "Constant"]
    _same(text, None, _rotary_feeds("bnsh", 8, False), model)
    assert_unchanged_by(model, PASS)


@pytest.mark.parametrize("layout,rot,pos", [("bnsh", 8, True), ("bnsh", 4, False), ("bsd", 8, False),
                                            ("bsd", 4, True)])
def test_expand_standard_ops_rotary_variants(layout: str, rot: int, pos: bool) -> None:
    text = _rotary_text(layout, rot, pos)
    model, counts, _ = _run(text)
    assert counts == {"expand-standard-ops/rotary": 1}, counts
    assert "RotaryEmbedding" not in op_types(model)
    assert_valid(model)
    _same(text, None, _rotary_feeds(layout, rot, pos), model)


def test_expand_standard_ops_rotary_refuses_interleaved() -> None:
    model, counts, notes = _run(_rotary_text("bnsh", 8, False, interleaved=1))
    assert counts == {} and op_types(model) == ["RotaryEmbedding"]
    assert any("interleaved rotary is not expanded" in n for n in notes), notes


def test_expand_standard_ops_rotary_shares_tables() -> None:
    """Q and K rotated by the same cos/sin read one expanded table pair (fuse-gqa requires the same values)."""
    text = """
g (float[B, 4, S, 8] q, float[B, 2, S, 8] k, float[B, S, 4] cos, float[B, S, 4] sin) => (float[B, 4, S, 8] yq,
                                                                                       float[B, 2, S, 8] yk) {
    yq = RotaryEmbedding(q, cos, sin)
    yk = RotaryEmbedding(k, cos, sin)
}"""
    model, counts, _ = _run(text)
    assert counts == {"expand-standard-ops/rotary": 2}
    assert op_types(model).count("Concat") == 2 + 2     # one doubled cos and sin, one rotate_half per input


# ---------------------------------------------------------------------------------------------------- Attention
def _attn_text(dt: str, nq: int, nkv: int, mask: str, causal: int, scale: float | None, past: bool,
               softcap: float = 0.0, three_d: bool = False, extra_out: bool = False) -> str:
    attrs = [f"is_causal={causal}"] + ([f"scale={scale}"] if scale is not None else []) \
        + ([f"softcap={softcap}"] if softcap else [])
    if three_d:
        attrs += [f"q_num_heads={nq}", f"kv_num_heads={nkv}"]
        q, k, v = f"{dt}[B, S, {nq * 8}] q", f"{dt}[B, S, {nkv * 8}] k", f"{dt}[B, S, {nkv * 8}] v"
        y = f"{dt}[B, S, {nq * 8}] y"
    else:
        q, k, v = f"{dt}[B, {nq}, S, 8] q", f"{dt}[B, {nkv}, S, 8] k", f"{dt}[B, {nkv}, S, 8] v"
        y = f"{dt}[B, {nq}, S, 8] y"
    ins = [q, k, v]
    args = ["q", "k", "v"]
    if mask != "none":
        ins.append(("bool" if mask == "bool" else dt) + "[B, 1, S, T] m")
        args.append("m")
    elif past:
        args.append("")
    outs, res = ["y"], [y]
    if past:
        ins += [f"{dt}[B, {nkv}, P, 8] pk", f"{dt}[B, {nkv}, P, 8] pv"]
        args += ["pk", "pv"]
        outs += ["pk2", "pv2"]
        res += [f"{dt}[B, {nkv}, T, 8] pk2", f"{dt}[B, {nkv}, T, 8] pv2"]
    if extra_out:
        outs += ["", "", "qk"] if not past else ["qk"]
        res += [f"{dt}[B, {nq}, S, T] qk"]
    return f"""
g ({", ".join(ins)}) => ({", ".join(res)}) {{
    {", ".join(outs)} = Attention<{", ".join(attrs)}>({", ".join(args)})
}}"""


def _attn_feeds(dt: str, nq: int, nkv: int, mask: str, past: bool, three_d: bool, b: int = 2, s: int = 3,
                p: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    np_dt = np.float16 if dt == "float16" else np.float32
    t = s + (p if past else 0)
    feeds = {}
    for name, n in (("q", nq), ("k", nkv), ("v", nkv)):
        shape = (b, s, n * 8) if three_d else (b, n, s, 8)
        feeds[name] = rng.standard_normal(shape).astype(np_dt)
    if mask == "bool":
        m = rng.random((b, 1, s, t)) > 0.3
        m[0, 0, 0, :] = False                               # a fully masked row: zero output
        feeds["m"] = m
    elif mask == "float":
        feeds["m"] = np.where(rng.random((b, 1, s, t)) > 0.3, rng.standard_normal((b, 1, s, t)), -np.inf
                              ).astype(np_dt)
    if past:
        feeds["pk"] = rng.standard_normal((b, nkv, p, 8)).astype(np_dt)
        feeds["pv"] = rng.standard_normal((b, nkv, p, 8)).astype(np_dt)
    return feeds


def test_expand_standard_ops_attention_before_after() -> None:
    """Bool mask, given scale: scores, Where(mask, ., -inf), Softmax, NaN guard, P @ V."""
    text = _attn_text("float", 2, 2, "bool", 0, 0.25, False)
    model, counts, _ = _run(text)
    assert counts == {"expand-standard-ops/attention": 1}
    want = parse(H23 + """
g (float[B, 2, S, 8] q, float[B, 2, S, 8] k, float[B, 2, S, 8] v, bool[B, 1, S, T] m) => (float[B, 2, S, 8] y) {
    kt = Transpose<perm=[0, 1, 3, 2]>(k)
    qk = MatMul(q, kt)
    s = Mul(qk, c)
    w = Where(m, s, neg)
    p = Softmax<axis=-1>(w)
    nan = IsNaN(p)
    g = Where(nan, zero, p)
    y = MatMul(g, v)
}""", {"c": np.array(0.25, np.float32), "neg": np.array(-np.inf, np.float32), "zero": np.array(0, np.float32)})
    assert canonical(model) == canonical(want)
    _same(text, None, _attn_feeds("float", 2, 2, "bool", False, False), model)
    assert_unchanged_by(model, PASS)


def test_expand_standard_ops_attention_softcap_and_3d() -> None:
    text = _attn_text("float", 4, 2, "float", 1, None, False, softcap=2.0, three_d=True)
    model, counts, _ = _run(text)
    assert counts == {"expand-standard-ops/attention": 1}
    assert "Tanh" in op_types(model) and "Attention" not in op_types(model)
    _same(text, None, _attn_feeds("float", 4, 2, "float", False, True), model)


def test_expand_standard_ops_attention_refuses_qk_output() -> None:
    model, counts, notes = _run(_attn_text("float", 2, 2, "none", 0, None, False, extra_out=True))
    assert counts == {} and op_types(model) == ["Attention"]
    assert any("qk_matmul_output is used" in n for n in notes), notes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dt=st.sampled_from(["float", "float16"]), heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
       mask=st.sampled_from(["none", "bool", "float"]), causal=st.integers(0, 1),
       scale=st.sampled_from([None, 0.3]), past=st.booleans(), three_d=st.booleans(),
       b=st.integers(1, 2), s=st.integers(1, 4))
def test_expand_standard_ops_attention_property(dt, heads, mask, causal, scale, past, three_d, b, s) -> None:
    nq, nkv = heads
    text = _attn_text(dt, nq, nkv, mask, causal, scale, past, three_d=three_d)
    model, counts, notes = _run(text)
    assert counts == {"expand-standard-ops/attention": 1}, notes
    assert "Attention" not in op_types(model)
    assert_valid(model)
    if nq != nkv:
        assert "Expand" in op_types(model)
    _same(text, None, _attn_feeds(dt, nq, nkv, mask, past, three_d, b, s), model,
          precision=np.float16 if dt == "float16" else None)
    assert_unchanged_by(model, PASS)
