"""What the norm fusions share (fuse-layer-norm, fuse-rms-norm): the checks around the statistics and the rewrite tail.

    x' = Cast(x, to=D')?   ...statistics over the last axis of x'...   Cast(y, to=T)?
      ->  Cast(x, to=D)?  ->  Norm(x, params..., axis=-1, epsilon=eps) in D  ->  Cast(y, to=T)?

Requires (check_norm): x has a known rank and a static last dim H; every ReduceMean named keeps dims and reduces the
last axis only (axes as attribute below opset 18, constant input from 18); eps is a scalar constant; x and the
result T are float; an input Cast only widens. The fused op runs in D = x's dtype when the result has x's dtype (the
Casts around the pattern cancel: ORT normalizes in fp32 inside, so an fp16 model rounds once instead of twice),
otherwise in the widened dtype D', and never narrower than T. Per-channel parameters (per_channel) broadcast along
the last axis only: 1-D of size H, (1, .., 1, H), or scalar constants, made 1-D constants of D.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from .rules import Failure, Match, const_array
from .shapes import dims_of

FLOAT_WIDTH = {ir.DataType.FLOAT16: 2, ir.DataType.BFLOAT16: 2, ir.DataType.FLOAT: 4, ir.DataType.DOUBLE: 8}


def reduce_axes(node: ir.Node) -> list[int] | None:
    """ReduceMean's axes: the attribute (opset < 18) or the constant second input (opset 18+)."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1], 16)
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def check_norm(m: Match, reduces: Sequence[str]) -> tuple[dict[str, Any], int, int] | Failure:
    """({epsilon, dtype, out_dtype}, H, rank) for a match with bound x, eps, optional Cast `cin` (to `cin_to`) and
    the ReduceMean nodes named `reduces`; or the failure."""
    x, out = m["x"], m.outputs[0]
    dims = dims_of(x)
    if dims is None or not dims:
        return m.fail("rank of the input is unknown", "x")
    hidden, rank = dims[-1], len(dims)
    if not isinstance(hidden, int):
        return m.fail(f"hidden size (last dim {hidden}) is not static", "x")
    for pname in reduces:
        axes = reduce_axes(m.node(pname))
        if axes is None or [a % rank for a in axes] != [rank - 1]:
            return m.fail(f"ReduceMean axes {axes} are not the last axis only", "x")
        if m.attr(pname, "keepdims", 1) != 1:
            return m.fail("ReduceMean does not keep dims", "x")
    eps, eps_arr = m.scalar("eps"), m.const("eps", 1)
    if eps is None or eps_arr is None or eps_arr.ndim > rank:
        return m.fail("epsilon is not a scalar constant", "eps")
    x_dt, out_dt = x.dtype, out.dtype
    if x_dt not in FLOAT_WIDTH or out_dt not in FLOAT_WIDTH:
        return m.fail(f"dtypes {x_dt} -> {out_dt} are not float", "x")
    dtype = x_dt
    if "cin" in m.named:
        cin_dt = ir.DataType(m["cin_to"])
        if cin_dt not in FLOAT_WIDTH or FLOAT_WIDTH[cin_dt] < FLOAT_WIDTH[x_dt]:
            return m.fail(f"the input Cast narrows {x_dt.name} to {cin_dt.name}", "x")
        dtype = x_dt if out_dt == x_dt else cin_dt
    if FLOAT_WIDTH[dtype] < FLOAT_WIDTH[out_dt]:
        return m.fail(f"the result ({out_dt.name}) is wider than the normalization ({dtype.name})", "x")
    return {"epsilon": float(eps), "dtype": dtype, "out_dtype": out_dt}, hidden, rank


def per_channel(m: Match, name: str, hidden: int, rank: int, dtype: ir.DataType, label: str | None = None
                ) -> np.ndarray | None | Failure:
    """Per-channel parameter `name` (`label` in messages): a 1-D constant of `dtype` to emit, None to use the bound
    value as it is (1-D of size H: a constant of `dtype` keeps its name, a computed one is cast if needed), or the
    failure."""
    label = label or name
    arr = m.const(name)
    if arr is None:
        if dims_of(m[name]) != (hidden,):
            return m.fail(f"non-constant {label} of shape {dims_of(m[name])} is not 1-D of size {hidden}", name)
        return None
    if arr.size not in (1, hidden) or arr.ndim > rank or any(d != 1 for d in arr.shape[:-1]):
        return m.fail(f"{label} of shape {list(arr.shape)} does not broadcast along the last axis only", name)
    vec = np.broadcast_to(arr.reshape(-1), (hidden,)).astype(dtype.numpy())
    if np.all(np.isfinite(arr)) and not np.all(np.isfinite(vec)):
        return m.fail(f"{label} overflows {dtype.name}", name)
    return None if arr.shape == (hidden,) and m.dtype(name) == dtype else vec


def in_dtype(op, v: ir.Value, dtype: ir.DataType) -> ir.Value:
    """v, cast to `dtype` when it has another."""
    return v if v.dtype == dtype else op.Cast(v, to=dtype)


def param(op, arr: np.ndarray | None, v: ir.Value | None, dtype: ir.DataType, name: str) -> ir.Value | None:
    """The fused op's input for a per-channel parameter: constant `arr` when given, else bound value `v` in `dtype`
    (None when absent)."""
    if arr is not None:
        return op.const(arr, name)
    return None if v is None else in_dtype(op, v, dtype)


def cast_out(op, y: ir.Value, like: ir.Value, dtype: ir.DataType, out_dtype: ir.DataType) -> ir.Value:
    """The fused result y (computed in `dtype`, shaped like the input `like`) in the pattern's result dtype."""
    if dtype == out_dtype:
        return y
    y.type, y.shape = ir.TensorType(dtype), like.shape
    return op.Cast(y, to=out_dtype)
