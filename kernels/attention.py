"""com.microsoft Attention (BERT style, packed QKV projection) and MultiHeadAttention.

Both compute, per batch b and head n (float32, softmax over the key axis):

    P = softmax(scale * Q K^T + attention_bias + M),   out = P V,   scale defaults to 1/sqrt(head_size)

M is the mask as ORT's CPU kernels apply it (float32):
    + mask_filter_value (default -10000, not -inf) where the key-padding mask hides key j from query i, so a row
      whose keys are all padded degrades to a softmax of the shifted scores instead of NaN, as in ORT;
    + -inf where the causal ("unidirectional") rule hides it: j > P + i, with P the past length, for every query
      row except the last one, which ORT leaves causally unmasked. With self attention (S new keys for S queries)
      this is the usual causal mask; for cross attention (S != L) it is ORT's top-left alignment. A causally
      hidden key never receives weight, even when every visible key is padded.

Mask forms (int32):
    (B,)            right-padding lengths: keys j >= len[b] are masked
    (2B,)           Attention only: ends then starts: keys j >= end[b] or j < start[b] are masked
    (B, T)          1 = attend, 0 = masked (MHA also accepts (B, kv_sequence_length) without past)
    (B, S, T)       per-query 0/1 mask
"""

from __future__ import annotations

import numpy as np

from ._common import softmax


def _padding_keep(mask, batch: int, seq: int, total: int) -> np.ndarray:
    """(B, S, T) bool table of attendable keys from an ORT mask_index / key_padding_mask."""
    m = np.asarray(mask)
    j = np.arange(total)
    if m.ndim == 1 and m.shape[0] == batch:
        keep = j[None, :] < m[:, None]
    elif m.ndim == 1 and m.shape[0] == 2 * batch:
        keep = (j[None, :] < m[:batch, None]) & (j[None, :] >= m[batch:, None])
    elif m.ndim == 2:
        if m.shape[1] != total:
            raise ValueError(f"2-D mask has {m.shape[1]} columns, expected total length {total}")
        keep = m != 0
    elif m.ndim == 3:
        return np.broadcast_to(m != 0, (batch, seq, total))
    else:
        raise NotImplementedError(f"mask of shape {m.shape} is not supported by ORT's CPU kernel")
    return np.broadcast_to(keep[:, None, :], (batch, seq, total))


def additive_mask(mask, batch: int, seq: int, total: int, past: int, causal: bool,
                  mask_filter_value: float) -> np.ndarray:
    """(B, 1, S, T) float32 additive mask following ORT's CPU PrepareMask (see module doc)."""
    add = np.zeros((batch, seq, total), np.float32)
    if mask is not None:
        add += np.where(_padding_keep(mask, batch, seq, total), np.float32(0), np.float32(mask_filter_value))
    if causal:
        j, i = np.arange(total)[None, :], np.arange(seq)[:, None]
        add += np.where((j > past + i) & (i < seq - 1), np.float32(-np.inf), np.float32(0))
    return add[:, None]


def sdpa(q, k, v, add=None, scale=0.0):
    """Scaled dot-product attention on (B, N, S, H) x (B, N, T, H) x (B, N, T, Hv) -> (B, S, N * Hv) float32."""
    scale = scale if scale else 1.0 / np.sqrt(q.shape[-1])
    scores = np.float32(scale) * np.matmul(q, np.swapaxes(k, -1, -2))
    if add is not None:
        scores = scores + add
    out = np.matmul(softmax(scores), v)
    b, n, s, hv = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, s, n * hv)


