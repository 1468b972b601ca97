"""`onnxc bench`: latency, throughput and memory of one or more models, timed interleaved in one process.

Inputs come from each model's signature as verification makes them (compiler/verify.py: token ids below their
table's size, masks of ones, positions continuing the past, past key/values of the scenario's length). A scenario is
`prefill:N` (N new tokens, empty cache) or `decode:N` (one new token after N cached ones; models with a KV cache
only). Every (model, mode) of a scenario and batch is timed one run at a time in turn, the first runner of each
round moving one place on, so load from other processes falls on every candidate alike.

Modes: `run` (session.run on numpy arrays: every output, the present cache included, comes back as a new array),
`bound` (IOBinding: inputs bound once, outputs left in onnxruntime's memory on the provider's device) and, for
decode, `in-place` (each past and its present bound to one buffer, nothing copied per token: compiler/kvcache.py),
only where the check the compile report records as `kv_cache` says `verified` on the session being timed.

Memory is RSS growth of this process (Linux /proc/self/status): `session_rss_mib` is what the session holds after
it is created; `peak_rss_mib` is the highest growth seen while that model's session was created and ran (its peak
counter reset before each measured step through /proc/self/clear_refs; where that is not allowed, transient peaks
inside a run are not seen). Each is measured around that model's own steps, outside the timed runs.

    import onnxc
    table = onnxc.bench(["model.onnx", "model.onnxc.onnx"], scenarios=["decode:256"])
    table["rows"]       # one per model, provider, scenario, batch and mode; "ratio" is p50 / the first model's
"""
from __future__ import annotations

import gc
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import InvalidModelError, UsageError, WriteError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEVICES = {"cpu": "cpu", "cuda": "cuda"}
DEFAULT_SCENARIOS = ("prefill:128", "decode:256")
MODES = ("run", "bound", "in-place")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
_SCENARIO = re.compile(r"^(prefill|decode):([1-9][0-9]*)$")


@dataclass(frozen=True)
class Workload:
    """One timed shape: `phase` prefill (`length` new tokens, no past) or decode (1 new token, `length` cached)."""
    phase: str
    length: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.phase}:{self.length}"

    def scenario(self):
        from .verify import Scenario

        if self.phase == "prefill":
            return Scenario(self.name, self.batch, self.length, 0)
        return Scenario(self.name, self.batch, 1, self.length)


def parse_scenario(text: str) -> tuple[str, int]:
    """`prefill:N` or `decode:N` (N >= 1) -> (phase, N); anything else is a usage error."""
    m = _SCENARIO.match(text.strip())
    if not m:
        raise UsageError(f"--scenario '{text}': expected prefill:N or decode:N with N >= 1")
    return m.group(1), int(m.group(2))


def parse_list(values: Sequence[str] | str | None, what: str) -> list[str]:
    """Comma-separated and repeated option values, in order, without repeats."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    seen: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                raise UsageError(f"{what}: empty item in '{item}'")
            if part not in seen:
                seen.append(part)
    return seen


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str] | None = None
                      ) -> tuple[list[str], list[dict[str, str]]]:
    """The providers to time and the ones skipped, each with its reason. Asked for by name, a provider onnxruntime
    lacks is a usage error; by default cpu and cuda are tried and a missing cuda is skipped."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    names = parse_list(requested, "--provider") or ["cpu", "cuda"]
    chosen, skipped = [], []
    for name in names:
        if name not in PROVIDERS:
            raise UsageError(f"--provider '{name}': expected one of {', '.join(PROVIDERS)}")
        if PROVIDERS[name] in available:
            chosen.append(name)
            continue
        reason = f"onnxruntime has no {PROVIDERS[name]} (it has {', '.join(available)})"
        if requested:
            raise UsageError(f"--provider {name}: {reason}; install onnxruntime-gpu (onnxc[cuda]) on a machine "
                             "with CUDA")
        skipped.append({"provider": name, "reason": reason})
    return chosen, skipped


