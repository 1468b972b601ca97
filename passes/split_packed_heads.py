"""split-packed-heads

    Split(Transpose(Reshape(x @ W (+ b), (B, S, N, 3H)), [0,2,1,3]), [H, H, H], axis=-1)[j]
        ->  Transpose(Reshape(x @ W_j (+ b_j), (B, S, N, H)), [0,2,1,3])
    Split(Reshape(x @ W (+ b), (B, S, N, 3H)), [H, H, H], axis=-1)[j]
        ->  Reshape(x @ W_j (+ b_j), (B, S, N, H))

    W_j = W[:, cols_j],  b_j = b[cols_j],  cols_j = {n*3H + j*H + c : n < N, c < H}

GPT-NeoX packs Q, K and V per head: the projection's columns are N groups of [q_n | k_n | v_n]. Viewing it as
(B, S, N, 3H) and taking the j-th H-slice of the last axis reads exactly the columns cols_j, so each part is its own
projection by a constant column gather of the weight (gathered lazily, when the model is saved). The result is the
Llama form fuse-gqa reads; pack-projections then repacks [q | k | v] contiguously.

Requires: W a constant 2-D weight, b (if any) a constant 1-D bias, both used only here; the Reshape target ends in
(N or -1, 3H) with N*3H the weight's width, and is a constant or a Concat whose last piece is constant (the new
target keeps the leading pieces); the view (and the optional Transpose [0,2,1,3]) is used only by Splits or
Slices (step 1) of the last axis whose every part is one H-wide slice at a multiple of H.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxc.domains import DEFAULT_OPSET
from onnxc.ir import derived_tensor
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import attr_value, const_array
from onnxc.shapes import reshape_input_dims, reshape_target, sym_value


@dataclass
class Site:
    reshape: ir.Node
    matmul: ir.Node
    add: ir.Node | None
    bias: ir.Value | None
    transpose: ir.Node | None
    parts: list[tuple[ir.Value, int]]     # (a part's value, which third j of every head it reads)
    consumers: list[ir.Node]
    heads: int
    head: int


def _users(v: ir.Value) -> list[ir.Node]:
    return list(dict.fromkeys(n for n, _ in v.uses()))


def _last_axis(axis: int | None, rank: int) -> bool:
    return axis is not None and axis in (-1, rank - 1)


def _scalar(v: ir.Value | None) -> int | None:
    a = const_array(v, 1)
    return None if a is None or a.size != 1 else int(a.reshape(-1)[0])


def _parts(node: ir.Node, width: int, head: int, opset: int) -> list[tuple[ir.Value, int]] | str:
    """The (value, j) each output of a last-axis Split/Slice of a (.., 3H) tensor reads, or why it is not one."""
    if node.op_type == "Split":
        if not _last_axis(attr_value(node, "axis", opset, 0), 4):
            return "the Split is not on the last axis"
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = const_array(node.inputs[1], 16)
            sizes = None if sizes is None else [int(s) for s in sizes.reshape(-1)]
        elif attr_value(node, "split") is not None:
            sizes = [int(s) for s in attr_value(node, "split")]
        else:
            k = len(node.outputs)
            sizes = [width // k] * k if width % k == 0 else None
        if sizes is None or sizes != [head] * len(node.outputs) or sum(sizes) != width:
            return f"the split parts {sizes} are not equal to H = {head}"
        return [(o, j) for j, o in enumerate(node.outputs)]
    if node.op_type == "Slice":
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        start, end = _scalar(ins[1]), _scalar(ins[2])
        axis = _scalar(ins[3]) if ins[3] is not None else 0
        step = _scalar(ins[4]) if ins[4] is not None else 1
        if start is None or end is None or axis is None or not _last_axis(axis, 4) or step != 1:
            return "the Slice is not a constant step-1 slice of the last axis"
        start, end = (min(max(i + width if i < 0 else i, 0), width) for i in (start, end))
        if start % head or end - start != head:
            return f"a slice [{start}:{end}] of the last axis is not one part of H = {head}"
        return [(node.outputs[0], start // head)]
    return f"the packed view is used by {node.op_type}, not by a last-axis Split or Slice"


def _target_tail(target: ir.Value) -> tuple[int, int] | None:
    """The target's last two elements, if it has 4 and they are known ints."""
    sym = sym_value(target)
    if sym is None:
        node = target.producer()
        if node is None or node.op_type != "Concat" or node.domain != "":
            return None
        sym = []
        for v in node.inputs:
            a = const_array(v, 16)
            if a is not None:
                sym += [int(x) for x in a.reshape(-1)]
            elif v is not None and v.shape is not None and len(v.shape) == 1 and isinstance(v.shape[0], int):
                sym += [None] * v.shape[0]
            else:
                return None
    if len(sym) != 4 or not all(isinstance(x, int) for x in sym[2:]):
        return None
    return sym[2], sym[3]


