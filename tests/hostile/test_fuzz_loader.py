"""Loader fuzzing: mutated bytes and mutated protos of a small valid model (external weights in a file beside it, a
function, a subgraph) through `onnxc compile`, in process. The only allowed answers are a clean compile (exit 0) or
a clean refusal (exit 3), each with one line on stderr; nothing is left beside the output or in TMPDIR. The budget
is small (a few seconds); raise it with ONNXC_FUZZ_EXAMPLES for a longer campaign."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxc import cli

from .cases import OPSET, SECRET, W, left_in, make_secret

EXAMPLES = int(os.environ.get("ONNXC_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def seed_model() -> onnx.ModelProto:
    """y = If(cond, local.Project(x), x @ w2) + b: w external (w.bin), w2 and b inline, a function, a subgraph."""
    w = TensorProto(name="w", dims=[4, 4], data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=k, value=v)
    out = [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 4])]
    then = helper.make_graph([helper.make_node("Project", ["x", "w"], ["p"], domain="local", name="proj")],
                             "then", [], out)
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w2"], ["p"], name="mm2")], "else", [], out)
    body = [helper.make_node("MatMul", ["X", "Wt"], ["Y"], name="fmm")]
    fn = helper.make_function("local", "Project", ["X", "Wt"], ["Y"], body, [helper.make_opsetid("", OPSET)])
    nodes = [helper.make_node("If", ["cond"], ["p"], then_branch=then, else_branch=other, name="if"),
             helper.make_node("Add", ["p", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[w, numpy_helper.from_array(W.T.copy(), "w2"),
                                           numpy_helper.from_array(np.ones(4, np.float32), "b"),
                                           numpy_helper.from_array(np.array(True), "cond")],
                              value_info=[helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)],
                          functions=[fn])
    m.ir_version = 8
    return m


SEED = seed_model().SerializeToString()
NASTY_TEXT = ["", "..", "../secret.bin", "/etc/passwd", "w.bin\0", "a\nb", "sub/../../secret.bin", "C:\\x",
              "x" * 300, "-1", "1e3", " 4", "18446744073709551616", "0x10", "w.bin", "64", "0"]
NASTY_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([-(1 << 62), 1 << 31, 1 << 40, (1 << 63) - 1]))


def _alarm(signum, frame):
    raise TimeoutError("the command did not finish")


def compile_bytes(model: bytes) -> tuple[int, list[str]]:
    """Write the model beside w.bin (and a secret outside its folder), compile it, check the leftovers."""
    with tempfile.TemporaryDirectory(prefix="onnxc-fuzz-") as d:
        root = Path(d)
        make_secret(root)
        folder, out, tmp = root / "model", root / "out", root / "tmp"
        for f in (folder, out, tmp):
            f.mkdir()
        (folder / "w.bin").write_bytes(W.tobytes())
        (folder / "model.onnx").write_bytes(model)
        err = io.StringIO()
        old_tmp, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir, os.environ["TMPDIR"] = str(tmp), str(tmp)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(60)
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    cli.main.main(args=["compile", str(folder / "model.onnx"), "-o", str(out / "o.onnx"), "-q",
                                        "-O2"], prog_name="onnxc")
                    code = 0
                except SystemExit as exc:
                    code = exc.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            tempfile.tempdir = old_tmp
            if old_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old_env
        lines = err.getvalue().splitlines() + [f"warning: {w.message}" for w in caught]
        assert code in (0, 3), lines
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert not left_in(tmp)
        if code:
            assert not list(out.iterdir())
        for f in out.iterdir():
            assert SECRET not in f.read_bytes()
        shutil.rmtree(root, ignore_errors=True)
        return code, lines


def test_seed_model_compiles():
    assert compile_bytes(SEED)[0] == 0


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(1, len(SEED))))
def test_mutated_bytes_compile_or_exit_3(flips, cut):
    data = bytearray(SEED)
    for pos, value in flips:
        data[pos] = value
    compile_bytes(bytes(data[:cut]))


def _tensors(m: onnx.ModelProto) -> list[TensorProto]:
    return list(m.graph.initializer)


def _mutate(m: onnx.ModelProto, draw) -> None:
    kind = draw(st.sampled_from(["dim", "dtype", "ext", "raw", "name", "op", "input", "vi", "drop", "attr"]))
    tensors = _tensors(m)
    t = draw(st.sampled_from(tensors))
    if kind == "dim":
        if t.dims:
            t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(NASTY_INTS)
        else:
            t.dims.append(draw(NASTY_INTS))
    elif kind == "dtype":
        t.data_type = draw(st.one_of(st.integers(0, 30), st.just(999)))
    elif kind == "ext":
        t.data_location = TensorProto.EXTERNAL
        key = draw(st.sampled_from(["location", "offset", "length", "checksum", "bogus"]))
        entry = next((e for e in t.external_data if e.key == key), None) or t.external_data.add(key=key)
        entry.value = draw(st.sampled_from(NASTY_TEXT))
    elif kind == "raw":
        raw = t.raw_data or numpy_helper.to_array(t).tobytes() if t.data_location == TensorProto.DEFAULT else b""
        t.ClearField("float_data")
        t.raw_data = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=8))
    elif kind == "name":
        new = draw(st.sampled_from(["", "x", "y", "a\nb", "nul\0", "w2", "p"]))
        t.name = new
    elif kind == "op":
        node = draw(st.sampled_from(list(m.graph.node) + list(m.functions[0].node)))
        node.op_type = draw(st.sampled_from(["Relu", "MatMul", "Project", "If", "Nope", ""]))
    elif kind == "input":
        node = draw(st.sampled_from(list(m.graph.node)))
        node.input.append(draw(st.sampled_from(["x", "w", "ghost", "y"])))
    elif kind == "vi":
        vi = m.graph.value_info[0] if len(m.graph.value_info) else m.graph.value_info.add(name="p")
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_value = draw(NASTY_INTS)
        vi.type.tensor_type.elem_type = draw(st.sampled_from([1, 7, 10]))
    elif kind == "drop":
        del m.graph.initializer[draw(st.integers(0, len(m.graph.initializer) - 1))]
    elif kind == "attr":
        if_node = next((n for n in m.graph.node if n.attribute), None)
        if if_node is not None:
            a = if_node.attribute[0]
            a.type = draw(st.sampled_from([onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPHS,
                                           onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.INT]))


@FUZZ
@given(st.data())
def test_mutated_protos_compile_or_exit_3(data):
    m = onnx.ModelProto()
    m.ParseFromString(SEED)
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(m, data.draw)
    compile_bytes(m.SerializeToString())
