"""quantize-int8: structure before/after for weight-only, dynamic and static (QDQ); each quantized layer == its
dequantized twin in onnxruntime and the float twin == the input; calibration ranges, SmoothQuant and the error
budget; refusals and option errors; a property over modes, layouts and shapes; fixtures compiled and verified."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import assert_valid, canonical, parse, run_pass, session, to_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc import quant_twins
from onnxc.kernels import calibrate as kcal
from onnxc.kernels import quantize as kq
from onnxc.kernels import quantize_linear as ql
from onnxc.passes import quantize_int8 as q8
from onnxc.verify import QUANT_META, float_twins

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "models"
HDR = '<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>'
INF = float("inf")


def w(*shape, dtype=np.float32, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def calibration(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "calibration.npz"
    np.savez(path, **arrays)
    return str(path)


def quantize(model: ir.Model, mode: str, tmp_path: Path | None = None, cal: dict | None = None, **options):
    opts = {"quantize": mode, **options}
    if mode.startswith("int8:static"):
        opts.setdefault("error_budget", INF)
        opts["calibration"] = calibration(tmp_path, **cal)
    return run_pass(model, "quantize-int8", **opts)


def ops(model: ir.Model) -> list[str]:
    return sorted(n.op_type for n in model.graph)


def fast_session(model: ir.Model):
    """onnxruntime with its graph optimizations on: QDQ runs as MatMulIntegerToFloat, as users run it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(to_bytes(model), so, providers=["CPUExecutionProvider"])


def twins(model: ir.Model, feeds: dict) -> tuple[list, list, list]:
    """Outputs of the quantized model (optimizations on; MatMulNBits at accuracy_level 0, exact float compute), its
    dequantized twin and its float twin."""
    for n in model.graph:
        if n.op_type == "MatMulNBits":
            n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    q = fast_session(model).run(None, feeds)
    swaps = float_twins(model)
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    assert all(n.outputs[0].uses()[0].node.op_type == "Where" for n in model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is None)   # activations: switchable
    out = []
    for which in (1, 2):
        for value, deq, src in swaps:
            value.const_value = deq if which == 1 else src
        out.append(session(to_bytes(model)).run(None, feeds))
    return q, out[0], out[1]


def assert_close(a, b, rtol=1e-4):
    for x, y in zip(a, b):
        scale = float(np.abs(y).max()) or 1.0
        np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol, atol=rtol * scale)


ONE = "g (float[N, 64] x) => (float[N, 48] y) { y = MatMul(x, W) }"


# ------------------------------------------------------------------------------------------------ before / after
def test_quantize_int8_weight_only_is_matmul_nbits_8_bits():
    W = w(64, 48)
    model = parse(ONE, {"W": W})
    assert quantize(model, "int8").counts == {"MatMul->MatMulNBits": 1}
    assert_valid(model)
    b, s, z = kq.quantize(W, "rtn", 32, False, bits=8)
    want = parse(HDR + """
    g (float[N, 64] x) => (float[N, 48] y) {
      y = com.microsoft.MatMulNBits <K = 64, N = 48, bits = 8, block_size = 32, accuracy_level = 4> (x, B, S, Z)
    }""", {"B": b, "S": s, "Z": z})
    assert canonical(model) == canonical(want)
    assert QUANT_META in next(iter(model.graph)).meta


def test_quantize_int8_dynamic_is_dynamic_quantize_matmul_with_per_column_scales():
    W = w(64, 48)
    model = parse(ONE, {"W": W})
    assert quantize(model, "int8:dynamic").counts == {"MatMul->DynamicQuantizeMatMul": 1}
    assert_valid(model)
    q, s, _ = ql.quantize_weight(W, True)
    want = parse(HDR + """
    g (float[N, 64] x) => (float[N, 48] y) { y = com.microsoft.DynamicQuantizeMatMul (x, Q, S) }""",
                 {"Q": q, "S": s})
    assert canonical(model) == canonical(want)


