"""Int4 weight quantization: onnxc's quantize-int4 against onnxruntime's MatMulNBitsQuantizer, on the same models.

For each model and method: wall time and peak RSS of the quantizing process (each run in a fresh process: load,
quantize, save), output size, and the error of the quantized model against the fp32 one in onnxruntime (CPU EP,
default graph optimizations): LMs -- top-1 agreement and mean cosine of the logits; BERT -- mean cosine of sentence
embeddings (mean-pooled last hidden state) on random token inputs. All at block size 32 and accuracy_level 4 (ORT's
HQQ writes float zero points and no accuracy_level).

Peak RSS by phase (onnxc rows, Linux): the process's peak is reset through /proc/self/clear_refs at each phase
boundary, so each figure is that phase's own high-water mark: `imports` (interpreter + onnxc + onnxruntime),
`passes` (load and the pipeline, quantization included), `save`; with --verify a second process compiles with
verification and reports `verify` (the twins and onnxruntime sessions, which scale with the whole model).

    python bench/quantize.py                                   # bert, gpt2, llama fixtures + 30-layer llama
    python bench/quantize.py --models bert_ts,llama30 --block-size 64
    python bench/quantize.py --models llama30 --methods onnxc-rtn --level 2 --verify   # -O2 pipeline, verified
    python bench/quantize.py --models path/to/minilm.onnx --inputs sentences.npz      # any model, real inputs
    python bench/quantize.py --models .../minilm_ts/model.onnx --methods int8 --level 3 --latency   # int8 rows

A --models entry may be the path of any .onnx file: a model with no KV cache whose first output is not named like
logits is scored as an encoder, by the mean cosine of its sentence embeddings (last hidden state averaged over the
attention mask). --inputs replaces the random token inputs with real ones, e.g. a tokenizer's output for a few
hundred sentences saved with numpy.savez.

The 30-layer llama (prefill, no KV cache) is generated into bench/out/llama30_prefill when missing (needs torch).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from options import parse_options

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "quantize"
MODELS = {
    "bert_ts": ROOT / "fixtures/models/bert_ts.onnx",
    "gpt2_ts": ROOT / "fixtures/models/gpt2_ts.onnx",
    "llama_dynamo": ROOT / "fixtures/models/llama_dynamo.onnx",
    "llama30": ROOT / "bench/out/llama30_prefill/model.onnx",
}
METHODS = ("onnxc-rtn", "onnxc-lsq", "onnxc-lsq-sym", "onnxc-hqq", "onnxc-gptq", "ort-rtn-sym", "ort-rtn", "ort-hqq")
INT8 = ("onnxc-int8", "onnxc-int8-dynamic", "onnxc-int8-static", "onnxc-int8-static-percentile",
        "onnxc-int8-static-entropy", "ort-int8-dynamic", "ort-int8-static")
# int8 (--methods int8 selects them all): onnxc-int8 (weight-only, MatMulNBits bits 8), onnxc-int8-dynamic
# (DynamicQuantizeMatMul), onnxc-int8-static[-percentile|-entropy] (QDQ calibrated on CALIBRATION), and
# onnxruntime.quantization's quantize_dynamic / quantize_static (QDQ, MinMax) with their defaults on the same model
# onnxc-gptq-ao (GPTQ with act_order) is measured on request: --methods onnxc-gptq-ao; so is mixed precision
# (plain --quantize int4): onnxc-mixed (lsq at 4 bits), onnxc-mixed-rtn, onnxc-mixed-rtn-sym; and AWQ
# (int4:awq[:METHOD], calibrated): onnxc-awq, onnxc-awq-gptq, onnxc-awq-mixed (mixed precision on top)
CALIBRATION = {"batches": 16, "batch": 4, "seq": 128, "seed": 1000}   # 8,192 rows, seeds apart from the error's


class PhasePeaks:
    """Peak RSS (MiB) of each phase: VmHWM read and reset through /proc/self/clear_refs at every mark (Linux)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.ok = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def mark(self, phase: str) -> None:
        if self.ok:
            hwm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                       if x.startswith("VmHWM:")) / 1024
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), hwm)
            self._reset()


