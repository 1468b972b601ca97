"""8-bit linear quantization: QuantizeLinear / DequantizeLinear (ONNX), DynamicQuantizeLinear and MatMulInteger
(ONNX), DynamicQuantizeMatMul (com.microsoft), and the per-channel weight quantizer that produces their weights.

    QuantizeLinear     y = saturate(round(x / scale) + zp)          round half to even; int8 [-128, 127] or
                                                                    uint8 [0, 255] (the zero point's type, uint8
                                                                    without one); scale and zp scalar (per tensor)
                                                                    or 1-D along `axis` (per axis)
    DequantizeLinear   x = (y - zp) * scale                         same scale / zero-point layouts
    DynamicQuantizeLinear                                            uint8, the range widened to include 0:
                       lo = min(min x, 0), hi = max(max x, 0), scale = (hi - lo) / 255,
                       zp = saturate(round(-lo / scale)), y = saturate(round(x / scale) + zp)
                       (an all-zero x: scale 1, zp 0, as ORT)
    MatMulInteger      Y int32 = (A - a_zp) @ (B - b_zp)             a_zp scalar or per row of A's last-but-one
                                                                    axis; b_zp scalar or per column of B
    DynamicQuantizeMatMul                                            A float quantized as DynamicQuantizeLinear;
                       Y = float((Aq - a_zp) @ (B - b_zp)) * (a_scale * b_scale) (+ bias)
                       B int8 or uint8 (K, N); b_scale / b_zero_point scalar or per column (N,)

The integer products are exact (int64 accumulation); ORT accumulates in int32, which is exact for the sizes a
model has (K * 255 * 255 < 2^31 up to K = 33,025). On x86 CPUs without VNNI (AVX2, e.g. an AMD EPYC with
onnxruntime 1.32) ORT's u8 x s8 kernels add pairs of products in int16 with saturation (VPMADDUBSW): a pair
above 32,767 (255 * 127 * 2 = 64,770 at the extremes) is clipped, and the result is not this reference's. Weights
within +-63 (`reduce_range`, onnxc's default for int8:dynamic and int8:static) keep every pair below 32,767, and
uint8 weights take the u8 x u8 kernel, which widens to int16 first; both agree with this reference bit for bit on
every CPU (tests/kernels/test_quantize_linear.py).

quantize_weight gives a weight W (K, N) int8 codes per output column (axis 1, the layout DequantizeLinear axis=1
and DynamicQuantizeMatMul's per-column b_scale read): symmetric scale = max|W[:, n]| / qmax, zero point 0.
"""

from __future__ import annotations

import numpy as np

RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _along(v, ndim: int, axis: int) -> np.ndarray:
    """A scalar stays a scalar; a 1-D per-axis parameter is shaped to broadcast along `axis` of an ndim array."""
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1 and ndim == 0:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def quantize_linear(x, y_scale, y_zero_point=None, *, axis: int = 1, block_size: int = 0, saturate: int = 1,
                    output_dtype: int = 0, precision: int = 0) -> np.ndarray:
    """ONNX QuantizeLinear (per tensor or per axis) to int8 / uint8."""
    if block_size:
        raise NotImplementedError("QuantizeLinear: blocked quantization is not modelled")
    x = np.asarray(x, np.float32)
    dtype = np.dtype(np.uint8) if y_zero_point is None else np.asarray(y_zero_point).dtype
    if dtype not in RANGES:
        raise NotImplementedError(f"QuantizeLinear: output type {dtype} is not modelled")
    lo, hi = RANGES[dtype]
    s = _along(np.asarray(y_scale, np.float32), x.ndim, axis)
    z = 0 if y_zero_point is None else _along(y_zero_point, x.ndim, axis).astype(np.float32)
    return np.clip(np.rint(x / s) + z, lo, hi).astype(dtype)


