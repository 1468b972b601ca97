"""pack-projections

    x @ W1 (+ b1), ..., x @ Wk (+ bk)   ->  Split(x @ [W1 | ... | Wk] (+ [b1 | ... | bk]), [n1, ..., nk], axis=-1)
    GroupQueryAttention(Split(qkv)[0], Split(qkv)[1], Split(qkv)[2], ...)  ->  GroupQueryAttention(qkv, -, -, ...)

Projections of one input by constant 2-D weights of one dtype (Q/K/V, gate/up) become one wider MatMul: the input
is read once and the kernel runs on a larger N. Biases (a following Add of a constant 1-D vector of N_i) pack with
them; a projection without one gets zeros when another has one. The packed weight is concatenated lazily, when the
model is saved. An attention op that reads the three slices in order (N*H, KV*H, KV*H) takes the packed tensor
itself, as GroupQueryAttention's packed-QKV form.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxc.domains import DEFAULT_OPSET, MS
from onnxc.ir import derived_tensor
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import attr_value, const_array, replace_value
from onnxc.shapes import dims_of



def _weight(n: ir.Node) -> ir.Value | None:
    w = n.inputs[1]
    if w is None or w.const_value is None or w.shape is None or len(w.shape) != 2:
        return None
    return w if all(isinstance(d, int) for d in w.shape) else None


def _bias(n: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add(y, b) that is y's only user, with b a constant 1-D of N."""
    uses = list(n.outputs[0].uses())
    if len(uses) != 1 or uses[0][0].op_type != "Add" or uses[0][0].domain != "":
        return None, None
    add = uses[0][0]
    b = add.inputs[1 - uses[0][1]]
    if b is None or b.const_value is None or b.shape is None or list(b.shape) != [n.inputs[1].shape[1]]:
        return None, None
    return add, b


def _lazy_concat(values: list[ir.Value], axis: int, name: str) -> ir.Value:
    tensors = [v.const_value for v in values]
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    dtype = tensors[0].dtype
    lazy = derived_tensor(lambda *arrays: np.concatenate(arrays, axis=axis), tensors, dtype, shape, name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=lazy)


def _pack(graph: ir.Graph, x: ir.Value, group: list[ir.Node], opset: int, tag: str) -> None:
    weights = [n.inputs[1] for n in group]
    sizes = [w.shape[1] for w in weights]
    biased = [_bias(n) for n in group]
    w_cat = _lazy_concat(weights, 1, f"{tag}/weight")
    graph.register_initializer(w_cat)
    first = group[0]
    mm = ir.node("MatMul", [x, w_cat], name=f"{tag}/MatMul")
    y = mm.outputs[0]
    y.name, y.dtype = f"{tag}/packed", group[0].outputs[0].dtype
    new = [mm]
    olds = [add.outputs[0] if add is not None else n.outputs[0] for n, (add, _) in zip(group, biased)]
    if any(add is not None for add, _ in biased):
        dt = weights[0].const_value.dtype.numpy()
        parts = [b.const_value.numpy().astype(dt) if b is not None else np.zeros(s, dt)
                 for (_, b), s in zip(biased, sizes)]
        bv = ir.Value(name=f"{tag}/bias", type=ir.TensorType(weights[0].dtype), shape=ir.Shape([sum(sizes)]),
                      const_value=ir.tensor(np.concatenate(parts)))
        graph.register_initializer(bv)
        add = ir.node("Add", [y, bv], name=f"{tag}/Add")
        y = add.outputs[0]
        y.name, y.dtype = f"{tag}/packed_bias", mm.outputs[0].dtype
        new.append(add)
    split_sizes = ir.Value(name=f"{tag}/split", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(sizes)]),
                           const_value=ir.tensor(np.array(sizes, dtype=np.int64)))
    graph.register_initializer(split_sizes)
    if opset >= 13:
        split = ir.node("Split", [y, split_sizes], attributes={"axis": -1}, num_outputs=len(sizes), name=f"{tag}/Split")
    else:
        split = ir.node("Split", [y], attributes={"axis": -1, "split": sizes}, num_outputs=len(sizes),
                        name=f"{tag}/Split")
    new.append(split)
    d = dims_of(x)
    for k, (old, out) in enumerate(zip(olds, split.outputs)):
        out.name = f"{tag}/part{k}"
        out.dtype = old.dtype
        out.shape = old.shape
    if d is not None:
        mm.outputs[0].shape = ir.Shape([*d[:-1], sum(sizes)])
        y.shape = mm.outputs[0].shape
    graph.insert_before(first, new)
    for old, out in zip(olds, split.outputs):
        replace_value(old, out)


def _unsplit_gqa(node: ir.Node) -> bool:
    q, k, v = (list(node.inputs) + [None] * 3)[:3]
    if q is None or k is None or v is None:
        return False
    split = q.producer()
    if split is None or split.op_type != "Split" or len(split.outputs) != 3 \
            or [o for o in split.outputs] != [q, k, v]:
        return False
    if any(len(list(o.uses())) != 1 for o in split.outputs) or attr_value(split, "axis", default=0) not in (-1, 2):
        return False
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 else attr_value(split, "split")
    n, kv = attr_value(node, "num_heads"), attr_value(node, "kv_num_heads")
    d = dims_of(q)
    if sizes is None or d is None or not isinstance(d[-1], int) or d[-1] % n:
        return False
    head = d[-1] // n
    if [int(s) for s in np.asarray(sizes).reshape(-1)] != [n * head, kv * head, kv * head]:
        return False
    node.replace_input_with(0, split.inputs[0])
    node.replace_input_with(1, None)
    node.replace_input_with(2, None)
    return True


@register_pass
class PackProjections(Pass):
    """MatMuls of one input by constant weights -> one MatMul + Split; packed QKV into GroupQueryAttention."""

    name = "pack-projections"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", DEFAULT_OPSET)
        counts: dict[str, int] = {}
        groups: dict[int, list[ir.Node]] = {}
        for n in graph:
            if n.op_type == "MatMul" and n.domain == "" and _weight(n) is not None and n.inputs[0] is not None:
                groups.setdefault(id(n.inputs[0]), []).append(n)
        for members in groups.values():
            by_kind: dict[tuple, list[ir.Node]] = {}
            for n in members:
                w = n.inputs[1]
                by_kind.setdefault((w.shape[0], w.dtype), []).append(n)
            for group in by_kind.values():
                if len(group) < 2 or "pack-matmuls" in ctx.disabled_rules:
                    continue
                _pack(graph, group[0].inputs[0], group, opset, f"pack-projections/{group[0].name or 'matmul'}")
                counts["pack-matmuls"] = counts.get("pack-matmuls", 0) + 1
        if "pack-gqa-qkv" not in ctx.disabled_rules:
            RemoveUnusedNodesPass()(model)   # the unpacked projections' old users must not count as users
            for n in graph:
                if n.op_type == "GroupQueryAttention" and n.domain == MS and _unsplit_gqa(n):
                    counts["pack-gqa-qkv"] = counts.get("pack-gqa-qkv", 0) + 1
        if counts:
            graph.sort()
        return PassResult(model, bool(counts), counts)
