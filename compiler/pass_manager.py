"""Passes, the pass registry, pipelines as text, and the manager that runs them with the verifier in between.

A pass is a small object with a name, the lowest optimization level that runs it, the targets it serves, and
`run(model, ctx) -> PassResult`. Rule-based passes are `RulePass(name, rules)`. Pipelines are strings such as
"fold-constants,fixpoint(remove-noops,eliminate-dead)" and are parsed against the registry, so a misspelled
name is an error, never silently ignored. Third-party passes register with `onnxc.register_pass`, through the
`onnxc.passes` entry-point group, or from a file given with `--plugin`.
"""
from __future__ import annotations

import dataclasses

import importlib.metadata
import importlib.util
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from . import rules as _rules
from .errors import IRVerificationError, OnnxcError, PassError, UsageError, first_line, summarize
from .verifier import Signature, check_model

TARGETS = ("cpu", "cuda")


@dataclass
class PassContext:
    """What a pass may read besides the model: level, target and user options."""

    level: int = 1
    target: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    disabled_rules: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)   # report lines, e.g. a fusion that fell back
    details: list[str] = field(default_factory=list)  # lines for -v only: a pass that found nothing to do there
    results: dict[str, Any] = field(default_factory=dict)  # pass name -> data for the report (quantize-int4: layers)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)   # rule or action name -> times applied


class Pass:
    """Base class. Subclasses set `name` (kebab-case), `level`, `targets` and implement `run`."""

    name: str = ""
    level: int = 1
    targets: tuple[str, ...] = TARGETS
    # Where a pass the pipeline table does not name runs (a plugin's): right after or before the named pass, or at
    # the end of a stage ("cleanup", "canonicalize", "fuse", "lower"). None: only when a pipeline names it.
    after: str | None = None
    before: str | None = None
    stage: str | None = None

    @property
    def summary(self) -> str:
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def rules(self) -> Sequence[_rules.Rule]:
        return ()

    def parts(self) -> Sequence[Part]:
        """The named parts of a pass that reads its sites with code rather than pattern rules (fuse-gqa): each can
        be asked, per candidate site, what it found (`onnxc compile --explain PART`), and a part the pass lets a
        user turn off is named by --disable."""
        return ()

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


@dataclass(frozen=True)
class Part:
    """One named stage of a pass's reading of a site: `explain(model)` gives (site, what this part found or why it
    refused) for every candidate site of the model, after the passes before its own have run."""

    name: str
    summary: str
    explain: Callable[[ir.Model, PassContext], list[tuple[str, str]]]
    can_disable: bool = False


class RulePass(Pass):
    """A pass made of pattern rules, applied largest pattern first until none fires."""

    def __init__(self, name: str, rules: Sequence[_rules.Rule], *, level: int = 1,
                 targets: tuple[str, ...] = TARGETS, summary: str = "", after: str | None = None,
                 before: str | None = None, stage: str | None = None):
        self.name = name
        self.level = level
        self.targets = targets
        self.after, self.before, self.stage = after, before, stage
        self._rules = list(rules)
        self._summary = summary

    @property
    def summary(self) -> str:
        return self._summary or f"{len(self._rules)} rules"

    def rules(self) -> Sequence[_rules.Rule]:
        return self._rules

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        idle = {name for name, v in graph.initializers.items() if not v.uses()}
        stats = _rules.apply_rules(model, self._rules, disabled=ctx.disabled_rules)
        if stats.applied:   # constants only the replaced nodes read go with them (others are eliminate-dead's)
            for name, v in list(graph.initializers.items()):
                if name not in idle and not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                    graph.initializers.pop(name)
        return PassResult(model, bool(stats.applied), dict(stats.applied))


class FixedPoint(Pass):
    """Runs its passes in order until none modifies the model; not converging within the cap is an error."""

    def __init__(self, passes: Sequence[Pass], max_iterations: int = 10):
        self.passes = list(passes)
        self.max_iterations = max_iterations
        self.name = "fixpoint(" + ",".join(p.name for p in self.passes) + ")"
        self.level = min((p.level for p in self.passes), default=0)
        self.targets = TARGETS


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    counts: dict[str, int]
    nodes_after: int


