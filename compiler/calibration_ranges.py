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

from .calibration import _save_exposing, run_batch, session_of, trim_heap
from .ir import release_weights


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
        session = session_of(path)
    wanted = {i.name for i in session.get_inputs()} if session is not None else set()
    names = [v.name for v in exposed]
    rows = 0
    for step in ("update", "second_pass") if histograms else ("update",):
        if step == "second_pass" and between is not None:
            between(stats)
        for b, feeds in enumerate(batches):
            outs = {}
            if names:
                outs = run_batch(session, names, feeds, wanted, f"{label}: onnxruntime cannot run batch {b}")
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


def output_sensitivity(model: ir.Model, groups: dict[str, tuple[ir.Value, np.ndarray, np.ndarray, np.ndarray | None]],
                       batches: list[dict[str, np.ndarray]], folder: Path, label: str) -> dict[str, float]:
    """Each activation's effect on the model's outputs: {name: sum ||y_q - y||^2 / sum ||y||^2 over the float
    outputs and `batches`}, y_q the outputs with that one activation fake-quantized as the static layer will see it
    (x -> DequantizeLinear(QuantizeLinear(x / c, s, z), s, z) * c). `groups`: name -> (value, scale, zero point,
    c or None). One onnxruntime session serves every activation: each gets a boolean graph input that switches
    its fake quantization on (Where), so the model is saved once; the in-memory graph is left as it was."""
    graph = model.graph
    first = next(iter(graph), None)
    added: list[ir.Node] = []
    flags: list[ir.Value] = []
    rewired: list[tuple[ir.Node, int, ir.Value]] = []

    def const(arr: np.ndarray) -> ir.Value:
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(arr))])
        added.append(node)
        return node.outputs[0]

    for name, (v, scale, zp, c) in groups.items():
        uses = list(v.uses())
        flag = ir.Value(name=f"{name}__fake_quantize", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
        flags.append(flag)
        start = len(added)
        x = v
        if c is not None:
            mul = ir.Node("", "Mul", [v, const((np.float32(1) / c).astype(np.float32))])
            added.append(mul)
            x = mul.outputs[0]
        s, z = const(scale), const(zp)
        q = ir.Node("", "QuantizeLinear", [x, s, z])
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z])
        added += [q, dq]
        y = dq.outputs[0]
        if c is not None:
            back = ir.Node("", "Mul", [y, const(c.astype(np.float32))])
            added.append(back)
            y = back.outputs[0]
        where = ir.Node("", "Where", [flag, y, v])
        added.append(where)
        for use in uses:
            rewired.append((use.node, use.idx, v))
            use.node.replace_input_with(use.idx, where.outputs[0])
        if v.producer() is not None:
            graph.insert_after(v.producer(), added[start:])
        elif first is not None:
            graph.insert_before(first, added[start:])
        else:
            graph.extend(added[start:])
    graph.inputs.extend(flags)
    scratch = Path(tempfile.mkdtemp(prefix="sensitivity-", dir=folder))
    path = scratch / "sensitivity.onnx"
    try:
        ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    finally:
        for node, idx, v in rewired:
            node.replace_input_with(idx, v)
        del graph.inputs[len(graph.inputs) - len(flags):]
        for node in reversed(added):
            graph.remove(node, safe=True)
        release_weights(model)
    session = session_of(path)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    off = {f.name: np.array(False) for f in flags}
    refs = []
    errors = dict.fromkeys(groups, 0.0)
    energy = 0.0
    for b, feeds in enumerate(batches):
        feeds = {n: a for n, a in feeds.items() if n in wanted}
        ref = list(run_batch(session, names, {**feeds, **off}, wanted,
                             f"{label}: onnxruntime cannot run batch {b}").values())
        energy += sum(float(np.square(r.astype(np.float64)).sum()) for r in ref if r.dtype.kind == "f")
        for name, flag in zip(groups, flags):
            got = session.run(names, {**feeds, **off, flag.name: np.array(True)})
            errors[name] += sum(float(np.square(g.astype(np.float64) - r).sum()) for g, r in zip(got, ref)
                                if r.dtype.kind == "f")
        refs.clear()
    del session
    trim_heap()
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return {n: e / max(energy, 1e-30) for n, e in errors.items()}
