"""Real-text inputs for the quantization benchmarks, as .npz files of token ids named after a model's graph inputs.

Two texts, kept apart so that no model is calibrated on what it is evaluated on:

- evaluation: CPython's `<stdlib>/LICENSE.txt` (bench/quality.py scores perplexity on it);
- calibration: the docstrings of a fixed list of standard-library modules (CALIBRATION_MODULES), joined in that
  order: English prose about code, none of it from LICENSE.txt.

    python bench/text_inputs.py sentences --tokenizer MINILM_DIR --out sentences.npz
        the first 64 sentences of 5 words or more of LICENSE.txt (split at sentence ends and blank lines), padded
        to 64 tokens, 4 batches of 16: input_ids/K, attention_mask/K (and token_type_ids/K when asked)
    python bench/text_inputs.py calibration --tokenizer MINILM_DIR --out calib.npz --batches 16 --batch 4 --seq 128
    python bench/text_inputs.py calibration --gguf SMOL.gguf --out calib.npz --no-mask
        windows of --seq tokens of the calibration text, no padding (every row counts: docs/quantization.md)

--tokenizer is a transformers tokenizer folder; --gguf a GGUF file carrying its tokenizer.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sysconfig
from pathlib import Path

import numpy as np

CALIBRATION_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
                       "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http",
                       "inspect", "itertools", "json", "logging", "multiprocessing", "pathlib", "pickle", "random",
                       "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
                       "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile")


def license_text() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")


def calibration_text() -> str:
    """Module docstrings, then each public class's and function's, module by module (deterministic order)."""
    parts = []
    for name in CALIBRATION_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    if args.gguf:
        return AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
    return AutoTokenizer.from_pretrained(str(args.tokenizer))


def sentences(args: argparse.Namespace) -> dict[str, np.ndarray]:
    chunks = re.split(r"(?<=[.!?])\s+|\n\s*\n", license_text())
    found = [" ".join(c.split()) for c in chunks if len(c.split()) >= 5][:args.count]
    enc = tokenizer(args)(found, padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    arrays = {}
    for k in range(0, len(found), args.batch):
        for name in ("input_ids", "attention_mask") + (("token_type_ids",) if args.token_types else ()):
            arrays[f"{name}/{k // args.batch}"] = enc[name][k:k + args.batch].astype(np.int64)
    return arrays


def calibration(args: argparse.Namespace) -> dict[str, np.ndarray]:
    ids = np.asarray(tokenizer(args)(calibration_text(), add_special_tokens=False)["input_ids"], np.int64)
    need = args.batches * args.batch * args.seq
    if len(ids) < need:
        raise SystemExit(f"the calibration text has {len(ids)} tokens, fewer than the {need} asked for")
    windows = ids[:need].reshape(args.batches, args.batch, args.seq)
    arrays = {f"input_ids/{k}": w for k, w in enumerate(windows)}
    if not args.no_mask:
        arrays.update({f"attention_mask/{k}": np.ones_like(w) for k, w in enumerate(windows)})
    return arrays


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("sentences", "calibration"))
    ap.add_argument("--tokenizer", type=Path, help="a transformers tokenizer folder")
    ap.add_argument("--gguf", type=Path, help="a GGUF file (its tokenizer)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=64, help="sentences: how many")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (sentences 16, calibration 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (sentences 64, calibration 128)")
    ap.add_argument("--batches", type=int, default=16, help="calibration: how many batches")
    ap.add_argument("--token-types", action="store_true", help="sentences: also token_type_ids")
    ap.add_argument("--no-mask", action="store_true", help="calibration: input_ids only (a decoder without a mask)")
    args = ap.parse_args(argv)
    if not (args.tokenizer or args.gguf):
        ap.error("give --tokenizer or --gguf")
    args.batch = args.batch or (16 if args.kind == "sentences" else 4)
    args.seq = args.seq or (64 if args.kind == "sentences" else 128)
    arrays = sentences(args) if args.kind == "sentences" else calibration(args)
    np.savez(args.out, **arrays)
    print(f"{args.out}: " + ", ".join(f"{k} {a.shape}" for k, a in list(arrays.items())[:2]) +
          f", ... ({len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
