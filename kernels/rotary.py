"""Rotary position embedding (com.microsoft RotaryEmbedding) and the helper GroupQueryAttention reuses.

For a head vector x (head_size), rotary_dim r <= head_size, and c = cos_cache[pos], s = sin_cache[pos] (r/2 each):

    non-interleaved (halves):   x1 = x[:r/2], x2 = x[r/2:r]
                                out[:r/2] = x1*c - x2*s,   out[r/2:r] = x2*c + x1*s
    interleaved (pairs):        x1 = x[0:r:2], x2 = x[1:r:2]
                                out[0:r:2] = x1*c - x2*s,  out[1:r:2] = x2*c + x1*s
    out[r:] = x[r:]             (partial rotary leaves the tail untouched)

RotaryEmbedding inputs: input (B, S, hidden) or (B, N, S, H) [BNSH], position_ids int64 (1,) meaning
positions p0 + s, or (B, S); cos_cache, sin_cache (max_seq, r/2). Attributes: interleaved, num_heads,
rotary_embedding_dim (0 means r = 2 * cos_cache.shape[1] = head_size), scale and is_packed_batching (ORT's CPU
kernel ignores both; the reference does too). For 3-D input, head_size = hidden / num_heads when
rotary_embedding_dim is set, else 2 * cos_cache.shape[1]. Computed in float32, returned in the input dtype.
"""

from __future__ import annotations

import numpy as np


def apply_rotary(x, cos, sin, interleaved=False, rotary_dim=None):
    """Rotate the last axis of x by (cos, sin), which broadcast against x[..., :rotary_dim // 2].

    rotary_dim defaults to 2 * cos.shape[-1]. Returns float32 (callers cast).
    """
    xf = np.asarray(x, dtype=np.float32)
    r = 2 * np.shape(cos)[-1] if rotary_dim is None else rotary_dim
    c = np.asarray(cos, dtype=np.float32)[..., : r // 2]
    s = np.asarray(sin, dtype=np.float32)[..., : r // 2]
    out = xf.copy()
    if interleaved:
        x1, x2 = xf[..., 0:r:2], xf[..., 1:r:2]
        out[..., 0:r:2] = x1 * c - x2 * s
        out[..., 1:r:2] = x2 * c + x1 * s
    else:
        x1, x2 = xf[..., : r // 2], xf[..., r // 2 : r]
        out[..., : r // 2] = x1 * c - x2 * s
        out[..., r // 2 : r] = x2 * c + x1 * s
    return out


def positions(position_ids, batch: int, seq: int) -> np.ndarray:
    """(B, S) int64 positions from RotaryEmbedding's position_ids: a 1-element start offset or a (B, S) table."""
    p = np.asarray(position_ids, dtype=np.int64)
    if p.size == 1:
        return np.broadcast_to(p.reshape(()) + np.arange(seq, dtype=np.int64), (batch, seq))
    return p.reshape(batch, seq)


def rotary_embedding(input, position_ids, cos_cache, sin_cache, *, interleaved=0, num_heads=0,
                     rotary_embedding_dim=0, scale=1.0, is_packed_batching=0):
    """com.microsoft RotaryEmbedding. Returns the rotated tensor, same shape and dtype as input."""
    x = np.asarray(input)
    half = np.shape(cos_cache)[1]
    r = rotary_embedding_dim if rotary_embedding_dim > 0 else 2 * half
    if x.ndim == 4:  # (B, N, S, H)
        b, _, s, h = x.shape
        if r > h:
            raise ValueError(f"rotary dim {r} exceeds head size {h}")
        xh = x
    else:  # (B, S, hidden) -> (B, N, S, H)
        b, s, hidden = x.shape
        h = hidden // num_heads if rotary_embedding_dim > 0 else r
        xh = x.reshape(b, s, hidden // h, h).transpose(0, 2, 1, 3)
    pos = positions(position_ids, b, s)
    cos = np.asarray(cos_cache)[pos][:, None]  # (B, 1, S, r/2)
    sin = np.asarray(sin_cache)[pos][:, None]
    y = apply_rotary(xh, cos, sin, bool(interleaved), r).astype(x.dtype)
    if x.ndim == 3:
        y = y.transpose(0, 2, 1, 3).reshape(x.shape)
    return y