def job(method: str, src: Path, dst: Path, block: int, level: int | None = None, verify: bool = False,
        calibration: Path | None = None, extra: dict | None = None) -> dict:
    """Quantize src into dst in this process; returns seconds, peak RSS and peak RSS by phase.

    The peak is the largest phase peak (VmHWM), not ru_maxrss: Linux carries the parent's peak RSS over fork and
    exec into a child's ru_maxrss, so a child of a process that has run the fp32 model in onnxruntime would report
    that process's peak (ru_maxrss is the fallback where /proc is missing)."""
    import onnx
    import onnxc
    import onnxruntime  # noqa: F401  (imports count in the baseline, as the CLI imports it)

    phases = PhasePeaks()
    phases.mark("imports")
    t0 = time.perf_counter()
    if method.startswith("onnxc-int8"):
        mode = {"onnxc-int8": "int8"}.get(method, "int8:" + method[len("onnxc-int8-"):].replace("-", ":"))
        options = {"quantize": mode, **({"calibration": str(calibration)} if ":static" in mode else {}),
                   **(extra or {})}
        onnxc.compile(src, level or 0, "cpu", output=dst, verify=verify,
                      passes=None if level is not None else "quantize-int8,eliminate-dead,sort-topologically",
                      progress=lambda record: phases.mark("passes"), options=options)
        phases.mark("save+verify" if verify else "save")
    elif method.startswith("ort-int8"):
        from onnxruntime import quantization as oq

        if method == "ort-int8-dynamic":
            oq.quantize_dynamic(str(src), str(dst), weight_type=oq.QuantType.QInt8)
        else:
            class Reader(oq.CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter(real_feeds(calibration))

                def get_next(self) -> dict | None:
                    return next(self.batches, None)

            oq.quantize_static(str(src), str(dst), Reader(), quant_format=oq.QuantFormat.QDQ)
        phases.mark("passes")
        phases.mark("save")
    elif method.startswith("onnxc"):
        algo = method.split("-")[1]
        options = {"quantize": f"int4:{algo}", "block_size": block, "symmetric": method.endswith("-sym"),
                   "act_order": method.endswith("-ao")}
        if algo == "mixed":   # onnxc-mixed: plain int4 (mixed precision); onnxc-mixed-rtn[-sym]: with rtn at 4 bits
            algo = method.split("-")[2] if method.count("-") > 1 and method.split("-")[2] != "sym" else "lsq"
            options.update(quantize=f"int4:{algo}", mixed=True)
        if algo == "awq":   # onnxc-awq[-METHOD]: AWQ's scales folded in, then METHOD (lsq)
            rest = [x for x in method.split("-")[2:] if x not in ("sym", "ao", "mixed")]
            options["quantize"] = "int4:awq" + (f":{rest[0]}" if rest else "")
            options["mixed"] = method.endswith("-mixed")
        if algo in ("gptq", "awq"):
            options["calibration"] = str(calibration)
        options.update(extra or {})
        onnxc.compile(src, level or 0, "cpu", output=dst, verify=verify,
                      passes=None if level is not None else
                      "fold-awq-scales,quantize-int4,eliminate-dead,sort-topologically",
                      progress=lambda record: phases.mark("passes"), options=options)
        phases.mark("save+verify" if verify else "save")
    else:
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        model = onnx.load(str(src))
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4) if method == "ort-hqq" else None
        q = mq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=method == "ort-rtn-sym", accuracy_level=4,
                                    algo_config=cfg)
        q.process()
        phases.mark("passes")
        big = sum(t.ByteSize() for t in q.model.model.graph.initializer) > (1 << 30)
        q.model.save_model_to_file(str(dst), use_external_data_format=big)
        phases.mark("save")
    peak = max(phases.peaks.values()) if phases.ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak, "phases": {k: round(v) for k, v in
                                                                                  phases.peaks.items()}}


def calibration_file(src: Path, folder: Path) -> Path:
    """CALIBRATION's random-token batches for src as --calibration's NAME/K arrays (held out from the error's)."""
    import onnxc.ir
    from onnxc import verify

    m = onnxc.ir.load(src)
    c = CALIBRATION
    arrays = {f"{n}/{k}": a for k in range(c["batches"]) for n, a in verify.make_inputs(
        m, verify.Scenario("calibration", c["batch"], c["seq"], 0), c["seed"] + k).items()}
    path = folder / "calibration.npz"
    np.savez(path, **arrays)
    return path


def feeds_for(path: Path, encoder: bool, seed: int) -> dict:
    import onnxc.ir
    from onnxc import verify

    m = onnxc.ir.load(path)
    sc = verify.Scenario("bench", 8 if encoder else 2, 16, 0)
    return verify.make_inputs(m, sc, seed)


