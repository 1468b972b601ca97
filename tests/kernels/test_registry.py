"""The REFERENCE registry and run_node: every registered op evaluated through run_node against onnxruntime."""

import numpy as np
import pytest
from kernel_ort import MS, assert_close, node_model, randn, rng, run_ort
from onnx import helper, load_model_from_string
from onnxc.kernels import REFERENCE, run_node
from onnxc.kernels.matmul_nbits import quantize_rtn
from onnxc.kernels.quantize_linear import quantize_weight


def _cases():
    r = rng(0)
    x3 = randn(r, 2, 3, 32)
    h = randn(r, 32)
    w4, s4, z4 = quantize_rtn(randn(r, 32, 8), 16, False)
    ang = r.uniform(0, 6.3, (16, 8))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ids = r.integers(0, 10, (2, 3)).astype(np.int32)
    q8, s8, z8 = quantize_weight(randn(r, 32, 8), True)   # as onnxc emits: within +-63
    return {
        ("", "SimplifiedLayerNormalization"): ([x3, h], {"epsilon": 1e-5}, 2, 18),
        ("", "LayerNormalization"): ([x3, h, h], {"epsilon": 1e-5}, 3, 17),
        ("", "Gelu"): ([x3], {"approximate": "tanh"}, 1, 20),
        (MS, "SkipSimplifiedLayerNormalization"): ([x3, x3, h, h], {"epsilon": 1e-5}, 4, 18),
        (MS, "SkipLayerNormalization"): ([x3, x3, h, h, h], {"epsilon": 1e-5}, 4, 18),
        (MS, "EmbedLayerNormalization"): ([ids, ids % 2, randn(r, 10, 32), randn(r, 8, 32), randn(r, 2, 32), h, h,
                                           np.ones((2, 3), np.int32)], {"epsilon": 1e-5}, 3, 18),
        (MS, "Gelu"): ([x3], {}, 1, 18),
        (MS, "BiasGelu"): ([x3, h], {}, 1, 18),
        (MS, "FastGelu"): ([x3, h], {}, 1, 18),
        (MS, "QuickGelu"): ([x3], {"alpha": 1.0}, 1, 18),
        (MS, "Attention"): ([x3, randn(r, 32, 96, scale=0.2), randn(r, 96), np.array([3, 2], np.int32)],
                            {"num_heads": 4, "unidirectional": 1}, 2, 18),
        (MS, "MultiHeadAttention"): ([x3, x3 * 0.5, x3, None, np.array([3, 1], np.int32)], {"num_heads": 2}, 3, 18),
        (MS, "GroupQueryAttention"): ([randn(r, 2, 3, 64), None, None, None, None, np.array([2, 2], np.int32),
                                       np.array(3, np.int32), cos, sin],
                                      {"num_heads": 2, "kv_num_heads": 1, "do_rotary": 1}, 3, 18),
        (MS, "RotaryEmbedding"): ([x3, np.array([[0, 4, 9], [1, 2, 3]], np.int64), cos, sin], {"interleaved": 1},
                                  1, 18),
        (MS, "MatMulNBits"): ([x3, w4, s4, z4], {"K": 32, "N": 8, "bits": 4, "block_size": 16}, 1, 18),
        (MS, "GatherBlockQuantized"): ([w4.reshape(8, -1), np.array([[7, 0]], np.int64), s4, z4],
                                       {"bits": 4, "block_size": 16}, 1, 18),
        ("", "QuantizeLinear"): ([x3, np.array(0.02, np.float32), np.array(7, np.uint8)], {}, 1, 21),
        ("", "DequantizeLinear"): ([q8, s8, z8], {"axis": 1}, 1, 21),
        ("", "DynamicQuantizeLinear"): ([x3], {}, 3, 21),
        ("", "MatMulInteger"): ([r.integers(0, 256, (3, 32)).astype(np.uint8), q8, np.array(9, np.uint8), z8], {},
                                1, 21),
        (MS, "DynamicQuantizeMatMul"): ([x3, q8, s8, z8, h[:8]], {}, 1, 18),
    }


CASES = _cases()


def test_registry_covers_the_emitted_ops():
    assert set(REFERENCE) == set(CASES)


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: k[1] if isinstance(k, tuple) else str(k))
def test_run_node_matches_ort(key):
    domain, op = key
    inputs, attrs, n_out, opset = CASES[key]
    model, _ = node_model(op, inputs, attrs, n_out, domain or "", opset=opset)
    node = load_model_from_string(model).graph.node[0]
    node_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}  # strings arrive as bytes
    got = run_ort(op, inputs, attrs, n_out, domain, opset=opset)
    ref = run_node(op, domain, inputs, node_attrs)
    assert len(ref) >= n_out
    for i in range(n_out):
        assert_close(got[i], ref[i], err_msg=f"{op} output {i}")


def test_run_node_accepts_ai_onnx_domain_and_trailing_absent_inputs():
    x, s = randn(rng(1), 2, 8), randn(rng(2), 8)
    a = run_node("SimplifiedLayerNormalization", "ai.onnx", [x, s, None, None])
    b = run_node("SimplifiedLayerNormalization", "", [x, s])
    np.testing.assert_array_equal(a[0], b[0])


def test_run_node_rejects_unknown_ops_and_attributes():
    with pytest.raises(KeyError, match="com.microsoft::NoSuchOp"):
        run_node("NoSuchOp", MS, [])
    with pytest.raises(TypeError):
        run_node("QuickGelu", MS, [np.zeros(3, np.float32)], {"beta": 1.0})
