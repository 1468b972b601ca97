"""The attention core of a causal decoder, read from its Softmax outward into one description (`Site`).

The attention core is read from the Softmax outward: scaling (Mul/Div by a scalar, on q, on k or on the scores,
any mix), K's transposition (Transpose, or the Reshape/Transpose/Reshape triple of the dynamo exporter), the
repeat-KV chain (Unsqueeze, Expand, Reshape, also behind a float Cast of V), the KV-cache Concat, optional Casts
and the NaN guard after Softmax. Also:
- softcap:  c * tanh(a * x) = c * tanh((c*a*x) / c)  ->  softcap=c, the scale takes c*a (c > 0; Gemma2). GQA's
  order is scale, softcap, mask, the graph's order.
- a scale after the mask:  Softmax((S + M) * c) = Softmax(S*c + M*c), c > 0: the scale joins the scores' and M*c
  is what the mask probe checks (CodeGen).
- a last-axis norm on BNSH q/k:  Norm(Transpose(x4, [0,2,1,3])) = Transpose(Norm(x4)), the normed axis untouched:
  the norm moves onto the BSNH input (Gemma3).
- rotary as rotate-half (x*cos + Concat(-x2, x1)*sin) or interleaved (x*cos + rotate_every_two(x)*sin with
  rotate_every_two(x)[2i] = -x[2i+1], [2i+1] = x[2i]; GPT-J, CodeGen), partial (Concat with the unrotated rest),
  on BNSH or on the BSNH views before the head transpose (cos/sin (B, S, 1, D)).
- an attention computed wider than its input (fp16 q/k/v, fp32 scores): GQA's output is cast to the site's type.

A site that does not read as this core is a `Refusal` with the reason (coverage reports it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxc import probe
from onnxc.coverage import Refusal
from onnxc.rotary import Rotary, parse_rotary
from onnxc.rules import attr_value, const_array
from onnxc.shapes import derived_dims as _dims
from onnxc.shapes import dims_of, sym_value
from onnxc.verify import Scenario, make_inputs


def prod(v: ir.Value | None, *ops: str) -> ir.Node | None:
    n = v.producer() if v is not None else None
    return n if n is not None and n.op_type in ops and n.domain == "" else None


def _scalar(v: ir.Value | None) -> float | None:
    a = const_array(v, 1)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def _ints(v: ir.Value | None) -> list[int] | None:
    a = const_array(v, 8)
    return None if a is None else [int(x) for x in a.reshape(-1)]


def _peel_cast(v: ir.Value) -> ir.Value:
    while (n := prod(v, "Cast")) is not None and n.inputs[0].dtype is not None and n.inputs[0].dtype.is_floating_point():
        v = n.inputs[0]
    return v


def _peel_scale(v: ir.Value) -> tuple[ir.Value, float]:
    """x * c, c * x, x / c (c a scalar constant, any nesting) -> (x, product of the factors)."""
    scale = 1.0
    while True:
        v = _peel_cast(v)
        n = prod(v, "Mul", "Div")
        if n is None:
            return v, scale
        a, b = n.inputs
        if (c := _scalar(b)) is not None:
            scale *= c if n.op_type == "Mul" else 1.0 / c
            v = a
        elif n.op_type == "Mul" and (c := _scalar(a)) is not None:
            scale *= c
            v = b
        else:
            return v, scale


def _perm(n: ir.Node) -> list[int] | None:
    p = attr_value(n, "perm")
    return list(p) if p is not None else None


def _untranspose_k(kt: ir.Value) -> ir.Value:
    """K^T (B, N, H, T) -> K (B, N, T, H): Transpose(perm [0,1,3,2]) or Reshape(Transpose(Reshape(K, 3-D), [0,2,1]))."""
    n = prod(kt, "Transpose")
    if n is not None and _perm(n) == [0, 1, 3, 2]:
        return n.inputs[0]
    r2 = prod(kt, "Reshape")
    t = prod(r2.inputs[0], "Transpose") if r2 else None
    r1 = prod(t.inputs[0], "Reshape") if t else None
    if r1 is not None and _perm(t) == [0, 2, 1]:
        k, dk, dkt = r1.inputs[0], _dims(r1.inputs[0]), _dims(kt)
        if dk is None or dkt is None or len(dkt) != 4:
            raise Refusal("K's transposition has unknown shapes")
        flat = _dims(r1.outputs[0])
        if flat is None or len(flat) != 3 or flat[-1] != dk[-1] or not isinstance(dk[-1], int):
            raise Refusal("K's 3-D view does not keep the head size last")
        # (B, N, T, H) -> (B*N, T, H) -> (B*N, H, T) -> (B, N, H, T): equal counts make T the same on both ends
        if len(dk) == 4 and dk[:2] == dkt[:2] and dk[3] == dkt[2]:
            return k
        # the repeat chain's own Reshape merged into the 3-D view: K is Expand(...) of rank 5
        if len(dk) == 5 and dk[0] == dkt[0] and isinstance(dk[1], int) and isinstance(dk[2], int) \
                and dk[1] * dk[2] == dkt[1] and dk[4] == dkt[2]:
            return k
    raise Refusal("K is not transposed by Transpose([0,1,3,2]) or a Reshape/Transpose/Reshape triple")


def _unrepeat(v: ir.Value) -> tuple[ir.Value, int]:
    """Reshape(Expand(Unsqueeze(x, 2), (B, KV, R, T, H)), (B, KV*R, T, H)) -> (x, R); anything else -> (v, 1)."""
    r = prod(v, "Reshape")
    e = prod(r.inputs[0], "Expand") if r else prod(v, "Expand")
    u = prod(e.inputs[0], "Unsqueeze") if e else None
    if u is None:
        return v, 1
    axes = _ints(u.inputs[1]) if len(u.inputs) > 1 else attr_value(u, "axes")
    x, dx = u.inputs[0], _dims(u.inputs[0])
    de = _dims(e.outputs[0])
    if axes not in ([2], [-3]) or dx is None or de is None or len(dx) != 4 or len(de) != 5:
        raise Refusal("a KV repetition chain that is not Unsqueeze(2)/Expand/Reshape over BNSH")
    rep = de[2]
    dv = _dims(v) if r else (de[0], de[1] * rep if isinstance(rep, int) and isinstance(de[1], int) else None)
    # Expand only broadcasts the unsqueezed axis here: the other dims keep x's sizes (checked where static).
    if not isinstance(rep, int) or not isinstance(dx[1], int) or dv is None \
            or (isinstance(dv[1], int) and dv[1] != dx[1] * rep) or de[4] != dx[3]:
        raise Refusal("the KV repetition does not repeat each KV head R times")
    return x, rep


def _unconcat(v: ir.Value) -> tuple[ir.Value | None, ir.Value]:
    """present = Concat(past, new, axis=2) -> (past, new); no Concat -> (None, v)."""
    n = prod(v, "Concat")
    if n is None or attr_value(n, "axis") in (-1, 3):     # a partial-rotary Concat over channels, not a cache
        return None, v
    ins = [i for i in n.inputs]
    while len(ins) == 2 and (c := prod(ins[0], "Concat")) is not None and len(c.inputs) == 1:
        ins[0] = c.inputs[0]
    if len(ins) != 2 or attr_value(n, "axis") not in (2, -2):
        raise Refusal("the KV cache is not Concat(past, new) on the sequence axis")
    past = ins[0]
    c = prod(past, "Cast")       # fp16 TorchScript: a layer computed in float32 casts its float16 cache up first
    if not past.is_graph_input() and not (c is not None and c.inputs[0].is_graph_input() and _widens(c)):
        raise Refusal("the past KV is not a graph input")
    return past, ins[1]


def _widens(cast: ir.Node) -> bool:
    """A float-to-float Cast that loses nothing (float16 -> float32, ...)."""
    src, dst = cast.inputs[0].dtype, cast.outputs[0].dtype
    return src is not None and dst is not None and src.is_floating_point() and dst.is_floating_point() and \
        dst.itemsize >= src.itemsize


def _rotary_of(v: ir.Value) -> Rotary | None:
    """The rotary form of v, or of v's source when v casts a float rotation back (OLMo rotates in float32)."""
    r = parse_rotary(v)
    if r is None and (c := prod(v, "Cast")) is not None and c.inputs[0].dtype is not None and \
            c.inputs[0].dtype.is_floating_point():
        r = parse_rotary(c.inputs[0])
    return r