def check_plot_extra() -> None:
    """--plot needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnxc[plot]'") from None


# ---------------------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """RSS growth around a piece of work, with the peak inside it where the kernel lets the peak be reset."""

    def __init__(self) -> None:
        self.available = _status_kib("VmRSS") is not None
        self.resettable = self.available and self._reset()
        self.method = ("VmRSS and VmHWM, peak reset per step" if self.resettable else
                       "VmRSS before and after each step" if self.available else "unavailable")

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def measure(self, work: Callable[[], Any]) -> tuple[Any, int, int]:
        """Run `work`; return (its result, RSS growth after it, highest growth during it) in bytes."""
        if not self.available:
            return work(), 0, 0
        if self.resettable:
            self._reset()
        before = _status_kib("VmRSS") or 0
        result = work()
        after = _status_kib("VmRSS") or 0
        peak = (_status_kib("VmHWM") or after) if self.resettable else after
        return result, (after - before) * 1024, max(peak - before, after - before, 0) * 1024


@dataclass
class _Candidate:
    index: int
    path: Path
    provider: str
    session: Any = None
    model: Any = None               # the onnx_ir model (signature), dropped once feeds and the cache check are made
    held: int = 0                   # RSS growth this model's work holds now, bytes
    peak: int = 0
    session_s: float = 0.0
    session_rss: int = 0
    kv_cache: dict | None = None
    has_past: bool = False


# ---------------------------------------------------------------------------------------------------- runners
def _session(path: Path, provider: str, threads: int | None) -> Any:
    """A session as a user runs the model: onnxruntime's default graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=[PROVIDERS[provider]])


