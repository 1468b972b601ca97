"""expand-standard-ops: ONNX opset-23 RMSNormalization, RotaryEmbedding and Attention -> the forms the fusions read

    RMSNormalization(x, w, axis=-1, eps)      ->  SimplifiedLayerNormalization(x, w, axis=-1, epsilon=eps)   rms-norm
        (w 1-D of the static last dim, stash_type=1); otherwise the spec's body:
        Cast(x' / Sqrt(ReduceMean(x' * x', axes=[axis..-1]) + eps), T) * w,  x' = Cast(x, float) if stash_type=1
    RotaryEmbedding(x, cos, sin, pos?)        ->  x_r * C + rotate_half(x_r) * S  (++ x[..., r:] when partial)  rotary
        with c = cos[pos] (or cos), C = Concat(c, c, -1) unsqueezed on the head axis (same for S), rotate_half(x)
        = Concat(-x[..., r/2:r], x[..., :r/2]); real = c*x1 - s*x2, imag = s*x1 + c*x2 is the same sum term by term.
        A 3-D input (B, S, N*H) is viewed as (B, S, N, H) and reshaped back.
    Attention(Q, K, V, M?, past_k?, past_v?)  ->  Y = P @ rep(V'),                                           attention
        K' = Concat(past_k, K, 2), V' likewise (present_key/value := K', V')
        P = guard(Softmax(mask(cap(s * Q @ Transpose(rep(K'), [0,1,3,2])))))
        rep(t) = Reshape(Expand(Unsqueeze(t, 2), (B, KV, N/KV, T, H)), (B, N, T, H))   (only when KV < N)
        cap(x) = c * Tanh(x / c) (softcap c > 0); mask: bool M -> Where(M, x, -inf), float M -> x + M;
        is_causal -> Where(j <= i + past_len, ., -inf), composed with M (And for bool); s = scale or 1/sqrt(H);
        guard(p) = Where(IsNaN(p), 0, p) when a mask is given: the spec (and ORT) give a zero row where every key is
        masked; softmax_precision -> Casts around the Softmax. 3-D Q/K/V (B, S, N*H) are split into heads
        (Transpose(Reshape(t, (0, 0, N, -1)), [0,2,1,3])) and Y is merged back.

Every expansion is exact (checked against onnxruntime's own kernels of the standard ops): the pass may run at any
level; a site the fusions after it refuse stays expanded (ORT runs the primitive chain; see the tests for timings).
Refusals (a note each, the op left as is): interleaved rotary; unknown head size where a scale or rotary width needs
it; a used qk_matmul_output; a GQA head repeat with unknown head counts; RMSNormalization over a non-static axis.
fuse-gqa reads: Softmax -> [IsNaN guard] -> MatMul(P, V), Where/Add mask, Mul scale, Transpose(K, [0,1,3,2]), the
Unsqueeze/Expand/Reshape repeat, Concat(past, new, axis=2) and x*cos + rotate_half(x)*sin with one cos/sin value
shared by Q and K (the expanded tables are built once per (cos, sin, position_ids)).
Each expanded site is recorded for contract-standard-ops: built nodes and initializers carry meta[MARK], and each
value that took an original output's readers carries meta[SITE] = Site(original node, its inputs, those values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxc.coverage import Refusal
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import attr_value, replace_value
from onnxc.shapes import SYM_KEY, dims_of


MARK = "expand-standard-ops"          # node/initializer meta: created by the expansion
SITE = "expand-standard-ops/site"     # value meta on each value that took an original output's uses: its Site


@dataclass(eq=False)
class Site:
    """One expanded op: the original node (detached; op, name, attributes) and its inputs as they were, and for each
    original output the value that took its uses (None where the output was unused). contract-standard-ops reads it."""
    node: ir.Node
    inputs: list[ir.Value | None]
    outputs: list[ir.Value | None]
    rule: str


class _Builder:
    """Nodes inserted before one anchor node, with names under the pass's prefix (each marked in its meta)."""

    def __init__(self, graph: ir.Graph):
        self.graph, self.count, self.anchor, self.replaced = graph, 0, None, {}

    def name(self, stem: str) -> str:
        self.count += 1
        return f"expand-standard-ops/{stem}_{self.count}"

    def const(self, arr: np.ndarray, stem: str = "const") -> ir.Value:
        arr = np.asarray(arr)
        v = ir.Value(name=self.name(stem), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     shape=ir.Shape(arr.shape), const_value=ir.tensor(arr))
        v.meta[MARK] = True
        self.graph.register_initializer(v)
        return v

    def ints(self, *xs: int) -> ir.Value:
        return self.const(np.array(xs, dtype=np.int64), "ints")

    def __call__(self, op: str, *inputs: ir.Value | None, dtype: ir.DataType | None = None,
                 shape: tuple | None = None, n_out: int = 1, **attrs) -> ir.Value:
        node = ir.node(op, list(inputs), attributes=attrs, num_outputs=n_out, name=self.name(op))
        node.meta[MARK] = True
        for o in node.outputs:
            o.name = self.name(f"{op}_out")
        if dtype is not None:
            node.outputs[0].dtype = dtype
        if shape is not None:
            node.outputs[0].shape = ir.Shape([d if isinstance(d, (int, str)) else None for d in shape])
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def replace(self, old: ir.Value, new: ir.Value) -> None:
        self.replaced[id(old)] = new
        replace_value(old, new)


