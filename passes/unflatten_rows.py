"""unflatten-rows

    r = Reshape(x, (-1, H));  y_1 .. y_m = f(r);  z_k = Reshape(y_k, (d1, ..., dn, C_k))
        ->  y_1 .. y_m = f(x);  z_k = y_k                    (x of dims (d1, ..., dn, H), n >= 2)

where f is a region of row-wise ops: each output row depends only on the same row of its region inputs. Flattening
x to P = d1 * ... * dn rows, applying f, and regrouping the P rows into (d1, ..., dn) is f applied to x directly,
because every op in f broadcasts over leading dims the same way:

    elementwise unary (Relu, Gelu, Cast, ...) and binary ops whose other operand is a region value or the same for
    every row (rank <= 1, or (1, C));  LayerNormalization / SimplifiedLayerNormalization / Softmax over the last
    axis (axis set to -1);  MatMul(v, W) with W 2-D;  Gemm(v, W, C) (transA = 0) -> v @ op(W) * alpha + beta * C.

OPT's decoder flattens its residual stream to (-1, H) around the feed-forward block and restores it before the next
layer: the LayerNorm between reads a 2-D value, so the residual Add and the norm do not line up for the skip-norm
fusion, and the Gemms hide their bias Adds. Unflattened, the block reads (B, S, H) like every other decoder's.

Requires: H = x's last dim (static, or read from Shape(x)); every use of every region value is a region op or an
exit Reshape whose target is provably (d1, ..., dn, C) element by element (at most one -1; the others read from
x's shape or proved equal, onnxc.shapes.same_dim; the last the value's width); no region value is a graph output;
norms' extra outputs (mean, inverse std) unused. Refused otherwise, leaving the model as it was (`sites(model)`
lists each flatten with its region or the reason it was refused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import attr_value, replace_value
from onnxc.shapes import Unknown, dims_equal, dims_of, element_is_dim, sym_value

_UNARY = frozenset({"Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp",
                    "Log", "Gelu", "Elu", "LeakyRelu", "Softplus", "HardSigmoid", "HardSwish", "Sin", "Cos",
                    "Floor", "Ceil", "Round", "Sign", "Not", "Clip"})
_MS_UNARY = frozenset({"Gelu", "FastGelu", "QuickGelu", "BiasGelu"})   # bias (if any) is input 1, 1-D
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And",
                     "Or"})
_LAST_AXIS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "LogSoftmax"})
_MAX_REGION = 256


@dataclass
class Region:
    entry: ir.Node                                        # Reshape(x, (-1, H))
    nodes: list[ir.Node] = field(default_factory=list)    # row-wise ops, in discovery order
    exits: list[ir.Node] = field(default_factory=list)    # Reshape(y, (d1, ..., dn, C))
    widths: dict[int, object] = field(default_factory=dict)   # id(value) -> C


def _row_constant(v: ir.Value | None) -> bool:
    """The same for every row in both forms: absent, rank <= 1, or (1, C) (broadcasts over leading dims)."""
    if v is None:
        return True
    d = dims_of(v)
    return d is not None and (len(d) <= 1 or len(d) == 2 and d[0] == 1)


def _width(v: ir.Value):
    d = dims_of(v)
    return d[1] if d is not None and len(d) == 2 else None


def _entry(node: ir.Node, memo: dict) -> str | None:
    """Why `node` is not Reshape(x, (-1, H)) with H = x's last dim and x of rank >= 3, or None if it is."""
    x = node.inputs[0]
    dx = dims_of(x)
    if dx is None or len(dx) < 3:
        return "the flattened value's rank is unknown or below 3"
    t = sym_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if t is None or len(t) != 2 or t[0] != -1 or t[1] in (-1, 0):
        return f"target {t} is not (-1, H)"
    if not element_is_dim(node.inputs[1], 1, t[1], x, len(dx) - 1, memo):
        return f"cannot prove H = {t[1]} is the last dim of {dx}"
    return None


def _exit(node: ir.Node, v: ir.Value, x: ir.Value, width, memo: dict) -> bool:
    """Reshape(v, T) with T provably (d1, ..., dn, width) for x = (d1, ..., dn, H)."""
    if node.op_type != "Reshape" or node.domain != "" or node.inputs[0] is not v or len(node.inputs) < 2:
        return False
    dx, t = dims_of(x), sym_value(node.inputs[1])
    allowzero = attr_value(node, "allowzero", default=0)
    lead = len(dx) - 1
    if t is None or len(t) != lead + 1 or sum(1 for e in t if e == -1) > 1:
        return False
    for i, e in enumerate(t):
        if e == -1:
            continue
        if e == 0 and not allowzero:       # copies dim i of the 2-D (P, C) input: not a dim of x for n >= 2
            return False
        if i < lead and not element_is_dim(node.inputs[1], i, e, x, i, memo):
            return False
        if i == lead and not dims_equal(e, width):
            return False
    return True


