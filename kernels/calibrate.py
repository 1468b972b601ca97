"""Activation ranges for static int8 quantization from calibration data: MinMax, percentile and entropy.

Each activation is seen batch by batch (`RangeStats.update`, per channel of the last axis); a method turns what was
seen into a range [lo, hi] that always contains 0 (kernels/quantize_linear.activation_params makes the scale and
zero point of it):

    minmax      lo = min x, hi = max x over every batch.
    percentile  the histogram's quantiles: lo at (100 - p) %, hi at p % (p = 99.999 by default), so a fraction of
                about (100 - p) % of the values on each side is clipped.
    entropy     TensorRT's KL-divergence threshold on the histogram of |x|: for each candidate threshold t (a bin
                edge from `levels` bins up), P = the histogram up to t with the clipped tail folded into its last bin,
                Q = P merged into `levels` quantization bins and spread back over P's non-empty bins; t minimizes
                KL(P || Q). The range is [max(lo, -t), min(hi, t)].

Histograms have HIST_BINS bins over the MinMax range (|x| over [0, max |x|] for entropy), so percentile and entropy
need the batches twice: a first pass for the ranges, a second for the histograms (`second_pass`).
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "entropy")
ALPHAS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)   # SmoothQuant strengths choose_alpha tries (0: no smoothing)
SAMPLE_ROWS = 1024    # rows of each activation kept at most (evenly strided over the batches) for choose_alpha
SAMPLE_BYTES = 256 << 20   # and at most this many bytes of rows over every activation
HIST_BINS = 2048
LEVELS = 128          # quantization bins the entropy method merges into (2^7: uint8's range after a zero point)


class RangeStats:
    """What one activation showed over the calibration batches: per-channel (last axis) min / max, then (second
    pass) histograms. With a `divisor` (K,) > 0 set (SmoothQuant's factors, smooth_factors), the statistics are
    those of x / divisor: its per-channel range is the first pass's divided, its histograms are taken of it."""

    def __init__(self) -> None:
        self.ch_lo: np.ndarray | None = None
        self.ch_hi: np.ndarray | None = None
        self.divisor: np.ndarray | None = None
        self.hist: np.ndarray | None = None       # of x over [lo, hi]
        self.abs_hist: np.ndarray | None = None   # of |x| over [0, peak]
        self.samples: list[np.ndarray] = []       # rows of x, at most `keep` per batch

    def update(self, x: np.ndarray, keep: int = 0) -> None:
        """First pass: the running per-channel min and max; `keep` rows of x (evenly strided) kept in samples."""
        x = np.asarray(x, np.float32)
        if not x.size:
            return
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        if keep:
            self.samples.append(x[::max(1, -(-x.shape[0] // keep))].copy())
        lo, hi = x.min(axis=0), x.max(axis=0)
        self.ch_lo = lo if self.ch_lo is None else np.minimum(self.ch_lo, lo)
        self.ch_hi = hi if self.ch_hi is None else np.maximum(self.ch_hi, hi)

    def channel_peak(self) -> np.ndarray:
        """max |x| per channel (of x itself, whatever the divisor)."""
        return np.maximum(-self.ch_lo, self.ch_hi)

    def _scaled(self) -> tuple[np.ndarray, np.ndarray]:
        d = 1.0 if self.divisor is None else self.divisor
        return self.ch_lo / d, self.ch_hi / d

    @property
    def lo(self) -> float:
        return float(self._scaled()[0].min()) if self.ch_lo is not None else np.inf

    @property
    def hi(self) -> float:
        return float(self._scaled()[1].max()) if self.ch_hi is not None else -np.inf

    @property
    def peak(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def second_pass(self, x: np.ndarray) -> None:
        """Second pass: histograms (of x / divisor) over the first pass's range."""
        x = np.asarray(x, np.float32)
        if self.divisor is not None:
            x = x / self.divisor
        x = x.reshape(-1)
        if self.hist is None:
            self.hist = np.zeros(HIST_BINS, np.int64)
            self.abs_hist = np.zeros(HIST_BINS, np.int64)
        if not x.size or self.ch_lo is None:
            return
        lo, hi = self.lo, self.hi
        self.hist += np.histogram(x, HIST_BINS, (lo, max(hi, lo + 1e-30)))[0]
        self.abs_hist += np.histogram(np.abs(x), HIST_BINS, (0.0, max(self.peak, 1e-30)))[0]

    def range(self, method: str = "minmax", percentile: float = 99.999) -> tuple[float, float]:
        """[lo, hi] by `method` (METHODS), widened to contain 0."""
        if self.ch_lo is None:
            return 0.0, 0.0
        lo, hi = self.lo, self.hi
        if method == "percentile":
            lo, hi = percentile_range(self.hist, lo, hi, percentile)
        elif method == "entropy":
            t = entropy_threshold(self.abs_hist, self.peak)
            lo, hi = max(lo, -t), min(hi, t)
        elif method != "minmax":
            raise ValueError(f"unknown calibration method {method!r}")
        return min(lo, 0.0), max(hi, 0.0)


def smooth_factors(act_peak: np.ndarray, weight_peak: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors c = max|X_k|^alpha / max|W_k,:|^(1 - alpha) (Xiao et al. 2022):
    X / c and c W have the same product and flatter channels in X. Channels with a zero peak keep c = 1; c is
    clipped to [1e-4, 1e4]."""
    a = np.asarray(act_peak, np.float64)
    w = np.asarray(weight_peak, np.float64)
    ok = (a > 0) & (w > 0)
    c = np.ones_like(a)
    c[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(c, 1e-4, 1e4).astype(np.float32)


def percentile_range(hist: np.ndarray | None, lo: float, hi: float, p: float) -> tuple[float, float]:
    """The (100 - p) % and p % quantiles of a histogram over [lo, hi] (bin edges: a value is never moved inward
    by more than one bin)."""
    if hist is None or hist.sum() == 0 or hi <= lo:
        return lo, hi
    cdf = np.cumsum(hist) / hist.sum()
    edges = np.linspace(lo, hi, len(hist) + 1)
    q = 1.0 - p / 100.0
    i_lo = int(np.searchsorted(cdf, q, side="right"))          # first bin whose cumulative share passes q
    i_hi = int(np.searchsorted(cdf, 1.0 - q, side="left"))
    return float(edges[min(i_lo, len(hist) - 1)]), float(edges[min(i_hi + 1, len(hist))])


def entropy_threshold(hist: np.ndarray | None, peak: float, levels: int = LEVELS, stride: int = 16) -> float:
    """The |x| threshold of least KL(P || Q) (module docstring), from a histogram of |x| over [0, peak]; candidate
    thresholds every `stride` bins from `levels` bins up to all of them."""
    if hist is None or hist.sum() == 0 or peak <= 0:
        return peak
    nb = len(hist)
    h = hist.astype(np.float64)
    width = peak / nb
    best, best_i = np.inf, nb
    for i in list(range(levels, nb, stride)) + [nb]:
        p = h[:i].copy()
        p[-1] += h[i:].sum()                              # the clipped tail lands in the last kept bin
        nonzero = h[:i] > 0
        idx = np.arange(i) * levels // i                 # each kept bin's quantization bin
        sums = np.bincount(idx, weights=h[:i], minlength=levels)
        counts = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, sums[idx] / np.maximum(counts[idx], 1), 0.0)
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-300)
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / np.maximum(qn[m], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def smoothed_error(x: np.ndarray, weights: list[np.ndarray], c: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   dtype=np.uint8, products: list[np.ndarray] | None = None) -> float:
    """Relative output error sum ||Q(x / c) Q(c W) - x W||^2 / sum ||x W||^2 over `weights` of a static int8 layer
    whose activation x (rows, K) has per-channel range [lo, hi] (K,): x / c quantized per tensor (MinMax), c W
    per column (quantize_linear.quantize_weight). `products`: the x W, when already computed."""
    from .quantize_linear import activation_params, dequantize_linear, quantize_linear, quantize_weight

    s, z = activation_params(float((lo / c).min()), float((hi / c).max()), dtype)
    xq = dequantize_linear(quantize_linear(x / c, s, z), s, z)
    err = ref = 0.0
    for i, w in enumerate(weights):
        q, ws, wz = quantize_weight(w * c[:, None])
        y = products[i] if products is not None else x @ w
        err += float(np.square(xq @ dequantize_linear(q, ws, wz, axis=1) - y).sum())
        ref += float(np.square(y).sum())
    return err / max(ref, 1e-30)


def choose_alpha(stats: RangeStats, weights: list[np.ndarray], alphas=ALPHAS, dtype=np.uint8
                 ) -> tuple[float, np.ndarray | None, float]:
    """The SmoothQuant strength of least smoothed_error on the activation's sample rows (at most SAMPLE_ROWS):
    (alpha, c or None for alpha 0, the error)."""
    x = np.concatenate(stats.samples)
    x = x[::max(1, -(-x.shape[0] // SAMPLE_ROWS))]
    products = [x @ w for w in weights]
    peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    best = (0.0, None, np.inf)
    for a in alphas:
        c = smooth_factors(stats.channel_peak(), peak, a) if a > 0 else np.ones(x.shape[1], np.float32)
        e = smoothed_error(x, weights, c, stats.ch_lo, stats.ch_hi, dtype, products)
        if e < best[2]:
            best = (a, c if a > 0 else None, e)
    return best
