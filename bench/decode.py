#!/usr/bin/env python
"""Decode latency: one token after N cached tokens, CPU execution provider, in one run for every variant.

Variants: the unoptimized export, onnxscript's `optimize` + `optimize_for_ort` fusions, onnxc -O3 --target cpu,
and (with --int4) onnxc -O3 --quantize int4 and onnxscript's fusions + ORT's MatMulNBitsQuantizer (RTN, block 32,
symmetric, accuracy_level 4). Every model runs with onnxruntime's default graph optimizations, as a user would run
it, with the same inputs; the table reports the median of --runs timed steps after --warmup untimed ones.

    python bench/make_llama.py                          # bench/out/llama30/model.onnx (30 layers, KV cache)
    python bench/decode.py                              # prints the table
    python bench/decode.py --model other.onnx --past 512 --threads 4

Needs the bench extra (onnxscript); the onnxc variants are compiled here (with verification) unless present.
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


def _feeds(path: Path, past: int) -> dict[str, np.ndarray]:
    m = onnx.load(str(path), load_external_data=False)
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
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
            feeds[vi.name] = np.array([[7]], dtype=dt)
    return feeds


def time_decode(path: Path, past: int, threads: int, warmup: int, runs: int) -> tuple[float, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = _feeds(path, past)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    del sess
    gc.collect()
    return statistics.median(times) * 1e3, min(times) * 1e3


def _ops(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    c = Counter(n.op_type for n in m.graph.node)
    keep = ["GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization", "MatMulNBits", "RotaryEmbedding", "Softmax", "Expand"]
    return f"{len(m.graph.node)} nodes; " + ", ".join(f"{k} {c[k]}" for k in keep if c[k])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--int4", action="store_true", help="also time the int4 variants")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "decode")
    args = ap.parse_args()
    if not args.model.exists():
        print(f"{args.model} is missing: run python bench/make_llama.py first", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, Path, float]] = [("unoptimized", args.model, 0.0)]
    builds = [("onnxscript optimize_for_ort", "os", lambda d: _onnxscript(args.model, d)),
              ("onnxc -O3 --target cpu", "onnxc", lambda d: _onnxc(args.model, d, {}))]
    if args.int4:
        builds += [("onnxscript fusions + ORT RTN int4 (block 32, acc 4)", "os_int4",
                    lambda d: _onnxscript(args.model, d, int4=True)),
                   ("onnxc -O3 --quantize int4", "onnxc_int4", lambda d: _onnxc(args.model, d, {"quantize": "int4"}))]
    for label, stem, build in builds:
        dst = args.work / stem / "model.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        build(dst)
        variants.append((label, dst, time.perf_counter() - t))
    rows = []
    for label, path, build_s in variants:
        med, best = time_decode(path, args.past, args.threads, args.warmup, args.runs)
        rows.append((label, med, best, build_s, _ops(path)))
    base = rows[0][1]
    ref = next((r[1] for r in rows if r[0].startswith("onnxscript optimize")), base)
    print(f"decode 1 token after {args.past} cached, CPU EP, {args.threads} threads, median of {args.runs}")
    print("| variant | ms/token (median) | best | vs unoptimized | vs onnxscript | build s | graph |")
    print("|---|---|---|---|---|---|---|")
    for label, med, best, build_s, ops in rows:
        print(f"| {label} | {med:.2f} | {best:.2f} | {med / base:.2f}x | {med / ref:.2f}x | {build_s:.1f} | {ops} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