def _used(v: ir.Value | None) -> bool:
    return v is not None and (bool(v.uses()) or v.is_graph_output())


def _np(dt: ir.DataType) -> np.dtype:
    return np.dtype(dt.numpy())


# ---------------------------------------------------------------------------------------------------- RMSNormalization
def _rms_norm(b: _Builder, n: ir.Node, opset: int) -> None:
    x, w = n.inputs[0], n.inputs[1]
    d = dims_of(x)
    axis, eps = int(attr_value(n, "axis", opset, -1)), float(attr_value(n, "epsilon", opset, 1e-5))
    stash = int(attr_value(n, "stash_type", opset, 1))
    if d is None or x.dtype is None:
        raise Refusal("the input's rank or dtype is unknown")
    axis %= len(d)
    wd = dims_of(w)
    last = d[-1]
    if axis == len(d) - 1 and wd is not None and len(wd) == 1 and isinstance(last, int) and wd[0] == last \
            and (stash == 1 or x.dtype == ir.DataType.FLOAT):
        y = b("SimplifiedLayerNormalization", x, w, dtype=n.outputs[0].dtype, axis=-1, epsilon=eps, stash_type=1)
    else:
        xs = b("Cast", x, to=ir.DataType.FLOAT, dtype=ir.DataType.FLOAT) \
            if stash == 1 and x.dtype != ir.DataType.FLOAT else x
        ms = b("ReduceMean", b("Mul", xs, xs, dtype=xs.dtype), b.ints(*range(axis, len(d))), keepdims=1,
               dtype=xs.dtype)
        rms = b("Sqrt", b("Add", ms, b.const(np.array(eps, _np(xs.dtype)), "eps"), dtype=xs.dtype), dtype=xs.dtype)
        norm = b("Div", xs, rms, dtype=xs.dtype)
        if norm.dtype != x.dtype:
            norm = b("Cast", norm, to=x.dtype, dtype=x.dtype)
        y = b("Mul", norm, w, dtype=n.outputs[0].dtype)
    b.replace(n.outputs[0], y)


# ---------------------------------------------------------------------------------------------------- RotaryEmbedding
def _tables(b: _Builder, n: ir.Node, head_axis: int, cache: dict) -> tuple[ir.Value, ir.Value]:
    """(C, S): cos/sin (gathered by position ids) doubled along the last axis, unsqueezed at the head axis."""
    cos, sin = n.inputs[1], n.inputs[2]
    pos = n.inputs[3] if len(n.inputs) > 3 else None
    key = (id(cos), id(sin), id(pos), head_axis)
    if key not in cache:
        out = []
        for t in (cos, sin):
            if pos is not None:
                t = b("Gather", t, pos, axis=0, dtype=t.dtype)
            t = b("Concat", t, t, axis=-1, dtype=t.dtype)
            out.append(b("Unsqueeze", t, b.ints(head_axis), dtype=t.dtype))
        cache[key] = tuple(out)
    return cache[key]


