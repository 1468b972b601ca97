"""fuse-layer-norm

    x' = Cast(x, to=float)?                                   up-cast of fp16/bf16 models (optional)
    d  = x' - ReduceMean(x', axes=[-1])
    s  = Sqrt(ReduceMean(d^2, axes=[-1]) + eps)               d^2 = Pow(d, 2) | Mul(d, d)
    n  = d / s                                                Div(d, s) | Mul(d, Reciprocal(s)) | Mul(d, Div(1, s))
    Add(Mul(Cast(n)?, g), b)  ->  LayerNormalization(x, g, b, axis=-1, epsilon=eps)          layer-norm
    Mul(Cast(n)?, g)          ->  LayerNormalization(x, g, axis=-1, epsilon=eps)             layer-norm-no-bias
    n                         ->  LayerNormalization(x', ones(H), axis=-1, epsilon=eps)      layer-norm-unscaled(-div)

This is what torch exports for nn.LayerNorm below opset 17 (TorchScript: Div form; fp16: Cast to float around n).

Requires: eps is a scalar constant; both ReduceMeans keep dims and reduce the last axis only; the hidden size H is
static; g and b broadcast along the last axis only (1-D of size H, (1, .., 1, H), or scalar constants, made 1-D);
an input Cast only widens. Dtypes as in fuse-rms-norm: the fused op runs in x's dtype when the Casts cancel.

Opset: LayerNormalization is ONNX from opset 17; for older default-domain opsets it is still emitted, because
onnxruntime registers LayerNormalization in the default domain from version 1 (its own fusions emit it at any
opset; checked on ORT CPU at opsets 11-16). The result then runs on onnxruntime only (onnx.checker rejects the op
below 17), like every contrib op this compiler emits. Reference: kernels/norms.layer_norm.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, const_array
from onnxc.shapes import dims_of

_WIDTH = {ir.DataType.FLOAT16: 2, ir.DataType.BFLOAT16: 2, ir.DataType.FLOAT: 4, ir.DataType.DOUBLE: 8}


# ---------------------------------------------------------------------------------------------------- patterns
def _parts(op, x, eps):
    """(x - mean(x), sqrt(var(x) + eps)) over the last axis, x optionally up-cast first."""
    xc = op.Cast(x, to=Attr("cin_to"), _optional=True, _name="cin")
    d = op.Sub(xc, op.ReduceMean(xc, _allow_other_inputs=True, _name="rm1"))
    var = op.ReduceMean(op.Or(op.Pow(d, 2.0), op.Mul(d, d)), _allow_other_inputs=True, _name="rm2")
    return d, op.Sqrt(op.Add(var, eps))


def _times_inverse(op, x, eps):
    d, s = _parts(op, x, eps)
    return op.Mul(d, op.Or(op.Reciprocal(s), op.Div(1.0, s)))


def _divided(op, x, eps):
    d, s = _parts(op, x, eps)
    return op.Div(d, s)


def _scaled(op, x, g, eps):
    n = op.Or(_divided(op, x, eps), _times_inverse(op, x, eps))
    return op.Mul(op.Cast(n, to=Attr("cout_to"), _optional=True, _name="cout"), g)


def _affine(op, x, g, b, eps):
    return op.Add(_scaled(op, x, g, eps), b)


# ---------------------------------------------------------------------------------------------------- checks
def _reduce_axes(node: ir.Node) -> list[int] | None:
    """ReduceMean's axes: the attribute (opset < 18) or the constant second input (opset 18+)."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1], 16)
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def _vector(m, name: str, hidden: int, rank: int, dtype: ir.DataType):
    """A per-channel parameter as (constant array | None, failure | None): constants become 1-D of `dtype`."""
    arr = m.const(name)
    if arr is not None:
        if arr.size not in (1, hidden) or arr.ndim > rank or any(d != 1 for d in arr.shape[:-1]):
            return None, m.fail(f"{name} of shape {list(arr.shape)} does not broadcast along the last axis only", name)
        vec = np.broadcast_to(arr.reshape(-1), (hidden,)).astype(dtype.numpy())
        if np.all(np.isfinite(arr)) and not np.all(np.isfinite(vec)):
            return None, m.fail(f"{name} overflows {dtype.name}", name)
        keep = arr.shape == (hidden,) and m.dtype(name) == dtype  # used as it is (keeps its name)
        return (None if keep else vec), None
    if dims_of(m[name]) != (hidden,):
        return None, m.fail(f"non-constant {name} of shape {dims_of(m[name])} is not 1-D of size {hidden}", name)
    return None, None


