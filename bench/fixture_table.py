"""Node counts before/after `onnxc compile -O<level>` for every bundled fixture, as a Markdown table.

    python bench/fixture_table.py [--level 1]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnxc

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
NOISE = ("Constant", "Identity", "Shape", "Gather", "Unsqueeze", "Concat", "Cast")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--level", type=int, default=1)
    args = ap.parse_args()
    manifest = json.loads((ROOT / "manifest.json").read_text())
    print(f"| fixture | nodes before | after -O{args.level} | " + " | ".join(f"{n} before→after" for n in NOISE)
          + " | verified |")
    print("|---|---:|---:|" + "---:|" * len(NOISE) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for e in manifest["models"]:
            r = onnxc.compile(ROOT / e["file"], level=args.level, output=Path(tmp) / "o.onnx").report
            cells = " | ".join(f"{r['ops_before'].get(n, 0)}→{r['ops_after'].get(n, 0)}" for n in NOISE)
            worst = max((o["max_rel"] for s in r["verification"]["scenarios"] for o in s["outputs"]), default=0)
            print(f"| {Path(e['file']).stem} | {r['nodes_before']} | {r['nodes_after']} | {cells} | "
                  f"{r['verification']['status']} ({worst:.0e}) |")


if __name__ == "__main__":
    main()
