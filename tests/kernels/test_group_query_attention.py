"""GroupQueryAttention reference against onnxruntime's CPU kernel (float32 and float16)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_ort import assert_close, randn, rng, run_ort
from onnxc.kernels.group_query_attention import group_query_attention as gqa

N, NKV, H = 4, 2, 16


def caches(r, max_seq=64, half=H // 2, dtype=np.float32):
    angle = r.uniform(0, 6.3, (max_seq, half))
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def compare(inputs, attrs, valid_rows=None):
    """Run ORT and the reference; compare output (only rows marked valid) and both present caches."""
    got = run_ort("GroupQueryAttention", inputs, attrs, n_outputs=3)
    ref = gqa(*inputs, **attrs)
    out_got, out_ref = got[0], ref[0]
    if valid_rows is not None:
        out_got, out_ref = out_got[valid_rows], out_ref[valid_rows]
    assert_close(out_got, out_ref, err_msg="output")
    assert_close(got[1], ref[1], err_msg="present_key")
    assert_close(got[2], ref[2], err_msg="present_value")
    return got, ref


def qkv(r, b, s, n=N, nkv=NKV, h=H, dtype=np.float32):
    return randn(r, b, s, n * h, dtype=dtype), randn(r, b, s, nkv * h, dtype=dtype), randn(r, b, s, nkv * h,
                                                                                            dtype=dtype)


def i32(*v):
    return np.array(v, np.int32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rotary", [None, "halves", "interleaved"])
@pytest.mark.parametrize("packed", [False, True])
def test_gqa_prompt_matches_ort(dtype, rotary, packed):
    r = rng(1)
    b, s = 2, 6
    q, k, v = qkv(r, b, s, dtype=dtype)
    cos, sin = caches(r, dtype=dtype)
    inputs = [np.concatenate([q, k, v], -1), None, None] if packed else [q, k, v]
    inputs += [None, None, i32(s - 1, s - 1), np.array(s, np.int32)]
    attrs = {"num_heads": N, "kv_num_heads": NKV}
    if rotary:
        inputs += [cos, sin]
        attrs.update(do_rotary=1, rotary_interleaved=int(rotary == "interleaved"))
    got, _ = compare(inputs, attrs)
    assert got[1].shape == (b, NKV, s, H)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("interleaved", [0, 1])
def test_gqa_decode_with_padded_batch_matches_ort(dtype, packed, interleaved):
    """Token generation: seqlens_k differ per batch entry (right padding); past buffer holds max past rows."""
    r = rng(2)
    b, past = 3, 7
    q, k, v = qkv(r, b, 1, dtype=dtype)
    pk, pv = randn(r, b, NKV, past, H, dtype=dtype), randn(r, b, NKV, past, H, dtype=dtype)
    cos, sin = caches(r, dtype=dtype)
    inputs = ([np.concatenate([q, k, v], -1), None, None] if packed else [q, k, v]) + [
        pk, pv, i32(7, 3, 5), np.array(8, np.int32), cos, sin]
    got, _ = compare(inputs, {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1, "rotary_interleaved": interleaved})
    assert got[1].shape == (b, NKV, 8, H)
    assert not got[1][1, :, 4:].any(), "rows past seqlens_k + 1 are zero in present"


def test_gqa_padded_prompt_matches_ort_on_valid_rows():
    r = rng(3)
    b, s = 3, 6
    q, k, v = qkv(r, b, s)
    cos, sin = caches(r)
    lens = i32(5, 2, 4)
    valid = np.arange(s)[None, :] <= lens[:, None]
    compare([q, k, v, None, None, lens, np.array(s, np.int32), cos, sin],
            {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1}, valid_rows=valid)


def test_gqa_partial_rotary_matches_ort():
    """cos_cache narrower than head_size / 2 rotates only the first 2 * cos_cache.shape[1] dims."""
    r = rng(4)
    h = 32
    q, k, v = qkv(r, 1, 5, h=h)
    cos, sin = caches(r, half=8)
    compare([q, k, v, None, None, i32(4), np.array(5, np.int32), cos, sin],
            {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1})


@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("phase", ["prompt", "decode"])
def test_gqa_local_window_matches_ort(window, phase):
    """local_window_size = W: a query sees itself and the W - 1 keys before it."""
    r = rng(5)
    if phase == "prompt":
        q, k, v = qkv(r, 2, 7)
        inputs = [q, k, v, None, None, i32(6, 6), np.array(7, np.int32)]
    else:
        q, k, v = qkv(r, 2, 1)
        inputs = [q, k, v, randn(r, 2, NKV, 6, H), randn(r, 2, NKV, 6, H), i32(6, 4), np.array(7, np.int32)]
    compare(inputs, {"num_heads": N, "kv_num_heads": NKV, "local_window_size": window})


def test_gqa_window_of_one_returns_value():
    r = rng(6)
    q, k, v = qkv(r, 1, 4, n=2, nkv=2)
    out, _, _ = gqa(q, k, v, None, None, i32(3), np.array(4, np.int32), num_heads=2, kv_num_heads=2,
                    local_window_size=1)
    np.testing.assert_allclose(out, v, rtol=1e-6)


@pytest.mark.parametrize("softcap", [0.0, 0.5, 30.0])
@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_gqa_softcap_and_scale_match_ort(softcap, scale):
    r = rng(7)
    q, k, v = qkv(r, 2, 5)
    q *= 3
    compare([q, k, v, None, None, i32(4, 4), np.array(5, np.int32)],
            {"num_heads": N, "kv_num_heads": NKV, "softcap": softcap, "scale": scale})


@pytest.mark.parametrize("n,nkv", [(2, 2), (4, 1), (8, 2)])
def test_gqa_head_groupings_match_ort(n, nkv):
    r = rng(8)
    q, k, v = qkv(r, 2, 1, n=n, nkv=nkv)
    pk, pv = randn(r, 2, nkv, 4, H), randn(r, 2, nkv, 4, H)
    compare([q, k, v, pk, pv, i32(4, 2), np.array(5, np.int32)], {"num_heads": n, "kv_num_heads": nkv})


def test_gqa_shared_buffer_layout_matches_ort():
    """past_key of max_seq rows (> total): present keeps max_seq rows, new K/V written at row seqlens_k."""
    r = rng(9)
    q, k, v = qkv(r, 2, 1)
    pk, pv = randn(r, 2, NKV, 16, H), randn(r, 2, NKV, 16, H)
    cos, sin = caches(r)
    got, _ = compare([q, k, v, pk, pv, i32(5, 9), np.array(10, np.int32), cos, sin],
                     {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1})
    assert got[1].shape == (2, NKV, 16, H)


def test_gqa_chunked_prefill_matches_ort():
    """batch 1, S > 1 with past (S != total): positions and causal offsets start at seqlens_k + 1 - S."""
    r = rng(10)
    q, k, v = qkv(r, 1, 3)
    cos, sin = caches(r)
    compare([q, k, v, randn(r, 1, NKV, 5, H), randn(r, 1, NKV, 5, H), i32(7), np.array(8, np.int32), cos, sin],
            {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1, "local_window_size": 4})


def test_gqa_empty_past_on_prompt_matches_ort():
    r = rng(11)
    q, k, v = qkv(r, 2, 4)
    empty = np.zeros((2, NKV, 0, H), np.float32)
    compare([q, k, v, empty, empty, i32(3, 3), np.array(4, np.int32)], {"num_heads": N, "kv_num_heads": NKV})


@pytest.mark.parametrize("phase", ["prompt", "decode"])
def test_gqa_position_ids_input_matches_ort(phase):
    """On the first prompt ORT reads only position_ids[0, 0] (positions p0 + s); later it uses the table."""
    r = rng(12)
    cos, sin = caches(r)
    if phase == "prompt":
        q, k, v = qkv(r, 2, 4)
        inputs = [q, k, v, None, None, i32(3, 3), np.array(4, np.int32), cos, sin,
                  np.array([[5, 9, 1, 2], [0, 0, 0, 0]], np.int64)]
    else:
        q, k, v = qkv(r, 2, 1)
        inputs = [q, k, v, randn(r, 2, NKV, 4, H), randn(r, 2, NKV, 4, H), i32(4, 2), np.array(5, np.int32),
                  cos, sin, np.array([[11], [3]], np.int64)]
    compare(inputs, {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1})


@pytest.mark.parametrize("bias_shape", [(1, 1), (2, N)])
@pytest.mark.parametrize("softcap", [0.0, 1.0])
def test_gqa_attention_bias_matches_ort(bias_shape, softcap):
    """attention_bias is added after the softcap."""
    r = rng(13)
    q, k, v = qkv(r, 2, 5)
    ab = randn(r, *bias_shape, 5, 5)
    compare([q, k, v, None, None, i32(4, 4), np.array(5, np.int32), None, None, None, ab],
            {"num_heads": N, "kv_num_heads": NKV, "softcap": softcap})


@pytest.mark.parametrize("sink", ["head_sink", "smooth_softmax"])
def test_gqa_softmax_sink_matches_ort(sink):
    r = rng(14)
    q, k, v = qkv(r, 2, 5)
    inputs = [q, k, v, None, None, i32(4, 4), np.array(5, np.int32)]
    attrs = {"num_heads": N, "kv_num_heads": NKV}
    if sink == "head_sink":
        inputs += [None, None, None, None, randn(r, N)]
    else:
        attrs["smooth_softmax"] = 1
    compare(inputs, attrs)


def test_gqa_incremental_decode_equals_full_prompt():
    """Prompt of 4 then 3 decode steps, feeding present back as past, gives the same last outputs as one prompt
    of all 7 tokens (reference and ORT agree at each step)."""
    r = rng(15)
    total = 7
    q, k, v = qkv(r, 1, total)
    cos, sin = caches(r)
    attrs = {"num_heads": N, "kv_num_heads": NKV, "do_rotary": 1}
    full, _, _ = gqa(q, k, v, None, None, i32(total - 1), np.array(total, np.int32), cos, sin, **attrs)
    _, (out, pk, pv) = compare([q[:, :4], k[:, :4], v[:, :4], None, None, i32(3), np.array(4, np.int32), cos, sin],
                               attrs)
    for t in range(4, total):
        _, (out, pk, pv) = compare([q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pk, pv, i32(t),
                                    np.array(t + 1, np.int32), cos, sin], attrs)
        np.testing.assert_allclose(out[0, 0], full[0, t], rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), decode=st.booleans(), s=st.integers(1, 5), past=st.integers(1, 6),
       group=st.sampled_from([(2, 2), (4, 2), (6, 3), (4, 1)]), h=st.sampled_from([16, 32]),
       rotary=st.sampled_from([None, "halves", "interleaved", "partial"]), packed=st.booleans(),
       window=st.sampled_from([-1, 1, 3]), softcap=st.sampled_from([0.0, 2.0]),
       dtype=st.sampled_from([np.float32, np.float16]), seed=st.integers(0, 2**16))
def test_gqa_property(b, decode, s, past, group, h, rotary, packed, window, softcap, dtype, seed):
    r = rng(seed)
    n, nkv = group
    if decode:
        q, k, v = qkv(r, b, 1, n, nkv, h, dtype)
        lens = r.integers(1, past + 1, b).astype(np.int32)  # seqlens_k = past rows used
        pk, pv = randn(r, b, nkv, past, h, dtype=dtype), randn(r, b, nkv, past, h, dtype=dtype)
        total, valid = int(lens.max()) + 1, None
    else:
        q, k, v = qkv(r, b, s, n, nkv, h, dtype)
        lens = r.integers(0, s, b).astype(np.int32)
        lens[0] = s - 1
        pk = pv = None
        total, valid = s, np.arange(s)[None, :] <= lens[:, None]
    inputs = ([np.concatenate([q, k, v], -1), None, None] if packed else [q, k, v]) + [
        pk, pv, lens, np.array(total, np.int32)]
    attrs = {"num_heads": n, "kv_num_heads": nkv, "local_window_size": window, "softcap": softcap}
    if rotary:
        cos, sin = caches(r, 16, 8 if rotary == "partial" else h // 2, dtype)  # partial only when h = 32
        inputs += [cos, sin]
        attrs.update(do_rotary=1, rotary_interleaved=int(rotary == "interleaved"))
    compare(inputs, attrs, valid_rows=valid)
