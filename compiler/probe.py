"""Evaluate a small part of a graph on concrete inputs: the one subgraph evaluator of onnxc.

Fusions that replace computed tensors by what an ORT kernel derives itself (an attention mask by sequence lengths
or a mask index, run-time cos/sin by caches) prove the replacement by evaluation: the cone of producers of the
values in question is cut out as a model of its own and run by onnxruntime (CPU, its graph optimizations off) on
chosen inputs.

    c = cone(graph, values)            # nodes, graph inputs read (data or shape only), constants, or ProbeError
    arrays = evaluate(graph, values, feeds)
    k = invariant(graph, value, [feeds1, feeds2])   # a value computed from shapes alone, the same on each

What is read for its data and what only for its shape is told apart: Shape and Size read their input's shape, and
a value read only for its shape reads its producer's inputs only for their shape too when the producer's output
shape follows from its input shapes (elementwise ops, MatMul, Gather, Concat, ...; the data operand of Reshape,
Expand, Slice, Split, (Un)Squeeze, Tile, Pad and Reduce*, whose other operands are read for their data). Any
other producer reads its inputs' data. A constant of more than STANDIN_MIN_ELEMENTS read only for its shape (an embedding table
before a Shape) is replaced by ConstantOfShape zeros, so the probe copies no weights for it.

Refused with ProbeError: a cone holding a node with a subgraph or one from another graph (outer-scope values),
more than `max_nodes` nodes, more than MAX_DATA_BYTES of constants read for their data, a graph input without a
value in `feeds`, or anything onnxruntime rejects.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

MAX_DATA_BYTES = 1 << 22        # a cone may read at most 4 MiB of constants for their data
MAX_NODES = 400                 # nodes in a cone
STANDIN_MIN_ELEMENTS = 1024     # shape-only constants larger than this become ConstantOfShape zeros

# Output shape is a function of the input shapes (and attributes): every input is read only for its shape.
_SHAPE_OF_ALL = frozenset({
    "Abs", "Add", "And", "Cast", "CastLike", "Ceil", "Clip", "Concat", "Cos", "Div", "Dropout", "Equal", "Erf",
    "Exp", "Flatten", "Floor", "Gather", "GatherElements", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "Identity",
    "IsInf", "IsNaN", "LayerNormalization", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "Min", "Mod",
    "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "SimplifiedLayerNormalization",
    "Sin", "Softmax", "Sqrt", "Sub", "Tanh", "Transpose", "Trilu", "Where", "Xor"})
# Output shape is a function of input 0's shape and the other inputs' data (target shape, axes, starts, repeats).
_SHAPE_OF_FIRST = frozenset({
    "Expand", "Pad", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Reshape",
    "Slice", "Split", "Squeeze", "Tile", "Unsqueeze"})


class ProbeError(Exception):
    """The cone cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class Cone:
    """The producers of some values, up to graph inputs and constants."""

    nodes: list[ir.Node]            # in graph order
    inputs: list[ir.Value]          # graph inputs read (for their data or only their shape), in discovery order
    data_inputs: list[ir.Value]     # the graph inputs among them whose data is read
    constants: list[ir.Value]       # constants (initializers) read
    shape_only: frozenset[int]      # ids of the values read only for their shape

    @property
    def data_bytes(self) -> int:
        """Bytes of the constants the probe copies: those read for their data and small shape-only ones."""
        return sum(v.const_value.nbytes for v in self.constants if not _stands_in(v, self.shape_only))


def _shape_only_inputs(node: ir.Node, reads_data: bool) -> int:
    """How many leading inputs of `node` are read only for their shape, its outputs being read for their data
    (`reads_data`) or only for their shape."""
    if node.domain not in ("", "ai.onnx"):
        return 0
    if node.op_type in ("Shape", "Size"):
        return 1
    if reads_data:
        return 0
    if node.op_type in _SHAPE_OF_ALL:
        return len(node.inputs)
    return 1 if node.op_type in _SHAPE_OF_FIRST else 0