def _grow(entry: ir.Node, memo: dict) -> Region | str:
    x = entry.inputs[0]
    region = Region(entry)
    start = entry.outputs[0]
    region.widths[id(start)] = dims_of(x)[-1]
    members: set[int] = {id(start)}
    seen_nodes: set[int] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        if v.is_graph_output():
            return f"region value '{v.name}' is a graph output"
        for node, idx in list(v.uses()):
            if id(node) in seen_nodes:
                continue
            if _exit(node, v, x, region.widths[id(v)], memo):
                seen_nodes.add(id(node))
                region.exits.append(node)
                continue
            if node.op_type == "Reshape" and node.domain == "":
                t, d = sym_value(node.inputs[1]) if len(node.inputs) > 1 else None, dims_of(x)
                return (f"cannot prove the restore target {t} of '{node.name}' is the leading dims "
                        f"{d[:-1]} and the width {region.widths[id(v)]}")
            why = _row_op(node, idx, members)
            if why:
                return f"'{node.name}' ({node.op_type}): {why}"
            seen_nodes.add(id(node))
            region.nodes.append(node)
            if len(region.nodes) > _MAX_REGION:
                return "region too large"
            outs = _row_outputs(node)
            for o in outs:
                w = _out_width(node, o, region.widths)
                if w is None:
                    return f"'{node.name}' ({node.op_type}): output width unknown"
                region.widths[id(o)] = w
                members.add(id(o))
                todo.append(o)
    # every row input of every region node must be a region value (an operand joined later is checked here)
    for node in region.nodes:
        for k in _row_inputs(node):
            if k < len(node.inputs) and node.inputs[k] is not None and id(node.inputs[k]) not in members:
                return f"'{node.name}' ({node.op_type}) also reads '{node.inputs[k].name}' row by row, from outside"
    if not region.exits:
        return "no Reshape restores the leading dims"
    return region


def _row_inputs(node: ir.Node) -> list[int]:
    """Inputs that must be region values (row-aligned); the others must be the same for every row."""
    op = node.op_type
    if op in _BINARY:
        return [k for k, v in enumerate(node.inputs) if v is not None and not _row_constant(v)]
    return [0]


def _row_op(node: ir.Node, idx: int, members: set[int]) -> str | None:
    """Why `node`, read at input idx from a region value, is not a row-wise op of the region."""
    op, ms = node.op_type, node.domain == "com.microsoft"
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return "not a known op"
    if ms:
        if op not in _MS_UNARY or idx != 0 or not all(_row_constant(v) for v in node.inputs[1:]):
            return "not a row-wise op"
        return None
    if op in _UNARY:
        return None if idx == 0 and all(_row_constant(v) for v in node.inputs[1:]) else "not a row-wise use"
    if op in _BINARY:
        return None
    if op in _LAST_AXIS:
        if idx != 0:
            return "reads the region value as a parameter"
        axis = attr_value(node, "axis", default=-1)
        if axis not in (-1, 1):
            return f"axis {axis} is not the last"
        if op in ("LayerNormalization", "SimplifiedLayerNormalization"):
            if not all(_row_constant(v) for v in node.inputs[1:]):
                return "scale or bias differs per row"
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                return "its mean / inverse std outputs are used"
        return None
    if op == "MatMul":
        d = dims_of(node.inputs[1])
        return None if idx == 0 and d is not None and len(d) == 2 and id(node.inputs[1]) not in members else \
            "not a product by a 2-D matrix"
    if op == "Gemm":
        if idx != 0 or attr_value(node, "transA", default=0):
            return "Gemm reads the region value transposed or as its weight"
        if id(node.inputs[1]) in members or (len(node.inputs) > 2 and not _row_constant(node.inputs[2])):
            return "Gemm's weight or C is not the same for every row"
        return None
    return "not a row-wise op"


def _row_outputs(node: ir.Node) -> list[ir.Value]:
    if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
        return [node.outputs[0]]
    return list(node.outputs)