def model_source(name: str) -> tuple[str, Path]:
    """A --models entry: a bundled name, or the path of any .onnx file (named after its parent folder and stem)."""
    if name in MODELS:
        return name, MODELS[name]
    path = Path(name)
    if path.suffix != ".onnx" or not path.exists():
        raise SystemExit(f"--models: '{name}' is neither one of {', '.join(MODELS)} nor an existing .onnx file")
    return f"{path.parent.name}_{path.stem}", path


def is_encoder(name: str, path: Path) -> bool:
    """Sentence-embedding error for encoders: bundled BERT, or a model with no KV cache whose first output is not
    named like logits."""
    if name in MODELS:
        return name.startswith("bert")
    import onnx
    import onnx_ir as ir

    from onnxc import verify

    m = onnx.load(str(path), load_external_data=False)
    ir_inputs = [ir.Value(name=i.name) for i in m.graph.input]
    return not any(verify.input_role(v) == "past" for v in ir_inputs) and "logit" not in m.graph.output[0].name


def real_feeds(path: Path) -> list[dict]:
    """--inputs: arrays named after graph inputs; NAME/0, NAME/1, ... for several batches (as --calibration)."""
    with np.load(path, allow_pickle=False) as data:
        batches: dict[int, dict] = {}
        for key in data.files:
            name, _, k = key.partition("/")
            batches.setdefault(int(k or 0), {})[name] = data[key]
    return [batches[k] for k in sorted(batches)]


def outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    accepted = {i.name for i in s.get_inputs()}
    name = s.get_outputs()[0].name
    return [s.run([name], {k: v for k, v in f.items() if k in accepted})[0] for f in feeds]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).mean())


def pooled(hidden: np.ndarray, feeds: dict) -> np.ndarray:
    """Sentence embeddings: the last hidden state averaged over the positions the attention mask keeps."""
    mask = next((a for k, a in feeds.items() if "mask" in k.lower() and a.ndim == 2 and a.shape == hidden.shape[:2]),
                None)
    if mask is None:
        return hidden.mean(1)
    w = mask.astype(np.float64)[..., None]
    return (hidden * w).sum(1) / np.maximum(w.sum(1), 1)


def error(ref: list[np.ndarray], got: list[np.ndarray], encoder: bool, feeds: list[dict]) -> dict:
    if encoder:
        return {"cosine": float(np.mean([cosine(pooled(r, f), pooled(g, f)) for r, g, f in zip(ref, got, feeds)]))}
    return {"top1": float(np.mean([(r.argmax(-1) == g.argmax(-1)).mean() for r, g in zip(ref, got)])),
            "cosine": float(np.mean([cosine(r, g) for r, g in zip(ref, got)]))}


def latency(models: list[tuple[str, Path]], batch: int, seq: int, runs: int) -> dict[str, tuple[float, float]]:
    """{label: (median, min) ms} of one run of each model on the same random tokens, timed round robin so that
    the shared machine's load falls on every model alike."""
    import onnxc.ir
    import onnxruntime as ort
    from onnxc import verify

    feeds = verify.make_inputs(onnxc.ir.load(models[0][1]), verify.Scenario("latency", batch, seq, 0), 0)
    sessions = {}
    for label, path in models:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.log_severity_level = 3
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        f = {i.name: feeds[i.name] for i in s.get_inputs()}
        for _ in range(3):
            s.run(None, f)
        sessions[label] = (s, f)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(runs):
        for label, (s, f) in sessions.items():
            t0 = time.perf_counter()
            s.run(None, f)
            times[label].append((time.perf_counter() - t0) * 1e3)
    return {label: (float(np.median(t)), float(np.min(t))) for label, t in times.items()}


