"""8-bit linear quantization references (kernels/quantize_linear.py) against onnxruntime's CPU kernels."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_ort import assert_close, check, randn, rng, run_ort
from onnxc.kernels import quantize_linear as ql

TIES = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 127.5, 300.0, -300.0], np.float32)


@pytest.mark.parametrize("zp", [np.array(3, np.uint8), np.array(-2, np.int8), None])
def test_quantize_linear_per_tensor_rounds_half_to_even_and_saturates(zp):
    x = randn(rng(0), 4, 6, 32, scale=3.0)
    x[0, 0, :8] = TIES
    check("QuantizeLinear", ql.quantize_linear, [x, np.array(1.0, np.float32), zp], domain="", opset=21)
    check("QuantizeLinear", ql.quantize_linear, [x, np.array(0.0371, np.float32), zp], domain="", opset=21)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_quantize_and_dequantize_linear_per_axis(axis, dtype):
    r = rng(1)
    x = randn(r, 3, 5, 8, scale=4.0)
    n = x.shape[axis]
    s = r.uniform(0.01, 0.1, n).astype(np.float32)
    z = r.integers(*ql.RANGES[np.dtype(dtype)], n, endpoint=True).astype(dtype)
    got, _ = check("QuantizeLinear", ql.quantize_linear, [x, s, z], {"axis": axis}, domain="", opset=21)
    check("DequantizeLinear", ql.dequantize_linear, [got[0], s, z], {"axis": axis}, domain="", opset=21)


def test_dequantize_linear_int32_and_default_zero_point():
    codes = rng(2).integers(-1000, 1000, (4, 7)).astype(np.int32)
    check("DequantizeLinear", ql.dequantize_linear, [codes, np.array(0.25, np.float32)], domain="", opset=21)


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros", "ties"])
def test_dynamic_quantize_linear(case):
    x = {"mixed": randn(rng(3), 4, 33, scale=2.0), "positive": np.abs(randn(rng(4), 4, 9)) + 1,
         "negative": -np.abs(randn(rng(5), 3, 8)) - 0.5, "zeros": np.zeros((2, 5), np.float32),
         "ties": np.array([[-1.0, 0.0, 254.0, 0.5, 1.5]], np.float32)}[case]
    got = run_ort("DynamicQuantizeLinear", [x], n_outputs=3, domain="", opset=21)
    ref = ql.dynamic_quantize_linear(x)
    for g, e, what in zip(got, ref, ("y", "scale", "zero point")):
        assert np.asarray(g).dtype == e.dtype, what
        np.testing.assert_array_equal(np.asarray(g), e, err_msg=what)


@pytest.mark.parametrize("zps", [(None, None), ("scalar", "scalar"), ("scalar", "column")])
@pytest.mark.parametrize("b_dtype", [np.int8, np.uint8])
def test_matmul_integer(zps, b_dtype):
    r = rng(6)
    a = r.integers(0, 256, (2, 5, 16)).astype(np.uint8)
    lo, hi = ql.RANGES[np.dtype(b_dtype)]
    lo, hi = (-64, 63) if b_dtype == np.int8 else (lo, hi)   # int8 codes as onnxc emits them (reduce_range)
    b = r.integers(lo, hi + 1, (16, 7)).astype(b_dtype)
    az = None if zps[0] is None else np.array(r.integers(0, 256), np.uint8)
    bz = (None if zps[1] is None else np.array(r.integers(lo, hi + 1), b_dtype) if zps[1] == "scalar"
          else r.integers(lo, hi + 1, 7).astype(b_dtype))
    inputs = [a, b, az, bz]
    got = run_ort("MatMulInteger", inputs, domain="", opset=21)[0]
    np.testing.assert_array_equal(got, ql.matmul_integer(*inputs))


@pytest.mark.parametrize("per_column", [True, False])
@pytest.mark.parametrize("b_dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("with_zp,with_bias", [(True, True), (False, True), (True, False)])
def test_dynamic_quantize_matmul(per_column, b_dtype, with_zp, with_bias):
    r = rng(7)
    w = randn(r, 48, 24)
    q, s, z = ql.quantize_weight(w, b_dtype == np.int8, dtype=b_dtype)
    if not per_column:
        s = np.array(s.max(), np.float32)
        q = ql.quantize_linear(w, s, z[:1].reshape(()))
        z = z[:1].reshape(())
    if not with_zp and b_dtype == np.int8:
        z = None
    inputs = [randn(r, 2, 3, 48), q, s, z, randn(r, 24) if with_bias else None]
    check("DynamicQuantizeMatMul", ql.dynamic_quantize_matmul, inputs)


@pytest.mark.parametrize("reduce_range,b_dtype", [(True, np.int8), (False, np.uint8)])
def test_dynamic_quantize_matmul_agrees_on_extreme_codes(reduce_range, b_dtype):
    """Pairs of extreme products (where an int16-saturating u8 x s8 kernel clips full-range int8) agree exactly
    with the weights onnxc emits: int8 within +-63, or uint8."""
    r = rng(8)
    w = np.sign(randn(r, 384, 64)) * 3
    q, s, z = ql.quantize_weight(w, reduce_range, dtype=b_dtype)
    a = np.abs(randn(r, 3, 5, 384))
    a[..., ::2] = a.max()
    check("DynamicQuantizeMatMul", ql.dynamic_quantize_matmul, [a, q, s, z, None], rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 70), n=st.integers(1, 20), m=st.integers(1, 6), seed=st.integers(0, 2**16),
       reduce_range=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_quantize_weight_then_dynamic_quantize_matmul_matches_ort(k, n, m, seed, reduce_range, scale):
    r = rng(seed)
    w = randn(r, k, n, scale=scale)
    w[:, 0] = 0.0                                   # a zero column gets a usable scale
    dtype = np.int8 if reduce_range else np.uint8      # full-range int8 may saturate on AVX2 (kernels docstring)
    q, s, z = ql.quantize_weight(w, reduce_range, dtype=dtype)
    qmax = 63 if reduce_range else 127
    assert np.abs(q.astype(int) - z.astype(int)).max() <= qmax and np.all(s > 0)
    deq = ql.dequantize_linear(q, s, z, axis=1)
    assert np.all(np.abs(deq - w) <= s / 2 * (1 + 1e-5) + 1e-12)   # round to nearest: half a step at most
    a = randn(r, m, k)
    got = run_ort("DynamicQuantizeMatMul", [a, q, s, z])[0]
    assert_close(got, ql.dynamic_quantize_matmul(a, q, s, z))


def test_activation_params_cover_the_range_and_keep_zero_exact():
    for lo, hi, dtype in ((-0.2, 9.0, np.uint8), (0.5, 3.0, np.uint8), (-4.0, 1.0, np.int8), (0.0, 0.0, np.uint8)):
        s, z = ql.activation_params(lo, hi, dtype)
        assert s.dtype == np.float32 and z.dtype == np.dtype(dtype) and s > 0
        q = ql.quantize_linear(np.array([lo, 0.0, hi], np.float32), s, z)
        back = ql.dequantize_linear(q, s, z)
        assert back[1] == 0.0
        assert np.all(np.abs(back - np.array([lo, 0.0, hi])) <= s / 2 + 1e-6) or dtype == np.int8
