"""The compile report follows its versioned schema (docs/report.schema.json, documented in docs/report.md).

Real reports from compiles of bundled fixtures are validated with a small checker of the JSON Schema keywords the
schema uses, and also with `jsonschema` where it is installed.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnxc
import pytest
from onnxc import report as report_frame

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / report_frame.SCHEMA_FILE).read_text())
FIXTURES = ROOT / "fixtures" / "models"

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Where `value` breaks `schema` (keywords: type, const, enum, anyOf, minimum, maximum, properties, required,
    additionalProperties, items); [] when it conforms."""
    out: list[str] = []
    if "type" in schema and not _is(value, schema["type"]):
        return [f"{path}: expected {schema['type']}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "anyOf" in schema and all(problems(value, s, path) for s in schema["anyOf"]):
        out.append(f"{path}: matches none of {len(schema['anyOf'])} alternatives")
    if "minimum" in schema and value < schema["minimum"]:
        out.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        out.append(f"{path}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{path}: missing '{k}'" for k in schema.get("required", ()) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                out += problems(v, props[k], f"{path}.{k}")
            elif extra is False:
                out.append(f"{path}: unexpected '{k}'")
            elif isinstance(extra, dict):
                out += problems(v, extra, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += problems(v, schema["items"], f"{path}[{i}]")
    return out


def assert_conforms(report: dict[str, Any]) -> None:
    assert problems(report, SCHEMA) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator(SCHEMA).validate(report)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Three real reports: -O2 through the API (a decoder with a KV cache), -O2 through the command line's --report
    and --json (GPT-2), and -O1 without verification, in memory."""
    tmp = tmp_path_factory.mktemp("reports")
    out = {"api": onnxc.compile(FIXTURES / "llama_dynamo_past.onnx", 2, output=tmp / "llama.onnx").report}
    r = subprocess.run([sys.executable, "-m", "onnxc.cli", "compile", str(FIXTURES / "gpt2_dynamo.onnx"), "-q",
                        "-o", str(tmp / "gpt2.onnx"), "--report", str(tmp / "gpt2.json"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out["cli"] = json.loads((tmp / "gpt2.json").read_text())
    out["stdout"] = json.loads(r.stdout)
    out["unverified"] = onnxc.compile(FIXTURES / "gpt2_dynamo.onnx", 1, verify=False).report
    return out


def test_report_fixture_reports_conform(reports):
    for name, rep in reports.items():
        assert rep["schema"] == "onnxc.report/1", name
        assert_conforms(rep)


def test_report_carries_what_it_promises(reports):
    api, cli = reports["api"], reports["cli"]
    for rep in (api, cli):
        assert rep["versions"]["onnxruntime"] and rep["versions"]["onnx"] and rep["versions"]["onnx-ir"]
        assert rep["sizes"]["input"]["model"] > 0 and rep["sizes"]["output"]["model"] > 0
        assert rep["verification"]["status"] == "passed"
        assert rep["verification"]["inputs"] == {**rep["verification"]["inputs"], "source": "generated", "seed": 0}
        assert all(o["max_rel"] <= o["rtol"] or o["max_abs"] <= o["atol"]
                   for s in rep["verification"]["scenarios"] for o in s["outputs"])
        assert rep["coverage"]["attention"]["fused"] == rep["coverage"]["attention"]["found"] == 2
        assert any(p["counts"] for p in rep["passes"]) and all(p["seconds"] >= 0 for p in rep["passes"])
    assert api["kv_cache"]["status"] == "verified"
    # --json prints the report --report writes (timings aside, the same run)
    assert {k: v for k, v in reports["stdout"].items()} == cli
    assert reports["unverified"]["verification"]["status"] == "not run"
    assert reports["unverified"]["sizes"]["input"]["model"] > 0


def test_report_checker_rejects_broken_reports(reports):
    good = reports["api"]
    for mutate, where in [(lambda r: r.pop("schema"), "missing 'schema'"),
                          (lambda r: r.update(schema="onnxc.report/0"), "$.schema"),
                          (lambda r: r["passes"][0].update(seconds="fast"), "$.passes[0].seconds"),
                          (lambda r: r["verification"].update(status="fine"), "$.verification.status"),
                          (lambda r: r["rule_counts"].update(x=True), "$.rule_counts.x"),
                          (lambda r: r["sizes"].update(input={"model": 1}), "$.sizes.input")]:
        broken = copy.deepcopy(good)
        mutate(broken)
        found = problems(broken, SCHEMA)
        assert any(where in p for p in found), (where, found)


def test_report_every_field_is_in_the_schema_and_documented(reports):
    documented = (ROOT / "docs" / "report.md").read_text()
    keys = set().union(*(rep.keys() for rep in reports.values()))
    assert keys <= set(SCHEMA["properties"]), keys - set(SCHEMA["properties"])
    for key in SCHEMA["properties"]:
        assert f"`{key}`" in documented, key
    for key in SCHEMA["properties"]["verification"]["properties"]["inputs"]["properties"]:
        assert f"`{key}`" in documented, key
