"""Activation statistics for static int8 quantization: the values a linear layer reads, observed on the --calibration
batches in one onnxruntime session of the float graph (kernels/calibrate.py turns them into ranges).

The graph as the quantize pass finds it is saved to the scratch folder with the observed values as its only outputs
(calibration._save_exposing: nodes that feed none of them are dropped) and run without graph optimizations. MinMax
needs one pass over the batches; percentile and entropy a second one for the histograms over the first pass's
ranges. Memory: the session (the float model, as verification holds it) plus one batch's observed values.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxc.kernels.calibrate import RangeStats

from .calibration import _save_exposing, _session, trim_heap
from .errors import UsageError, first_line


def observe(model: ir.Model, values: list[ir.Value], batches: list[dict[str, np.ndarray]], folder: Path, label: str,
            histograms: bool, between: Callable[[dict[str, RangeStats]], None] | None = None, keep: int = 0
            ) -> tuple[dict[str, RangeStats], int]:
    """{value name: RangeStats} over every batch (a second pass for the histograms when `histograms`;
    `between(stats)` runs after the first, e.g. to set SmoothQuant divisors), and the rows seen (the elements of the
    first value over its last axis). `keep`: rows of each value kept per batch (RangeStats.samples), for between."""
    stats = {v.name: RangeStats() for v in values}
    fed = {n: v for n, v in ((v.name, v) for v in values) if any(n in b for b in batches[:1])}
    exposed = [v for v in values if v.name not in fed]
    session = None
    scratch = Path(tempfile.mkdtemp(prefix="ranges-", dir=folder))
    path = scratch / "calibration.onnx"
    if exposed:
        _save_exposing(model, path, exposed)
        session = _session(path)
    wanted = {i.name for i in session.get_inputs()} if session is not None else set()
    names = [v.name for v in exposed]
    rows = 0
    for step in ("update", "second_pass") if histograms else ("update",):
        if step == "second_pass" and between is not None:
            between(stats)
        for b, feeds in enumerate(batches):
            outs = {}
            if names:
                try:
                    outs = dict(zip(names, session.run(names, {n: a for n, a in feeds.items() if n in wanted})))
                except Exception as exc:  # noqa: BLE001 - onnxruntime has its own types for bad shapes and values
                    raise UsageError(f"{label}: onnxruntime cannot run batch {b} ({first_line(exc)})") from None
            for v in values:
                x = outs[v.name] if v.name in outs else feeds[v.name]
                if step == "update":
                    stats[v.name].update(x, keep)
                else:
                    stats[v.name].second_pass(x)
                if step == "update" and v is values[0]:
                    rows += int(np.prod(np.shape(x)[:-1]))
            del outs
    del session
    trim_heap()
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    if not histograms and between is not None:
        between(stats)
    for st in stats.values():
        st.samples.clear()
    return stats, rows
