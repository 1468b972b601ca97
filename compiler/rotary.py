"""Rotary position embeddings as the exporters write them, and proofs of what a subgraph rotates.

    rotary(x) = x * cos + rotate_half(x) * sin                     rotate_half(x) = Concat(-x[..., h:], x[..., :h])
    interleaved: rotate_every_two(x)[2i] = -x[2i+1], [2i+1] = x[2i]   (GPT-J)
    partial:     Concat(rotary(x[..., :r]), x[..., r:])

`parse_rotary` reads the canonical structure (Slice/Neg/Concat rotate_half, the Unsqueeze/Concat/Reshape
rotate_every_two). `proved_rotation` proves by evaluation that a value computes one of the two rotations of
another, whatever ops compute it; canonicalize-rotary uses it to bring every other form to the canonical one, so
fusions read only that.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from . import probe
from .rules import attr_value, const_array
from .shapes import derived_dims as _dims


def _prod(v: ir.Value | None, *ops: str) -> ir.Node | None:
    n = v.producer() if v is not None else None
    return n if n is not None and n.op_type in ops and n.domain == "" else None


def _ints(v: ir.Value | None) -> list[int] | None:
    a = const_array(v, 8)
    return None if a is None else [int(x) for x in a.reshape(-1)]


@dataclass
class Rotary:
    x: ir.Value          # the BNSH tensor before rotation
    cos: ir.Value
    sin: ir.Value
    dim: int             # rotated channels
    interleaved: bool = False
    bsnh: bool = False   # applied to the (B, S, N, H) view before the head transpose (cos/sin (B, S, 1, dim))


def slice_last(v: ir.Value, step: int = 1) -> tuple[ir.Value, int, int] | None:
    """Slice(x, start, end, axes=[-1], steps=[step]) -> (x, start, end) with end clipped to the last dim."""
    n = _prod(v, "Slice")
    if n is None or len(n.inputs) < 3:
        return None
    starts, ends = _ints(n.inputs[1]), _ints(n.inputs[2])
    axes = _ints(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else None
    steps = _ints(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else [1]
    d = _dims(n.inputs[0])
    if starts is None or ends is None or d is None or not isinstance(d[-1], int) or steps != [step]:
        return None
    if axes not in ([-1], [len(d) - 1]) or len(starts) != 1:
        return None
    last = d[-1]
    s, e = starts[0], ends[0]
    s, e = (s + last if s < 0 else s), (e + last if e < 0 else min(e, last))
    return n.inputs[0], s, e


def rotate_half_of(v: ir.Value) -> ir.Value | None:
    """Concat(Neg(x[..., h:]), x[..., :h], axis=-1) -> x."""
    c = _prod(v, "Concat")
    if c is None or len(c.inputs) != 2 or attr_value(c, "axis") not in (-1, 3):
        return None
    neg = _prod(c.inputs[0], "Neg")
    hi = slice_last(neg.inputs[0]) if neg else None
    lo = slice_last(c.inputs[1])
    if hi is None or lo is None or hi[0] is not lo[0]:
        return None
    d = _dims(lo[0])
    h = d[-1] // 2
    return lo[0] if (lo[1], lo[2], hi[1], hi[2]) == (0, h, h, d[-1]) else None


def _last_axis(v: ir.Value, axes: list[int] | None) -> bool:
    d = _dims(v)
    return axes is not None and len(axes) == 1 and d is not None and axes[0] in (-1, len(d) - 1)


def rotate_every_two_of(v: ir.Value) -> ir.Value | None:
    """Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1), Unsqueeze(x[..., 0::2], -1), axis=-1), x.shape) -> x:
    out[2i] = -x[2i+1], out[2i+1] = x[2i] (GPT-J's rotate_every_two, the interleaved layout)."""
    r = _prod(v, "Reshape")
    c = _prod(r.inputs[0], "Concat") if r else None
    if c is None or len(c.inputs) != 2 or not _last_axis(c.outputs[0], [attr_value(c, "axis")]):
        return None
    us = [_prod(i, "Unsqueeze") for i in c.inputs]
    if any(u is None or len(u.inputs) < 2 or not _last_axis(u.outputs[0], _ints(u.inputs[1])) for u in us):
        return None
    neg = _prod(us[0].inputs[0], "Neg")
    odd = slice_last(neg.inputs[0], 2) if neg else None
    even = slice_last(us[1].inputs[0], 2)
    if odd is None or even is None or odd[0] is not even[0] or (odd[1], even[1]) != (1, 0):
        return None
    x = even[0]
    dx, dv, dc = _dims(x), _dims(v), _dims(c.outputs[0])
    # the stack (..., d/2, 2) is flattened back to (..., d): equal leading dims leave d for the last one
    ok = dx is not None and dv is not None and dc is not None and isinstance(dx[-1], int) and dx[-1] % 2 == 0 \
        and len(dx) == len(dv) and tuple(dv[:-1]) == tuple(dx[:-1]) and (dv[-1] == dx[-1] or isinstance(dv[-1], str)) \
        and tuple(dc) == tuple(dx[:-1]) + (dx[-1] // 2, 2) and min(odd[2], even[2]) >= dx[-1] - 1
    return x if ok else None


def proved_rotation(r: ir.Value, x: ir.Value) -> str | None:
    """"half" when r = rotate_half(x) = Concat(-x[..., h:], x[..., :h]), "interleaved" when r = rotate_every_two(x),
    proved by evaluating r's cone from x on random data (the exporters write these with Slice, Split, Gather,
    Reshape/Unsqueeze stacks and more; what they compute is what matters). r must read x alone (and constants)."""
    d = _dims(x)
    node = r.producer()
    if d is None or not d or not isinstance(d[-1], int) or d[-1] % 2 or node is None or node.graph is None:
        return None
    try:
        c = probe.cone(node.graph, [r], max_nodes=40, stop=[x])
        if [v.name for v in c.inputs] != [x.name] or c.data_bytes > 1 << 17:     # a (128, 128) rotation matrix
            return None
        shape = [k if isinstance(k, int) else (2, 3, 5, 7)[i % 4] for i, k in enumerate(d)]
        arr = np.random.default_rng(0).standard_normal(shape).astype(x.dtype.numpy() if x.dtype else np.float32)
        got, = probe.evaluate(node.graph, [r], {x.name: arr}, max_nodes=40, stop=[x])
    except (probe.ProbeError, TypeError, ValueError):
        return None
    h = d[-1] // 2
    half = np.concatenate([-arr[..., h:], arr[..., :h]], axis=-1)
    pairs = np.stack([-arr[..., 1::2], arr[..., 0::2]], axis=-1).reshape(arr.shape)
    if got.shape == half.shape and np.array_equal(got, half):
        return "half"
    if got.shape == pairs.shape and np.array_equal(got, pairs):
        return "interleaved"
    return None


def readings(add: ir.Node):
    """Every way to read Add(Mul, Mul) as x * cos + r * sin: (the Mul reading r, r's input index there, x, cos, r,
    sin), either operand order of the Add and of each Mul."""
    for m1, m2 in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        p, q = _prod(m1, "Mul"), _prod(m2, "Mul")
        if p is None or q is None:
            continue
        for x, cos in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
            for k in (0, 1):
                yield q, k, x, cos, q.inputs[k], q.inputs[1 - k]


def parse_rotary(v: ir.Value) -> Rotary | None:
    """x*cos + rotate_half(x)*sin (any operand order), or Concat(that over x[..., :r], x[..., r:]) for partial,
    with rotate_half in its canonical structure (canonicalize-rotary brings other forms there)."""
    c = _prod(v, "Concat")
    if c is not None and len(c.inputs) == 2 and attr_value(c, "axis") in (-1, 3):
        rest = slice_last(c.inputs[1])
        inner = parse_rotary(c.inputs[0])
        if rest is not None and inner is not None:
            if inner.x is rest[0] and rest[1] == rest[2] == _dims(rest[0])[-1]:
                return inner            # Concat(rotary(x), x[..., d:]): the pass-through part is empty
            head = slice_last(inner.x)
            if head is not None and head[0] is rest[0] and head[1:] == (0, rest[1]) \
                    and rest[2] == _dims(rest[0])[-1]:
                return Rotary(rest[0], inner.cos, inner.sin, inner.dim, inner.interleaved)
        return None
    a = _prod(v, "Add")
    if a is None:
        return None
    for _, _, x, cos, r, sin in readings(a):
        if rotate_half_of(r) is x:
            return Rotary(x, cos, sin, _dims(x)[-1])
        if rotate_every_two_of(r) is x:
            return Rotary(x, cos, sin, _dims(x)[-1], interleaved=True)
    return None
