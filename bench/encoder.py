#!/usr/bin/env python
"""Encoder-style fusion benchmark: onnxc against onnxscript and ONNX Runtime's transformers optimizer, in one run.

On the same models (the BERT and GPT-2 fixtures from both exporters by default) each tool writes an optimized model:

- onnxc: `onnxc.compile(path, LEVEL, "cpu", output=...)` (wall time includes onnxc's own numeric verification);
- onnxscript: `onnxscript.optimizer.optimize` then `onnxscript.rewriter.ort_fusions.optimize_for_ort`;
- ORT: `onnxruntime.transformers.optimizer.optimize_model(path, model_type="bert"|"gpt2", num_heads, hidden_size,
  opt_level=ORT_OPT_LEVEL)` with the head count and hidden size from fixtures/manifest.json.

For every model and tool the table reports the fusions in the written graph (op counts, `Softmax` left over), its
node count, the tool's wall time, CPU latency (onnxruntime CPU execution provider, --threads intra-op threads,
default graph optimizations as users run it; median of --runs after --warmup) at --batch x --seq, and the largest
absolute difference from the unoptimized model (run with onnxruntime's optimizations off) on the same inputs, once
with an all-ones attention mask and once with a right-padded one. Every optimized model loads and runs in its own
child process, so a model that fails to load, to run, or crashes onnxruntime gets `error: ...` in its row.

    python bench/encoder.py                      # prints the table and updates docs/encoder-benchmark.md
    python bench/encoder.py --models bert_ts --runs 10 --no-doc

Needs the bench extra (onnxscript); writes the optimized models under bench/out/encoder/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
DOC = ROOT / "docs" / "encoder-benchmark.md"
DEFAULT_MODELS = ["bert_ts", "bert_dynamo", "gpt2_ts", "gpt2_dynamo"]
FUSED = [("Attention", "Attention"), ("MultiHeadAttention", "MHA"), ("SkipLayerNormalization", "SkipLN"),
         ("LayerNormalization", "LN"), ("EmbedLayerNormalization", "EmbedLN"), ("BiasGelu", "BiasGelu"),
         ("FastGelu", "FastGelu"), ("Gelu", "Gelu"), ("Softmax", "Softmax left")]
BEGIN, END = "<!-- bench/encoder.py: begin -->", "<!-- bench/encoder.py: end -->"


# ---------------------------------------------------------------------------------------------------- the tools

def build_onnxc(src: Path, dst: Path, entry: dict, args) -> str:
    import onnxc

    r = onnxc.compile(str(src), args.level, "cpu", output=str(dst))
    return f"verify {r.report['seconds']['verify']:.2f}"


def build_onnxscript(src: Path, dst: Path, entry: dict, args) -> str:
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    model = onnxscript.optimizer.optimize(model) or model
    model, _counts = optimize_for_ort(model)
    ir.save(model, dst)
    return ""


def build_ort(src: Path, dst: Path, entry: dict, args) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = entry["config"]
    model_type = "bert" if entry["family"] == "bert" else "gpt2"
    opt = optimize_model(str(src), model_type=model_type, num_heads=cfg["num_heads"], hidden_size=cfg["hidden"],
                         opt_level=args.ort_opt_level, only_onnxruntime=False)
    opt.save_model_to_file(str(dst))
    return ""


def tools(args) -> list[tuple[str, str, object]]:
    return [(f"onnxc -O{args.level}", "onnxc", build_onnxc),
            ("onnxscript optimize + optimize_for_ort", "onnxscript", build_onnxscript),
            (f"ORT optimize_model (opt_level {args.ort_opt_level})", "ort", build_ort)]


# ---------------------------------------------------------------------------------------------------- inputs

def make_feeds(path: Path, vocab: int, batch: int, seq: int, padded: bool) -> dict[str, np.ndarray]:
    """Inputs from the graph's inputs: ids in [0, vocab), a mask of ones (or right-padded), positions 0..seq-1."""
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in m.graph.input:
        if vi.name in init:
            continue
        dt = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if "mask" in vi.name:
            mask = np.ones((batch, seq), dtype=dt)
            if padded:                                   # every other row loses its last quarter (keys 0.. stay)
                mask[1::2, seq - seq // 4:] = 0
            feeds[vi.name] = mask
        elif "position" in vi.name:
            feeds[vi.name] = np.broadcast_to(np.arange(seq, dtype=dt), (batch, seq)).copy()
        elif "token_type" in vi.name:
            feeds[vi.name] = np.zeros((batch, seq), dtype=dt)
        elif "ids" in vi.name:
            feeds[vi.name] = rng.integers(0, vocab, (batch, seq)).astype(dt)
        else:
            raise ValueError(f"{path.name}: no rule to build input '{vi.name}' (a model with a KV cache?)")
    return feeds


def session(path: Path, threads: int, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check(path: Path, data: Path, threads: int) -> dict:
    """Child process body: load with default optimizations, run both input sets, diff against the reference."""
    blob = np.load(data)
    sess = session(path, threads, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    diffs = {}
    for case in ("ones", "padded"):
        got = sess.run(None, case_feeds(blob, case))
        diffs[case] = max(float(np.max(np.abs(g.astype(np.float64) - blob[f"{case}:out:{n}"])))
                          for n, g in zip(names, got))
        diffs[case + "_scale"] = max(float(np.max(np.abs(blob[f"{case}:out:{n}"]))) for n in names)
    return diffs


def time_all(paths: list[Path], data: Path, threads: int, warmup: int, runs: int, burst: int) -> dict:
    """Child process body: every variant of one model in one process, timed round-robin in bursts of `burst` runs,
    so load from other processes on a shared machine falls on all variants alike."""
    feeds = case_feeds(np.load(data), "ones")
    sessions = {str(p): session(p, threads, optimize=True) for p in paths}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    while any(len(t) < runs for t in times.values()):
        for key, sess in sessions.items():
            for _ in range(min(burst, runs - len(times[key]))):
                t = time.perf_counter()
                sess.run(None, feeds)
                times[key].append(time.perf_counter() - t)
    return {k: {"ms": statistics.median(t) * 1e3, "ms_min": min(t) * 1e3} for k, t in times.items()}


def case_feeds(blob, case: str) -> dict[str, np.ndarray]:
    prefix = f"{case}:in:"
    return {k[len(prefix):]: blob[k] for k in blob.files if k.startswith(prefix)}


def reference(path: Path, entry: dict, args, data: Path) -> None:
    """The unoptimized model, onnxruntime's optimizations off, on both input sets; saved for the children."""
    sess = session(path, args.threads, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    arrays = {}
    for case in ("ones", "padded"):
        feeds = make_feeds(path, entry["config"]["vocab"], args.batch, args.seq, case == "padded")
        arrays.update({f"{case}:in:{k}": v for k, v in feeds.items()})
        arrays.update({f"{case}:out:{n}": v for n, v in zip(names, sess.run(None, feeds))})
    np.savez(data, **arrays)


def run_child(mode: list[str], data: Path, args) -> dict:
    cmd = [sys.executable, __file__, *mode, "--data", str(data), "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--runs", str(args.runs), "--burst", str(args.burst)]
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 300 s"}
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    if p.returncode < 0:
        return {"error": f"onnxruntime crashed (signal {-p.returncode})"}
    return {"error": first_line(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")}


def first_line(text: str) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else "(no message)"
    return line.replace("|", "\\|")[:160]


# ---------------------------------------------------------------------------------------------------- the table

def graph_stats(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    return {"nodes": len(m.graph.node), "ops": {op: ops[op] for op, _ in FUSED}}


def verdict(diff: float, scale: float) -> str:
    """Mark a difference beyond onnxc's fp32 tolerance, |a - b| <= 1e-4 * max|b| + 1e-4 * |b|, with |b| <= max|b|."""
    return f"{diff:.1e}" + ("" if diff <= 2e-4 * scale else " MISMATCH")


def header() -> list[str]:
    cols = ["model", "tool", *[short for _, short in FUSED], "nodes", "compile s", "ms median", "ms min",
            "vs unopt", "max abs diff", "padded mask"]
    return ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 4) + "---|---|"]


def row(model: str, tool: str, r: dict, base_ms: float | None) -> str:
    if "build_error" in r:
        cells = ["–"] * (len(FUSED) + 5) + [f"error: {r['build_error']}", ""]
        return f"| {model} | {tool} | " + " | ".join(cells) + " |"
    cells = [str(r["ops"][op]) for op, _ in FUSED] + [str(r["nodes"])]
    if "build_s" in r:
        cells.append(f"{r['build_s']:.2f}" + (f" ({r['build_note']})" if r.get("build_note") else ""))
    else:
        cells.append("–")
    c, t = r["check"], r.get("timing", {"error": "not timed"})
    if "error" in c:
        cells += ["–", "–", "–", f"error: {c['error']}", ""]
    elif "error" in t:
        cells += [f"error: {t['error']}", "–", "–", verdict(c["ones"], c["ones_scale"]),
                  verdict(c["padded"], c["padded_scale"])]
    else:
        cells += [f"{t['ms']:.2f}", f"{t['ms_min']:.2f}", f"{base_ms / t['ms']:.2f}x" if base_ms else "–",
                  verdict(c["ones"], c["ones_scale"]), verdict(c["padded"], c["padded_scale"])]
    return f"| {model} | {tool} | " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------------- provenance

def machine() -> str:
    cpu, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = "/".join(name for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512")) if flag in flags)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return f"{platform.machine()}, `nproc` {nproc}, {cpu}{' (' + isa + ')' if isa else ''}{load}"


def versions() -> str:
    from importlib.metadata import version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("onnxc", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except Exception:  # noqa: BLE001 (a missing package is reported, not fatal)
            parts.append(f"{pkg} missing")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compiler", "passes", "kernels"], cwd=ROOT,
                               check=False, capture_output=True, text=True).stdout.strip()
        parts[1] += f" (commit {head}{', with uncommitted changes to the compiler' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        pass
    return ", ".join(parts)


def write_doc(block: str) -> None:
    if DOC.exists() and BEGIN in (text := DOC.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]
    else:
        text = f"# Encoder benchmark\n\nGenerated by `python bench/encoder.py`.\n\n{BEGIN}\n{block}{END}\n"
    DOC.write_text(text)


# ---------------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="fixture stems, comma-separated")
    ap.add_argument("--level", type=int, default=2, help="onnxc level (-O2 and -O3 run the same CPU pipeline)")
    ap.add_argument("--ort-opt-level", type=int, default=1, choices=(0, 1), help="ORT optimizer's opt_level")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--burst", type=int, default=5, help="runs per variant per round of the round-robin timing")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "encoder")
    ap.add_argument("--no-doc", action="store_true", help=f"print only; do not update {DOC.relative_to(ROOT)}")
    ap.add_argument("--check", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--time", type=Path, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.check or args.time:                           # child process: one JSON line
        try:
            if args.check:
                result = check(args.check, args.data, args.threads)
            else:
                result = time_all(args.time, args.data, args.threads, args.warmup, args.runs, args.burst)
            print(json.dumps(result))
        except Exception as e:  # noqa: BLE001 (any failure becomes the row's error)
            print(json.dumps({"error": first_line(f"{type(e).__name__}: {e}")}))
        return 0

    warnings.filterwarnings("ignore")
    for name in ("onnxruntime", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started, host = time.perf_counter(), machine()
    manifest = {Path(e["file"]).stem: e for e in json.loads((FIXTURES / "manifest.json").read_text())["models"]}
    stems = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [s for s in stems if s not in manifest]
    if unknown:
        print(f"unknown fixture(s): {', '.join(unknown)}; choose from {', '.join(manifest)}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)

    # One untimed build per tool first, so compile times leave out imports and first-call setup.
    warm = args.work / "_warmup"
    warm.mkdir(exist_ok=True)
    for _label, stem, build in tools(args):
        with contextlib.suppress(Exception):             # a failing build is reported by its timed run
            build(FIXTURES / manifest[stems[0]]["file"], warm / f"{stem}.onnx", manifest[stems[0]], args)

    lines = header()
    for model in stems:
        entry, src = manifest[model], FIXTURES / manifest[model]["file"]
        out = args.work / model
        out.mkdir(exist_ok=True)
        data = out / "reference.npz"
        try:
            reference(src, entry, args, data)
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {model} | unoptimized | error: {first_line(f'{type(e).__name__}: {e}')} |")
            continue
        results = [("unoptimized", {**graph_stats(src), "path": src})]
        for label, stem, build in tools(args):
            dst = out / f"{stem}.onnx"
            for stale in (dst, Path(str(dst) + ".data")):
                stale.unlink(missing_ok=True)
            t = time.perf_counter()
            try:
                note = build(src, dst, entry, args)
                r = {"build_s": time.perf_counter() - t, "build_note": note, "path": dst, **graph_stats(dst)}
            except Exception as e:  # noqa: BLE001
                r = {"build_error": first_line(f"{type(e).__name__}: {e}")}
            results.append((label, r))
        runnable = []
        for _label, r in results:
            if "path" in r:
                r["check"] = run_child(["--check", str(r["path"])], data, args)
                if "error" not in r["check"]:
                    runnable.append(r)
        if runnable:
            timing = run_child(["--time", *[str(r["path"]) for r in runnable]], data, args)
            for r in runnable:
                r["timing"] = timing.get(str(r["path"]), timing)
        base = results[0][1].get("timing", {}).get("ms")
        lines += [row(model, label, r, base) for label, r in results]

    table = "\n".join(lines)
    print(table)
    elapsed = time.perf_counter() - started
    print(f"\n{len(stems)} models in {elapsed:.0f} s", file=sys.stderr)
    if not args.no_doc:
        argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
        block = (f"Command: `python bench/encoder.py{' ' + argv if argv else ''}` ({elapsed:.0f} s)\n\n"
                 f"Machine: {host}\n\n"
                 f"Versions: {versions()}\n\n"
                 f"Latency: batch {args.batch}, sequence {args.seq}, onnxruntime CPU execution provider, "
                 f"{args.threads} intra-op threads, default graph optimizations, median of {args.runs} runs after "
                 f"{args.warmup} warm-up runs.\n\n{table}\n")
        write_doc(block)
        print(f"updated {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
