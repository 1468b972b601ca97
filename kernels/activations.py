"""GELU-family activations (com.microsoft Gelu, BiasGelu, FastGelu, QuickGelu; ONNX Gelu from opset 20).

    gelu(x)       = 0.5 * x * (1 + erf(x / sqrt(2)))                            exact form
    gelu_tanh(x)  = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))    FastGelu, Gelu(approximate="tanh")
    quick_gelu(x) = x * sigmoid(alpha * x)                                      alpha defaults to 1.702; SiLU at 1

Computed in float64 (erf from the standard library, exact to double precision) and returned in the input dtype.
BiasGelu and FastGelu add their 1-D bias (broadcast over the last axis) before the activation.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


def _erf64(x: np.ndarray) -> np.ndarray:
    return _erf(x).astype(np.float64)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf64(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _in(x, bias=None) -> np.ndarray:
    v = np.asarray(x).astype(np.float64)
    return v if bias is None else v + np.asarray(bias).astype(np.float64)


def gelu(x, *, approximate="none"):
    """Gelu: com.microsoft Gelu (erf form), or ONNX Gelu with approximate in {"none", "tanh"}."""
    v = _in(x)
    y = _gelu_tanh(v) if approximate == "tanh" else _gelu_erf(v)
    return y.astype(np.asarray(x).dtype)


def bias_gelu(a, b):
    """BiasGelu: gelu(A + B), B a 1-D bias over the last axis (erf form)."""
    return _gelu_erf(_in(a, b)).astype(np.asarray(a).dtype)


def fast_gelu(x, bias=None):
    """FastGelu: tanh-approximated gelu of (X + bias); bias optional."""
    return _gelu_tanh(_in(x, bias)).astype(np.asarray(x).dtype)


def quick_gelu(x, *, alpha=1.702):
    """QuickGelu: x * sigmoid(alpha * x)."""
    v = _in(x)
    return (v / (1.0 + np.exp(-alpha * v))).astype(np.asarray(x).dtype)
