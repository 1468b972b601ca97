"""Evaluate a small part of a graph on concrete inputs.

Fusions that replace computed tensors by what an ORT kernel derives itself (an attention mask by sequence lengths,
run-time cos/sin by caches) prove the replacement by evaluation: the cone of producers of the values in question is
cut out as a model of its own and run by onnxruntime on chosen inputs. A cone that reads large weights is refused,
so a probe never pulls a model's weights into memory.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

PROBE_MAX_CONST_BYTES = 1 << 22   # a cone may read at most 4 MiB of initializers


class ProbeError(Exception):
    """The cone cannot be evaluated (it reads big weights, a subgraph, or onnxruntime refused it)."""


def cone(values: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    """(nodes in graph order, graph inputs read, initializers read) of the producers of `values`."""
    seen: set[int] = set()
    inputs: dict[int, ir.Value] = {}
    inits: dict[int, ir.Value] = {}
    stack = list(values)
    nodes: dict[int, ir.Node] = {}
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        n = v.producer()
        if n is None:
            (inits if v.const_value is not None else inputs)[id(v)] = v
            continue
        if id(n) not in nodes:
            nodes[id(n)] = n
            stack.extend(n.inputs)
    graph = values[0].graph or next(iter(nodes.values())).graph
    order = {id(n): i for i, n in enumerate(graph)} if graph is not None else {}
    ordered = sorted(nodes.values(), key=lambda n: order.get(id(n), 0))
    return ordered, list(inputs.values()), list(inits.values())


def cone_inputs(values: list[ir.Value]) -> list[ir.Value]:
    return cone(values)[1]


def evaluate(model: ir.Model, values: list[ir.Value], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays `values` take when the graph inputs are `feeds` (only the cone's inputs are read)."""
    nodes, inputs, inits = cone(values)
    if any(n.op_type in ("If", "Loop", "Scan") for n in nodes):
        raise ProbeError("the cone holds a control-flow node")
    size = sum(v.const_value.nbytes for v in inits)
    if size > PROBE_MAX_CONST_BYTES:
        raise ProbeError(f"the cone reads {size} bytes of initializers")
    missing = [v.name for v in inputs if v.name not in feeds]
    if missing:
        raise ProbeError(f"no probe value for input {missing[0]}")
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "probe",
        [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in inputs],
        [onnx.helper.make_tensor_value_info(v.name, int(v.dtype) if v.dtype else 0, None) for v in values],
        [ir.serde.serialize_tensor(v.const_value) for v in inits])
    for v, t in zip(inits, graph.initializer):
        t.name = v.name
    opsets = [onnx.helper.make_opsetid(d, ver) for d, ver in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run([v.name for v in values], {v.name: feeds[v.name] for v in inputs})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ProbeError(str(exc).splitlines()[0]) from exc
