"""Every bundled fixture compiles at -O1, verifies numerically, and loses its exporter noise; at -O2 (CPU) and
-O3 (CUDA, float16 compute) each reaches full fusion and verifies (prefill, decode on a non-empty past, a chunked
prefill, a right-padded batch of two)."""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

import onnxc
from helpers import fixture_entries

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
ENTRIES = fixture_entries()


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
    names = [sc["name"] for sc in v["scenarios"]]
    assert names == (["prefill", "decode", "chunk"] if entry["past"] else ["forward", "padded"])
    assert [sc["pad"] for sc in v["scenarios"]] == ([2, 0, 0] if entry["past"] else [0, 2])
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


def _full_fusion(entry: dict) -> dict[str, int]:
    """Per model: the fused ops a full fusion leaves (layers L)."""
    layers = entry["config"]["num_layers"]
    if entry["family"] == "bert":
        return {"Attention": layers, "SkipLayerNormalization": 2 * layers, "BiasGelu": layers,
                "EmbedLayerNormalization": 1}
    if entry["family"] == "gpt2":
        # layer 0's first LayerNorm reads the embeddings (EmbedLayerNormalization); ln_f is a skip norm
        attention = "MultiHeadAttention" if entry["past"] else "Attention"
        return {attention: layers, "SkipLayerNormalization": 2 * layers, "FastGelu": layers,
                "EmbedLayerNormalization": 1}
    fused = {"GroupQueryAttention": layers, "SkipSimplifiedLayerNormalization": 2 * layers}
    if entry["family"] == "gemma":
        fused["FastGelu"] = layers
    return fused


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    cache: dict[tuple[str, int, str], dict] = {}

    def get(entry: dict, level: int, target: str) -> dict:
        key = (entry["file"], level, target)
        if key not in cache:
            out = tmp_path_factory.mktemp("fused") / (Path(entry["file"]).stem + ".onnx")
            cache[key] = onnxc.compile(ROOT / entry["file"], level=level, target=target, output=out).report
        return cache[key]
    return get


@pytest.mark.parametrize("level, target", [(2, "cpu"), (3, "cuda")])
@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_fixture_reaches_full_fusion(entry, level, target, fused):
    report = fused(entry, level, target)
    assert report["verification"]["status"] == "passed", report["verification"]
    ops = {k.split(".")[-1]: v for k, v in report["ops_after"].items()}
    for op, count in _full_fusion(entry).items():
        assert ops.get(op, 0) == count, (op, ops, report["notes"])
    for gone in ("Softmax", "ReduceMean", "Erf", "Tanh", "Expand"):
        assert gone not in ops, (gone, ops)
    cov = report["coverage"]
    layers = entry["config"]["num_layers"]
    assert cov["attention"] == {"found": layers, "fused": layers, "misses": []}, cov
    for family in ("norm", "skip_norm", "gelu"):
        assert cov[family]["fused"] == cov[family]["found"] and not cov[family]["misses"], (family, cov)
    assert cov["skip_norm"]["found"] == 2 * layers


@pytest.mark.parametrize("name", ["llama_dynamo_past", "gpt2_ts_past", "bert_dynamo"])
def test_fixture_io_fp16_verifies_against_the_float32_input(name, tmp_path):
    res = onnxc.compile(ROOT / "models" / f"{name}.onnx", level=3, target="cuda", output=tmp_path / "m.onnx",
                        options={"io_fp16": True})
    assert res.report["verification"]["status"] == "passed"
    model = ir.load(tmp_path / "m.onnx")
    floats = [v for v in [*model.graph.inputs, *model.graph.outputs] if v.dtype is not None and v.dtype.is_floating_point()]
    assert floats and all(v.dtype == ir.DataType.FLOAT16 for v in floats)
