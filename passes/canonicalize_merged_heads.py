"""canonicalize-merged-heads: attention computed with batch and heads merged into one axis, written per head

With m(X) = Reshape(X, (B*N, d2, d3)) the merge of the first two axes of a 4-D X (B, N, d2, d3) and s(x) its
inverse, Reshape(x, (B, N, d2, d3)):

    MatMul(m(A), m(C))                  ->  m(MatMul(A, C))                                 rule merged-heads-bmm
    MatMul(m(A), Transpose(m(K), (0,2,1)))  ->  m(MatMul(A, Transpose(K, (0,1,3,2))))
        (either operand optionally times or divided by a scalar constant, kept on the 4-D one; a scalar computed
        from shapes alone, TorchScript's sqrt(3 * H) of a view whose head size inference lost, is one when it
        evaluates to one value at both probe sizes)
    s(x (+|-|*|/) y)                    ->  s(x) (+|-|*|/) y'                               rule merged-heads-split
         y' = y for a scalar, s(y) for y (B*N, e2, e3), Unsqueeze(y, 0) for y (1, e2, e3)
    s(m(X))                             ->  X                                               rule merged-heads-unmerge
    Shape(m(X))                         ->  (d0*d1, d2, d3) of Shape(X)                      rule merged-heads-shape
    Shape(x (+|-|*|/) y)                ->  Shape(x)                                         rule merged-heads-sum-shape
         (read by the target of a 4-D view of the sum, TorchScript's view(-1, N, S, T), the sum 3-D and x's shape)

The batched matrix product of merged axes is the per-(batch, head) product: row b*N + h of m(A) is A[b, h]. An
elementwise op commutes with the split when every operand is split the same way (a scalar, or an operand with one
row for all, broadcasts the same before and after). Each rewrite is proved on shapes evaluated at two probe sizes
(probe.evaluate(shapes=True): no weight is read): the merged value is (B*N, d2, d3) of the 4-D one, the split
restores (B, N) of the same element count, the operands' first axis is B*N or 1.

BLOOM (ALiBi added by baddbmm) and DeBERTa (disentangled attention) compute their attention this way; after this
pass the scores, the softmax and P @ V are 4-D as the attention fusions read them.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc import probe
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import Rule, apply_rules, const_array
from onnxc.shapes import derived_dims
from onnxc.verify import Scenario, make_inputs

_SCENARIOS = (Scenario("heads", 2, 5, 0), Scenario("heads", 3, 3, 0))


def _shapes(graph: ir.Graph, values: list[ir.Value]) -> list[list[tuple[int, ...]]] | None:
    """The values' shapes at each probe size, or None when they cannot be evaluated."""
    out = []
    try:
        for seed, sc in enumerate(_SCENARIOS):
            feeds = make_inputs(graph, sc, seed)
            out.append([tuple(int(x) for x in s) for s in probe.evaluate(graph, values, feeds, shapes=True)])
    except probe.ProbeError:
        return None
    return out


def _merge_of(v: ir.Value | None) -> ir.Value | None:
    """X when v = Reshape(X) with X 4-D and v 3-D (a merge of the first two axes, to be proved on shapes)."""
    r = v.producer() if v is not None else None
    if r is None or r.op_type != "Reshape" or r.domain != "" or r.inputs[0] is None:
        return None
    x = r.inputs[0]
    if x.shape is not None and len(x.shape) != 4 or v.shape is not None and len(v.shape) != 3:
        return None
    return x


def _merges(m: tuple[int, ...], x: tuple[int, ...]) -> bool:
    return len(m) == 3 and len(x) == 4 and m == (x[0] * x[1], x[2], x[3])


# ------------------------------------------------------------------------------------------- merged-heads-bmm
def bmm_pattern(op, a, c):
    return op.MatMul(a, c, _name="mm")


