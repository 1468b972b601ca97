"""com.microsoft GatherBlockQuantized: Gather over a block-quantized table, dequantized on the fly.

Inputs: data, indices (int32/int64, any rank), scales (same rank as data, the quantize axis shortened to
ceil(dim / block_size)), zero_points? (same type and packing as data). Attributes: gather_axis (0),
quantize_axis (1), block_size (128), bits (4; used for uint8 data).

data is either
    int4 / uint4        (numpy: ml_dtypes.int4 / uint4, one value per element), any gather/quantize axes;
    uint8 with bits     codes packed along the last axis, low bits first (bits 2, 4 or 8: four, two or one per
                        byte); ORT requires gather_axis = 0 and quantize_axis = last.
Default zero point: 0 for int4 and uint4, 2^(bits-1) for uint8.

    out[..., i, ...] = (data[..., indices[i], ...] - zp[block]) * scale[block]     block = position // block_size
                                                                                   along quantize_axis
Negative indices wrap; an index outside [-n, n) yields zeros (ORT's rule, unlike ONNX Gather). The output has
scales' dtype and shape data.shape[:g] + indices.shape + data.shape[g+1:] (logical, unpacked data shape).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .matmul_nbits import unpack_bits


def values(data, bits: int = 4) -> np.ndarray:
    """Logical integer values of `data` (int32), unpacking uint8 codes along the last axis."""
    d = np.asarray(data)
    if d.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        return d.astype(np.int32)
    if d.dtype == np.uint8:
        return unpack_bits(d, bits).astype(np.int32)
    raise TypeError(f"GatherBlockQuantized: unsupported data dtype {d.dtype}")


def _expand(t: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    """Repeat per-block entries along `axis` to per-element, trimmed to `length`."""
    return np.repeat(t, block_size, axis=axis).take(np.arange(length), axis=axis)


def gather_block_quantized(data, indices, scales, zero_points=None, *, gather_axis=0, quantize_axis=1,
                           block_size=128, bits=4):
    """GatherBlockQuantized reference (integer data types)."""
    v = values(data, bits)
    rank = v.ndim
    ga, qa = gather_axis % rank, quantize_axis % rank
    sc = np.asarray(scales)
    if zero_points is None:
        default = 2 ** (bits - 1) if np.asarray(data).dtype == np.uint8 else 0
        zp = np.full(sc.shape, default, np.int32)
    else:
        zp = values(zero_points, bits)[tuple(slice(0, n) for n in sc.shape)]
    idx = np.asarray(indices, np.int64)
    n = v.shape[ga]
    outside = (idx < -n) | (idx >= n)
    idx = np.where(outside, 0, np.where(idx < 0, idx + n, idx))
    if ga == qa:
        sc, zp = (_expand(t, qa, block_size, n) for t in (sc, zp))
    g_v, g_sc, g_zp = (np.take(t, idx, axis=ga) for t in (v, sc, zp))
    if ga != qa:
        qa_out = qa + idx.ndim - 1 if qa > ga else qa
        g_sc, g_zp = (_expand(t, qa_out, block_size, g_v.shape[qa_out]) for t in (g_sc, g_zp))
    out = (g_v - g_zp).astype(np.float32) * g_sc.astype(np.float32)
    keep = ~outside.reshape((1,) * ga + idx.shape + (1,) * (rank - ga - 1))
    return np.where(keep, out, 0).astype(sc.dtype)
