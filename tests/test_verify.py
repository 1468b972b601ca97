"""Verification helpers (onnxc.verify): input roles and float twins of quantized nodes."""
from __future__ import annotations

import types

import numpy as np
import onnx
import onnx_ir as ir
import onnxc
import pytest
from helpers import parse
from onnxc.kernels.matmul_nbits import dequantize, quantize_rtn
from onnxc.verify import QUANT_META, Scenario, computed_in, computed_in_all, float_twins, input_role, make_inputs


def test_input_role_reads_names_then_uses():
    model = parse("""
    g (int64[B, S] input_ids, int64[B, T] attention_mask, int64[B, S] position_ids, float[B, 2, P, 4] past_key,
       int64[B, S] other) => (float[B, S, 4] y) {
      y = Gather(table, input_ids)
    }""", {"table": np.zeros((10, 4), np.float32)})
    assert [input_role(v) for v in model.graph.inputs] == ["ids", "mask", "position", "past", "other"]
    feeds = make_inputs(model.graph, Scenario("decode", 2, 1, 3), seed=0)
    assert feeds["attention_mask"].shape == (2, 4) and feeds["past_key"].shape == (2, 2, 3, 4)
    np.testing.assert_array_equal(feeds["position_ids"], [[3], [3]])
    assert feeds["input_ids"].max() < 10


def test_positions_continue_a_static_past():
    """A fixed-shape export holds 4 cached positions whatever the scenario says: positions start at 4."""
    model = parse("""
    g (int64[1, 3] input_ids, int64[1, 7] attention_mask, int64[1, 3] position_ids, float[1, 2, 4, 4] past_key)
       => (float[1, 3, 4] y) {
      y = Gather(table, input_ids)
    }""", {"table": np.zeros((10, 4), np.float32)})
    for sc in (Scenario("prefill", 2, 5, 0), Scenario("decode", 2, 1, 6)):
        feeds = make_inputs(model.graph, sc, seed=0)
        np.testing.assert_array_equal(feeds["position_ids"], [[4, 5, 6]])
        assert list(feeds) == ["input_ids", "attention_mask", "position_ids", "past_key"]