def _out_width(node: ir.Node, out: ir.Value, widths: dict):
    """The width C of a region op's (P, C) output: from inference, the weight, or the broadcast of its inputs'
    last dims (a row constant (C,) may widen a (P, 1) region value); None when unknown or not provable."""
    w = _width(out)
    if w is not None and not isinstance(w, Unknown):
        return w
    op = node.op_type
    if op in ("MatMul", "Gemm"):
        d = dims_of(node.inputs[1])
        return d[0] if op == "Gemm" and attr_value(node, "transB", default=0) else d[1]
    lasts = []
    for v in node.inputs:
        if v is None:
            continue
        if id(v) in widths:
            lasts.append(widths[id(v)])
        elif (d := dims_of(v)) is None:
            return None
        elif d:
            lasts.append(d[-1])
    wide = [e for e in lasts if e != 1]
    if not wide:
        return 1
    return wide[0] if all(dims_equal(e, wide[0]) for e in wide) else None


def _fresh(stem: str, taken: set[str]) -> str:
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


def _rewrite(region: Region, graph: ir.Graph, taken: set[str]) -> None:
    x = region.entry.inputs[0]
    lead = list(x.shape)[:-1]
    region.entry.outputs[0].replace_all_uses_with(x)
    for node in region.nodes:
        if node.op_type in _LAST_AXIS and "axis" in node.attributes:
            node.attributes["axis"] = ir.AttrInt64("axis", -1)
        if node.op_type == "Gemm":
            _gemm_to_matmul(node, graph, taken)
            continue
        for o in _row_outputs(node):
            w = region.widths[id(o)]
            o.shape = ir.Shape(lead + [w if isinstance(w, int) else ir.SymbolicDim(w if isinstance(w, str) else None)])
    for node in region.exits:
        replace_value(node.outputs[0], node.inputs[0])


def _gemm_to_matmul(node: ir.Node, graph: ir.Graph, taken: set[str]) -> None:
    """Gemm(v, W, C; alpha, beta, transB) -> v @ op(W) * alpha + beta * C, before `node`, then `node` removed."""
    v, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    alpha = float(attr_value(node, "alpha", default=1.0))
    beta = float(attr_value(node, "beta", default=1.0))
    dtype = v.dtype.numpy() if v.dtype is not None else np.float32
    new: list[ir.Node] = []
    base = node.name or "gemm"

    def add(op: str, inputs: list, suffix: str, **attrs) -> ir.Value:
        n = ir.node(op, inputs, attributes=attrs or None, name=_fresh(f"unflatten-rows/{base}/{suffix}", taken))
        new.append(n)
        return n.outputs[0]

    def const(a: np.ndarray, suffix: str) -> ir.Value:
        val = ir.Value(name=_fresh(f"unflatten-rows/{base}/{suffix}", taken), type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                       shape=ir.Shape(a.shape), const_value=ir.tensor(a))
        graph.register_initializer(val)
        return val

    if attr_value(node, "transB", default=0):
        w = add("Transpose", [w], "transpose", perm=[1, 0])
    y = add("MatMul", [v, w], "matmul")
    if alpha != 1.0:
        y = add("Mul", [y, const(np.array(alpha, dtype), "alpha")], "alpha")
    if c is not None:
        if beta != 1.0:
            c = add("Mul", [c, const(np.array(beta, dtype), "beta")], "beta")
        y = add("Add", [y, c], "add")
    graph.insert_before(node, new)
    out = node.outputs[0]
    y.dtype = out.dtype
    lead = list(v.shape)[:-1] if v.shape is not None else None
    w_out = _out_width(node, out, {})
    if lead is not None:
        y.shape = ir.Shape(lead + [w_out if isinstance(w_out, int) else ir.SymbolicDim(None)])
    out.replace_all_uses_with(y)
    graph.remove(node, safe=True)


def sites(model: ir.Model) -> list[tuple[str, Region | str]]:
    """Every Reshape(x, (-1, H)) entry with its region, or the reason it is refused (for tests and diagnosis)."""
    out = []
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain != "":
            continue
        memo: dict = {}
        why = _entry(node, memo)
        if why is None or "target" not in why:
            out.append((node.name, why if why is not None else _grow(node, memo)))
    return out


@register_pass
class UnflattenRows(Pass):
    """Flatten to (-1, H) -> row-wise ops -> restore (OPT's feed-forward block) runs on the unflattened value"""

    name = "unflatten-rows"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph, count = model.graph, 0
        taken = {n.name for n in graph if n.name} | set(graph.initializers) | \
            {v.name for n in graph for v in n.outputs if v.name} | {v.name for v in graph.inputs if v.name}
        entries = [n for n in graph if n.op_type == "Reshape" and n.domain == ""]
        for node in entries:
            if node.graph is None:
                continue
            memo: dict = {}
            if _entry(node, memo) is not None:
                continue
            region = _grow(node, memo)
            if isinstance(region, str):
                continue
            _rewrite(region, graph, taken)
            count += 1
        return PassResult(model, bool(count), {"unflatten-rows": count} if count else {})
