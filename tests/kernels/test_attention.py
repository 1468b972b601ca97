"""Attention and MultiHeadAttention references against onnxruntime (CPU EP, float kernels)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_ort import check, randn, rng, run_ort
from onnxc.kernels.attention import attention, multi_head_attention

B, S, N, H = 2, 4, 2, 8
D = N * H


def _attention_inputs(seed=0, din=20, sizes=(D, D, D)):
    r = rng(seed)
    return r, randn(r, B, S, din), randn(r, din, sum(sizes), scale=0.3), randn(r, sum(sizes))


MASKS = {
    "none": None,
    "lengths": np.array([3, 1], np.int32),
    "ends_starts": np.array([4, 3, 1, 0], np.int32),
    "2d": np.array([[1, 0, 1, 1], [1, 1, 0, 0]], np.int32),
    "2d_row_all_masked": np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.int32),
    "3d": (np.arange(B * S * S).reshape(B, S, S) % 3 != 0).astype(np.int32),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask_filter_value", [None, -3.0])
def test_attention_masks_match_ort(mask, unidirectional, mask_filter_value):
    _, x, w, b = _attention_inputs(1)
    attrs = {"num_heads": N, "unidirectional": unidirectional}
    if mask_filter_value is not None:
        attrs["mask_filter_value"] = mask_filter_value
    check("Attention", attention, [x, w, b, MASKS[mask]], attrs, n_outputs=2)


@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_with_past_matches_ort(unidirectional, with_mask):
    r, x, w, b = _attention_inputs(2)
    past = randn(r, 2, B, N, 3, H)
    mask = np.array([[1] * 7, [0, 1, 1, 1, 1, 1, 0]], np.int32) if with_mask else None
    got, _ = check("Attention", attention, [x, w, b, mask, past], {"num_heads": N, "unidirectional": unidirectional},
                   n_outputs=2)
    assert got[1].shape == (2, B, N, 3 + S, H)


def test_attention_bias_scale_and_qkv_hidden_sizes_match_ort():
    r, x, w, b = _attention_inputs(3, sizes=(D, D, 24))
    bias = randn(r, 1, N, S, S)
    check("Attention", attention, [x, w, b, None, None, bias],
          {"num_heads": N, "scale": 0.2, "qkv_hidden_sizes": [D, D, 24]}, n_outputs=1)


def test_attention_fp16_runs_through_cast_and_matches():
    _, x, w, b = _attention_inputs(4)
    h = np.float16
    check("Attention", attention, [x.astype(h), w.astype(h), b.astype(h), MASKS["lengths"]], {"num_heads": N},
          n_outputs=2)


def _mha_inputs(seed, s=S, kv=5):
    r = rng(seed)
    return r, randn(r, B, s, D), randn(r, B, kv, D), randn(r, B, kv, D), randn(r, 3 * D)


@pytest.mark.parametrize("mask", ["none", "lengths", "2d", "3d"])
@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("past", [0, 3])
def test_mha_matches_ort(mask, unidirectional, past):
    """Cross attention (S=4 queries, L=5 keys), with and without past; causal uses ORT's top-left rule."""
    r, q, k, v, bias = _mha_inputs(5)
    total = past + 5
    m = {"none": None, "lengths": np.array([total - 1, 2], np.int32),
         "2d": (r.random((B, total)) > 0.3).astype(np.int32),
         "3d": (r.random((B, S, total)) > 0.3).astype(np.int32)}[mask]
    pk, pv = (randn(r, B, N, past, H), randn(r, B, N, past, H)) if past else (None, None)
    check("MultiHeadAttention", multi_head_attention, [q, k, v, bias, m, None, pk, pv],
          {"num_heads": N, "unidirectional": unidirectional, "mask_filter_value": -5.0}, n_outputs=3)