def _warm_runtime(provider: str, threads: int | None) -> None:
    """Create and run a one-node session first, so onnxruntime's one-time start-up is charged to no candidate."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory(prefix="onnxc-bench-") as tmp:
        path = Path(tmp) / "warm.onnx"
        onnx.save(model, str(path))
        _session(path, provider, threads).run(None, {"x": np.ones(1, np.float32)})


def runners_for(session: Any, feeds: dict[str, np.ndarray], device: str, pairs: list[tuple[str, str]] | None,
                capacity: int) -> dict[str, Callable[[], Any]]:
    """The ways to run one step of `session` on `feeds` (module docstring): `run`, `bound` and, given the
    (past, present) pairs that may share a buffer, `in-place` with buffers of `capacity` positions."""
    import onnxruntime as ort

    from . import kvcache

    binding = session.io_binding()
    values = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0) for n, a in feeds.items()}
    for n, v in values.items():
        binding.bind_ortvalue_input(n, v)
    for o in session.get_outputs():
        binding.bind_output(o.name, device)
    runners: dict[str, Callable[[], Any]] = {
        "run": lambda: session.run(None, feeds),
        "bound": lambda keep=values: session.run_with_iobinding(binding),
    }
    if pairs:
        shared, _, buffers = kvcache.bind_shared(session, feeds, pairs, capacity, device=device)
        runners["in-place"] = lambda keep=buffers: session.run_with_iobinding(shared)
    return runners


def interleave(runners: Sequence[Callable[[], Any]], runs: int, warmup: int,
               clock: Callable[[], int] = time.perf_counter_ns) -> list[list[float]]:
    """Time each runner `runs` times (ms), after `warmup` untimed rounds, one run at a time in turn; round r starts
    at runner r mod n, so no runner always follows the same one. The garbage collector is off while timing."""
    n = len(runners)
    samples: list[list[float]] = [[] for _ in runners]
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + runs):
            for k in range(n):
                i = (r + k) % n
                t0 = clock()
                runners[i]()
                t1 = clock()
                if r >= warmup:
                    samples[i].append((t1 - t0) / 1e6)
    finally:
        if enabled:
            gc.enable()
    return samples


def _tokens(feeds: dict[str, np.ndarray], roles: dict[str, str], work: Workload) -> int:
    """New tokens one run processes: the token ids' size (batch x new positions), else the workload's count."""
    ids = [a for n, a in feeds.items() if roles.get(n) == "ids" and a.ndim >= 2]
    if ids:
        return int(ids[0].shape[0] * ids[0].shape[1])
    return work.batch * (work.length if work.phase == "prefill" else 1)


# ---------------------------------------------------------------------------------------------------- the bench
def bench(models: Sequence[str | os.PathLike], *, providers: Sequence[str] | str | None = None,
          scenarios: Sequence[str] | str | None = None, batches: Sequence[int | str] | str | None = None,
          threads: int | None = None, runs: int = 50, warmup: int = 5, seed: int = 0,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time `models` (paths) interleaved and return the table as data: `rows` (one per model, provider,
    scenario, batch and mode, with p50/p90/p99 latency, tokens/s, session time, memory and the ratio of its p50 to
    the first model's in the same provider, scenario, batch and mode), `best` (per model, its fastest mode and that
    mode's ratio to the first model's fastest), `sessions`, `skipped` (with reasons) and the settings used.
    Raises UsageError for bad options (providers: resolve_providers) and InvalidModelError for a model that
    cannot be read or loaded by onnxruntime."""
    from . import ir as irio
    from .verify import input_role

    say = progress or (lambda line: None)
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if isinstance(batches, int):
        batches = [batches]
    if not models:
        raise UsageError("give at least one model")
    if runs < 1 or warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be >= 1")
    phases = [parse_scenario(s) for s in parse_list(scenarios, "--scenario") or list(DEFAULT_SCENARIOS)]
    batch_sizes = []
    for b in parse_list([str(b) for b in batches] if isinstance(batches, (list, tuple)) else batches, "--batch"):
        if not b.isdigit() or int(b) < 1:
            raise UsageError(f"--batch '{b}': expected positive integers, e.g. 1,4")
        batch_sizes.append(int(b))
    batch_sizes = batch_sizes or [1]
    chosen, skipped = resolve_providers(providers)
    paths = [Path(m) for m in models]
    for p in paths:
        if not p.is_file():
            raise InvalidModelError(f"{p}: {'not a regular file' if p.exists() else 'no such file'}")

    signatures = []
    for p in paths:
        model = irio.load(p)
        roles = {v.name: input_role(v) for v in model.graph.inputs if not v.is_initializer()}
        signatures.append((model, roles, any(r == "past" for r in roles.values())))

    memory = Memory()
    rows: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    for provider in chosen:
        device = DEVICES[provider]
        _warm_runtime(provider, threads)
        cands = []
        for i, p in enumerate(paths):
            say(f"{provider}: creating a session for {p}")
            c = _Candidate(i, p, provider, model=signatures[i][0], has_past=signatures[i][2])
            t0 = time.perf_counter()
            try:
                c.session, grown, peak = memory.measure(lambda: _session(p, provider, threads))
            except Exception as exc:        # noqa: BLE001 - onnxruntime raises its own types
                raise InvalidModelError(f"{p}: onnxruntime cannot load it on {provider} ({first_line(exc)})"
                                        ) from None
            c.session_s = time.perf_counter() - t0
            c.session_rss, c.held, c.peak = grown, grown, peak
            c.kv_cache = _kv_check(c, memory, seed)
            cands.append(c)
        for phase, length in phases:
            for batch in batch_sizes:
                work = Workload(phase, length, batch)
                rows += _time_workload(cands, work, device, memory, runs, warmup, seed, say)
        for c in cands:
            sessions.append({"model": str(c.path), "model_index": c.index, "provider": provider,
                             "session_s": round(c.session_s, 4), "session_rss_mib": _mib(c.session_rss),
                             "peak_rss_mib": _mib(c.peak), "kv_cache": c.kv_cache})
            for row in rows:
                if row["model_index"] == c.index and row["provider"] == provider and not row.get("skipped"):
                    row["peak_rss_mib"] = _mib(c.peak)
        for c in cands:
            c.session = None
        gc.collect()
    skipped += [{k: v for k, v in r.items() if k != "skipped"} for r in rows if r.get("skipped")]
    rows = [r for r in rows if not r.get("skipped")]
    _ratios(rows)
    return {
        "onnxc": __version__,
        "onnxruntime": _ort_version(),
        "machine": {"system": platform.system(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "processor": _cpu_name()},
        "settings": {"models": [str(p) for p in paths], "providers": chosen,
                     "scenarios": [f"{a}:{b}" for a, b in phases], "batches": batch_sizes,
                     "threads": threads, "runs": runs, "warmup": warmup, "seed": seed, "memory": memory.method},
        "sessions": sessions,
        "rows": rows,
        "best": _best(rows),
        "skipped": skipped,
    }


def _kv_check(c: _Candidate, memory: Memory, seed: int) -> dict[str, Any]:
    """The compile report's `kv_cache` check (compiler/kvcache.py), run on the session being timed, on the
    verification scenarios of the model."""
    from . import kvcache
    from .verify import compute_precision, make_inputs, scenarios_for

    if not c.has_past:
        return {"status": "not applicable", "reason": "the model has no past key/value inputs"}
    feeds = [make_inputs(c.model, sc, seed + k) for k, sc in enumerate(scenarios_for(c.model))]
    result, grown, peak = memory.measure(
        lambda: kvcache.check_session(c.session, c.model, feeds, compute_precision(c.model)))
    c.peak = max(c.peak, c.held + peak)
    c.held += grown
    return result


def _time_workload(cands: list[_Candidate], work: Workload, device: str, memory: Memory, runs: int, warmup: int,
                   seed: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Build every candidate's runners for `work` (each measured: bindings and one untimed run of every mode), then
    time them all interleaved. Candidates without a cache get a `skipped` row for a decode workload."""
    from . import kvcache
    from .verify import input_role, make_inputs, narrow_feeds

    rows: list[dict[str, Any]] = []
    timed: list[tuple[_Candidate, str, int, Callable[[], Any]]] = []
    built: list[tuple[_Candidate, dict[str, Callable[[], Any]]]] = []
    for c in cands:
        if work.phase == "decode" and not c.has_past:
            rows.append({"skipped": True, "model": str(c.path), "model_index": c.index, "provider": c.provider,
                         "scenario": work.name, "batch": work.batch,
                         "reason": "decode needs a model with past key/value inputs"})
            continue
        feeds = narrow_feeds(make_inputs(c.model, work.scenario(), seed), c.session)
        roles = {v.name: input_role(v) for v in c.model.graph.inputs}
        pairs = None
        if work.phase == "decode" and (c.kv_cache or {}).get("status") == "verified":
            pairs = kvcache.shared_cache_pairs(c.model).pairs
        capacity = max((a.shape[2] for n, a in feeds.items() if roles.get(n) == "past" and a.ndim == 4), default=0)
        capacity += kvcache.appended_positions(c.model, feeds)

        def build(c=c, feeds=feeds, pairs=pairs, capacity=capacity):
            made = runners_for(c.session, feeds, device, pairs, capacity)
            for r in made.values():
                r()
            return made

        try:
            made, grown, peak = memory.measure(build)
        except Exception as exc:        # noqa: BLE001 - onnxruntime raises its own types
            raise InvalidModelError(f"{c.path}: onnxruntime cannot run it on {c.provider} for {work.name} batch "
                                    f"{work.batch} ({first_line(exc)})") from None
        c.peak = max(c.peak, c.held + peak)
        c.held += grown
        tokens = _tokens(feeds, roles, work)
        timed += [(c, mode, tokens, run) for mode, run in made.items()]
        built.append((c, made))
    if not timed:
        return rows
    say(f"{cands[0].provider}: timing {work.name} batch {work.batch}: {len(timed)} runners x {runs} runs, "
        "interleaved")
    samples = interleave([t[3] for t in timed], runs, warmup)
    timed = [(c, mode, tokens, None) for c, mode, tokens, _ in timed]
    for c, made in built:          # what a model gives back when its bindings go counts against what it holds
        _, grown, _ = memory.measure(lambda made=made: (made.clear(), gc.collect()))
        c.held += grown
    for (c, mode, tokens, _), ms in zip(timed, samples):
        p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
        rows.append({"model": str(c.path), "model_index": c.index, "provider": c.provider, "scenario": work.name,
                     "phase": work.phase, "length": work.length, "batch": work.batch, "mode": mode,
                     "tokens": tokens, "runs": len(ms), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
                     "mean_ms": float(np.mean(ms)), "min_ms": float(np.min(ms)),
                     "tokens_per_s": tokens / (p50 / 1000.0) if p50 > 0 else float("inf"),
                     "ratio": None, "session_s": round(c.session_s, 4), "session_rss_mib": _mib(c.session_rss),
                     "peak_rss_mib": None, "kv_cache": (c.kv_cache or {}).get("status"), "samples_ms": ms})
    return rows


def _group(row: dict[str, Any]) -> tuple:
    return row["provider"], row["scenario"], row["batch"]


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's p50 over the first model's p50 in the same provider, scenario, batch and mode (None where the
    first model has no such row)."""
    first = min((r["model_index"] for r in rows), default=0)
    base = {(*_group(r), r["mode"]): r["p50_ms"] for r in rows if r["model_index"] == first}
    for r in rows:
        b = base.get((*_group(r), r["mode"]))
        r["ratio"] = r["p50_ms"] / b if b else None


def _best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, provider, scenario and batch: its fastest mode by p50, and that p50 over the first model's
    fastest."""
    fastest: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (*_group(r), r["model_index"])
        if key not in fastest or r["p50_ms"] < fastest[key]["p50_ms"]:
            fastest[key] = r
    first = min((r["model_index"] for r in rows), default=0)
    out = []
    for (provider, scenario, batch, index), r in fastest.items():
        b = fastest.get((provider, scenario, batch, first))
        out.append({"model": r["model"], "model_index": index, "provider": provider, "scenario": scenario,
                    "batch": batch, "mode": r["mode"], "p50_ms": r["p50_ms"], "tokens_per_s": r["tokens_per_s"],
                    "ratio": r["p50_ms"] / b["p50_ms"] if b else None})
    return out


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------------------------------------- output
def write_json(result: dict[str, Any], path: Path) -> None:
    """The table as JSON, written atomically."""
    import json

    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))


def plot(result: dict[str, Any], path: Path) -> None:
    """Per provider, scenario and batch, one row of two panels: the latency distribution of every (model, mode) on a
    log axis, and per model the ratio of its fastest mode's p50 to the first model's fastest. Written atomically in
    the format the suffix names."""
    check_plot_extra()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = list(dict.fromkeys(_group(r) for r in rows))
    if not groups:
        raise UsageError("--plot: nothing was timed, so there is nothing to draw")
    names = _short_names([r["model"] for r in rows])
    height = [max(2.6, 0.4 * sum(1 for r in rows if _group(r) == g) + 1.4) for g in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, sum(height)), squeeze=False,
                             gridspec_kw={"height_ratios": height, "width_ratios": [3, 2]})
    for (ax_lat, ax_ratio), group in zip(axes, groups):
        mine = [r for r in rows if _group(r) == group]
        ax_lat.boxplot([r["samples_ms"] for r in mine], orientation="horizontal", whis=(5, 95),
                       flierprops={"markersize": 3})
        ax_lat.set_yticks(range(1, len(mine) + 1), [f"[{r['model_index']}] {names[r['model']]} {r['mode']}"
                                                     for r in mine], fontsize=8)
        ax_lat.invert_yaxis()
        ax_lat.set_xscale("log")
        ax_lat.set_xlabel("latency per run (ms, log scale; box p25-p75, whiskers p5-p95)")
        ax_lat.set_title(f"{group[0]} {group[1]} batch {group[2]}: latency", fontsize=10)
        best = [b for b in result["best"] if (b["provider"], b["scenario"], b["batch"]) == group]
        ratios = [b["ratio"] or 0.0 for b in best]
        ax_ratio.barh(range(len(best)), ratios, color=["C0" if x <= 1 else "C3" for x in ratios])
        ax_ratio.axvline(1.0, color="k", linewidth=0.8)
        ax_ratio.set_yticks(range(len(best)), [f"[{b['model_index']}] {names[b['model']]} ({b['mode']})"
                                               for b in best], fontsize=8)
        ax_ratio.invert_yaxis()
        for k, x in enumerate(ratios):
            ax_ratio.text(x, k, f" {x:.2f}x", va="center", fontsize=8)
        ax_ratio.set_xlim(0, max(ratios + [1.0]) * 1.2)
        ax_ratio.set_xlabel("fastest mode's p50 / model [0]'s fastest")
        ax_ratio.set_title("ratio to the first model", fontsize=10)
    fig.tight_layout()
    fmt = path.suffix.lower().lstrip(".")
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110, metadata=_plot_metadata(fmt)))
    plt.close(fig)


def _plot_metadata(fmt: str) -> dict[str, Any]:
    """No creation date or software version in the file."""
    return {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
            "pdf": {"CreationDate": None, "Creator": None, "Producer": None}}.get(fmt, {})


def _short_names(paths: list[str]) -> dict[str, str]:
    """File names where they differ, else the paths."""
    unique = list(dict.fromkeys(paths))
    names = {p: Path(p).name for p in unique}
    return names if len(set(names.values())) == len(unique) else {p: p for p in unique}


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def table_text(result: dict[str, Any]) -> list[str]:
    """The rows as aligned text: model, provider, scenario, batch, mode, p50/p90/p99 ms, tokens/s, ratio."""
    names = _short_names([r["model"] for r in result["rows"]])
    head = ("model", "provider", "scenario", "batch", "mode", "p50 ms", "p90 ms", "p99 ms", "tokens/s", "ratio")
    body = [(f"[{r['model_index']}] {names[r['model']]}", r["provider"], r["scenario"], str(r["batch"]), r["mode"],
             f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['tokens_per_s']:.1f}",
             "-" if r["ratio"] is None else f"{r['ratio']:.2f}x") for r in result["rows"]]
    widths = [max(len(row[k]) for row in [head, *body]) for k in range(len(head))]
    return ["  ".join(c.ljust(w) if k < 5 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in [head, *body]]
