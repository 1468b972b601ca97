"""AWQ's per-input-channel scales (Lin et al. 2023, activation-aware weight quantization): the search.

Weights W = [W_1 ... W_n] (K, N) that read one input X (M rows, K features) share one scale vector s (K,). The layer
computes X W = (X diag(1/s)) (diag(s) W); quantizing diag(s) W instead of W gives the input features of large mean
magnitude finer steps (their weight rows grow, their block scales follow), at the price of the others. For each
alpha on ALPHAS:

    m_k = mean over rows of |X[:, k]|, clamped to >= FLOOR max(m)       (a feature never active keeps a scale)
    s = m^alpha / sqrt(max(m^alpha) min(m^alpha))                       (centred on 1, as AWQ does)
    err(alpha) = ||X W - (X diag(1/s)) Q(diag(s) W)||^2 = sum_n d_n^T H d_n,   D = W - diag(1/s) Q(diag(s) W)

with H = X^T X (compiler/calibration.Hessians: both statistics in one pass over the calibration batches) and Q
round-to-nearest at the compile's block size and symmetry (round-to-nearest is the proxy that keeps the search at
one rounding per alpha). alpha = 0 is s = 1, so the chosen scales never have a larger err than the unscaled weights
under the proxy. Then `confirm` checks the choice with the rounding that will be used (lsq, or rtn for int4:awq:rtn;
GPTQ is confirmed with lsq) and keeps s = 1 where the scaled weights round worse: weights that already lie on a
4-bit grid per block (a model decoded from a Q4 GGUF file) lose that grid when their rows are scaled. The scales
themselves are folded into the graph by passes/fold_awq_scales.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxc.kernels import quantize as kq
from onnxc.kernels.matmul_nbits import dequantize

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
FLOOR = 1e-4                     # mean |x| below this share of the largest is raised to it (s stays finite)
CHUNK_ELEMENTS = 1 << 21         # err is summed over column chunks of about this many elements


@dataclass(frozen=True)
class Scales:
    s: np.ndarray                 # (K,) float64: X W = (X / s) (s[:, None] W)
    alpha: float
    errors: dict[float, float]    # err(alpha) for every alpha tried
    confirmed: float = 1.0        # err of the final rounding with s relative to without (confirm; 1.0 untried)

    @property
    def gain(self) -> float:
        """err at the chosen alpha relative to the unscaled weights' (<= 1)."""
        base = self.errors.get(0.0, 0.0)
        return self.errors[self.alpha] / base if base > 0 else 1.0


def scales_for(m: np.ndarray, alpha: float) -> np.ndarray:
    """s = m^alpha centred on 1 (m floored at FLOOR of its largest value; all ones where m is all zero)."""
    m = np.asarray(m, np.float64)
    top = float(m.max()) if m.size else 0.0
    if top <= 0 or alpha == 0:
        return np.ones_like(m)
    s = np.maximum(m, FLOOR * top) ** alpha
    return s / np.sqrt(s.max() * s.min())


def output_error(h: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """||X (W - W_hat)||^2 = sum_n d_n^T H d_n, from H = X^T X, over column chunks."""
    k, n = w.shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    total = 0.0
    for c0 in range(0, n, step):
        d = np.asarray(w[:, c0:c0 + step], np.float64) - np.asarray(w_hat[:, c0:c0 + step], np.float64)
        total += float(np.einsum("kn,kn->", d, h @ d))
    return total


def rounded(w: np.ndarray, block: int, symmetric: bool, method: str = "rtn") -> np.ndarray:
    """Q(W): W (K, N) through int4 `method` (rtn or lsq) and back, float32."""
    k, n = w.shape
    b, s, z = kq.quantize(np.asarray(w, np.float32), method, block, symmetric)
    return dequantize(b, s, z, K=k, N=n, bits=4, block_size=block)


def search(h: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray], block: int, symmetric: bool,
           alphas: tuple[float, ...] = ALPHAS) -> Scales:
    """The scales of least err(alpha) for the weights that read one input (H = X^T X, mean |x| per feature)."""
    w = np.concatenate([np.asarray(x, np.float32) for x in weights], axis=1)
    errors = {}
    best = None
    for alpha in alphas:
        s = scales_for(mean_abs, alpha)
        w_hat = rounded(w * s[:, None].astype(np.float32), block, symmetric) / s[:, None].astype(np.float32)
        errors[alpha] = output_error(h, w, w_hat)
        if best is None or errors[alpha] < errors[best]:
            best = alpha
    return Scales(scales_for(mean_abs, best), best, errors)


def confirm(h: np.ndarray, weights: list[np.ndarray], found: Scales, block: int, symmetric: bool,
            method: str = "lsq") -> Scales:
    """The scales if `method`'s rounding of diag(s) W has a smaller err than its rounding of W, else s = 1."""
    if found.alpha == 0:
        return found
    w = np.concatenate([np.asarray(x, np.float32) for x in weights], axis=1)
    s = found.s[:, None].astype(np.float32)
    base = output_error(h, w, rounded(w, block, symmetric, method))
    ratio = output_error(h, w, rounded(w * s, block, symmetric, method) / s) / base if base > 0 else 1.0
    if ratio < 1:
        return Scales(found.s, found.alpha, found.errors, ratio)
    return Scales(np.ones_like(found.s), 0.0, found.errors, ratio)
