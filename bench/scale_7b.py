"""Compile a 7B-shaped model (Llama-2-7B's weights: 32 layers, hidden 4096, intermediate 11008, vocab 32000, fp16 on
disk, 13.5 GB) at -O3 --quantize int4; print wall time, peak RSS and sizes.

    python bench/scale_7b.py [--out bench/out/scale7b] [--layers 32] [--method rtn] [--keep]

Needs about 13.5 GB for the model, as much again for the compile (quantized tensors in the scratch folder, the
staged output); check `df -h` first. The graph is a prefill decoder in float16: RMSNorm, Q/K/V/O projections,
attention without rotary or mask (32 heads of 128), SwiGLU MLP, final norm and lm_head; the weights are random
(slices of one seeded 256 MiB pool at a different offset per tensor, written straight to the data file, so building
never holds a weight in memory). Each step runs in a fresh child process and reports its own VmHWM (peak RSS).
Verification is off (--no-verify): running the fp16 model in onnxruntime would need about 2.5 times its weights in
memory, which the driver's budget refuses on any machine this size anyway (the per-rewrite checks still run).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HIDDEN, INTER, VOCAB, HEADS = 4096, 11008, 32000, 32
POOL_ELEMENTS = 128 << 20                       # 256 MiB of float16


def build(out: Path, layers: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    data_name = "model.onnx.data"
    pool = (np.random.default_rng(0).standard_normal(POOL_ELEMENTS, dtype=np.float32) * 0.02).astype(np.float16)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0

    with open(out / data_name, "wb") as f:
        def weight(name: str, rows: int, cols: int) -> str:
            nonlocal offset
            n = rows * cols
            start = (len(inits) * 7_919_993) % POOL_ELEMENTS
            left = n
            while left:
                take = min(left, POOL_ELEMENTS - start)
                f.write(pool[start:start + take].tobytes())
                left -= take
                start = 0
            t = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=[rows, cols] if rows > 1 else [cols],
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(2 * n))):
                t.external_data.add(key=k, value=v)
            offset += 2 * n
            inits.append(t)
            return name

        def const(name: str, value) -> str:
            inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
            return name

        def node(op: str, ins: list[str], out_name: str, **attrs) -> str:
            nodes.append(helper.make_node(op, ins, [out_name], name=out_name, **attrs))
            return out_name

        def rms(x: str, gamma: str, p: str) -> str:
            sq = node("Mul", [x, x], f"{p}/sq")
            mean = node("ReduceMean", [sq], f"{p}/mean", axes=[-1], keepdims=1)
            root = node("Sqrt", [node("Add", [mean, "eps"], f"{p}/add")], f"{p}/sqrt")
            return node("Mul", [node("Div", [x, root], f"{p}/div"), gamma], f"{p}/out")

        const("eps", np.float16(1e-5))
        const("scale", np.float16(1 / np.sqrt(HIDDEN // HEADS)))
        const("heads_shape", np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64))
        const("hidden_shape", np.array([0, 0, HIDDEN], np.int64))
        h = node("Gather", [weight("embed_tokens", VOCAB, HIDDEN), "input_ids"], "embed")
        for i in range(layers):
            p = f"layers.{i}"
            n1 = rms(h, weight(f"{p}.input_norm", 1, HIDDEN), f"{p}/norm1")
            qkv = []
            for proj in ("q", "k", "v"):
                y = node("MatMul", [n1, weight(f"{p}.{proj}_proj", HIDDEN, HIDDEN)], f"{p}/{proj}")
                y = node("Reshape", [y, "heads_shape"], f"{p}/{proj}_heads")
                qkv.append(node("Transpose", [y], f"{p}/{proj}_t", perm=[0, 2, 1, 3]))
            kt = node("Transpose", [qkv[1]], f"{p}/kt", perm=[0, 1, 3, 2])
            scores = node("Mul", [node("MatMul", [qkv[0], kt], f"{p}/qk"), "scale"], f"{p}/scores")
            probs = node("Softmax", [scores], f"{p}/probs", axis=-1)
            ctx = node("Transpose", [node("MatMul", [probs, qkv[2]], f"{p}/pv")], f"{p}/ctx_t", perm=[0, 2, 1, 3])
            ctx = node("Reshape", [ctx, "hidden_shape"], f"{p}/ctx")
            o = node("MatMul", [ctx, weight(f"{p}.o_proj", HIDDEN, HIDDEN)], f"{p}/o")
            h = node("Add", [h, o], f"{p}/res1")
            n2 = rms(h, weight(f"{p}.post_norm", 1, HIDDEN), f"{p}/norm2")
            gate = node("MatMul", [n2, weight(f"{p}.gate_proj", HIDDEN, INTER)], f"{p}/gate")
            up = node("MatMul", [n2, weight(f"{p}.up_proj", HIDDEN, INTER)], f"{p}/up")
            act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sig")], f"{p}/silu")
            down = node("MatMul", [node("Mul", [act, up], f"{p}/gated"), weight(f"{p}.down_proj", INTER, HIDDEN)],
                        f"{p}/down")
            h = node("Add", [h, down], f"{p}/res2")
        n = rms(h, weight("final_norm", 1, HIDDEN), "final")
        nodes.append(helper.make_node("MatMul", [n, weight("lm_head", HIDDEN, VOCAB)], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "llama7b_shaped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model_path.write_bytes(model.SerializeToString())
    return model_path


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(step: str, src: str, dst: str, layers: int, method: str) -> None:
    t0 = time.perf_counter()
    if step == "build":
        build(Path(dst), layers)
        print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}))
        return
    import onnxc

    t0 = time.perf_counter()
    res = onnxc.compile(src, 3, "cpu", output=dst, verify=False, options={"quantize": f"int4:{method}"})
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(), "sizes": res.report["sizes"],
                      "matmul_nbits": res.report["quantization"]["matmul_nbits"],
                      "gather_block_quantized": res.report["quantization"]["gather_block_quantized"],
                      "passes": {p["name"]: p["seconds"] for p in res.report["passes"]},
                      "save": res.report["seconds"]["save"]}))


def run(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        sys.exit(p.returncode)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/scale7b"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--method", default="lsq", help="int4 method (rtn, lsq, hqq)")
    ap.add_argument("--keep", action="store_true", help="keep the model and the output")
    ap.add_argument("--child", nargs=3, metavar=("STEP", "SRC", "DST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child, a.layers, a.method)
        return
    rows = []
    r = run(["build", "-", str(a.out), "--layers", str(a.layers)])
    src = a.out / "model.onnx"
    rows.append(("build (not onnxc)", r["seconds"], r["peak_rss"]))
    data = (a.out / "model.onnx.data").stat().st_size
    c = run(["compile", str(src), str(a.out / "int4.onnx"), "--layers", str(a.layers), "--method", a.method])
    rows.append((f"compile -O3 --quantize int4:{a.method}", c["seconds"], c["peak_rss"]))
    out = c["sizes"]["output"]
    print(f"{a.layers} layers, hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB}: {data / 1e9:.2f} GB of fp16 "
          f"weights; {c['matmul_nbits']} MatMulNBits, {c['gather_block_quantized']} GatherBlockQuantized")
    print(f"{'step':<34} {'seconds':>9} {'peak RSS':>10}")
    for step, s, rss in rows:
        print(f"{step:<34} {s:9.1f} {rss / 2**20:7.0f} MiB")
    print(f"output: model {out['model'] / 2**20:.1f} MiB + data {out['data'] / 1e9:.2f} GB; save {c['save']:.1f} s")
    slow = sorted(c["passes"].items(), key=lambda kv: -kv[1])[:4]
    print("slowest passes: " + ", ".join(f"{k} {v:.1f} s" for k, v in slow))
    if not a.keep:
        shutil.rmtree(a.out, ignore_errors=True)


if __name__ == "__main__":
    main()