def run_job(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--level", type=int, default=None,
                    help="run the -O LEVEL pipeline before quantizing (default: the quantize pass alone)")
    ap.add_argument("--inputs", type=Path, default=None,
                    help=".npz of real inputs for the error columns (NAME or NAME/K arrays, e.g. tokenized sentences)")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="--calibration .npz for the calibrated methods (default: CALIBRATION's random tokens)")
    ap.add_argument("--latency", action="store_true",
                    help="also time each output against the fp32 model as given and its -O3 compile, round robin "
                         "(--latency-shape, 2 threads, medians of --latency-runs)")
    ap.add_argument("--latency-shape", default="1x128", help="batch x sequence for --latency")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--verify", action="store_true",
                    help="also compile each onnxc row with verification in a second process (its peak RSS)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an onnxc option for every onnxc method (VALUE read as JSON when it parses), e.g. "
                         "sensitivity=weight or mixed_budget=1.5; the rows' method names say so")
    ap.add_argument("--job", nargs=3, metavar=("METHOD", "SRC", "DST"), help=argparse.SUPPRESS)
    ap.add_argument("--job-verify", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job-calibration", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    extra = parse_options(args.option)
    if args.job:
        print(json.dumps(job(args.job[0], Path(args.job[1]), Path(args.job[2]), args.block_size, args.level,
                             args.job_verify, args.job_calibration, extra)))
        return
    if args.methods == "int8":
        args.methods = ",".join(INT8)
    rows = []
    timed: dict[str, list[tuple[str, Path]]] = {}
    for entry in args.models.split(","):
        name, src = model_source(entry)
        if not src.exists() and name == "llama30":
            subprocess.run([sys.executable, str(ROOT / "bench/make_llama.py"), "--no-past", "--out", str(src)],
                           check=True)
        encoder = is_encoder(name, src)
        feeds = real_feeds(args.inputs) if args.inputs else [feeds_for(src, encoder, seed) for seed in range(3)]
        if args.latency:
            o3 = OUT / name / "fp32-O3" / "model.onnx"
            o3.parent.mkdir(parents=True, exist_ok=True)
            import onnxc

            onnxc.compile(src, 3, "cpu", output=o3, verify=False)
            timed[name] = [("fp32 (as exported)", src), ("fp32 -O3", o3)]
        ref = outputs(src, feeds)
        for method in args.methods.split(","):
            folder = OUT / name / method
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / "model.onnx"
            cmd = [sys.executable, __file__, "--block-size", str(args.block_size), "--job", method, str(src), str(dst)]
            cmd += ["--level", str(args.level)] if args.level is not None else []
            cmd += [f"--option={x}" for x in args.option]
            if any(x in method for x in ("gptq", "static", "awq")):
                cmd += ["--job-calibration", str(args.calibration or calibration_file(src, OUT / name))]
            p = run_job(cmd)
            if p.returncode != 0:
                rows.append({"model": name, "method": method, "failed": p.stderr.strip().splitlines()[-1][:120]})
                print(rows[-1], file=sys.stderr)
                continue
            label = method + (f" ({', '.join(args.option)})" if args.option and method.startswith("onnxc") else "")
            row = {"model": name, "method": label, **json.loads(p.stdout.strip().splitlines()[-1]),
                   "mib": size(dst) / 2**20, "fp32_mib": size(src) / 2**20,
                   **error(ref, outputs(dst, feeds), encoder, feeds)}
            if args.verify and method.startswith("onnxc"):
                v = run_job(cmd + ["--job-verify"])
                row["phases"].update(json.loads(v.stdout.strip().splitlines()[-1])["phases"] if v.returncode == 0
                                     else {"save+verify": "failed"})
            rows.append(row)
            timed.setdefault(name, []).append((method, dst))
            print(json.dumps(row), file=sys.stderr)
    if args.latency:
        b, sq = (int(x) for x in args.latency_shape.split("x"))
        for name, models in timed.items():
            ms = latency(models, b, sq, args.latency_runs)
            print(f"\n{name}: latency, batch {b} x sequence {sq}, 2 threads, median of {args.latency_runs} runs "
                  "taken round robin (min in brackets)")
            print("| model | median ms | x fp32 -O3 |\n|---|---:|---:|")
            base = ms["fp32 -O3"][0]
            for label, (med, low) in ms.items():
                print(f"| {label} | {med:.2f} ({low:.2f}) | {med / base:.3f} |")
    pipeline = f"-O{args.level}" if args.level is not None else "quantize only"
    where = f"the inputs in {args.inputs}" if args.inputs else "random inputs"
    print(f"\nblock {args.block_size}; pipeline {pipeline}; "
          f"error vs fp32 on {where} (encoders: cosine of sentence embeddings); peak RSS MiB of the whole process "
          "and by phase (imports / load + passes / save / save + verify)")
    print("| model | method | seconds | peak RSS | imports | passes | save | verify | size MiB | top-1 | cosine |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['model']} | {r['method']} | failed: {r['failed']} | | | | | | | | |")
            continue
        top1 = f"{r['top1']:.4f}" if "top1" in r else ""
        ph = [str(r["phases"].get(k, "")) for k in ("imports", "passes", "save", "save+verify")]
        print(f"| {r['model']} | {r['method']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {' | '.join(ph)} | "
              f"{r['mib']:.1f} / {r['fp32_mib']:.1f} | {top1} | {r['cosine']:.5f} |")


if __name__ == "__main__":
    main()
