"""Float twins of int8-quantized nodes (quantize-int8's DynamicQuantizeMatMul and QDQ), for verify.float_twins.

A twin replaces a quantized node by float ops whose constants the caller swaps (verify.float_twins' contract:
(value, dequantized tensor, source tensor) triples), so that one graph gives both twins:

    DynamicQuantizeMatMul(A, Wq, s, z, bias)  ->  MatMul(Where(flag, DequantizeLinear(DynamicQuantizeLinear(A)), A), W)
                                                  (+ bias)
        dequantized twin: flag = true, W = (Wq - z) s          (the activation rounded as the kernel rounds it)
        float twin:       flag = false, W = the source weight   (the float computation the node replaced)
    DequantizeLinear(Wq, s, z; axis = 1) of a weight  ->  the constant W (dequantized, or the source weight)
    DequantizeLinear(QuantizeLinear(A)) of an activation  ->  Where(flag, DequantizeLinear(...), A)
        (QuantizeLinear(Mul(A, 1 / c)), SmoothQuant's form: the float twin reads A, the weight twin c W's source W)

The float twin must agree with the input model. The whole-model dequantized twin does not serve for activations
quantized at run time: a 1-ulp difference in a layer's input flips a rounding code there, and the flips compound
over the layers (0.04 relative on a 6-layer encoder whose single layers agree to 5e-7). So a model with quantized
activations is checked node by node instead (local_twins): one copy of the compiled model exposes each int8 layer's
output, the other computes, beside each layer and from the very input the layer read, the float computation of its
dequantized values (DequantizeLinear(DynamicQuantizeLinear(A)) or the QDQ activation, times the dequantized weight
as a float constant, which onnxruntime cannot fuse into an integer kernel) and exposes it under the layer's output
name. Everything downstream runs on the quantized outputs in both copies, so only the layers themselves are
compared, each to float tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

OPS = ("DynamicQuantizeMatMul", "DequantizeLinear")
KINDS = ("dynamic", "weight", "activation")   # QuantSource.kind of the nodes handled here
META = "onnxc.quantize"                        # verify.QUANT_META (the node.meta key), not imported: verify imports us


@dataclass
class Int8Source:
    """What an int8-quantized node stands for (node.meta[QUANT_META]): `weight` (K, N) lazy float tensor (None for
    an activation), `bias` (N,) or None, `kind` one of KINDS or "smooth" (the Mul by 1 / c before an activation's
    QuantizeLinear)."""

    weight: ir.TensorProtocol | None
    bias: np.ndarray | None
    kind: str


def _lazy(fn, dtype: ir.DataType, shape) -> ir.TensorProtocol:
    return ir.LazyTensor(lambda: ir.tensor(fn()), dtype=dtype, shape=ir.Shape(list(shape)))


def _flag(graph: ir.Graph, name: str) -> tuple[ir.Value, ir.TensorProtocol, ir.TensorProtocol]:
    on, off = ir.tensor(np.array(True)), ir.tensor(np.array(False))
    v = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL), const_value=on)
    graph.register_initializer(v)
    return v, on, off


def _dequantized(q: ir.Value, s: ir.Value, z: ir.Value | None, axis: int, dtype: ir.DataType):
    from onnxc.kernels.quantize_linear import dequantize_linear

    qt, st, zt = q.const_value, s.const_value, None if z is None else z.const_value
    return lambda: dequantize_linear(qt.numpy(), st.numpy(), None if zt is None else zt.numpy(),
                                     axis=axis).astype(dtype.numpy())


def twin(graph: ir.Graph, node: ir.Node, src: Int8Source) -> list[tuple[ir.Value, ir.TensorProtocol,
                                                                         ir.TensorProtocol]]:
    """Rewrite one int8 node (module docstring) in place; returns its swaps. A node of another kind: []."""
    if src.kind not in KINDS or node.op_type not in OPS:
        return []
    out = node.outputs[0]
    name = node.name or out.name
    if src.kind == "weight":
        q, s = node.inputs[0], node.inputs[1]
        z = node.inputs[2] if len(node.inputs) > 2 else None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
        dt = s.dtype
        w = ir.Value(name=f"{name}_float_weight", shape=out.shape, type=ir.TensorType(dt))
        deq = _lazy(_dequantized(q, s, z, axis, dt), dt, q.shape)
        w.const_value = deq
        graph.register_initializer(w)
        out.replace_all_uses_with(w)
        graph.remove(node, safe=True)
        return [(w, deq, src.weight)]
    if src.kind == "activation":
        q = node.inputs[0].producer()
        a = q.inputs[0] if q is not None else None
        if a is None:
            return []
        p = a.producer()
        smooth = p.meta.get(META) if p is not None else None
        if isinstance(smooth, Int8Source) and smooth.kind == "smooth":     # A / c: the float twin reads A
            a = p.inputs[0]
        flag, on, off = _flag(graph, f"{name}_quantized")
        uses = list(out.uses())
        where = ir.Node("", "Where", [flag, out, a], name=f"{name}_twin")
        where.outputs[0].shape, where.outputs[0].type = out.shape, out.type
        for use in uses:
            use.node.replace_input_with(use.idx, where.outputs[0])
        graph.insert_after(node, where)
        return [(flag, on, off)]
    a, qb, s = node.inputs[0], node.inputs[1], node.inputs[2]
    z = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    dt = a.dtype or ir.DataType.FLOAT
    k, n = (int(d) for d in qb.shape)
    flag, on, off = _flag(graph, f"{name}_quantized")
    dql = ir.Node("", "DynamicQuantizeLinear", [a], num_outputs=3, name=f"{name}_twin_quantize")
    dq = ir.Node("", "DequantizeLinear", list(dql.outputs), name=f"{name}_twin_dequantize")
    pick = ir.Node("", "Where", [flag, dq.outputs[0], a], name=f"{name}_twin_input")
    w = ir.Value(name=f"{name}_float_weight", shape=ir.Shape([k, n]), type=ir.TensorType(dt))
    deq = _lazy(_dequantized(qb, s, z, 1, dt), dt, (k, n))
    w.const_value = deq
    graph.register_initializer(w)
    new = [dql, dq, pick, ir.Node("", "MatMul", [pick.outputs[0], w], name=f"{name}_twin_matmul")]
    if bias is not None:
        new.append(ir.Node("", "Add", [new[-1].outputs[0], bias], name=f"{name}_twin_bias"))
    new[-1].outputs[0].shape, new[-1].outputs[0].type = out.shape, out.type
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, [out], [new[-1].outputs[0]])
    return [(flag, on, off), (w, deq, src.weight)]


def local_twins(model: ir.Model, compiled: Path, folder: Path, save) -> tuple[Path, Path] | None:
    """(exact, dequantized) model files for the node-by-node check of int8 layers with quantized activations
    (module docstring), or None when the model has none. `save(model, path)` writes the in-memory model, which is
    left as it was."""
    from onnxc.verify import QUANT_META

    graph = model.graph
    made: list[ir.Node] = []
    inits: list[ir.Value] = []
    renamed: list[tuple[ir.Value, str]] = []
    replaced: list[tuple[int, ir.Value]] = []
    outputs = len(graph.outputs)
    for node in list(graph):
        src = node.meta.get(QUANT_META)
        if not isinstance(src, Int8Source) or src.kind not in ("dynamic", "weight"):
            continue
        if src.kind == "dynamic":
            a, qb, s = node.inputs[0], node.inputs[1], node.inputs[2]
            z = node.inputs[3] if len(node.inputs) > 3 else None
            dql = ir.Node("", "DynamicQuantizeLinear", [a], num_outputs=3, name=f"{node.name}_twin_quantize")
            dq = ir.Node("", "DequantizeLinear", list(dql.outputs), name=f"{node.name}_twin_dequantize")
            x, branch, y, last = dq.outputs[0], [dql, dq], node.outputs[0], node
            bias = node.inputs[4] if len(node.inputs) > 4 else None
        else:
            use = next(iter(node.outputs[0].uses()), None)
            if use is None or use.node.op_type != "MatMul":
                continue
            matmul = use.node
            qb, s = node.inputs[0], node.inputs[1]
            z = node.inputs[2] if len(node.inputs) > 2 else None
            x, branch, y, last, bias = matmul.inputs[0], [], matmul.outputs[0], matmul, None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
        dt = s.dtype
        w = ir.Value(name=f"{y.name}_twin_weight", shape=qb.shape, type=ir.TensorType(dt),
                     const_value=_lazy(_dequantized(qb, s, z, axis, dt), dt, qb.shape))
        graph.register_initializer(w)
        inits.append(w)
        branch.append(ir.Node("", "MatMul", [x, w], name=f"{y.name}_twin_matmul"))
        if bias is not None:
            branch.append(ir.Node("", "Add", [branch[-1].outputs[0], bias], name=f"{y.name}_twin_bias"))
        twin_out = branch[-1].outputs[0]
        twin_out.shape, twin_out.type = y.shape, y.type
        for b in branch:
            graph.insert_after(last, b)
            last = b
        made += branch
        name = y.name
        renamed.append((y, name))
        y.name = f"{name}_int8"
        twin_out.name = name
        if y.is_graph_output():     # the twin takes its place among the outputs; consumers keep the quantized y
            at = next(i for i, v in enumerate(graph.outputs) if v is y)
            replaced.append((at, y))
            graph.outputs[at] = twin_out
        else:
            graph.outputs.append(twin_out)
    if not renamed:
        return None
    deq = folder / "dequantized_local.onnx"
    try:
        save(model, deq)
    finally:
        del graph.outputs[outputs:]
        for at, y in replaced:
            graph.outputs[at] = y
        for n in reversed(made):
            graph.remove(n, safe=True)
        for v in inits:
            graph.initializers.pop(v.name)
        for v, name in renamed:
            v.name = name
    outs = set(_output_names(compiled))
    return _exposing(compiled, [name for _, name in renamed if name not in outs]), deq


def _output_names(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _exposing(compiled: Path, names: list[str]) -> Path:
    """A copy of a saved model (beside it, sharing its external data) with `names` added to its outputs."""
    import onnx

    proto = onnx.load(str(compiled), load_external_data=False)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    out = compiled.with_name(".int8-layers." + compiled.name)
    onnx.save(proto, str(out))
    return out
