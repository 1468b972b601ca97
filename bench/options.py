"""`--option KEY=VALUE` for the quantization benchmarks (bench/quality.py, bench/quantize.py): onnxc options passed
to every onnxc method, VALUE read as JSON when it parses (numbers, booleans, lists), else kept as text."""
from __future__ import annotations

import json


def parse_options(items: list[str]) -> dict[str, object]:
    extra: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return extra
