"""In-place KV cache: whether a compiled decoder may keep its cache in one preallocated buffer per past input.

A decoder exported with a KV cache takes `past` (B, N, P, H) and returns `present` (B, N, P + S, H): every token
the runtime hands the whole cache in and gets a copy one position longer back. GroupQueryAttention reads how much
of the cache is valid from `seqlens_k` (from the attention mask), not from the past's shape, and onnxruntime lets
its past and present share one buffer of a fixed capacity (B, N, C, H): the kernel then writes the new positions in
place and copies nothing (`past_present_share_buffer`; onnxruntime-genai runs GQA models this way).

That holds for a whole model only when every past input is read by GroupQueryAttention alone, as its past_key
(input 3) or past_value (input 4), and the same node's present (output 1 or 2) is the graph output that follows
it. `shared_cache_pairs` checks this on the graph; `check_shared` runs the model both ways on the verification
inputs and compares, so the claim in the compile report is measured, not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .errors import first_line
from .verify import compare, input_role, narrow_feeds, session_for

_PAST_INPUT_TO_OUTPUT = {3: 1, 4: 2}      # GroupQueryAttention: past_key -> present_key, past_value -> present_value


@dataclass
class CacheLayout:
    pairs: list[tuple[str, str]] = field(default_factory=list)    # (past input, present output), graph order
    reason: str = ""                                               # why the cache cannot be shared; "" if it can

    @property
    def shareable(self) -> bool:
        return bool(self.pairs) and not self.reason


def shared_cache_pairs(model: ir.Model) -> CacheLayout:
    """The (past, present) pairs that may share a buffer, or the reason the model's cache cannot."""
    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    pasts = [v for v in graph.inputs if not v.is_initializer() and input_role(v) == "past"]
    if not pasts:
        return CacheLayout(reason="the model has no past key/value inputs")
    pairs = []
    for v in pasts:
        uses = list(v.uses())
        bad = [u for u in uses if not (u.node.op_type == "GroupQueryAttention" and u.node.domain == "com.microsoft"
                                       and u.idx in _PAST_INPUT_TO_OUTPUT)]
        if not uses or bad:
            what = f"{bad[0].node.op_type} (input {bad[0].idx})" if bad else "nothing"
            return CacheLayout(reason=f"past input '{v.name}' is read by {what}, not by GroupQueryAttention alone")
        presents = {id(u.node.outputs[_PAST_INPUT_TO_OUTPUT[u.idx]]): u.node.outputs[_PAST_INPUT_TO_OUTPUT[u.idx]]
                    for u in uses if len(u.node.outputs) > _PAST_INPUT_TO_OUTPUT[u.idx]}
        if len(presents) != 1 or next(iter(presents)) not in outputs:
            return CacheLayout(reason=f"past input '{v.name}' has no single present graph output")
        present = next(iter(presents.values()))
        if v.shape is not None and v.shape.rank() != 4:
            return CacheLayout(reason=f"past input '{v.name}' is not (batch, heads, length, head size)")
        if v.shape is not None and isinstance(v.shape[2], int):
            return CacheLayout(reason=f"past input '{v.name}' has a fixed length ({v.shape[2]}): a buffer with room "
                               "for more positions does not fit it")
        pairs.append((v.name, present.name))
    return CacheLayout(pairs)


def bind_shared(session: Any, feeds: dict[str, np.ndarray], pairs: list[tuple[str, str]], capacity: int,
                device: str = "cpu") -> tuple[Any, list[str], dict[str, Any]]:
    """An IOBinding of `session` with each past and its present bound to one buffer of `capacity` positions, the
    past copied into its head, and the other outputs left to onnxruntime (bound first, in session order). Returns
    (binding, those outputs' names, {present name: buffer}); the binding may be run again and again. On another
    `device` ("cuda") every input and buffer lives there, and each buffer is returned as its OrtValue."""
    import onnxruntime as ort

    present_of = dict(pairs)
    binding = session.io_binding()
    presents = set(present_of.values())
    others = [o.name for o in session.get_outputs() if o.name not in presents]
    for n in others:                        # bound first, so get_outputs() lists them first, in this order
        binding.bind_output(n, device)
    buffers: dict[str, Any] = {}
    for name, a in feeds.items():
        if name in present_of:
            if a.ndim != 4 or a.shape[2] > capacity:
                raise ValueError(f"past '{name}' of shape {list(a.shape)} does not fit a {capacity}-position buffer")
            buf = np.zeros(a.shape[:2] + (capacity,) + a.shape[3:], dtype=a.dtype)
            buf[:, :, :a.shape[2]] = a
            value = ort.OrtValue.ortvalue_from_numpy(buf, device, 0)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present_of[name], value)
            buffers[present_of[name]] = buf if device == "cpu" else value
        else:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0))
    return binding, others, buffers