def test_quantize_int8_dynamic_gemm_bias_and_transposed_weight():
    W, C = w(48, 64), w(48, seed=1)
    model = parse("g (float[4, 64] x) => (float[4, 48] y) { y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W, C) }",
                  {"W": W, "C": C})
    assert quantize(model, "int8:dynamic").counts == {"Gemm->DynamicQuantizeMatMul": 1}
    (node,) = list(model.graph)
    q, s, _ = ql.quantize_weight(0.5 * W.T, True)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), q)
    np.testing.assert_allclose(node.inputs[4].const_value.numpy(), 2 * C)
    x = w(4, 64, seed=2)
    got = fast_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ql.dynamic_quantize_matmul(x, q, s, None, 2 * C), rtol=1e-5, atol=1e-5)


def test_quantize_int8_static_is_qdq_with_calibrated_scales(tmp_path):
    W = w(64, 48)
    X = w(8, 64, seed=3) * 2 + 0.5
    model = parse(ONE, {"W": W})
    counts = quantize(model, "int8:static:minmax", tmp_path, {"x": X}, smooth=0).counts
    assert counts == {"MatMul->QDQ": 1}
    assert_valid(model)
    sa, za = ql.activation_params(X.min(), X.max(), np.uint8)
    q, s, z = ql.quantize_weight(W, True)
    want = parse('<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>' + """
    g (float[N, 64] x) => (float[N, 48] y) {
      xq = QuantizeLinear(x, SA, ZA)
      xd = DequantizeLinear(xq, SA, ZA)
      wd = DequantizeLinear <axis = 1> (Q, S, Z)
      y = MatMul(xd, wd)
    }""", {"SA": sa, "ZA": za, "Q": q, "S": s, "Z": z})
    assert canonical(model) == canonical(want)


def test_quantize_int8_static_shares_one_qdq_pair_per_activation(tmp_path):
    model = parse("""
    g (float[N, 64] x) => (float[N, 16] q, float[N, 16] k) {
      q = MatMul(x, Wq)
      k = MatMul(x, Wk)
    }""", {"Wq": w(64, 16), "Wk": w(64, 16, seed=1)})
    quantize(model, "int8:static", tmp_path, {"x": w(6, 64, seed=2)})
    assert ops(model).count("QuantizeLinear") == 1 and ops(model).count("MatMul") == 2
    assert ops(model).count("Mul") == 1 or ops(model).count("Mul") == 0     # one smoothing Mul at most


def test_quantize_int8_static_smoothing_multiplies_before_quantizing(tmp_path):
    """SmoothQuant: A / c quantized per tensor and c W per column; the product is the layer's."""
    X = w(32, 64, seed=4)
    X[:, 3] *= 40                                            # an outlier channel
    W = w(64, 48)
    model = parse(ONE, {"W": W})
    quantize(model, "int8:static", tmp_path, {"x": X}, smooth=0.5)
    mul = next(n for n in model.graph if n.op_type == "Mul")
    inv = mul.inputs[1].const_value.numpy()
    c = kcal.smooth_factors(np.abs(X).max(0), np.abs(W).max(1), 0.5)
    np.testing.assert_allclose(inv, 1 / c, rtol=1e-6)
    q, s, _ = ql.quantize_weight(W * c[:, None], True)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy(), q)
    quantized, deq, fl = twins(model, {"x": X})
    assert_close(quantized, deq)
    np.testing.assert_allclose(fl[0], X @ W, rtol=1e-4, atol=1e-4)


def test_quantize_int8_smoothing_helps_an_outlier_channel(tmp_path):
    X = w(256, 64, seed=5)
    X[:, 7] *= 60
    W = w(64, 32)
    errs = {}
    for alpha in (0, 0.5):
        model = parse("g (float[N, 64] x) => (float[N, 32] y) { y = MatMul(x, W) }", {"W": W})
        quantize(model, "int8:static", tmp_path, {"x": X}, smooth=alpha)
        y = fast_session(model).run(None, {"x": X})[0]
        errs[alpha] = float(np.square(y - X @ W).sum() / np.square(X @ W).sum())
    assert errs[0.5] < errs[0] / 4, errs


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("mode", ["int8", "int8:dynamic", "int8:static", "int8:static:percentile",
                                  "int8:static:entropy"])
