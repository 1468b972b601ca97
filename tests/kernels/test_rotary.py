"""RotaryEmbedding reference against onnxruntime (CPU EP: float and float16 kernels)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_ort import check, randn, rng
from onnxc.kernels.rotary import apply_rotary, rotary_embedding


def caches(r, max_seq, half, dtype=np.float32):
    angle = r.uniform(0, 6.3, (max_seq, half))
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout", ["bsd", "bnsh"])
@pytest.mark.parametrize("pos", ["offset", "table"])
def test_rotary_embedding_full_matches_ort(dtype, interleaved, layout, pos):
    r = rng(1)
    b, s, n, h = 2, 5, 3, 16
    x = randn(r, *((b, s, n * h) if layout == "bsd" else (b, n, s, h)), dtype=dtype)
    cos, sin = caches(r, 32, h // 2, dtype)
    p = np.array([7], np.int64) if pos == "offset" else r.integers(0, 32, (b, s)).astype(np.int64)
    check("RotaryEmbedding", rotary_embedding, [x, p, cos, sin], {"interleaved": interleaved})


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout", ["bsd", "bnsh"])
def test_rotary_embedding_partial_matches_ort(interleaved, layout):
    """rotary_embedding_dim < head_size: only the first r dims rotate (needs num_heads)."""
    r = rng(2)
    b, s, n, h, rd = 2, 4, 2, 32, 16
    x = randn(r, *((b, s, n * h) if layout == "bsd" else (b, n, s, h)))
    cos, sin = caches(r, 16, rd // 2)
    p = r.integers(0, 16, (b, s)).astype(np.int64)
    got, _ = check("RotaryEmbedding", rotary_embedding, [x, p, cos, sin],
                   {"interleaved": interleaved, "num_heads": n, "rotary_embedding_dim": rd})
    tail = (x.reshape(b, s, n, h) if layout == "bsd" else x)[..., rd:]
    np.testing.assert_array_equal((got[0].reshape(b, s, n, h) if layout == "bsd" else got[0])[..., rd:], tail)


def test_rotary_embedding_ignores_scale_and_packed_batching_on_cpu():
    r = rng(3)
    x = randn(r, 1, 3, 32)
    cos, sin = caches(r, 8, 16)
    p = np.array([[0, 2, 4]], np.int64)
    for attrs in ({"scale": 3.0}, {"is_packed_batching": 1}):
        check("RotaryEmbedding", rotary_embedding, [x, p, cos, sin], attrs)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 6), n=st.integers(1, 4), h=st.sampled_from([8, 16, 32, 64]),
       part=st.booleans(), interleaved=st.integers(0, 1), bnsh=st.booleans(), seed=st.integers(0, 2**16))
def test_rotary_embedding_property(b, s, n, h, part, interleaved, bnsh, seed):
    r = rng(seed)
    rd = h // 2 if part else h
    x = randn(r, *((b, n, s, h) if bnsh else (b, s, n * h)))
    cos, sin = caches(r, 20, rd // 2)
    p = r.integers(0, 20, (b, s)).astype(np.int64)
    attrs = {"interleaved": interleaved, **({"num_heads": n, "rotary_embedding_dim": rd} if part else {})}
    check("RotaryEmbedding", rotary_embedding, [x, p, cos, sin], attrs)


def test_apply_rotary_is_a_rotation():
    """Each rotated pair keeps its norm, and rotating by -angle undoes it."""
    r = rng(4)
    x = randn(r, 3, 8, dtype=np.float64)
    ang = r.uniform(0, 6.3, (3, 4))
    for inter in (False, True):
        y = apply_rotary(x, np.cos(ang), np.sin(ang), inter)
        pairs = (lambda t: (t[..., 0::2], t[..., 1::2])) if inter else (lambda t: (t[..., :4], t[..., 4:]))
        (x1, x2), (y1, y2) = pairs(x), pairs(y)
        np.testing.assert_allclose(x1**2 + x2**2, y1**2 + y2**2, rtol=1e-6)
        np.testing.assert_allclose(apply_rotary(y, np.cos(-ang), np.sin(-ang), inter), x, rtol=1e-5, atol=1e-6)