def test_float_twins_dequantize_each_node_with_its_own_block_size():
    """Two MatMulNBits with different K and block sizes: each twin uses its own node's parameters."""
    rng = np.random.default_rng(0)
    weights = {"1": rng.standard_normal((32, 8)).astype(np.float32),
               "2": rng.standard_normal((64, 8)).astype(np.float32)}
    blocks = {"1": 16, "2": 32}
    inits = {}
    for k, w in weights.items():
        inits[f"b{k}"], inits[f"s{k}"], _ = quantize_rtn(w, blocks[k], symmetric=True)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
    g (float[N, 32] x, float[N, 64] u) => (float[N, 8] y, float[N, 8] z) {
      y = com.microsoft.MatMulNBits <K = 32, N = 8, bits = 4, block_size = 16> (x, b1, s1)
      z = com.microsoft.MatMulNBits <K = 64, N = 8, bits = 4, block_size = 32> (u, b2, s2)
    }""", inits)
    for node, k in zip(model.graph, weights):
        node.name = f"mm{k}"
        node.meta[QUANT_META] = types.SimpleNamespace(weight=ir.tensor(weights[k]))
    twins = float_twins(model)
    assert len(twins) == 2
    for (_, deq, _), k in zip(twins, weights):
        want = dequantize(inits[f"b{k}"], inits[f"s{k}"], K=weights[k].shape[0], N=8, bits=4, block_size=blocks[k])
        np.testing.assert_array_equal(deq.numpy(), want)
        np.testing.assert_allclose(deq.numpy(), weights[k], atol=0.5)


def _rms_norm_cast_to(to: int, dtype: int = onnx.TensorProto.FLOAT, project: int = 0) -> onnx.ModelProto:
    """x -> RMSNorm (ReduceMean of x*x, Sqrt, Div, Mul by a weight) in `dtype` (-> MatMul by a (64, project)
    weight) -> Cast(to)."""
    from onnx import helper
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["n"]),
             helper.make_node("Mul", ["n", "w"], ["h"])]
    inits = [onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             onnx.numpy_helper.from_array(np.array(1e-6, np_dtype), "eps"),
             onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 64).astype(np_dtype), "w")]
    if project:
        nodes.append(helper.make_node("MatMul", ["h", "proj"], ["p"]))
        inits.append(onnx.numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((64, project)).astype(np_dtype), "proj"))
    nodes.append(helper.make_node("Cast", ["p" if project else "h"], ["y"], to=to))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, ["B", "S", 64])],
                              [helper.make_tensor_value_info("y", to, ["B", "S", project or 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_judges_an_output_at_the_precision_it_was_computed_in(tmp_path, seed):
    """A float32 RMSNorm whose result is Cast to float64 is judged at float32's tolerance (the fused norm rounds
    differently in float32), not float64's; a float64 computation keeps float64's."""
    src = tmp_path / "m.onnx"
    onnx.save(_rms_norm_cast_to(onnx.TensorProto.DOUBLE), str(src))
    res = onnxc.compile(src, 2, "cpu", output=tmp_path / "o.onnx", seed=seed)
    v = res.report["verification"]
    assert v["status"] == "passed", v
    assert {o["rtol"] for sc in v["scenarios"] for o in sc["outputs"]} == {1e-4}
    typed = onnx.shape_inference.infer_shapes
    assert computed_in(ir.from_proto(typed(_rms_norm_cast_to(onnx.TensorProto.DOUBLE))), "y") == "float32"
    assert computed_in(ir.from_proto(typed(_rms_norm_cast_to(onnx.TensorProto.DOUBLE, onnx.TensorProto.DOUBLE))),
                       "y") == "float64"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_quantized_judges_an_output_at_the_precision_it_was_computed_in(tmp_path, seed):
    """The quantized path judges as the float path does: a float32 RMSNorm and projection Cast to float64 gets
    float32's tolerance in both of its comparisons (seed 0 failed at float64's 1e-7: the fused norm rounds
    differently)."""
    src = tmp_path / "m.onnx"
    onnx.save(_rms_norm_cast_to(onnx.TensorProto.DOUBLE, project=32), str(src))
    res = onnxc.compile(src, 2, "cpu", output=tmp_path / "o.onnx", seed=seed, options={"quantize": "int4"})
    assert res.report["ops_after"].get("com.microsoft.MatMulNBits") == 1
    v = res.report["verification"]
    assert v["status"] == "passed", v
    for key in ("outputs", "quantized_outputs"):
        assert {o["rtol"] for sc in v["scenarios"] for o in sc[key]} == {1e-4}


def test_verify_quantized_checks_the_memory_budget_before_making_twins(tmp_path, monkeypatch):
    """Weights over the memory budget skip the quantized verification before its float twins are built or
    saved."""
    import onnxc.verify as numeric

    def no_twins(model):
        raise AssertionError("float twins built although the weights are over the budget")

    monkeypatch.setattr(numeric, "float_twins", no_twins)
    src = tmp_path / "m.onnx"
    onnx.save(_rms_norm_cast_to(onnx.TensorProto.DOUBLE, project=32), str(src))
    res = onnxc.compile(src, 2, "cpu", output=tmp_path / "o.onnx", options={"quantize": "int4"}, memory_budget=1024)
    v = res.report["verification"]
    assert v["status"] == "skipped" and "memory budget" in v["reason"], v
    assert (tmp_path / "o.onnx").exists()


def test_computed_in_all_agrees_with_a_walk_per_output():
    """One memoized walk gives each output what walking its own cone gives (a fixture decoder, 60 outputs)."""
    from pathlib import Path

    model = ir.load(Path(__file__).parents[1] / "fixtures" / "models" / "llama_dynamo_past.onnx")
    model.graph.outputs[-1].producer().outputs[0].dtype = ir.DataType.FLOAT16   # one narrower cone

    def walk(name):
        out = next(v for v in model.graph.outputs if v.name == name)
        narrowest, seen, stack = None, set(), [out]
        while stack:
            node = stack.pop().producer()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for o in node.outputs:
                kind = str(o.dtype.numpy()) if o.dtype is not None and o.dtype.is_floating_point() else None
                if kind is not None and (narrowest is None or numeric_rtol(kind) > numeric_rtol(narrowest)):
                    narrowest = kind
            stack.extend(i for i in node.inputs if i is not None)
        return narrowest

    got = computed_in_all(model)
    assert got == {v.name: walk(v.name) for v in model.graph.outputs}
    assert set(got.values()) == {"float32", "float16"}


def numeric_rtol(kind: str) -> float:
    from onnxc.verify import TOLERANCES

    return TOLERANCES[kind][0]


def test_verification_runs_the_input_as_written_when_the_basic_level_refuses_it(tmp_path, monkeypatch):
    """The input runs at onnxruntime's basic level; a model that level refuses is run with the optimizations off
    instead of failing the compile as an invalid input."""
    import onnxruntime as ort

    real, levels = ort.InferenceSession, []

    def session(path, so=None, **kw):
        levels.append(so.graph_optimization_level)
        if so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC:
            raise RuntimeError("an optimizer refused the model")
        return real(path, so, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    src = tmp_path / "m.onnx"
    onnx.save(_rms_norm_cast_to(onnx.TensorProto.FLOAT), str(src))
    res = onnxc.compile(src, 2, "cpu", output=tmp_path / "o.onnx")
    assert res.report["verification"]["status"] == "passed"
    assert levels.count(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) == 1
    assert levels.count(ort.GraphOptimizationLevel.ORT_DISABLE_ALL) >= 2        # the input's retry and the output