def _data_users(v: ir.Value) -> list[ir.Node]:
    """Users of v other than Shape (shape-only users die with the Reshape targets they feed)."""
    return [u for u, _ in v.uses() if u.op_type != "Shape"]


def _same_heads_reshape(r: ir.Node) -> bool:
    """Reshape(x (B, N, S, H), (B, -1, S', H)): a view the exporter re-states; S' is S unless the graph is broken."""
    d, t = dims_of(r.inputs[0]), sym_value(r.inputs[1])
    return d is not None and t is not None and len(d) == 4 and len(t) == 4 and t[0] in (d[0], 0) \
        and t[1] in (-1, d[1]) and t[3] == d[3] and isinstance(d[3], int)


def _heads_kept(r: ir.Node) -> bool:
    """Reshape(x (?, N, ?, H), (B', N, S', H)): heads and head size kept, the other two dims to be checked against
    the query's (B, S) once those are read."""
    d, t = dims_of(r.inputs[0]), sym_value(r.inputs[1])
    return d is not None and t is not None and len(d) == 4 and len(t) == 4 and isinstance(d[1], int) \
        and isinstance(d[3], int) and t[1] == d[1] and t[3] == d[3] and -1 not in t


_LAST_AXIS_NORMS = ("SimplifiedLayerNormalization", "LayerNormalization")


