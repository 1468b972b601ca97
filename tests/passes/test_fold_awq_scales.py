"""fold-awq-scales: the fold's structure (norm weight divided, weight rows scaled, MatMulNBits after quantize-int4),
the folded float graph equal to the original, refusals with their reasons, a property over random norm -> linear
graphs, and the scale search never worse than no scaling."""
from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import assert_valid, parse, session, to_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc import awq
from onnxc.errors import UsageError
from onnxc.passes import fold_awq_scales as fa
from onnxc.passes import quantize_int4 as qi

HDR = '<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>'


def w(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def activations(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Inputs with a few outlier channels, as language models have (what AWQ's scales are for)."""
    x = w(rows, k, seed=seed)
    x[:, ::7] *= 20
    return x


def calibration(tmp_path, **arrays) -> str:
    path = tmp_path / "calibration.npz"
    np.savez(path, **arrays)
    return str(path)


def fold(model: ir.Model, tmp_path, cal: str, **options) -> tuple[onnxc.PassResult, onnxc.PassContext]:
    ctx = onnxc.PassContext(options={"quantize": "int4:awq", "calibration": cal, "scratch_dir": str(tmp_path),
                                     **options})
    return fa.FoldAwqScales().run(model, ctx), ctx


def outputs(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return session(to_bytes(model)).run(None, feeds)


def const(node: ir.Node, i: int) -> np.ndarray:
    return np.asarray(node.inputs[i].const_value.numpy())


NORM_QKV = HDR + """
g (float[N, 64] x) => (float[N, 32] q, float[N, 16] k, float[N, 16] v) {
  y = LayerNormalization <axis = -1> (x, G, B)
  q = MatMul(y, Wq)
  k = MatMul(y, Wk)
  v = Gemm <transB = 1, alpha = 0.5> (y, Wvt)
}"""


def norm_qkv():
    return {"G": w(64, seed=1) + 2, "B": w(64, seed=2), "Wq": w(64, 32, seed=3), "Wk": w(64, 16, seed=4),
            "Wvt": w(16, 64, seed=5)}


# ------------------------------------------------------------------------------------------------ structure
def test_fold_awq_scales_structure_norm_divided_rows_scaled_one_scale_per_input(tmp_path):
    inits = norm_qkv()
    model = parse(NORM_QKV, inits)
    x = activations(512, 64)
    result, ctx = fold(model, tmp_path, calibration(tmp_path, x=x))
    assert result.counts == {"LayerNormalization": 1}
    assert_valid(model)
    (done,) = ctx.results["fold-awq-scales"]["folded"]
    assert done["alpha"] > 0 and done["error_ratio"] < 1 and done["weights"] == ["Wq", "Wk", "Wvt"]
    nodes = {n.op_type: n for n in model.graph}
    s = inits["G"] / const(nodes["LayerNormalization"], 1)           # g / s: one s for the three weights
    np.testing.assert_allclose(inits["B"] / const(nodes["LayerNormalization"], 2), s, rtol=1e-5)
    q, k = (n for n in model.graph if n.op_type == "MatMul")
    np.testing.assert_allclose(const(q, 1), inits["Wq"] * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(const(k, 1), inits["Wk"] * s[:, None], rtol=1e-5)
    gemm = nodes["Gemm"]                                                # transB and alpha folded into the weight
    assert gemm.attributes["transB"].value == 0 and gemm.attributes["alpha"].value == 1.0
    np.testing.assert_allclose(const(gemm, 1), 0.5 * inits["Wvt"].T * s[:, None], rtol=1e-5)
    assert not s.min() == s.max(), "outlier channels get larger scales"
    assert np.argmax(s) % 7 == 0


def test_fold_awq_scales_then_quantize_int4_emits_matmul_nbits(tmp_path):
    model = parse(NORM_QKV, norm_qkv())
    cal = calibration(tmp_path, x=activations(512, 64))
    opts = {"quantize": "int4:awq", "calibration": cal, "scratch_dir": str(tmp_path)}
    ctx = onnxc.PassContext(options=opts)
    fa.FoldAwqScales().run(model, ctx)
    assert qi.QuantizeInt4().run(model, ctx).counts == {"MatMul": 2, "Gemm": 1}
    assert sorted(n.op_type for n in model.graph) == ["LayerNormalization"] + ["MatMulNBits"] * 3


@pytest.mark.parametrize("mode,mixed", [("int4:awq:gptq", False), ("int4:awq", True)])
def test_fold_awq_scales_compiles_and_verifies(mode, mixed, tmp_path):
    """The whole driver: dequantized and float twins agree, the report lists the fold; mixed precision on top."""
    src = tmp_path / "in.onnx"
    ir.save(parse(NORM_QKV, norm_qkv()), src)
    cal = calibration(tmp_path, x=activations(512, 64))
    res = onnxc.compile(src, 0, "cpu", output=tmp_path / "out.onnx",
                        options={"quantize": mode, "calibration": cal, "mixed": mixed, "mixed_budget": 1.6})
    q = res.report["quantization"]
    assert res.report["verification"]["status"] == "passed", res.report["verification"]
    assert q["method"] == mode.replace("awq", "awq:lsq") if mode == "int4:awq" else mode
    assert q["matmul_nbits"] == 3 and len(q["awq"]["folded"]) == 1
    assert q["precision"] == ("mixed" if mixed else "uniform")
    if mixed:
        assert any(layer["bits"] == 8 for layer in q["layers"])


# ------------------------------------------------------------------------------------------------ numbers
PRODUCERS = {
    "layer-norm": ("y = LayerNormalization <axis = -1> (x, G, B)", {"G": (64,), "B": (64,)}),
    "rms-norm": ("y = SimplifiedLayerNormalization <axis = -1> (x, G)", {"G": (64,)}),
    "skip-rms-norm": ("y, m, r, sum = com.microsoft.SkipSimplifiedLayerNormalization (x, x2, G)", {"G": (64,)}),
    "skip-layer-norm": ("y, m, r, sum = com.microsoft.SkipLayerNormalization (x, x2, G, B)",
                        {"G": (64,), "B": (64,)}),
    "mul": ("y = Mul(G, x)", {"G": (1, 64)}),
    "matmul": ("y = MatMul(x, W0)", {"W0": (64, 64)}),
}


def producer_graph(kind: str, n_out: int = 24, packed: bool = False) -> tuple[str, dict]:
    line, shapes = PRODUCERS[kind]
    skip = "skip" in kind
    outs = "float[N, 64] sum" if skip else "float[N, 64] x_out"
    body = line + ("" if skip else "\n  x_out = Identity(x)")
    readers = "a = MatMul(y, Wa)" if packed else "a = MatMul(y, Wa)\n  b = MatMul(y, Wb)"
    ins = "float[N, 64] x" + (", float[N, 64] x2" if skip else "")
    outs = f"float[N, {n_out}] a" + ("" if packed else ", float[N, 8] b") + f", {outs}"
    text = HDR + f"""
    g ({ins}) => ({outs}) {{
      {body}
      {readers}
    }}"""
    inits = {k: w(*s, seed=i + 10) + (1.5 if k == "G" else 0) for i, (k, s) in enumerate(shapes.items())}
    inits["Wa"], inits["Wb"] = w(64, n_out, seed=20), w(64, 8, seed=21)
    return text, inits


@pytest.mark.parametrize("kind", sorted(PRODUCERS))
def test_fold_awq_scales_float_graph_is_unchanged(kind, tmp_path):
    text, inits = producer_graph(kind)
    before = parse(text, {k: v for k, v in inits.items() if k in text})
    after = copy.deepcopy(before)
    feeds = {"x": activations(96, 64, seed=3), **({"x2": w(96, 64, seed=4)} if "skip" in kind else {})}
    cal = calibration(tmp_path, **{k: v[:64] for k, v in feeds.items()})
    result, ctx = fold(after, tmp_path, cal)
    assert sum(result.counts.values()) == 1, ctx.results
    for got, want in zip(outputs(after, feeds), outputs(before, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ------------------------------------------------------------------------------------------------ refusals
REFUSED = {
    "residual": ("""
      y = LayerNormalization <axis = -1> (x, G, B)
      a = MatMul(y, Wa)
      r = Add(y, x)""", "also read by Add"),
    "activation": ("""
      y = LayerNormalization <axis = -1> (x, G, B)
      a = MatMul(y, Wa)
      r = Relu(y)""", "also read by Relu"),
    "graph-output": ("""
      r = LayerNormalization <axis = -1> (x, G, B)
      a = MatMul(r, Wa)""", "a graph output"),
    "through-activation": ("""
      h = Relu(x)
      a = MatMul(h, Wa)
      r = Identity(h)""", "produced by Relu"),
    "graph-input": ("""
      a = MatMul(x, Wa)
      r = Identity(x)""", "a graph input"),
    "tied": ("""
      y = LayerNormalization <axis = -1> (x, G, B)
      t = Transpose <perm = [1, 0]> (E)
      a = MatMul(y, t)
      r = Gather(E, ids)""", "another reader"),
    "runtime-scale": ("""
      y = Mul(x, x)
      a = MatMul(y, Wa)
      r = Identity(x)""", "Mul of two computed values"),
    "mul-by-a-scalar": ("""
      y = Mul(x, C)
      a = MatMul(y, Wa)
      r = Identity(x)""", "no (K,) vector"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fold_awq_scales_refuses_where_the_algebra_does_not_hold(case, tmp_path):
    body, reason = REFUSED[case]
    text = HDR + f"""
    g (float[N, 64] x, int64[N] ids) => (float[N, 24] a, float[N, 64] r) {{{body}
    }}"""
    inits = {"G": w(64, seed=1) + 2, "B": w(64, seed=2), "Wa": w(64, 24, seed=3), "E": w(24, 64, seed=4),
             "C": w(1, seed=5)}
    model = parse(text, {k: v for k, v in inits.items() if k in body})
    before = copy.deepcopy(model)
    result, ctx = fold(model, tmp_path, calibration(tmp_path, x=w(64, 64), ids=np.zeros(64, np.int64)))
    assert result.counts == {} and not result.modified
    (refused,) = ctx.results["fold-awq-scales"]["refused"]
    assert reason in refused["reason"], refused
    feeds = {"x": w(8, 64, seed=6), "ids": np.arange(8, dtype=np.int64) % 24}
    for got, want in zip(outputs(model, feeds), outputs(before, feeds)):
        np.testing.assert_array_equal(got, want)


def test_fold_awq_scales_acts_for_int4_awq_only(tmp_path):
    model = parse(NORM_QKV, norm_qkv())
    ctx = onnxc.PassContext(options={"quantize": "int4"})
    assert not fa.FoldAwqScales().run(model, ctx).modified
    with pytest.raises(UsageError, match="int4:awq:lsq needs --calibration"):
        fa.FoldAwqScales().run(model, onnxc.PassContext(options={"quantize": "int4:awq"}))


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(PRODUCERS)), n_out=st.sampled_from([8, 24, 40]), packed=st.booleans(),
       extra=st.sampled_from([None, "Relu", "Add"]), seed=st.integers(0, 1000))
def test_fold_awq_scales_property_random_norm_linear_graphs(kind, n_out, packed, extra, seed, tmp_path):
    """Random producer -> linear graphs, with or without an extra non-linear reader of y: the fold fires exactly
    when every reader is linear, the graph stays valid and its outputs equal."""
    text, inits = producer_graph(kind, n_out, packed)
    if extra:
        text = text.replace("\n    }", f"\n      e = {extra}(y{', y' if extra == 'Add' else ''})\n    }}")
        text = text.replace("=> (", "=> (float[N, 64] e, ", 1)
    model = parse(text, {k: v for k, v in inits.items() if k in text})
    before = copy.deepcopy(model)
    feeds = {"x": activations(48, 64, seed=seed), **({"x2": w(48, 64, seed=seed + 1)} if "skip" in kind else {})}
    result, ctx = fold(model, tmp_path, calibration(tmp_path, **feeds))
    assert bool(result.counts) == (extra is None), ctx.results
    assert_valid(model)
    for got, want in zip(outputs(model, feeds), outputs(before, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@settings(max_examples=12, deadline=None)
@given(k=st.sampled_from([32, 64, 96]), n=st.integers(1, 40), block=st.sampled_from([16, 32]),
       symmetric=st.booleans(), seed=st.integers(0, 10_000))
def test_fold_awq_scales_search_never_worse_than_unscaled(k, n, block, symmetric, seed):
    x = activations(4 * k, k, seed=seed)
    wt = w(k, n, seed=seed + 1)
    h = x.astype(np.float64).T @ x
    found = awq.search(h, np.abs(x).mean(0), [wt], block, symmetric)
    unscaled = awq.output_error(h, wt, awq.rounded(wt, block, symmetric))
    assert found.errors[0.0] == pytest.approx(unscaled, rel=1e-9)
    assert found.errors[found.alpha] <= unscaled
    assert np.all(np.isfinite(found.s)) and np.all(found.s > 0)


def test_fold_awq_scales_confirm_keeps_weights_already_on_a_4_bit_grid():
    """Weights that already lie on a 4-bit grid per block (as a model decoded from a Q4 GGUF file) lose it when their
    rows are scaled: the search's proxy may still pick an alpha, the confirmation with lsq keeps s = 1."""
    rng = np.random.default_rng(0)
    k, n, block = 64, 24, 32
    codes = rng.integers(0, 16, (k, n)).astype(np.float32)
    step = np.repeat(rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32), block, axis=0)
    grid = (codes - 8) * step
    x = activations(4 * k, k)
    h = x.astype(np.float64).T @ x
    found = awq.Scales(awq.scales_for(np.abs(x).mean(0), 0.5), 0.5, {0.0: 1.0, 0.5: 0.5})
    kept = awq.confirm(h, [grid], found, block, False)
    assert kept.alpha == 0 and np.all(kept.s == 1) and kept.confirmed > 1
    plain = w(k, n)
    assert awq.confirm(h, [plain], found, block, False).alpha == 0.5    # a float-trained weight keeps its scales
