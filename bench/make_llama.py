#!/usr/bin/env python
"""Build a Llama-shaped benchmark model (SmolLM-135M geometry) with random weights and
export it to ONNX with the dynamo exporter (opset 18; --exporter ts for TorchScript, opset 17),
using the same export code as the test fixtures (fixtures/generate.py).

Shape: 30 layers, hidden 576, 9 query heads / 3 KV heads (head_dim 64), intermediate 1536,
vocab 49152, tied embeddings.  The weights are written as external data: one .onnx file
plus one .onnx.data file beside it.

    python bench/make_llama.py                       # KV-cache (decode) variant
    python bench/make_llama.py --no-past             # prefill variant, no cache I/O
    python bench/make_llama.py --out /tmp/l/model.onnx

Needs torch and transformers (pip install -e '.[fixtures]').
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

import generate as gen

LLAMA30 = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "num_hidden_layers": 30,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "llama30" / "model.onnx")
    ap.add_argument("--no-past", action="store_true", help="export without KV-cache inputs/outputs")
    ap.add_argument("--exporter", choices=["dynamo", "ts"], default="dynamo",
                    help="dynamo (torch.export, opset 18; default) or ts (TorchScript, opset 17)")
    ap.add_argument("--layers", type=int, default=LLAMA30["num_hidden_layers"], help="number of decoder layers")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs torch comparison")
    ap.add_argument("--seed", type=int, default=gen.SEED)
    ap.add_argument("--no-optimize", action="store_true",
                    help="dynamo only: skip the exporter's own graph optimization (the raw export, ~6,000 nodes)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.time()
    cfg = gen.make_config("llama", **{**LLAMA30, "num_hidden_layers": args.layers})
    cfg_sum = gen.config_summary("llama", cfg)
    model = gen.build_model("llama", cfg, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built llama: {args.layers} layers, {n_params / 1e6:.1f}M parameters ({time.time() - t_start:.1f}s)")

    variant = gen.Variant("llama", args.exporter, past=not args.no_past, optimize=not args.no_optimize)
    t0 = time.time()
    proto, wrapper, spec = gen.export_variant(variant, model, cfg_sum)
    gen.check_symbolic(proto, spec)
    t_export = time.time() - t0
    print(f"exported with {args.exporter}, opset {variant.opset} ({t_export:.1f}s)")

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    data_name = out.name + ".data"
    for stale in (out, out.parent / data_name):
        if stale.exists():
            stale.unlink()  # onnx appends to an existing external-data file
    onnx.save_model(
        proto,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )

    hist = collections.Counter(gen.op_histogram(proto))
    node_count = sum(hist.values())
    graph_size = out.stat().st_size
    data_size = (out.parent / data_name).stat().st_size
    print(f"wrote {out} ({_mb(graph_size)}) + {data_name} ({_mb(data_size)})")
    print(f"nodes: {node_count}   initializers: {len(proto.graph.initializer)}")
    print("top ops: " + ", ".join(f"{op} {n}" for op, n in hist.most_common(15)))
    for vi in list(proto.graph.input)[:4] + list(proto.graph.output)[:2]:
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        print(f"  {vi.name}: {dims}")

    if not args.no_verify:
        t0 = time.time()
        cases = gen.verify(
            str(out), wrapper, "decoder", cfg_sum, spec, variant.past, torch.float32, rtol=1e-4, atol=1e-4
        )
        worst = max(c["max_abs_diff"] for c in cases)
        print(f"onnxruntime matches torch on {len(cases)} shapes (max abs diff {worst:.2e}, {time.time() - t0:.1f}s)")
    print(f"total {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
