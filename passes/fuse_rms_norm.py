"""fuse-rms-norm

    x' = Cast(x, to=float)?                                           up-cast of fp16/bf16 models (optional)
    n  = x' * Reciprocal(Sqrt(ReduceMean(x'^2, axes=[-1]) + eps))     x'^2 = Pow(x', 2) | Mul(x', x')
                                                                      x' * 1/s = Mul(x', Reciprocal(s)) | Mul(x', Div(1, s))
                                                                      | Div(x', s)
    Mul(Cast(n)?, w)   ->  SimplifiedLayerNormalization(x, w, axis=-1, epsilon=eps)        rms-norm
    Cast(Mul(n, w))    ->  SimplifiedLayerNormalization(x, w, axis=-1, epsilon=eps)        rms-norm-cast-after-scale
    n                  ->  SimplifiedLayerNormalization(x', ones(H), axis=-1, epsilon=eps) rms-norm-unscaled(-div)

Either operand order of every Add/Mul matches (TorchScript puts the weight first). Gemma's (1 + w) is a constant
after fold-constants. The normalized axis may be the last of any rank (Qwen3's per-head q/k norms are 4-D).

Requires: eps is a scalar constant; the ReduceMean keeps dims and reduces the last axis only; the hidden size H
(last dim of x) is static; w broadcasts along the last axis only: 1-D of size H, (1, .., 1, H), or a scalar constant
(made 1-D); an input Cast only widens (fp16/bf16 -> fp32 -> fp64).

Dtypes: the fused op runs in x's dtype when the pattern's result has x's dtype (the Casts around it cancel; ORT
computes in fp32 inside, so an fp16 model rounds once instead of twice, and a constant fp32 weight is rounded to
fp16 at compile time, both within fp16 tolerance); otherwise it runs in the widened dtype and a Cast gives the
result's dtype. SimplifiedLayerNormalization is ORT's own schema in the default domain (any opset); ORT computes
x * (1 / sqrt(mean(x^2) + eps)) * w in fp32 (docs/kernels.md). Reference: kernels/norms.simplified_layer_norm.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, const_array
from onnxc.shapes import dims_of

_WIDER = {ir.DataType.FLOAT16: 2, ir.DataType.BFLOAT16: 2, ir.DataType.FLOAT: 4, ir.DataType.DOUBLE: 8}


# ---------------------------------------------------------------------------------------------------- patterns
def _parts(op, x, eps):
    """(x', sqrt(mean(x'^2, last axis) + eps)) with x' the optional up-cast of x."""
    xc = op.Cast(x, to=Attr("cin_to"), _optional=True, _name="cin")
    ms = op.ReduceMean(op.Or(op.Pow(xc, 2.0), op.Mul(xc, xc)), _allow_other_inputs=True, _name="rm")
    return xc, op.Sqrt(op.Add(ms, eps))


def _times_inverse(op, x, eps):
    xc, s = _parts(op, x, eps)
    return op.Mul(xc, op.Or(op.Reciprocal(s), op.Div(1.0, s)))


def _divided(op, x, eps):
    xc, s = _parts(op, x, eps)
    return op.Div(xc, s)


def _normalized(op, x, eps):
    return op.Or(_times_inverse(op, x, eps), _divided(op, x, eps))


def _scaled(op, x, w, eps):
    n = op.Cast(_normalized(op, x, eps), to=Attr("cout_to"), _optional=True, _name="cout")
    return op.Mul(n, w)


def _cast_after_scale(op, x, w, eps):
    return op.Cast(op.Mul(_normalized(op, x, eps), w), to=Attr("cout_to"), _name="cout")