def test_mha_self_attention_decode_step_matches_ort():
    r, q, k, v, bias = _mha_inputs(6, s=1, kv=1)
    pk, pv = randn(r, B, N, 6, H), randn(r, B, N, 6, H)
    mask = np.array([[1] * 7, [1] * 5 + [0, 1]], np.int32)
    got, _ = check("MultiHeadAttention", multi_head_attention, [q, k, v, bias, mask, None, pk, pv],
                   {"num_heads": N, "unidirectional": 1}, n_outputs=3)
    assert got[1].shape == (B, N, 7, H)


def test_mha_attention_bias_and_bnsh_key_value_match_ort():
    r, q, _, _, bias = _mha_inputs(7)
    kb, vb = randn(r, B, N, 5, H), randn(r, B, N, 5, H)
    ab = randn(r, B, N, S, 5)
    check("MultiHeadAttention", multi_head_attention, [q, kb, vb, bias, None, ab], {"num_heads": N, "scale": 0.3},
          n_outputs=3)


def test_mha_fp16_runs_through_cast_and_matches():
    _, q, k, v, bias = _mha_inputs(8)
    h = np.float16
    check("MultiHeadAttention", multi_head_attention, [q.astype(h), k.astype(h), v.astype(h), bias.astype(h)],
          {"num_heads": N, "unidirectional": 1}, n_outputs=3)


def test_mha_packed_layouts_are_cuda_only():
    """ORT's CPU kernel rejects packed QKV (B, S, N, 3, H); the reference refuses it too."""
    qkv = randn(rng(9), B, S, N, 3, H)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own refusal; its wording is not matched
        run_ort("MultiHeadAttention", [qkv], {"num_heads": N}, n_outputs=1)
    with pytest.raises(NotImplementedError):
        multi_head_attention(qkv, num_heads=N)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 5), past=st.integers(0, 4), n=st.sampled_from([1, 2, 4]),
       h=st.sampled_from([4, 8, 16]), uni=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_mha_self_attention_property(b, s, past, n, h, uni, seed):
    r = rng(seed)
    d = n * h
    q, k, v, bias = randn(r, b, s, d), randn(r, b, s, d), randn(r, b, s, d), randn(r, 3 * d)
    lengths = r.integers(1, past + s + 1, b).astype(np.int32)
    pk, pv = (randn(r, b, n, past, h), randn(r, b, n, past, h)) if past else (None, None)
    check("MultiHeadAttention", multi_head_attention, [q, k, v, bias, lengths, None, pk, pv],
          {"num_heads": n, "unidirectional": uni}, n_outputs=3)


def test_attention_equals_mha_on_projected_inputs():
    """Attention(x, W, b) is MHA(x W_q, x W_k, x W_v, b) for the same mask and causal flag."""
    _, x, w, b = _attention_inputs(10)
    mask = MASKS["2d"]
    a_out, present = attention(x, w, b, mask, num_heads=N, unidirectional=1)
    q, k, v = np.split(x @ w, 3, axis=-1)
    m_out, pk, pv = multi_head_attention(q, k, v, b, mask, num_heads=N, unidirectional=1)
    np.testing.assert_allclose(a_out, m_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(present[0], pk, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(present[1], pv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Attention", "MultiHeadAttention"])
def test_causal_mask_excludes_even_when_every_visible_key_is_padded(op):
    """Query 0 may only see key 0, which the padding mask hides: ORT still gives key 0 all the weight, so the
    causal mask is an exclusion, not another -10000 (mask_filter_value is -1e9 here)."""
    _, x, w, b = _attention_inputs(11)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    attrs = {"num_heads": N, "unidirectional": 1, "mask_filter_value": -1e9}
    if op == "Attention":
        _, ref = check(op, attention, [x, w, b, mask], attrs, n_outputs=1)
    else:
        q, k, v = np.split(x @ w + b, 3, axis=-1)
        _, ref = check(op, multi_head_attention, [q, k, v, None, mask], attrs, n_outputs=1)
    v0 = np.split(x @ w + b, 3, axis=-1)[2][0, 0]
    np.testing.assert_allclose(ref[0][0, 0], v0, rtol=1e-5, atol=1e-6)
