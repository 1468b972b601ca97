"""The compile report's versioned frame: schema name, library versions, and what verification ran on.

`onnxc compile --report FILE.json` (and `--json`, on stdout) writes the dict `onnxc.compile(...).report`. Its fields
are documented one by one in docs/report.md and described as JSON Schema in docs/report.schema.json. Within one
schema version fields may be added; removing a field or changing its meaning or type makes a new version.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

SCHEMA = "onnxc.report/1"
SCHEMA_FILE = "docs/report.schema.json"

# Distributions whose versions decide what a compile does (their import names differ for onnx-ir).
LIBRARIES = ("onnx", "onnx-ir", "onnxruntime", "numpy", "ml_dtypes")


def library_versions() -> dict[str, str | None]:
    """{"python": ..., "onnxc": ..., and each of LIBRARIES: its installed version, None when absent}."""
    from . import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "onnxc": __version__}
    for dist in LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def verification_inputs(verify_inputs: str | os.PathLike | None, seed: int, tolerance_dtype: str | None
                        ) -> dict[str, Any]:
    """Where the verification's inputs came from and which tolerances judged it."""
    from . import verify

    return {"source": "file" if verify_inputs is not None else "generated",
            "file": os.fspath(verify_inputs) if verify_inputs is not None else None,
            "seed": seed,
            "tolerance_dtype": tolerance_dtype,
            "tolerances": {dtype: {"rtol": rtol, "atol_fraction": atol}
                           for dtype, (rtol, atol) in verify.TOLERANCES.items()}}


def framed(report: dict[str, Any], *, verify_inputs: str | os.PathLike | None, seed: int,
           tolerance_dtype: str | None) -> dict[str, Any]:
    """`report` with the schema name and library versions first, and the verification's inputs and tolerances
    added to its `verification` entry."""
    verification = dict(report.get("verification", {}))
    verification.setdefault("inputs", verification_inputs(verify_inputs, seed, tolerance_dtype))
    return {"schema": SCHEMA, "versions": library_versions(), **report, "verification": verification}
