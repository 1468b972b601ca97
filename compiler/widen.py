"""The float32 twin of a model that computes in float16: every float16 weight, constant, Cast target and value type
becomes float32, so the twin computes what the model means at float32 precision.

Verification uses it as a second opinion on float16 outputs (compiler/verify.py, `second_opinion`). A float16
model evaluated two valid ways (the exporter's ops one by one, or fused kernels that round at other points) can
differ by more than float16's tolerance on an ill-conditioned input: a real 30-layer decoder's logits on one decode
row moved by 0.39 (2% of their range) between float16 and float32 evaluations of the *same* graph. The twin says how
far the input itself is from the float32 result on each scenario, and the compiled model is then judged by its own
distance from that result.

Weights are converted when the twin is saved, one tensor at a time (ir.LazyTensor): the twin costs twice the
float16 weights on disk and one tensor's conversion in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from .ir import INLINE_TENSOR_MAX_BYTES

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def _wide(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """A float32 copy of a float16 tensor, computed when read."""
    return ir.LazyTensor(lambda: ir.tensor(tensor.numpy().astype(np.float32)), dtype=F32, shape=tensor.shape,
                         name=tensor.name)


def _widen_value(v: ir.Value) -> None:
    if v.dtype == F16:
        v.dtype = F32
    if v.const_value is not None and v.const_value.dtype == F16:
        v.const_value = _wide(v.const_value)


def has_float16(model: ir.Model) -> bool:
    """Whether any value, weight or Cast target of the model is float16 (a model the twin would change)."""
    for graph in model.graphs():
        if any(v.dtype == F16 for v in (*graph.inputs, *graph.outputs, *graph.initializers.values())):
            return True
        for node in graph:
            if any(o.dtype == F16 for o in node.outputs):
                return True
            to = node.attributes.get("to")
            if node.op_type == "Cast" and to is not None and to.value == F16:
                return True
    return False


def widen(model: ir.Model) -> ir.Model:
    """Rewrite `model` in place into its float32 twin and return it."""
    for graph in model.graphs():
        for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            _widen_value(v)
        for node in graph:
            for v in node.outputs:
                _widen_value(v)
            for name, attr in list(node.attributes.items()):
                if name == "to" and attr.type == ir.AttributeType.INT and attr.value == F16:
                    node.attributes[name] = ir.AttrInt64(name, int(F32))
                elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == F16:
                    node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float32)))
    return model


def save_twin(source: Path, destination: Path) -> Path:
    """Load the model at `source` (weights memory-mapped), save its float32 twin as `destination` (weights in a
    data file beside it) and return `destination`."""
    model = widen(ir.load(source))
    ir.save(model, destination, external_data=destination.name + ".data",
            size_threshold_bytes=INLINE_TENSOR_MAX_BYTES)
    return destination
