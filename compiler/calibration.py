"""Calibration: the --calibration file read into batches of feeds (load_calibration), and the statistics of each
linear site's inputs on them, taken from one onnxruntime session of the float graph (Hessians: GPTQ's H = X^T X,
and the mean |x| per input feature that AWQ's scales start from)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxc.kernels import quantize as kq

from .errors import UsageError, first_line
from .ir import release_weights
from .quant_options import QuantOptions
from .quant_sites import Site

GPTQ_ROWS_PER_K = 4              # fewer calibration rows than this many times K earn a note


def load_calibration(path: str, graph: ir.Graph) -> list[dict[str, np.ndarray]]:
    """--calibration FILE.npz -> batches of feeds. Arrays are named after graph inputs and fed as they are (their
    leading axis is the model's batch axis, so one array holds many samples): one batch with keys NAME, or several
    (other shapes, e.g. sequence lengths) with keys NAME/0, NAME/1, ... Every batch gives every graph input that is
    not an initializer; arrays are cast to the input's type."""
    inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - zip, pickle and format errors alike
        raise UsageError(f"--calibration {path}: cannot read ({first_line(exc)})") from None
    batches: dict[int | None, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        name, _, idx = key.rpartition("/")
        if key in inputs:
            name, k = key, None
        elif name in inputs and idx.isdigit():
            k = int(idx)
        else:
            raise UsageError(f"--calibration {path}: array '{key}' names no graph input (inputs: "
                             f"{', '.join(inputs)}; several batches use NAME/0, NAME/1, ...)")
        dtype = inputs[name].dtype.numpy() if inputs[name].dtype is not None else arr.dtype
        batches.setdefault(k, {})[name] = arr.astype(dtype, copy=False)
    if None in batches and len(batches) > 1:
        raise UsageError(f"--calibration {path}: mixes NAME and NAME/K keys; use one form")
    if not batches:
        raise UsageError(f"--calibration {path}: holds no arrays")
    for k, feeds in sorted(batches.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise UsageError(f"--calibration {path}: batch {k or 0} lacks input(s) {', '.join(missing)}")
    return [batches[k] for k in sorted(batches, key=lambda k: -1 if k is None else k)]


class Hessians:
    """H = X^T X (float64, summed over every calibration row) of each weight's inputs X, and GPTQ's factor of it.

    The float model (the graph as this pass finds it, before any rewrite) is saved to the scratch folder with the
    inputs of the linear sites as its only outputs (nodes that feed none of them are dropped) and run in one
    onnxruntime session. Weights that read the same inputs (Q, K and V; gate and up) share one H. The Hessians are
    taken in groups that fit in opts.hessian_budget bytes (HESSIAN_BUDGET), one pass over the batches per group
    fetching only that group's inputs, and each finished H is spilled to the scratch folder until its weights are
    quantized; the session is closed before the first weight is. Peak memory: the session (it holds the float
    model, as verification does) plus one group. A weight used by several nodes sums their inputs' X^T X. The
    grouping does not change the result: each H sums the same batches in the same order."""

    def __init__(self, model: ir.Model, sites: list[Site], batches: list[dict[str, np.ndarray]], folder: Path,
                 label: str, opts: QuantOptions):
        self.folder = Path(tempfile.mkdtemp(prefix="hessians-", dir=folder))
        self.damp, self.act_order = opts.damp, opts.act_order
        self.rows, self.runs = 0, 0          # calibration rows at the first input, session runs
        uses: dict[tuple, list[ir.Value]] = {}
        dims: dict[tuple[str, ...], int] = {}
        for site in sites:
            a = site.node.inputs[0]
            if a.type is None:
                a.type = ir.TensorType(site.dtype)  # MatMul's typing: the input has the weight's type
            if all(v is not a for v in uses.setdefault(site.key, [])):
                uses[site.key].append(a)
        self.sig = {key: tuple(v.name for v in vs) for key, vs in uses.items()}
        for site in sites:
            dims[self.sig[site.key]] = site.shape[0]
        self.left = {sig: sum(1 for s in self.sig.values() if s == sig) for sig in dims}  # weights still to come
        self.files: dict[tuple[str, ...], Path] = {}
        self.abs_sums: dict[tuple[str, ...], np.ndarray] = {}   # sum over rows of |x| per input feature
        self.counts: dict[tuple[str, ...], int] = {}            # rows summed into each H
        self.factors: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        fed = {v.name for v in model.graph.inputs}
        values = list({id(v): v for vs in uses.values() for v in vs if v.name not in fed}.values())
        path = self.folder / "calibration.onnx"
        session = None  # every weight reads a graph input: the batches are its inputs
        if values:
            _save_exposing(model, path, values)
            session = session_of(path)
        group: list[tuple[str, ...]] = []
        size = 0
        for i, sig in enumerate(dims):
            group.append(sig)
            size += dims[sig] ** 2 * 8
            if size >= opts.hessian_budget or i == len(dims) - 1:
                self._group(session, group, dims, batches, label)
                group, size = [], 0
        del session
        trim_heap()
        for f in (path, path.with_name(path.name + ".data")):
            f.unlink(missing_ok=True)

    def _group(self, session: Any, group: list[tuple[str, ...]], dims: dict[tuple[str, ...], int],
               batches: list[dict[str, np.ndarray]], label: str) -> None:
        hs = {sig: np.zeros((dims[sig], dims[sig]), np.float64) for sig in group}
        wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        names = list(dict.fromkeys(n for sig in group for n in sig))
        for b, feeds in enumerate(batches):
            fetch = [n for n in names if n not in feeds]
            outs = {}
            if fetch:
                outs = run_batch(session, fetch, feeds, wanted, f"{label}: onnxruntime cannot run batch {b}")
                self.runs += 1
            for sig in group:
                for n in sig:
                    x = np.asarray(outs[n] if n in outs else feeds[n], np.float64).reshape(-1, dims[sig])
                    hs[sig] += x.T @ x
                    self.abs_sums[sig] = self.abs_sums.get(sig, 0) + np.abs(x).sum(0)
                    self.counts[sig] = self.counts.get(sig, 0) + x.shape[0]
                    if not self.files and n == group[0][0]:
                        self.rows += x.shape[0]
            del outs
        for sig in group:
            self.files[sig] = self.folder / f"h{len(self.files)}.npy"
            np.save(self.files[sig], hs.pop(sig))

    def gram(self, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        """(H, mean |x| per input feature) of the weight's inputs; read once for the weights that share them."""
        sig = self.sig[key]
        h = np.load(self.files[sig])
        self.files.pop(sig).unlink()
        return h, self.abs_sums.pop(sig) / max(self.counts[sig], 1)

    def factor(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        """gptq_factor of the weight's H (computed once for the weights that share it), None when it saw no rows."""
        sig = self.sig[key]
        if sig not in self.factors:
            h = np.load(self.files[sig])
            self.files.pop(sig).unlink()
            self.factors[sig] = kq.gptq_factor(h, self.damp, self.act_order) if np.any(np.diag(h) > 0) else None
        f = self.factors[sig]
        self.left[sig] -= 1
        if not self.left[sig]:
            del self.factors[sig]
        return f


def run_batch(session: Any, names: list[str], feeds: dict[str, np.ndarray], wanted: set[str], what: str
              ) -> dict[str, np.ndarray]:
    """`names` from one run of the calibration session on the feeds it takes; a run onnxruntime refuses is a
    UsageError `what (reason)` (the batches are the user's --calibration file)."""
    try:
        return dict(zip(names, session.run(names, {n: a for n, a in feeds.items() if n in wanted})))
    except Exception as exc:  # noqa: BLE001 - onnxruntime has its own types for bad shapes and values
        raise UsageError(f"{what} ({first_line(exc)})") from None


def _save_exposing(model: ir.Model, path: Path, values: list[ir.Value]) -> None:
    """Save the model with `values` as its only outputs, dropping the nodes that feed none of them."""
    import onnx

    graph = model.graph
    outputs = list(graph.outputs)
    graph.outputs.clear()
    graph.outputs.extend(values)
    try:
        ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    finally:
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        release_weights(model)
    proto = onnx.load(str(path), load_external_data=False)
    needed = {o.name for o in proto.graph.output}
    keep = []
    for node in reversed(proto.graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(_captured(node))
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(keep))
    onnx.save(proto, str(path))


def _captured(node: Any) -> set[str]:
    """Names a node's subgraphs read (they may come from the outer graph)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for n in g.node:
                names.update(n.input)
                names.update(_captured(n))
    return names


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc keeps the hundreds of MiB a closed onnxruntime session
    freed, which would otherwise stay in RSS through the quantization that follows); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def session_of(path: Path) -> Any:
    """An onnxruntime CPU session without graph optimizations (exact float semantics) or prepacked copies."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
