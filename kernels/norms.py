"""Normalization ops: LayerNormalization, SimplifiedLayerNormalization (RMSNorm) and their ORT contrib fusions.

Math (over the normalized axes, in float32; float64 inputs stay float64):

    LayerNorm:   mean = E[x],  inv_std = 1 / sqrt(Var[x] + eps),  y = (x - mean) * inv_std * scale + bias
    RMSNorm:     inv_std = 1 / sqrt(E[x^2] + eps),                 y = x * inv_std * scale

The Skip* fusions first form s = input + skip (+ bias) and normalize s over the last axis; `skip` broadcasts from
(B, S, H), (1, S, H) or (S, H). Outputs are in the input dtype; mean and inv_std_var are float32 with the normalized
axes kept as size 1 (ORT's shape, e.g. (B, S, 1)).

Output order (as ORT registers them):
    SimplifiedLayerNormalization (domain ""):            Y, inv_std_var
    LayerNormalization (domain ""):                      Y, mean, inv_std_var
    SkipLayerNormalization (com.microsoft):              output, mean, inv_std_var, input_skip_bias_sum
    SkipSimplifiedLayerNormalization (com.microsoft):    output, mean (always zeros), inv_std_var, input_skip_bias_sum
    EmbedLayerNormalization (com.microsoft):             output, mask_index, embedding_sum
"""

from __future__ import annotations

import numpy as np

from ._common import compute_dtype, f32


def _axes(x: np.ndarray, axis: int) -> tuple[int, ...]:
    axis = axis % x.ndim
    return tuple(range(axis, x.ndim))


def simplified_layer_norm(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    """SimplifiedLayerNormalization (RMSNorm). Inputs X, scale; attrs axis, epsilon, stash_type.

    Returns (Y, inv_std_var); Y has scale's dtype (ORT's V), inv_std_var is float32.
    """
    ct = compute_dtype(x, scale)
    xf = f32(x, ct)
    axes = _axes(xf, axis)
    inv = 1.0 / np.sqrt(np.mean(xf * xf, axis=axes, keepdims=True) + ct(epsilon))
    y = xf * inv * f32(scale, ct)
    return y.astype(np.asarray(scale).dtype), inv.astype(np.float32)


def layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    """LayerNormalization (opset 17). Inputs X, Scale, B?; attrs axis, epsilon, stash_type.

    Returns (Y, mean, inv_std_var); Y in X's dtype, mean/inv_std_var float32.
    """
    ct = compute_dtype(x, scale)
    xf = f32(x, ct)
    axes = _axes(xf, axis)
    mean = np.mean(xf, axis=axes, keepdims=True)
    d = xf - mean
    inv = 1.0 / np.sqrt(np.mean(d * d, axis=axes, keepdims=True) + ct(epsilon))
    y = d * inv * f32(scale, ct)
    if bias is not None:
        y = y + f32(bias, ct)
    return y.astype(np.asarray(x).dtype), mean.astype(np.float32), inv.astype(np.float32)


def _skip_sum(inp, skip, bias, ct):
    s = f32(inp, ct) + f32(skip, ct)
    if bias is not None:
        s = s + f32(bias, ct)
    return s


def skip_layer_norm(input, skip, gamma, beta=None, bias=None, *, epsilon=1e-12):
    """SkipLayerNormalization: LayerNorm(input + skip + bias) * gamma + beta over the last axis.

    Returns (output, mean, inv_std_var, input_skip_bias_sum).
    """
    dt = np.asarray(input).dtype
    ct = compute_dtype(input)
    s = _skip_sum(input, skip, bias, ct)
    y, mean, inv = layer_norm(s, f32(gamma, ct), f32(beta, ct), axis=-1, epsilon=epsilon)
    return y.astype(dt), mean, inv, s.astype(dt)


def skip_simplified_layer_norm(input, skip, gamma, bias=None, *, epsilon=1e-12):
    """SkipSimplifiedLayerNormalization: RMSNorm(input + skip + bias) * gamma over the last axis.

    Returns (output, mean, inv_std_var, input_skip_bias_sum); ORT fills `mean` with zeros.
    """
    dt = np.asarray(input).dtype
    ct = compute_dtype(input)
    s = _skip_sum(input, skip, bias, ct)
    y, inv = simplified_layer_norm(s, f32(gamma, ct), axis=-1, epsilon=epsilon)
    return y.astype(dt), np.zeros_like(inv), inv, s.astype(dt)


def embed_layer_norm(input_ids, segment_ids, word_embedding, position_embedding, segment_embedding=None,
                     gamma=None, beta=None, mask=None, position_ids=None, *, epsilon=1e-12, mask_index_type=1):
    """EmbedLayerNormalization (BERT embeddings + LayerNorm).

        e = word_embedding[input_ids] + position_embedding[position_ids] (+ segment_embedding[segment_ids])
        output = LayerNorm(e) * gamma + beta

    position_ids defaults to arange(S) and broadcasts from (1, S). mask_index[b] is the number of entries equal
    to 1 in mask[b] (ORT counts ones; it is not the position of the first 0), zeros when mask is absent.
    Returns (output, mask_index int32 [B], embedding_sum).
    """
    ids = np.asarray(input_ids)
    dt = np.asarray(word_embedding).dtype
    b, s = ids.shape
    pos = np.arange(s)[None, :] if position_ids is None else np.asarray(position_ids)
    e = f32(word_embedding)[ids] + f32(position_embedding)[np.broadcast_to(pos, (b, s))]
    if segment_embedding is not None and segment_ids is not None:
        e = e + f32(segment_embedding)[np.asarray(segment_ids)]
    y, _, _ = layer_norm(e, f32(gamma), f32(beta), axis=-1, epsilon=epsilon)
    if mask is None:
        mask_index = np.zeros(b, np.int32)
    else:
        mask_index = (np.asarray(mask) == 1).sum(axis=1).astype(np.int32)
    return y.astype(dt), mask_index, e.astype(dt)
