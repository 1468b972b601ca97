"""Bisection: when the compiled model fails verification, name the first pass whose output breaks equivalence
with the input, and, for a rule pass, the rule and the site.

The pipeline is deterministic, so the model after the k-th pass run is rebuilt by running the pipeline again from
the input and stopping after k runs (`replay`); no snapshot of every intermediate model is kept. Only runs that
reported a change can break equivalence, so the search runs over those: the input agrees with itself, the whole
pipeline's output does not, and a binary search keeps that invariant until it finds a run whose input agrees and
whose output does not (log2 of the changing runs in replays and candidate runs; the reference runs once). For a
`RulePass`, a second binary search over that run's rewrites (`apply_rules(limit=j)`: the first j rewrites, in the
order the full run makes them) finds the rewrite that breaks it: its rule and the node the match was rooted at.

`save_repro` writes the model before the failing pass, the pipeline text and a script that compiles it with the
same options: the same failure, bisected to the same pass.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from . import ir as irio
from . import pass_manager as pm
from . import rules as _rules
from . import verify as numeric
from .errors import OnnxcError, UsageError, first_line


@dataclass
class Culprit:
    """The pass run (and, for a rule pass, the rewrite) after which the model stops agreeing with the input."""

    pass_name: str
    run: int                              # 1-based position among the pipeline's pass runs
    previous: list[str] = field(default_factory=list)
    rule: str | None = None
    site: str | None = None
    rewrite: int | None = None            # 1-based position of the rewrite within the pass run
    reason: str = ""                      # how the output after the pass differs
    probes: int = 0                       # models rebuilt and run by the search

    def where(self) -> str:
        rule = f" (rule {self.rule} at node {self.site})" if self.rule else ""
        return f"after pass {self.pass_name}{rule}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    def __init__(self, model: ir.Model, stats: _rules.RuleStats | None = None):
        super().__init__("stop")
        self.model = model
        self.stats = stats


class _Replay(pm.PassManager):
    """Runs the pipeline and stops after `stop_after` pass runs; with `rewrites`, the last run (a RulePass) makes
    only its first `rewrites` rewrites."""

    def __init__(self, passes: list[pm.Pass], stop_after: int, rewrites: int | None = None):
        super().__init__(passes, verify_each=False)
        self.stop_after = stop_after
        self.rewrites = rewrites
        self.runs = 0

    def _run_one(self, p: pm.Pass, model: ir.Model, ctx: pm.PassContext, signature: Any, done: list[str]
                 ) -> ir.Model:
        if isinstance(p, pm.FixedPoint):
            return super()._run_one(p, model, ctx, signature, done)
        if self.runs >= self.stop_after:
            raise _Stop(model)
        self.runs += 1
        if self.runs == self.stop_after and self.rewrites is not None and isinstance(p, pm.RulePass):
            stats = _rules.apply_rules(model, p.rules(), disabled=ctx.disabled_rules, limit=self.rewrites)
            raise _Stop(model, stats)
        model = super()._run_one(p, model, ctx, signature, done)
        if self.runs >= self.stop_after:
            raise _Stop(model)
        return model


@dataclass
class Setup:
    """What a replay needs: the input, the pipeline and the context it ran in, and how to verify."""

    reference: Path                       # the input model file
    passes: list[pm.Pass]
    level: int
    target: str
    options: dict[str, Any]
    disabled_rules: frozenset[str]
    records: list[pm.PassRecord]          # the failing compile's pass runs
    scratch: Path
    seed: int = 0
    inputs: list[dict[str, np.ndarray]] | None = None
    tolerance_dtype: str | None = None
    prepare: Any = None                   # what the compile did to the loaded input before the pipeline


def replay(setup: Setup, runs: int, rewrites: int | None = None) -> tuple[ir.Model, _rules.RuleStats | None]:
    """The model after the first `runs` pass runs of the pipeline (the last one limited to `rewrites` rewrites)."""
    model = irio.load(setup.reference)
    if setup.prepare is not None:
        setup.prepare(model)
    ctx = pm.PassContext(level=setup.level, target=setup.target, options=dict(setup.options),
                         disabled_rules=setup.disabled_rules)
    if runs == 0:
        return model, None
    try:
        _Replay(setup.passes, runs, rewrites).run(model, ctx)
    except _Stop as stop:
        return stop.model, stop.stats
    return model, None


class _Checker:
    """Runs candidate models against the input's outputs, computed once."""

    def __init__(self, setup: Setup, model: ir.Model):
        self.setup = setup
        if setup.inputs is not None:
            self.feeds, self.names = setup.inputs, [{"name": f"user-{k}"} for k in range(len(setup.inputs))]
        else:
            scenarios = numeric.scenarios_for(model)
            self.feeds = [numeric.make_inputs(model, sc, setup.seed + k) for k, sc in enumerate(scenarios)]
            self.names = [asdict(sc) for sc in scenarios]
        self.refs = numeric.run_model(setup.reference, self.feeds, reference=True)
        self.probes = 0

    def differs(self, model: ir.Model) -> str:
        """'' when `model` agrees with the input on every scenario, else how it differs."""
        self.probes += 1
        path = self.setup.scratch / f"bisect-{self.probes}.onnx"
        try:
            ir.save(model, path, external_data=path.name + ".data",
                    size_threshold_bytes=irio.INLINE_TENSOR_MAX_BYTES)
            irio.release_weights(model)
            try:
                gots = numeric.run_model(path, self.feeds)
            except Exception as exc:
                return f"onnxruntime cannot run it ({first_line(exc)})"
        finally:
            for f in (path, path.with_name(path.name + ".data")):
                f.unlink(missing_ok=True)
        for sc, ref, got in zip(self.names, self.refs, gots):
            if sc.get("pad"):
                ref, got = numeric._valid_rows(ref, sc), numeric._valid_rows(got, sc)
            for name in ref:
                c = numeric.compare(ref[name], got.get(name, np.zeros(0)), name, self.setup.tolerance_dtype)
                if not c.ok:
                    return (f"output '{name}' differs in scenario '{sc['name']}': max abs error {c.max_abs:.3g} "
                            f"(relative {c.max_rel:.3g})")
        return ""


