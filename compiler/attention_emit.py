"""Writing an attention site's operands the way the contrib attention ops take them: (B, S, N*H) views of Q, K and V
read from a parsed site (compiler/attention_core.py), with per-head norms re-applied on the BSNH view and, where the
op does not rotate, the rotated values."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.attention_core import Site, prod
from onnxc.ir import GraphWriter
from onnxc.shapes import derived_dims as _dims


def _flat(b: GraphWriter, x4: ir.Value, anchor: ir.Node) -> ir.Value:
    """(B, S, N, H) -> (B, S, N*H): reuse the Reshape source when x4 is a Reshape of a 3-D value."""
    r = prod(x4, "Reshape")
    dx = _dims(x4)
    d = _dims(r.inputs[0]) if r is not None else None
    if d is not None and len(d) == 3 and isinstance(d[2], int) and d[2] == dx[2] * dx[3] and d[:2] == dx[:2]:
        return r.inputs[0]
    shape = b.const(np.array([0, 0, -1], dtype=np.int64), "flat_shape")
    out = b.node("Reshape", [x4, shape], anchor).outputs[0]
    out.dtype = x4.dtype
    out.shape = ir.Shape([dx[0], dx[1], dx[2] * dx[3]])
    return out


def _renorm(b: GraphWriter, x4: ir.Value, norm: ir.Node | None, anchor: ir.Node) -> ir.Value:
    """Norm(x4) on the BSNH view: the same last-axis norm, weights and attributes, before the head transpose."""
    if norm is None:
        return x4
    out = b.node(norm.op_type, [x4, *norm.inputs[1:]], anchor,
                 **{k: a.value for k, a in norm.attributes.items()}).outputs[0]
    out.dtype, out.shape = norm.outputs[0].dtype or x4.dtype, x4.shape
    return out


def _bnsh_to_flat(b: GraphWriter, x: ir.Value, anchor: ir.Node, dtype: ir.DataType) -> ir.Value:
    t = b.node("Transpose", [x], anchor, perm=[0, 2, 1, 3]).outputs[0]
    t.dtype = x.dtype or dtype
    dx = _dims(x)
    t.shape = ir.Shape([dx[0], dx[2], dx[1], dx[3]])
    return _flat(b, t, anchor)



def flat_qkv(b: GraphWriter, site: Site, rotated: bool) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(B, S, N*H) q, k, v. rotated=False: Q and K before the rotary (the op rotates them itself), with their
    per-head norms; rotated=True: as the scores read them (rotated, normed), when the site has a rotary."""
    anchor = site.anchor
    if not rotated or site.rotary is None:
        q, k = (_flat(b, _renorm(b, x4, nm, anchor), anchor)
                for x4, nm in ((site.q, site.q_norm), (site.k, site.k_norm)))
    elif site.rotated4 is not None:
        q, k = (_flat(b, x, anchor) for x in site.rotated4)
    else:
        q, k = (_bnsh_to_flat(b, x, anchor, site.v.dtype) for x in (site.q_rot, site.k_rot))
    v = _flat(b, site.v, anchor)
    return _cast_to(b, q, v.dtype, anchor), _cast_to(b, k, v.dtype, anchor), v


def _cast_to(b: GraphWriter, x: ir.Value, dtype: ir.DataType | None, anchor: ir.Node) -> ir.Value:
    """x in `dtype`: a rotary computed in float32 and cast back (the site reader looks through that Cast) is read
    before the Cast, so the Cast is written again here, on the flat view (the same rounding, one op)."""
    if dtype is None or x.dtype is None or x.dtype == dtype:
        return x
    out = b.node("Cast", [x], anchor, to=dtype).outputs[0]
    out.dtype, out.shape = dtype, x.shape
    return out