ProgressFn = Callable[[PassRecord], None]


class PassManager:
    """Runs a pipeline, verifying the IR after each pass (or only at the end)."""

    def __init__(self, passes: Sequence[Pass], *, verify_each: bool = True, progress: ProgressFn | None = None):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.progress = progress
        self.records: list[PassRecord] = []

    def run(self, model: ir.Model, ctx: PassContext) -> ir.Model:
        signature = dataclasses.replace(Signature.of(model), narrow_float=bool(ctx.option("io_fp16")))
        done: list[str] = []
        for p in self.passes:
            model = self._run_one(p, model, ctx, signature, done)
        # Always once at the end too: a pass that changed the graph but said it did not is still caught.
        self._verify(model, signature, "end of pipeline", done)
        return model

    def _run_one(self, p: Pass, model: ir.Model, ctx: PassContext, signature: Signature,
                 done: list[str]) -> ir.Model:
        if isinstance(p, FixedPoint):
            # progress sees the group as one line (its passes, rounds and merged counts); records keep every run
            progress, self.progress, first = self.progress, None, len(self.records)
            try:
                for rounds in range(1, p.max_iterations + 1):
                    before = len(self.records)
                    for inner in p.passes:
                        model = self._run_one(inner, model, ctx, signature, done)
                    if not any(r.modified for r in self.records[before:]):
                        break
                else:
                    raise PassError(p.name, f"did not reach a fixed point within {p.max_iterations} iterations",
                                    previous=tuple(done))
            finally:
                self.progress = progress
            if progress is not None:
                runs = self.records[first:]
                counts: dict[str, int] = {}
                for r in runs:
                    for k, v in r.counts.items():
                        counts[k] = counts.get(k, 0) + v
                label = f"fixpoint({p.passes[0].name}..{p.passes[-1].name})" if len(p.passes) > 2 else p.name
                progress(PassRecord(f"{label} x{rounds}", sum(r.seconds for r in runs),
                                    any(r.modified for r in runs), counts, runs[-1].nodes_after if runs else 0))
            return model
        start = time.perf_counter()
        try:
            result = p.run(model, ctx)
        except OnnxcError:
            raise
        except Exception as exc:  # a pass bug: name it, keep the message to one line
            raise PassError(p.name, f"{type(exc).__name__}: {first_line(exc)}", previous=tuple(done)) from exc
        if not isinstance(result, PassResult):
            raise PassError(p.name, f"returned {type(result).__name__}, not PassResult", previous=tuple(done))
        model = result.model
        record = PassRecord(p.name, time.perf_counter() - start, result.modified, dict(result.counts),
                            sum(1 for _ in model.graph))
        self.records.append(record)
        done.append(p.name)
        if self.verify_each and result.modified:
            self._verify(model, signature, p.name, done[:-1])
        if self.progress is not None:
            self.progress(record)
        return model

    @staticmethod
    def _verify(model: ir.Model, signature: Signature, name: str, previous: list[str]) -> None:
        problems = check_model(model, signature)
        if problems:
            raise PassError(name, f"left an invalid graph: {summarize(problems)}", previous=tuple(previous))


# ---------------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Pass] = {}
_ENTRY_POINTS_LOADED = False
PLUGIN_FILES: dict[str, Path] = {}     # pass name -> the --plugin file that registered it


def register_pass(p: Pass | type[Pass]) -> Pass | type[Pass]:
    """Register a pass (class or instance). Usable as a class decorator."""
    instance = p() if isinstance(p, type) else p
    if not isinstance(instance, Pass):
        raise UsageError(f"register_pass needs an onnxc Pass, got {type(instance).__name__}")
    if not instance.name or any(ch in instance.name for ch in " \t\n,()"):
        raise UsageError(f"invalid pass name {instance.name!r}: no spaces, commas or parentheses")
    prior = _REGISTRY.get(instance.name)
    if prior is not None and prior is not instance and (type(prior) is not type(instance)
                                                        or isinstance(instance, RulePass)):
        raise UsageError(f"a pass named '{instance.name}' is already registered")
    _REGISTRY[instance.name] = instance
    return p