def locate(setup: Setup) -> Culprit | None:
    """The first pass run (and rewrite) whose output no longer agrees with the input; None when the search cannot
    run (the input itself does not run) or finds no such run (the failure did not reproduce)."""
    changing = [k + 1 for k, r in enumerate(setup.records) if r.modified]
    if not changing:
        return None
    checker = _Checker(setup, irio.load(setup.reference))
    lo, hi = 0, len(changing)             # state after changing[lo - 1] agrees (the input for 0); changing[hi - 1] not
    reason = ""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        why = checker.differs(replay(setup, changing[mid - 1])[0])
        if why:
            hi, reason = mid, why
        else:
            lo = mid
    run = changing[hi - 1]
    record = setup.records[run - 1]
    culprit = Culprit(record.name, run, [r.name for r in setup.records[:run - 1]], reason=reason)
    owner = _pass_named(setup.passes, record.name)
    total = sum(record.counts.values())
    if isinstance(owner, pm.RulePass) and total > 0:
        lo_j, hi_j = 0, total
        site: tuple[str, str] | None = None
        while hi_j - lo_j > 1:
            mid = (lo_j + hi_j) // 2
            model, stats = replay(setup, run, mid)
            why = checker.differs(model)
            if why:
                hi_j, reason = mid, why
            else:
                lo_j = mid
        _, stats = replay(setup, run, hi_j)
        if stats is not None and len(stats.sites) == hi_j:
            site = stats.sites[-1]
        if site is not None:
            culprit.rule, culprit.site, culprit.rewrite = site[0], site[1], hi_j
            culprit.reason = reason or culprit.reason
    if not culprit.reason:                # the whole pipeline's failure stands for the last changing run
        culprit.reason = checker.differs(replay(setup, run)[0]) or "the compiled model differs"
    culprit.probes = checker.probes
    return culprit


