"""Compile time, peak memory and node count: onnxc -O1 against onnxslim and onnxscript's optimizer, in one run.

    python bench/compile_speed.py [MODEL ...]      # default: the models bench/make_llama.py writes

Each tool runs in its own child process (so its peak RSS is its own) on the same input, writing to bench/out/.
onnxc runs twice: with its numeric verification (its default) and with --no-verify, the like-for-like comparison
with tools that do not verify. Needs `pip install -e '.[bench]'`; the models need `'.[fixtures]'` to build:

    python bench/make_llama.py                      # dynamo export with KV cache (exporter-optimized)
    python bench/make_llama.py --no-optimize --out bench/out/llama30_raw/model.onnx
    python bench/make_llama.py --exporter ts --out bench/out/llama30_ts/model.onnx
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ["bench/out/llama30/model.onnx", "bench/out/llama30_raw/model.onnx",
                  "bench/out/llama30_ts/model.onnx"]
TOOLS = ["onnxc -O1", "onnxc -O1 --no-verify", "onnxslim", "onnxscript optimize"]


def run_tool(tool: str, src: str, dst: str) -> dict:
    """Child process body: run one tool, report seconds, peak RSS and node count as JSON."""
    import onnx

    t0 = time.perf_counter()
    if tool.startswith("onnxc"):
        import onnxc
        res = onnxc.compile(src, level=1, output=dst, verify="--no-verify" not in tool)
        nodes = res.report["nodes_after"]
    elif tool == "onnxslim":
        import onnxslim
        model = onnxslim.slim(src)
        onnx.save(model, dst, save_as_external_data=True, location=Path(dst).name + ".data")
        nodes = len(model.graph.node)
    elif tool == "onnxscript optimize":
        import onnxscript.optimizer
        model = onnx.load(src)
        model = onnxscript.optimizer.optimize(model)
        onnx.save(model, dst, save_as_external_data=True, location=Path(dst).name + ".data")
        nodes = len(model.graph.node)
    else:
        raise SystemExit(f"unknown tool {tool}")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "nodes": nodes}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(run_tool(*sys.argv[2:])))
        return
    models = [m for m in (sys.argv[1:] or DEFAULT_MODELS) if Path(m).exists()]
    if not models:
        raise SystemExit("no model found; build one with bench/make_llama.py (see this file's docstring)")
    print(f"machine: {platform.processor() or platform.machine()}, {_cores()} cores; python {platform.python_version()}")
    print(f"{'model':<34} {'tool':<22} {'nodes in':>8} {'nodes out':>9} {'seconds':>8} {'peak RSS':>9}")
    for model in models:
        import onnx
        n_in = len(onnx.load(model, load_external_data=False).graph.node)
        out_dir = Path("bench/out/compile_speed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for tool in TOOLS:
            dst = out_dir / (tool.replace(" ", "_").replace("-", "") + ".onnx")
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--child", tool, model, str(dst)], capture_output=True,
                               text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                err = (p.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{model:<34} {tool:<22} {n_in:>8} {'failed':>9}  {err[:80]}")
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{model:<34} {tool:<22} {n_in:>8} {r['nodes']:>9} {r['seconds']:8.1f} "
                  f"{r['peak_rss'] / 2**20:7.0f} MB   (process wall {wall:.1f} s)")
        shutil.rmtree(out_dir, ignore_errors=True)


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
