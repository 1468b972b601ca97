"""GPTQ (kernels/quantize.py): lower output error than RTN and lsq on least-squares problems, exactly lsq when the
inputs are uncorrelated, a valid and deterministic MatMulNBits layout for any Hessian."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc.kernels import quantize as kq
from onnxc.kernels.matmul_nbits import dequantize, unpack_bits


def problem(k: int, n: int, m: int, seed: int, outliers: float = 1.0):
    """Correlated inputs X (m, K) with per-feature scales (lognormal, sigma `outliers`), Gaussian W (K, N)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((m, k)) @ mix + 0.5 * rng.standard_normal((m, k))) * rng.lognormal(0, outliers, k)
    return x.astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def output_error(x, w, q, block) -> float:
    k, n = w.shape
    return float(np.linalg.norm(x @ w - x @ dequantize(*q, K=k, N=n, block_size=block)) / np.linalg.norm(x @ w))


def gram(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.T @ x


@pytest.mark.parametrize("k,n,block,outliers", [(256, 128, 32, 1.0), (200, 48, 32, 0.5), (384, 64, 64, 1.0),
                                                (96, 40, 16, 0.0)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_and_lsq(k, n, block, outliers, symmetric, act_order):
    x, w = problem(k, n, 4 * k, seed=k + n, outliers=outliers)
    rtn = output_error(x, w, kq.quantize(w, "rtn", block, symmetric), block)
    lsq = output_error(x, w, kq.quantize(w, "lsq", block, symmetric), block)
    gptq = output_error(x, w, kq.gptq(w, gram(x), block, symmetric, act_order=act_order), block)
    assert gptq < rtn and gptq < lsq, (gptq, rtn, lsq)


def test_gptq_error_gain_on_held_out_inputs():
    """Fitted on one sample of the input distribution, GPTQ still beats lsq on another (no overfitting)."""
    x, w = problem(256, 96, 4096, seed=3)
    fit, test = x[:2048], x[2048:]   # rows are independent draws of one distribution
    q = kq.gptq(w, gram(fit), 32)
    assert output_error(test, w, q, 32) < 0.95 * output_error(test, w, kq.quantize(w, "lsq", 32), 32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(16, 120), n=st.integers(1, 24), block=st.sampled_from([16, 32, 64]), symmetric=st.booleans(),
       fp16=st.booleans(), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000))
def test_gptq_is_lsq_when_inputs_are_uncorrelated(k, n, block, symmetric, fp16, scale, seed):
    """H = c I: U is diagonal, no error is carried to later rows, and each block is fitted on its own weights."""
    w = np.random.default_rng(seed).standard_t(5, (k, n)).astype(np.float16 if fp16 else np.float32)
    got = kq.gptq(w, np.eye(k) * scale, block, symmetric)
    want = kq.quantize(w, "lsq", block, symmetric)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(16, 100), n=st.integers(1, 20), m=st.integers(0, 200), block=st.sampled_from([16, 32]),
       symmetric=st.booleans(), act_order=st.booleans(), fp16=st.booleans(), dead=st.integers(0, 5),
       seed=st.integers(0, 10_000))
def test_gptq_any_hessian_gives_a_valid_deterministic_layout(k, n, m, block, symmetric, act_order, fp16, dead, seed):
    """Rank-deficient H (m < K rows), never-active features (zero rows of X), fp16 weights: the layout is the one
    MatMulNBits reads, values are finite, and a second run gives the same bytes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float16 if fp16 else np.float32)
    x = rng.standard_normal((m, k))
    x[:, rng.choice(k, size=min(dead, k), replace=False)] = 0
    h = gram(x)
    b, s, z = kq.gptq(w, h, block, symmetric, act_order=act_order)
    kb = -(-k // block)
    assert b.shape == (n, kb, block // 2) and b.dtype == np.uint8
    assert s.shape == (n, kb) and s.dtype == w.dtype
    assert (z is None) == symmetric and (z is None or z.shape == (n, -(-kb // 2)))
    d = dequantize(b, s, z, K=k, N=n, block_size=block)
    assert np.all(np.isfinite(d))
    codes = unpack_bits(b.reshape(n, -1), 4)[:, :k]
    assert codes.max() <= 15
    again = kq.gptq(w, h, block, symmetric, act_order=act_order)
    for g, e in zip((b, s, z), again):
        assert (g is None and e is None) or np.array_equal(g, e)
    if m == 0 and not act_order:  # H = 0: every feature counts as never active, H -> I: lsq
        np.testing.assert_array_equal(b, kq.quantize(w, "lsq", block, symmetric)[0])


def test_gptq_shared_factor_equals_direct_and_quantize_dispatch():
    x, w = problem(128, 32, 512, seed=5)
    h = gram(x)
    direct = kq.gptq(w, h, 32)
    shared = kq.gptq(w, None, 32, factor=kq.gptq_factor(h))
    via = kq.quantize(w, "gptq", 32, hessian=h)
    for a, b, c in zip(direct, shared, via):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_gptq_refusals():
    w = np.ones((64, 8), np.float32)
    with pytest.raises(ValueError, match="needs the Hessian"):
        kq.quantize(w, "gptq")
    with pytest.raises(ValueError, match="W has K = 64"):
        kq.gptq(w, np.eye(32))
    with pytest.raises(ValueError, match="square"):
        kq.gptq_factor(np.ones((4, 5)))


def test_gptq_dampening_rescues_an_indefinite_hessian():
    h = np.eye(32)
    h[0, 1] = h[1, 0] = 1.5  # not positive definite; damp 0.01 is not enough, a larger one is
    u, perm = kq.gptq_factor(h)
    assert np.all(np.isfinite(u)) and np.allclose(np.triu(u), u)
    assert list(perm) == list(range(32))
