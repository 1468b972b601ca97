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

Requires (compiler/norms.py, shared with fuse-layer-norm): eps is a scalar constant; the ReduceMean keeps dims and
reduces the last axis only; the hidden size H (last dim of x) is static; w broadcasts along the last axis only: 1-D
of size H, (1, .., 1, H), or a scalar constant (made 1-D); an input Cast only widens (fp16/bf16 -> fp32 -> fp64).

Dtypes: the fused op runs in x's dtype when the pattern's result has x's dtype (the Casts around it cancel; ORT
computes in fp32 inside, so an fp16 model rounds once instead of twice, and a constant fp32 weight is rounded to
fp16 at compile time, both within fp16 tolerance); otherwise it runs in the widened dtype and a Cast gives the
result's dtype. SimplifiedLayerNormalization is ORT's own schema in the default domain (any opset); ORT computes
x * (1 / sqrt(mean(x^2) + eps)) * w in fp32 (docs/kernels.md). Reference: kernels/norms.simplified_layer_norm.
"""
from __future__ import annotations

import numpy as np
from onnxc import norms
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Failure, Rule

EXAMPLES = {"eps": (1e-5, 1e-6, "input")}   # values onnxc fuzz draws (compiler/fuzz.py)


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
def _check(m):
    found = norms.check_norm(m, ("rm",))
    if isinstance(found, Failure):
        return found
    found, hidden, rank = found
    if "w" not in m.binds:
        return {**found, "scale": np.ones(hidden, dtype=found["dtype"].numpy())}
    scale = norms.per_channel(m, "w", hidden, rank, found["dtype"], "weight")
    return scale if isinstance(scale, Failure) else {**found, "scale": scale}


# ---------------------------------------------------------------------------------------------------- rewrite
def _rewrite(op, x, epsilon, dtype, out_dtype, scale, w=None):
    xin = norms.in_dtype(op, x, dtype)
    y = op.SimplifiedLayerNormalization(xin, norms.param(op, scale, w, dtype, "scale"), axis=-1, epsilon=epsilon)
    return norms.cast_out(op, y, x, dtype, out_dtype)


rms_norm = Rule("rms-norm", _scaled, _rewrite, _check, examples=EXAMPLES,
                summary="x / sqrt(mean(x^2) + eps) * w -> SimplifiedLayerNormalization")
rms_norm_cast_after_scale = Rule("rms-norm-cast-after-scale", _cast_after_scale, _rewrite, _check, examples=EXAMPLES,
                                 summary="Cast(x' / rms(x') * w) (scale in fp32) -> SimplifiedLayerNormalization")
rms_norm_unscaled = Rule("rms-norm-unscaled", _times_inverse, _rewrite, _check, examples=EXAMPLES,
                         summary="x * 1/sqrt(mean(x^2) + eps) -> SimplifiedLayerNormalization(x, ones)")
rms_norm_unscaled_div = Rule("rms-norm-unscaled-div", _divided, _rewrite, _check, examples=EXAMPLES,
                             summary="x / sqrt(mean(x^2) + eps) -> SimplifiedLayerNormalization(x, ones)")

RULES = [rms_norm, rms_norm_cast_after_scale, rms_norm_unscaled, rms_norm_unscaled_div]

register_pass(RulePass("fuse-rms-norm", RULES, level=2, targets=("cpu", "cuda"),
                       summary="RMSNorm (every exporter form, fp16 Casts, per-head) -> SimplifiedLayerNormalization"))