def _rotary(b: _Builder, n: ir.Node, opset: int, cache: dict) -> None:
    x = n.inputs[0]
    if int(attr_value(n, "interleaved", opset, 0)):
        raise Refusal("interleaved rotary is not expanded (no fusion reads its expansion)")
    d = dims_of(x)
    if d is None or len(d) not in (3, 4) or x.dtype is None:
        raise Refusal("the input is not 3-D or 4-D with a known dtype")
    dt = x.dtype
    if len(d) == 3:
        heads = int(attr_value(n, "num_heads", opset, 0) or 0)
        if not heads or not isinstance(d[2], int) or d[2] % heads:
            raise Refusal("a 3-D input needs num_heads dividing a static hidden size")
        head = d[2] // heads
        x4 = b("Reshape", x, b.ints(0, 0, heads, head), dtype=dt, shape=(d[0], d[1], heads, head))
        head_axis = 2
    else:
        head, x4, head_axis = d[3], x, 1
    rot = int(attr_value(n, "rotary_embedding_dim", opset, 0) or 0) or head
    if not isinstance(head, int) or rot % 2 or rot > head:
        raise Refusal("the head size is not static, or the rotary width is odd or larger than it")
    c, s = _tables(b, n, head_axis, cache)
    xr = b("Slice", x4, b.ints(0), b.ints(rot), b.ints(-1), dtype=dt) if rot < head else x4
    h = rot // 2
    hi = b("Slice", xr, b.ints(h), b.ints(rot), b.ints(-1), dtype=dt)
    lo = b("Slice", xr, b.ints(0), b.ints(h), b.ints(-1), dtype=dt)
    half = b("Concat", b("Neg", hi, dtype=dt), lo, axis=-1, dtype=dt)
    y = b("Add", b("Mul", xr, c, dtype=dt), b("Mul", half, s, dtype=dt), dtype=dt)
    if rot < head:
        y = b("Concat", y, b("Slice", x4, b.ints(rot), b.ints(head), b.ints(-1), dtype=dt), axis=-1, dtype=dt)
    if len(d) == 3:
        y = b("Reshape", y, b.ints(0, 0, -1), dtype=dt, shape=d)
    b.replace(n.outputs[0], y)


# ---------------------------------------------------------------------------------------------------- Attention
def _shape_vec(b: _Builder, v: ir.Value, parts: list, sym: tuple) -> ir.Value:
    """Concat of Shape(v) slices ((start, end) pairs) and int lists; its symbolic contents recorded for the fusions."""
    pieces = [b("Shape", v, start=p[0], end=p[1], dtype=ir.DataType.INT64) if isinstance(p, tuple) else b.ints(*p)
              for p in parts]
    out = b("Concat", *pieces, axis=0, dtype=ir.DataType.INT64, shape=(len(sym),))
    out.meta[SYM_KEY] = tuple(sym)
    return out


def _repeat(b: _Builder, t: ir.Value, rep: int, heads: int) -> ir.Value:
    """(B, KV, T, H) -> (B, KV*rep, T, H), each KV head repeated rep times in place (head h reads KV head h // rep)."""
    d = dims_of(t)
    u = b("Unsqueeze", t, b.ints(2), dtype=t.dtype, shape=(d[0], d[1], 1, d[2], d[3]))
    e = b("Expand", u, _shape_vec(b, t, [(0, 2), [rep], (2, 4)], (d[0], d[1], rep, d[2], d[3])),
          dtype=t.dtype, shape=(d[0], d[1], rep, d[2], d[3]))
    return b("Reshape", e, _shape_vec(b, t, [(0, 1), [heads], (2, 4)], (d[0], heads, d[2], d[3])),
             dtype=t.dtype, shape=(d[0], heads, d[2], d[3]))