def _feeds(graph: ir.Graph) -> list[dict[str, np.ndarray]]:
    return [make_inputs(graph, sc, seed) for seed, sc in enumerate(_SCENARIOS)]


def _unscaled(v: ir.Value) -> tuple[ir.Value, tuple[str, ir.Value] | None]:
    """(x, (op, s)) for v = x * s or x / s with s a one-element value (DeBERTa: MatMul(Q, K^T / s)), else (v, None);
    s is proved a constant by _scale_value once the operands are known to be merges."""
    p = v.producer()
    if p is None or p.op_type not in ("Mul", "Div") or p.domain != "" or p.inputs[1] is None:
        return v, None
    s = p.inputs[1]
    if s.shape is not None and (s.shape.rank() > 1 or any(d != 1 for d in s.shape if isinstance(d, int))):
        return v, None
    return p.inputs[0], (p.op_type, s)


def _scale_value(graph: ir.Graph, s: ir.Value) -> np.ndarray | None:
    """s's value: a constant, or a scalar computed from shapes alone (TorchScript's sqrt(H * 3) of a view whose head
    size inference lost) that evaluates to one value at both probe sizes (probe.invariant)."""
    k = const_array(s, 1)
    if k is None and s.const_value is None and s.producer() is not None:
        k = probe.invariant(graph, s, [make_inputs(graph, sc, seed) for seed, sc in enumerate(_SCENARIOS)])
    return k if k is not None and k.size == 1 and (s.dtype is None or k.dtype == s.dtype.numpy()) else None


def bmm_check(m):
    a, a_scale = _unscaled(m["a"])
    a4 = _merge_of(a)
    if a4 is None:
        return m.fail("the left operand is not a merge of a 4-D value", "a")
    c, scale = _unscaled(m["c"])
    transposed = False
    t = c.producer()
    if t is not None and t.op_type == "Transpose" and t.domain == "" and \
            [int(p) for p in (t.attributes["perm"].value if "perm" in t.attributes else ())] == [0, 2, 1]:
        c, transposed = t.inputs[0], True
    c4 = _merge_of(c)
    if c4 is None:
        return m.fail("the right operand is not a merge of a 4-D value (or its transpose)", "c")
    shapes = _shapes(m.graph, [a, a4, c, c4])
    if shapes is None:
        return m.fail("the operands' shapes cannot be evaluated")
    for sa, sa4, sc, sc4 in shapes:
        if not (_merges(sa, sa4) and _merges(sc, sc4) and sa4[:2] == sc4[:2]):
            return m.fail(f"the operands {sa}, {sc} are not merges of {sa4}, {sc4} with the same (B, N)")
    proved = []
    for sc, operand in ((scale, "c"), (a_scale, "a")):
        k = None if sc is None else _scale_value(m.graph, sc[1])
        if sc is not None and k is None:
            return m.fail("the scale of the operand is not a constant, nor one on evaluated shapes", operand)
        proved.append(None if sc is None else (sc[0], k))
    return {"a4": a4, "c4": c4, "transposed": transposed, "scale": proved[0], "a_scale": proved[1]}


def _merge(op, x4):
    """Reshape(x4, (-1, d2, d3))."""
    tail = op.Slice(op.Shape(x4), op.const(np.array([2], np.int64)), op.const(np.array([4], np.int64)))
    return op.Reshape(x4, op.Concat(op.const(np.array([-1], np.int64)), tail, axis=0))


def bmm_rewrite(op, a4, c4, transposed, scale, a_scale):
    c = op.Transpose(c4, perm=[0, 1, 3, 2]) if transposed else c4
    if scale is not None:
        c = getattr(op, scale[0])(c, op.const(scale[1]))
    c.dtype = c4.dtype
    a = getattr(op, a_scale[0])(a4, op.const(a_scale[1])) if a_scale is not None else a4
    a.dtype = a4.dtype
    mm = op.MatMul(a, c)
    mm.dtype = a4.dtype
    out = _merge(op, mm)
    out.dtype = a4.dtype
    return out


