"""Small helpers shared by the reference kernels: dtype handling and rounding."""

from __future__ import annotations

import numpy as np


def compute_dtype(*arrays) -> type:
    """float64 when any floating input is float64, else float32 (fp16/bf16 inputs are widened)."""
    for a in arrays:
        if a is not None and np.asarray(a).dtype == np.float64:
            return np.float64
    return np.float32


def f32(x, dtype=np.float32):
    """The array as a float compute array (None stays None)."""
    return None if x is None else np.asarray(x).astype(dtype, copy=False)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: round to nearest, ties away from zero (numpy's rint rounds ties to even)."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= 0.5)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; -inf entries get probability 0."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)
