"""canonicalize-rotary

    x * cos + r * sin,  r = rotate_half(x)       ->  x * cos + Concat(Neg(x[..., h:]), x[..., :h]) * sin
    x * cos + r * sin,  r = rotate_every_two(x)  ->  x * cos + Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1),
                                                                      Unsqueeze(x[..., 0::2], -1), -1), Shape(x)) * sin

Exporters and model code write rotate_half in many ways: two Slices (the canonical form), a Split, a product with a
signed permutation matrix, a signed Gather, a Reshape/flip stack. Which one is not in the graph's shape; what it
computes is: r's cone from x alone is evaluated on random data and compared with both rotations exactly
(onnxc.rotary.proved_rotation). A proved r is replaced by the canonical form, so fuse-gqa (and any fusion reading
rotary) reads one form; the old subgraph dies in the cleanup. Exact: the same elements, moved and negated.

Requires: x's last dim static and even; r computed from x alone (and constants) in at most 40 nodes; r read by
the Mul (it may be read elsewhere too: only this use moves).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.ir import GraphWriter
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rotary import parse_rotary, proved_rotation, readings
from onnxc.shapes import derived_dims

INT64_MAX = 2**63 - 1


class _Writer(GraphWriter):
    """GraphWriter with int64 constants shared within one rewrite and typed outputs (the fusions read these shapes
    before inference runs again)."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str):
        super().__init__(graph, prefix, anchor)
        self.consts: dict[tuple[int, ...], ir.Value] = {}

    def ints(self, *values: int) -> ir.Value:
        if values not in self.consts:
            self.consts[values] = self.const(np.array(values, np.int64))
        return self.consts[values]

    def op(self, op_type: str, *inputs: ir.Value, like: ir.Value | None = None, dims: tuple | None = None,
           **attrs: int) -> ir.Value:
        out = self.node(op_type, list(inputs), **attrs).outputs[0]
        if like is not None:
            out.type = like.type
        if dims is not None:
            out.shape = ir.Shape(list(dims))
        return out


def canonical_rotation(graph: ir.Graph, anchor: ir.Node, x: ir.Value, form: str, base: str) -> ir.Value:
    """rotate_half(x) (form "half") or rotate_every_two(x) ("interleaved") in the canonical form, before `anchor`."""
    w = _Writer(graph, anchor, base)
    d = tuple(None if k in (None, "?") else k for k in derived_dims(x))
    lead, last = d[:-1], d[-1]
    half = lead + (last // 2,)
    if form == "half":
        h = last // 2
        hi = w.op("Slice", x, w.ints(h), w.ints(INT64_MAX), w.ints(-1), like=x, dims=half)
        lo = w.op("Slice", x, w.ints(0), w.ints(h), w.ints(-1), like=x, dims=half)
        return w.op("Concat", w.op("Neg", hi, like=x, dims=half), lo, axis=-1, like=x, dims=d)
    odd = w.op("Slice", x, w.ints(1), w.ints(INT64_MAX), w.ints(-1), w.ints(2), like=x, dims=half)
    even = w.op("Slice", x, w.ints(0), w.ints(INT64_MAX), w.ints(-1), w.ints(2), like=x, dims=half)
    pair = half + (1,)
    stack = w.op("Concat", w.op("Unsqueeze", w.op("Neg", odd, like=x, dims=half), w.ints(-1), like=x, dims=pair),
                 w.op("Unsqueeze", even, w.ints(-1), like=x, dims=pair), axis=-1, like=x, dims=half + (2,))
    shape = w.op("Shape", x, dims=(len(d),))
    shape.type = ir.TensorType(ir.DataType.INT64)
    return w.op("Reshape", stack, shape, like=x, dims=d)


def _widens(cast: ir.Node) -> bool:
    src, dst = cast.inputs[0].dtype, cast.outputs[0].dtype
    return src is not None and dst is not None and src.is_floating_point() and dst.is_floating_point() and \
        dst.itemsize >= src.itemsize


@register_pass
class CanonicalizeRotary(Pass):
    """rotate_half / rotate_every_two written any other way (proved by evaluation) -> the canonical Slice form."""

    name = "canonicalize-rotary"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        count = 0
        for add in [n for n in graph if n.op_type == "Add" and n.domain == "" and len(n.inputs) == 2]:
            if parse_rotary(add.outputs[0]) is not None:
                continue                                   # already canonical
            for mul, k, x, _, r, _ in readings(add):
                if r is x:
                    continue
                form = proved_rotation(r, x)
                c = x.producer()
                if form is None and c is not None and c.op_type == "Cast" and _widens(c):
                    # OLMo: x = Cast(x0) to float32 and r taken on x0 then cast: a widening Cast commutes with
                    # Slice/Neg/Concat, so r = rotate_half(x) when r is rotate_half of x0 (proved from x0)
                    form = proved_rotation(r, c.inputs[0])
                if form is None:
                    continue
                canon = canonical_rotation(graph, mul, x, form, f"{add.name or 'rotary'}/canonical")
                mul.replace_input_with(k, canon)
                count += 1
                break
        return PassResult(model, bool(count), {"rotate-half": count} if count else {})
