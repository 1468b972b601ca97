"""The command line: exit codes, one-line errors, nothing written on failure."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import onnx
import pytest
from click.testing import CliRunner

from onnxc.cli import main
from tests.modelgen import tiny_lm


@pytest.fixture()
def model_path(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(tiny_lm(), str(p))
    return p


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compile_writes_default_output_and_report(model_path, tmp_path):
    r = run("compile", model_path, "-O1", "--report", tmp_path / "r.json", "-q")
    assert r.exit_code == 0, r.output
    out = tmp_path / "m.onnxc.onnx"
    assert out.exists()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verification"]["status"] == "passed"
    assert rep["nodes_after"] < rep["nodes_before"]
    assert "Constant" not in rep["ops_after"] and "Identity" not in rep["ops_after"]
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("content", [b"", b"garbage bytes", None])
def test_bad_input_exit_3_one_line(tmp_path, content):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    r = run("compile", p, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3
    errors = [line for line in r.output.splitlines() if line.startswith("onnxc: error")]
    assert len(errors) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "o.onnx").exists()


def test_cycle_and_dangling_input_exit_3(tmp_path):
    cyc = onnx.parser.parse_model(textwrap.dedent("""\
        <ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) {
          a = Add(x, b)
          b = Relu(a)
          y = Identity(b)
        }"""))
    p = tmp_path / "cycle.onnx"
    onnx.save(cyc, str(p))
    r = run("compile", p)
    assert r.exit_code == 3 and "cycle" in r.output
    proto = tiny_lm()
    proto.graph.node[1].input[0] = "missing_value"
    d = tmp_path / "dangling.onnx"
    d.write_bytes(proto.SerializeToString())
    r = run("compile", d)
    assert r.exit_code == 3 and "missing_value" in r.output


def test_usage_errors_exit_2(model_path):
    assert run("compile", model_path, "-o", model_path).exit_code == 2
    r = run("compile", model_path, "--passes", "fold-constant")
    assert r.exit_code == 2 and "did you mean 'fold-constants'" in r.output
    r = run("compile", model_path, "--disable", "remove-identiy")
    assert r.exit_code == 2 and "remove-identity" in r.output
    assert run("compile", model_path, "-O7").exit_code == 2
    assert run("compile", model_path, "--explain", "no-such-rule").exit_code == 2


def test_verification_failure_exit_1_writes_nothing(model_path, tmp_path):
    plugin = tmp_path / "bad_pass.py"
    plugin.write_text(textwrap.dedent("""\
        import onnxc
        from onnxc.pass_manager import Pass, PassResult

        @onnxc.register_pass
        class BreakRelu(Pass):
            '''Turns Relu into Sigmoid: a numerically wrong rewrite.'''
            name = "break-relu"
            def run(self, model, ctx):
                for node in model.graph:
                    if node.op_type == "Relu":
                        node.op_type = "Sigmoid"
                return PassResult(model, True, {"broken": 1})
        """))
    out = tmp_path / "o.onnx"
    r = run("compile", model_path, "--plugin", plugin, "--passes", "break-relu", "-o", out)
    assert r.exit_code == 1, r.output
    assert "verification failed" in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.onnx")]


def test_passes_inspect_verify_commands(model_path, tmp_path):
    r = run("passes", "--rules")
    assert r.exit_code == 0
    for name in ("fold-constants", "remove-noops", "eliminate-dead", "eliminate-cse", "remove-identity"):
        assert name in r.output
    r = run("inspect", model_path, "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)
    assert info["inputs"][0]["name"] == "input_ids" and info["ops"]["Constant"] == 3
    out = tmp_path / "c.onnx"
    assert run("compile", model_path, "-o", out, "-q").exit_code == 0
    r = run("verify", model_path, out)
    assert r.exit_code == 0 and "passed" in r.output


def test_explain_reports_reasons(model_path):
    r = run("compile", model_path, "--explain", "remove-reshape-noop")
    assert r.exit_code == 0
    assert "matched" in r.output or "differs" in r.output


def test_console_script_runs(model_path, tmp_path):
    """The installed entry point, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "onnxc.cli", "compile", str(model_path), "-o", str(tmp_path / "s.onnx"),
                        "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "s.onnx").exists()