def _split_heads(b: _Builder, t: ir.Value, heads: int) -> ir.Value:
    d = dims_of(t)
    h = d[2] // heads if isinstance(d[2], int) else None
    r = b("Reshape", t, b.ints(0, 0, heads, -1), dtype=t.dtype, shape=(d[0], d[1], heads, h))
    return b("Transpose", r, perm=[0, 2, 1, 3], dtype=t.dtype, shape=(d[0], heads, d[1], h))


def _attention(b: _Builder, n: ir.Node, opset: int) -> None:
    ins = list(n.inputs) + [None] * (6 - len(n.inputs))
    q, k, v, mask, past_k, past_v = ins[:6]
    if len(n.inputs) > 6 and any(i is not None for i in n.inputs[6:]):
        raise Refusal("inputs beyond past_value are not expanded")
    if len(n.outputs) > 3 and _used(n.outputs[3]):
        raise Refusal("qk_matmul_output is used")
    if (past_k is None) != (past_v is None):
        raise Refusal("only one of past_key and past_value is given")
    dq, dk, dv = dims_of(q), dims_of(k), dims_of(v)
    if dq is None or dk is None or dv is None or q.dtype is None or len(dq) != len(dk) or len(dq) != len(dv) \
            or len(dq) not in (3, 4):
        raise Refusal("Q, K and V are not all 3-D or all 4-D with known dtypes")
    dt = q.dtype
    three_d = len(dq) == 3
    if three_d:
        nq, nkv = (int(attr_value(n, a, opset, 0) or 0) for a in ("q_num_heads", "kv_num_heads"))
        if not nq or not nkv or not isinstance(dq[2], int) or dq[2] % nq:
            raise Refusal("3-D inputs need q_num_heads/kv_num_heads dividing a static hidden size")
        q, k, v = _split_heads(b, q, nq), _split_heads(b, k, nkv), _split_heads(b, v, nkv)
        dq, dk, dv = dims_of(q), dims_of(k), dims_of(v)
    nq, nkv, head = dq[1], dk[1], dq[3]
    scale = attr_value(n, "scale", opset)
    if scale is None:
        if not isinstance(head, int):
            raise Refusal("no scale and the head size is not static")
        scale = 1.0 / math.sqrt(head)
    if past_k is not None:
        k = b("Concat", past_k, k, axis=2, dtype=k.dtype)
        v = b("Concat", past_v, v, axis=2, dtype=v.dtype)
        for out, new, d in ((1, k, dk), (2, v, dv)):
            given = n.outputs[out].shape if len(n.outputs) > out else None
            new.shape = given if given is not None else ir.Shape([d[0], d[1], None, d[3]])
    present = (k, v)
    if nq != nkv:
        if not (isinstance(nq, int) and isinstance(nkv, int)) or nq % nkv:
            raise Refusal("query and KV head counts are not static multiples")
        k, v = _repeat(b, k, nq // nkv, nq), _repeat(b, v, nq // nkv, nq)
    kt = b("Transpose", k, perm=[0, 1, 3, 2], dtype=dt)
    s = b("Mul", b("MatMul", q, kt, dtype=dt), b.const(np.array(scale, _np(dt)), "scale"), dtype=dt)
    cap = float(attr_value(n, "softcap", opset, 0.0) or 0.0)
    if cap > 0:
        c = b.const(np.array(cap, _np(dt)), "softcap")
        s = b("Mul", b("Tanh", b("Div", s, c, dtype=dt), dtype=dt), c, dtype=dt)
    keep = None
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        keep = mask
    elif mask is not None:
        s = b("Add", s, mask, dtype=dt)
    if int(attr_value(n, "is_causal", opset, 0)):
        i = b("Range", b.const(np.array(0, np.int64)), b("Squeeze", b("Shape", q, start=2, end=3), b.ints(0)),
              b.const(np.array(1, np.int64)), dtype=ir.DataType.INT64)
        if past_k is not None:
            i = b("Add", i, b("Squeeze", b("Shape", past_k, start=2, end=3), b.ints(0)), dtype=ir.DataType.INT64)
        j = b("Range", b.const(np.array(0, np.int64)), b("Squeeze", b("Shape", k, start=2, end=3), b.ints(0)),
              b.const(np.array(1, np.int64)), dtype=ir.DataType.INT64)
        causal = b("LessOrEqual", b("Unsqueeze", j, b.ints(0)), b("Unsqueeze", i, b.ints(1)), dtype=ir.DataType.BOOL)
        keep = causal if keep is None else b("And", keep, causal, dtype=ir.DataType.BOOL)
    if keep is not None:
        s = b("Where", keep, s, b.const(np.array(-np.inf, _np(dt)), "neg_inf"), dtype=dt)
    precision = attr_value(n, "softmax_precision", opset)
    sdt = ir.DataType(int(precision)) if precision else dt
    if sdt != dt:
        s = b("Cast", s, to=sdt, dtype=sdt)
    p = b("Softmax", s, axis=-1, dtype=sdt)
    if sdt != dt:
        p = b("Cast", p, to=dt, dtype=dt)
    if mask is not None:
        p = b("Where", b("IsNaN", p, dtype=ir.DataType.BOOL), b.const(np.array(0, _np(dt)), "zero"), p, dtype=dt)
    y = b("MatMul", p, v, dtype=dt)
    if three_d:
        dy = dims_of(n.outputs[0]) or (None, None, None)
        y = b("Reshape", b("Transpose", y, perm=[0, 2, 1, 3], dtype=dt), b.ints(0, 0, -1), dtype=dt, shape=dy)
    b.replace(n.outputs[0], y)
    for i, new in ((1, present[0]), (2, present[1])):
        if len(n.outputs) > i and _used(n.outputs[i]):
            if past_k is None:
                raise Refusal("present_key/value without past")   # pragma: no cover - checked before building
            b.replace(n.outputs[i], new)


# ---------------------------------------------------------------------------------------------------- the pass
def _precheck(n: ir.Node) -> None:
    """Refusals that must happen before any node is built."""
    if n.op_type == "Attention":
        past = len(n.inputs) > 4 and n.inputs[4] is not None
        if not past and any(_used(o) for o in n.outputs[1:3]):
            raise Refusal("present_key/value are used without past inputs")


_EXPANDERS = {"RMSNormalization": ("rms-norm", _rms_norm), "RotaryEmbedding": ("rotary", _rotary),
              "Attention": ("attention", _attention)}


@register_pass
class ExpandStandardOps(Pass):
    """ONNX RMSNormalization / RotaryEmbedding / Attention (opset 23) -> the primitive forms the fusions read."""

    name = "expand-standard-ops"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        counts: dict[str, int] = {}
        cache: dict = {}
        b = _Builder(graph)
        for n in [n for n in graph if n.domain == "" and n.op_type in _EXPANDERS]:
            rule, expand = _EXPANDERS[n.op_type]
            b.anchor, b.replaced = n, {}
            start, inits, keys = {id(x) for x in graph}, set(graph.initializers), set(cache)
            try:
                _precheck(n)
                expand(b, n, opset, cache) if n.op_type == "RotaryEmbedding" else expand(b, n, opset)
            except Refusal as exc:                 # undo a partial build: nothing was replaced yet
                graph.remove([x for x in graph if id(x) not in start], safe=False)
                for name in set(graph.initializers) - inits:
                    graph.initializers.pop(name)
                for key in set(cache) - keys:
                    del cache[key]
                ctx.notes.append(f"expand-standard-ops: {n.op_type} '{n.name}' not expanded: {exc}")
                continue
            site = Site(n, list(n.inputs), [b.replaced.get(id(o)) for o in n.outputs], rule)
            for v in site.outputs:
                if v is not None:
                    v.meta[SITE] = site
            if not any(_used(o) for o in n.outputs):
                graph.remove(n, safe=True)
            counts[f"expand-standard-ops/{rule}"] = counts.get(f"expand-standard-ops/{rule}", 0) + 1
        if counts:
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        return PassResult(model, bool(counts), counts)
