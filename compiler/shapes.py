"""Symbolic shape values: what a 1-D int64 shape tensor holds, element by element, when only part is known.

Exporters compute Reshape/Expand targets at run time with Shape -> Gather -> Unsqueeze -> Concat chains. Where a
dim is static the element is an int; where it is symbolic it is the dim's name (a str); where nothing is known it is
a unique `Unknown` token that equals only itself. fold-constants stores these tuples in `value.meta[SYM_KEY]`, and
rules use `sym_value` to prove, e.g., that a Reshape target equals its input's shape.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from .rules import const_array

SYM_KEY = "onnxc.sym_value"          # flat tuple of elements
SYM_ARRAY_KEY = "onnxc.sym_array"    # the same as a numpy object array with the value's shape
Dim = "int | str | Unknown"


class Unknown:
    """A dim nothing is known about; equal only to itself."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(self._ids)

    def __repr__(self) -> str:
        return f"?{self.id}"


def dims_of(v: ir.Value | None) -> tuple | None:
    """The value's shape as a tuple of int / symbol name / Unknown, or None if the rank is unknown."""
    if v is None or v.shape is None:
        return None
    out = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        elif d.value is not None:
            out.append(str(d.value))
        else:
            # Stable per value: the same unknown dim read twice must compare equal.
            cache = v.meta.setdefault("onnxc.unknown_dims", {})
            key = len(out)
            if key not in cache:
                cache[key] = Unknown()
            out.append(cache[key])
    return tuple(out)


def sym_value(v: ir.Value | None, max_elements: int = 16) -> tuple | None:
    """Element-wise contents of a small int tensor, from its constant or from fold-constants' analysis."""
    if v is None:
        return None
    sym = v.meta.get(SYM_KEY)
    if sym is not None:
        return sym
    arr = const_array(v, max_elements)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return tuple(int(x) for x in np.asarray(arr).reshape(-1))


def is_known(dims: tuple) -> bool:
    return all(isinstance(d, int) for d in dims)


def reshape_target(input_dims: tuple, target: tuple, allowzero: bool = False) -> tuple | None:
    """Resolve 0 (copy) and -1 (infer) in a Reshape target symbolically; None when it cannot be resolved."""
    out = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero and isinstance(t, int):
            if i >= len(input_dims):
                return None
            out.append(input_dims[i])
        else:
            out.append(t)
    if sum(1 for t in out if isinstance(t, int) and t == -1) > 1:
        return None
    if -1 in [t for t in out if isinstance(t, int)]:
        # -1 resolves to the one input dim left when both sides share all the others.
        rest_in = list(input_dims)
        rest_out = [t for t in out if not (isinstance(t, int) and t == -1)]
        unmatched = []
        for t in rest_out:
            if t in rest_in:
                rest_in.remove(t)
            else:
                unmatched.append(t)
        if unmatched:
            # Symbolic dims shared by both sides cancel; what is left must be static to divide.
            if not (is_known(tuple(rest_in)) and is_known(tuple(unmatched))):
                return None
            total, known = int(np.prod(rest_in)), int(np.prod(unmatched))
            if known == 0 or total % known:
                return None
            return tuple(total // known if (isinstance(t, int) and t == -1) else t for t in out)
        if len(rest_in) == 1:
            out = [rest_in[0] if (isinstance(t, int) and t == -1) else t for t in out]
        elif len(rest_in) == 0:
            out = [1 if (isinstance(t, int) and t == -1) else t for t in out]
        else:
            return _numeric(input_dims, out)
    return tuple(out)


def _numeric(input_dims: tuple, out: list) -> tuple | None:
    if not is_known(input_dims) or not all(isinstance(t, int) for t in out):
        return None
    total = int(np.prod(input_dims))
    known = int(np.prod([t for t in out if t != -1]))
    if known == 0 or total % known:
        return None
    return tuple(total // known if t == -1 else t for t in out)