def run_shared(session: Any, feeds: dict[str, np.ndarray], pairs: list[tuple[str, str]], capacity: int, new: int
               ) -> dict[str, np.ndarray]:
    """One run of `session` bound as bind_shared binds it. Returns every output; a present is the buffer cut to
    the past's and the `new` positions (see appended_positions)."""
    pasts = {p for p, _ in pairs}
    past = max((a.shape[2] for n, a in feeds.items() if n in pasts and a.ndim == 4), default=0)
    if past + new > capacity:
        raise ValueError(f"{past} cached and {new} new positions do not fit a {capacity}-position buffer")
    binding, others, buffers = bind_shared(session, feeds, pairs, capacity)
    session.run_with_iobinding(binding)
    got = binding.get_outputs()
    result = {n: got[k].numpy() for k, n in enumerate(others)}
    for n, buf in buffers.items():
        result[n] = buf[:, :, :past + new].copy()
    return {o.name: result[o.name] for o in session.get_outputs()}


def appended_positions(model: ir.Model, feeds: dict[str, np.ndarray]) -> int:
    """How many positions a run on `feeds` appends to the cache: the mask's length minus the past's, or the
    length of the token ids where the model has no mask."""
    roles = {v.name: input_role(v) for v in model.graph.inputs}
    past = next((a.shape[2] for n, a in feeds.items() if roles.get(n) == "past" and a.ndim == 4), 0)
    for role, minus in (("mask", past), ("ids", 0), ("position", 0)):
        arrays = [a for n, a in feeds.items() if roles.get(n) == role and a.ndim >= 1]
        if arrays:
            return int(arrays[0].shape[-1]) - int(minus)
    return 1


def check_shared(path: str | Path, model: ir.Model, feeds_list: list[dict[str, np.ndarray]],
                 tolerance_dtype: str | None = None, slack: int = 8) -> dict[str, Any]:
    """check_session on a session of the model at `path`."""
    layout = shared_cache_pairs(model)
    if not layout.shareable:
        return {"status": "not applicable", "reason": layout.reason}
    try:
        session = session_for(path)
    except Exception as exc:        # noqa: BLE001 - onnxruntime raises its own types
        return {"status": "not run", "reason": f"onnxruntime cannot load it ({first_line(exc)})"}
    return check_session(session, model, feeds_list, tolerance_dtype, slack)


def check_session(session: Any, model: ir.Model, feeds_list: list[dict[str, np.ndarray]],
                  tolerance_dtype: str | None = None, slack: int = 8,
                  outputs: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Run the model on each feed with a non-empty past and a full mask both ways (a fresh present per run, and
    past and present in one buffer of past + new + `slack` positions) and compare every output. `outputs`, when
    given, are the session's outputs on each feed already (verification's run): the copying way is not run again.
    Returns a report: status "verified", "differs", "not applicable" or "not run", with a reason."""
    layout = shared_cache_pairs(model)
    if not layout.shareable:
        return {"status": "not applicable", "reason": layout.reason}
    present_of = dict(layout.pairs)
    masks = {v.name for v in model.graph.inputs if input_role(v) == "mask"}
    cases = [(k, f) for k, f in enumerate(feeds_list)
             if any(n in present_of and a.ndim == 4 and a.shape[2] > 0 for n, a in f.items())
             and all(np.all(a) for n, a in f.items() if n in masks)]
    if not cases:
        return {"status": "not run", "reason": "no verification input has a non-empty past and a full mask"}
    worst = 0.0
    try:
        for k, feeds in cases:
            feeds = narrow_feeds(feeds, session)
            ref = outputs[k] if outputs is not None else \
                dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            new = appended_positions(model, feeds)
            capacity = max(a.shape[2] for n, a in feeds.items() if n in present_of) + new + slack
            got = run_shared(session, feeds, layout.pairs, capacity, new)
            for name, r in ref.items():
                c = compare(r, got[name], name, tolerance_dtype)
                if not c.ok:
                    return {"status": "differs", "reason": f"output '{name}' differs with a shared cache buffer "
                            f"(max abs error {c.max_abs:.3g})"}
                worst = max(worst, c.max_rel)
    except Exception as exc:        # noqa: BLE001 - onnxruntime refuses the binding: the cache cannot be shared
        return {"status": "differs", "reason": f"onnxruntime cannot run it with a shared cache buffer "
                f"({first_line(exc)})"}
    return {"status": "verified", "reason": "", "pairs": len(layout.pairs), "runs": len(cases), "max_rel": worst}
