"""GELU-family references against onnxruntime (CPU EP).

ORT's CPU EP registers these contrib kernels for float only; fp16 nodes still run there because onnxruntime
inserts Cast nodes around them (compute in float32), which the fp16 cases exercise.
"""

import math

import numpy as np
import pytest
from kernel_ort import check, randn, rng
from onnxc.kernels.activations import bias_gelu, fast_gelu, gelu, quick_gelu

DTYPES = [np.float32, np.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_ort(dtype):
    x = randn(rng(1), 3, 5, 64, dtype=dtype, scale=3.0)
    check("Gelu", gelu, [x])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_opset20_matches_ort(approximate):
    x = randn(rng(2), 4, 33, scale=3.0)
    check("Gelu", gelu, [x], {"approximate": approximate}, domain="", opset=20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_matches_ort(dtype):
    r = rng(3)
    check("BiasGelu", bias_gelu, [randn(r, 2, 7, 32, dtype=dtype, scale=2.0), randn(r, 32, dtype=dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_gelu_matches_ort(dtype, with_bias):
    r = rng(4)
    x, b = randn(r, 2, 7, 32, dtype=dtype, scale=2.0), randn(r, 32, dtype=dtype)
    check("FastGelu", fast_gelu, [x, b] if with_bias else [x])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [None, 1.0, 0.5])
def test_quick_gelu_matches_ort(dtype, alpha):
    x = randn(rng(5), 3, 50, dtype=dtype, scale=4.0)
    check("QuickGelu", quick_gelu, [x], {} if alpha is None else {"alpha": alpha})


def test_gelu_values_at_known_points():
    x = np.array([-3.0, -1.0, 0.0, 1.0, 3.0])
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(gelu(x), exact, rtol=1e-15, atol=1e-300)
    assert abs(fast_gelu(np.array([1.0]))[0] - 0.8411919906) < 1e-9
    np.testing.assert_allclose(quick_gelu(x, alpha=1.0), x / (1 + np.exp(-x)), rtol=1e-15)
