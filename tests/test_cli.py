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


def test_explain_does_not_call_a_refused_graph_output_rewrite_matched(tmp_path):
    """--explain says 'matched' where the pass rewrites, and why not where the match's graph output cannot be
    handed to its replacement (here a graph input)."""
    from onnx import TensorProto, helper

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("Identity", ["r"], ["a"], name="id_a"),
                               helper.make_node("Identity", ["x"], ["b"], name="id_b")], "g", [vi("x")],
                              [vi("a"), vi("b")])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    r = run("compile", path, "-O1", "--explain", "remove-identity")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "id_a │ matched │" in text
    assert "id_b │ matched, not rewritten: graph output 'b' would be replaced by a graph" in text
    out = tmp_path / "ids.onnxc.onnx"
    assert run("compile", path, "-O1", "-o", out, "-q").exit_code == 0
    assert [n.name for n in onnx.load(str(out)).graph.node] == ["relu", "id_b"]


def test_console_script_runs(model_path, tmp_path):
    """The installed entry point, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "onnxc.cli", "compile", str(model_path), "-o", str(tmp_path / "s.onnx"),
                        "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "s.onnx").exists()


# ------------------------------------------------------------------------------------------------ quantization
@pytest.fixture()
def linear_path(tmp_path):
    """A model with two linear layers (K = 64) and a bias Add."""
    import numpy as np
    from onnx import numpy_helper

    proto = onnx.parser.parse_model(textwrap.dedent("""\
        <ir_version: 8, opset_import: ["" : 17]> g (float[N, 64] x) => (float[N, 16] y) {
          h = MatMul(x, W1)
          r = Relu(h)
          m = MatMul(r, W2)
          y = Add(m, b)
        }"""))
    rng = np.random.default_rng(0)
    for name, shape in (("W1", (64, 64)), ("W2", (64, 16)), ("b", (16,))):
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    p = tmp_path / "lin.onnx"
    onnx.save(proto, str(p))
    return p


def test_quantize_flags_reach_the_report(linear_path, tmp_path):
    out, rep_path = tmp_path / "q.onnx", tmp_path / "q.json"
    r = run("compile", linear_path, "-O1", "--quantize", "int4:rtn", "--block-size", "16", "--symmetric",
            "--exclude", "W1", "--accuracy-level", "1", "-o", out, "--report", rep_path)
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    q = rep["quantization"]
    assert (q["method"], q["block_size"], q["symmetric"], q["accuracy_level"]) == ("int4:rtn", 16, True, 1)
    assert q["matmul_nbits"] == 1 and rep["ops_after"]["MatMul"] == 1   # W1 excluded
    assert rep["verification"]["status"] == "passed"
    assert {"max_abs", "max_rel", "cosine"} <= set(q["error"]["summary"])
    assert "quantization error vs input" in r.output and "dequantized-weights twin" in r.output
    nodes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 1 and len(nodes[0].input) == 6   # bias folded into the 6th input


def test_quantize_default_is_lsq_asymmetric_accuracy_4(linear_path, tmp_path):
    rep_path = tmp_path / "q.json"
    r = run("compile", linear_path, "--quantize", "int4", "-o", tmp_path / "q.onnx", "--report", rep_path, "-q")
    assert r.exit_code == 0, r.output
    q = json.loads(rep_path.read_text())["quantization"]
    assert (q["method"], q["block_size"], q["symmetric"], q["accuracy_level"]) == ("int4:lsq", 32, False, 4)
    assert q["matmul_nbits"] == 2


def test_quantize_int4_is_mixed_and_uniform_is_all_int4(linear_path, tmp_path):
    """Plain int4 keeps the layer that produces the output at 8 bits (it has the larger output error per extra byte;
    the other would pass the 1.25x budget) and says so; int4:uniform keeps both at 4 bits and prints no such line."""
    rep_path = tmp_path / "q.json"
    r = run("compile", linear_path, "--quantize", "int4", "-o", tmp_path / "q.onnx", "--report", rep_path)
    assert r.exit_code == 0, r.output
    q = json.loads(rep_path.read_text())["quantization"]
    assert q["precision"] == "mixed"
    assert [(x["name"], x["bits"], x["reason"]) for x in q["layers"]] == [("W1", 4, "int4"),
                                                                           ("W2", 8, "output error rank 1")]
    assert all(x["int4_output_error"] > 0 for x in q["layers"])
    assert "mixed precision: 1 of 2 weights at 8 bits (W2)" in r.output
    bits = {n.input[1]: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()) == [4, 8]
    r = run("compile", linear_path, "--quantize", "int4:uniform", "-o", tmp_path / "u.onnx", "--report", rep_path)
    assert r.exit_code == 0, r.output
    q = json.loads(rep_path.read_text())["quantization"]
    assert q["precision"] == "uniform" and "layers" not in q and "mixed precision" not in r.output


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int3"], "unknown value 'int3'"),
    (["--quantize", "int4:awq:uniform"], "unknown value 'int4:awq:uniform'"),
    (["--quantize", "int4:awq"], "int4:awq:lsq needs --calibration"),
    (["--quantize", "int4", "--block-size", "48"], "not a power of 2"),
    (["--quantize", "int4", "--block-size", "8"], "not a power of 2"),
    (["--quantize", "int4:hqq", "--symmetric"], "cannot be --symmetric"),
    (["--quantize", "int4", "--calibration", "c.npz"], "no selected method uses calibration"),
    (["--block-size", "32"], "--block-size needs --quantize"),
    (["--exclude", "x*"], "--exclude needs --quantize"),
])
def test_quantize_usage_errors_exit_2_one_line(linear_path, tmp_path, args, message):
    out = tmp_path / "q.onnx"
    r = run("compile", linear_path, "-o", out, *args)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("onnxc: error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.output
    assert not out.exists()


def test_io_fp16_and_approximate_gelu_are_plumbed_into_options(linear_path, tmp_path, monkeypatch):
    from onnxc import driver

    seen = {}
    real = driver.compile

    def spy(*args, **kwargs):
        seen.update(kwargs["options"])
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "compile", spy)
    r = run("compile", linear_path, "-O1", "--target", "cuda", "--io-fp16", "--approximate-gelu", "-o", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 0, r.output
    assert seen["io_fp16"] is True and seen["approximate_gelu"] is True and "quantize" not in seen
