"""Normalization references against onnxruntime (CPU EP)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_ort import check, randn, rng
from onnxc.kernels.norms import (
    embed_layer_norm,
    layer_norm,
    simplified_layer_norm,
    skip_layer_norm,
    skip_simplified_layer_norm,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("axis", [-1, 1])
def test_simplified_layer_norm_matches_ort(dtype, axis):
    r = rng(1)
    x = randn(r, 2, 3, 16, dtype=dtype)
    scale = randn(r, *x.shape[axis:], dtype=dtype)
    check("SimplifiedLayerNormalization", simplified_layer_norm, [x, scale], {"axis": axis, "epsilon": 1e-5},
          n_outputs=2, domain="")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_ort(dtype, with_bias):
    r = rng(2)
    x = randn(r, 2, 5, 24, dtype=dtype, scale=3.0)
    scale, bias = randn(r, 24, dtype=dtype), randn(r, 24, dtype=dtype)
    check("LayerNormalization", layer_norm, [x, scale, bias if with_bias else None], {"epsilon": 1e-5},
          n_outputs=3, domain="", opset=17)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("skip_shape", ["full", "1sh", "sh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_simplified_layer_norm_all_outputs_match_ort(dtype, skip_shape, with_bias):
    r = rng(3)
    b, s, h = 2, 4, 32
    x = randn(r, b, s, h, dtype=dtype)
    skip = randn(r, *{"full": (b, s, h), "1sh": (1, s, h), "sh": (s, h)}[skip_shape], dtype=dtype)
    gamma, bias = randn(r, h, dtype=dtype), randn(r, h, dtype=dtype)
    inputs = [x, skip, gamma] + ([bias] if with_bias else [])
    got, _ = check("SkipSimplifiedLayerNormalization", skip_simplified_layer_norm, inputs, {"epsilon": 1e-6},
                   n_outputs=4)
    assert got[1].shape == (b, s, 1) and not got[1].any(), "ORT's mean output of the RMS fusion is all zeros"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("beta,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_skip_layer_norm_all_outputs_match_ort(dtype, beta, bias):
    r = rng(4)
    x, skip = randn(r, 2, 3, 48, dtype=dtype), randn(r, 2, 3, 48, dtype=dtype)
    gamma, b_, bb = randn(r, 48, dtype=dtype), randn(r, 48, dtype=dtype), randn(r, 48, dtype=dtype)
    check("SkipLayerNormalization", skip_layer_norm, [x, skip, gamma, b_ if beta else None, bb if bias else None],
          {"epsilon": 1e-5}, n_outputs=4)


@pytest.mark.parametrize("op,ref", [("SkipLayerNormalization", skip_layer_norm),
                                    ("SkipSimplifiedLayerNormalization", skip_simplified_layer_norm)])
def test_skip_norms_default_epsilon_is_1e_12(op, ref):
    zeros = np.zeros((1, 2, 8), np.float32)
    got, _ = check(op, ref, [zeros, zeros, np.ones(8, np.float32)], n_outputs=4)
    np.testing.assert_allclose(got[2], 1e6, rtol=1e-5)  # inv_std_var = 1 / sqrt(0 + 1e-12)


@pytest.mark.parametrize("segment", [True, False])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("pos", [None, "1s", "bs"])
def test_embed_layer_norm_matches_ort(segment, mask, pos):
    r = rng(6)
    b, s, h, vocab = 2, 5, 16, 30
    ids = r.integers(0, vocab, (b, s)).astype(np.int32)
    seg = r.integers(0, 2, (b, s)).astype(np.int32)
    word, posemb, segemb = randn(r, vocab, h), randn(r, 12, h), randn(r, 2, h)
    gamma, beta = randn(r, h), randn(r, h)
    m = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], np.int32)  # ORT counts ones: mask_index = [3, 3]
    pids = {None: None, "1s": r.integers(0, 12, (1, s)), "bs": r.integers(0, 12, (b, s))}[pos]
    inputs = [ids, seg if segment else None, word, posemb, segemb if segment else None, gamma, beta,
              m if mask else None, None if pids is None else pids.astype(np.int32)]
    got, _ = check("EmbedLayerNormalization", embed_layer_norm, inputs, {"epsilon": 1e-5}, n_outputs=3)
    assert list(got[1]) == ([3, 3] if mask else [0, 0])


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 6), h=st.sampled_from([8, 16, 40, 64]), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float16]), seed=st.integers(0, 2**16))
def test_skip_norms_property(b, s, h, bias, dtype, seed):
    r = rng(seed)
    x, skip = randn(r, b, s, h, dtype=dtype, scale=2.0), randn(r, b, s, h, dtype=dtype)
    gamma, bvec = randn(r, h, dtype=dtype), randn(r, h, dtype=dtype)
    check("SkipSimplifiedLayerNormalization", skip_simplified_layer_norm,
          [x, skip, gamma] + ([bvec] if bias else []), {"epsilon": 1e-5}, n_outputs=4)
    check("SkipLayerNormalization", skip_layer_norm, [x, skip, gamma, None, bvec if bias else None],
          {"epsilon": 1e-5}, n_outputs=4)


def test_rms_norm_of_scaled_input_is_scale_invariant():
    x = randn(rng(7), 3, 64, dtype=np.float64)
    gamma = np.ones(64)
    y1, _ = simplified_layer_norm(x, gamma, epsilon=0.0)
    y2, _ = simplified_layer_norm(7.5 * x, gamma, epsilon=0.0)
    np.testing.assert_allclose(y1, y2, rtol=1e-12)
    np.testing.assert_allclose(np.sqrt((y1 * y1).mean(-1)), 1.0, rtol=1e-12)