def cone(graph: ir.Graph, values: Sequence[ir.Value], max_nodes: int = MAX_NODES,
         stop: Sequence[ir.Value] = (), shapes: bool = False) -> Cone:
    """The cone of producers of `values` in `graph`, or ProbeError (subgraphs, outer-scope values, size). Values in
    `stop` end the walk as graph inputs do: they are fed, not computed (a fact about part of a graph, x -> f(x)).
    With `shapes`, the values themselves are read only for their shapes."""
    stops = {id(v) for v in stop}
    data: dict[int, bool] = {}       # value id -> read for its data (True) or only its shape (False)
    nodes: dict[int, ir.Node] = {}
    leaves: dict[int, ir.Value] = {}
    stack = [(v, not shapes) for v in reversed(values)]
    while stack:
        v, reads_data = stack.pop()
        if id(v) in data and (data[id(v)] or not reads_data):
            continue
        data[id(v)] = reads_data
        node = None if id(v) in stops else v.producer()
        if node is None:
            if v.const_value is None and not v.is_graph_input() and id(v) not in stops:
                raise ProbeError(f"value '{v.name}' comes from an outer scope")
            leaves[id(v)] = v
            continue
        if node.graph is not graph or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                          for a in node.attributes.values()):
            raise ProbeError(f"the cone holds a subgraph or outer-scope values ({node.op_type} '{node.name}')")
        nodes[id(node)] = node
        if len(nodes) > max_nodes:
            raise ProbeError(f"the cone has more than {max_nodes} nodes")
        shape_only = _shape_only_inputs(node, reads_data)
        stack.extend((i, k >= shape_only) for k, i in reversed(list(enumerate(node.inputs))) if i is not None)
    order = {id(n): i for i, n in enumerate(graph)}
    inputs = [v for v in leaves.values() if v.const_value is None]
    return Cone(nodes=sorted(nodes.values(), key=lambda n: order[id(n)]), inputs=inputs,
                data_inputs=[v for v in inputs if data[id(v)]],
                constants=[v for v in leaves.values() if v.const_value is not None],
                shape_only=frozenset(k for k, d in data.items() if not d))


def _stands_in(v: ir.Value, shape_only: frozenset[int]) -> bool:
    t = v.const_value
    return id(v) in shape_only and t.size > STANDIN_MIN_ELEMENTS and t.dtype.numpy() is not None


def _constant(v: ir.Value, shape_only: frozenset[int]) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The initializers and nodes that define constant `v` in the probe model."""
    t = v.const_value
    if _stands_in(v, shape_only):
        dims = onnx.numpy_helper.from_array(np.array(list(t.shape), np.int64), f"{v.name}/shape")
        zero = onnx.numpy_helper.from_array(np.zeros(1, t.dtype.numpy()))
        return [dims], [onnx.helper.make_node("ConstantOfShape", [dims.name], [v.name], value=zero)]
    proto = ir.serde.serialize_tensor(t)
    proto.name = v.name
    return [proto], []


def evaluate(graph: ir.Graph, values: Sequence[ir.Value], feeds: Mapping[str, np.ndarray],
             max_nodes: int = MAX_NODES, stop: Sequence[ir.Value] = (), shapes: bool = False) -> list[np.ndarray]:
    """The arrays `values` take when the graph inputs the cone reads (and the `stop` values) take `feeds` (other
    feeds are ignored). With `shapes`, their shapes instead (int64 vectors): what only those shapes depend on is
    read, so weights before them stand in as zeros and are never copied."""
    c = cone(graph, values, max_nodes, stop, shapes)
    if c.data_bytes > MAX_DATA_BYTES:
        raise ProbeError(f"the cone reads {c.data_bytes} bytes of constants for their data")
    missing = [v.name for v in c.inputs if v.name not in feeds]
    if missing:
        raise ProbeError(f"no probe value for input '{missing[0]}'")
    inits, nodes = [], []
    for v in c.constants:
        i, n = _constant(v, c.shape_only)
        inits += i
        nodes += n
    nodes += [ir.serde.serialize_node(n) for n in c.nodes]
    names = [f"{v.name}/probe{k}" for k, v in enumerate(values)]    # an output may be an input or a constant
    nodes += [onnx.helper.make_node("Shape" if shapes else "Identity", [v.name], [n]) for v, n in zip(values, names)]
    domains = {""} | {n.domain for n in c.nodes}
    opsets = [onnx.helper.make_opsetid(d, graph.opset_imports.get(d, 1)) for d in sorted(domains)]
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "probe",
                               [onnx.helper.make_tensor_value_info(v.name, int(v.dtype or 0), None) for v in c.inputs],
                               [onnx.helper.make_empty_tensor_value_info(n) for n in names], inits),
        opset_imports=opsets, ir_version=onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(names, {v.name: feeds[v.name] for v in c.inputs})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ProbeError(f"onnxruntime: {str(exc).splitlines()[0]}") from exc


def invariant(graph: ir.Graph, value: ir.Value, feeds: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray | None:
    """The array `value` takes on every one of `feeds`, when it reads no graph input's data (a value computed from
    shapes alone: a head size, TorchScript's scale sqrt(H) of a view's last dim) and is the same on each; else
    None. Two feeds of different sizes make a value that depends on a size (1/sqrt(S)) differ: refused."""
    try:
        if cone(graph, [value]).data_inputs:
            return None
        got = [evaluate(graph, [value], f)[0] for f in feeds]
    except ProbeError:
        return None
    first = got[0]
    return first if all(g.shape == first.shape and np.array_equal(g, first) for g in got[1:]) else None
