"""fold-shapes

    Shape(v)[start:end]  ->  Concat(Shape(u_k)[j_k : j_k'], static dims ...)

when every dim read is static or provably dim j of a value u one producer back (`shapes.dim_inputs`):

    Shape(Gather(table, ids, axis=0))  =  Shape(ids) ++ shape(table)[1:]
    Shape(LayerNorm(x)), Shape(Relu(x)), ... =  Shape(x)
    Shape(a + b)[i]  =  Shape(a)[i]   when b's dim i is absent, provably 1, or provably a's
    Shape(Reshape(x, t))[i] = Shape(u)[j] when t[i] was read from Shape(u)[j]; Expand, Transpose, MatMul likewise.

TorchScript exports read shapes of computed values (`Shape(LayerNorm(embeddings))`), which puts the value's whole
data cone (input_ids, embedding lookups) under the attention mask and gives the embedding Gather an outside user.
Folding walks the read back to graph inputs, so the mask reads only shapes and EmbedLayerNormalization is free to fuse.
Exact: each element is the same integer at run time. Requires the input's rank known and the Shape output int64.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.pass_manager import PassResult, RulePass, register_pass
from onnxc.rules import Attr, Rule
from onnxc.shapes import dim_inputs, dims_of


def _check_shape_fold(m):
    v, node = m["x"], m.nodes[0]
    dims, p = dims_of(v), v.producer()
    if dims is None or p is None:
        return m.fail("the input's rank or producer is unknown", "x")
    rank = len(dims)
    start, end = m["start"] or 0, rank if m["end"] is None else m["end"]
    start, end = (min(max(k + rank if k < 0 else k, 0), rank) for k in (start, end))
    pieces: list = []                                        # [int] static runs and [u, j0, j1) source runs
    for i in range(start, end):
        found = dim_inputs(v, i, memo=_MEMO)
        src = next((s for s in found if pieces and isinstance(pieces[-1], tuple) and s[0] is pieces[-1][0] and
                    s[1] == pieces[-1][2]), None)               # prefer one that continues the current run
        if src is None and not isinstance(dims[i], int):     # a static dim is a constant otherwise
            if not found:
                return m.fail(f"dim {i} ({dims[i]}) of the input is not provably a dim of an earlier value", "x")
            src = found[0]
        if src is None and pieces and isinstance(pieces[-1], list):
            pieces[-1].append(dims[i])
        elif src is not None and pieces and isinstance(pieces[-1], tuple) and pieces[-1][0] is src[0] and \
                pieces[-1][2] == src[1]:
            pieces[-1] = (src[0], pieces[-1][1], src[1] + 1)
        else:
            pieces.append([dims[i]] if src is None else (src[0], src[1], src[1] + 1))
    if node.outputs[0].dtype not in (None, ir.DataType.INT64):
        return m.fail("unexpected Shape output type")
    return {"pieces": pieces, "opset": m.opset}


def _fold_shape(op, pieces, opset):
    parts = []
    for pc in pieces:
        if isinstance(pc, list):
            parts.append(op.const(np.array(pc, np.int64)))
        else:
            u, j0, j1 = pc
            rank = len(dims_of(u) or ())
            if opset >= 15 or (j0 == 0 and j1 == rank):
                parts.append(op.Shape(u, start=j0 or None, end=None if j1 == rank else j1))
            else:       # Shape has no start/end before opset 15
                parts.append(op.Slice(op.Shape(u), op.const(np.array([j0], np.int64)),
                                      op.const(np.array([j1], np.int64))))
    if not parts:
        return op.const(np.zeros(0, np.int64))
    return parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)


shape_fold = Rule("fold-shape-of-derived",
                  lambda op, x: op.Shape(x, start=Attr("start"), end=Attr("end")), _fold_shape, _check_shape_fold,
                  summary="Shape(f(u, ...)) -> Shape(u) pieces and static dims, when f keeps or derives them")


class _FoldShapes(RulePass):
    """One dim memo for the whole run: a fold replaces Shape(v) by pieces of equal size, so every dim equality found
    before stays true (the memo keeps the values it names alive, so no id is reused). A 30-layer TorchScript
    decoder's first run went from 36 s to under a second."""

    def run(self, model: ir.Model, ctx) -> PassResult:
        _MEMO.clear()
        try:
            return super().run(model, ctx)
        finally:
            _MEMO.clear()


_MEMO: dict = {}

register_pass(_FoldShapes("fold-shapes", [shape_fold], level=1,
                          summary="Shape(f(u)) -> Shape(u) pieces and static dims, when f keeps or derives them"))
