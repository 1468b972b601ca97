"""How much each weight's quantization moves the model's outputs, measured on synthetic inputs (no data).

The float graph, as the quantize pass finds it, is saved with the weights to measure also listed as graph inputs
(an initializer that is a graph input is a default that a run may override) and run in one onnxruntime session:
once as it is, then once per weight with that weight alone replaced by its quantized-dequantized value. A weight's
sensitivity is the relative squared change of the float outputs,

    e = sum_outputs ||y(W_q) - y(W)||^2 / sum_outputs ||y(W)||^2

on seeded inputs made as verification makes them (compiler/verify.py make_inputs: random token ids, masks of ones)
in one prefill scenario of SCENARIO. Unlike a weight-space error, it sees where an error enters: a layer whose
output the network amplifies (a down projection, the first or last layers, the logits) scores high even when its
weights quantize well. Cost: one session of the float model (as verification holds) and one run per weight.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .calibration import session_of, trim_heap
from .ir import release_weights
from .quant_sites import Site
from .verify import Scenario, make_inputs

SCENARIO = Scenario("sensitivity", 2, 32, 0)     # batch, sequence, past: 64 prefill tokens
SEED = 1234


def weight_value(site: Site) -> tuple[ir.Value, bool] | None:
    """(the initializer the site's weight is, whether W (K, N) is its transpose) when a run can override it: a graph
    initializer read directly or through a Transpose (transB and a Transpose node both count), with no alpha."""
    if site.key[2] != 1.0:
        return None
    w = site.node.inputs[1]
    if w is not None and w.producer() is not None and w.producer().op_type == "Transpose":
        w = w.producer().inputs[0]
    if w is None or not w.is_initializer() or w.is_graph_input():
        return None
    return w, bool(site.key[1])


def output_errors(model: ir.Model, sites: Iterable[Site], dequantized: Callable[[Site], np.ndarray],
                  folder: Path) -> dict[tuple, float]:
    """Sensitivity e (above) of each site's weight, by site key; a weight that cannot be overridden is absent.
    `dequantized(site)` gives the site's W (K, N) as the quantizer would leave it."""
    views: dict[tuple, tuple[Site, ir.Value, bool]] = {}
    for site in sites:
        got = weight_value(site)
        if got is not None and site.key not in views:
            views[site.key] = (site, *got)
    if not views:
        return {}
    graph = model.graph
    values = list({id(v): v for _, v, _ in views.values()}.values())
    work = Path(tempfile.mkdtemp(prefix="sensitivity-", dir=folder))
    path = work / "model.onnx"
    fed = list(graph.inputs)
    graph.inputs.extend(values)
    try:
        ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(fed)
        release_weights(model)
    feeds = make_inputs(model, SCENARIO, SEED)
    session = session_of(path)
    outputs = [o.name for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(float16)")]
    base = [np.asarray(y, np.float64) for y in session.run(outputs, feeds)]
    ref = sum(float(np.square(y).sum()) for y in base) or 1.0
    errors = {}
    for key, (site, value, transposed) in views.items():
        w = dequantized(site)
        w = np.ascontiguousarray(w.T if transposed else w).astype(value.dtype.numpy(), copy=False)
        got = session.run(outputs, {**feeds, value.name: w})
        del w
        errors[key] = sum(float(np.square(np.asarray(y, np.float64) - b).sum()) for y, b in zip(got, base)) / ref
    del session
    trim_heap()
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return errors
