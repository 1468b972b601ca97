"""The mask of an attention site, proved by evaluation (compiler/probe.py) to be a canonical description:
causal, the padding of one attention_mask input (or no padding at all), and a sliding window of W keys or none.

For GroupQueryAttention (probe_mask): evaluated on a right-padded prefill, a decode step and a chunked prefill, it must show exactly the
causal rule, the padding of attention_mask (none without that input) and, when present, a sliding window of W
keys (local_window_size) on every non-padded query row. This is GroupQueryAttention's contract: right padding,
positions continuing the past.
Static input dims override the probes' sizes; a window is invisible at a length <= W, so with a static mask
length (the only length the model accepts) "no window" is proven there, and with a dynamic one a window probe
that static dims keep short is a refusal.

For Attention / MultiHeadAttention (probe_padding_mask): the mask's operands, evaluated on two probe sizes with
random 0/1 masks, must give the key padding of one 2-D input, optionally AND the causal rule, hidden entries at most
LARGE_NEGATIVE (or -inf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxc import probe
from onnxc.attention_core import Site, cone_inputs
from onnxc.coverage import Refusal
from onnxc.verify import Scenario, input_role, make_inputs

LARGE_NEGATIVE = -1e4          # a hidden additive-mask entry must be at most this (or -inf)


def _visible(arr: np.ndarray, kind: str, scale: float = 1.0) -> np.ndarray:
    if kind == "bias":
        a = arr.astype(np.float64) * scale
        if not np.all((a == 0) | (a <= -1e4)):
            raise Refusal("the additive mask holds values other than 0 and a large negative (a bias, not a mask)")
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


class _Unevaluable(Refusal):
    """The mask's producers fail on the probe's inputs."""


@dataclass(frozen=True)
class Lengths:
    """Where GroupQueryAttention's seqlens_k and total length are read: the attention_mask input (row sums, width),
    or, for a mask made from shapes alone (nothing padded), a (B, S, ...) value and the past (B, KV, P, H)."""
    mask: ir.Value | None = None
    rows: ir.Value | None = None
    past: ir.Value | None = None


def lengths(site: Site, mask_in: ir.Value | None, reads: list[ir.Value]) -> Lengths:
    """The mask's own sources (`reads`: the graph inputs its cone reads, as probe_mask returns them) where it reads
    one ids input and at most one past input, else the site's q/past."""
    if mask_in is not None:
        return Lengths(mask=mask_in)
    ids = [v for v in reads if input_role(v) == "ids" and v.shape is not None and len(v.shape) == 2]
    pasts = [v for v in reads if input_role(v) == "past" and v.shape is not None and len(v.shape) == 4]
    rows = ids[0] if len(ids) == 1 else site.q
    past = pasts[0] if len(pasts) == 1 else site.past_k
    return Lengths(rows=rows, past=past)


