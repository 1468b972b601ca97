"""Symbolic shape values, and proofs that two dims are equal.

Exporters compute Reshape/Expand targets at run time with Shape -> Gather -> Unsqueeze -> Concat chains. Where a
dim is static the element is an int; where it is symbolic it is the dim's name (a str); where nothing is known it is
a unique `Unknown` token that equals only itself. fold-constants stores these tuples in `value.meta[SYM_KEY]`, and
rules use `sym_value` to prove, e.g., that a Reshape target equals its input's shape.

Names alone do not always meet: shape inference names a broadcast dim afresh (an attention output's batch is the
broadcast of the hidden states' and the mask's), and a rewrite may give a value new dims while shape vectors computed
from its old ones keep the old names. `shape_source` says which dim of which value an element of a shape vector was
read from, and `same_dim` proves dim i of a equals dim j of b by walking producers that keep a dim (elementwise and
row-wise ops, MatMul by a matrix, fused norms and attention, Transpose, Reshape elements that copy or read a dim)
until the two walks meet or reach a shared name.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from .rules import attr_value, const_array

_MS = "com.microsoft"
SYM_KEY = "onnxc.sym_value"          # flat tuple of elements
SYM_ARRAY_KEY = "onnxc.sym_array"    # the same as a numpy object array with the value's shape
Dim = "int | str | Unknown"
_INT_TYPES = frozenset({int(ir.DataType.INT64), int(ir.DataType.INT32)})


class Unknown:
    """A dim nothing is known about; equal only to itself."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(self._ids)

    def __repr__(self) -> str:
        return f"?{self.id}"


def dims_of(v: ir.Value | None) -> tuple | None:
    """The value's shape as a tuple of int / symbol name / Unknown, or None if the rank is unknown."""
    if v is None or v.shape is None:
        return None
    out = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        elif d.value is not None:
            out.append(str(d.value))
        else:
            # Stable per value: the same unknown dim read twice must compare equal.
            cache = v.meta.setdefault("onnxc.unknown_dims", {})
            key = len(out)
            if key not in cache:
                cache[key] = Unknown()
            out.append(cache[key])
    return tuple(out)


def sym_value(v: ir.Value | None, max_elements: int = 16) -> tuple | None:
    """Element-wise contents of a small int tensor, from its constant or from fold-constants' analysis."""
    if v is None:
        return None
    sym = v.meta.get(SYM_KEY)
    if sym is not None:
        return sym
    arr = const_array(v, max_elements)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return tuple(int(x) for x in np.asarray(arr).reshape(-1))


def is_known(dims: tuple) -> bool:
    return all(isinstance(d, int) for d in dims)


