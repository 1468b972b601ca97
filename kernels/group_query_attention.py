"""com.microsoft GroupQueryAttention, as ORT's CPU kernel computes it.

Inputs: query (B, S, N*H), or packed QKV (B, S, (N + 2*N_kv)*H) when key and value are absent; key, value
(B, S, N_kv*H); past_key, past_value (B, N_kv, P_buf, H) [BNSH]; seqlens_k int32 (B,) = total length - 1 per
batch entry (padding on the right); total_sequence_length int32 scalar = max total length; cos_cache, sin_cache
(max_seq, r/2); position_ids int64 (B, S)?; attention_bias (B|1, N|1, S, total)?; head_sink (N,)?.
Attributes: num_heads, kv_num_heads, scale (0 -> 1/sqrt(H)), softcap, local_window_size, do_rotary,
rotary_interleaved, smooth_softmax. Outputs: output (B, S, N*H), present_key, present_value.

Per batch entry b (ORT's rules, read from its CPU source and checked against it):
    first prompt   <=>  S == total_sequence_length; then past_b = 0 (the past buffer is ignored)
    otherwise            past_b = seqlens_k[b] + 1 - S   (token generation, or a chunk when B == 1)
    positions (rotary)   first prompt: 0..S-1 for every b (position_ids: only its first element, p0 + s);
                         otherwise past_b + s (position_ids, if given, are used as is)
    present              (B, N_kv, max(total_sequence_length, P_buf), H): rows [0, past_b) copied from past,
                         rows [past_b, past_b + S) the new (rotated) K/V, all other rows zero. P_buf > total is
                         ORT's shared-buffer layout (past and present of max length); the reference leaves rows
                         it does not write at zero, as ORT does when the buffers are distinct.
    attention            query s (absolute position t = past_b + s) sees key j iff j <= t and, with
                         local_window_size W > 0, j > t - W (a window of W keys including itself).
    scores               scale * q.k, then softcap * tanh(x / softcap) if softcap > 0, then + attention_bias;
                         softmax over the visible keys, with exp(head_sink[n]) (or exp(0) for smooth_softmax)
                         added to the denominator.
Query head n reads KV head n // (N / N_kv). With a right-padded first prompt, rows s > seqlens_k[b] are padding:
ORT's output there is unspecified; the reference computes them by the same rule. Computed in float32; rotated Q/K
are rounded to the input dtype, as ORT stores them.
"""

from __future__ import annotations

import numpy as np

from .rotary import apply_rotary


def _bnsh(x, n: int, h: int) -> np.ndarray:
    b, s, _ = x.shape
    return x.reshape(b, s, n, h).transpose(0, 2, 1, 3)


def group_query_attention(query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                          total_sequence_length=None, cos_cache=None, sin_cache=None, position_ids=None,
                          attention_bias=None, head_sink=None, *, num_heads, kv_num_heads, scale=0.0, softcap=0.0,
                          local_window_size=-1, do_rotary=0, rotary_interleaved=0, smooth_softmax=0,
                          causal=1, qk_output=0, sliding_window_cache=0, kv_cache_bit_width=0,
                          k_quant_type="NONE", v_quant_type="NONE", qk_norm_epsilon=1e-6):
    """GroupQueryAttention reference. Returns (output, present_key, present_value)."""
    if not causal or qk_output or sliding_window_cache or kv_cache_bit_width or k_quant_type != "NONE":
        raise NotImplementedError("GroupQueryAttention: non-causal, qk_output, windowed or quantized KV cache")
    dt = np.asarray(query).dtype
    x = np.asarray(query, np.float32)
    bsz, s, d = x.shape
    n, nkv = num_heads, kv_num_heads
    if key is None:
        h = d // (n + 2 * nkv)
        q, k, v = np.split(x, [n * h, (n + nkv) * h], axis=-1)
    else:
        h = d // n
        q, k, v = x, np.asarray(key, np.float32), np.asarray(value, np.float32)
    q, k, v = _bnsh(q, n, h), _bnsh(k, nkv, h), _bnsh(v, nkv, h)

    seqlens = np.asarray(seqlens_k, np.int64).reshape(bsz)
    total = int(np.asarray(total_sequence_length).reshape(()))
    first_prompt = s == total
    past_len = np.zeros(bsz, np.int64) if first_prompt else seqlens + 1 - s

    if do_rotary:
        steps = np.arange(s, dtype=np.int64)
        if position_ids is not None and first_prompt:
            pos = np.broadcast_to(np.asarray(position_ids).reshape(-1)[0] + steps, (bsz, s))
        elif position_ids is not None:
            pos = np.asarray(position_ids, np.int64).reshape(bsz, s)
        else:
            pos = past_len[:, None] + steps[None, :]
        cos = np.asarray(cos_cache)[pos][:, None]  # (B, 1, S, r/2)
        sin = np.asarray(sin_cache)[pos][:, None]
        q = apply_rotary(q, cos, sin, bool(rotary_interleaved)).astype(dt).astype(np.float32)
        k = apply_rotary(k, cos, sin, bool(rotary_interleaved)).astype(dt).astype(np.float32)

    p_buf = 0 if past_key is None else np.shape(past_key)[2]
    present_len = max(total, p_buf)
    present_k = np.zeros((bsz, nkv, present_len, h), np.float32)
    present_v = np.zeros_like(present_k)
    for b in range(bsz):
        p = past_len[b]
        if p:
            present_k[b, :, :p] = np.asarray(past_key[b, :, :p], np.float32)
            present_v[b, :, :p] = np.asarray(past_value[b, :, :p], np.float32)
        present_k[b, :, p : p + s] = k[b]
        present_v[b, :, p : p + s] = v[b]

    scale = scale if scale else 1.0 / np.sqrt(h)
    group = n // nkv
    out = np.zeros((bsz, n, s, h), np.float32)
    for b in range(bsz):
        length = past_len[b] + s
        kb = np.repeat(present_k[b, :, :length], group, axis=0)  # (N, L, H)
        vb = np.repeat(present_v[b, :, :length], group, axis=0)
        scores = np.float32(scale) * np.matmul(q[b], np.swapaxes(kb, -1, -2))  # (N, S, L)
        if softcap > 0:
            scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
        if attention_bias is not None:
            ab = np.asarray(attention_bias, np.float32)
            scores = scores + ab[b if ab.shape[0] > 1 else 0][:, :, :length]
        t = past_len[b] + np.arange(s)[:, None]
        j = np.arange(length)[None, :]
        visible = j <= t
        if local_window_size > 0:
            visible &= j > t - local_window_size
        scores = np.where(visible, scores, -np.inf)
        m = scores.max(axis=-1, keepdims=True)
        sink = None
        if head_sink is not None:
            sink = np.asarray(head_sink, np.float32).reshape(n, 1, 1)
        elif smooth_softmax:
            sink = np.zeros((n, 1, 1), np.float32)
        if sink is not None:
            m = np.maximum(m, sink)
        e = np.exp(scores - m)
        denom = e.sum(axis=-1, keepdims=True) + (0 if sink is None else np.exp(sink - m))
        out[b] = np.matmul(e / denom, vb)
    output = out.transpose(0, 2, 1, 3).reshape(bsz, s, n * h)
    return output.astype(dt), present_k.astype(dt), present_v.astype(dt)
