"""Small models built in code for the I/O, CLI and API tests (no torch, no network)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_lm(vocab: int = 32, hidden: int = 8, seed: int = 0, noisy: bool = True) -> onnx.ModelProto:
    """Embedding -> MatMul -> Relu -> MatMul with exporter-style shape arithmetic and Identity/Cast noise."""
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")
    w1 = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
    ]
    if noisy:
        nodes += [
            helper.make_node("Shape", ["r"], ["shp"], name="shape"),
            helper.make_node("Constant", [], ["i2"], name="c2", value=helper.make_tensor("v", TensorProto.INT64, [1], [2])),
            helper.make_node("Gather", ["shp", "i2"], ["hid"], name="gather_dim"),
            helper.make_node("Constant", [], ["m1"], name="cm1", value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
            helper.make_node("Constant", [], ["m1b"], name="cm1b", value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
            helper.make_node("Concat", ["m1", "m1b", "hid"], ["target"], name="concat", axis=0),
            helper.make_node("Reshape", ["r", "target"], ["r2"], name="reshape"),
            helper.make_node("Identity", ["r2"], ["r3"], name="ident"),
            helper.make_node("Cast", ["r3"], ["r4"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["r4", "w2"], ["logits"], name="mm2"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2"))
    graph = helper.make_graph(
        nodes, "tiny_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [emb, w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
