#!/usr/bin/env python
"""Decode latency: one token after N cached tokens, CPU execution provider, in one run for every variant.

Variants: the unoptimized export, onnxscript's `optimize` + `optimize_for_ort` fusions, onnxc -O3 --target cpu,
and (with --int4) onnxc -O3 --quantize int4 and onnxscript's fusions + ORT's MatMulNBitsQuantizer (RTN, block 32,
symmetric, accuracy_level 4). Every model runs with onnxruntime's default graph optimizations, as a user would run
it, with the same inputs. All models are loaded at once and timed in turn, a few steps each (round robin), so load
from other processes falls on every variant alike; the table reports the median of --runs timed steps after
--warmup untimed ones. Each model is timed three ways where it can be (see _runners): `run` (session.run on numpy
arrays), `bound` (IOBinding, outputs kept by onnxruntime) and `in-place` (one cache buffer bound as past and
present, for models whose every past input feeds GroupQueryAttention alone; checked against `run` first). A
variant's figure is its median in its fastest mode. int4 rows also report their logits' error against onnxc's float
model.

    python bench/make_llama.py                          # bench/out/llama30/model.onnx (30 layers, KV cache)
    python bench/decode.py                              # prints the table
    python bench/decode.py --int4 --grid                # + onnxc int4 at block 32/64/128, sym/asym, logit error
    python bench/decode.py --model other.onnx --past 512 --threads 4
    python bench/decode.py --compare a.onnx b.onnx      # only time the given models (e.g. two exports' compiles)

Needs the bench extra (onnxscript); every variant is built here (onnxc's with verification) unless --reuse finds it.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "bench" / "out" / "llama30" / "model.onnx"


def _onnxscript(src: Path, dst: Path, int4: bool = False) -> dict:
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    model = onnxscript.optimizer.optimize(model) or model
    model, counts = optimize_for_ort(model)
    ir.save(model, dst, external_data=dst.name + ".data")
    if int4:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

        proto = onnx.load(str(dst))
        cfg = RTNWeightOnlyQuantConfig()
        q = MatMulNBitsQuantizer(proto, block_size=32, is_symmetric=True, accuracy_level=4, algo_config=cfg)
        q.process()
        onnx.save(q.model.model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return {k: v for k, v in counts.items() if v}


def _onnxc(src: Path, dst: Path, extra: dict) -> dict:
    import onnxc

    r = onnxc.compile(str(src), 3, "cpu", output=str(dst), options=extra)
    return r.report


def _feeds(path: Path, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    m = onnx.load(str(path), load_external_data=False)
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    init = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if "past" in vi.name:
            feeds[vi.name] = rng.standard_normal([1, dims[1], past, dims[3]]).astype(dt)
        elif "mask" in vi.name:
            feeds[vi.name] = np.ones((1, past + 1), dtype=dt)
        elif "position" in vi.name:
            feeds[vi.name] = np.array([[past]], dtype=dt)
        else:
            feeds[vi.name] = rng.integers(0, 100, (1, 1)).astype(dt) if seed else np.array([[7]], dtype=dt)
    return feeds


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


MODES = ("run", "bound", "in-place")


def _runners(session, path: Path, feeds: dict[str, np.ndarray], capacity: int) -> dict[str, object]:
    """The ways to run one decode step of a model, each a callable:

    run       session.run on numpy arrays: every output, the whole present cache included, comes back as a new
              numpy array (what a plain Python loop does);
    bound     IOBinding: inputs bound once, outputs left in onnxruntime's memory, as a runtime that feeds the
              present back as the next past does;
    in-place  past and present bound to one buffer of `capacity` positions (onnxruntime's
              past_present_share_buffer, as onnxruntime-genai runs GroupQueryAttention models): the cache is not
              copied. Only where onnxc.kvcache finds every past read by GroupQueryAttention alone, and only after
              one step's outputs match the `run` mode's."""
    import onnxruntime as ort
    import onnx_ir as ir

    from onnxc import kvcache

    def plain():
        session.run(None, feeds)

    binding = session.io_binding()
    for n, a in feeds.items():
        binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(a))
    for o in session.get_outputs():
        binding.bind_output(o.name, "cpu")
    runners: dict[str, object] = {"run": plain, "bound": lambda: session.run_with_iobinding(binding)}
    model = ir.load(str(path))
    layout = kvcache.shared_cache_pairs(model)
    if layout.shareable:
        new = kvcache.appended_positions(model, feeds)
        ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        got = kvcache.run_shared(session, feeds, layout.pairs, capacity, new)
        if all(np.allclose(got[n], ref[n], rtol=1e-5, atol=1e-5) for n in ref):
            shared, _, buffers = kvcache.bind_shared(session, feeds, layout.pairs, capacity)

            def in_place(b=shared, keep=buffers):     # the buffers must outlive the binding
                session.run_with_iobinding(b)
            runners["in-place"] = in_place
        else:
            print(f"{path}: outputs differ with a shared cache buffer; in-place mode not timed", file=sys.stderr)
    del model
    return runners


def time_round_robin(paths: list[Path], past: int, threads: int, warmup: int, runs: int, capacity: int,
                     chunk: int = 5) -> list[dict[str, tuple[float, float]]]:
    """Per model, per mode (see _runners): (median, best) ms. Every model is loaded at once and every (model, mode)
    timed `chunk` steps at a time in turn, so load from other processes falls on every variant alike."""
    sessions = [_session(p, threads) for p in paths]
    runners = [_runners(s, p, _feeds(p, past), capacity) for s, p in zip(sessions, paths)]
    jobs = [(i, mode, fn) for i, r in enumerate(runners) for mode, fn in r.items()]
    for _, _, fn in jobs:
        for _ in range(warmup):
            fn()
    times: dict[tuple[int, str], list[float]] = {(i, m): [] for i, m, _ in jobs}
    for _ in range(0, runs, chunk):
        for i, mode, fn in jobs:
            t = times[(i, mode)]
            for _ in range(min(chunk, runs - len(t))):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
    del runners, sessions, jobs
    gc.collect()
    out: list[dict[str, tuple[float, float]]] = [{} for _ in paths]
    for (i, mode), t in times.items():
        out[i][mode] = (statistics.median(t) * 1e3, min(t) * 1e3)
    return out


def logit_error(path: Path, ref: Path, past: int, threads: int, samples: int) -> tuple[float, float]:
    """(relative L2 error of the logits, top-1 agreement) of `path` against `ref` over `samples` decode steps with
    random past and token."""
    a, b = _session(path, threads), _session(ref, threads)
    err, agree = [], 0
    for seed in range(1, samples + 1):
        fa, fb = _feeds(path, past, seed), _feeds(ref, past, seed)
        la, lb = a.run(None, fa)[0].reshape(-1), b.run(None, fb)[0].reshape(-1)
        err.append(float(np.linalg.norm(la - lb) / np.linalg.norm(lb)))
        agree += int(np.argmax(la) == np.argmax(lb))
    return float(np.mean(err)), agree / samples


def _ops(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    c = Counter(n.op_type for n in m.graph.node)
    keep = ["GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization", "MatMulNBits", "RotaryEmbedding", "Softmax", "Expand"]
    return f"{len(m.graph.node)} nodes; " + ", ".join(f"{k} {c[k]}" for k in keep if c[k])


def _data_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name)) / 2**20


def compare(paths: list[Path], args: argparse.Namespace) -> int:
    """A table of the given models' decode times (each in its fastest mode), the first as the baseline."""
    timed = time_round_robin(paths, args.past, args.threads, args.warmup, args.runs, args.capacity)
    print(f"decode 1 token after {args.past} cached, CPU EP, {args.threads} threads, median of {args.runs} "
          f"(round robin, {args.warmup} warm-up)")
    print("| model | ms/token | mode | best | " + " | ".join(MODES) + " | vs first | graph |")
    print("|---|---:|---|---:|" + "---:|" * len(MODES) + "---:|---|")
    base = None
    for path, t in zip(paths, timed):
        mode, (med, best) = min(t.items(), key=lambda kv: kv[1][0])
        base = base or med
        per_mode = " | ".join(f"{t[m][0]:.2f}" if m in t else "–" for m in MODES)
        print(f"| {path} | {med:.2f} | {mode} | {best:.2f} | {per_mode} | {med / base:.2f}x | {_ops(path)} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--int4", action="store_true", help="also time the int4 variants")
    ap.add_argument("--grid", action="store_true",
                    help="with --int4: also onnxc int4 at block 32/64/128, symmetric and not, with logit error")
    ap.add_argument("--capacity", type=int, default=2048,
                    help="positions of the one cache buffer per past in the in-place mode")
    ap.add_argument("--samples", type=int, default=16, help="decode steps for the logit-error columns")
    ap.add_argument("--reuse", action="store_true", help="time models already built in --work instead of rebuilding")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "decode")
    ap.add_argument("--compare", type=Path, nargs="+", default=None, metavar="MODEL",
                    help="time only these models, in one round robin, against the first")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare, args)
    if not args.model.exists():
        print(f"{args.model} is missing: run python bench/make_llama.py first", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, Path, float]] = [("unoptimized", args.model, 0.0)]
    builds = [("onnxscript optimize_for_ort", "os", lambda d: _onnxscript(args.model, d)),
              ("onnxc -O3 --target cpu", "onnxc", lambda d: _onnxc(args.model, d, {}))]
    if args.int4:
        builds += [("onnxscript fusions + ORT RTN int4 (block 32, sym, acc 4)", "os_int4",
                    lambda d: _onnxscript(args.model, d, int4=True)),
                   ("onnxc -O3 --quantize int4 (defaults)", "onnxc_int4",
                    lambda d: _onnxc(args.model, d, {"quantize": "int4"}))]
        if args.grid:
            for block in (32, 64, 128):
                for sym in (False, True):
                    opts = {"quantize": "int4", "block_size": block, "symmetric": sym}
                    builds.append((f"onnxc int4 block {block} {'sym' if sym else 'asym'}",
                                   f"onnxc_int4_b{block}{'s' if sym else 'a'}",
                                   lambda d, o=opts: _onnxc(args.model, d, o)))
    for label, stem, build in builds:
        dst = args.work / stem / "model.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if args.reuse and dst.exists():
            variants.append((label, dst, float("nan")))
            continue
        t = time.perf_counter()
        build(dst)
        variants.append((label, dst, time.perf_counter() - t))
    timed = time_round_robin([p for _, p, _ in variants], args.past, args.threads, args.warmup, args.runs,
                             args.capacity)
    # Each variant's figure is its median in the fastest way it can be run (mode column).
    fastest = [min(t.items(), key=lambda kv: kv[1][0]) for t in timed]
    fp32 = next(p for label, p, _ in variants if label.startswith("onnxc -O3"))
    base = fastest[0][1][0]
    ref = next((f[1][0] for (label, _, _), f in zip(variants, fastest) if label.startswith("onnxscript optimize")),
               base)
    anchor = next((f[1][0] for (label, _, _), f in zip(variants, fastest) if "ORT RTN" in label), None)
    print(f"decode 1 token after {args.past} cached, CPU EP, {args.threads} threads, median of {args.runs} "
          f"(round robin, {args.warmup} warm-up); ms/token is the median in the variant's fastest mode "
          f"(in-place: one cache buffer of {args.capacity} positions); logit error against onnxc fp32 over "
          f"{args.samples} decode steps")
    print("| variant | ms/token | mode | best | run | bound | in-place | vs unoptimized | vs onnxscript "
          "| vs int4 anchor | logits rel. err | top-1 agree | MB | build s | graph |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for (label, path, build_s), t, (mode, (med, best)) in zip(variants, timed, fastest):
        quant = "int4" in label
        err = logit_error(path, fp32, args.past, args.threads, args.samples) if quant else None
        vs_anchor = f"{med / anchor:.2f}x" if anchor and quant else "–"
        cols = f"{err[0]:.4f} | {err[1]:.2f}" if err else "– | –"
        per_mode = " | ".join(f"{t[m][0]:.2f}" if m in t else "–" for m in MODES)
        print(f"| {label} | {med:.2f} | {mode} | {best:.2f} | {per_mode} | {med / base:.2f}x | {med / ref:.2f}x "
              f"| {vs_anchor} | {cols} | {_data_mb(path):.0f} | {build_s:.1f} | {_ops(path)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
