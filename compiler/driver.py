"""The driver behind `onnxc compile` and `onnxc.compile`: load, check, run the pipeline, save, verify, commit."""
from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from . import __version__
from . import ir as irio
from . import pass_manager as pm
from . import pipeline as pipelines
from . import verify as numeric
from .errors import InvalidModelError, UsageError, VerificationError, summarize
from .verifier import check_model

ModelLike = "str | os.PathLike | onnx.ModelProto | ir.Model | bytes"


@dataclass
class CompileResult:
    """What `onnxc.compile` returns: the compiled model, where it was written, and the report."""

    report: dict[str, Any]
    output: Path | None
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            if self.output is None:
                raise UsageError("no model available")
            self._model = onnx.load(str(self.output), load_external_data=False)
        return self._model


def op_histogram(model: ir.Model) -> dict[str, int]:
    c = Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def check_input(model: ir.Model) -> None:
    """Refuse graphs that are not well formed; sort a graph that is merely out of order."""
    problems = check_model(model)
    if any("before it is defined" in p for p in problems):
        try:
            model.graph.sort()
        except Exception:
            raise InvalidModelError("the graph has a cycle") from None
        problems = check_model(model)
    if problems:
        raise InvalidModelError(f"invalid graph: {summarize(problems)}")
    if not model.graph.outputs:
        raise InvalidModelError("invalid graph: it has no outputs")


def compile(model: Any, level: int = 3, target: str = "cpu", *, output: str | os.PathLike | None = None,
            passes: str | None = None, disable: tuple[str, ...] | list[str] = (), verify: bool = True,
            verify_inputs: str | os.PathLike | None = None, seed: int = 0, options: dict[str, Any] | None = None,
            external_data: bool | None = None, memory_budget: int | None = None,
            progress: Callable[[pm.PassRecord], None] | None = None) -> CompileResult:
    """Compile a model (path, ModelProto, onnx_ir.Model or serialized bytes).

    With `output`, the compiled model is written there (atomically, after verification). Without it, the result
    lives only in memory: `.model` is the ModelProto. `passes` replaces the (level, target) pipeline with explicit
    pipeline text. Raises an OnnxcError subclass (with an exit code) on bad input or failed verification.
    """
    started = time.perf_counter()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    with tempfile.TemporaryDirectory(prefix="onnxc-") as scratch:
        scratch = Path(scratch)
        reference: Path | None = input_path
        if isinstance(model, ir.Model):
            model = model.clone()
        if input_path is None and verify:
            reference = scratch / "reference.onnx"
            _write_reference(model, reference)
        t0 = time.perf_counter()
        ir_model = irio.as_model(model)
        check_input(ir_model)
        load_seconds = time.perf_counter() - t0
        out_path = Path(output) if output is not None else None
        if out_path is not None:
            irio.check_output_path(out_path, input_path, ir_model)
        feeds = numeric.load_inputs(verify_inputs) if verify_inputs is not None else None

        ctx = pm.PassContext(level=level, target=target, options=dict(options or {}))
        chosen = pipelines.build_pipeline(ctx, passes, tuple(disable))
        before = op_histogram(ir_model)
        nodes_before = sum(before.values())
        weights = irio.weight_bytes(ir_model)
        manager = pm.PassManager(chosen, progress=progress)
        t0 = time.perf_counter()
        ir_model = manager.run(ir_model, ctx)
        compile_seconds = time.perf_counter() - t0
        _stamp(ir_model)
        after = op_histogram(ir_model)

        destination = out_path if out_path is not None else scratch / "compiled.onnx"
        t0 = time.perf_counter()
        with irio.staged_save(ir_model, destination, external_data=external_data) as staged:
            save_seconds = time.perf_counter() - t0
            irio.release_weights(ir_model)  # the weights are on disk now; let their pages go before verifying
            verification: dict[str, Any] = {"status": "not run", "reason": "--no-verify"}
            t0 = time.perf_counter()
            if verify and reference is not None:
                rep = numeric.verify_files(reference, staged.model_file, ir_model, seed=seed, inputs=feeds,
                                           weight_bytes=weights, memory_budget=memory_budget,
                                           tolerance_dtype=ctx.option("tolerance_dtype"))
                verification = rep.to_dict()
                if rep.status == "failed":
                    raise VerificationError(f"verification failed: {rep.reason}; nothing was written")
            verify_seconds = time.perf_counter() - t0
            proto = onnx.load(str(staged.model_file)) if out_path is None else None
            written = staged.commit() if out_path is not None else []
        report = {
            "onnxc": __version__,
            "input": str(input_path) if input_path else None,
            "output": str(out_path) if out_path else None,
            "written": [str(p) for p in written],
            "level": level,
            "target": target,
            "pipeline": passes if passes is not None else pipelines.pipeline_text(level, target),
            "disabled": list(disable),
            "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "modified": r.modified,
                        "counts": r.counts, "nodes_after": r.nodes_after} for r in manager.records],
            "rule_counts": _rule_totals(manager.records),
            "nodes_before": nodes_before,
            "nodes_after": sum(after.values()),
            "ops_before": before,
            "ops_after": after,
            "weight_bytes": weights,
            "notes": ctx.notes,
            "verification": verification,
            "seconds": {"load": round(load_seconds, 3), "passes": round(compile_seconds, 3),
                        "save": round(save_seconds, 3), "verify": round(verify_seconds, 3),
                        "total": round(time.perf_counter() - started, 3)},
        }
    return CompileResult(report, out_path, proto)


def _rule_totals(records: list[pm.PassRecord]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for r in records:
        for k, v in r.counts.items():
            key = f"{r.name}:{k}"
            totals[key] = totals.get(key, 0) + v
    return totals


def _stamp(model: ir.Model) -> None:
    """Record the producer; everything else about the model is kept as it was."""
    model.producer_name = "onnxc"
    model.producer_version = __version__


def _write_reference(model: Any, path: Path) -> None:
    if isinstance(model, ir.Model):
        ir.save(model, path, external_data=path.name + ".data" if irio.weight_bytes(model) > (1 << 30) else None)
    elif isinstance(model, onnx.ModelProto):
        onnx.save(model, str(path))
    elif isinstance(model, (bytes, bytearray)):
        path.write_bytes(bytes(model))
    else:
        raise UsageError(f"cannot compile an object of type {type(model).__name__}")
