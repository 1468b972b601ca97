"""The activation memory of verification is estimated before running: scenarios over the budget are shrunk or
skipped, with a note, and never run."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxc
from onnxc import activation


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr))


def constant_of_shape_16gib(path):
    """A 238-byte model: y = x + sum(ConstantOfShape([4, 1024, 1024, 1024])), a 16 GiB float tensor."""
    nodes = [_const("shape", np.array([4, 1024, 1024, 1024], np.int64)),
             helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def expand_per_token(path):
    """y = x + sum(Expand(1, [batch, seq, 2**20])): 4 MiB of activations per token."""
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             _const("wide", np.array([1 << 20], np.int64)),
             helper.make_node("Concat", ["xs", "wide"], ["shape"], axis=0),
             _const("one", np.array(1.0, np.float32)),
             helper.make_node("Expand", ["one", "shape"], ["big"]),
             helper.make_node("ReduceSum", ["big", "axis"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
                          [numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_activation_estimate_counts_constant_of_shape_and_expand(tmp_path):
    e = activation.estimate(activation.weight_free(constant_of_shape_16gib(tmp_path / "a.onnx")), {"x": (2,)})
    assert e.largest == ("big", 16 << 30) and e.peak_bytes >= 16 << 30 and e.unknown == 0
    proto = activation.weight_free(expand_per_token(tmp_path / "b.onnx"))
    assert activation.estimate(proto, {"x": (2, 7)}).largest == ("big", 2 * 7 * 4 << 20)
    assert activation.estimate(proto, {"x": (1, 3)}).largest == ("big", 3 * 4 << 20)


def test_activation_16gib_constant_of_shape_is_never_run(tmp_path):
    """Run in a process that cannot map 16 GiB: running the scenario would fail it (not swap the machine)."""
    model = constant_of_shape_16gib(tmp_path / "m.onnx")
    assert model.stat().st_size < 300
    code = textwrap.dedent(f"""\
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        import onnxc
        r = onnxc.compile({str(model)!r}, 1, memory_budget=2 << 30)
        print(json.dumps(r.report["verification"]))
        """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    v = json.loads(p.stdout)
    assert v["status"] == "skipped" and v["scenarios"] == []
    assert len(v["notes"]) == 2 and all("16384 MiB" in n and "'big'" in n for n in v["notes"])


def test_activation_scenarios_shrink_to_fit_and_still_verify(tmp_path):
    r = onnxc.compile(str(expand_per_token(tmp_path / "m.onnx")), 1, memory_budget=20 << 20)
    v = r.report["verification"]
    assert v["status"] == "passed"
    forward = next(s for s in v["scenarios"] if s["name"] == "forward")
    assert forward["inputs"]["x"] == [1, 3]         # 2 x 7 tokens need 56 MiB, 1 x 7 28 MiB, 1 x 3 12 MiB
    assert any(n.startswith("scenario 'forward' shrunk from batch 2 x 7 tokens") for n in v["notes"])
