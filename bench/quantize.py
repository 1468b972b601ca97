"""Int4 weight quantization: onnxc's quantize-int4 against onnxruntime's MatMulNBitsQuantizer, on the same models.

For each model and method: wall time and peak RSS of the quantizing process (each run in a fresh process: load,
quantize, save), output size, and the error of the quantized model against the fp32 one in onnxruntime (CPU EP,
default graph optimizations): LMs -- top-1 agreement and mean cosine of the logits; BERT -- mean cosine of sentence
embeddings (mean-pooled last hidden state) on random token inputs. All at block size 32 and accuracy_level 4 (ORT's
HQQ writes float zero points and no accuracy_level).

    python bench/quantize.py                                   # bert, gpt2, llama fixtures + 30-layer llama
    python bench/quantize.py --models bert_ts,llama30 --block-size 64

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

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "quantize"
MODELS = {
    "bert_ts": ROOT / "fixtures/models/bert_ts.onnx",
    "gpt2_ts": ROOT / "fixtures/models/gpt2_ts.onnx",
    "llama_dynamo": ROOT / "fixtures/models/llama_dynamo.onnx",
    "llama30": ROOT / "bench/out/llama30_prefill/model.onnx",
}
METHODS = ("onnxc-rtn", "onnxc-lsq", "onnxc-lsq-sym", "onnxc-hqq", "ort-rtn-sym", "ort-rtn", "ort-hqq")


def job(method: str, src: Path, dst: Path, block: int) -> dict:
    """Quantize src into dst in this process; returns seconds and peak RSS."""
    t0 = time.perf_counter()
    if method.startswith("onnxc"):
        import onnxc

        algo = method.split("-")[1]
        onnxc.compile(src, 0, "cpu", output=dst, passes="quantize-int4,eliminate-dead,sort-topologically",
                      verify=False, options={"quantize": f"int4:{algo}", "block_size": block,
                                             "symmetric": method.endswith("-sym")})
    else:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        model = onnx.load(str(src))
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4) if method == "ort-hqq" else None
        q = mq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=method == "ort-rtn-sym", accuracy_level=4,
                                    algo_config=cfg)
        q.process()
        big = sum(t.ByteSize() for t in q.model.model.graph.initializer) > (1 << 30)
        q.model.save_model_to_file(str(dst), use_external_data_format=big)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def feeds_for(path: Path, encoder: bool, seed: int) -> dict:
    import onnxc.ir
    from onnxc import verify

    m = onnxc.ir.load(path)
    sc = verify.Scenario("bench", 8 if encoder else 2, 16, 0)
    return verify.make_inputs(m, sc, seed)


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


def error(ref: list[np.ndarray], got: list[np.ndarray], encoder: bool) -> dict:
    if encoder:
        return {"cosine": float(np.mean([cosine(r.mean(1), g.mean(1)) for r, g in zip(ref, got)]))}
    return {"top1": float(np.mean([(r.argmax(-1) == g.argmax(-1)).mean() for r, g in zip(ref, got)])),
            "cosine": float(np.mean([cosine(r, g) for r, g in zip(ref, got)]))}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--job", nargs=3, metavar=("METHOD", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(args.job[0], Path(args.job[1]), Path(args.job[2]), args.block_size)))
        return
    rows = []
    for name in args.models.split(","):
        src = MODELS[name]
        if not src.exists() and name == "llama30":
            subprocess.run([sys.executable, str(ROOT / "bench/make_llama.py"), "--no-past", "--out", str(src)],
                           check=True)
        encoder = name.startswith("bert")
        feeds = [feeds_for(src, encoder, seed) for seed in range(3)]
        ref = outputs(src, feeds)
        for method in args.methods.split(","):
            folder = OUT / name / method
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / "model.onnx"
            p = subprocess.run([sys.executable, __file__, "--block-size", str(args.block_size), "--job", method,
                                str(src), str(dst)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if p.returncode != 0:
                rows.append({"model": name, "method": method, "failed": p.stderr.strip().splitlines()[-1][:120]})
                print(rows[-1], file=sys.stderr)
                continue
            row = {"model": name, "method": method, **json.loads(p.stdout.strip().splitlines()[-1]),
                   "mib": size(dst) / 2**20, "fp32_mib": size(src) / 2**20,
                   **error(ref, outputs(dst, feeds), encoder)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\nblock {args.block_size}; error vs fp32 on random inputs ({'cosine = sentence embeddings' if 1 else ''})")
    print("| model | method | seconds | peak RSS MiB | size MiB | top-1 | cosine |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['model']} | {r['method']} | failed: {r['failed']} | | | | |")
            continue
        top1 = f"{r['top1']:.4f}" if "top1" in r else ""
        print(f"| {r['model']} | {r['method']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['mib']:.1f} / {r['fp32_mib']:.1f} | {top1} | {r['cosine']:.5f} |")


if __name__ == "__main__":
    main()