def _rebuildable(target: ir.Value) -> bool:
    if const_array(target, 16) is not None:
        return True
    node = target.producer()
    return node is not None and node.op_type == "Concat" and node.domain == "" \
        and const_array(node.inputs[-1], 16) is not None


def analyze(reshape: ir.Node, opset: int = 18) -> Site | str | None:
    """The site rooted at this Reshape, a reason it does not rewrite, or None when it is no packed-head site."""
    view = reshape.outputs[0]
    users = _users(view)
    transpose = None
    if len(users) == 1 and users[0].op_type == "Transpose" and users[0].domain == "":
        transpose = users[0]
        if attr_value(transpose, "perm") != [0, 2, 1, 3]:
            return None
        users = _users(transpose.outputs[0])
    if not any(u.op_type in ("Split", "Slice") and u.domain == "" for u in users):
        return None
    y = reshape.inputs[0]
    add, bias, mm = None, None, y.producer() if y is not None else None
    if mm is not None and mm.op_type == "Add" and mm.domain == "":
        add = mm
        for i in (0, 1):
            p = add.inputs[i].producer() if add.inputs[i] is not None else None
            if p is not None and p.op_type == "MatMul" and p.domain == "":
                mm, bias = p, add.inputs[1 - i]
                break
        else:
            return "the Reshape input is not MatMul(x, W) (+ b)"
    if mm is None or mm.op_type != "MatMul" or mm.domain != "":
        return "the Reshape input is not MatMul(x, W) (+ b)"
    w = mm.inputs[1]
    if w is None or w.const_value is None or w.is_graph_input() or w.shape is None or len(w.shape) != 2 \
            or not all(isinstance(d, int) for d in w.shape):
        return "the weight is not a constant 2-D tensor"
    width = w.shape[1]
    if bias is not None and (bias.const_value is None or bias.is_graph_input() or bias.shape is None
                             or list(bias.shape) != [width]):
        return "the bias is not a constant 1-D tensor of the weight's width"
    if len(_users(mm.outputs[0])) != 1 or (add is not None and len(_users(add.outputs[0])) != 1):
        return "the packed projection has other users"
    if any(v.is_graph_output() for v in [y, view] + ([transpose.outputs[0]] if transpose else [])):
        return "the packed projection is a graph output"
    tail = _target_tail(reshape.inputs[1])
    if not _rebuildable(reshape.inputs[1]):
        return "the Reshape target is neither a constant nor a Concat ending in a constant"
    if tail is None or tail[1] <= 0 or tail[1] % 3 or width % tail[1] or tail[0] not in (width // tail[1], -1):
        return f"the Reshape target is not (.., N, 3H) with N*3H = {width}"
    heads, head = width // tail[1], tail[1] // 3
    parts: list[tuple[ir.Value, int]] = []
    for u in users:
        got = _parts(u, tail[1], head, opset)
        if isinstance(got, str):
            return got
        parts += got
    return Site(reshape, mm, add, bias, transpose, parts, users, heads, head)


def _lazy_columns(w: ir.Value, cols: np.ndarray, name: str) -> ir.Value:
    t = w.const_value
    shape = ir.Shape([w.shape[0], len(cols)])
    lazy = derived_tensor(lambda a: np.ascontiguousarray(a[:, cols]), [t], w.dtype, shape, name)
    return ir.Value(name=name, type=ir.TensorType(w.dtype), shape=shape, const_value=lazy)


def _with_last(shape: ir.Shape | None, d: int) -> ir.Shape | None:
    return None if shape is None else ir.Shape([*list(shape)[:-1], d])


def _new_target(graph: ir.Graph, target: ir.Value, heads: int | None, head: int, tag: str, new: list[ir.Node]
                ) -> ir.Value:
    """The target with its last element replaced by H (and a -1 before it by N when `heads` proves it is N): a new
    constant, or the Concat with a new last piece."""
    arr = const_array(target, 16)
    concat = target.producer()
    if arr is None and concat is not None and concat.op_type == "Concat":
        arr = const_array(concat.inputs[-1], 16)
    arr = np.array(arr, dtype=np.int64).reshape(-1)
    arr[-1] = head
    if heads is not None and arr.size > 1 and arr[-2] == -1:
        arr[-2] = heads
    c = ir.Value(name=f"{tag}/shape", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([arr.size]),
                 const_value=ir.tensor(arr))
    graph.register_initializer(c)
    if const_array(target, 16) is not None:
        return c
    node = ir.node("Concat", [*concat.inputs[:-1], c], attributes={"axis": 0}, name=f"{tag}/Concat")
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = f"{tag}/target", ir.DataType.INT64, target.shape
    new.append(node)
    return node.outputs[0]


def _rewrite(graph: ir.Graph, s: Site) -> None:
    x, w, view = s.matmul.inputs[0], s.matmul.inputs[1], s.reshape.outputs[0]
    n, h = s.heads, s.head
    base = s.reshape.name or view.name or "packed"
    built: dict[int, ir.Value] = {}
    new_target: ir.Value | None = None
    new: list[ir.Node] = []
    y, target = s.reshape.inputs
    y_shape = y.shape
    sym = sym_value(target)
    dims = None if sym is None else reshape_target(reshape_input_dims(y, target), sym,
                                                   bool(attr_value(s.reshape, "allowzero", default=0)))
    proven = dims is not None and dims[-2] == n      # a -1 in the target resolves to N
    view_shape = _with_last(view.shape, h)
    if proven and view_shape is not None:
        view_shape = ir.Shape([*list(view_shape)[:-2], n, h])
    for value, j in s.parts:
        if j not in built:
            tag = f"split-packed-heads/{base}/{'qkv'[j]}"
            cols = (np.arange(n)[:, None] * 3 * h + j * h + np.arange(h)).reshape(-1)
            wj = _lazy_columns(w, cols, f"{tag}/weight")
            graph.register_initializer(wj)
            mm = ir.node("MatMul", [x, wj], name=f"{tag}/MatMul")
            out = mm.outputs[0]
            out.name, out.dtype, out.shape = f"{tag}/proj", view.dtype, _with_last(y_shape, n * h)
            new.append(mm)
            if s.bias is not None:
                bj = ir.Value(name=f"{tag}/bias", type=ir.TensorType(s.bias.dtype), shape=ir.Shape([n * h]),
                              const_value=ir.tensor(np.ascontiguousarray(s.bias.const_value.numpy()[cols])))
                graph.register_initializer(bj)
                add = ir.node("Add", [out, bj], name=f"{tag}/Add")
                add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = f"{tag}/proj_bias", out.dtype, out.shape
                new.append(add)
                out = add.outputs[0]
            if new_target is None:   # one target for all parts
                new_target = _new_target(graph, target, n if proven else None, h, f"split-packed-heads/{base}", new)
            rs = ir.node("Reshape", [out, new_target], attributes=dict(s.reshape.attributes), name=f"{tag}/Reshape")
            rs.outputs[0].name, rs.outputs[0].dtype, rs.outputs[0].shape = f"{tag}/view", view.dtype, view_shape
            new.append(rs)
            out = rs.outputs[0]
            if s.transpose is not None:
                tr = ir.node("Transpose", [out], attributes={"perm": [0, 2, 1, 3]}, name=f"{tag}/Transpose")
                tr.outputs[0].name, tr.outputs[0].dtype = f"{tag}/heads", view.dtype
                tr.outputs[0].shape = None if view_shape is None else ir.Shape([view_shape[i] for i in (0, 2, 1, 3)])
                new.append(tr)
                out = tr.outputs[0]
            built[j] = out
    graph.insert_before(s.reshape, new)
    for value, j in s.parts:
        name, was_output = value.name, value.is_graph_output()
        value.replace_all_uses_with(built[j], replace_graph_outputs=True)
        if was_output:
            value.name, built[j].name = None, name
    old = [*s.consumers, *([s.transpose] if s.transpose else []), s.reshape, *([s.add] if s.add else []), s.matmul]
    graph.remove(old, safe=True)
    for v in (w, s.bias, target):   # the packed constants, now read only by the lazy gathers
        if v is not None and not v.uses() and not v.is_graph_output() and graph.initializers.get(v.name) is v:
            graph.initializers.pop(v.name)


@register_pass
class SplitPackedHeads(Pass):
    """Projections packed per head as (.., N, 3H) and split in thirds -> one projection per part."""

    name = "split-packed-heads"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", DEFAULT_OPSET)
        count = 0
        for node in list(graph):
            if node.op_type != "Reshape" or node.domain != "" or node.graph is not graph:
                continue
            site = analyze(node, opset)
            if isinstance(site, str):
                ctx.details.append(f"split-packed-heads: {node.name}: {site}")
            elif site is not None:
                _rewrite(graph, site)
                count += 1
        if count:
            graph.sort()
        return PassResult(model, bool(count), {"split-packed-heads": count} if count else {})
