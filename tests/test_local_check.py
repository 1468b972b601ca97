"""Local verification: a model with a custom-domain op compiles, the op is kept, and each rewrite is checked where it
happens; a wrong rewrite next to the custom op is still caught, naming the pass and the site."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxc
from onnxc import local_check
from onnxc import pass_manager as pm
from onnxc.cli import main
from helpers import add_to_sub_plugin

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "models"


@pytest.fixture(autouse=True)
def _unregister_plugins():
    import onnxc.passes  # noqa: F401  (the built-in passes register on import: they stay)

    known = set(pm.registered_passes())
    yield
    for name in set(pm.registered_passes()) - known:
        pm._REGISTRY.pop(name)
        pm.PLUGIN_FILES.pop(name, None)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def custom_model(path: Path) -> Path:
    """x -> MatMul -> Identity -> + b -> example.custom.Frobnicate -> Relu -> y: exporter noise on both sides of an
    op onnxruntime has no kernel for."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Identity", ["h"], ["h1"], name="ident"),
             helper.make_node("Add", ["h1", "b"], ["hb"], name="add"),
             helper.make_node("Frobnicate", ["hb"], ["f"], name="frob", domain="example.custom", alpha=0.5),
             helper.make_node("Identity", ["f"], ["f1"], name="ident_after"),
             helper.make_node("Relu", ["f1"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    onnx.save(helper.make_model(g, opset_imports=opsets, ir_version=8), str(path))
    return path


def test_local_check_custom_op_compiles_and_is_kept(tmp_path):
    model = custom_model(tmp_path / "m.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    r = run("compile", model, "-O2", "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    nodes = onnx.load(str(out)).graph.node
    frob = [n for n in nodes if n.op_type == "Frobnicate"]
    assert len(frob) == 1 and frob[0].domain == "example.custom"
    assert [a.f for a in frob[0].attribute] == [0.5]
    assert not any(n.op_type == "Identity" for n in nodes)
    v = json.loads(report.read_text())["verification"]
    assert v["status"] == "local" and v["checks"] == "local" and v["scenarios"] == []
    assert "example.custom.Frobnicate" in v["reason"]
    # the Identity before the custom op is checked; the one after it reads a value of unknown shape: not checkable
    assert v["local"]["checked"] >= 1 and v["local"]["per_pass"]["remove-noops"] >= 1
    assert v["local"]["unchecked"] == len(v["local"]["not_checked"]) >= 1
    assert all(u["reason"] for u in v["local"]["not_checked"])
    assert f"verified locally: {v['local']['checked']} rewrites" in r.output
    assert "whole-model scenarios not run" in r.output
    from test_report import assert_conforms          # the report of a locally checked compile follows the schema
    assert_conforms(json.loads(report.read_text()))


def test_local_check_catches_a_wrong_rewrite_beside_the_custom_op(tmp_path):
    model = custom_model(tmp_path / "m.onnx")
    plugin = add_to_sub_plugin(tmp_path, "local-add-to-sub")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    r = run("compile", model, "-O2", "--plugin", plugin, "-o", out, "--report", report, "-q")
    assert r.exit_code == 1, r.output
    assert "verification failed after pass local-add-to-sub (local check at node add)" in r.output
    assert not out.exists()
    v = json.loads(report.read_text())["verification"]
    assert v["status"] == "failed" and v["checks"] == "local" and v["bisect"]["pass_name"] == "local-add-to-sub"


def test_local_check_forced_on_a_fixture_agrees_with_every_pass():
    """Every rewrite of -O2 on a real export, checked locally: no false alarm, and nearly every site is checkable."""
    r = onnxc.compile(str(FIXTURES / "gpt2_dynamo_raw.onnx"), 2, local_checks=True)
    loc = r.report["verification"]["local"]
    assert r.report["verification"]["checks"] == "local"
    assert loc["checked"] > 100 and loc["unchecked"] <= loc["checked"] // 20
    assert r.report["kv_cache"]["status"] == "not run"


def test_unrunnable_ops_names_custom_domains_only(tmp_path):
    import onnx_ir as ir

    m = ir.load(custom_model(tmp_path / "m.onnx"))
    assert local_check.unrunnable_ops(m) == ["example.custom.Frobnicate"]
    assert local_check.unrunnable_ops(ir.load(FIXTURES / "llama_ts.onnx")) == []
