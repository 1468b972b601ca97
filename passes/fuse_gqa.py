"""fuse-gqa

    q' = rot(q),  K = Concat(past_k, rot(k)),  V = Concat(past_v, v)           (BNSH; rot = rotary, optional)
    o  = Reshape(Transpose(Softmax(s * q' @ repeat(K)^T + mask) @ repeat(V), [0,2,1,3]), [B, S, N*H])
      ->  o, K, V = GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                                        num_heads=N, kv_num_heads=KV, scale=s, do_rotary, local_window_size=W)
    with seqlens_k = ReduceSum(attention_mask, 1) - 1 and total_len = Gather(Shape(attention_mask), 1), computed
    once (nodes valid at every opset from 11: ReduceSum's axes input from 13, no Shape start/end). A model without
    an attention_mask input (its mask made from shapes alone, nothing padded): total_len = S + P from the shapes the
    mask reads (input_ids, the cache) and seqlens_k = total_len - 1 in every row.

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

Two facts cannot be read off the graph's shape, so they are proved by evaluation (compiler/probe.py):
- the mask: evaluated on a right-padded prefill, a decode step and a chunked prefill, it must show exactly the
  causal rule, the padding of attention_mask (none without that input) and, when present, a sliding window of W
  keys (local_window_size) on every non-padded query row. This is GroupQueryAttention's contract: right padding, positions continuing the past.
  Static input dims override the probes' sizes; a window is invisible at a length <= W, so with a static mask
  length (the only length the model accepts) "no window" is proven there, and with a dynamic one a window probe
  that static dims keep short is a refusal.
- the rotary tables: cos and sin are evaluated for positions 0..L-1 (L = option max_seq_len, default 4096, or the
  static mask length; static position_ids are fed in chunks) and must be the same [c, c] halves (pairs [c0, c0,
  c1, c1, ...] when interleaved) at every position ids the model is given (a chunk of a batch of two, and single
  tokens after caches of growing lengths); they become cos_cache / sin_cache. Longrope (Phi-3.5, Phi-4-mini)
  switches its frequencies on the largest position id: inv_freq = Where(max(position_ids) + 1 > M, long, short).
  When exactly one scalar Where in the cone reads the position ids alone, and evaluating it shows it holds exactly
  when the total length T exceeds some t0 (at every length probed, for a prefill, a decode step and a batch of
  two), both regimes are read with the condition pinned and stored stacked ([short; long], 2L rows); each run
  slices L rows from row L * (total_sequence_length > t0). Same semantics: cached keys keep the rotation they got.
Rotary goes inside the op (do_rotary=1) where ORT's kernel takes it (head size a multiple of 16, cache width a
multiple of 8); otherwise the rotated q/k stay outside and the op gets them rotated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxc import probe
from onnxc.ir import GraphWriter
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import attr_value, const_array, replace_value
from onnxc.rotary import Rotary, parse_rotary
from onnxc.shapes import derived_dims as _dims
from onnxc.shapes import dims_of, sym_value
from onnxc.verify import Scenario, input_role, make_inputs

MS = "com.microsoft"
DEFAULT_MAX_SEQ_LEN = 4096


class Refuse(Exception):
    """A site that is not fused, with the reason."""


def _prod(v: ir.Value | None, *ops: str) -> ir.Node | None:
    n = v.producer() if v is not None else None
    return n if n is not None and n.op_type in ops and n.domain == "" else None


def _scalar(v: ir.Value | None) -> float | None:
    a = const_array(v, 1)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def _ints(v: ir.Value | None) -> list[int] | None:
    a = const_array(v, 8)
    return None if a is None else [int(x) for x in a.reshape(-1)]


def _peel_cast(v: ir.Value) -> ir.Value:
    while (n := _prod(v, "Cast")) is not None and n.inputs[0].dtype is not None and n.inputs[0].dtype.is_floating_point():
        v = n.inputs[0]
    return v


def _peel_scale(v: ir.Value) -> tuple[ir.Value, float]:
    """x * c, c * x, x / c (c a scalar constant, any nesting) -> (x, product of the factors)."""
    scale = 1.0
    while True:
        v = _peel_cast(v)
        n = _prod(v, "Mul", "Div")
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
    n = _prod(kt, "Transpose")
    if n is not None and _perm(n) == [0, 1, 3, 2]:
        return n.inputs[0]
    r2 = _prod(kt, "Reshape")
    t = _prod(r2.inputs[0], "Transpose") if r2 else None
    r1 = _prod(t.inputs[0], "Reshape") if t else None
    if r1 is not None and _perm(t) == [0, 2, 1]:
        k, dk, dkt = r1.inputs[0], _dims(r1.inputs[0]), _dims(kt)
        if dk is None or dkt is None or len(dkt) != 4:
            raise Refuse("K's transposition has unknown shapes")
        flat = _dims(r1.outputs[0])
        if flat is None or len(flat) != 3 or flat[-1] != dk[-1] or not isinstance(dk[-1], int):
            raise Refuse("K's 3-D view does not keep the head size last")
        # (B, N, T, H) -> (B*N, T, H) -> (B*N, H, T) -> (B, N, H, T): equal counts make T the same on both ends
        if len(dk) == 4 and dk[:2] == dkt[:2] and dk[3] == dkt[2]:
            return k
        # the repeat chain's own Reshape merged into the 3-D view: K is Expand(...) of rank 5
        if len(dk) == 5 and dk[0] == dkt[0] and isinstance(dk[1], int) and isinstance(dk[2], int) \
                and dk[1] * dk[2] == dkt[1] and dk[4] == dkt[2]:
            return k
    raise Refuse("K is not transposed by Transpose([0,1,3,2]) or a Reshape/Transpose/Reshape triple")


def _unrepeat(v: ir.Value) -> tuple[ir.Value, int]:
    """Reshape(Expand(Unsqueeze(x, 2), (B, KV, R, T, H)), (B, KV*R, T, H)) -> (x, R); anything else -> (v, 1)."""
    r = _prod(v, "Reshape")
    e = _prod(r.inputs[0], "Expand") if r else _prod(v, "Expand")
    u = _prod(e.inputs[0], "Unsqueeze") if e else None
    if u is None:
        return v, 1
    axes = _ints(u.inputs[1]) if len(u.inputs) > 1 else attr_value(u, "axes")
    x, dx = u.inputs[0], _dims(u.inputs[0])
    de = _dims(e.outputs[0])
    if axes not in ([2], [-3]) or dx is None or de is None or len(dx) != 4 or len(de) != 5:
        raise Refuse("a KV repetition chain that is not Unsqueeze(2)/Expand/Reshape over BNSH")
    rep = de[2]
    dv = _dims(v) if r else (de[0], de[1] * rep if isinstance(rep, int) and isinstance(de[1], int) else None)
    # Expand only broadcasts the unsqueezed axis here: the other dims keep x's sizes (checked where static).
    if not isinstance(rep, int) or not isinstance(dx[1], int) or dv is None \
            or (isinstance(dv[1], int) and dv[1] != dx[1] * rep) or de[4] != dx[3]:
        raise Refuse("the KV repetition does not repeat each KV head R times")
    return x, rep


def _unconcat(v: ir.Value) -> tuple[ir.Value | None, ir.Value]:
    """present = Concat(past, new, axis=2) -> (past, new); no Concat -> (None, v)."""
    n = _prod(v, "Concat")
    if n is None or attr_value(n, "axis") in (-1, 3):     # a partial-rotary Concat over channels, not a cache
        return None, v
    ins = [i for i in n.inputs]
    while len(ins) == 2 and (c := _prod(ins[0], "Concat")) is not None and len(c.inputs) == 1:
        ins[0] = c.inputs[0]
    if len(ins) != 2 or attr_value(n, "axis") not in (2, -2):
        raise Refuse("the KV cache is not Concat(past, new) on the sequence axis")
    past = ins[0]
    if not past.is_graph_input():
        raise Refuse("the past KV is not a graph input")
    return past, ins[1]


def _data_users(v: ir.Value) -> list[ir.Node]:
    """Users of v other than Shape (shape-only users die with the Reshape targets they feed)."""
    return [u for u, _ in v.uses() if u.op_type != "Shape"]


def _same_heads_reshape(r: ir.Node) -> bool:
    """Reshape(x (B, N, S, H), (B, -1, S', H)): a view the exporter re-states; S' is S unless the graph is broken."""
    d, t = dims_of(r.inputs[0]), sym_value(r.inputs[1])
    return d is not None and t is not None and len(d) == 4 and len(t) == 4 and t[0] in (d[0], 0) \
        and t[1] in (-1, d[1]) and t[3] == d[3] and isinstance(d[3], int)


_LAST_AXIS_NORMS = ("SimplifiedLayerNormalization", "LayerNormalization")


def _heads_view(x: ir.Value, what: str) -> tuple[ir.Value, ir.Node | None]:
    """BNSH x = Transpose(x4, [0,2,1,3]) -> (x4 (B, S, N, H), None); or x = Norm(Transpose(x4)) for a norm over the
    last axis only -> (x4, Norm): Norm(Transpose(x4, [0,2,1,3])) = Transpose(Norm(x4)), the normed axis untouched."""
    norm = _prod(x, *_LAST_AXIS_NORMS)
    if norm is not None:
        if attr_value(norm, "axis", default=-1) not in (-1, 3) or len(norm.outputs) != 1:
            raise Refuse(f"{what} is normalized over more than its last axis")
        x = norm.inputs[0]
    t = _prod(x, "Transpose")
    if t is None or _perm(t) != [0, 2, 1, 3]:
        raise Refuse(f"{what} is not Transpose(BSNH, [0,2,1,3])")
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


def _same_rotary(rq: Rotary | None, rk: Rotary | None) -> None:
    """Q and K are both rotated, by the same tables (the same values, or values proved equal by evaluation: an
    export may compute cos/sin once per use), or both not rotated."""
    if rq is None and rk is None:
        return
    if (rq is None) != (rk is None):
        raise Refuse(f"only {'Q' if rk is None else 'K'} is rotated (no rotary form found on the other)")
    if rq.dim != rk.dim or rq.interleaved != rk.interleaved:
        raise Refuse("Q and K are rotated differently (rotary dims or layouts differ)")
    if rq.cos is rk.cos and rq.sin is rk.sin:
        return
    if not _equal_by_evaluation([(rq.cos, rk.cos), (rq.sin, rk.sin)]):
        raise Refuse("Q and K are not rotated by the same rotary tables")
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


def _is_scores(x: ir.Value) -> bool:
    """x is scaled MatMul scores, optionally softcapped (c * tanh(scores / c))."""
    x = _peel_scale(x)[0]
    if (th := _prod(x, "Tanh")) is not None:
        x = _peel_scale(th.inputs[0])[0]
    return _prod(x, "MatMul") is not None


def _parse_site(sm: ir.Node) -> Site:
    if attr_value(sm, "axis", default=-1) not in (-1, 3):
        raise Refuse("Softmax is not over the last axis")
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
        raise Refuse("the softmax output does not feed MatMul(P, V) alone")
    pv = users[0]
    o = pv.outputs[0]
    tr = _data_users(o)
    if len(tr) == 1 and tr[0].op_type == "Reshape" and _same_heads_reshape(tr[0]):
        o = tr[0].outputs[0]
        tr = _data_users(o)
    if len(tr) != 1 or tr[0].op_type != "Transpose" or _perm(tr[0]) != [0, 2, 1, 3]:
        raise Refuse("the attention output is not transposed back to BSNH")
    rs = _data_users(tr[0].outputs[0])
    if len(rs) != 1 or rs[0].op_type != "Reshape":
        raise Refuse("the attention output is not reshaped to (B, S, N*H)")
    out = rs[0].outputs[0]
    # scores and mask
    # (S + M) * c = S*c + M*c (CodeGen scales after the mask): the scale joins the scores' and M*c is probed
    s, s_mask = _peel_scale(sm.inputs[0])
    n = _prod(s, "Add", "Where")
    if s_mask != 1.0 and (n is None or n.op_type != "Add" or s_mask <= 0):
        raise Refuse(f"a scale {s_mask} after the mask that is not positive or follows no additive mask")
    if n is None:
        raise Refuse("no mask before Softmax (a model without one is not causal self-attention)")
    if n.op_type == "Add":
        a, b = n.inputs
        scores, mask = (a, b) if _is_scores(a) else (b, a)
        kind = "bias"
    else:
        cond, x, y = n.inputs
        if _is_scores(x):
            scores, mask, kind = x, cond, "keep"
        else:
            scores, mask, kind = y, cond, "drop"
    scores, s_post = _peel_scale(scores)
    softcap = 0.0
    if (th := _prod(scores, "Tanh")) is not None:
        # c * tanh(a * x) = c * tanh((c*a*x) / c): softcap c over the scores scaled by c*a (tanh is odd: c > 0)
        if s_post <= 0:
            raise Refuse(f"a softcap multiplier {s_post} that is not positive")
        scores, s_in = _peel_scale(th.inputs[0])
        softcap, s_post = s_post, s_post * s_in
        # a scale after the mask multiplies the capped scores too: s_m*c*tanh(a*x) is softcap s_m*c over s_m*c*a*x
        softcap *= s_mask
    mm = _prod(scores, "MatMul")
    if mm is None:
        raise Refuse("the scores are not MatMul(Q, K^T)")
    q_rot, s_q = _peel_scale(mm.inputs[0])
    kt, s_k = _peel_scale(mm.inputs[1])
    present_v, rep_v = _unrepeat(_peel_cast(pv.inputs[1]))     # fp16 TorchScript: MatMul(P, Cast(V, fp32))
    past_v, v_bnsh = _unconcat(present_v)
    tn = _prod(kt, "Transpose")
    if tn is not None and _perm(tn) == [0, 2, 3, 1]:
        # Transpose(Transpose(k4, [0,2,1,3]), [0,1,3,2]) merged: K^T straight from the BSNH view, no cache
        if rep_v != 1 or past_v is not None or tn.inputs[0].is_graph_output():
            raise Refuse("K is transposed from BSNH while V is cached or repeated")
        present_k, rep_k, past_k, k_rot = tn.inputs[0], 1, None, None
    else:
        k_full = _untranspose_k(kt)
        present_k, rep_k = _unrepeat(k_full)
        past_k, k_rot = _unconcat(present_k)
    if rep_k != rep_v:
        raise Refuse("K and V repeat their heads differently")
    if (past_k is None) != (past_v is None):
        raise Refuse("only one of K and V has a cache")
    rq, rk = parse_rotary(q_rot), (parse_rotary(k_rot) if k_rot is not None else None)
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
        raise Refuse("V is normalized per head")
    dq, dk, dv = _dims(q4), _dims(k4), _dims(v4)
    if dq is None or dk is None or dv is None or len(dq) != 4 or len(dk) != 4:
        raise Refuse("Q/K/V shapes are unknown")
    n_heads, head, kv = dq[2], dq[3], dk[2]
    if not all(isinstance(x, int) for x in (n_heads, head, kv)) or dk[3] != head or dv[2:] != (kv, head):
        raise Refuse("head counts or head size are not static and consistent")
    if n_heads != kv * rep_k:
        raise Refuse(f"{n_heads} query heads are not {kv} KV heads repeated {rep_k} times")
    return Site(out, rs[0], q4, k4, v4, q_rot, k_rot, past_k, past_v, present_k, present_v, mask, kind,
                s_q * s_k * s_post * s_mask, n_heads, kv, head, rq, softcap, q_norm, k_norm, rotated4, s_mask)


# -------------------------------------------------------------------------------------------------- probes
def _cone_inputs(graph: ir.Graph, values: list[ir.Value], what: str) -> list[ir.Value]:
    try:
        return probe.cone(graph, values).inputs
    except probe.ProbeError as exc:
        raise Refuse(f"the {what} cannot be evaluated: {exc}") from None


def _mask_inputs(graph: ir.Graph, values: list[ir.Value]) -> list[ir.Value]:
    return [v for v in _cone_inputs(graph, values, "mask") if input_role(v) == "mask"]


def _visible(arr: np.ndarray, kind: str, scale: float = 1.0) -> np.ndarray:
    if kind == "bias":
        a = arr.astype(np.float64) * scale
        if not np.all((a == 0) | (a <= -1e4)):
            raise Refuse("the additive mask holds values other than 0 and a large negative (a bias, not a mask)")
        return a == 0
    return arr.astype(bool) if kind == "keep" else ~arr.astype(bool)


def _actual(model: ir.Model, feeds: dict[str, np.ndarray], mask: np.ndarray | None, sc: Scenario) -> Scenario:
    """The scenario the feeds really hold: static input dims override the requested batch and lengths. Without a
    mask input, the batch and new length are the ids input's (2-D), else the scenario's."""
    past = next((f.shape[2] for v in model.graph.inputs if input_role(v) == "past"
                 and (f := feeds.get(v.name)) is not None and f.ndim == 4), 0)
    if mask is not None:
        return Scenario(sc.name, mask.shape[0], mask.shape[1] - past, past)
    ids = next((f for v in model.graph.inputs if input_role(v) == "ids"
                and (f := feeds.get(v.name)) is not None and f.ndim == 2), None)
    return Scenario(sc.name, *(ids.shape if ids is not None else (sc.batch, sc.seq)), past)


@dataclass(frozen=True)
class Lengths:
    """Where GroupQueryAttention's seqlens_k and total length are read: the attention_mask input (row sums, width),
    or, for a mask made from shapes alone (nothing padded), a (B, S, ...) value and the past (B, KV, P, H)."""
    mask: ir.Value | None = None
    rows: ir.Value | None = None
    past: ir.Value | None = None


def _lengths(model: ir.Model, site: Site, mask_in: ir.Value | None) -> Lengths:
    """The mask's own sources where it reads one ids input and at most one past input, else the site's q/past."""
    if mask_in is not None:
        return Lengths(mask=mask_in)
    reads = _cone_inputs(model.graph, [site.mask], "mask")
    ids = [v for v in reads if input_role(v) == "ids" and v.shape is not None and len(v.shape) == 2]
    pasts = [v for v in reads if input_role(v) == "past" and v.shape is not None and len(v.shape) == 4]
    rows = ids[0] if len(ids) == 1 else site.q
    past = pasts[0] if len(pasts) == 1 else site.past_k
    return Lengths(rows=rows, past=past)


def _probe_mask(model: ir.Model, site: Site, has_past: bool, max_len: int) -> tuple[ir.Value | None, int]:
    """Prove the mask is causal + right padding (+ a window); return (attention_mask input, window or -1).

    A mask computed from shapes alone (the model takes no attention_mask) must be causal (+ a window) with nothing
    padded; the attention_mask input returned is then None.

    Static input dims override the probes' sizes. A window of W keys cannot be seen at a total length <= W, so
    when the mask's length is static (the model accepts that one length) "no window" is proven at that length;
    when the window probe comes out shorter than asked for a dynamic length, the site is refused."""
    masks = _mask_inputs(model.graph, [site.mask])
    if len(masks) > 1 or (masks and (masks[0].shape is None or len(masks[0].shape) != 2)):
        raise Refuse("the mask does not come from one 2-D attention_mask input")
    mask_in = masks[0] if masks else None
    if mask_in is not None:
        static_total = isinstance(mask_in.shape[1], int)
    else:   # a mask made from shapes alone (no attention_mask input): causal, nothing padded
        static_total = all(isinstance(d, int) for v in model.graph.inputs if input_role(v) in ("ids", "past")
                           and v.shape is not None for d in list(v.shape)[1:3])

    def run(sc: Scenario, pad: int = 0) -> tuple[np.ndarray, np.ndarray, Scenario]:
        feeds = make_inputs(model, sc, seed=0)
        m = feeds[mask_in.name] if mask_in is not None else None
        if pad and m is not None:
            m[-1, m.shape[1] - pad:] = 0
        try:
            (arr,) = probe.evaluate(model.graph, [site.mask], feeds)
        except probe.ProbeError as exc:
            raise Refuse(f"the mask cannot be evaluated: {exc}") from None
        act = _actual(model, feeds, m, sc)
        if m is None:
            m = np.ones((act.batch, act.past + act.seq), dtype=np.int64)
        if arr.ndim != 4 or act.seq < 1:
            raise Refuse(f"the mask is not (B, N, S, T) ({sc.name} probe: shape {arr.shape})")
        try:
            vis = np.broadcast_to(_visible(arr, site.mask_kind, site.mask_scale), (act.batch, arr.shape[1], act.seq, act.past + act.seq))
        except ValueError:
            raise Refuse(f"the mask of shape {arr.shape} is not (B, N, S, T) for {act}") from None
        if not (vis == vis[:, :1]).all():
            raise Refuse("the mask differs between heads")
        return vis[:, 0], m, act

    scenarios = [(Scenario("prefill", 2, 6, 0), 2)]
    if has_past:
        scenarios += [(Scenario("decode", 2, 1, 5), 0), (Scenario("chunk", 1, 3, 4), 0)]
    long = Scenario("window", 1, 1, max_len - 1) if has_past else Scenario("window", 1, min(max_len, 1024), 0)
    vis, _, act = run(long)
    if act.past + act.seq < long.past + long.seq and not static_total:
        raise Refuse(f"the window probe cannot be sized: static dims give length {act.past + act.seq}, "
                     f"not {long.past + long.seq}, while the mask's length is dynamic")
    window = int(vis[0, -1].sum())
    window = window if window < vis.shape[-1] else -1
    if window > 0:   # the window's edge, crossed inside a prefill and by a decode step
        scenarios.append((Scenario("window-prefill", 1, window + 5, 0), 0))
        if has_past:
            scenarios.append((Scenario("window-decode", 2, 1, window + 3), 0))
    seen: set[tuple] = set()
    for sc, pad in scenarios:
        vis, m, act = run(sc, pad)
        if (act.batch, act.seq, act.past, pad) in seen:
            continue
        seen.add((act.batch, act.seq, act.past, pad))
        i = np.arange(act.seq)[:, None] + act.past
        j = np.arange(act.past + act.seq)[None, :]
        want = (j <= i) & ((j > i - window) if window > 0 else True)
        want = want[None] & (m[:, None, :] != 0)
        rows = m[:, act.past:] != 0                     # non-padded query rows
        if not (vis == want)[rows].all():
            raise Refuse(f"the mask is not causal + padding{' + window' if window > 0 else ''} ({sc.name} probe)")
    return mask_in, window


@dataclass
class Tables:
    """cos/sin caches (L, dim/2); with a length switch, `long` holds the caches used once the total length (past +
    new) exceeds `threshold` and cos/sin the ones used up to it."""
    cos: np.ndarray
    sin: np.ndarray
    long: tuple[np.ndarray, np.ndarray] | None = None
    threshold: int = 0


def _probe_rotary(model: ir.Model, rot: Rotary, max_len: int) -> Tables:
    """The caches, read at positions 0..L-1 (_read_tables). Where they are not a function of the position alone
    because a scalar condition on the largest position id switches them (longrope: inv_freq = Where(max(position_ids)
    + 1 > original_max_position_embeddings, long, short)), the two regimes are read with the condition pinned, and
    the threshold on the total length is found by evaluating the condition (_length_switch)."""
    try:
        return Tables(*_read_tables(model, rot, max_len))
    except Refuse as exc:
        if "not a function of the position alone" not in str(exc):
            raise
        switch = _length_switch(model, rot, max_len)
        if switch is None:
            raise
    where, threshold = switch
    short = _pinned(model, where, False, lambda: _read_tables(model, rot, max_len))
    if threshold >= max_len:
        return Tables(*short)
    long = _pinned(model, where, True, lambda: _read_tables(model, rot, max_len))
    return Tables(*long) if threshold <= 0 else Tables(*short, long=long, threshold=threshold)


def _length_switch(model: ir.Model, rot: Rotary, max_len: int) -> tuple[ir.Node, int] | None:
    """(Where node, t0) when exactly one Where in the rotary cone has a scalar condition read from the position ids
    alone (or, in a model without a position input, from the shapes of its other inputs: the positions are then
    the last ones of the total length), and that condition holds exactly when the total length T exceeds t0, at
    every length probed. None otherwise."""
    graph = model.graph
    try:
        cone = probe.cone(graph, [rot.cos, rot.sin])
    except probe.ProbeError:
        return None
    pos_ins = [v for v in cone.inputs if input_role(v) == "position"]
    if len(pos_ins) > 1:
        return None
    pos = pos_ins[0] if pos_ins else None
    has_past = any(input_role(v) == "past" for v in graph.inputs)
    found = []
    for n in cone.nodes:
        d = dims_of(n.inputs[0]) if n.op_type == "Where" and n.domain == "" else None
        if d is None or not all(isinstance(x, int) for x in d) or int(np.prod(d)) != 1:
            continue
        try:
            c = probe.cone(graph, [n.inputs[0]])
        except probe.ProbeError:
            continue
        if pos is not None and [v.name for v in c.inputs] == [pos.name]:
            found.append((n, c))
        elif pos is None and c.inputs and not c.data_inputs:      # shapes only: the lengths
            found.append((n, c))
    if len(found) != 1:
        return None
    (where, where_cone), = found
    reads = {v.name for v in where_cone.inputs}

    def holds(total: int, batch: int = 1, seq: int | None = None) -> bool:
        seq = total if seq is None else seq
        if pos is not None:
            dtype = pos.dtype.numpy() if pos.dtype is not None else np.int64
            feeds = {pos.name: np.broadcast_to(np.arange(total - seq, total, dtype=dtype), (batch, seq)).copy()}
        else:
            feeds = make_inputs(graph, Scenario("switch", batch, seq, total - seq), seed=0, only=reads)
        return bool(probe.evaluate(graph, [where.inputs[0]], feeds)[0].reshape(-1)[0])

    try:
        lo, hi = 0, max_len            # smallest T in [1, max_len] where it holds, max_len + 1 if none
        if not holds(max_len):
            first = max_len + 1
        else:
            while hi - lo > 1:          # holds(hi) is true; holds(lo) false or lo = 0
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if holds(mid) else (mid, hi)
            first = hi
        t0 = first - 1
        probes = {t for t in (1, 2, 3, t0 - 1, t0, t0 + 1, t0 + 2, max_len // 2, max_len) if 1 <= t <= max_len}
        for t in sorted(probes):
            want = t > t0
            if holds(t) != want or holds(t, batch=2) != want:
                return None
            if (pos is not None or has_past) and (holds(t, seq=1) != want or
                                                   holds(t, batch=2, seq=min(t, 3)) != want):
                return None
    except probe.ProbeError:
        return None
    return where, t0


def _pinned(model: ir.Model, where: ir.Node, flag: bool, read):
    """read() with the Where's condition replaced by the constant `flag` for the time of the call."""
    cond = where.inputs[0]
    shape = tuple(int(x) for x in dims_of(cond))
    pin = ir.Value(name=f"fuse-gqa/pinned_{int(flag)}", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape(shape),
                   const_value=ir.tensor(np.full(shape, flag, dtype=np.bool_)))
    model.graph.register_initializer(pin)
    where.replace_input_with(0, pin)
    try:
        return read()
    finally:
        where.replace_input_with(0, cond)
        model.graph.initializers.pop(pin.name)


def _implied_positions(graph: ir.Graph, feeds: dict[str, np.ndarray], sc: Scenario, seq: int) -> np.ndarray:
    """The positions a model without a position input gives its `seq` new tokens (the tables' length as evaluated:
    a static model keeps its own): the last ones of the total length, which its mask's length states (a
    prefill-only model has no past, so they are 0..S-1 whatever the scenario says)."""
    masks = [feeds[v.name] for v in graph.inputs if input_role(v) == "mask" and v.name in feeds]
    has_past = any(input_role(v) == "past" for v in graph.inputs)
    total = masks[0].shape[-1] if masks and masks[0].ndim == 2 else sc.past + seq if has_past else seq
    return np.arange(total - seq, total)[None]


def _read_tables(model: ir.Model, rot: Rotary, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches (L, dim/2) that reproduce the graph's cos/sin at every position.

    L = max_len, or the mask's static length when the model accepts only that one. Static position_ids (1, n)
    are fed in chunks arange(k*n, (k+1)*n) until L positions are read."""
    reads = _cone_inputs(model.graph, [rot.cos, rot.sin], "rotary tables")
    pos_ins = [v for v in reads if input_role(v) == "position"]
    static_total = next((v.shape[1] for v in model.graph.inputs if input_role(v) == "mask" and v.shape is not None
                         and len(v.shape) == 2 and isinstance(v.shape[1], int)), None)
    length = min(max_len, static_total) if static_total else max_len

    def run(sc: Scenario, start: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feeds = make_inputs(model, sc, seed=1, only={v.name for v in reads})
        if start is not None and pos_ins:
            f = feeds[pos_ins[0].name]
            feeds[pos_ins[0].name] = np.broadcast_to(np.arange(start, start + f.shape[-1], dtype=f.dtype),
                                                     f.shape).copy()
        try:
            cos, sin = probe.evaluate(model.graph, [rot.cos, rot.sin], feeds)
        except probe.ProbeError as exc:
            raise Refuse(f"the rotary tables cannot be evaluated: {exc}") from None
        seq = cos.shape[1 if rot.bsnh else -2] if cos.ndim >= 2 else sc.seq
        pos = feeds[pos_ins[0].name] if pos_ins else _implied_positions(model.graph, feeds, sc, seq)
        shape = pos.shape[:-1] + (pos.shape[-1], rot.dim) if pos.ndim == 2 else (sc.batch, sc.seq, rot.dim)
        try:
            ax = 2 if rot.bsnh else 1      # the head axis of (B, 1, S, D) or (B, S, 1, D) tables
            cos = np.broadcast_to(np.squeeze(cos, axis=ax) if cos.ndim == 4 else cos, shape)
            sin = np.broadcast_to(np.squeeze(sin, axis=ax) if sin.ndim == 4 else sin, shape)
        except ValueError:
            raise Refuse(f"rotary tables of shape {cos.shape} do not broadcast to (B, 1, S, {rot.dim})") from None
        return cos, sin, np.broadcast_to(pos, shape[:2])

    cos, sin, pos = run(Scenario("tables", 1, length, 0), 0)
    while pos.shape[1] < length:      # static position_ids: read the next chunk of positions
        if not pos_ins:
            raise Refuse(f"the rotary tables cannot be read for {length} positions (static shapes, no position_ids)")
        c, s, p = run(Scenario("tables", 1, length, 0), int(pos[0, -1]) + 1)
        cos, sin, pos = (np.concatenate([x, y], axis=1) for x, y in ((cos, c), (sin, s), (pos, p)))
    if not np.array_equal(pos[0], np.arange(pos.shape[1])):
        raise Refuse("the rotary tables probe does not read positions 0..L-1")
    half = rot.dim // 2
    lo, hi = (slice(0, None, 2), slice(1, None, 2)) if rot.interleaved else (slice(0, half), slice(half, None))
    if not (np.allclose(cos[..., lo], cos[..., hi]) and np.allclose(sin[..., lo], sin[..., hi])):
        raise Refuse("cos/sin are not two equal halves (not the rotate-half layout)" if not rot.interleaved else
                     "cos/sin are not repeated pairwise (not the interleaved layout)")
    cos_cache, sin_cache = cos[0, :, lo].astype(np.float32), sin[0, :, lo].astype(np.float32)
    # The table was read at one total length (L); the tables must also be these rows at other total lengths: a
    # chunk of a batch of two, and single tokens after caches of growing lengths (a switch on the total length,
    # as longrope's, shows up between two of them).
    checks = [Scenario("positions", 2, 4, 3)]
    if not static_total:
        # a model without position input or cache is checked on prefills of the same growing lengths
        one_step = bool(pos_ins) or any(input_role(v) == "past" for v in model.graph.inputs)
        total = 1
        while total < len(cos_cache):
            checks.append(Scenario("positions", 1, 1, total - 1) if one_step else Scenario("positions", 1, total, 0))
            total = total * 3 // 2 + 1
    for sc in checks:
        c2, s2, pos = run(sc)
        if static_total and pos_ins and pos.max() >= len(cos_cache):    # static: positions the model can be given
            c2, s2, pos = run(sc, max(0, len(cos_cache) - pos.shape[1]))
        if pos.max() >= len(cos_cache) or not (np.allclose(c2[..., lo], cos_cache[pos], atol=1e-6)
                                               and np.allclose(s2[..., lo], sin_cache[pos], atol=1e-6)):
            raise Refuse("cos/sin are not a function of the position alone")
    return cos_cache, sin_cache


# -------------------------------------------------------------------------------------------------- rewrite
_Builder = GraphWriter


def _flat(b: _Builder, x4: ir.Value, anchor: ir.Node) -> ir.Value:
    """(B, S, N, H) -> (B, S, N*H): reuse the Reshape source when x4 is a Reshape of a 3-D value."""
    r = _prod(x4, "Reshape")
    dx = _dims(x4)
    d = _dims(r.inputs[0]) if r is not None else None
    if d is not None and len(d) == 3 and isinstance(d[2], int) and d[2] == dx[2] * dx[3] and d[:2] == dx[:2]:
        return r.inputs[0]
    shape = b.const(np.array([0, 0, -1], dtype=np.int64), "flat_shape")
    out = b.node("Reshape", [x4, shape], anchor).outputs[0]
    out.dtype = x4.dtype
    out.shape = ir.Shape([dx[0], dx[1], dx[2] * dx[3]])
    return out


def _renorm(b: _Builder, x4: ir.Value, norm: ir.Node | None, anchor: ir.Node) -> ir.Value:
    """Norm(x4) on the BSNH view: the same last-axis norm, weights and attributes, before the head transpose."""
    if norm is None:
        return x4
    out = b.node(norm.op_type, [x4, *norm.inputs[1:]], anchor,
                 **{k: a.value for k, a in norm.attributes.items()}).outputs[0]
    out.dtype, out.shape = norm.outputs[0].dtype or x4.dtype, x4.shape
    return out


def _bnsh_to_flat(b: _Builder, x: ir.Value, anchor: ir.Node, dtype: ir.DataType) -> ir.Value:
    t = b.node("Transpose", [x], anchor, perm=[0, 2, 1, 3]).outputs[0]
    t.dtype = x.dtype or dtype
    dx = _dims(x)
    t.shape = ir.Shape([dx[0], dx[2], dx[1], dx[3]])
    return _flat(b, t, anchor)


def _cache_values(b: _Builder, t: Tables, total: ir.Value, dtype) -> tuple[ir.Value, ir.Value]:
    """cos_cache / sin_cache inputs. Switched tables are stored stacked, [short; long] (2L rows), and each run
    slices the L rows its total length selects: start = L * (total > threshold)."""
    if t.long is None:
        return b.const(t.cos.astype(dtype), "cos_cache"), b.const(t.sin.astype(dtype), "sin_cache")
    n = len(t.cos)
    over = b.node("Greater", [total, b.const(np.array(t.threshold, np.int32), "threshold")], None).outputs[0]
    start = b.node("Mul", [b.node("Cast", [over], None, to=ir.DataType.INT64).outputs[0],
                           b.const(np.array([n], np.int64), "rows")], None).outputs[0]
    end = b.node("Add", [start, b.const(np.array([n], np.int64), "rows")], None).outputs[0]
    axes = b.const(np.array([0], np.int64), "axes")
    out = []
    for stem, short, long in (("cos_cache", t.cos, t.long[0]), ("sin_cache", t.sin, t.long[1])):
        both = b.const(np.concatenate([short, long]).astype(dtype), f"{stem}_short_long")
        v = b.node("Slice", [both, start, end, axes], None).outputs[0]
        v.dtype, v.shape = ir.DataType.from_numpy(np.dtype(dtype)), ir.Shape([n, short.shape[1]])
        out.append(v)
    return out[0], out[1]


def _seq_inputs(b: _Builder, src: Lengths, opset: int) -> tuple[ir.Value, ir.Value]:
    """seqlens_k and total_sequence_length (int32), computed once.

    From a mask: seqlens_k = ReduceSum(mask, 1) - 1, total = Gather(Shape(mask), 1). From shapes (no mask): total =
    S + P (S = rows' axis 1, P = the past's axis 2, 0 without one) and seqlens_k = ConstantOfShape([B], 0) +
    (total - 1). Opset-correct for 11..23: ReduceSum takes axes as an input from opset 13 (an attribute before),
    and dims are Gathers of the whole Shape (Shape's start/end exist only from opset 15)."""
    def dim(v: ir.Value, axis, stem: str) -> ir.Value:
        shp = b.node("Shape", [v], None).outputs[0]
        return b.node("Gather", [shp, b.const(np.array(axis, dtype=np.int64), stem)], None, axis=0).outputs[0]

    one = b.const(np.array(1, dtype=np.int64), "one")
    if src.mask is not None:
        m64 = b.node("Cast", [src.mask], None, to=ir.DataType.INT64).outputs[0]
        if opset >= 13:
            total = b.node("ReduceSum", [m64, b.const(np.array([1], dtype=np.int64), "axes")], None, keepdims=0)
        else:
            total = b.node("ReduceSum", [m64], None, axes=[1], keepdims=0)
        last = b.node("Sub", [total.outputs[0], one], None).outputs[0]
        width, batch = dim(src.mask, 1, "one"), src.mask.shape[0]
    else:
        width = dim(src.rows, 1, "one")
        if src.past is not None:
            width = b.node("Add", [width, dim(src.past, 2, "two")], None).outputs[0]
        zeros = b.node("ConstantOfShape", [dim(src.rows, [0], "zero")], None,
                       value=ir.tensor(np.array([0], dtype=np.int64))).outputs[0]
        last = b.node("Add", [zeros, b.node("Sub", [width, one], None).outputs[0]], None).outputs[0]
        batch = src.rows.shape[0] if src.rows.shape is not None else None
    seqlens = b.node("Cast", [last], None, to=ir.DataType.INT32).outputs[0]
    tot = b.node("Cast", [width], None, to=ir.DataType.INT32).outputs[0]
    seqlens.dtype, seqlens.shape = ir.DataType.INT32, ir.Shape([batch])
    tot.dtype, tot.shape = ir.DataType.INT32, ir.Shape([])
    return seqlens, tot


@register_pass
class FuseGQA(Pass):
    """Causal self-attention with rotary and KV cache -> com.microsoft GroupQueryAttention."""

    name = "fuse-gqa"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 17)
        max_len = int(ctx.option("max_seq_len") or DEFAULT_MAX_SEQ_LEN)
        has_past = any(input_role(v) == "past" for v in graph.inputs)
        b = _Builder(graph, "fuse-gqa")
        seq_cache: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        mask_cache: dict[tuple, tuple[ir.Value, int]] = {}
        rot_cache: dict[tuple[int, int], Tables] = {}
        cache_values: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        counts: dict[str, int] = {}
        for sm in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
            try:
                site = _parse_site(sm)
                if site.head % 8:
                    raise Refuse(f"head size {site.head} is not a multiple of 8 (GroupQueryAttention)")
                if site.past_k is not None and dims_of(site.past_k)[1] != site.kv_heads:
                    raise Refuse("the past KV is not BNSH with the KV head count")
                mkey = (id(site.mask), site.mask_kind, site.mask_scale)
                if mkey not in mask_cache:
                    mask_cache[mkey] = _probe_mask(model, site, has_past, max_len)
                mask_in, window = mask_cache[mkey]
                do_rotary = site.rotary is not None and site.head % 16 == 0 and (site.rotary.dim // 2) % 8 == 0
                tables = None
                if do_rotary:
                    key = (id(site.rotary.cos), id(site.rotary.sin))
                    if key not in rot_cache:
                        try:
                            rot_cache[key] = _probe_rotary(model, site.rotary, max_len)
                        except Refuse as exc:
                            # the kernel cannot derive these tables; the graph's own rotation stays outside it
                            rot_cache[key] = exc
                            ctx.notes.append(f"fuse-gqa: rotary at {sm.name} stays outside GroupQueryAttention: "
                                             f"{exc}")
                    tables = rot_cache[key]
                    if isinstance(tables, Refuse):
                        do_rotary, tables = False, None
            except (Refuse, ValueError, IndexError, TypeError) as exc:   # an unexpected graph is refused, never fatal
                if sm.outputs[0].uses():
                    why = exc if isinstance(exc, Refuse) else f"unexpected graph ({type(exc).__name__}: {exc})"
                    ctx.notes.append(f"fuse-gqa: attention at {sm.name} not fused: {why}")
                continue
            src = _lengths(model, site, mask_in)
            skey = (id(src.mask), id(src.rows), id(src.past))
            if skey not in seq_cache:
                seq_cache[skey] = _seq_inputs(b, src, opset)
            seqlens, total = seq_cache[skey]
            caches = None
            if tables is not None:
                ckey = (id(tables), id(total) if tables.long is not None else None)
                if ckey not in cache_values:
                    cache_values[ckey] = _cache_values(b, tables, total, site.q.dtype.numpy())
                caches = cache_values[ckey]
            anchor = site.anchor
            if do_rotary or site.rotary is None:
                q, k = (_flat(b, _renorm(b, x4, nm, anchor), anchor)
                        for x4, nm in ((site.q, site.q_norm), (site.k, site.k_norm)))
            elif site.rotated4 is not None:
                q, k = (_flat(b, x, anchor) for x in site.rotated4)
            else:
                q, k = (_bnsh_to_flat(b, x, anchor, site.v.dtype) for x in (site.q_rot, site.k_rot))
            v = _flat(b, site.v, anchor)
            inputs = [q, k, v, site.past_k, site.past_v, seqlens, total]
            attrs = {"num_heads": site.num_heads, "kv_num_heads": site.kv_heads, "scale": float(site.scale),
                     "local_window_size": window, "do_rotary": int(do_rotary),
                     "rotary_interleaved": int(do_rotary and site.rotary.interleaved)}
            if site.softcap:
                attrs["softcap"] = float(site.softcap)
            if caches:
                inputs += list(caches)
            node = b.node("GroupQueryAttention", inputs, anchor, domain=MS, n_out=3, **attrs)
            out, pk, pv = node.outputs
            out.dtype = site.v.dtype
            if site.out.dtype is not None and site.out.dtype != out.dtype:    # attention computed in a wider type
                out.shape = site.out.shape
                out = b.node("Cast", [out], anchor, to=site.out.dtype).outputs[0]
                out.dtype = site.out.dtype
            for new, old in ((pk, site.present_k), (pv, site.present_v)):
                new.dtype = old.dtype or site.v.dtype
                new.shape = old.shape
            replace_value(site.out, out)
            if site.past_k is not None or site.present_k.is_graph_output():
                replace_value(site.present_k, pk)
                replace_value(site.present_v, pv)
            counts["fuse-gqa"] = counts.get("fuse-gqa", 0) + 1
            if site.rotary is not None:
                key = "fuse-gqa/rotary-inside" if do_rotary else "fuse-gqa/rotary-outside"
                counts[key] = counts.get(key, 0) + 1
        if counts:
            if MS not in model.opset_imports:
                model.opset_imports[MS] = 1
            graph.sort()
        return PassResult(model, bool(counts), counts)