def registered_passes() -> dict[str, Pass]:
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> Pass:
    _load_entry_points()
    p = _REGISTRY.get(name)
    if p is None:
        raise UsageError(f"unknown pass '{name}'" + _rules.suggest(name, list(_REGISTRY)))
    return p


def all_parts() -> dict[str, tuple[Pass, Part]]:
    return {part.name: (p, part) for p in registered_passes().values() for part in p.parts()}


def all_rules() -> dict[str, tuple[Pass, _rules.Rule]]:
    out = {}
    for p in registered_passes().values():
        for r in p.rules():
            out[r.name] = (p, r)
    return out


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group="onnxc.passes"):
        try:
            obj = ep.load()
        except Exception as exc:
            raise UsageError(f"cannot load pass plugin '{ep.name}' ({ep.value}): {exc}") from None
        if isinstance(obj, Pass) or (isinstance(obj, type) and issubclass(obj, Pass)):
            register_pass(obj)


def load_plugin(path: str | Path) -> None:
    """Execute a Python file that registers passes with `onnxc.register_pass`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"plugin {path}: no such file")
    module_name = f"onnxc_plugin_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    known = set(_REGISTRY)
    try:
        spec.loader.exec_module(module)
    except OnnxcError:
        raise
    except Exception as exc:
        raise UsageError(f"plugin {path} failed to load: {type(exc).__name__}: {exc}") from None
    PLUGIN_FILES.update({name: path.resolve() for name in set(_REGISTRY) - known})


# ---------------------------------------------------------------------------------------------------- pipeline text
def parse_pipeline(text: str) -> list[Pass]:
    """Parse "a,b,fixpoint(c,d)" into passes. Unknown names are errors with a suggestion."""
    items, rest = _parse_list(text.replace(" ", "").replace("\n", ""), 0)
    if rest != len(text.replace(" ", "").replace("\n", "")):
        raise UsageError(f"pipeline: unexpected ')' in {text!r}")
    return items


def _parse_list(s: str, i: int) -> tuple[list[Pass], int]:
    out: list[Pass] = []
    while i < len(s):
        if s[i] == ",":
            i += 1
            continue
        if s[i] == ")":
            return out, i
        j = i
        while j < len(s) and s[j] not in ",()":
            j += 1
        name = s[i:j]
        if j < len(s) and s[j] == "(":
            if name not in ("fixpoint",):
                raise UsageError(f"pipeline: unknown group '{name}(' (only fixpoint(...) groups exist)")
            inner, j = _parse_list(s, j + 1)
            if j >= len(s) or s[j] != ")":
                raise UsageError("pipeline: missing ')'")
            out.append(FixedPoint(inner))
            i = j + 1
        else:
            if not name:
                raise UsageError(f"pipeline: empty pass name in {s!r}")
            out.append(get_pass(name))
            i = j
    return out, i


def _select(passes: Iterable[Pass], keep: Callable[[Pass], bool]) -> list[Pass]:
    """The passes `keep` accepts, looking inside fixpoint groups (a group left empty is dropped)."""
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, FixedPoint):
            inner = _select(p.passes, keep)
            if inner:
                out.append(FixedPoint(inner, p.max_iterations))
        elif keep(p):
            out.append(p)
    return out


def filter_passes(passes: Iterable[Pass], ctx: PassContext, disabled: frozenset[str]) -> list[Pass]:
    """Drop passes not meant for the context's level or target, or disabled by the user."""
    return _select(passes, lambda p: p.name not in disabled and p.level <= ctx.level and ctx.target in p.targets)


def drop_disabled(passes: Iterable[Pass], disabled: frozenset[str]) -> list[Pass]:
    """Drop disabled passes only (explicit pipelines ignore levels and targets)."""
    return _select(passes, lambda p: p.name not in disabled)


def flatten(passes: Iterable[Pass]) -> list[Pass]:
    out: list[Pass] = []
    for p in passes:
        out += flatten(p.passes) if isinstance(p, FixedPoint) else [p]
    return out


__all__ = ["Pass", "PassContext", "PassResult", "RulePass", "FixedPoint", "PassManager", "register_pass",
           "registered_passes", "get_pass", "load_plugin", "parse_pipeline", "filter_passes", "IRVerificationError"]