def reshape_target(input_dims: tuple, target: tuple, allowzero: bool = False) -> tuple | None:
    """Resolve 0 (copy) and -1 (infer) in a Reshape target symbolically; None when it cannot be resolved."""
    out = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero and isinstance(t, int):
            if i >= len(input_dims):
                return None
            out.append(input_dims[i])
        else:
            out.append(t)
    if sum(1 for t in out if isinstance(t, int) and t == -1) > 1:
        return None
    if -1 in [t for t in out if isinstance(t, int)]:
        # -1 resolves to the one input dim left when both sides share all the others.
        rest_in = list(input_dims)
        rest_out = [t for t in out if not (isinstance(t, int) and t == -1)]
        unmatched = []
        for t in rest_out:
            if t in rest_in:
                rest_in.remove(t)
            else:
                unmatched.append(t)
        if unmatched:
            # Symbolic dims shared by both sides cancel; what is left must be static to divide.
            if not (is_known(tuple(rest_in)) and is_known(tuple(unmatched))):
                return None
            total, known = int(np.prod(rest_in)), int(np.prod(unmatched))
            if known == 0 or total % known:
                return None
            return tuple(total // known if (isinstance(t, int) and t == -1) else t for t in out)
        if len(rest_in) == 1:
            out = [rest_in[0] if (isinstance(t, int) and t == -1) else t for t in out]
        elif len(rest_in) == 0:
            out = [1 if (isinstance(t, int) and t == -1) else t for t in out]
        else:
            return _numeric(input_dims, out)
    return tuple(out)


def reshape_input_dims(x: ir.Value, target: ir.Value, dims: tuple | None = None, depth: int = 3) -> tuple | None:
    """x's dims (or `dims`, a refinement of them), each renamed to the symbolic target element it is proven equal
    to: element k read from Shape(u)[j] (`shape_source`) and dim i of x with `same_dim(x, i, u, j)`. Shape inference
    names a computed value's dims afresh ('unk__92') while the target keeps the graph input's ('batch_size');
    renaming lets `reshape_target` cancel them and resolve -1. Each input dim takes at most one name."""
    d, t = dims_of(x) if dims is None else dims, sym_value(target)
    if d is None or t is None:
        return d
    out, memo = list(d), {}
    for k, tk in enumerate(t):
        if isinstance(tk, int) or tk in out or (src := shape_source(target, k)) is None:
            continue
        i = next((i for i, di in enumerate(out) if not _known(di) or isinstance(di, str) and di not in t
                  if same_dim(x, i, src[0], src[1], depth, memo)), None)
        if i is not None:
            out[i] = tk
    return tuple(out)


def _numeric(input_dims: tuple, out: list) -> tuple | None:
    if not is_known(input_dims) or not all(isinstance(t, int) for t in out):
        return None
    total = int(np.prod(input_dims))
    known = int(np.prod([t for t in out if t != -1]))
    if known == 0 or total % known:
        return None
    return tuple(total // known if t == -1 else t for t in out)


def shape_source(v: ir.Value | None, i: int, depth: int = 8) -> tuple[ir.Value, int] | None:
    """(u, j) when element i of the int vector (or scalar) v is provably dim j of u: read through Shape, Gather,
    Slice (step 1), Concat, Unsqueeze/Squeeze of one element, Cast and Identity. Where a shape is assembled from
    Shape -> Gather -> Unsqueeze -> Concat pieces this names the dim behind each element, whatever its symbol."""
    p = v.producer() if v is not None else None
    if p is None or p.domain != "" or depth == 0 or i < 0:
        return None
    op, ins = p.op_type, list(p.inputs)

    def attr(name: str, default: int | None) -> int | None:
        a = p.attributes.get(name)
        return a.as_int() if a is not None else default

    def length(x: ir.Value | None) -> int | None:
        d = dims_of(x)
        return d[0] if d is not None and len(d) == 1 and isinstance(d[0], int) else (1 if d == () else None)

    if op == "Shape":
        rank = len(d) if (d := dims_of(ins[0])) is not None else None
        start, end = attr("start", 0), attr("end", None)
        if start < 0 or (end is not None and end < 0):
            if rank is None:
                return None
            start = start % rank if start < 0 else start
            end = None if end is None else (end % rank if end < 0 else end)
        j = start + i
        return (ins[0], j) if (end is None or j < end) and (rank is None or j < rank) else None
    if op == "Identity" or op == "Cast" and attr("to", 0) in _INT_TYPES or \
            op in ("Unsqueeze", "Squeeze") and length(ins[0]) == 1 and i == 0:
        return shape_source(ins[0], i, depth - 1)
    if op == "Gather" and attr("axis", 0) == 0:
        idx = const_array(ins[1], 16)
        if idx is None or i >= idx.size:
            return None
        k = int(idx.reshape(-1)[i])
        if k < 0:
            n = length(ins[0])
            k = k + n if n is not None else -1
        return shape_source(ins[0], k, depth - 1)
    if op == "Concat":
        for x in ins:
            n = length(x)
            if n is None:
                return None
            if i < n:
                return shape_source(x, i, depth - 1)
            i -= n
        return None
    if op == "Slice" and len(ins) >= 3:
        starts = const_array(ins[1], 1)
        steps = const_array(ins[4], 1) if len(ins) > 4 and ins[4] is not None else np.ones(1, np.int64)
        if starts is None or steps is None or int(steps.reshape(-1)[0]) != 1:
            return None
        s = int(starts.reshape(-1)[0])
        if s < 0:
            n = length(ins[0])
            if n is None:
                return None
            s = max(s + n, 0)
        return shape_source(ins[0], s + i, depth - 1)
    return None


# ---------------------------------------------------------------------------------------------------- dim proofs
_UNARY = frozenset({"Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp",
                    "Log", "Softmax", "LogSoftmax", "Gelu", "Elu", "LeakyRelu", "Softplus", "HardSigmoid", "Sin",
                    "Cos"})
_MS_UNARY = frozenset({"Gelu", "FastGelu", "QuickGelu", "BiasGelu"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
# Fused ops whose listed outputs have the rank and leading dims of input 0 (attention: query (B, S, D) -> (B, S, D'),
# ONNX Attention also (B, N, S, H) -> (B, N, S, H')).
_ROWWISE = {("", "LayerNormalization"): (0,), ("", "SimplifiedLayerNormalization"): (0,), ("", "Attention"): (0,),
            (_MS, "SkipLayerNormalization"): (0, 3), (_MS, "SkipSimplifiedLayerNormalization"): (0, 3),
            (_MS, "GroupQueryAttention"): (0,), (_MS, "MultiHeadAttention"): (0,), (_MS, "Attention"): (0,),
            (_MS, "MatMulNBits"): (0,), (_MS, "RotaryEmbedding"): (0,)}
# Ops whose listed outputs have exactly input 0's shape.
_SAME_SHAPE = {("", "LayerNormalization"): (0,), ("", "SimplifiedLayerNormalization"): (0,),
               (_MS, "SkipLayerNormalization"): (0, 3), (_MS, "SkipSimplifiedLayerNormalization"): (0, 3),
               (_MS, "RotaryEmbedding"): (0,)}
_CHAIN_PLACES = 64
_ALIVE = "alive"      # memo key: the values whose ids the memo holds, kept alive so no id is reused


def _dim_inputs(v: ir.Value, axis: int, depth: int, memo: dict) -> list[tuple[ir.Value, int]]:
    """Every (u, j), one producer back, such that dim `axis` of v provably has the size of dim j of u."""
    p, d = v.producer(), dims_of(v)
    if p is None or d is None or not 0 <= axis < len(d):
        return []
    rank, op, ins = len(d), (p.domain, p.op_type), list(p.inputs)
    lead = axis < rank - 1
    if (p.domain == "" and p.op_type in _UNARY) or (p.domain == _MS and p.op_type in _MS_UNARY):
        return [(ins[0], axis)]
    if op == ("", "MatMul") and lead and len(dims_of(ins[1]) or ()) == 2 and len(dims_of(ins[0]) or ()) == rank:
        return [(ins[0], axis)]
    if op in _SAME_SHAPE and v.index() in _SAME_SHAPE[op] and len(dims_of(ins[0]) or ()) == rank:
        return [(ins[0], axis)]
    if op in _ROWWISE and lead and v.index() in _ROWWISE[op] and len(dims_of(ins[0]) or ()) == rank:
        norm_axis = p.attributes["axis"].as_int() if "axis" in p.attributes else -1
        return [(ins[0], axis)] if p.domain == _MS or norm_axis % rank == rank - 1 else []
    if op == ("", "Split"):
        split_axis = p.attributes["axis"].as_int() if "axis" in p.attributes else 0
        return [(ins[0], axis)] if split_axis % rank != axis else []
    if op in (("", "Unsqueeze"), ("", "Squeeze")):
        axes = const_array(ins[1], 8) if len(ins) > 1 and ins[1] is not None else None
        axes = [int(a) for a in axes.reshape(-1)] if axes is not None else \
            (list(p.attributes["axes"].as_ints()) if "axes" in p.attributes else None)
        dx = dims_of(ins[0])
        if axes is None or dx is None:
            return []
        if op[1] == "Unsqueeze":
            axes = {a % rank for a in axes}
            return [] if axis in axes else [(ins[0], axis - sum(1 for a in axes if a < axis))]
        axes = {a % len(dx) for a in axes}
        kept = [i for i in range(len(dx)) if i not in axes]
        return [(ins[0], kept[axis])] if axis < len(kept) else []
    if op == ("", "Range") and axis == 0 and len(ins) == 3:
        # Range(0, n, 1) has n elements: n read from Shape(u)[j] is dim j of u
        start, delta = const_array(ins[0], 1), const_array(ins[2], 1)
        if start is None or delta is None or start.size != 1 or delta.size != 1 or \
                int(start.reshape(-1)[0]) != 0 or int(delta.reshape(-1)[0]) != 1:
            return []
        src = shape_source(ins[1], 0)
        return [src] if src is not None else []
    if op == ("", "Concat"):
        # ONNX requires every input to have the output's dims off the concatenation axis: each is a source there
        cat = p.attributes["axis"].as_int() if "axis" in p.attributes else 0
        if cat % rank == axis:
            return []
        return [(x, axis) for x in ins if x is not None and len(dims_of(x) or ()) == rank]
    if op == ("", "Slice"):
        axes = const_array(ins[3], 8) if len(ins) > 3 and ins[3] is not None else None
        return [(ins[0], axis)] if axes is not None and axis not in {int(a) % rank for a in axes.reshape(-1)} else []
    if op == ("", "Gather") and len(ins) == 2:
        # shape(Gather(data, idx, axis=a)) = shape(data)[:a] ++ shape(idx) ++ shape(data)[a+1:]
        dd, di = dims_of(ins[0]), dims_of(ins[1])
        if dd is None or di is None or len(dd) + len(di) - 1 != rank:
            return []
        a = (p.attributes["axis"].as_int() if "axis" in p.attributes else 0) % len(dd)
        return [(ins[0], axis)] if axis < a else [(ins[1], axis - a)] if axis < a + len(di) else \
            [(ins[0], axis - len(di) + 1)]
    if op == ("", "Expand") and len(ins) == 2:
        # out = broadcast(x, s): the target's element where x's dim is absent or 1, x's dim where the target's is 1
        dx, t = dims_of(ins[0]), sym_value(ins[1])
        ix = axis - (rank - len(dx)) if dx is not None else None
        it = axis - (rank - len(t)) if t is not None else None
        if ix is not None and (ix < 0 or depth > 0 and is_one(ins[0], ix, depth - 1, memo)):
            src = shape_source(ins[1], it) if it is not None else None
            return [src] if src is not None else []
        if it is not None and ix is not None and (it < 0 or isinstance(t[it], int) and t[it] == 1):
            return [(ins[0], ix)]
        src = shape_source(ins[1], it) if it is not None else None
        if src is not None and ix is not None and depth > 0 and same_dim(ins[0], ix, src[0], src[1], depth - 1, memo):
            return [(ins[0], ix), src]
        return []
    if op == ("", "GatherElements") and len(ins) == 2:
        return [(ins[1], axis)]
    if op == ("", "Transpose"):
        perm = p.attributes["perm"].as_ints() if "perm" in p.attributes else list(range(rank))[::-1]
        return [(ins[0], perm[axis])] if len(perm) == rank else []
    if op == ("", "Reshape"):
        # A target element 0 copies the input's dim; one read from Shape(u)[j] is dim j of u; a known one equal to
        # the input's dim keeps it.
        target, dx = sym_value(ins[1]), dims_of(ins[0])
        allowzero = p.attributes["allowzero"].as_int() if "allowzero" in p.attributes else 0
        found = []
        t = target[axis] if target is not None and len(target) == rank else None
        if isinstance(t, int) and t == 0 and not allowzero or \
                _known(t) and dx is not None and axis < len(dx) and t == dx[axis]:
            found.append((ins[0], axis))
        src = shape_source(ins[1], axis)
        if src is not None and not (allowzero and t == 0):
            found.append(src)
        return found
    if p.domain == "" and p.op_type in _BINARY and len(ins) == 2:
        (a, da), (b, db) = ((x, dims_of(x)) for x in ins)
        if da is None or db is None:
            return []
        ia, ib = axis - (rank - len(da)), axis - (rank - len(db))
        for x, ix, y, iy, dy in ((a, ia, b, ib, db), (b, ib, a, ia, da)):  # the other has no such dim, or 1
            if ix >= 0 and (iy < 0 or dy[iy] == 1):
                return [(x, ix)]
        for x, ix, y, iy in ((a, ia, b, ib), (b, ib, a, ia)):
            if ix >= 0 and iy >= 0 and depth > 0 and is_one(y, iy, depth - 1, memo):
                return [(x, ix)]
        if ia >= 0 and ib >= 0 and depth > 0 and same_dim(a, ia, b, ib, depth - 1, memo):
            return [(a, ia), (b, ib)]
    return []


def _known(d) -> bool:
    return isinstance(d, str) or isinstance(d, int) and d >= 0


def _dim_chain(v: ir.Value, axis: int, depth: int, memo: dict) -> tuple[set, set]:
    """Every (value, axis) whose size provably equals dim `axis` of v, searching producers back, and their known
    dims (ints and symbol names)."""
    key = (id(v), axis, depth)
    if key not in memo:
        memo[key] = (set(), set())   # a cycle back here proves nothing
        places, labels, todo = set(), set(), [(v, axis)]
        alive = memo.setdefault(_ALIVE, [])
        alive.append(v)
        while todo and len(places) < _CHAIN_PLACES:
            u, j = todo.pop(0)
            if (id(u), j) in places:
                continue
            places.add((id(u), j))
            alive.append(u)     # ids in the memo must not be reused by new values while it lives
            d = dims_of(u)
            if d is not None and j < len(d) and _known(d[j]):
                labels.add(d[j])
            todo.extend(_dim_inputs(u, j, depth, memo))
        memo[key] = (places, labels)
    return memo[key]


def dims_equal(a, b) -> bool:
    """Dims (int, symbol name or Unknown) provably equal by name; an Unknown equals only itself."""
    if isinstance(a, Unknown) or isinstance(b, Unknown):
        return a is b
    return a is not None and a == b


def element_is_dim(target: ir.Value, i: int, t, x: ir.Value, axis: int, memo: dict | None = None) -> bool:
    """Element i of the shape vector `target` (symbolically t) is dim `axis` of x: the same int or name, or read
    from a dim proved equal (shape_source, same_dim)."""
    if dims_equal(t, dims_of(x)[axis]):
        return True
    src = shape_source(target, i)
    return src is not None and same_dim(src[0], src[1], x, axis, memo={} if memo is None else memo)


def is_one(v: ir.Value, i: int, depth: int = 3, memo: dict | None = None) -> bool:
    """Dim i of v is provably 1 (its producer chain reaches a static 1)."""
    d = dims_of(v)
    if d is not None and 0 <= i < len(d) and isinstance(d[i], int):
        return d[i] == 1
    return 1 in _dim_chain(v, i, depth, {} if memo is None else memo)[1]


def dim_inputs(v: ir.Value, axis: int, depth: int = 3, memo: dict | None = None) -> list[tuple[ir.Value, int]]:
    """Every (u, j), one producer back, such that dim `axis` of v provably has the size of dim j of u. `memo` may
    be shared by many calls while the graph only changes in ways that keep every dim's size (fold-shapes)."""
    return _dim_inputs(v, axis, depth, {} if memo is None else memo)


def same_dim(a: ir.Value, ia: int, b: ir.Value, ib: int, depth: int = 3, memo: dict | None = None) -> bool:
    """Dim ia of a and dim ib of b provably have the same size: their producer chains meet or share a named dim."""
    memo = {} if memo is None else memo
    (pa, la), (pb, lb) = _dim_chain(a, ia, depth, memo), _dim_chain(b, ib, depth, memo)
    return bool(pa & pb or la & lb)


# ---------------------------------------------------------------------------------------------------- derived dims
def _small_ints(v: ir.Value | None) -> list[int] | None:
    a = const_array(v, 8)
    return None if a is None else [int(x) for x in a.reshape(-1)]


def _perm_of(n: ir.Node) -> list[int] | None:
    p = attr_value(n, "perm")
    return list(p) if p is not None else None


_DERIVED_ELEMENTWISE = frozenset({"Add", "Mul", "Sub", "Div", "Cast", "Neg", "Pow", "Sqrt", "Reciprocal", "Where", "Sigmoid",
                          "SimplifiedLayerNormalization", "LayerNormalization", "Tanh", "Erf"})


def derived_dims(v: ir.Value | None, depth: int = 10) -> tuple | None:
    """dims_of(v), with static sizes filled in from the producer: a Reshape's target, Expand's shape, broadcasting
    elementwise ops, Slice/Concat off their axes, Transpose, Gather (fusions read head counts and sizes this way
    where inference left them symbolic)."""
    d = dims_of(v)
    n = v.producer() if v is not None and depth > 0 else None
    derived = None
    if n is not None and n.domain == "":
        if n.op_type == "Reshape":
            t = sym_value(n.inputs[1])
            dx = reshape_input_dims(n.inputs[0], n.inputs[1], derived_dims(n.inputs[0], depth - 1)) if t is not None else None
            derived = reshape_target(dx or (), t) if t is not None else None
            derived = derived if derived is not None else t
        elif n.op_type == "Expand":
            derived = sym_value(n.inputs[1])
        elif n.op_type in _DERIVED_ELEMENTWISE:
            derived = None      # numpy broadcasting: right-aligned, missing leading dims are 1
            ins = [dx for x in n.inputs if x is not None and (dx := derived_dims(x, depth - 1)) is not None]
            rank = len(d) if d is not None else max((len(dx) for dx in ins), default=0)
            for dx in ins:
                if len(dx) > rank:
                    continue
                dx = (1,) * (rank - len(dx)) + tuple(dx)
                derived = dx if derived is None else tuple(
                    a if isinstance(a, int) and a != 1 else (b if b != 1 else a) for a, b in zip(derived, dx))
        elif n.op_type == "Slice" and len(n.inputs) > 3 and _small_ints(n.inputs[3]) is not None:
            dx = derived_dims(n.inputs[0], depth - 1)
            if dx is not None:
                axes = {a % len(dx) for a in _small_ints(n.inputs[3])}
                derived = tuple((d[i] if d is not None else "?") if i in axes else x for i, x in enumerate(dx))
        elif n.op_type == "Concat" and len(n.inputs) >= 1:
            dx = derived_dims(n.inputs[0], depth - 1)
            ax = attr_value(n, "axis")
            if dx is not None and ax is not None:
                ax = ax % len(dx)
                derived = tuple(x if i != ax else d[i] if d is not None else "?" for i, x in enumerate(dx))
        elif n.op_type == "Transpose" and (p := _perm_of(n)) is not None:
            di = derived_dims(n.inputs[0], depth - 1)
            derived = tuple(di[i] for i in p) if di is not None and len(di) == len(p) else None
        elif n.op_type == "Gather" and len(n.inputs) == 2:
            dx, di = derived_dims(n.inputs[0], depth - 1), dims_of(n.inputs[1])
            ax = attr_value(n, "axis", default=0)
            if dx is not None and di is not None and -len(dx) <= ax < len(dx):
                ax %= len(dx)
                derived = tuple(dx[:ax]) + tuple(di) + tuple(dx[ax + 1:])
    if derived is None or (d is not None and len(d) != len(derived)):
        return d
    if d is None:
        return tuple(derived)
    return tuple(b if (isinstance(b, int) and b >= 0) or (isinstance(b, str) and not isinstance(a, int)) else a
                 for a, b in zip(d, derived))
