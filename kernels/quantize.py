"""Block quantizers for MatMulNBits: round-to-nearest, a least-squares fit, HQQ, and GPTQ (calibrated).

W (K, N) is quantized per column n in blocks of `block_size` along K (the last block zero-padded), into
MatMulNBits' layout (see matmul_nbits.py):

    W[k, n] ~ (q[n, k] - z[n, b]) * s[n, b]        q in [0, 2^bits - 1], b = k // block_size

Methods (every one vectorized over column chunks of about 1 MiB, blocks along axis 1 so each reduction runs over
contiguous columns):

    rtn   ORT's round-to-nearest (matmul_nbits.quantize_rtn, bit-exact with MatMulNBitsQuantizer).
    lsq   per block, minimize the squared reconstruction error  E(s, z) = sum_k (w_k - s (q_k - z))^2  over the
          scale s and an integer zero point z (asymmetric) or z = 2^(bits-1) (symmetric):
            1. grid: ranges shrunk by a in GRID (asymmetric: [a lo, a hi]; symmetric: s = a peak / -2^(bits-1)
               and s = a |peak| / (2^(bits-1) - 1)); keep the candidate of least E;
            2. alternate: codes q = clamp(round(w / s + z)); then the least-squares line through (q, w):
               s = cov(q, w) / var(q), z = round(mean(q) - mean(w) / s) clamped; then s refit for that integer z,
               s = sum(w (q - z)) / sum((q - z)^2); keep a block's new (s, z) only where E went down.
          E never increases, and the start includes RTN's own range (a = 1), so lsq is never worse than RTN in
          squared error on any block. Zero points stay integers (packed uint8), so every MatMulNBits kernel
          (accuracy_level 4 included) runs it as it runs RTN.
    hqq   Half-Quadratic Quantization (Badri & Shaji 2023): the zero point, as a float, minimizes the l_p (p = 0.7)
          reconstruction error with the scale fixed at the min-max one, by the proximal iteration
            w_e = shrink_p(w - dequant(q), beta);  z = mean(q - (w - w_e) / s);  beta *= kappa
          (stopping when the mean absolute error stops falling). Asymmetric only; float zero points
          (N, k_blocks) in the scale's dtype.
    gptq  GPTQ (Frantar et al. 2022), given H = X^T X of the layer's inputs X (M, K) (gptq() below): minimizes the
          output error ||X W - X W_q||^2 instead of the weight error, one input row k of W at a time. With U the
          upper Cholesky factor of H^-1 (H^-1 = U^T U), after rounding row k to q_k the error
          e = (w_k - q_k) / U[k, k] is spread over the rows not yet quantized, w_j -= U[k, j] e (j > k): the optimal
          brain quantization update, which keeps X W as close as the remaining rows allow. Updates are applied
          lazily, one block of rows at a time: eagerly within the block, then one GEMM for the rows after it.
          Each block's (s, z) is fitted as in lsq on the block's rows as updated when the block is reached; with
          act_order the rows go by decreasing H[k, k] and every block's (s, z) is fitted up front on the original
          weights (MatMulNBits has no g_idx: a block stays the K-contiguous rows k // block_size). Dampening:
          H + damp mean(diag H) I (damp grows tenfold while the Cholesky factorization fails); an input feature
          that is never active (H[k, k] = 0) keeps its weight and is rounded where it stands (GPTQ would zero it;
          inputs outside the calibration set may still use it).

Scales take the weight's dtype (fp16 weights: fp16 scales; codes are recomputed from the rounded scale).
"""

from __future__ import annotations

import numpy as np

from ._common import round_half_away
from .matmul_nbits import pack_bits, quantize_rtn

METHODS = ("rtn", "lsq", "hqq", "gptq")
CALIBRATED = ("gptq",)           # methods that need H = X^T X from calibration inputs
GPTQ_CHUNK_ELEMENTS = 1 << 21    # GPTQ works on column chunks of about 8 MiB (columns are independent given H)
GRID = (1.0, 0.9, 0.8)
CHUNK_ELEMENTS = 1 << 18


