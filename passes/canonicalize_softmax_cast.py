"""canonicalize-softmax-cast: an attention whose softmax runs in float32 on float16 scores, written in float16

TorchScript's float16 exports (BERT at opset 14) cast the scores up before a float32 mask and compute the softmax
and P @ V in float32 (V cast up too), the layer's output staying float32. With c16 = Cast(., float16), c32 =
Cast(., float32), and g(p) = Where(IsNaN(p), 0, p) the optional NaN guard:

    g(Softmax(c32(s) + m)) @ c32(v)      ->  c32(g(Softmax(s + max(c16(m), lowest16))) @ v)    softmax-in-scores-type
    Reshape(c32(x), t)                   ->  c32(Reshape(x, t))                                 attention-cast-below-reshape
    Transpose(c32(x), perm)              ->  c32(Transpose(x, perm))                            attention-cast-below-transpose
    Shape(c32(x))                        ->  Shape(x)                                           attention-cast-shape

(s, v float16, m float32). The first makes the core the plain float16 one the attention fusions read; the other two
move its Cast past the layout ops that give the output back as (B, S, N*H), where the fusions write their output
(only for a Cast of an attention output: x is a MatMul of a softmax, through Reshape/Transpose). A Cast and a
layout op commute exactly. The mask is clamped to float16's lowest finite value, so a -inf (or a float32 fill past
float16's range) stays a large negative finite and a query that sees no key averages instead of giving NaN.

Numerics: the softmax of float16 scores is taken in float16 (the kernels accumulate in float32), P and P @ V are
rounded to float16: a relative error of float16's precision (~1e-3), what a float16 model is verified to. Applies on
every target; the fused float16 Attention/MultiHeadAttention have CUDA kernels, on the CPU target onnxruntime runs
them in float32 between Casts it inserts (their CPU kernels are float32).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def _typed(v: ir.Value, dtype: ir.DataType, like: ir.Value | None = None) -> ir.Value:
    """Types for the fusions that read these before inference runs again."""
    v.dtype = dtype
    if like is not None and like.shape is not None:
        v.shape = like.shape
    return v


# ------------------------------------------------------------------------------------- softmax-in-scores-type
def narrow_pattern(op, s, m, v):
    p = op.Softmax(op.Add(op.Cast(s, to=1, _name="up"), m), axis=Attr("axis", -1), _name="sm")
    p = op.Or(op.Where(op.IsNaN(p), 0.0, p, _name="guard"), p)
    return op.MatMul(p, op.Cast(v, to=1, _name="vup"), _name="pv")


def narrow_check(m):
    if m["s"].dtype != F16 or m["v"].dtype != F16:
        return m.fail("the scores or V are not float16", "s")
    if m["m"].dtype != F32:
        return m.fail("the mask is not float32", "m")
    return {"guarded": "guard" in m.named, "like": m.outputs[0]}


def narrow_rewrite(op, s, m, v, axis, guarded, like):
    m16 = _typed(op.Max(_typed(op.Cast(m, to=int(F16)), F16, m),
                        op.const(np.array(np.finfo(np.float16).min, np.float16))), F16, m)
    p = _typed(op.Softmax(_typed(op.Add(s, m16), F16), axis=axis), F16)
    if guarded:
        p = _typed(op.Where(op.IsNaN(p), op.const(np.array(0, np.float16)), p), F16)
    out = _typed(op.MatMul(p, v), F16, like)
    return _typed(op.Cast(out, to=int(F32)), F32, like)


# ------------------------------------------------------------------------------- attention-cast-below-layout
def _attention_output(x: ir.Value) -> bool:
    """x is P @ V of a softmax (NaN guard allowed), possibly through Reshape/Transpose."""
    for _ in range(4):
        n = x.producer()
        if n is None or n.domain != "":
            return False
        if n.op_type in ("Reshape", "Transpose"):
            x = n.inputs[0]
            continue
        if n.op_type != "MatMul" or (p := n.inputs[0].producer()) is None:
            return False
        if p.op_type == "Where" and p.inputs[2] is not None and p.inputs[2].producer() is not None:
            p = p.inputs[2].producer()
        return p.op_type == "Softmax"
    return False


def below_check(m):
    if m["x"].dtype != F16 or not _attention_output(m["x"]):
        return m.fail("not a float32 Cast of a float16 attention output", "x")
    return {"like": m.outputs[0]}


def reshape_pattern(op, x, t):
    return op.Reshape(op.Cast(x, to=1, _name="c"), t, allowzero=Attr("allowzero", 0))


def reshape_rewrite(op, x, t, allowzero, like):
    return _typed(op.Cast(_typed(op.Reshape(x, t, allowzero=allowzero), F16, like), to=int(F32)), F32, like)


def transpose_pattern(op, x):
    return op.Transpose(op.Cast(x, to=1, _name="c"), perm=Attr("perm"))


def transpose_rewrite(op, x, perm, like):
    return _typed(op.Cast(_typed(op.Transpose(x, perm=perm), F16, like), to=int(F32)), F32, like)


def shape_pattern(op, y):
    return op.Shape(y, _name="sh")


def shape_check(m):
    c = m["y"].producer()
    if c is None or c.op_type != "Cast" or c.domain != "" or c.attributes["to"].value != int(F32):
        return m.fail("not the shape of a float32 Cast", "y")
    if c.inputs[0].dtype != F16 or not _attention_output(c.inputs[0]):
        return m.fail("not the shape of a float32 Cast of a float16 attention output", "y")
    return {"x": c.inputs[0], "attrs": {k: a.value for k, a in m.node("sh").attributes.items()}}


def shape_rewrite(op, y, x, attrs):
    return op.Shape(x, **attrs)


RULES = [
    Rule("softmax-in-scores-type", narrow_pattern, narrow_rewrite, narrow_check,
         summary="Softmax(Cast(s, f32) + m) @ Cast(v, f32), s and v float16 -> Cast(Softmax(s + m16) @ v, f32)"),
    Rule("attention-cast-below-reshape", reshape_pattern, reshape_rewrite, below_check,
         summary="Reshape(Cast(attention output, f32)) -> Cast(Reshape(.), f32)"),
    Rule("attention-cast-below-transpose", transpose_pattern, transpose_rewrite, below_check,
         summary="Transpose(Cast(attention output, f32)) -> Cast(Transpose(.), f32)"),
    Rule("attention-cast-shape", shape_pattern, shape_rewrite, shape_check,
         summary="Shape(Cast(attention output, f32)) -> Shape(attention output): the Cast's only readers move with it"),
]


register_pass(RulePass("canonicalize-softmax-cast", RULES, level=2, summary="A float32 softmax over float16 scores "
                       "(TorchScript float16 exports) -> the float16 attention core, cast after."))