def _heads_view(x: ir.Value, what: str) -> tuple[ir.Value, ir.Node | None]:
    """BNSH x = Transpose(x4, [0,2,1,3]) -> (x4 (B, S, N, H), None); or x = Norm(Transpose(x4)) for a norm over the
    last axis only -> (x4, Norm): Norm(Transpose(x4, [0,2,1,3])) = Transpose(Norm(x4)), the normed axis untouched."""
    if (c := prod(x, "Cast")) is not None and c.inputs[0].dtype is not None and c.inputs[0].dtype.is_floating_point():
        x = c.inputs[0]         # OLMo: rotary in float32 on a float16 head view, cast back
    norm = prod(x, *_LAST_AXIS_NORMS)
    if norm is not None:
        if attr_value(norm, "axis", default=-1) not in (-1, 3) or len(norm.outputs) != 1:
            raise Refusal(f"{what} is normalized over more than its last axis")
        x = norm.inputs[0]
    t = prod(x, "Transpose")
    if t is None or _perm(t) != [0, 2, 1, 3]:
        raise Refusal(f"{what} is not Transpose(BSNH, [0,2,1,3])")
    return t.inputs[0], norm


@dataclass
class Site:
    out: ir.Value             # (B, S, N*H) attention output, replaced
    anchor: ir.Node           # the node producing `out`
    q: ir.Value               # BSNH query (before rotary)
    k: ir.Value
    v: ir.Value
    q_rot: ir.Value           # BNSH query as attention reads it (rotated)
    k_rot: ir.Value
    past_k: ir.Value | None
    past_v: ir.Value | None
    present_k: ir.Value
    present_v: ir.Value
    mask: ir.Value            # additive bias or boolean keep-mask
    mask_kind: str            # "bias" | "keep" | "drop"
    scale: float
    num_heads: int
    kv_heads: int
    head: int
    rotary: Rotary | None
    softcap: float = 0.0      # c in c * tanh(scores / c), applied after the scale, before the mask
    q_norm: ir.Node | None = None   # a last-axis norm applied to BNSH Q (K) after the head transpose
    k_norm: ir.Node | None = None
    rotated4: tuple[ir.Value, ir.Value] | None = None   # rotated BSNH q, k when the rotary precedes the transpose
    mask_scale: float = 1.0   # the additive mask is scaled with the scores: Softmax((S + M) * mask_scale)
    mask_fill: ir.Value | None = None   # the value a Where mask ("keep" / "drop") puts in hidden places
    scores: ir.Value | None = None      # MatMul(Q, K^T): (B, N, S, T)
    extra: tuple[ir.Value, ...] = ()    # terms added to the scaled scores besides the mask (ALiBi, DeBERTa's)


