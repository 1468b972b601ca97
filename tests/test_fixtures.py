"""Every bundled fixture compiles at -O1, verifies numerically, and loses its exporter noise."""
from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir
import pytest

import onnxc

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
ENTRIES = [e for e in (MANIFEST["models"] if isinstance(MANIFEST, dict) else MANIFEST) if not e.get("skipped")]


def _id(e: dict) -> str:
    return Path(e["file"]).stem


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache: dict[str, tuple[dict, ir.Model]] = {}

    def get(entry: dict) -> tuple[dict, ir.Model]:
        if entry["file"] not in cache:
            out = tmp_path_factory.mktemp("fx") / (Path(entry["file"]).stem + ".onnx")
            res = onnxc.compile(ROOT / entry["file"], level=1, output=out)
            cache[entry["file"]] = (res.report, ir.load(out))
        return cache[entry["file"]]
    return get


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_fixture_compiles_at_O1_and_verifies(entry, compiled):
    report, model = compiled(entry)
    v = report["verification"]
    assert v["status"] == "passed", v
    expected_scenarios = 2 if entry["past"] else 1
    assert len(v["scenarios"]) == expected_scenarios
    if entry["past"]:
        decode = v["scenarios"][1]
        past_inputs = [s for k, s in decode["inputs"].items() if "past" in k]
        assert past_inputs and all(s[2] > 0 for s in past_inputs)  # a non-empty past
    assert report["nodes_after"] <= report["nodes_before"]
    assert [o.name for o in model.graph.outputs] == [o["name"] for o in entry["outputs"]]


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_fixture_exporter_noise_is_gone(entry, compiled):
    report, model = compiled(entry)
    ops = report["ops_after"]
    for noise in ("Constant", "Identity", "CastLike", "Dropout"):
        assert noise not in ops, f"{noise} left: {ops.get(noise)}"
    for node in model.graph:
        if node.op_type == "Cast":
            src = node.inputs[0].dtype
            assert src is None or int(src) != node.attributes["to"].as_int(), f"same-type Cast {node.name}"
        if node.op_type == "Shape":
            shape = node.inputs[0].shape
            assert shape is None or not shape.is_static(), f"Shape of a static tensor {node.name} left"
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            assert perm is None or list(perm.as_ints()) != list(range(len(perm.as_ints())))
        if node.op_type in ("Reshape", "Expand", "Unsqueeze", "Concat", "Gather", "Slice", "Squeeze"):
            # shape arithmetic on constants only would have been folded
            assert any(i is not None and i.const_value is None for i in node.inputs), node.name


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["exporter"] == "ts"], ids=_id)
def test_torchscript_fixture_shrinks_by_half(entry, compiled):
    report, _ = compiled(entry)
    assert report["nodes_after"] <= 0.5 * report["nodes_before"], (report["nodes_before"], report["nodes_after"])
