"""The float32 twin (compiler/widen.py) and verification's second opinion on float16 outputs (compiler/verify.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from helpers import parse_proto
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc import widen
from onnxc.verify import Scenario, verify_files

HDR = '<ir_version: 8, opset_import: ["" : 17]>\n'
# (x + big) - big with the sum stored as float16 between them (onnxruntime's CPU provider computes float16
# arithmetic in float32 and rounds where a float16 value is stored, here for the Concat and Slice): the rounding is
# to big's spacing (0.5 at 1000), so the input's float16 result is far from its float32 twin's; x is what it means.
CANCEL = HDR + """g (float16[N, 8] x) => (float16[N, 8] y) {
  s = Add (x, b)
  r = Concat <axis = 0> (s, s)
  n = Shape <start = 0, end = 1> (x)
  t = Slice (r, zero, n)
  y = Sub (t, b)
}"""


def _save(text: str, path, **consts: float) -> str:
    arrays = {k: np.array(v, np.float16) for k, v in consts.items()}
    if "b" in arrays:
        arrays["zero"] = np.array([0], np.int64)
    onnx.save(parse_proto(text, arrays), str(path))
    return str(path)


def _verify(tmp_path, candidate: str):
    ref = _save(CANCEL, tmp_path / "ref.onnx", b=1000.0)
    cand = _save(candidate, tmp_path / "cand.onnx")
    return verify_files(ref, cand, ir.load(ref), scenarios=(Scenario("forward", 4, 1, 0),))


def test_twin_computes_in_float32(tmp_path):
    twin = widen.save_twin(Path(_save(CANCEL, tmp_path / "ref.onnx", b=1000.0)), tmp_path / "twin.onnx")
    m = onnx.load(str(twin))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in m.graph.initializer} == {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    import onnxruntime as ort
    x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)
    y = ort.InferenceSession(str(twin), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x, atol=1e-4)           # float32 keeps x through the cancellation
    assert not widen.has_float16(widen.widen(ir.load(str(twin))))
    assert widen.has_float16(ir.load(str(tmp_path / "ref.onnx")))


def test_a_float16_rewrite_nearer_the_float32_result_passes_on_second_opinion(tmp_path):
    rep = _verify(tmp_path, HDR + "g (float16[N, 8] x) => (float16[N, 8] y) { y = Identity (x) }")
    assert rep.status == "passed", rep.reason
    (check,) = rep.scenarios[0]["outputs"]
    assert check["max_abs"] > check["atol"]                  # over float16's tolerance against the input
    twin = check["float32_twin"]
    assert twin["compiled_error"] < 1e-3 < twin["input_error"]
    assert any("float32 twin" in n for n in rep.notes)


def test_a_wrong_float16_rewrite_still_fails(tmp_path):
    rep = _verify(tmp_path, HDR + "g (float16[N, 8] x) => (float16[N, 8] y) { y = Neg (x) }")
    assert rep.status == "failed"
    (check,) = rep.scenarios[0]["outputs"]
    assert check["float32_twin"]["compiled_error"] > check["float32_twin"]["input_error"] * 4


def test_float32_models_get_no_second_opinion(tmp_path):
    ref = _save(HDR + "g (float[N, 8] x) => (float[N, 8] y) { y = Relu (x) }", tmp_path / "ref.onnx")
    cand = _save(HDR + "g (float[N, 8] x) => (float[N, 8] y) { y = Abs (x) }", tmp_path / "cand.onnx")
    rep = verify_files(ref, cand, ir.load(ref), scenarios=(Scenario("forward", 4, 1, 0),))
    assert rep.status == "failed" and "float32_twin" not in rep.scenarios[0]["outputs"][0]


@settings(max_examples=15, deadline=None)
@given(big=st.sampled_from([0.0, 8.0, 1000.0]), shift=st.sampled_from([0.0, 0.5, 3.0]))
def test_second_opinion_passes_exactly_the_candidates_near_the_float32_result(tmp_path_factory, big, shift):
    """A candidate x + shift: accepted iff within atol + 4x the input's own float32 distance (shift 0 always)."""
    tmp = tmp_path_factory.mktemp("w")
    ref = _save(CANCEL, tmp / "ref.onnx", b=big)
    cand = _save(HDR + "g (float16[N, 8] x) => (float16[N, 8] y) { y = Add (x, c) }", tmp / "cand.onnx", c=shift)
    rep = verify_files(ref, cand, ir.load(ref), scenarios=(Scenario("forward", 4, 1, 0),))
    check = rep.scenarios[0]["outputs"][0]
    if shift == 0.0:
        assert rep.status == "passed"
    twin = check.get("float32_twin")
    if twin is not None:
        assert rep.status == ("passed" if twin["compiled_error"] <= check["atol"] + 4 * twin["input_error"]
                              else "failed")
    else:
        assert rep.status == ("passed" if check["ok"] else "failed")
