#!/usr/bin/env python
"""Fusion coverage on the bundled fixtures: nodes at -O1, -O2 (CPU) and -O3 (CUDA, float16), the fused ops -O2
emits, and the verification result of each compile (every compile is verified on the CPU execution provider).

    python bench/fusion_table.py            # prints a markdown table
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSED = {"GroupQueryAttention": "GQA", "MultiHeadAttention": "MHA", "Attention": "Attention",
         "SkipSimplifiedLayerNormalization": "SkipSLN", "SimplifiedLayerNormalization": "SLN",
         "SkipLayerNormalization": "SkipLN", "LayerNormalization": "LN", "EmbedLayerNormalization": "EmbedLN",
         "BiasGelu": "BiasGelu", "FastGelu": "FastGelu", "Gelu": "Gelu", "Softmax": "Softmax (left)"}


def main() -> int:
    import onnxc

    entries = json.loads((ROOT / "fixtures" / "manifest.json").read_text())["models"]
    print("| fixture | nodes | -O1 | -O2 cpu | -O3 cuda | fused at -O2 | -O2 s | verified (-O2 / -O3 cuda) |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for e in entries:
            src = ROOT / "fixtures" / e["file"]
            stem = Path(e["file"]).stem
            reps = {}
            for level, target in ((1, "cpu"), (2, "cpu"), (3, "cuda")):
                t = time.perf_counter()
                reps[(level, target)] = onnxc.compile(src, level, target,
                                                      output=Path(tmp) / f"{stem}-{level}{target}.onnx").report
                reps[(level, target)]["seconds"] = time.perf_counter() - t
            o2 = reps[(2, "cpu")]
            ops = {k.split(".")[-1]: v for k, v in o2["ops_after"].items()}
            fused = ", ".join(f"{short} {ops[op]}" for op, short in FUSED.items() if ops.get(op))
            print(f"| {stem} | {o2['nodes_before']} | {reps[(1, 'cpu')]['nodes_after']} | {o2['nodes_after']} | "
                  f"{reps[(3, 'cuda')]['nodes_after']} | {fused} | {o2['seconds']:.1f} | "
                  f"{o2['verification']['status']} / {reps[(3, 'cuda')]['verification']['status']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
