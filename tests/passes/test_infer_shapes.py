"""infer-shapes: fills in value types and shapes, never touches nodes, never reads large weights."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from helpers import assert_unchanged_by, assert_valid, parse, run_ort, run_pass, to_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

MODEL = """<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
g (float[N, 16] x) => (y, z) <float[16, 8] w = {W}, int64[2] t = {0, -1}> {
  a = MatMul(x, w)
  b = Relu(a)
  c = Reshape(b, t)
  s = Shape(c)
  y = Softmax(c)
  g = com.microsoft.FastGelu(b)
  z = Neg(g)
}""".replace("W", ", ".join(["0.5"] * 128))


def values(model: ir.Model) -> dict[str, ir.Value]:
    return {v.name: v for n in model.graph for v in n.outputs}


def nodes_only(model: ir.Model) -> list[bytes]:
    return [n.SerializeToString(deterministic=True) for n in ir.serde.serialize_model(model).graph.node]


def test_infer_shapes_does_not_modify_nodes():
    model = parse(MODEL)
    nodes_before = nodes_only(model)
    inits_before = {k: v.const_value.tobytes() for k, v in model.graph.initializers.items()}
    result = run_pass(model, "infer-shapes")
    assert not result.modified          # analysis only: fixed points must converge
    assert result.counts == {"refined": 1}
    assert nodes_only(model) == nodes_before
    assert {k: v.const_value.tobytes() for k, v in model.graph.initializers.items()} == inits_before
    assert_valid(model, parse(MODEL))


def test_infer_shapes_refines_types_and_shapes():
    model = parse(MODEL)
    assert values(model)["a"].shape is None and values(model)["a"].dtype is None
    run_pass(model, "infer-shapes")
    v = values(model)
    assert v["a"].dtype == ir.DataType.FLOAT and str(v["a"].shape) == "[N,8]"
    assert str(v["c"].shape) == "[N,8]"            # Reshape(b, [0, -1]) through data propagation
    assert v["s"].dtype == ir.DataType.INT64 and v["s"].shape == ir.Shape([2])
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT and str(model.graph.outputs[0].shape) == "[N,8]"


def test_infer_shapes_skips_unknown_domains():
    model = parse(MODEL)
    run_pass(model, "infer-shapes")
    v = values(model)
    assert v["g"].dtype is None          # com.microsoft.FastGelu: not inferred, not an error
    assert v["b"].shape is not None


def test_infer_shapes_matches_runtime_shapes():
    model = parse(MODEL.replace("com.microsoft.FastGelu", "Sigmoid"))
    run_pass(model, "infer-shapes")
    y, z = run_ort(model, {"x": np.ones((5, 16), np.float32)})
    assert y.shape == (5, 8) and z.shape == (5, 8)
    for name in ("a", "b", "c", "g"):
        assert [d if isinstance(d, int) else d.value for d in values(model)[name].shape] == ["N", 8]


def test_infer_shapes_keeps_declared_graph_outputs():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y) {
      y = Neg(x)
    }""")
    before = to_bytes(model)
    run_pass(model, "infer-shapes")
    assert to_bytes(model) == before


def test_infer_shapes_does_not_read_large_weights(tmp_path):
    # The weight points into a file that does not exist: reading it would fail.
    model = parse("""
    g (float[N, 32] x) => (y) {
      y = MatMul(x, w)
    }""", {"w": np.zeros((32, 32), np.float32)})
    missing = ir.ExternalTensor("missing.bin", offset=0, length=4096, dtype=ir.DataType.FLOAT,
                                shape=ir.Shape([32, 32]), name="w", base_dir=str(tmp_path))
    model.graph.initializers["w"].const_value = missing
    run_pass(model, "infer-shapes")
    assert str(model.graph.outputs[0].shape) == "[N,32]"
    assert model.graph.initializers["w"].const_value is missing


def test_infer_shapes_second_run_changes_nothing():
    model = parse(MODEL)
    run_pass(model, "infer-shapes")
    assert run_pass(model, "infer-shapes").counts == {"refined": 0}
    assert_unchanged_by(model, "infer-shapes")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["Neg", "Relu", "Transpose", "Unsqueeze", "ReduceSum"]), min_size=1,
                max_size=6),
       st.sampled_from(["2, 3", "N, 3"]))
def test_infer_shapes_property_agrees_with_runtime(ops, dims):
    lines, prev = [], "x"
    for i, op in enumerate(ops):
        if op in ("Unsqueeze", "ReduceSum"):
            lines.append(f"v{i} = {op}({prev}, ax)")
        else:
            lines.append(f"v{i} = {op}({prev})")
        prev = f"v{i}"
    text = f"g (float[{dims}] x) => (y) <int64[1] ax = {{0}}> {{\n  " + "\n  ".join(lines) + f"\n  y = Identity({prev})\n}}"
    model = parse(text)
    nodes_before = nodes_only(model)
    run_pass(model, "infer-shapes")
    assert nodes_only(model) == nodes_before
    (y,) = run_ort(model, {"x": np.ones((2, 3), np.float32)})
    shape = model.graph.outputs[0].shape
    assert shape is not None and len(shape) == y.ndim
    assert [d if isinstance(d, int) else 2 for d in shape] == list(y.shape)
    assert_valid(model)
