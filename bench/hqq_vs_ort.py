"""onnxc's hqq against onnxruntime's HQQ quantizer, layer by layer on the same weights.

For each 2-D float initializer of a model (at least --min-dim on both sides): the relative error
||W - deq(Q(W))|| / ||W|| of onnxruntime's HQQWeightOnlyQuantizer.quantize_internal and of onnxc's
kernels/quantize.py hqq (and rtn, lsq for reference) at the same block size, with the largest differences of the
scales and zero points. Equal errors mean the same layout and the same solver.

    python bench/hqq_vs_ort.py /tmp/onnxc-real-exports/minilm_ts/model.onnx --layers 6

Needs torch (onnxruntime's HQQ quantizer is written with it).
"""
from __future__ import annotations

import argparse

import numpy as np


def main() -> int:
    import onnx
    import torch
    from onnx import numpy_helper
    from onnxc.kernels import quantize as kq
    from onnxc.kernels.matmul_nbits import dequantize
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--min-dim", type=int, default=256)
    args = ap.parse_args()
    block = args.block_size
    m = onnx.load(args.model)
    weights = [(t.name, numpy_helper.to_array(t).astype(np.float32)) for t in m.graph.initializer
               if len(t.dims) == 2 and min(t.dims) >= args.min_dim and t.data_type == onnx.TensorProto.FLOAT]
    ort_hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block))
    print(f"block {block}; relative error ||W - deq(Q(W))|| / ||W||")
    print("| weight | (K, N) | ORT HQQ | onnxc hqq | onnxc rtn | onnxc lsq | max scale diff | max zero diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, w in weights[:args.layers]:
        k, n = w.shape
        q, s, z = ort_hqq.quantize_internal(torch.from_numpy(w).T, bits=4, group_size=block)
        s, z = s.numpy().reshape(n, -1), z.numpy().reshape(n, -1)
        ort = ((q.numpy().reshape(n, -1, block) - z[:, :, None]) * s[:, :, None]).reshape(n, -1)[:, :k].T

        def err(d: np.ndarray) -> float:
            return float(np.linalg.norm(d - w) / np.linalg.norm(w))

        got = {}
        for method in ("hqq", "rtn", "lsq"):
            b, sc, zp = kq.quantize(w, method, block)
            got[method] = (dequantize(b, sc, zp, K=k, N=n, bits=4, block_size=block), sc, zp)
        _, hs, hz = got["hqq"]
        print(f"| {name} | ({k}, {n}) | {err(ort):.5f} | {err(got['hqq'][0]):.5f} | {err(got['rtn'][0]):.5f} | "
              f"{err(got['lsq'][0]):.5f} | {np.abs(s - hs).max():.1e} | {np.abs(z - hz).max():.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
