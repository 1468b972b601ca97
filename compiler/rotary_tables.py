"""Rotary tables read off a graph by evaluation: the cos/sin caches (L, dim/2) GroupQueryAttention takes.

the rotary tables: cos and sin are evaluated for positions 0..L-1 (L = option max_seq_len, default 4096, or the
static mask length; static position_ids are fed in chunks) and must be the same [c, c] halves (pairs [c0, c0,
c1, c1, ...] when interleaved) at every position ids the model is given (a chunk of a batch of two, and single
tokens after caches of growing lengths); they become cos_cache / sin_cache. Longrope (Phi-3.5, Phi-4-mini)
switches its frequencies on the largest position id: inv_freq = Where(max(position_ids) + 1 > M, long, short).
When exactly one scalar Where in the cone reads the position ids alone, and evaluating it shows it holds exactly
when the total length T exceeds some t0 (at every length probed, for a prefill, a decode step and a batch of
two), both regimes are read with the condition pinned and stored stacked ([short; long], 2L rows); each run
slices L rows from row L * (total_sequence_length > t0). Same semantics: cached keys keep the rotation they got.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxc import probe
from onnxc.attention_core import cone_inputs
from onnxc.coverage import Refusal
from onnxc.rotary import Rotary
from onnxc.shapes import dims_of
from onnxc.verify import Scenario, input_role, make_inputs


@dataclass
class Tables:
    """cos/sin caches (L, dim/2); with a length switch, `long` holds the caches used once the total length (past +
    new) exceeds `threshold` and cos/sin the ones used up to it."""
    cos: np.ndarray
    sin: np.ndarray
    long: tuple[np.ndarray, np.ndarray] | None = None
    threshold: int = 0


def probe_rotary(model: ir.Model, rot: Rotary, max_len: int) -> Tables:
    """The caches, read at positions 0..L-1 (_read_tables). Where they are not a function of the position alone
    because a scalar condition on the largest position id switches them (longrope: inv_freq = Where(max(position_ids)
    + 1 > original_max_position_embeddings, long, short)), the two regimes are read with the condition pinned, and
    the threshold on the total length is found by evaluating the condition (_length_switch)."""
    try:
        return Tables(*_read_tables(model, rot, max_len))
    except Refusal as exc:
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
    reads = cone_inputs(model.graph, [rot.cos, rot.sin], "rotary tables")
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
            raise Refusal(f"the rotary tables cannot be evaluated: {exc}") from None
        seq = cos.shape[1 if rot.bsnh else -2] if cos.ndim >= 2 else sc.seq
        pos = feeds[pos_ins[0].name] if pos_ins else _implied_positions(model.graph, feeds, sc, seq)
        shape = pos.shape[:-1] + (pos.shape[-1], rot.dim) if pos.ndim == 2 else (sc.batch, sc.seq, rot.dim)
        try:
            ax = 2 if rot.bsnh else 1      # the head axis of (B, 1, S, D) or (B, S, 1, D) tables
            cos = np.broadcast_to(np.squeeze(cos, axis=ax) if cos.ndim == 4 else cos, shape)
            sin = np.broadcast_to(np.squeeze(sin, axis=ax) if sin.ndim == 4 else sin, shape)
        except ValueError:
            raise Refusal(f"rotary tables of shape {cos.shape} do not broadcast to (B, 1, S, {rot.dim})") from None
        return cos, sin, np.broadcast_to(pos, shape[:2])

    cos, sin, pos = run(Scenario("tables", 1, length, 0), 0)
    while pos.shape[1] < length:      # static position_ids: read the next chunk of positions
        if not pos_ins:
            raise Refusal(f"the rotary tables cannot be read for {length} positions (static shapes, no position_ids)")
        c, s, p = run(Scenario("tables", 1, length, 0), int(pos[0, -1]) + 1)
        cos, sin, pos = (np.concatenate([x, y], axis=1) for x, y in ((cos, c), (sin, s), (pos, p)))
    if not np.array_equal(pos[0], np.arange(pos.shape[1])):
        raise Refusal("the rotary tables probe does not read positions 0..L-1")
    half = rot.dim // 2
    lo, hi = (slice(0, None, 2), slice(1, None, 2)) if rot.interleaved else (slice(0, half), slice(half, None))
    if not (np.allclose(cos[..., lo], cos[..., hi]) and np.allclose(sin[..., lo], sin[..., hi])):
        raise Refusal("cos/sin are not two equal halves (not the rotate-half layout)" if not rot.interleaved else
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
            raise Refusal("cos/sin are not a function of the position alone")
    return cos_cache, sin_cache


# -------------------------------------------------------------------------------------------------- rewrite
