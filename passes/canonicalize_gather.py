"""canonicalize-gather

    GatherND(x, I)  ->  Gather(x, I[:, 0], axis=0)                       I a constant (m, 1), batch_dims 0
    rule: gathernd-rows

    Transpose(Gather(Transpose(x, p), i, axis=g), q)  ->  Transpose(Gather(x, i, axis=p[g]), r),  r[k] = p[q[k]]
    rule: gather-through-transposes                   i 1-D; the outer Transpose dropped when r is the identity

Index selection along one axis (`t[..., [j], :]` in PyTorch) reaches ONNX as the dynamo exporter writes advanced
indexing: the indexed axis moved first, a GatherND of rows, and the axes moved back (Falcon's multi-query K and V,
sliced out of the packed QKV heads). Both rewrites are exact index algebra:

- GatherND with indices of shape (m, 1) and batch_dims 0 picks m whole slices along axis 0: Gather with the
  column I[:, 0] (negative indices mean the same in both).
- Gather along axis g of x permuted by p reads axis p[g] of x; output axis k of the outer Transpose is axis q[k]
  of the gathered tensor, which is axis p[q[k]] of x. A 1-D index keeps the rank, so the axes stay aligned.

Fusions then read the selected heads as any other head slice: Transpose(BSNH, [0, 2, 1, 3]).

Requires: the GatherND's indices a constant of shape (m, 1) and batch_dims 0; the Gather's index 1-D (its rank
known), its input a Transpose (kept when something else reads it), and both perms given or of a known rank.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, attr_value, const_array
from onnxc.shapes import dims_of


def nd_pattern(op, x, i):
    return op.GatherND(x, i, batch_dims=Attr("batch_dims"), _name="g")


def nd_check(m):
    if m["batch_dims"] not in (None, 0):
        return m.fail(f"batch_dims {m['batch_dims']} is not 0")
    idx = const_array(m["i"], 1 << 16)
    if idx is None or idx.ndim != 2 or idx.shape[1] != 1:
        return m.fail("the indices are not a constant of shape (m, 1)", "i")
    return {"rows": idx[:, 0].astype(np.int64)}


def nd_rewrite(op, x, rows):
    return op.Gather(x, op.const(rows), axis=0)


def _perm(perm, rank: int | None) -> list[int] | None:
    if perm is not None:
        return [int(a) for a in perm]
    return list(range(rank))[::-1] if rank is not None else None


def tr_pattern(op, y):
    return op.Transpose(y, perm=Attr("q"), _name="t2")


def tr_check(m):
    """y = Gather(Transpose(x, p), i, axis=g); the Gather and the inner Transpose may have other readers (K and V
    share the inner one, a Shape may read the Gather), and they stay for them."""
    g = m["y"].producer()
    if g is None or g.op_type != "Gather" or g.domain != "":
        return m.fail("the transposed value is not a Gather", "y")
    inner = g.inputs[0].producer()
    if inner is None or inner.op_type != "Transpose" or inner.domain != "":
        return m.fail("the gathered value is not a Transpose", "y")
    i = g.inputs[1]
    di = dims_of(i)
    if di is None or len(di) != 1:
        return m.fail("the index is not 1-D (a scalar index drops the axis)", "y")
    x = inner.inputs[0]
    dx = dims_of(x)
    rank = len(dx) if dx is not None else None
    p, q = _perm(attr_value(inner, "perm"), rank), _perm(m["q"], rank)
    if p is None or q is None or len(p) != len(q):
        return m.fail("the perms' rank is not known")
    axis = int(attr_value(g, "axis", default=0))
    axis = axis + len(p) if axis < 0 else axis
    if not 0 <= axis < len(p):
        return m.fail(f"axis {axis} is outside rank {len(p)}")
    r = [p[k] for k in q]
    return {"x": x, "i": i, "gather_axis": p[axis], "outer": None if r == list(range(len(r))) else r}


def tr_rewrite(op, x, i, gather_axis, outer):
    y = op.Gather(x, i, axis=gather_axis)
    if outer is None:
        return y
    y.type = x.type         # an intermediate: its type and shape as Gather defines them, for the fusions to read
    dx, di = dims_of(x), dims_of(i)
    if dx is not None and di is not None:
        y.shape = ir.Shape([*dx[:gather_axis], *di, *dx[gather_axis + 1:]])
    return op.Transpose(y, perm=outer)


RULES = [Rule("gathernd-rows", nd_pattern, nd_rewrite, nd_check,
              summary="GatherND(x, I) with constant I (m, 1) -> Gather(x, I[:, 0], axis=0)"),
         Rule("gather-through-transposes", tr_pattern, tr_rewrite, tr_check,
              summary="Transpose(Gather(Transpose(x, p), i, g), q) -> Gather on x's own axis p[g], one Transpose")]

register_pass(RulePass("canonicalize-gather", RULES, level=2,
                       summary="index selection written as Transpose/GatherND/Transpose -> Gather on the axis"))
