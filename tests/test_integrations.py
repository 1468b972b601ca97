"""onnxc in other toolchains: onnx-graphsurgeon graphs in and out, the Olive pass, export folders.

The onnx-graphsurgeon and Olive tests run where those packages are installed (extras `graphsurgeon`, `olive`) and
are skipped otherwise; the export-folder step needs nothing else.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import onnxc
import pytest
from onnxc.errors import UsageError
from onnxc.integrations import exporters

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"


# ------------------------------------------------------------------------------------------------ graphsurgeon
def test_integrations_graphsurgeon_graph_in_and_out(tmp_path):
    gs = pytest.importorskip("onnx_graphsurgeon")
    proto = onnx.load(str(FIXTURES / "gpt2_dynamo.onnx"))
    graph = gs.import_onnx(proto)
    from_graph = onnxc.compile(graph, 2, output=tmp_path / "from_graph.onnx")
    from_proto = onnxc.compile(proto, 2)
    assert from_graph.report["verification"]["status"] == "passed"
    assert from_graph.report["ops_after"] == from_proto.report["ops_after"]
    assert from_graph.report["coverage"]["attention"]["fused"] == 2
    back = onnxc.to_graphsurgeon(from_graph)
    assert isinstance(back, gs.Graph)
    ops = {}
    for node in back.nodes:
        key = node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}.{node.op}"
        ops[key] = ops.get(key, 0) + 1
    assert ops == from_graph.report["ops_after"]
    assert isinstance(onnxc.to_graphsurgeon(from_proto), gs.Graph)    # in memory too


def test_integrations_graphsurgeon_is_recognized_by_type_only():
    from onnxc.integrations import graphsurgeon

    assert not graphsurgeon.is_graph(onnx.ModelProto())
    assert not graphsurgeon.is_graph("model.onnx")


# ------------------------------------------------------------------------------------------------ Olive
def test_integrations_olive_is_loaded_lazily():
    code = ("import sys, onnxc, onnxc.integrations.olive as o; assert 'olive' not in sys.modules; "
            "assert o.MODULE_PATH == 'onnxc.integrations.olive.OnnxcCompile'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_integrations_olive_pass_runs_in_a_workflow(tmp_path, monkeypatch):
    pytest.importorskip("olive.workflows")
    from olive.workflows import run
    from onnxc.integrations import olive as onnxc_olive

    monkeypatch.chdir(tmp_path)       # Olive keeps its cache in the working folder
    cls = onnxc_olive.OnnxcCompile
    assert {"level", "target", "verify", "options"} <= set(cls._default_config(None))
    run({"input_model": {"type": "ONNXModel", "model_path": str(FIXTURES / "gpt2_dynamo.onnx")},
         "passes": {"onnxc": {"type": "OnnxcCompile", "level": 2, "target": "cpu"}},
         "output_dir": str(tmp_path / "out"), "log_severity_level": 3},
        package_config=onnxc_olive.package_config())
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = [n.op_type for n in out.graph.node]
    assert out.producer_name == "onnxc"
    assert "Attention" in ops and "SkipLayerNormalization" in ops


# ------------------------------------------------------------------------------------------------ export folders
def _export_folder(folder: Path) -> Path:
    """An Optimum-style folder: model.onnx with its weights in model.onnx_data, and a config file."""
    folder.mkdir()
    proto = onnx.load(str(FIXTURES / "llama_dynamo_past.onnx"))
    onnx.save(proto, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
              size_threshold=1024)   # as exporters write it: small tensors inline
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return folder


def test_integrations_export_folder_compiles_and_keeps_the_rest(tmp_path):
    src = _export_folder(tmp_path / "export")
    reports = exporters.compile_export_folder(src, tmp_path / "compiled", 2, "cpu")
    dst = tmp_path / "compiled"
    rep = reports["model.onnx"]
    assert rep["verification"]["status"] == "passed"
    assert rep["ops_after"].get("com.microsoft.GroupQueryAttention") == 2
    # weights stay external (one data file named after the output and its bytes' hash), the export's data file is
    # not copied
    names = sorted(p.name for p in dst.iterdir())
    assert len(names) == 4 and names[:2] == ["config.json", "model.onnx"] and names[3] == "tokenizer", names
    assert re.fullmatch(r"model\.onnx\.[0-9a-f]{16}\.data", names[2]), names
    assert (dst / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert rep["sizes"]["output"]["data"] > 0
    import onnxruntime as ort       # the compiled folder loads with its weights from where it is
    names = [i.name for i in ort.InferenceSession(str(dst / "model.onnx"), providers=["CPUExecutionProvider"]
                                                  ).get_inputs()]
    assert "input_ids" in names
    assert (src / "model.onnx_data").is_file()      # the export is left as it was


def test_integrations_export_folder_refuses_bad_folders(tmp_path):
    with pytest.raises(UsageError):
        exporters.compile_export_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError):
        exporters.compile_export_folder(tmp_path / "empty", tmp_path / "out")
    src = _export_folder(tmp_path / "export")
    with pytest.raises(UsageError):
        exporters.compile_export_folder(src, src)