# ----------------------------------------------------------------------------------------- merged-heads-split
def split_pattern(op, x, y, t):
    e = op.Or(op.Add(x, y, _name="e"), op.Sub(x, y, _name="e"), op.Mul(x, y, _name="e"), op.Div(x, y, _name="e"))
    return op.Reshape(e, t, _name="s")


def _never_equal(a, b) -> bool:
    """Dims that differ for every input size: two different ints, or an int and a symbol."""
    return a is not None and b is not None and (isinstance(a, int) or isinstance(b, int)) and a != b


def split_check(m):
    out, x, y = m.outputs[0], m["x"], m["y"]
    do, dx = derived_dims(out), derived_dims(x)
    if do is not None and len(do) != 4 or dx is not None and len(dx) != 3:
        return m.fail("not a 3-D value viewed in 4-D")
    if do is not None and dx is not None and any(_never_equal(a, b) for a, b in zip(do[2:], dx[1:])):
        return m.fail(f"{dx} -> {do} changes the last two axes")
    shapes = _shapes(m.graph, [out, x, y])
    if shapes is None:
        return m.fail("the shapes cannot be evaluated")
    kinds = set()
    for so, sx, sy in shapes:
        if len(so) != 4 or len(sx) != 3 or so[0] * so[1] != sx[0] or so[2:] != sx[1:]:
            return m.fail(f"{sx} -> {so} is not a split of the first axis into two")
        if int(np.prod(sy)) == 1 and len(sy) <= 1:
            kinds.add("scalar")
        elif len(sy) == 3 and sy[0] == sx[0]:
            kinds.add("split")
        elif len(sy) == 3 and sy[0] == 1:
            kinds.add("one")
        else:
            return m.fail(f"the other operand {sy} is not a scalar or (B*N | 1, ., .)")
    if len(kinds) != 1:
        return m.fail("the other operand's shape changes kind with the input size")
    return {"kind": kinds.pop(), "op_type": m.node("e").op_type, "like": out}


def split_rewrite(op, x, y, t, kind, op_type, like):
    dtype = y.dtype
    if kind == "split":
        head = op.Slice(t, op.const(np.array([0], np.int64)), op.const(np.array([2], np.int64)))
        tail = op.Slice(op.Shape(y), op.const(np.array([1], np.int64)), op.const(np.array([3], np.int64)))
        y = op.Reshape(y, op.Concat(head, tail, axis=0))
    elif kind == "one":
        y = op.Unsqueeze(y, op.const(np.array([0], np.int64)))
    y.dtype = dtype                 # types for the fusions that read these before inference runs again
    x4 = op.Reshape(x, t)
    x4.type, x4.shape = like.type, like.shape
    out = getattr(op, op_type)(x4, y)
    out.type, out.shape = like.type, like.shape
    return out


# --------------------------------------------------------------------------------------- merged-heads-unmerge
def unmerge_pattern(op, x, t):
    return op.Reshape(x, t, _name="s")


def unmerge_check(m):
    x4 = _merge_of(m["x"])
    if x4 is None:
        return m.fail("the split value is not a merge of a 4-D value", "x")
    shapes = _shapes(m.graph, [m.outputs[0], x4])
    if shapes is None:
        return m.fail("the shapes cannot be evaluated")
    if any(so != s4 for so, s4 in shapes):
        return m.fail("the split does not restore the merged value's shape")
    return {"x4": x4}


def unmerge_rewrite(op, x, t, x4):
    return x4


# ---------------------------------------------------------------------------------------- merged-heads-shape
def shape_pattern(op, v):
    return op.Shape(v, _name="sh")


