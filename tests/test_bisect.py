"""Bisection of a failed verification: the pass, the rule and the site; --save-repro and its replay command."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxc
from onnxc import pass_manager as pm
from onnxc.cli import main
from helpers import add_to_sub_plugin


@pytest.fixture(autouse=True)
def _unregister_plugins():
    """Plugin passes registered here leave the registry afterwards (one with a stage would join every pipeline)."""
    import onnxc.passes  # noqa: F401  (the built-in passes register on import: they stay)

    known = set(pm.registered_passes())
    yield
    for name in set(pm._REGISTRY) - known:
        pm._REGISTRY.pop(name)
        pm.PLUGIN_FILES.pop(name, None)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _model(path, zero_first: bool = True):
    """x + zeros -> MatMul -> + bias -> Relu -> + x: two Adds of a constant (one of them zero) and one of x."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "z"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "z"], ["x0"], name="add_zero"),
             helper.make_node("MatMul", ["x0", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "x"], ["y"], name="add_residual")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _plugin(tmp_path, name: str, body: str):
    p = tmp_path / f"{name}.py"
    p.write_text(textwrap.dedent(body))
    return p


def _faulty_rule(tmp_path, name):
    # drop-add-of-constant assumes the constant is zero without checking: right at add_zero, wrong at add_bias
    return _plugin(tmp_path, name, f"""\
        import onnxc
        from onnxc import Rule
        from onnxc.pass_manager import RulePass

        def pattern(op, x, c):
            return op.Add(x, c)

        def check(m):
            if m.const("c") is None:
                return m.fail("not a constant", "c")

        def rewrite(op, x, c):
            return op.Identity(x)

        onnxc.register_pass(RulePass("{name}", [Rule("{name}-rule", pattern, rewrite, check)], level=1))
        """)


def test_bisect_names_the_plugin_pass_that_breaks_the_model(tmp_path):
    model = _model(tmp_path / "m.onnx")
    plugin = add_to_sub_plugin(tmp_path, "bisect-add-to-sub")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    r = run("compile", model, "-O2", "--plugin", plugin, "-o", out, "--report", report, "-q")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("onnxc: error")]
    assert len(errors) == 1
    assert "verification failed after pass bisect-add-to-sub:" in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".o.onnx*"))
    found = json.loads(report.read_text())["verification"]["bisect"]
    assert found["status"] == "found" and found["pass_name"] == "bisect-add-to-sub" and found["rule"] is None
    assert "fuse-skip-norm" in found["previous"] and "differs" in found["reason"]


def test_bisect_names_the_rule_and_the_site(tmp_path):
    model = _model(tmp_path / "m.onnx")
    plugin = _faulty_rule(tmp_path, "bisect-drop-add")
    r = run("compile", model, "-O1", "--plugin", plugin, "--passes",
            "infer-shapes,fold-constants,bisect-drop-add,eliminate-dead", "-o", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 1, r.output
    # add_zero is rewritten first (correctly); add_bias is the site that breaks the model
    assert ("verification failed after pass bisect-drop-add (rule bisect-drop-add-rule at node add_bias)"
            in r.output), r.output


def test_bisect_through_the_python_api_and_save_repro_replays(tmp_path):
    model = _model(tmp_path / "m.onnx")
    plugin = _faulty_rule(tmp_path, "bisect-drop-add-api")
    pm.load_plugin(plugin)
    repro = tmp_path / "repro"
    with pytest.raises(onnxc.VerificationError) as info:
        onnxc.compile(str(model), 1, passes="infer-shapes,bisect-drop-add-api,eliminate-dead",
                      output=tmp_path / "o.onnx", save_repro=repro)
    found = info.value.report["verification"]["bisect"]
    assert (found["pass_name"], found["rule"], found["site"]) == ("bisect-drop-add-api", "bisect-drop-add-api-rule",
                                                                  "add_bias")
    assert found["previous"] == ["infer-shapes"] and found["probes"] >= 1
    assert (repro / "pipeline.txt").read_text().strip() == "bisect-drop-add-api"
    saved = onnx.load(str(repro / "model.onnx"))
    assert [n.name for n in saved.graph.node] == ["add_zero", "mm", "add_bias", "relu", "add_residual"]
    # the documented replay: one command, the same failure, bisected to the same rule and site
    p = subprocess.run(["sh", str(repro / "replay.sh"), "-q"], capture_output=True, text=True, timeout=120,
                       env={"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    assert p.returncode == 1, p.stderr
    assert "after pass bisect-drop-add-api (rule bisect-drop-add-api-rule at node add_bias)" in p.stderr