def dequantize_linear(x, x_scale, x_zero_point=None, *, axis: int = 1, block_size: int = 0,
                      output_dtype: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear (per tensor or per axis) of int8 / uint8 / int32 codes, in the scale's dtype."""
    if block_size:
        raise NotImplementedError("DequantizeLinear: blocked quantization is not modelled")
    x = np.asarray(x)
    s = np.asarray(x_scale)
    z = 0 if x_zero_point is None else _along(x_zero_point, x.ndim, axis).astype(np.int32)
    return ((x.astype(np.int32) - z).astype(np.float32) * _along(s.astype(np.float32), x.ndim, axis)).astype(s.dtype)


def dynamic_quantize_linear(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX DynamicQuantizeLinear: (y uint8, y_scale float32 scalar, y_zero_point uint8 scalar)."""
    x = np.asarray(x, np.float32)
    lo = np.float32(min(float(x.min(initial=0.0)), 0.0))
    hi = np.float32(max(float(x.max(initial=0.0)), 0.0))
    scale = np.float32((hi - lo) / np.float32(255))
    if scale == 0:
        return np.zeros(x.shape, np.uint8), np.array(1, np.float32), np.array(0, np.uint8)
    zp = np.uint8(np.clip(np.rint(np.float32(0) - lo / scale), 0, 255))
    y = np.clip(np.rint(x / scale) + np.float32(zp), 0, 255).astype(np.uint8)
    return y, np.array(scale, np.float32), np.array(zp, np.uint8)


def _zp_rows(zp, ndim: int) -> np.ndarray | int:
    """A's zero point: scalar, or one per row (the axis before the last)."""
    if zp is None:
        return 0
    z = np.asarray(zp).astype(np.int64)
    return z.reshape(()) if z.size == 1 else z.reshape(z.shape + (1,))


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None) -> np.ndarray:
    """ONNX MatMulInteger: int32 (A - a_zp) @ (B - b_zp); B (K, N) (or batched), b_zp scalar or per column."""
    a64 = np.asarray(a).astype(np.int64) - _zp_rows(a_zero_point, np.ndim(a))
    b64 = np.asarray(b).astype(np.int64)
    if b_zero_point is not None:
        b64 = b64 - np.asarray(b_zero_point).astype(np.int64).reshape(-1 if np.size(b_zero_point) > 1 else ())
    return np.matmul(a64, b64).astype(np.int32)


def dynamic_quantize_matmul(a, b, b_scale, b_zero_point=None, bias=None) -> np.ndarray:
    """com.microsoft DynamicQuantizeMatMul: A (..., K) float -> uint8 as DynamicQuantizeLinear, times B (K, N)
    int8/uint8 with per-tensor or per-column (N,) b_scale / b_zero_point; float32 (..., N)."""
    b = np.asarray(b)
    if b.ndim != 2:
        raise NotImplementedError("DynamicQuantizeMatMul: only a 2-D B is modelled")
    aq, a_scale, a_zp = dynamic_quantize_linear(a)
    acc = matmul_integer(aq, b, a_zp, b_zero_point)
    scale = (a_scale * np.asarray(b_scale, np.float32).reshape(-1 if np.size(b_scale) > 1 else ())).astype(np.float32)
    y = acc.astype(np.float32) * scale
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.float32)


def quantize_weight(w, reduce_range: bool = False, dtype=np.int8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric per-column quantization of W (K, N): (codes (K, N), scales (N,) in W's float dtype, zero points
    (N,) of `dtype`, all 0 for int8 and 128 for uint8). qmax is 127 (63 with reduce_range); a zero column gets
    scale 1 (any positive scale represents it exactly)."""
    w = np.asarray(w)
    sdt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    qmax = np.float32(63 if reduce_range else 127)
    peak = np.abs(w).max(axis=0).astype(np.float32)
    scales = np.where(peak > 0, peak / qmax, np.float32(1)).astype(sdt)
    offset = 128 if np.dtype(dtype) == np.uint8 else 0
    q = np.clip(np.rint(w.astype(np.float32) / scales.astype(np.float32)), -qmax, qmax) + offset
    return q.astype(dtype), scales, np.full(w.shape[1], offset, dtype)


def activation_params(lo: float, hi: float, dtype=np.uint8, symmetric: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (scale float32, zero point of `dtype`) for a calibrated range [lo, hi] (widened to include 0, so
    0 is exact). uint8 asymmetric: scale = (hi - lo) / 255, zp = round(-lo / scale); int8 or symmetric: zp at the
    middle of the range, scale = max(|lo|, |hi|) / 127."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qlo, qhi = RANGES[np.dtype(dtype)]
    if symmetric or np.dtype(dtype) == np.int8:
        scale = max(-lo, hi) / 127.0
        zp = 0 if np.dtype(dtype) == np.int8 else 128
    else:
        scale = (hi - lo) / (qhi - qlo)
        zp = int(np.clip(np.rint(qlo - lo / scale), qlo, qhi)) if scale > 0 else 0
    scale = scale if scale > 0 else 1.0
    return np.array(scale, np.float32), np.array(zp, dtype)