def test_quantize_int8_quantized_equals_dequantized_twin_and_float_twin_equals_input(mode, tmp_path):
    W1, W2 = w(64, 64, scale=0.2), w(64, 24, seed=1)
    text = """
    g (float[N, 64] x) => (float[N, 24] y) {
      h = MatMul(x, W1)
      r = Relu(h)
      y = MatMul(r, W2)
    }"""
    model = parse(text, {"W1": W1, "W2": W2})
    x = w(5, 64, seed=2)
    ref = session(to_bytes(parse(text, {"W1": W1, "W2": W2}))).run(None, {"x": x})[0]
    quantize(model, mode, tmp_path, {"x": w(16, 64, seed=3)})
    quantized, deq, fl = twins(model, {"x": x})
    assert_close(quantized, deq, rtol=1e-4 if mode in ("int8", "int8:static") or "static" in mode else 3e-2)
    np.testing.assert_allclose(fl[0], ref, rtol=1e-4, atol=1e-4)
    cos = float((quantized[0] * ref).sum() / np.linalg.norm(quantized[0]) / np.linalg.norm(ref))
    assert cos > 0.98


def test_quantize_int8_local_twins_catch_a_wrong_scale_axis(tmp_path):
    """The layer-by-layer twin computes what the graph's constants say. onnxruntime 1.32's QDQ fusion
    (MatMulIntegerToFloat) applies a square weight's per-axis scales per column whatever DequantizeLinear's axis
    says: with axis 0 the fused model and the twin differ, and the check shows it (the pass always writes axis 1)."""
    W = w(64, 64)
    model = parse("g (float[N, 64] x) => (float[N, 64] y) { y = MatMul(x, W) }", {"W": W})
    quantize(model, "int8:static", tmp_path, {"x": w(16, 64, seed=1)}, smooth=0)
    compiled = tmp_path / "q.onnx"

    def save(m, path):
        ir.save(m, path)

    def outputs(bad: bool):
        dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
        dq.attributes["axis"] = ir.AttrInt64("axis", 0 if bad else 1)
        save(model, compiled)
        exact, deq = quant_twins.local_twins(model, compiled, tmp_path, save)
        feeds = {"x": w(4, 64, seed=2)}
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        names = [o.name for o in ort.InferenceSession(str(deq), so).get_outputs()]
        a = ort.InferenceSession(str(exact), so).run(names, feeds)
        b = ort.InferenceSession(str(deq), so).run(names, feeds)
        return [float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b)]

    assert max(outputs(False)) < 1e-5
    assert max(outputs(True)) > 1e-2
    assert ops(model) == ["DequantizeLinear", "DequantizeLinear", "MatMul", "QuantizeLinear"]   # left as it was


# ------------------------------------------------------------------------------------------------ calibration
def test_quantize_int8_calibration_ranges_minmax_percentile_entropy():
    r = np.random.default_rng(0)
    x = r.standard_normal((4000, 8)).astype(np.float32)
    x[0, 0] = 60.0
    stats = kcal.RangeStats()
    for part in np.array_split(x, 5):
        stats.update(part)
    for part in np.array_split(x, 5):
        stats.second_pass(part)
    lo, hi = stats.range("minmax")
    assert (lo, hi) == (float(x.min()), 60.0)
    p_lo, p_hi = stats.range("percentile", 99.9)
    assert lo <= p_lo and p_hi < 10 and p_lo < -2
    e_lo, e_hi = stats.range("entropy")
    assert 2 < e_hi < 20 and lo <= e_lo < 0
    stats.divisor = np.full(8, 2.0, np.float32)
    assert stats.range("minmax") == pytest.approx((lo / 2, 30.0))


