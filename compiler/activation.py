"""Activation memory of a verification run, estimated before the run.

ONNX shape inference (with data propagation) runs on a weight-free copy of the model whose graph inputs carry the
scenario's concrete shapes, so every dim that follows from them or from small constants is a number, including the
outputs of ConstantOfShape, Expand, Tile and Range whose size is computable. Walking the nodes in order, a tensor is
live from its producer to its last reader; the estimate is the largest sum of live tensors (onnxruntime, with its
memory patterns off as verification runs it, frees a tensor after its last use). Values whose size inference leaves
open (custom ops, contrib ops, data-dependent shapes) are counted as unknown, not as zero.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

# Initializers larger than this become graph inputs in the copy: their shape is kept, their bytes are not read
# (small ones stay: data propagation reads shape constants).
INLINE_MAX_BYTES = 4096


@dataclass
class Estimate:
    peak_bytes: int             # the largest sum of live activations (known sizes)
    largest: tuple[str, int]    # the largest single activation: (value name, bytes)
    unknown: int                # activations whose size inference left open


def weight_free(model_file: str | os.PathLike) -> onnx.ModelProto:
    """The model's graph with its large initializers turned into typed graph inputs (no weight is read)."""
    proto = onnx.load(str(model_file), load_external_data=False)
    graph = proto.graph
    keep = []
    for t in graph.initializer:
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if external or len(t.raw_data) > INLINE_MAX_BYTES or _field_bytes(t) > INLINE_MAX_BYTES:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def _field_bytes(t: onnx.TensorProto) -> int:
    return 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
                + len(t.uint64_data)) + sum(len(s) for s in t.string_data)


def estimate(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> Estimate:
    """Peak activation bytes of `proto` (from weight_free) fed inputs of these shapes."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    for inp in graph.input:
        if inp.name in shapes and inp.type.HasField("tensor_type"):
            dims = inp.type.tensor_type.shape
            dims.Clear()
            for d in shapes[inp.name]:
                dims.dim.add().dim_value = int(d)
    del graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:       # inference refused the model: every activation is unknown
        pass
    sizes: dict[str, int | None] = {}
    for vi in [*model.graph.value_info, *model.graph.output]:
        sizes[vi.name] = _bytes(vi)
    weights = {i.name for i in graph.input if i.name not in shapes} | {t.name for t in graph.initializer}
    last_use: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = k
    outputs = {o.name for o in graph.output}
    live: dict[str, int] = {}
    peak, largest, unknown = 0, ("", 0), 0
    for k, node in enumerate(graph.node):
        for name in node.output:
            if not name or name in weights:
                continue
            size = sizes.get(name)
            if size is None:
                unknown += 1
                continue
            live[name] = size
            if size > largest[1]:
                largest = (name, size)
        peak = max(peak, sum(live.values()))
        for name in node.input:
            if last_use.get(name) == k and name in live and name not in outputs:
                del live[name]
    return Estimate(peak, largest, unknown)


def _bytes(vi: onnx.ValueInfoProto) -> int | None:
    t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if t is None or not t.HasField("shape") or t.elem_type == 0:
        return None
    n = 1
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        n *= max(int(d.dim_value), 0)
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    except Exception:
        item = 8
    return n * item


def peak_of(model_files: list[Path], shapes: dict[str, tuple[int, ...]],
            cache: dict[Path, onnx.ModelProto] | None = None) -> Estimate:
    """The largest estimate over several models (the input and the compiled model) for one set of input shapes."""
    cache = {} if cache is None else cache
    best = Estimate(0, ("", 0), 0)
    for f in model_files:
        if f not in cache:
            cache[f] = weight_free(f)
        e = estimate(cache[f], shapes)
        if e.peak_bytes > best.peak_bytes:
            best = Estimate(e.peak_bytes, e.largest, best.unknown + e.unknown)
        else:
            best.unknown += e.unknown
    return best