# ---------------------------------------------------------------------------------------------------- checks
def reduce_axes(m, pname: str) -> list[int] | None:
    """ReduceMean's axes: the attribute (opset < 18) or the constant second input (opset 18+)."""
    node = m.node(pname)
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1], 16)
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def _check(m):
    x, out = m["x"], m.outputs[0]
    dims = dims_of(x)
    if dims is None or not dims:
        return m.fail("rank of the input is unknown", "x")
    hidden, rank = dims[-1], len(dims)
    if not isinstance(hidden, int):
        return m.fail(f"hidden size (last dim {hidden}) is not static", "x")
    axes = reduce_axes(m, "rm")
    if axes is None or [a % rank for a in axes] != [rank - 1]:
        return m.fail(f"ReduceMean axes {axes} are not the last axis only", "x")
    if m.attr("rm", "keepdims", 1) != 1:
        return m.fail("ReduceMean does not keep dims", "x")
    eps, eps_arr = m.scalar("eps"), m.const("eps", 1)
    if eps is None or eps_arr is None or eps_arr.ndim > rank:
        return m.fail("epsilon is not a scalar constant", "eps")
    x_dt, out_dt = x.dtype, out.dtype
    if x_dt not in _WIDER or out_dt not in _WIDER:
        return m.fail(f"dtypes {x_dt} -> {out_dt} are not float", "x")
    dtype = x_dt
    if "cin" in m.named:
        cin_dt = ir.DataType(m["cin_to"])
        if cin_dt not in _WIDER or _WIDER[cin_dt] < _WIDER[x_dt]:
            return m.fail(f"the input Cast narrows {x_dt.name} to {cin_dt.name}", "x")
        dtype = x_dt if out_dt == x_dt else cin_dt
    if _WIDER[dtype] < _WIDER[out_dt]:
        return m.fail(f"the result ({out_dt.name}) is wider than the normalization ({dtype.name})", "x")
    found = {"epsilon": float(eps), "dtype": dtype, "x_dtype": x_dt, "out_dtype": out_dt}
    if "w" not in m.binds:
        found["scale"] = np.ones(hidden, dtype=dtype.numpy())
        return found
    w = m.const("w")
    if w is not None:
        if w.size not in (1, hidden) or w.ndim > rank or any(d != 1 for d in w.shape[:-1]):
            return m.fail(f"weight of shape {list(w.shape)} does not broadcast along the last axis only", "w")
        scale = np.broadcast_to(w.reshape(-1), (hidden,)).astype(dtype.numpy())
        if not np.all(np.isfinite(scale)) and np.all(np.isfinite(w)):
            return m.fail(f"weight overflows {dtype.name}", "w")
        if w.shape != (hidden,) or m.dtype("w") != dtype:  # else the weight is used as it is (keeps its name)
            found["scale"] = scale
        return found
    if dims_of(m["w"]) != (hidden,):
        return m.fail(f"non-constant weight of shape {dims_of(m['w'])} is not 1-D of size {hidden}", "w")
    return found


# ---------------------------------------------------------------------------------------------------- rewrite
def _rewrite(op, x, epsilon, dtype, x_dtype, out_dtype, scale=None, w=None):
    xin = x if dtype == x_dtype else op.Cast(x, to=dtype)
    if scale is not None:
        gamma = op.const(scale, "scale")
    else:
        gamma = w if w.dtype == dtype else op.Cast(w, to=dtype)
    y = op.SimplifiedLayerNormalization(xin, gamma, axis=-1, epsilon=epsilon)
    if dtype == out_dtype:
        return y
    y.type, y.shape = ir.TensorType(dtype), x.shape
    return op.Cast(y, to=out_dtype)


rms_norm = Rule("rms-norm", _scaled, _rewrite, _check,
                summary="x / sqrt(mean(x^2) + eps) * w -> SimplifiedLayerNormalization")
rms_norm_cast_after_scale = Rule("rms-norm-cast-after-scale", _cast_after_scale, _rewrite, _check,
                                 summary="Cast(x' / rms(x') * w) (scale in fp32) -> SimplifiedLayerNormalization")
rms_norm_unscaled = Rule("rms-norm-unscaled", _times_inverse, _rewrite, _check,
                         summary="x * 1/sqrt(mean(x^2) + eps) -> SimplifiedLayerNormalization(x, ones)")
rms_norm_unscaled_div = Rule("rms-norm-unscaled-div", _divided, _rewrite, _check,
                             summary="x / sqrt(mean(x^2) + eps) -> SimplifiedLayerNormalization(x, ones)")

RULES = [rms_norm, rms_norm_cast_after_scale, rms_norm_unscaled, rms_norm_unscaled_div]

register_pass(RulePass("fuse-rms-norm", RULES, level=2, targets=("cpu", "cuda"),
                       summary="RMSNorm (every exporter form, fp16 Casts, per-head) -> SimplifiedLayerNormalization"))