def test_quantize_int8_error_budget_keeps_the_worst_layers_float(tmp_path):
    X = w(64, 64, seed=1)
    X[:, 0] *= 500                                          # an outlier channel that hardly reaches the output:
    W1 = w(64, 16)                                          # a layer per-tensor int8 cannot serve well
    W1[0] /= 500
    model = parse("""
    g (float[N, 64] x, float[N, 64] z) => (float[N, 16] y, float[N, 16] v) {
      y = MatMul(x, W1)
      v = MatMul(z, W2)
    }""", {"W1": W1, "W2": w(64, 16, seed=2)})
    cal = {"x": X, "z": w(64, 64, seed=3)}
    ctx = onnxc.PassContext(options={"quantize": "int8:static", "calibration": calibration(tmp_path, **cal),
                                     "smooth": 0, "error_budget": 1e-3})
    q8.QuantizeInt8().run(model, ctx)
    layers = {x["activation"]: x for x in ctx.results["quantize-int8"]["layers"]}
    assert not layers["x"]["int8"] and layers["z"]["int8"] and layers["x"]["error"] > layers["z"]["error"]
    assert any("kept MatMul" in n and "error budget" in n for n in ctx.notes)
    assert ops(model).count("MatMul") == 2 and ops(model).count("QuantizeLinear") == 1
    assert not run_pass(model, "quantize-int8", quantize="int8:static", calibration=ctx.option("calibration"),
                        smooth=0, error_budget=1e-3).modified          # a rerun leaves the float layer float
    assert q8._over_budget({"a": {"error": 3.0}, "b": {"error": 1.0}, "c": {"error": 0.5}}, 1.6) == ["a"]
    assert q8._over_budget({"a": {"error": 3.0, "output_error": 0.1}, "b": {"error": 1.0, "output_error": 2.0}},
                           1.0) == ["b"]                 # the effect on the outputs decides when measured
    assert q8._over_budget({"a": {"error": 3.0}}, INF) == []


# ------------------------------------------------------------------------------------------------ refusals
def test_quantize_int8_fp16_activations_stay_float_in_dynamic_mode():
    model = parse("g (float16[N, 64] x) => (float16[N, 8] y) { y = MatMul(x, W) }", {"W": w(64, 8, dtype=np.float16)})
    ctx = onnxc.PassContext(options={"quantize": "int8:dynamic"})
    assert not q8.QuantizeInt8().run(model, ctx).modified
    assert any("takes float32" in n for n in ctx.notes), ctx.notes


def test_quantize_int8_leaves_int4_alone_and_int4_leaves_int8_alone():
    model = parse(ONE, {"W": w(64, 48)})
    before = to_bytes(model)
    assert not run_pass(model, "quantize-int8", quantize="int4").modified
    assert not run_pass(model, "quantize-int4", quantize="int8:dynamic").modified
    assert to_bytes(model) == before


@pytest.mark.parametrize("opts,message", [
    ({"quantize": "int8:static"}, "needs --calibration FILE.npz"),
    ({"quantize": "int8:dynamic", "calibration": "c.npz"}, "no selected method uses calibration"),
    ({"quantize": "int8:static:kl"}, "unknown value"),
    ({"quantize": "int8:static", "calibration": __file__, "smooth": 2}, "smooth must be"),
    ({"quantize": "int8:static", "calibration": __file__, "error_budget": -1}, "error_budget must be"),
    ({"quantize": "int8:static", "calibration": __file__, "activation_type": "int16"}, "activation_type must be"),
    ({"quantize": "int8:static", "calibration": __file__, "percentile": 20}, "percentile must be"),
])
def test_quantize_int8_rejects_bad_options(opts, message):
    model = parse(ONE, {"W": w(64, 48)})
    with pytest.raises(onnxc.UsageError, match=message):
        run_pass(model, "quantize-int8", **opts)


def test_quantize_int8_static_cli_without_calibration_exits_2_one_line(tmp_path):
    from click.testing import CliRunner
    from onnxc.cli import main

    src = tmp_path / "m.onnx"
    src.write_bytes(to_bytes(parse(ONE, {"W": w(64, 48)})))
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8:static"])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("onnxc: error")]
    assert len(errors) == 1 and "needs --calibration FILE.npz" in errors[0]
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 90), n=st.integers(1, 40), mode=st.sampled_from(["int8", "int8:dynamic", "int8:static"]),
       layout=st.sampled_from(["matmul", "transpose", "gemm", "add"]), smooth=st.sampled_from([0, 0.5, "auto"]),
       act=st.sampled_from(["uint8", "int8"]), rank=st.sampled_from([2, 3]), seed=st.integers(0, 1000))
