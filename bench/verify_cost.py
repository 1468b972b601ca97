"""What verification costs a compile: time (load, passes, save, verify, total) and peak RSS, with and without it.

    python bench/verify_cost.py [MODEL] [-O3] [--repeat N] [--pythonpath DIR] [--before DIR]

MODEL defaults to /tmp/verify-l30/model.onnx (`python bench/make_llama.py --out /tmp/verify-l30/model.onnx`: the
30-layer Llama-shaped decoder with a KV cache, 513 MiB of weights). Each compile runs in its own child process
(`python -m onnxc.cli compile ... --report`), so the peak RSS is that compile's. The compiles alternate (one without
verification, one with, --repeat times), so a change in the machine's load falls on both; each column is the median
over the runs, and verify/total is the median of each verified run's own ratio. --pythonpath puts another onnxc
first on the child's path, to measure an older version the same way; --before DIR measures the onnxc in DIR (a
folder holding an `onnxc` package) in the same alternating series, so both versions see the same load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(model: Path, level: str, verify: bool, pythonpath: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="onnxc-bench-") as tmp:
        out, report = Path(tmp) / "out.onnx", Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "onnxc.cli", "compile", str(model), level, "-o", str(out), "--report",
               str(report), "-q"] + ([] if verify else ["--no-verify"])
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"compile failed: {proc.stderr.read().decode()[-500:]}")
        rep = json.loads(report.read_text())
    return {"wall": wall, "rss": usage.ru_maxrss * 1024, "seconds": rep["seconds"], "weights": rep["weight_bytes"],
            "verification": rep["verification"]["status"]}


def table(title: str, runs: dict[bool, list[dict]]) -> None:
    print(title)
    print(f"{'verify':<8} {'load':>6} {'passes':>7} {'save':>6} {'verify':>7} {'total':>7} {'wall':>6} "
          f"{'peak RSS':>10} {'x weights':>9} {'verify/total':>12}")
    for verify in (False, True):
        rs = runs[verify]

        def med(key: str) -> float:
            return statistics.median(r["seconds"][key] for r in rs)

        rss = statistics.median(r["rss"] for r in rs)
        ratio = statistics.median(r["seconds"]["verify"] / r["seconds"]["total"] for r in rs)
        print(f"{'yes' if verify else 'no':<8} {med('load'):6.2f} {med('passes'):7.2f} {med('save'):6.2f} "
              f"{med('verify'):7.2f} {med('total'):7.2f} {statistics.median(r['wall'] for r in rs):6.1f} "
              f"{rss / 2**20:8.0f} MiB {rss / rs[0]['weights']:9.2f} {ratio:12.2f}")
    ratios = sorted(round(r["seconds"]["verify"] / r["seconds"]["total"], 2) for r in runs[True])
    print(f"verify/total of each verified run: {ratios}; peak RSS of each (MiB): "
          f"{sorted(round(r['rss'] / 2**20) for r in runs[True])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="/tmp/verify-l30/model.onnx")
    ap.add_argument("-O", dest="level", default="3")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pythonpath", default=None)
    ap.add_argument("--before", default=None, metavar="DIR")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.exists():
        raise SystemExit(f"{model}: no such file (python bench/make_llama.py --out {model})")
    print(f"{model} at -O{args.level}; {platform.machine()}, {os.cpu_count()} CPUs; median of {args.repeat}")
    versions = ([("before", args.before)] if args.before else []) + [("now" if args.before else "", args.pythonpath)]
    runs = {name: {False: [], True: []} for name, _ in versions}
    for _ in range(args.repeat):
        for name, path in versions:
            for verify in (False, True):
                runs[name][verify].append(one(model, f"-O{args.level}", verify, path))
    for name, _ in versions:
        table(name, runs[name])

if __name__ == "__main__":
    main()
