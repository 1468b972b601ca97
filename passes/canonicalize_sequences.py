"""canonicalize-sequences

    SequenceAt(SplitToSequence(x, split, axis), i)            ->  Split(x, split, axis)[i]
    SequenceAt(SplitToSequence(x, axis, keepdims=0), i)       ->  Squeeze(Split(x, [1]*d, axis)[i], axis)
    ConcatFromSequence(SplitToSequence(x, ...), axis, new_axis) ->  Concat(parts, axis)   (Unsqueeze each if new_axis)
    SequenceLength(SplitToSequence(x, ...))                  ->  n

The dynamo exporter without its optimizer writes `torch.split`/`chunk` as a sequence: SplitToSequence, then one
SequenceAt per part (GPT-2's packed c_attn, Phi-3's qkv_proj and gate_up_proj). Fusions read tensors, so the
sequence is brought to the tensor form the optimized exports and TorchScript write. Exact: each part is the same
slice of x.

Requires: the number of parts n is known: `split` a constant (1-D sizes, or a scalar chunk size with the axis'
length static) with keepdims=1, or no `split` with the axis' length static (parts of 1); every use of the sequence is a
SequenceAt with a constant index in [-n, n), a ConcatFromSequence or a SequenceLength; the sequence is no graph
output. A sequence that misses stays as it is, with a note saying why.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.domains import DEFAULT_OPSET
from onnxc.ir import GraphWriter
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import attr_value, const_array, replace_value
from onnxc.shapes import dims_of

USES = frozenset({"SequenceAt", "ConcatFromSequence", "SequenceLength"})


def split_sizes(node: ir.Node) -> list[int] | str:
    """The part sizes of SplitToSequence `node` along its axis, or why they are not known."""
    x = node.inputs[0]
    dims = dims_of(x)
    axis = attr_value(node, "axis", default=0)
    length = None
    if dims is not None and -len(dims) <= axis < len(dims) and isinstance(dims[axis], int):
        length = dims[axis]
    split = node.inputs[1] if len(node.inputs) > 1 else None
    if split is not None and attr_value(node, "keepdims", default=1) == 0:
        return "keepdims=0 beside split sizes (the standard ignores it; runtimes differ)"
    if split is not None:
        sizes = const_array(split, 4096)
        if sizes is None:
            return "the split sizes are not a constant"
        if sizes.ndim == 1:
            if (sizes <= 0).any():       # empty parts: ConcatFromSequence skips them where Concat may not
                return f"the split sizes {sizes.tolist()} hold an empty part"
            return [int(s) for s in sizes]
        if length is None:
            return "a scalar chunk size splits an axis of unknown length"
        chunk = int(sizes.reshape(-1)[0])
        if chunk <= 0:
            return f"the chunk size {chunk} is not positive"
        return [min(chunk, length - k) for k in range(0, length, chunk)]
    if length is None:
        return "parts of one along an axis of unknown length"
    return [1] * length


def _index(node: ir.Node, n: int) -> int | None:
    a = const_array(node.inputs[1], 1)
    if a is None or a.size != 1:
        return None
    i = int(a.reshape(-1)[0])
    return i + n if -n <= i < 0 else i if 0 <= i < n else None


def why_not(node: ir.Node, sizes: list[int] | str) -> str | None:
    """Why the sequence made by `node` cannot become tensors (None when it can)."""
    if isinstance(sizes, str):
        return sizes
    seq = node.outputs[0]
    if seq.is_graph_output():
        return "the sequence is a graph output"
    for user, _ in seq.uses():
        if user.op_type not in USES or user.domain != "":
            return f"the sequence is read by {user.op_type} '{user.name}'"
        if user.op_type == "SequenceAt" and _index(user, len(sizes)) is None:
            return f"SequenceAt '{user.name}' reads no constant index within the {len(sizes)} parts"
    return None


def rewrite(graph: ir.Graph, node: ir.Node, sizes: list[int], opset: int) -> None:
    """Replace the sequence `node` makes by the parts of one Split, before `node`; its readers read the parts."""
    x, n = node.inputs[0], len(sizes)
    axis = attr_value(node, "axis", default=0)
    squeeze = (len(node.inputs) < 2 or node.inputs[1] is None) and attr_value(node, "keepdims", default=1) == 0
    w = GraphWriter(graph, f"{node.name or 'split_to_sequence'}/canonical", node)

    def const(arr: np.ndarray, stem: str) -> ir.Value:
        return w.const(arr, stem)

    def add(op: str, inputs: list, n_out: int = 1, **attrs) -> ir.Node:
        return w.node(op, inputs, n_out=n_out, **attrs)

    if opset >= 13:
        split = add("Split", [x, const(np.array(sizes, np.int64), "sizes")], n, axis=axis)
    else:
        split = add("Split", [x], n, axis=axis, split=sizes)
    dims = dims_of(x)
    parts = []
    for k, out in enumerate(split.outputs):
        if x.dtype is not None:
            out.type = ir.TensorType(x.dtype)
        if dims is not None:
            out.shape = ir.Shape([sizes[k] if i == (axis % len(dims)) else d for i, d in enumerate(dims)])
        parts.append(out)
    if squeeze:
        ax = const(np.array([axis], np.int64), "axis")
        parts = [add("Squeeze", [p, ax]).outputs[0] if opset >= 13 else add("Squeeze", [p], axes=[axis]).outputs[0]
                 for p in parts]
    for user, _ in list(node.outputs[0].uses()):
        if user.op_type == "SequenceAt":
            part = parts[_index(user, n)]
            if part.is_graph_output() and user.outputs[0].is_graph_output():   # two outputs, one part
                part = add("Identity", [part]).outputs[0]
            replace_value(user.outputs[0], part)
        elif user.op_type == "SequenceLength":
            replace_value(user.outputs[0], const(np.array(n, np.int64), "length"))
        else:   # ConcatFromSequence
            c_axis = attr_value(user, "axis", default=0)
            pieces = parts
            if attr_value(user, "new_axis", default=0) == 1:
                ax = const(np.array([c_axis], np.int64), "new_axis")
                pieces = [add("Unsqueeze", [p, ax]).outputs[0] if opset >= 13 else
                          add("Unsqueeze", [p], axes=[c_axis]).outputs[0] for p in parts]
            replace_value(user.outputs[0], add("Concat", pieces, axis=c_axis).outputs[0])


@register_pass
class CanonicalizeSequences(Pass):
    """SplitToSequence read by constant SequenceAt / ConcatFromSequence / SequenceLength -> Split."""

    name = "canonicalize-sequences"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph, opset = model.graph, model.opset_imports.get("", DEFAULT_OPSET)
        count = 0
        for node in [n for n in graph if n.op_type == "SplitToSequence" and n.domain == ""]:
            sizes = split_sizes(node)
            reason = why_not(node, sizes)
            if reason is not None:
                note = f"canonicalize-sequences: SplitToSequence '{node.name}' kept: {reason}"
                if note not in ctx.notes:
                    ctx.notes.append(note)
                continue
            rewrite(graph, node, sizes, opset)
            count += 1
        # the sequence readers and producers are left for eliminate-dead
        return PassResult(model, bool(count), {"split-to-sequence": count} if count else {})
