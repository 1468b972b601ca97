"""A post-export step for Optimum-style export folders: compile the folder's ONNX models, keep everything else.

An exporter such as Optimum's `optimum-cli export onnx` writes a folder: `model.onnx` (with `model.onnx_data` or
`model.onnx.data` when the weights are large), and the files a runtime needs beside it (config.json,
generation_config.json, tokenizer files). `compile_export_folder(src, dst)` writes `dst` as the same folder with each
ONNX model compiled and verified by onnxc, weights kept as external data where the export had them, and every other
file copied unchanged, so `dst` loads wherever `src` did.

    from onnxc.integrations.exporters import compile_export_folder
    reports = compile_export_folder("llama_onnx", "llama_onnxc", level=2, target="cpu")
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .. import ir as irio
from ..errors import UsageError

DEFAULT_MODELS = ("model.onnx",)


def _external_files(model_file: Path) -> set[Path]:
    """The external data files a model file references (its weights are not read)."""
    return {Path(f).resolve() for f in irio.external_data_files(irio.load(model_file))}


def compile_export_folder(src: str | os.PathLike, dst: str | os.PathLike, level: int = 2, target: str = "cpu", *,
                          models: tuple[str, ...] | None = None, **compile_options: Any) -> dict[str, dict]:
    """Compile the ONNX models of export folder `src` into folder `dst` (created; must not be `src`) and copy the
    other files. `models`: the model files to compile, relative to `src` (default: model.onnx if present, else
    every *.onnx at the top of the folder, e.g. Optimum's decoder_model.onnx and decoder_with_past_model.onnx).
    Other keyword arguments go to `onnxc.compile`. Returns {model file name: its compile report}."""
    from .. import compile as onnxc_compile

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UsageError(f"{src}: not an export folder")
    if dst.resolve() == src.resolve():
        raise UsageError("the output folder must differ from the export folder (outputs never replace inputs)")
    if models is None:
        models = DEFAULT_MODELS if (src / "model.onnx").is_file() else tuple(sorted(p.name for p in src.glob("*.onnx")))
    if not models:
        raise UsageError(f"{src}: no .onnx model in the folder")
    weights = set()
    for name in models:
        if not (src / name).is_file():
            raise UsageError(f"{src / name}: no such model in the export folder")
        weights |= _external_files(src / name)
    dst.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in models:
        reports[name] = onnxc_compile(src / name, level, target, output=dst / name, **compile_options).report
    skip = {(src / n).resolve() for n in models} | weights
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.resolve() not in skip:
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
    return reports
