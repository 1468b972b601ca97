"""The driver behind `onnxc compile` and `onnxc.compile`: load, check, run the pipeline, save, verify, commit."""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from . import __version__, coverage
from . import bisect, local_check
from . import ir as irio
from . import kvcache
from . import pass_manager as pm
from . import pipeline as pipelines
from . import quant_options, quant_twins
from . import report as report_frame
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


def compile(model: Any, level: int = 2, target: str = "cpu", *, output: str | os.PathLike | None = None,
            passes: str | None = None, disable: tuple[str, ...] | list[str] = (), verify: bool = True,
            verify_inputs: str | os.PathLike | None = None, seed: int = 0, options: dict[str, Any] | None = None,
            external_data: bool | None = None, memory_budget: int | None = None,
            progress: Callable[[pm.PassRecord], None] | None = None,
            save_repro: str | os.PathLike | None = None, local_checks: bool = False) -> CompileResult:
    """Compile a model (path, ModelProto, onnx_ir.Model or serialized bytes).

    With `output`, the compiled model is written there (atomically, after verification). Without it, the result
    lives only in memory: `.model` is the ModelProto. `passes` replaces the (level, target) pipeline with explicit
    pipeline text. Raises an OnnxcError subclass (with an exit code) on bad input or failed verification; a failed
    verification is bisected to the pass (and rule and site) that broke the model, and `save_repro` (a folder) then
    receives the model before that pass and the command that replays the failure (compiler/bisect.py). A model
    with ops onnxruntime cannot run (a custom domain), or any model with `local_checks`, is verified rewrite by
    rewrite instead of whole (compiler/local_check.py).
    """
    started = time.perf_counter()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        irio.check_writable(Path(output))        # before any work
    with irio.scratch_dir("onnxc-") as scratch:
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
        ctx.details.extend(f"load: {note}" for note in irio.load_notes(ir_model))
        given_options = dict(options or {})
        quantize = ctx.option("quantize") is not None
        if quantize:   # the pipeline's quantize stage runs (compiler/pipeline.py); its options fail now, not after it
            quant_options.options_of(ctx)
            ctx.options.setdefault("scratch_dir", str(scratch))   # quantized tensors stream to the compile's scratch
        chosen = pipelines.build_pipeline(ctx, passes, tuple(disable))
        input_external = irio.uses_external_data(ir_model)
        input_files = _file_sizes(input_path, irio.external_data_files(ir_model))
        before = op_histogram(ir_model)
        nodes_before = sum(before.values())
        weights = irio.weight_bytes(ir_model)
        # A model onnxruntime cannot run whole (an op of a custom domain) is checked rewrite by rewrite instead
        missing = local_check.unrunnable_ops(ir_model) if verify and reference is not None and not quantize else []
        local = (local_check.LocalChecker(ir_model, seed, ctx.option("tolerance_dtype"))
                 if missing or (local_checks and verify and not quantize) else None)
        manager = pm.PassManager(local.wrap(chosen) if local is not None else chosen, progress=progress)
        t0 = time.perf_counter()
        ir_model = manager.run(ir_model, ctx)
        compile_seconds = time.perf_counter() - t0
        _stamp(ir_model)
        after = op_histogram(ir_model)
        fusion_coverage = coverage.measure(ir_model, ctx.notes) if _fuses(chosen) else None
        weights_after = irio.weight_bytes(ir_model)

        destination = out_path if out_path is not None else scratch / "compiled.onnx"
        if external_data is None and quantize and not input_external:
            # Quantized tensors referenced from a scratch file are not the input's external data: keep the layout
            # the input had unless the output is large.
            external_data = irio.weight_bytes(ir_model) > irio.EXTERNAL_DATA_THRESHOLD_BYTES
        t0 = time.perf_counter()
        with irio.staged_save(ir_model, destination, external_data=external_data) as staged:
            save_seconds = time.perf_counter() - t0
            irio.release_weights(ir_model)  # the weights are on disk now; let their pages go before verifying
            verification: dict[str, Any] = {"status": "not run", "reason": "--no-verify"}
            kv_cache: dict[str, Any] = {}
            quality: dict[str, Any] = {}
            t0 = time.perf_counter()
            quantized = quantize and any(numeric.QUANT_META in n.meta for n in ir_model.graph)
            if local is not None:
                verification = {"status": "local", "checks": "local", "seed": seed, "scenarios": [],
                                "reason": (f"onnxruntime cannot run {', '.join(missing)}" if missing else
                                           "local checks were asked for") + ": the whole model was not run; each "
                                          "rewrite was checked where it happened",
                                "local": local.report.to_dict()}
            elif verify and reference is not None and quantized:
                rep, quality = _verify_quantized(ir_model, reference, staged.model_file, scratch, seed=seed,
                                                 inputs=feeds, weight_bytes=weights, memory_budget=memory_budget,
                                                 tolerance_dtype=ctx.option("tolerance_dtype"))
                verification = rep.to_dict()
                if rep.status == "failed":
                    raise VerificationError(f"verification failed: {rep.reason}; nothing was written")
            elif verify and reference is not None:
                def kv_check(session: Any, feeds_list: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
                    kv_cache.update(kvcache.check_session(session, ir_model, feeds_list,
                                                          ctx.option("tolerance_dtype"), outputs=outputs))

                try:
                    rep = numeric.verify_files(reference, staged.model_file, ir_model, seed=seed, inputs=feeds,
                                               weight_bytes=weights, memory_budget=memory_budget,
                                               tolerance_dtype=ctx.option("tolerance_dtype"),
                                               candidate_check=kv_check)
                except VerificationError as exc:
                    if not exc.message.startswith("verification failed: "):
                        raise
                    rep = numeric.VerifyReport("failed", exc.message[len("verification failed: "):], seed)
                verification = {**rep.to_dict(), "checks": "whole-model"}
                if rep.status == "failed":
                    raise _bisected(rep, bisect.Setup(
                        reference, chosen, level, target, given_options, ctx.disabled_rules, manager.records,
                        scratch, seed, feeds, ctx.option("tolerance_dtype"), check_input),
                        None if save_repro is None else Path(save_repro))
            if verification["status"] != "passed":
                kv_cache.clear()
                kv_cache.update({"status": "not run", "reason": verification.get("reason", "")})
            elif not kv_cache:      # the quantized path: a session of its own
                kv_cache.update(_check_kv_cache(ir_model, staged.model_file, feeds, seed,
                                                ctx.option("tolerance_dtype")))
            verify_seconds = time.perf_counter() - t0
            proto = onnx.load(str(staged.model_file)) if out_path is None else None
            output_files = _file_sizes(staged.model_file, [staged.data_file] if staged.data_file else [])
            written = staged.commit() if out_path is not None else []
        report = {
            "onnxc": __version__,
            "input": str(input_path) if input_path else None,
            "output": str(out_path) if out_path else None,
            "written": [str(p) for p in written],
            "sizes": {"input": input_files, "output": output_files},
            "level": level,
            "target": target,
            "pipeline": pipelines.chosen_text(ctx, passes),
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
            "details": ctx.details,
            **({"coverage": fusion_coverage} if fusion_coverage is not None else {}),
            "verification": verification,
            "kv_cache": kv_cache,
            **({"quantization": _quant_report(ctx, weights, weights_after, after, quality)}
               if quantize else {}),
            "seconds": {"load": round(load_seconds, 3), "passes": round(compile_seconds, 3),
                        "save": round(save_seconds, 3), "verify": round(verify_seconds, 3),
                        "total": round(time.perf_counter() - started, 3)},
        }
    report = report_frame.framed(report, verify_inputs=verify_inputs, seed=seed,
                                 tolerance_dtype=ctx.option("tolerance_dtype"))
    return CompileResult(report, out_path, proto)


def _bisected(rep: numeric.VerifyReport, setup: bisect.Setup, save_repro: Path | None) -> VerificationError:
    """The error for a failed verification, naming the pass (rule, site) bisection finds; its `.report` holds the
    verification result with the bisection under "bisect"."""
    culprit, files, note = bisect.diagnose(setup, save_repro)
    where = f" {culprit.where()}" if culprit is not None else ""
    saved = f"; repro saved in {save_repro} (replay: sh {save_repro / 'replay.sh'})" if files else ""
    exc = VerificationError(f"verification failed{where}: {rep.reason}; nothing was written{saved}")
    found = ({"status": "found", **culprit.to_dict(), "repro": [str(f) for f in files]} if culprit is not None
             else {"status": "not found", "reason": note})
    exc.report = {"verification": {**rep.to_dict(), "bisect": found}}     # type: ignore[attr-defined]
    return exc


def _check_kv_cache(model: ir.Model, compiled: Path, feeds: list[dict[str, Any]] | None, seed: int,
                    tolerance_dtype: str | None) -> dict[str, Any]:
    """Whether the compiled model's past and present may share one buffer (compiler/kvcache.py), checked by
    running it both ways on the verification inputs."""
    layout = kvcache.shared_cache_pairs(model)
    if not layout.shareable:
        return {"status": "not applicable", "reason": layout.reason}
    if feeds is None:
        feeds = [numeric.make_inputs(model, sc, seed + k) for k, sc in enumerate(numeric.scenarios_for(model))]
    return kvcache.check_shared(compiled, model, feeds, tolerance_dtype)


def _verify_quantized(model: ir.Model, reference: Path, compiled: Path, scratch: Path, **kw: Any
                      ) -> tuple[numeric.VerifyReport, dict[str, Any]]:
    """Check the staged quantized model against its float twins (compiler/verify.py), one model at a time.

    The in-memory model is rewritten into the twins here: it is already saved and not used after. Nothing is
    written when the weights alone are over the memory budget."""
    _, over = numeric.weights_budget(kw.get("weight_bytes", 0), kw.get("memory_budget"), kw.get("seed", 0))
    if over is not None:
        return over, {}

    def save(m: ir.Model, path: Path) -> None:
        ir.save(m, path, external_data=path.name + ".data", size_threshold_bytes=irio.INLINE_TENSOR_MAX_BYTES)
        irio.release_weights(m)

    exact = numeric.accuracy_level_zero_copy(compiled)
    local = quant_twins.local_twins(model, compiled, scratch, save)  # int8 activations: checked layer by layer
    swaps = numeric.float_twins(model)
    paths = {}
    for which in ("dequantized", "unquantized") if local is None else ("unquantized",):
        for value, deq, src in swaps:
            value.const_value = deq if which == "dequantized" else src
        paths[which] = scratch / f"{which}.onnx"
        save(model, paths[which])
    if local is not None:
        exact, paths["dequantized"] = local
    return numeric.verify_quantized(reference, compiled, exact, paths["dequantized"], paths["unquantized"], model,
                                    **kw)


def _quant_report(ctx: pm.PassContext, bytes_before: int, bytes_after: int, ops_after: dict[str, int],
                  quality: dict[str, Any]) -> dict[str, Any]:
    o = quant_options.options_of(ctx)
    return {"method": f"{o.scheme}:{'awq:' if o.awq else ''}{o.method}", "block_size": o.block_size,
            "symmetric": o.symmetric,
            "accuracy_level": o.accuracy_level, "exclude": list(o.exclude),
            "matmul_nbits": ops_after.get("com.microsoft.MatMulNBits", 0),
            "gather_block_quantized": ops_after.get("com.microsoft.GatherBlockQuantized", 0),
            "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after, "error": quality,
            "precision": "mixed" if o.mixed else "uniform",
            **({"mixed_budget": o.mixed_budget, "layers": ctx.results["quantize-int4"]["layers"]}
               if ctx.results.get("quantize-int4") else {}),
            **({"awq": ctx.results["fold-awq-scales"]} if ctx.results.get("fold-awq-scales") else {}),
            **({"dynamic_quantize_matmul": ops_after.get("com.microsoft.DynamicQuantizeMatMul", 0),
                "quantize_linear": ops_after.get("QuantizeLinear", 0), "int8": ctx.results.get("quantize-int8", {})}
               if o.scheme == "int8" else {})}


def _file_sizes(model_file: Path | None, data_files) -> dict[str, int] | None:
    """{"model": bytes, "data": bytes of the external data files} (None for an in-memory input)."""
    if model_file is None:
        return None
    return {"model": model_file.stat().st_size, "data": sum(Path(f).stat().st_size for f in data_files
                                                          if Path(f).is_file())}


def _fuses(chosen: list[pm.Pass]) -> bool:
    """The pipeline runs a fusion pass (coverage is reported for it)."""
    return any(p.name.startswith("fuse-") for p in pm.flatten(chosen))


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