def probe_mask(model: ir.Model, site: Site, has_past: bool, max_len: int
               ) -> tuple[ir.Value | None, int, list[ir.Value]]:
    """Prove the mask is causal + right padding (+ a window); return (attention_mask input, window or -1, the graph
    inputs the mask reads).

    A mask computed from shapes alone (the model takes no attention_mask) must be causal (+ a window) with nothing
    padded; the attention_mask input returned is then None.

    Static input dims override the probes' sizes. A window of W keys cannot be seen at a total length <= W, so
    when the mask's length is static (the model accepts that one length) "no window" is proven at that length;
    when the window probe comes out shorter than asked for a dynamic length, the site is refused."""
    reads = cone_inputs(model.graph, [site.mask], "mask")
    masks = [v for v in reads if input_role(v) == "mask"]
    if len(masks) > 1 or (masks and (masks[0].shape is None or len(masks[0].shape) != 2)):
        raise Refusal("the mask does not come from one 2-D attention_mask input")
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
            raise _Unevaluable(f"the mask cannot be evaluated: {exc}") from None
        act = _actual(model, feeds, m, sc)
        if m is None:
            m = np.ones((act.batch, act.past + act.seq), dtype=np.int64)
        if arr.ndim < 4:    # added to (B, N, S, T) scores, a lower rank broadcasts from the right
            arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
        if arr.ndim != 4 or act.seq < 1:
            raise Refusal(f"the mask is not (B, N, S, T) ({sc.name} probe: shape {arr.shape})")
        try:
            vis = np.broadcast_to(_visible(arr, site.mask_kind, site.mask_scale), (act.batch, arr.shape[1], act.seq, act.past + act.seq))
        except ValueError:
            raise Refusal(f"the mask of shape {arr.shape} is not (B, N, S, T) for {act}") from None
        if not (vis == vis[:, :1]).all():
            raise Refusal("the mask differs between heads")
        return vis[:, 0], m, act

    scenarios = [(Scenario("prefill", 2, 6, 0), 2)]
    if has_past:
        scenarios += [(Scenario("decode", 2, 1, 5), 0), (Scenario("chunk", 1, 3, 4), 0)]
    length = max_len if has_past else min(max_len, 1024)
    while True:     # a length the model cannot evaluate (a table of positions ends first) is one it cannot run
        long = Scenario("window", 1, 1, length - 1) if has_past else Scenario("window", 1, length, 0)
        try:
            vis, _, act = run(long)
            break
        except _Unevaluable:
            if length <= 16:
                raise
            length //= 2
    if act.past + act.seq < long.past + long.seq and not static_total:
        raise Refusal(f"the window probe cannot be sized: static dims give length {act.past + act.seq}, "
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
            raise Refusal(f"the mask is not causal + padding{' + window' if window > 0 else ''} ({sc.name} probe)")
    return mask_in, window, reads


# -------------------------------------------------------------------------------------------- padding masks
def keep_table(values: list[np.ndarray], kinds: list[str]) -> tuple[np.ndarray, set[float]]:
    """Combine the probed mask operands into a bool keep table and the set of hidden values."""
    keep, hidden = None, set()
    for arr, kind in zip(values, kinds):
        if kind == "cond":
            k = np.asarray(arr).astype(bool)
        else:
            a = np.asarray(arr, np.float64)
            k = a == 0
            bad = a[~k]
            if bad.size and not np.all(bad <= LARGE_NEGATIVE):
                raise Refusal("mask holds values other than 0 and large negatives (a position bias?)")
            hidden |= {float(x) for x in np.unique(bad)}
        keep = k if keep is None else keep & k
    return keep, hidden


def probe_padding_mask(values: list[ir.Value], kinds: list[str], graph: ir.Graph, past: bool) -> dict[str, Any]:
    """The mask whose operands are `values` ("bias": additive, "cond": a boolean keep condition), proved on probe
    inputs to be the key padding of one 2-D input, causal, both or neither: {mask_input (None without padding),
    causal, hidden (the values hidden entries hold)}; a Refusal otherwise."""
    try:
        data_in = probe.cone(graph, values).data_inputs
    except probe.ProbeError as exc:
        raise Refusal(f"mask cannot be evaluated: {exc}") from None
    if len(data_in) > 1:
        raise Refusal("mask reads the data of several graph inputs: "
                       + ", ".join(sorted(v.name or "?" for v in data_in)))
    mask_in = data_in[0] if data_in else None
    if mask_in is not None and (mask_in.shape is None or len(mask_in.shape) != 2):
        raise Refusal(f"mask input '{mask_in.name}' is not 2-D (batch, keys)")
    scenarios = [Scenario("probe", 2, 4, 3), Scenario("probe", 3, 2, 5)] if past else \
        [Scenario("probe", 2, 5, 0), Scenario("probe", 3, 3, 0)]
    candidates = [(p, c) for p in (True, False) for c in (True, False) if mask_in is not None or not p]
    hidden: set[float] = set()
    for seed, sc in enumerate(scenarios):
        pad = None
        feeds = make_inputs(graph, sc, seed)
        if mask_in is not None:
            shape = feeds[mask_in.name].shape
            pad = np.random.default_rng(100 + seed).random(shape) < 0.6
            feeds[mask_in.name] = pad.astype(feeds[mask_in.name].dtype)
        try:
            arrays = probe.evaluate(graph, values, feeds)
        except probe.ProbeError as exc:
            raise Refusal(f"mask could not be evaluated on probe inputs: {exc}") from None
        keep, h = keep_table(arrays, kinds)
        hidden |= h
        if keep.ndim != 4 or keep.shape[-1] < 2:
            raise Refusal(f"mask of shape {keep.shape} is not (batch, heads, queries, keys)")
        b, _, s, t = keep.shape
        if pad is not None and (pad.shape[1] != t or b not in (1, pad.shape[0])):
            raise Refusal(f"mask of shape {keep.shape} does not index keys by mask input '{mask_in.name}' "
                           f"{pad.shape}")
        batch = pad.shape[0] if pad is not None else b
        i, j = np.arange(s)[:, None], np.arange(t)[None, :]
        causal_table = j <= (t - s) + i
        full = np.broadcast_to(keep, (batch, keep.shape[1], s, t))
        candidates = [(p, c) for p, c in candidates if np.array_equal(
            full, np.broadcast_to((pad[:, None, None, :] if p else True) & (causal_table if c else True),
                                  full.shape))]
        if not candidates:
            raise Refusal("mask is neither key padding nor key padding + causal")
        if s == 1:
            candidates = [(p, c) for p, c in candidates if not c] or candidates
    padding, causal = candidates[0]
    return {"mask_input": mask_in if padding else None, "causal": causal, "hidden": hidden}


def probe_bias_fits(graph: ir.Graph, bias: ir.Value, scores: ir.Value, past: bool, rows: bool = False) -> bool:
    """Prove on two probe sizes that an additive term broadcasts onto the scores as MultiHeadAttention's
    attention_bias does: (batch or 1, heads or 1, queries, keys) with the scores' (B, N, S, T); with `rows`, one
    row for every query is accepted too (the caller expands it), and the answer says whether it was one row. Both
    shapes are evaluated (probe.evaluate(shapes=True): no weight or table is read). A Refusal when they cannot be
    evaluated or the term's shape does not fit."""
    scenarios = [Scenario("probe", 2, 4, 3), Scenario("probe", 3, 2, 5)] if past else \
        [Scenario("probe", 2, 5, 0), Scenario("probe", 3, 3, 0)]
    one_row = False
    for seed, sc in enumerate(scenarios):
        try:
            got, want = (tuple(int(x) for x in a) for a in
                         probe.evaluate(graph, [bias, scores], make_inputs(graph, sc, seed), shapes=True))
        except probe.ProbeError as exc:
            raise Refusal(f"the bias added to the scores cannot be evaluated: {exc}") from None
        if len(want) != 4:
            raise Refusal(f"the scores are not 4-D (shape {want})")
        row = rows and len(got) == 4 and got[2] == 1 and want[2] > 1
        one_row |= row
        if len(got) != 4 or got[3] != want[3] or got[2] != want[2] and not row or got[0] not in (1, want[0]) or \
                got[1] not in (1, want[1]):
            raise Refusal(f"the bias added to the scores has shape {got} where the scores are {want}")
    return one_row