def shape_check(m):
    if m.node("sh").attributes:
        return m.fail("Shape reads part of the shape (start/end)")
    x4 = _merge_of(m["v"])
    if x4 is None:
        return m.fail("the value is not a merge of a 4-D value", "v")
    shapes = _shapes(m.graph, [m["v"], x4])
    if shapes is None or not all(_merges(sv, s4) for sv, s4 in shapes):
        return m.fail("the value is not (B*N, d2, d3) of its 4-D source")
    return {"x4": x4}


def shape_rewrite(op, v, x4):
    s = op.Shape(x4)

    def part(lo, hi):
        return op.Slice(s, op.const(np.array([lo], np.int64)), op.const(np.array([hi], np.int64)))
    return op.Concat(op.Mul(part(0, 1), part(1, 2)), part(2, 4), axis=0)


# ------------------------------------------------------------------------------------ merged-heads-sum-shape
def sum_shape_check(m):
    """v = x (+|-|*|/) y, the Shape feeds the target of a 3-D -> 4-D view of v (TorchScript's view(-1, N, S, T) of
    scores + relative terms, its last dims read from the sum), and v's shape is x's on evaluated shapes."""
    v, e = m["v"], m["v"].producer()
    if e is None or e.op_type not in ("Add", "Sub", "Mul", "Div") or e.domain != "":
        return m.fail("the value is not an elementwise Add/Sub/Mul/Div", "v")
    views = [u for u, k in v.uses() if u.op_type == "Reshape" and u.domain == "" and k == 0 and u.inputs[1]]
    try:
        if not any(m.node("sh") in probe.cone(m.graph, [u.inputs[1]]).nodes for u in views):
            return m.fail("the shape does not feed a view of the same value")
    except probe.ProbeError as exc:
        return m.fail(f"the view's target cannot be read: {exc}")
    shapes = _shapes(m.graph, [v, *e.inputs])
    if shapes is None:
        return m.fail("the shapes cannot be evaluated")
    for k, src in enumerate(e.inputs):
        if all(len(s[0]) == 3 and s[0] == s[1 + k] for s in shapes):
            return {"src": src, "attrs": {a: x.value for a, x in m.node("sh").attributes.items()}}
    return m.fail("the value is not 3-D or its shape is neither operand's")


def sum_shape_rewrite(op, v, src, attrs):
    return op.Shape(src, **attrs)


RULES = [
    Rule("merged-heads-bmm", bmm_pattern, bmm_rewrite, bmm_check,
         summary="MatMul of (B*N, ., .) merges of 4-D values (or a transposed one) -> the 4-D MatMul, merged"),
    Rule("merged-heads-split", split_pattern, split_rewrite, split_check,
         summary="(B*N, S, T) -> (B, N, S, T) of an elementwise op -> the op on split operands"),
    Rule("merged-heads-unmerge", unmerge_pattern, unmerge_rewrite, unmerge_check,
         summary="Reshape(Reshape(X, (B*N, S, T)), (B, N, S, T)) -> X, proved on evaluated shapes"),
    Rule("merged-heads-shape", shape_pattern, shape_rewrite, shape_check,
         summary="Shape of a (B*N, S, T) merge -> (B*N, S, T) computed from Shape(X), so the merge can die"),
    Rule("merged-heads-sum-shape", shape_pattern, sum_shape_rewrite, sum_shape_check,
         summary="Shape(x + y) read by a 4-D view of the sum -> Shape(x), x's shape the sum's on evaluated shapes"),
]

@register_pass
class CanonicalizeMergedHeads(Pass):
    """Attention with batch and heads merged (B*N, S, T), as BLOOM and DeBERTa write it -> per-head 4-D."""

    name = "canonicalize-merged-heads"
    level = 2

    def rules(self):
        return RULES

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        counts = dict(apply_rules(model, RULES, disabled=ctx.disabled_rules).applied)
        if counts:      # the merged views left behind would read as outside users of the 4-D values
            for node in reversed(list(model.graph)):
                if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                    model.graph.remove(node, safe=True)
        return PassResult(model, bool(counts), counts)