def _heads(x, n: int) -> np.ndarray:
    """(B, S, N*H) -> (B, N, S, H) float32."""
    b, s, d = x.shape
    return np.asarray(x, np.float32).reshape(b, s, n, d // n).transpose(0, 2, 1, 3)


def attention(input, weights, bias=None, mask_index=None, past=None, attention_bias=None, past_sequence_length=None,
              *, num_heads, scale=0.0, unidirectional=0, qkv_hidden_sizes=None, mask_filter_value=-10000.0,
              do_rotary=0, past_present_share_buffer=0, rotary_embedding_dim=0):
    """com.microsoft Attention.

    Inputs: input (B, S, D_in); weights (D_in, D + D + D_v); bias (D + D + D_v); mask_index (see module doc);
    past (2, B, N, P, H); attention_bias (B|1, N|1, S, T). Attributes: num_heads, scale, unidirectional,
    qkv_hidden_sizes ([D, D, D_v], default equal thirds), mask_filter_value.
    Returns (output (B, S, D_v), present (2, B, N, P + S, H)).
    """
    if do_rotary or past_present_share_buffer or past_sequence_length is not None:
        raise NotImplementedError("Attention: do_rotary and past/present buffer sharing are not modelled")
    x = np.asarray(input, np.float32)
    b, s, _ = x.shape
    qkv = x @ np.asarray(weights, np.float32)
    if bias is not None:
        qkv = qkv + np.asarray(bias, np.float32)
    dq, dk, dv = qkv_hidden_sizes if qkv_hidden_sizes else [qkv.shape[-1] // 3] * 3
    q = _heads(qkv[..., :dq], num_heads)
    k = _heads(qkv[..., dq : dq + dk], num_heads)
    v = _heads(qkv[..., dq + dk : dq + dk + dv], num_heads)
    n_past = 0
    if past is not None:
        p = np.asarray(past, np.float32)
        n_past = p.shape[3]
        k = np.concatenate([p[0], k], axis=2)
        v = np.concatenate([p[1], v], axis=2)
    total = k.shape[2]
    add = additive_mask(mask_index, b, s, total, n_past, bool(unidirectional), mask_filter_value)
    if attention_bias is not None:
        add = add + np.asarray(attention_bias, np.float32)
    out = sdpa(q, k, v, add, scale)
    dt = np.asarray(input).dtype
    present = np.stack([k, v]).astype(dt) if k.shape[-1] == v.shape[-1] else None
    return out.astype(dt), present


def multi_head_attention(query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                         past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None,
                         *, num_heads, scale=0.0, unidirectional=0, mask_filter_value=-10000.0):
    """com.microsoft MultiHeadAttention.

    Layouts: query (B, S, D); key (B, L, D) and value (B, L, D_v), with bias (D + D + D_v) added to Q, K and V;
    or key/value already projected in BNSH (B, N, L, H), where only the Q third of bias applies. (The packed
    QKV / KV layouts are CUDA-only in ORT and are not modelled.) past_key/past_value (B, N, P, H) are prepended to
    K/V. Masks: key_padding_mask as in the module doc, attention_bias (B|1, N|1, S, T).
    Attributes: num_heads, scale, unidirectional, mask_filter_value.
    Returns (output (B, S, D_v), present_key, present_value) with present (B, N, P + L, H).
    """
    if past_sequence_length is not None or cache_indirection is not None:
        raise NotImplementedError("MultiHeadAttention: buffer sharing / beam search inputs are not modelled")
    if np.ndim(query) != 3 or key is None or np.ndim(key) == 5:
        raise NotImplementedError("MultiHeadAttention: packed QKV / KV layouts are not modelled")
    x = np.asarray(query, np.float32)
    b, s, d = x.shape
    k, v = np.asarray(key, np.float32), np.asarray(value, np.float32)
    bias_f = None if bias is None else np.asarray(bias, np.float32)
    if bias_f is not None:
        x = x + bias_f[:d]
    q = _heads(x, num_heads)
    if k.ndim == 3:
        if bias_f is not None:
            k = k + bias_f[d : 2 * d]
            v = v + bias_f[2 * d :]
        k, v = _heads(k, num_heads), _heads(v, num_heads)
    n_past = 0
    if past_key is not None:
        n_past = np.shape(past_key)[2]
        k = np.concatenate([np.asarray(past_key, np.float32), k], axis=2)
        v = np.concatenate([np.asarray(past_value, np.float32), v], axis=2)
    total = k.shape[2]
    add = additive_mask(key_padding_mask, b, s, total, n_past, bool(unidirectional), mask_filter_value)
    if attention_bias is not None:
        add = add + np.asarray(attention_bias, np.float32)
    out = sdpa(q, k, v, add, scale)
    dt = np.asarray(query).dtype
    return out.astype(dt), k.astype(dt), v.astype(dt)
