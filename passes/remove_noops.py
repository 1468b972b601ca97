"""remove-noops

    Identity(x)                               ->  x
    Dropout(x)            (inference)         ->  x
    Cast(x, to=dtype(x))                      ->  x
    Cast(Cast(x, to=A), to=B)                 ->  Cast(x, to=B)   when A holds every value of dtype(x) exactly
    CastLike(x, y)                            ->  Cast(x, to=dtype(y))   (then x when the types agree)
    Reshape(x, s)         where s == shape(x) ->  x               (0 / -1 resolved symbolically)
    Reshape(Reshape(x, a), b)                 ->  Reshape(x, b)   when b has no 0 (or allowzero=1)
    Expand(x, s)          where out == x      ->  x
    Transpose(x, perm=identity)               ->  x
    Transpose(Transpose(x, p), q)             ->  Transpose(x, p o q)
    Squeeze(Unsqueeze(x, a), a)               ->  x
    x + 0, x - 0, x * 1, x / 1, x ^ 1         ->  x               when the result's shape and type are x's

Shapes come from infer-shapes and fold-constants' symbolic shape values; when they are unknown nothing fires.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, const_array
from onnxc.shapes import dims_of, reshape_target, sym_value

# A -> dtypes whose every value A represents exactly (so Cast(x -> A) loses nothing).
_EXACT_IN = {
    ir.DataType.DOUBLE: {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT32,
                         ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT32, ir.DataType.UINT16,
                         ir.DataType.UINT8, ir.DataType.BOOL},
    ir.DataType.FLOAT: {ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT16, ir.DataType.INT8,
                        ir.DataType.UINT16, ir.DataType.UINT8, ir.DataType.BOOL},
    ir.DataType.INT64: {ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT32,
                        ir.DataType.UINT16, ir.DataType.UINT8, ir.DataType.BOOL},
    ir.DataType.INT32: {ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.UINT8,
                        ir.DataType.BOOL},
    ir.DataType.FLOAT16: {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL},
}


def _same(x: ir.Value, y: ir.Value) -> bool:
    """x and y have the same known element type and the same shape, dim by dim."""
    if x.dtype is None or x.dtype != y.dtype:
        return False
    dx, dy = dims_of(x), dims_of(y)
    return dx is not None and dx == dy


def _identity(op, x):
    return x


# -- Identity / Dropout
identity = Rule("remove-identity", lambda op, x: op.Identity(x), _identity, summary="Identity(x) -> x")


def _check_dropout(m):
    inputs = m.nodes[0].inputs
    if len(inputs) > 2 and inputs[2] is not None:
        mode = const_array(inputs[2], 1)
        if mode is None or bool(mode.reshape(-1)[0]):
            return m.fail("training_mode is not a constant false")
    return None


dropout = Rule("remove-dropout", lambda op, x: op.Dropout(x, _allow_other_inputs=True), _identity, _check_dropout,
               summary="inference Dropout(x) -> x")


# -- Cast
def _check_same_cast(m):
    if m.dtype("x") is None or int(m.dtype("x")) != m["to"]:
        return m.fail(f"input type {m.dtype('x')} is not the cast's target", "x")
    return None


same_cast = Rule("remove-same-type-cast", lambda op, x: op.Cast(x, to=Attr("to")), _identity, _check_same_cast,
                 summary="Cast(x, to=dtype(x)) -> x")


def _check_cast_chain(m):
    src = m.dtype("x")
    mid = ir.DataType(m["mid"])
    if src is None:
        return m.fail("input type unknown", "x")
    if src != mid and src not in _EXACT_IN.get(mid, ()):
        return m.fail(f"the intermediate {mid.name} does not hold every {src.name} value", "x")
    return None


cast_chain = Rule("fold-cast-chain",
                  lambda op, x: op.Cast(op.Cast(x, to=Attr("mid")), to=Attr("to")),
                  lambda op, x, to: op.Cast(x, to=to), _check_cast_chain,
                  summary="Cast(Cast(x, A), B) -> Cast(x, B) when A is exact for x")


def _check_castlike(m):
    if m.dtype("y") is None:
        return m.fail("the type of the 'like' input is unknown", "y")
    return {"to": int(m.dtype("y"))}


castlike = Rule("lower-castlike", lambda op, x, y: op.CastLike(x, y, _allow_other_attrs=False),
                lambda op, x, to: op.Cast(x, to=to), _check_castlike,
                summary="CastLike(x, y) -> Cast(x, to=dtype(y))")


# -- Reshape
def _check_reshape_noop(m):
    dims, target = dims_of(m["x"]), sym_value(m["shape"])
    if dims is None or target is None:
        return m.fail("input shape or target not known", "x", "shape")
    resolved = reshape_target(dims, target, bool(m["allowzero"]))
    if resolved is None or len(resolved) != len(dims) or any(a != b for a, b in zip(resolved, dims)):
        return m.fail(f"target {target} differs from input shape {dims}", "shape")
    return None


reshape_noop = Rule("remove-reshape-noop",
                    lambda op, x, shape: op.Reshape(x, shape, allowzero=Attr("allowzero", 0)),
                    _identity, _check_reshape_noop, summary="Reshape(x, shape(x)) -> x")


def _check_reshape_chain(m):
    target = sym_value(m["b"])
    if not m["allowzero"] and (target is None or 0 in [t for t in target if isinstance(t, int)]):
        return m.fail("outer target may copy dims (0) from the inner reshape", "b")
    return None


reshape_chain = Rule("fold-reshape-chain",
                     lambda op, x, a, b: op.Reshape(op.Reshape(x, a), b, allowzero=Attr("allowzero", 0)),
                     lambda op, x, b, allowzero: op.Reshape(x, b, allowzero=allowzero or None),
                     _check_reshape_chain, summary="Reshape(Reshape(x, a), b) -> Reshape(x, b)")


# -- Expand
def _check_expand_noop(m):
    out = m.outputs[0]
    if _same(m["x"], out):
        return None
    dims, target = dims_of(m["x"]), sym_value(m["shape"])
    if dims is not None and target is not None and len(target) <= len(dims) and all(
            t == 1 for t in target):
        return None
    return m.fail("the expanded shape is not known to equal the input's", "shape")


expand_noop = Rule("remove-expand-noop", lambda op, x, shape: op.Expand(x, shape), _identity, _check_expand_noop,
                   summary="Expand(x, s) -> x when it does not broadcast")


# -- Transpose
def _check_identity_perm(m):
    perm = m["perm"]
    if perm is None or list(perm) != list(range(len(perm))):
        return m.fail(f"perm {perm} is not the identity")
    return None


transpose_noop = Rule("remove-transpose-noop", lambda op, x: op.Transpose(x, perm=Attr("perm")), _identity,
                      _check_identity_perm, summary="Transpose(x, identity) -> x")


def _check_transpose_chain(m):
    if m["p"] is None or m["q"] is None:
        return m.fail("a transpose has no explicit perm")
    return {"perm": [list(m["p"])[i] for i in m["q"]]}


transpose_chain = Rule("fold-transpose-chain",
                       lambda op, x: op.Transpose(op.Transpose(x, perm=Attr("p")), perm=Attr("q")),
                       lambda op, x, perm: op.Transpose(x, perm=perm), _check_transpose_chain,
                       summary="Transpose(Transpose(x, p), q) -> Transpose(x, p o q)")


# -- Squeeze(Unsqueeze)
def _axes(m, pname: str):
    """Axes from the attribute (opset < 13) or from the constant second input (opset 13+)."""
    attr = m.attr(pname, "axes")
    if attr is not None:
        return tuple(attr)
    inputs = m.node(pname).inputs
    arr = const_array(inputs[1], 16) if len(inputs) > 1 and inputs[1] is not None else None
    return None if arr is None else tuple(int(a) for a in arr.reshape(-1))


def _check_squeeze_unsqueeze(m):
    rank = len(dims_of(m["x"]) or ()) if m["x"].shape is not None else None
    a, b = _axes(m, "u"), _axes(m, "s")
    if a is None or b is None or rank is None:
        return m.fail("axes or rank unknown")
    full = rank + len(a)
    if sorted(x % full for x in a) != sorted(x % full for x in b):
        return m.fail(f"unsqueeze axes {a} differ from squeeze axes {b}")
    return None


squeeze_unsqueeze = Rule(
    "remove-squeeze-unsqueeze",
    lambda op, x: op.Squeeze(op.Unsqueeze(x, _name="u", _allow_other_inputs=True), _name="s",
                             _allow_other_inputs=True),
    _identity, _check_squeeze_unsqueeze, summary="Squeeze(Unsqueeze(x, a), a) -> x")


# -- arithmetic identities
def _neutral(value: float):
    def check(m):
        c = m.const("c", 64)
        if c is None or not np.all(c == value):
            return m.fail(f"operand is not a constant {value}", "c")
        if not _same(m["x"], m.outputs[0]):
            return m.fail("the result's shape or type differs from x (broadcast or promotion)", "x")
        return None
    return check


add_zero = Rule("remove-add-zero", lambda op, x, c: op.Add(x, c), _identity, _neutral(0.0), summary="x + 0 -> x")
sub_zero = Rule("remove-sub-zero", lambda op, x, c: op.Sub(x, c), _identity, _neutral(0.0), summary="x - 0 -> x")
mul_one = Rule("remove-mul-one", lambda op, x, c: op.Mul(x, c), _identity, _neutral(1.0), summary="x * 1 -> x")
div_one = Rule("remove-div-one", lambda op, x, c: op.Div(x, c), _identity, _neutral(1.0), summary="x / 1 -> x")
pow_one = Rule("remove-pow-one", lambda op, x, c: op.Pow(x, c), _identity, _neutral(1.0), summary="x ^ 1 -> x")
for _rule in (add_zero, sub_zero, mul_one, div_one, pow_one):   # values onnxc fuzz draws (compiler/fuzz.py)
    _rule.examples = {"c": (0.0, 1.0, "scalar")}

RULES = [identity, dropout, same_cast, cast_chain, castlike, reshape_noop, reshape_chain, expand_noop, transpose_noop,
         transpose_chain, squeeze_unsqueeze, add_zero, sub_zero, mul_one, div_one, pow_one]

register_pass(RulePass("remove-noops", RULES, level=1,
                       summary="Remove Identity, same-type Casts, no-op Reshape/Expand/Transpose, x+0, x*1, ..."))
