"""The Python API: any input form, the same bytes, deterministic output."""
from __future__ import annotations

import os
import subprocess
import sys

import onnx
import onnx_ir as ir
import pytest

import onnxc
from onnxc.errors import InvalidModelError, UsageError
from tests.modelgen import tiny_lm


def test_compile_from_path_proto_and_ir_give_same_bytes(tmp_path):
    proto = tiny_lm()
    p = tmp_path / "m.onnx"
    onnx.save(proto, str(p))
    outs = []
    for k, src in enumerate([p, proto, ir.serde.deserialize_model(proto), proto.SerializeToString()]):
        out = tmp_path / f"o{k}.onnx"
        res = onnxc.compile(src, level=1, output=out)
        assert res.report["verification"]["status"] == "passed"
        outs.append(out.read_bytes())
    assert all(o == outs[0] for o in outs)


def test_compile_is_deterministic(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(tiny_lm(seed=3), str(p))
    a = onnxc.compile(p, level=2, output=tmp_path / "a.onnx")
    b = onnxc.compile(p, level=2, output=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.report["nodes_after"] == b.report["nodes_after"]


def test_compile_in_memory_returns_model_and_leaves_input_untouched():
    model = ir.serde.deserialize_model(tiny_lm())
    before = ir.serde.serialize_model(model).SerializeToString()
    res = onnxc.compile(model, level=1)
    assert isinstance(res.model, onnx.ModelProto)
    assert len(res.model.graph.node) < len(tiny_lm().graph.node)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert res.output is None and res.report["written"] == []


def test_compile_rejects_bad_objects():
    with pytest.raises(UsageError):
        onnxc.compile(42)
    with pytest.raises(InvalidModelError):
        onnxc.compile(b"not onnx")


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int4"]])
def test_compile_bytes_do_not_depend_on_the_hash_seed(tmp_path, quantize):
    """Two processes with different PYTHONHASHSEED write the same model and data file (name included)."""
    src = tmp_path / "m.onnx"
    onnx.save(tiny_lm(vocab=64, hidden=32, seed=5), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    written = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}" / "o.onnx"
        out.parent.mkdir()
        cmd = [sys.executable, "-c", "from onnxc._entry import main; main()", "compile", str(src), "-o", str(out), "-q"]
        r = subprocess.run([*cmd, *quantize], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        written.append({p.name: p.read_bytes() for p in out.parent.iterdir()})
    assert written[0] == written[1]
    assert any(name.endswith(".data") for name in written[0])