def _same_rotary(rq: Rotary | None, rk: Rotary | None) -> None:
    """Q and K are both rotated, by the same tables (the same values, or values proved equal by evaluation: an
    export may compute cos/sin once per use), or both not rotated."""
    if rq is None and rk is None:
        return
    if (rq is None) != (rk is None):
        raise Refusal(f"only {'Q' if rk is None else 'K'} is rotated (no rotary form found on the other)")
    if rq.dim != rk.dim or rq.interleaved != rk.interleaved:
        raise Refusal("Q and K are rotated differently (rotary dims or layouts differ)")
    if rq.cos is rk.cos and rq.sin is rk.sin:
        return
    if not _equal_by_evaluation([(rq.cos, rk.cos), (rq.sin, rk.sin)]):
        raise Refusal("Q and K are not rotated by the same rotary tables")
    rk.cos, rk.sin = rq.cos, rq.sin


def _equal_by_evaluation(pairs: list[tuple[ir.Value, ir.Value]]) -> bool:
    """Each pair of values is equal, element for element, on a prefill and a cached chunk of seeded inputs."""
    values = [v for pair in pairs for v in pair]
    node = next((v.producer() for v in values if v.producer() is not None), None)
    if node is None or node.graph is None:
        return all(a.const_value is not None and b.const_value is not None and
                   np.array_equal(a.const_value.numpy(), b.const_value.numpy()) for a, b in pairs)
    graph = node.graph
    try:
        reads = {v.name for v in probe.cone(graph, values).inputs}
        for sc in (Scenario("tables", 1, 5, 0), Scenario("tables", 2, 3, 4)):
            got = probe.evaluate(graph, values, make_inputs(graph, sc, seed=3, only=reads))
            if not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(got[::2], got[1::2])):
                return False
    except probe.ProbeError:
        return False
    return True


def _heads_by_evaluation(graph: ir.Graph, views: tuple[ir.Value, ...], dims: tuple[tuple, ...]
                         ) -> tuple[tuple, ...]:
    """BSNH views whose head count or head size inference lost (TorchScript's view(..., -1, H) from computed
    shapes): their shapes evaluated on two probe sizes (only shapes are read: no weight is copied). Dims that stay
    the same on both become static; the others keep what inference said."""
    seen: list[list[np.ndarray]] = []
    try:
        reads = {v.name for v in probe.cone(graph, views, shapes=True).inputs}
        for seed, sc in enumerate((Scenario("heads", 2, 5, 3), Scenario("heads", 3, 2, 4))):
            seen.append(probe.evaluate(graph, views, make_inputs(graph, sc, seed, only=reads), shapes=True))
    except probe.ProbeError:
        return dims
    out = []
    for d, a, b in zip(dims, *seen):
        if len(a) != len(d) or len(b) != len(d):
            return dims
        out.append(tuple(int(x) if x == y and not isinstance(k, int) and i >= 2 else k
                         for i, (k, x, y) in enumerate(zip(d, a, b))))
    return tuple(out)


def _is_scores(x: ir.Value) -> bool:
    """x is scaled MatMul scores, optionally softcapped (c * tanh(scores / c))."""
    x = _peel_scale(x)[0]
    if (th := prod(x, "Tanh")) is not None:
        x = _peel_scale(th.inputs[0])[0]
    return prod(x, "MatMul") is not None