def test_quantize_int8_property_layer_equals_its_twins(k, n, mode, layout, smooth, act, rank, seed, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("q8")
    W, b = w(k, n, seed=seed), w(n, seed=seed + 1)
    x_shape = f"[2, 3, {k}]" if rank == 3 else f"[3, {k}]"
    y_shape = f"[2, 3, {n}]" if rank == 3 else f"[3, {n}]"
    body = {"matmul": "y = MatMul(x, W)", "transpose": "t = Transpose <perm = [1, 0]> (Wt)\n y = MatMul(x, t)",
            "gemm": "y = Gemm(x, W, b)", "add": "h = MatMul(x, W)\n y = Add(h, b)"}[layout]
    if layout == "gemm":
        x_shape, y_shape = f"[3, {k}]", f"[3, {n}]"
    text = f"g (float{x_shape} x) => (float{y_shape} y) {{ {body} }}"
    inits = {"W": W, "b": b} if layout != "transpose" else {"Wt": np.ascontiguousarray(W.T)}
    model = parse(text, inits)
    original = parse(text, inits)
    xs = w(*[int(d) for d in x_shape.strip("[]").split(", ")], seed=seed + 2)
    result = quantize(model, mode, tmp_path, {"x": w(*xs.shape, seed=seed + 3)}, smooth=smooth, activation_type=act)
    if mode == "int8" and k < 32:                           # weight-only: K below the block stays float
        assert not result.modified
        return
    assert result.modified
    assert_valid(model, original)
    assert not any(node.op_type in ("MatMul", "Gemm") and node.inputs[1].const_value is not None
                   for node in model.graph)
    again = quantize(model, mode, tmp_path, {"x": xs}, smooth=smooth, activation_type=act)
    assert not again.modified
    ref = session(to_bytes(original)).run(None, {"x": xs})[0]
    quantized, deq, fl = twins(model, {"x": xs})
    assert_close(quantized, deq, rtol=1e-4)
    np.testing.assert_allclose(fl[0], ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


# ------------------------------------------------------------------------------------------------ fixtures
def _fixture_calibration(src: Path, tmp_path: Path) -> str:
    from onnxc import verify

    m = onnxc.ir.load(src)
    sc = verify.Scenario("calibration", 4, 32, 0)
    return calibration(tmp_path, **{f"{n}/{k}": a for k in range(2)
                                    for n, a in verify.make_inputs(m, sc, 1000 + k).items()})


@pytest.mark.parametrize("mode", ["int8", "int8:dynamic", "int8:static"])
def test_quantize_int8_bert_fixture_compiles_and_verifies(mode, tmp_path):
    src = FIXTURES / "bert_ts.onnx"
    options = {"quantize": mode}
    if mode == "int8:static":
        options["calibration"] = _fixture_calibration(src, tmp_path)
    r = onnxc.compile(src, 3, "cpu", output=tmp_path / "q.onnx", options=options)
    rep = r.report
    assert rep["verification"]["status"] == "passed", rep["verification"]
    assert all("quantized_outputs" in s for s in rep["verification"]["scenarios"])
    q = rep["quantization"]
    assert q["method"] == {"int8": "int8:weight"}.get(mode, mode)
    assert q["int8"]["weights"] > 0
    assert q["error"]["summary"]["cosine"] > 0.95
    if mode == "int8:static":
        assert q["int8"]["calibration"] == "minmax" and q["int8"]["layers"]
        assert q["quantize_linear"] > 0
    if mode == "int8:dynamic":
        assert q["dynamic_quantize_matmul"] == q["int8"]["weights"]


def test_quantize_int8_output_sensitivity_measures_each_activation_alone(tmp_path):
    from onnxc.calibration_ranges import output_sensitivity

    text = """
    g (float[N, 64] x) => (float[N, 16] y) {
      h = MatMul(x, W1)
      d = Relu(h)
      y = MatMul(x, W2)
    }"""
    model = parse(text, {"W1": w(64, 16), "W2": w(64, 16, seed=1)})
    before = to_bytes(model)
    x = next(iter(model.graph)).inputs[0]
    h = next(iter(model.graph)).outputs[0]
    coarse = (np.array(0.5, np.float32), np.array(128, np.uint8), None)
    fine = (np.array(1e-3, np.float32), np.array(128, np.uint8), None)
    batches = [{"x": w(8, 64, seed=2) * 0.05}]
    got = output_sensitivity(model, {"x": (x, *coarse), "h": (h, *fine)}, batches, tmp_path, "c")
    assert got["h"] == 0.0                               # h reaches no output
    assert got["x"] > 1e-3                               # a coarse grid on the input shows
    assert to_bytes(model) == before                     # the graph is left as it was
    fine_x = output_sensitivity(model, {"x": (x, *fine)}, batches, tmp_path, "c")["x"]
    assert fine_x < got["x"] / 100
