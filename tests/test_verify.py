"""Verification helpers (onnxc.verify): input roles and float twins of quantized nodes."""
from __future__ import annotations

import types

import numpy as np
import onnx_ir as ir
from helpers import parse
from onnxc.kernels.matmul_nbits import dequantize, quantize_rtn
from onnxc.verify import QUANT_META, Scenario, float_twins, input_role, make_inputs


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