def _pass_named(passes: list[pm.Pass], name: str) -> pm.Pass | None:
    for p in pm.flatten(passes):
        if p.name == name:
            return p
    return None


def plugin_file(p: pm.Pass | None) -> Path | None:
    """The --plugin file that registered pass `p` (None for built-in and installed passes)."""
    return pm.PLUGIN_FILES.get(p.name) if p is not None else None


# Options the command line can give, as the flags that give them (the rest go to repro.json only).
_OPTION_FLAGS = {"io_fp16": "--io-fp16", "approximate_gelu": "--approximate-gelu", "max_seq_len": "--max-seq-len"}


def save_repro(setup: Setup, culprit: Culprit, folder: Path) -> list[Path]:
    """Write into `folder`: model.onnx (+ model.onnx.data), the model before the failing pass; pipeline.txt, that
    pass; replay.sh, the command that compiles one with the other and fails the same way; repro.json, all of it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--save-repro {folder}: cannot create the folder ({exc.strerror or exc})") from None
    model, _ = replay(setup, culprit.run - 1)
    model_file = folder / "model.onnx"
    ir.save(model, model_file, external_data="model.onnx.data", size_threshold_bytes=irio.INLINE_TENSOR_MAX_BYTES)
    (folder / "pipeline.txt").write_text(culprit.pass_name + "\n")
    args = ["onnxc", "compile", "model.onnx", "--passes", culprit.pass_name, f"-O{setup.level}", "--target",
            setup.target, "--seed", str(setup.seed), "-o", "${TMPDIR:-/tmp}/onnxc-replayed.onnx"]
    plugin = plugin_file(_pass_named(setup.passes, culprit.pass_name))
    if plugin is not None:
        args += ["--plugin", str(plugin)]
    for key, flag in _OPTION_FLAGS.items():
        value = setup.options.get(key)
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    if setup.inputs is not None:
        np.savez(folder / "inputs.npz", **setup.inputs[0])
        args += ["--verify-inputs", "inputs.npz"]
    quoted = " ".join(a if a.startswith("${") else shlex.quote(a) for a in args)
    script = folder / "replay.sh"
    script.write_text("#!/bin/sh\n# Replays: " + culprit.where() + "\ncd \"$(dirname \"$0\")\" && exec "
                      + quoted.replace("${TMPDIR:-/tmp}/onnxc-replayed.onnx",
                                       "\"${TMPDIR:-/tmp}/onnxc-replayed.onnx\"") + ' "$@"\n')
    script.chmod(0o755)
    info = {"culprit": culprit.to_dict(), "pipeline": culprit.pass_name, "level": setup.level,
            "target": setup.target, "seed": setup.seed, "plugin": str(plugin) if plugin else None,
            "options": {k: v for k, v in setup.options.items() if _jsonable(v)}, "command": quoted}
    (folder / "repro.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    files = [model_file, folder / "pipeline.txt", script, folder / "repro.json"]
    if (folder / "model.onnx.data").exists():
        files.insert(1, folder / "model.onnx.data")
    return files


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def diagnose(setup: Setup, save_to: Path | None) -> tuple[Culprit | None, list[Path], str]:
    """locate, then save_repro when asked: (culprit, files saved, a note when the search itself failed)."""
    try:
        culprit = locate(setup)
    except OnnxcError:
        raise
    except Exception as exc:              # the search is a diagnosis: its failure must not hide the verdict
        return None, [], f"bisection failed: {type(exc).__name__}: {first_line(exc)}"
    files: list[Path] = []
    if culprit is not None and save_to is not None:
        files = save_repro(setup, culprit, save_to)
    return culprit, files, "" if culprit is not None else "bisection found no pass that breaks the model"