def _biased_scores(x: ir.Value) -> bool:
    """x is Add(scores, R) in either order: a term added to the scores besides the mask (ALiBi, a relative position
    bias computed from Q: DeBERTa)."""
    a = prod(x, "Add")
    return a is not None and sum(_is_scores(i) for i in a.inputs) == 1


def _unbias(x: ir.Value) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """(scores, (R,)) for x = Add(scores, R), else (x, ())."""
    if not _biased_scores(x):
        return x, ()
    a, b = prod(x, "Add").inputs
    return (a, (b,)) if _is_scores(a) else (b, (a,))


def parse_site(sm: ir.Node) -> Site:
    if attr_value(sm, "axis", default=-1) not in (-1, 3):
        raise Refusal("Softmax is not over the last axis")
    # consumers: [IsNaN guard] -> MatMul(P, V)
    p = sm.outputs[0]
    users = [u for u, _ in p.uses()]
    where = next((u for u in users if u.op_type == "Where"), None)
    if where is not None and len(users) == 2 and any(u.op_type == "IsNaN" for u in users):
        p = where.outputs[0]
    users = [u for u, _ in p.uses()]
    while len(users) == 1 and users[0].op_type == "Cast":
        p = users[0].outputs[0]
        users = [u for u, _ in p.uses()]
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not p:
        raise Refusal("the softmax output does not feed MatMul(P, V) alone")
    pv = users[0]
    o = pv.outputs[0]
    tr = _data_users(o)
    restated = None     # a (B, N, S, H) view re-stated with dims inference lost track of: checked against Q below
    if len(tr) == 1 and tr[0].op_type == "Reshape":
        same = _same_heads_reshape(tr[0])
        if same or _heads_kept(tr[0]):
            restated = None if same else sym_value(tr[0].inputs[1])
            o = tr[0].outputs[0]
            tr = _data_users(o)
    if len(tr) != 1 or tr[0].op_type != "Transpose" or _perm(tr[0]) != [0, 2, 1, 3]:
        raise Refusal("the attention output is not transposed back to BSNH")
    rs = _data_users(tr[0].outputs[0])
    if len(rs) != 1 or rs[0].op_type != "Reshape":
        raise Refusal("the attention output is not reshaped to (B, S, N*H)")
    out = rs[0].outputs[0]
    # scores and mask
    # (S + M) * c = S*c + M*c (CodeGen scales after the mask): the scale joins the scores' and M*c is probed
    s, s_mask = _peel_scale(sm.inputs[0])
    n = prod(s, "Add", "Where")
    if s_mask != 1.0 and (n is None or n.op_type != "Add" or s_mask <= 0):
        raise Refusal(f"a scale {s_mask} after the mask that is not positive or follows no additive mask")
    if n is None:
        raise Refusal("no mask before Softmax (a model without one is not causal self-attention)")
    fill = None
    if n.op_type == "Add":
        a, b = n.inputs
        scores, mask = (a, b) if _is_scores(a) or not _is_scores(b) and _biased_scores(a) else (b, a)
        kind = "bias"
    else:
        cond, x, y = n.inputs
        if _is_scores(x) or _biased_scores(x):
            scores, mask, kind, fill = x, cond, "keep", y
        else:
            scores, mask, kind, fill = y, cond, "drop", x
    scores, extra = _unbias(scores)
    scores, s_post = _peel_scale(scores)
    softcap = 0.0
    if (th := prod(scores, "Tanh")) is not None:
        # c * tanh(a * x) = c * tanh((c*a*x) / c): softcap c over the scores scaled by c*a (tanh is odd: c > 0)
        if s_post <= 0:
            raise Refusal(f"a softcap multiplier {s_post} that is not positive")
        scores, s_in = _peel_scale(th.inputs[0])
        softcap, s_post = s_post, s_post * s_in
        # a scale after the mask multiplies the capped scores too: s_m*c*tanh(a*x) is softcap s_m*c over s_m*c*a*x
        softcap *= s_mask
    mm = prod(scores, "MatMul")
    if mm is None:
        raise Refusal("the scores are not MatMul(Q, K^T)")
    q_rot, s_q = _peel_scale(mm.inputs[0])
    kt, s_k = _peel_scale(mm.inputs[1])
    present_v, rep_v = _unrepeat(_peel_cast(pv.inputs[1]))     # fp16 TorchScript: MatMul(P, Cast(V, fp32))
    past_v, v_bnsh = _unconcat(present_v)
    tn = prod(kt, "Transpose")
    if tn is not None and _perm(tn) == [0, 2, 3, 1]:
        # Transpose(Transpose(k4, [0,2,1,3]), [0,1,3,2]) merged: K^T straight from the BSNH view, no cache
        if rep_v != 1 or past_v is not None or tn.inputs[0].is_graph_output():
            raise Refusal("K is transposed from BSNH while V is cached or repeated")
        present_k, rep_k, past_k, k_rot = tn.inputs[0], 1, None, None
    else:
        k_full = _peel_cast(_untranspose_k(kt))      # GPT-J: K cast to float32 before its transposition
        present_k, rep_k = _unrepeat(k_full)
        past_k, k_rot = _unconcat(present_k)
    if rep_k != rep_v:
        raise Refusal("K and V repeat their heads differently")
    if (past_k is None) != (past_v is None):
        raise Refusal("only one of K and V has a cache")
    rq, rk = _rotary_of(q_rot), (_rotary_of(k_rot) if k_rot is not None else None)
    _same_rotary(rq, rk)
    q4, q_norm = _heads_view(rq.x if rq else q_rot, "Q")
    k4, k_norm = (present_k, None) if k_rot is None else _heads_view(rk.x if rk else k_rot, "K")
    rotated4 = None
    if rq is None and q_norm is None and k_norm is None:
        # rotary applied to the BSNH views before the head transpose (GPT-J, CodeGen)
        rq, rk = parse_rotary(q4), parse_rotary(k4)
        _same_rotary(rq, rk)
        if rq is not None:
            rq.bsnh = rk.bsnh = True
            rotated4, q4, k4 = (q4, k4), rq.x, rk.x
    v4, v_norm = _heads_view(v_bnsh, "V")
    if v_norm is not None:
        raise Refusal("V is normalized per head")
    dq, dk, dv = _dims(q4), _dims(k4), _dims(v4)
    if dq is None or dk is None or dv is None or len(dq) != 4 or len(dk) != 4:
        raise Refusal("Q/K/V shapes are unknown")
    if not all(isinstance(d[i], int) for d in (dq, dk, dv) for i in (2, 3)):
        dq, dk, dv = _heads_by_evaluation(sm.graph, (q4, k4, v4), (dq, dk, dv))
    n_heads, head, kv = dq[2], dq[3], dk[2]
    if not all(isinstance(x, int) for x in (n_heads, head, kv)) or dk[3] != head or dv[2:] != (kv, head):
        raise Refusal("head counts or head size are not static and consistent")
    if restated is not None and not (restated[0] in (dq[0], 0) and restated[2] == dq[1]):
        raise Refusal("the attention output is re-stated as a view that is not (B, N, S, H)")
    if kv == 1 and rep_k == 1 and n_heads > 1:
        rep_k = n_heads     # one KV head broadcast over the query heads by the MatMuls (multi-query, Falcon)
    if n_heads != kv * rep_k:
        raise Refusal(f"{n_heads} query heads are not {kv} KV heads repeated {rep_k} times")
    return Site(out, rs[0], q4, k4, v4, q_rot, k_rot, past_k, past_v, present_k, present_v, mask, kind,
                s_q * s_k * s_post * s_mask, n_heads, kv, head, rq, softcap, q_norm, k_norm, rotated4, s_mask, fill,
                mm.outputs[0], extra)


# -------------------------------------------------------------------------------------------------- probes

def cone_inputs(graph: ir.Graph, values: list[ir.Value], what: str) -> list[ir.Value]:
    try:
        return probe.cone(graph, values).inputs
    except probe.ProbeError as exc:
        raise Refusal(f"the {what} cannot be evaluated: {exc}") from None
