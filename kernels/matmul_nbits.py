"""com.microsoft MatMulNBits (block-quantized weight matmul) and the RTN quantizer that produces its layout.

Weight W is (K, N) as in Y = A @ W. It is quantized per column n in blocks of `block_size` along K
(k_blocks = ceil(K / block_size); the last block is zero-padded):

    B            uint8 (N, k_blocks, blob_size), blob_size = block_size * bits / 8; codes of one block are packed
                 low bits first (4-bit: element 2i in the low nibble of byte i, 2i+1 in the high nibble)
    scales       (N, k_blocks) (a flat (N * k_blocks,) is accepted), dtype of A
    zero_points  packed uint8 (N, ceil(k_blocks * bits / 8)), each row of N packed like B and padded to whole
                 bytes; or unpacked (N, k_blocks) in A's dtype; absent -> 2^(bits-1)
    g_idx        int32 (K,) block index of each k (deprecated; replaces k // block_size). ORT 1.31's CPU kernel
                 ignores packed uint8 zero points when g_idx is given (it uses 2^(bits-1)); the reference refuses
                 that combination rather than copy it.

    W[k, n] = (code[n, k] - zero_point[n, blk(k)]) * scale[n, blk(k)]      Y = A @ W (+ bias)

quantize_rtn reproduces ORT's own quantizer (MatMulNBitsQuantizer's RTN, MLAS blockwise quantization) bit for bit:
    symmetric:   m = the block's element of largest magnitude (its sign kept; the most negative wins a tie),
                 scale = m / -2^(bits-1) (so scales can be negative), zero point 2^(bits-1), not stored
    asymmetric:  lo = min(min, 0), hi = max(max, 0), scale = (hi - lo) / (2^bits - 1),
                 zp = roundf(-lo / scale) clamped to [0, 2^bits - 1]
    code = clamp(roundf(w / scale + zp), 0, 2^bits - 1), roundf rounding half away from zero; the padded tail of
    the last block gets code 0, and unused zero-point slots of the last packed byte hold 2^(bits-1).
"""

from __future__ import annotations

import numpy as np

from ._common import round_half_away