def _check(m):
    x, out = m["x"], m.outputs[0]
    dims = dims_of(x)
    if dims is None or not dims:
        return m.fail("rank of the input is unknown", "x")
    hidden, rank = dims[-1], len(dims)
    if not isinstance(hidden, int):
        return m.fail(f"hidden size (last dim {hidden}) is not static", "x")
    for pname in ("rm1", "rm2"):
        axes = _reduce_axes(m.node(pname))
        if axes is None or [a % rank for a in axes] != [rank - 1]:
            return m.fail(f"ReduceMean axes {axes} are not the last axis only", "x")
        if m.attr(pname, "keepdims", 1) != 1:
            return m.fail("ReduceMean does not keep dims", "x")
    eps, eps_arr = m.scalar("eps"), m.const("eps", 1)
    if eps is None or eps_arr is None or eps_arr.ndim > rank:
        return m.fail("epsilon is not a scalar constant", "eps")
    x_dt, out_dt = x.dtype, out.dtype
    if x_dt not in _WIDTH or out_dt not in _WIDTH:
        return m.fail(f"dtypes {x_dt} -> {out_dt} are not float", "x")
    dtype = x_dt
    if "cin" in m.named:
        cin_dt = ir.DataType(m["cin_to"])
        if cin_dt not in _WIDTH or _WIDTH[cin_dt] < _WIDTH[x_dt]:
            return m.fail(f"the input Cast narrows {x_dt.name} to {cin_dt.name}", "x")
        dtype = x_dt if out_dt == x_dt else cin_dt
    if _WIDTH[dtype] < _WIDTH[out_dt]:
        return m.fail(f"the result ({out_dt.name}) is wider than the normalization ({dtype.name})", "x")
    found = {"epsilon": float(eps), "dtype": dtype, "x_dtype": x_dt, "out_dtype": out_dt,
             "scale": None, "bias": None}
    if "g" not in m.binds:
        found["scale"] = np.ones(hidden, dtype=dtype.numpy())
    for name, key in (("g", "scale"), ("b", "bias")):
        if name in m.binds:
            found[key], failure = _vector(m, name, hidden, rank, dtype)
            if failure is not None:
                return failure
    return found


# ---------------------------------------------------------------------------------------------------- rewrite
def _rewrite(op, x, epsilon, dtype, x_dtype, out_dtype, scale, bias, g=None, b=None):
    def param(arr, v, name):
        if arr is not None:
            return op.const(arr, name)
        if v is None:
            return None
        return v if v.dtype == dtype else op.Cast(v, to=dtype)

    xin = x if dtype == x_dtype else op.Cast(x, to=dtype)
    beta = param(bias, b, "bias")
    inputs = (xin, param(scale, g, "scale")) + ((beta,) if beta is not None else ())
    y = op.LayerNormalization(*inputs, axis=-1, epsilon=epsilon)
    if dtype == out_dtype:
        return y
    y.type, y.shape = ir.TensorType(dtype), x.shape
    return op.Cast(y, to=out_dtype)


layer_norm = Rule("layer-norm", _affine, _rewrite, _check,
                  summary="(x - mean) / sqrt(var + eps) * g + b -> LayerNormalization")
layer_norm_no_bias = Rule("layer-norm-no-bias", _scaled, _rewrite, _check,
                          summary="(x - mean) / sqrt(var + eps) * g -> LayerNormalization(x, g)")
layer_norm_unscaled = Rule("layer-norm-unscaled", _times_inverse, _rewrite, _check,
                           summary="(x - mean) * 1/sqrt(var + eps) -> LayerNormalization(x, ones)")
layer_norm_unscaled_div = Rule("layer-norm-unscaled-div", _divided, _rewrite, _check,
                               summary="(x - mean) / sqrt(var + eps) -> LayerNormalization(x, ones)")

RULES = [layer_norm, layer_norm_no_bias, layer_norm_unscaled, layer_norm_unscaled_div]

register_pass(RulePass("fuse-layer-norm", RULES, level=2, targets=("cpu", "cuda"),
                       summary="Decomposed LayerNorm (Div/Reciprocal, fp16 Casts, optional affine) -> LayerNormalization"))
