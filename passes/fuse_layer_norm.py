"""fuse-layer-norm

    x' = Cast(x, to=float)?                                   up-cast of fp16/bf16 models (optional)
    d  = x' - ReduceMean(x', axes=[-1])
    s  = Sqrt(ReduceMean(d^2, axes=[-1]) + eps)               d^2 = Pow(d, 2) | Mul(d, d)
    n  = d / s                                                Div(d, s) | Mul(d, Reciprocal(s)) | Mul(d, Div(1, s))
    Add(Mul(Cast(n)?, g), b)  ->  LayerNormalization(x, g, b, axis=-1, epsilon=eps)          layer-norm
    Mul(Cast(n)?, g)          ->  LayerNormalization(x, g, axis=-1, epsilon=eps)             layer-norm-no-bias
    n                         ->  LayerNormalization(x', ones(H), axis=-1, epsilon=eps)      layer-norm-unscaled(-div)

This is what torch exports for nn.LayerNorm below opset 17 (TorchScript: Div form; fp16: Cast to float around n).

Requires (compiler/norms.py, shared with fuse-rms-norm): eps is a scalar constant; both ReduceMeans keep dims and
reduce the last axis only; the hidden size H is static; g and b broadcast along the last axis only (1-D of size H,
(1, .., 1, H), or scalar constants, made 1-D); an input Cast only widens. The fused op runs in x's dtype when the
Casts cancel.

Opset: LayerNormalization is ONNX from opset 17; for older default-domain opsets it is still emitted, because
onnxruntime registers LayerNormalization in the default domain from version 1 (its own fusions emit it at any
opset; checked on ORT CPU at opsets 11-16). The result then runs on onnxruntime only (onnx.checker rejects the op
below 17), like every contrib op this compiler emits. Reference: kernels/norms.layer_norm.
"""
from __future__ import annotations

import numpy as np
from onnxc import norms
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Failure, Rule

EXAMPLES = {"eps": (1e-5, 1e-6, "input")}   # values onnxc fuzz draws (compiler/fuzz.py)


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
def _check(m):
    found = norms.check_norm(m, ("rm1", "rm2"))
    if isinstance(found, Failure):
        return found
    found, hidden, rank = found
    found["scale"] = None if "g" in m.binds else np.ones(hidden, dtype=found["dtype"].numpy())
    found["bias"] = None
    for name, key in (("g", "scale"), ("b", "bias")):
        if name in m.binds:
            found[key] = norms.per_channel(m, name, hidden, rank, found["dtype"])
            if isinstance(found[key], Failure):
                return found[key]
    return found


# ---------------------------------------------------------------------------------------------------- rewrite
def _rewrite(op, x, epsilon, dtype, out_dtype, scale, bias, g=None, b=None):
    xin = norms.in_dtype(op, x, dtype)
    beta = norms.param(op, bias, b, dtype, "bias")
    inputs = (xin, norms.param(op, scale, g, dtype, "scale")) + ((beta,) if beta is not None else ())
    return norms.cast_out(op, op.LayerNormalization(*inputs, axis=-1, epsilon=epsilon), x, dtype, out_dtype)


layer_norm = Rule("layer-norm", _affine, _rewrite, _check, examples=EXAMPLES,
                  summary="(x - mean) / sqrt(var + eps) * g + b -> LayerNormalization")
layer_norm_no_bias = Rule("layer-norm-no-bias", _scaled, _rewrite, _check, examples=EXAMPLES,
                          summary="(x - mean) / sqrt(var + eps) * g -> LayerNormalization(x, g)")
layer_norm_unscaled = Rule("layer-norm-unscaled", _times_inverse, _rewrite, _check, examples=EXAMPLES,
                           summary="(x - mean) * 1/sqrt(var + eps) -> LayerNormalization(x, ones)")
layer_norm_unscaled_div = Rule("layer-norm-unscaled-div", _divided, _rewrite, _check, examples=EXAMPLES,
                               summary="(x - mean) / sqrt(var + eps) -> LayerNormalization(x, ones)")

RULES = [layer_norm, layer_norm_no_bias, layer_norm_unscaled, layer_norm_unscaled_div]

register_pass(RulePass("fuse-layer-norm", RULES, level=2, targets=("cpu", "cuda"),
                       summary="Decomposed LayerNorm (Div/Reciprocal, fp16 Casts, optional affine) -> LayerNormalization"))
