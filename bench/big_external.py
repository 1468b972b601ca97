"""Load, compile and save a model with more than 2 GB of external data; report peak memory.

    python bench/big_external.py [--gb 2.5] [--out bench/out/big]

The model is a chain of MatMuls whose weights are written straight to one external data file in chunks, so
building it never holds the weights in memory either. Each step runs in a child process so its peak RSS
(ru_maxrss) is its own. Prints a table: step, seconds, peak RSS, file sizes.
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
import onnx
from onnx import TensorProto, helper

from onnxc.ir import owned_data_files


def build(out: Path, gigabytes: float, hidden: int = 8192) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "big.onnx"
    data_name = "big.onnx.data"
    per = hidden * hidden * 4
    layers = max(1, int(np.ceil(gigabytes * 2**30 / per)))
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    offset = 0
    with open(out / data_name, "wb") as f:
        for i in range(layers):
            # Write one weight in row blocks; identity-like scale keeps activations finite.
            for r in range(0, hidden, 1024):
                block = (rng.standard_normal((min(1024, hidden - r), hidden), dtype=np.float32) / np.float32(np.sqrt(hidden)))
                f.write(block.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[hidden, hidden])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(per))):
                t.external_data.add(key=k, value=v)
            offset += per
            inits.append(t)
            src = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Identity", [f"m{i}"], [f"h{i}" if i < layers - 1 else "y"], name=f"id{i}"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model_path.write_bytes(model.SerializeToString())
    return model_path


def child(step: str, src: str, dst: str) -> None:
    """Runs inside a child process: one step, then prints its own peak RSS as JSON."""
    t0 = time.perf_counter()
    if step == "load+save":
        from onnxc import ir as irio
        model = irio.load(src)
        with irio.staged_save(model, Path(dst)) as staged:
            staged.commit()
    elif step == "compile -O1":
        import onnxc
        onnxc.compile(src, level=1, output=dst, verify=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.25)
    ap.add_argument("--out", type=Path, default=Path("bench/out/big"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    t0 = time.perf_counter()
    src = build(args.out, args.gb)
    build_s = time.perf_counter() - t0
    data = src.with_name(src.name + ".data").stat().st_size
    rows = [("build (not onnxc)", build_s, None, data)]
    for step, dst in (("load+save", args.out / "resaved.onnx"), ("compile -O1", args.out / "compiled.onnx")):
        p = subprocess.run([sys.executable, __file__, "--child", step, str(src), str(dst)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            sys.exit(p.returncode)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        size = sum(dst.with_name(n).stat().st_size for n in owned_data_files(dst))
        rows.append((step, r["seconds"], r["peak_rss"], size))
        onnx.load(str(dst), load_external_data=False)  # the written file parses
    print(f"external data: {data / 2**30:.2f} GiB in {src.with_name(src.name + '.data')}")
    print(f"{'step':<20} {'seconds':>8} {'peak RSS':>10} {'data written':>13}")
    for step, s, rss, size in rows:
        rss_s = f"{rss / 2**20:.0f} MiB" if rss is not None else "-"
        print(f"{step:<20} {s:8.2f} {rss_s:>10} {size / 2**30:10.2f} GiB")
    for f in args.out.glob("*"):
        if f.name.endswith(".data") or f.suffix == ".onnx":
            os.remove(f)


if __name__ == "__main__":
    main()