def pack_bits(codes: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Pack uint8 codes along `axis`, low bits first (8 / bits codes per byte; the axis length must divide)."""
    per = 8 // bits
    c = np.asarray(codes).astype(np.uint8)
    if per == 1:
        return c
    axis %= c.ndim
    c = c.reshape(c.shape[:axis] + (-1, per) + c.shape[axis + 1 :])
    lead = (slice(None),) * (axis + 1)
    out = c[lead + (0,)].copy()
    for i in range(1, per):
        out |= c[lead + (i,)] << np.uint8(bits * i)
    return out


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_bits: (..., L) bytes -> (..., L * 8 / bits) codes."""
    per = 8 // bits
    p = np.asarray(packed, np.uint8)
    if per == 1:
        return p
    mask = np.uint8((1 << bits) - 1)
    parts = [(p >> np.uint8(bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*p.shape[:-1], -1)


def unpack(b, k: int, bits: int = 4) -> np.ndarray:
    """Codes (N, K) uint8 from MatMulNBits' B (N, k_blocks, blob_size)."""
    b = np.asarray(b, np.uint8)
    return unpack_bits(b, bits).reshape(b.shape[0], -1)[:, :k]


def _block_index(k: int, block_size: int, g_idx=None) -> np.ndarray:
    return np.arange(k) // block_size if g_idx is None else np.asarray(g_idx, np.int64).reshape(k)


def zero_point_table(zero_points, n: int, k_blocks: int, bits: int) -> np.ndarray:
    """Zero points as a float32 (N, k_blocks) table from any of MatMulNBits' zero_points layouts."""
    if zero_points is None:
        return np.full((n, k_blocks), 2 ** (bits - 1), np.float32)
    zp = np.asarray(zero_points)
    if zp.dtype == np.uint8:
        return unpack_bits(zp.reshape(n, -1), bits)[:, :k_blocks].astype(np.float32)
    return zp.astype(np.float32).reshape(n, k_blocks)


def dequantize(b, scales, zero_points=None, *, K: int, N: int, bits: int = 4, block_size: int = 32,
               g_idx=None) -> np.ndarray:
    """The float32 weight W (K, N) that MatMulNBits multiplies by."""
    k_blocks = -(-K // block_size)
    codes = unpack(b, K, bits).astype(np.float32)  # (N, K)
    sc = np.asarray(scales, np.float32).reshape(N, k_blocks)
    zp = zero_point_table(zero_points, N, k_blocks, bits)
    blk = _block_index(K, block_size, g_idx)
    return ((codes - zp[:, blk]) * sc[:, blk]).T


def matmul_nbits(a, b, scales, zero_points=None, g_idx=None, bias=None, *, K: int, N: int, bits: int = 4,
                 block_size: int = 32, accuracy_level: int = 0, weight_prepacked: int = 0):
    """MatMulNBits: Y (..., N) = A (..., K) @ dequantize(B) (+ bias), computed in float32, returned in A's dtype.

    accuracy_level only changes ORT's internal compute precision (level 4 quantizes A to int8 per block); the
    reference is the exact float32 product.
    """
    if weight_prepacked:
        raise NotImplementedError("MatMulNBits: EP-prepacked weights are not modelled")
    if g_idx is not None and zero_points is not None and np.asarray(zero_points).dtype == np.uint8:
        raise NotImplementedError("MatMulNBits: g_idx with packed zero points (ORT ignores the zero points)")
    w = dequantize(b, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size, g_idx=g_idx)
    y = np.asarray(a, np.float32) @ w
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.asarray(a).dtype)


def _quantize_blocks(x: np.ndarray, symmetric: bool, bits: int, sdt):
    """Quantize float32 blocks x (k_blocks, block_size, n) in place; returns (codes, scales, zero points).

    Blocks run along axis 1 so that every reduction and elementwise pass is over contiguous columns.
    """
    qmax = np.float32((1 << bits) - 1)
    hi, lo = x.max(axis=1), x.min(axis=1)  # (k_blocks, n)
    if symmetric:
        peak = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (peak / np.float32(-(1 << (bits - 1)))).astype(sdt)
        zp = np.full(hi.shape, np.float32(1 << (bits - 1)))
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s32 = (hi - lo) / qmax
        with np.errstate(divide="ignore", invalid="ignore"):
            zpf = np.where(s32 != 0, np.float32(0) - lo / s32, lo)
        zp = np.clip(round_half_away(zpf), 0, qmax).astype(np.float32)
        scales = s32.astype(sdt)
    sf = scales.astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(sf != 0, np.float32(1) / sf, np.float32(0)).astype(np.float32)
    x *= recip[:, None, :]
    x += zp[:, None, :]
    # roundf then clamp to [0, qmax]: negatives clamp to 0 either way, so floor(x + 0.5) is exact for x >= 0 except
    # at the float32 just below 0.5, where x + 0.5 rounds up to 1.0.
    tie_low = x == np.nextafter(np.float32(0.5), np.float32(0))
    x += np.float32(0.5)
    np.floor(x, out=x)
    if tie_low.any():
        x[tie_low] = 0
    np.clip(x, 0, qmax, out=x)
    return x.astype(np.uint8), scales, zp.astype(np.uint8)


def quantize_rtn(w, block_size: int = 32, symmetric: bool = True, bits: int = 4):
    """Round-to-nearest blockwise quantization of W (K, N) into MatMulNBits' layout.

    Returns (B uint8 (N, k_blocks, blob_size), scales (N, k_blocks) in W's float dtype, zero_points packed uint8
    (N, ceil(k_blocks * bits / 8)) or None when symmetric). Vectorized over column chunks that stay in cache; codes
    are packed before the (N, K) transpose, so only bytes are transposed. fp16 weights get fp16 scales and codes
    computed from the rounded scale, as ORT does.
    """
    w = np.asarray(w)
    sdt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    k, n = w.shape
    k_blocks = -(-k // block_size)
    kp = k_blocks * block_size
    packed = np.empty((n, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((n, k_blocks), sdt)
    zps = np.empty((n, k_blocks), np.uint8)
    chunk = max(1, (1 << 18) // kp)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        x = np.zeros((kp, c1 - c0), np.float32)
        x[:k] = w[:, c0:c1]
        codes, sc, zp = _quantize_blocks(x.reshape(k_blocks, block_size, c1 - c0), symmetric, bits, sdt)
        codes = codes.reshape(kp, c1 - c0)
        codes[k:] = 0  # ORT leaves the padded tail of the last block at code 0
        packed[c0:c1] = pack_bits(codes, bits, axis=0).T.reshape(c1 - c0, k_blocks, -1)
        scales[c0:c1] = sc.T
        zps[c0:c1] = zp.T
    if symmetric:
        return packed, scales, None
    per = 8 // bits
    zpad = np.full((n, -(-k_blocks // per) * per), 1 << (bits - 1), np.uint8)  # unused slots hold the default
    zpad[:, :k_blocks] = zps
    return packed, scales, pack_bits(zpad, bits)