def _codes(x: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: float) -> np.ndarray:
    """clamp(round(x / s + z), 0, qmax) for x (kb, B, c), s and z (kb, c); s == 0 maps to the zero point."""
    with np.errstate(divide="ignore"):
        r = np.where(s != 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    q = x * r[:, None, :]
    q += z[:, None, :]
    np.rint(q, out=q)  # ties to even: any rounding is a valid code; only the error below decides
    return np.clip(q, 0, qmax, out=q)


def _error(x: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Per block sum of (x - s (q - z))^2 over real (unpadded) elements; q is consumed."""
    q -= z[:, None, :]
    q *= s[:, None, :]
    q -= x
    q *= q
    if mask is not None:
        q *= mask
    return q.sum(axis=1)


def _fit_lsq(x: np.ndarray, mask: np.ndarray | None, n_real: np.ndarray, symmetric: bool, bits: int,
             iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares scale and zero point for blocks x (kb, B, c); returns (s, z) float32 (kb, c)."""
    qmax = np.float32((1 << bits) - 1)
    half = np.float32(1 << (bits - 1))
    hi, lo = x.max(axis=1), x.min(axis=1)
    cands = []
    if symmetric:
        peak = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        z0 = np.full(hi.shape, half, np.float32)
        for a in GRID:
            cands.append((peak * np.float32(a / -half), z0))
            cands.append((np.abs(peak) * np.float32(a / (half - 1)), z0))
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        for a in GRID:
            s = (hi - lo) * np.float32(a) / qmax
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(s != 0, np.clip(round_half_away(-lo * np.float32(a) / s), 0, qmax), half)
            cands.append((s.astype(np.float32), z.astype(np.float32)))
    best_s, best_z, best_e = None, None, None
    for s, z in cands:
        e = _error(x, _codes(x, s, z, qmax), s, z, mask)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            take = e < best_e
            best_s, best_z, best_e = np.where(take, s, best_s), np.where(take, z, best_z), np.minimum(e, best_e)
    m = mask if mask is not None else np.float32(1)
    for _ in range(iters):
        q = _codes(x, best_s, best_z, qmax)
        if not symmetric:  # the least-squares line w ~ s q - s z, then an integer z on it
            qm = (q * m).sum(axis=1) / n_real
            xm = (x * m).sum(axis=1) / n_real
            dq = (q - qm[:, None, :]) * m
            cov = (dq * x).sum(axis=1)
            var = (dq * dq).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                s_line = np.where((var > 0) & (cov != 0), cov / var, best_s)
                z = np.where(s_line != 0, np.clip(np.rint(qm - xm / s_line), 0, qmax), best_z).astype(np.float32)
        else:
            z = best_z
        d = (q - z[:, None, :]) * m
        num, den = (d * x).sum(axis=1), (d * d).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(den > 0, num / den, best_s).astype(np.float32)
        e = _error(x, _codes(x, s, z, qmax), s, z, mask)
        take = e < best_e
        if not take.any():
            break
        best_s, best_z, best_e = np.where(take, s, best_s), np.where(take, z, best_z), np.minimum(e, best_e)
    return best_s, best_z


def _fit_hqq(x: np.ndarray, bits: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
             kappa: float = 1.01) -> tuple[np.ndarray, np.ndarray]:
    """HQQ's zero point (float) for blocks x (kb, B, c), scale fixed at the min-max one; returns (s, z)."""
    qmax = np.float32((1 << bits) - 1)
    hi, lo = x.max(axis=1), x.min(axis=1)
    rng = hi - lo
    inv = np.minimum(qmax / np.where(rng == 0, qmax, rng), np.float32(2e4)).astype(np.float32)  # 1 / s
    z = np.rint(-lo * inv).astype(np.float32)
    best = np.inf
    for _ in range(iters):
        q = np.clip(np.rint(x * inv[:, None, :] + z[:, None, :]), 0, qmax)
        r = x - (q - z[:, None, :]) / inv[:, None, :]  # w - dequant
        a = np.abs(r)
        err = float(a.mean())
        w_e = np.sign(r) * np.maximum(a - np.float32(1 / beta) * np.power(a + np.float32(1e-8), np.float32(p - 1)),
                                      0)
        z = (q - (x - w_e) * inv[:, None, :]).mean(axis=1).astype(np.float32)
        beta *= kappa
        if err >= best:
            break
        best = err
    return (np.float32(1) / inv).astype(np.float32), z


def _pack_zero_points(zps: np.ndarray, bits: int) -> np.ndarray:
    """Integer zero points (N, k_blocks) -> MatMulNBits' packed uint8 (N, ceil(k_blocks * bits / 8))."""
    n, kb = zps.shape
    per = 8 // bits
    zpad = np.full((n, -(-kb // per) * per), 1 << (bits - 1), np.uint8)
    zpad[:, :kb] = zps.astype(np.uint8)
    return pack_bits(zpad, bits)


def _fit_block(x: np.ndarray, block_size: int, symmetric: bool, bits: int, iters: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """lsq's (s, z) (c,) for one block x (rows <= block_size, c) of real rows (a short last block is padded and
    masked as in quantize())."""
    b, c = x.shape
    xb = np.empty((1, block_size, c), np.float32)
    xb[0, :b] = x
    xb[0, b:] = x[:1]
    mask = None
    if b < block_size:
        mask = np.zeros((1, block_size, 1), np.float32)
        mask[0, :b] = 1
    s, z = _fit_lsq(xb, mask, np.full((1, 1), b, np.float32), symmetric, bits, iters)
    return s[0], z[0]


def gptq_factor(hessian, damp: float = 0.01, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(U, perm) for gptq(): the row order (decreasing H[k, k] with act_order, else 0..K-1) and the upper Cholesky
    factor U (float32) of the inverse of the dampened, permuted H (H^-1 = U^T U). Never-active features get
    H[k, k] = 1; damp grows tenfold while the factorization fails."""
    h = np.array(hessian, np.float64)
    k = h.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"the Hessian must be square, got {h.shape}")
    diag = np.diag(h).copy()
    h[np.diag_indices(k)] = np.where(diag > 0, diag, 1.0)
    mean = float(np.mean(np.diag(h)))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(perm, perm)]
    for d in (damp, damp * 10, damp * 100, 1.0):
        try:
            return np.linalg.cholesky(np.linalg.inv(h + np.eye(k) * (d * mean))).T.astype(np.float32), perm
        except np.linalg.LinAlgError:
            continue
    raise ValueError("GPTQ: the dampened Hessian is not positive definite")


def gptq(w, hessian=None, block_size: int = 32, symmetric: bool = False, bits: int = 4, damp: float = 0.01,
         act_order: bool = False, iters: int = 3, factor: tuple[np.ndarray, np.ndarray] | None = None):
    """GPTQ-quantize W (K, N) for inputs whose Gram matrix is `hessian` = X^T X (K, K) (module docstring); or give
    `factor` = gptq_factor(H, damp, act_order), to share it between weights with the same inputs.

    Returns quantize()'s layout: (B, scales, packed uint8 zero points or None when symmetric). Deterministic:
    the same W and H give the same bytes.
    """
    w = np.asarray(w)
    sdt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    k, n = w.shape
    u, perm = factor if factor is not None else gptq_factor(hessian, damp, act_order)
    if u.shape != (k, k):
        raise ValueError(f"the Hessian is {u.shape[0]} x {u.shape[0]}, W has K = {k}")
    act_order = act_order or bool(np.any(perm != np.arange(k)))  # a permuted order needs blocks fitted up front
    kb = -(-k // block_size)
    kp = kb * block_size
    qmax = np.float32((1 << bits) - 1)
    packed = np.empty((n, kb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, kb), sdt)
    zps = np.empty((n, kb), np.float32)
    group = perm // block_size                       # block of the row processed at each position
    chunk = max(1, GPTQ_CHUNK_ELEMENTS // kp)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        s_all = np.zeros((kb, c1 - c0), np.float32)
        z_all = np.zeros((kb, c1 - c0), np.float32)
        if act_order:  # static blocks: (s, z) from the original weights
            for g in range(kb):
                s_all[g], z_all[g] = _fit_block(np.asarray(w[g * block_size:(g + 1) * block_size, c0:c1], np.float32),
                                                block_size, symmetric, bits, iters)
            s_all = s_all.astype(sdt).astype(np.float32)
        work = np.array(w[perm, c0:c1] if act_order else w[:, c0:c1], np.float32)
        codes = np.zeros((kp, c1 - c0), np.uint8)
        buf = np.empty((block_size, c1 - c0), np.float32)
        for r0 in range(0, k, block_size):  # one lazy batch per block: its rows are updated eagerly, the rest after
            r1 = min(k, r0 + block_size)
            rows, err = work[r0:r1], np.empty((r1 - r0, c1 - c0), np.float32)
            if not act_order:  # the block's rows as updated so far
                s, z = _fit_block(rows, block_size, symmetric, bits, iters)
                s_all[r0 // block_size], z_all[r0 // block_size] = s.astype(sdt).astype(np.float32), z
            for i in range(r1 - r0):
                r = r0 + i
                s, z = s_all[group[r]], z_all[group[r]]
                with np.errstate(divide="ignore"):
                    q = rows[i] * np.where(s != 0, np.float32(1) / s, np.float32(0))
                q = np.clip(np.rint(q + z, out=q), 0, qmax, out=q)
                codes[perm[r]] = q
                e = err[i]
                np.subtract(rows[i], (q - z) * s, out=e)
                e /= u[r, r]
                m = r1 - r - 1
                if m:
                    np.multiply.outer(u[r, r + 1:r1], e, out=buf[:m])
                    rows[i + 1:] -= buf[:m]
            if r1 < k:
                work[r1:] -= u[r0:r1, r1:].T @ err
        packed[c0:c1] = pack_bits(codes, bits, axis=0).T.reshape(c1 - c0, kb, -1)
        scales[c0:c1] = s_all.T
        zps[c0:c1] = z_all.T
    return packed, scales, None if symmetric else _pack_zero_points(zps, bits)


def quantize(w, method: str = "lsq", block_size: int = 32, symmetric: bool = False, bits: int = 4,
             iters: int = 3, hessian=None):
    """Quantize W (K, N) into MatMulNBits' layout (`hessian` = X^T X (K, K) is required by gptq, unused otherwise).

    Returns (B uint8 (N, k_blocks, blob_size), scales (N, k_blocks) in W's float dtype, zero_points): packed uint8
    (N, ceil(k_blocks * bits / 8)) for asymmetric rtn/lsq/gptq, float (N, k_blocks) for hqq, None when symmetric.
    """
    if method == "rtn":
        return quantize_rtn(w, block_size, symmetric, bits)
    if method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the Hessian X^T X of the layer's calibration inputs")
        return gptq(w, hessian, block_size, symmetric, bits, iters=iters)
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}")
    if method == "hqq" and symmetric:
        raise ValueError("hqq fits a zero point: it is asymmetric only")
    w = np.asarray(w)
    sdt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    k, n = w.shape
    kb = -(-k // block_size)
    kp = kb * block_size
    qmax = np.float32((1 << bits) - 1)
    packed = np.empty((n, kb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, kb), sdt)
    zps = np.empty((n, kb), np.float32)
    mask = None
    n_real = np.full((kb, 1), block_size, np.float32)
    if kp != k:
        mask = np.ones((kb, block_size, 1), np.float32)
        mask[-1, k - (kb - 1) * block_size:] = 0
        n_real[-1] = k - (kb - 1) * block_size
    chunk = max(1, CHUNK_ELEMENTS // kp)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        x = np.empty((kp, c1 - c0), np.float32)
        x[:k] = w[:, c0:c1]
        x[k:] = x[kp - block_size:kp - block_size + 1] if kp != k else 0  # pad inside the block's own range
        xb = x.reshape(kb, block_size, c1 - c0)
        if method == "lsq":
            s, z = _fit_lsq(xb, mask, n_real, symmetric, bits, iters)
        else:
            s, z = _fit_hqq(xb, bits)
        s = s.astype(sdt)
        codes = _codes(xb, s.astype(np.float32), z, qmax).astype(np.uint8).reshape(kp, c1 - c0)
        codes[k:] = 0
        packed[c0:c1] = pack_bits(codes, bits, axis=0).T.reshape(c1 - c0, kb, -1)
        scales[c0:c1] = s.T
        zps[c0:c1] = z.T
    if symmetric:
        return packed, scales, None
    if method == "hqq":
        return packed, scales, zps.astype(sdt)
    return packed, scales, _pack_zero_points(zps, bits)
