"""lower-gemm

    Reshape(Gemm(Reshape(x, (-1, K)), W, C; alpha, beta, transB), T)  ->  alpha * (x' @ op(W)) + beta * C
    rule: unflatten-gemm                                 (op(W) = W^T when transB; x' = x, or x with its last j dims
                                                          merged into K by Reshape(x, (0, ..., 0, K)))

A linear layer applied to x (d1, ..., dn, K) through a 2-D Gemm (HF's Conv1D, torch's addmm, under both exporters)
flattens the leading dims, multiplies, and restores them: Reshape(x, (-1, K)) is x as P = d1 * ... * dn rows, and
T = (d1, ..., dn, N) regroups the P rows of the product. MatMul broadcasts over the leading dims, so the same rows
come out of x @ op(W) directly, and a C that is the same for every row ((N,), (1, N), (1,) or a scalar) is a
row-broadcast Add. When the flatten also merges trailing dims (dynamo's attention output (B, S, N, H) -> (-1, N*H)),
K = d(n-j+1) * ... * dn with those dims static, and x' keeps the leading dims with Reshape's copy (0) elements.

What it buys: the projection's output is row-aligned with x for the skip-norm proof, bias Adds become visible to
the GELU and attention fusions and to the skip norms' bias input, and the shape arithmetic that sized T dies.

Requires: transA = 0; x of rank >= 2; the flatten target (-1, K) with K provably x's last dim (same int or name, or
read from Shape(x) or from a dim proved equal, onnxc.shapes.same_dim) or the product of x's static last j dims; T
provably (d1, ..., dn, N) element by element (at most one -1, which then stands for the one dim left, the others
equal by name or by the dim they were read from); C absent or the same for every row. Refused otherwise, with the
reason (`onnxc compile --explain unflatten-gemm`).
"""
from __future__ import annotations

import numpy as np
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule
from onnxc.shapes import dims_equal, dims_of, element_is_dim, sym_value


def _merged(dx: tuple, k) -> int | None:
    """j > 1 such that K = d(n-j+1) * ... * dn with those dims static (at least one leading dim left), else None."""
    prod = 1
    for j in range(1, len(dx)):
        if not isinstance(dx[-j], int) or not isinstance(k, int):
            return None
        prod *= dx[-j]
        if prod == k and j > 1:
            return j
        if prod > k:
            return None
    return None


def pattern(op, x, flat_shape, w, out_shape):
    flat = op.Reshape(x, flat_shape, allowzero=Attr("flat_allowzero", 0))
    y = op.Gemm(flat, w, _allow_other_inputs=True, _name="gemm")
    return op.Reshape(y, out_shape, allowzero=Attr("out_allowzero", 0))


def check(m):
    gemm, memo = m.node("gemm"), {}
    if m.attr("gemm", "transA", 0):
        return m.fail("Gemm transposes its flattened input (transA = 1)")
    dx = dims_of(m["x"])
    if dx is None or len(dx) < 2:
        return m.fail(f"input rank is unknown or below 2 (dims {dx})", "x")
    flat = sym_value(m["flat_shape"])
    if flat is None or len(flat) != 2 or flat[0] != -1 or (flat[1] == 0 and not m["flat_allowzero"]):
        return m.fail(f"flatten target {flat} is not (-1, K)", "flat_shape")
    j = 1 if element_is_dim(m["flat_shape"], 1, flat[1], m["x"], len(dx) - 1, memo) else _merged(dx, flat[1])
    if j is None:
        return m.fail(f"cannot prove the flatten's K {flat[1]} is the last dim(s) of the input {dx}", "flat_shape")
    dw = dims_of(m["w"])
    trans_b = m.attr("gemm", "transB", 0)
    if dw is None or len(dw) != 2:
        return m.fail(f"weight is not 2-D (dims {dw})", "w")
    n = dw[0] if trans_b else dw[1]
    out, lead = sym_value(m["out_shape"]), len(dx) - j
    if out is None or len(out) != lead + 1:
        return m.fail(f"unflatten target {out} does not restore the leading dims {dx[:lead]}", "out_shape")
    minus = [i for i, t in enumerate(out) if t == -1]

    def restores(i: int, t) -> bool:
        if t == 0 and not m["out_allowzero"]:   # copies the Gemm output's (P, N): right only when P = d1
            return lead == 1
        return i in minus or (element_is_dim(m["out_shape"], i, t, m["x"], i, memo) if i < lead else dims_equal(t, n))

    if len(minus) > 1 or not all(restores(i, t) for i, t in enumerate(out)):
        return m.fail(f"cannot prove the unflatten target {out} is {dx[:lead] + (n,)}", "out_shape")
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    dc = dims_of(c) if c is not None else ()
    if c is not None and (dc is None or len(dc) > 2 or len(dc) == 2 and dc[0] != 1):
        return m.fail(f"Gemm C of dims {dc} is not the same for every row")
    merge = np.array([0] * lead + [flat[1]], np.int64) if j > 1 else None
    return {"c": c, "merge": merge, "alpha": float(m.attr("gemm", "alpha", 1.0)),
            "beta": float(m.attr("gemm", "beta", 1.0)), "trans_b": trans_b}


def rewrite(op, x, w, c, merge, alpha, beta, trans_b):
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    if merge is not None:
        x = op.Reshape(x, op.const(merge, "merge"))
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]) if trans_b else w)
    if alpha != 1.0:
        y = op.Mul(y, op.const(np.array(alpha, dtype), "alpha"))
    if c is not None:
        y = op.Add(y, c if beta == 1.0 else op.Mul(c, op.const(np.array(beta, dtype), "beta")))
    return y


RULES = [Rule("unflatten-gemm", pattern, rewrite, check,
              summary="Reshape(Gemm(Reshape(x, (-1, K)), W, C), (..., N)) -> x @ W + C")]

register_pass(RulePass("lower-gemm", RULES, level=1,
                       summary="Flatten -> Gemm -> unflatten (Conv1D, addmm) -> MatMul (+ Add) on the unflattened input"))
