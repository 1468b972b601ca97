"""convert-fp16: structure (before/after), numbers in float16 tolerance, kept-fp32 regions, fused ORT ops, a
hypothesis property over random graphs, and every fixture compiled and verified."""
from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import (
    fixture_files,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    counting,
    parse,
    parse_proto,
    random_feeds,
    run_ort,
    run_pass,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc import ir as irio
from onnxc import verify
from onnxc.kernels.matmul_nbits import quantize_rtn
from onnxc.pass_manager import PassContext, PassManager, parse_pipeline
from onnxc.passes import convert_fp16 as cf
from onnxc.pipeline import CLEANUP, O1
from onnxc.verifier import check_model

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
MS_HEADER = '<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>'
CLEANUP_PASSES = ("fold-constants", "remove-noops", "eliminate-cse", "eliminate-dead")
CONVERT = counting("convert-fp16")
CONVERT_CLEAN = counting("convert-fp16", after=CLEANUP_PASSES)
FIXTURES = [str(p) for p in fixture_files()]
PIPELINE = f"{O1},convert-fp16,{CLEANUP},sort-topologically"


def fp16_close(before: ir.Model, after: ir.Model, feeds: dict[str, np.ndarray] | None = None, *,
               io_fp16: bool = False) -> None:
    """Every output agrees within the float16 verification tolerance (onnxc.verify.compare)."""
    proto = ir.serde.serialize_model(before) if isinstance(before, ir.Model) else before
    feeds = feeds if feeds is not None else random_feeds(proto, 0)
    ref = run_ort(proto, feeds)
    cast = {k: v.astype(np.float16) if io_fp16 and v.dtype == np.float32 else v for k, v in feeds.items()}
    got = run_ort(after, cast)
    for k, (r, g) in enumerate(zip(ref, got)):
        assert g.dtype == (np.float16 if io_fp16 and r.dtype == np.float32 else r.dtype), (k, g.dtype)
        check = verify.compare(r, g, f"output {k}", "float16")
        # An output that cancels to zero (x - max(x, x)) has no magnitude for the relative tolerance to scale with, yet
        # onnxruntime's CPU EP may run some fp16 ops in fp32 and drop a Cast pair, so one operand is rounded to
        # fp16 and the other is not: the error is then one fp16 rounding of the inputs, which bounds it.
        floor = 4 * 2.0 ** -11 * max([float(np.abs(v).max()) for v in feeds.values() if v.dtype.kind == "f" and v.size],
                                      default=0.0)
        assert check.ok or (not np.any(r) and check.max_abs <= floor), check


def dtypes(model: ir.Model, op_type: str) -> tuple[list, list]:
    node = next(n for n in model.graph if n.op_type == op_type)
    return ([v.dtype if v is not None else None for v in node.inputs], [v.dtype for v in node.outputs])


def cast_pairs(model: ir.Model) -> list[str]:
    """Cast(Cast(x)) chains that return to x's type (a redundant round trip)."""
    out = []
    for n in model.graph:
        p = n.inputs[0].producer() if n.op_type == "Cast" else None
        if p is not None and p.op_type == "Cast" and p.inputs[0].dtype == n.outputs[0].dtype:
            out.append(f"{p.inputs[0].name} -> {n.outputs[0].name}")
    return out


# ------------------------------------------------------------------------------------------------ before/after
W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


def test_convert_fp16_matmul_keeps_io_types():
    model, counts = check_before_after("""
    g (float[N, 4] x) => (float[N, 3] y) {
      h = MatMul(x, w)
      y = Relu(h)
    }""", CONVERT, """
    g (float[N, 4] x) => (float[N, 3] y) {
      x16 = Cast<to=10>(x)
      h = MatMul(x16, w)
      r = Relu(h)
      y = Cast<to=1>(r)
    }""", initializers={"w": W}, expected_initializers={"w": W.astype(np.float16)}, numeric=False)
    assert counts == {"convert-node": 2, "convert-initializer": 1, "insert-cast": 2}
    assert [v.name for v in model.graph.outputs] == ["y"]
    fp16_close(parse(MATMUL_RELU, {"w": W}), model)


MATMUL_RELU = """
g (float[N, 4] x) => (float[N, 3] y) {
  h = MatMul(x, w)
  y = Relu(h)
}"""


def test_convert_fp16_io_fp16_changes_graph_io_types():
    model = parse(MATMUL_RELU, {"w": W})
    counts = run_pass(model, "convert-fp16", io_fp16=True).counts
    assert counts == {"convert-node": 2, "convert-initializer": 1}
    assert [(v.name, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]] == [("x", F16), ("y", F16)]
    assert "Cast" not in [n.op_type for n in model.graph]
    assert check_model(model) == []
    fp16_close(parse(MATMUL_RELU, {"w": W}), model, io_fp16=True)


def test_convert_fp16_io_fp16_keeps_integer_inputs():
    text = """
    g (int64[N] ids, float[N, 3] extra) => (float[N, 3] y, int64[N] n) {
      e = Gather(table, ids)
      y = Add(e, extra)
      n = Identity(ids)
    }"""
    table = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    model = parse(text, {"table": table})
    run_pass(model, "convert-fp16", io_fp16=True)
    assert [v.dtype for v in model.graph.inputs] == [ir.DataType.INT64, F16]
    assert [v.dtype for v in model.graph.outputs] == [F16, ir.DataType.INT64]
    fp16_close(parse(text, {"table": table}), model, {"ids": np.array([1, 9, 0]),
                                                      "extra": np.ones((3, 3), np.float32)}, io_fp16=True)


def test_convert_fp16_clamps_out_of_range_constants():
    """Mask constants (-3.4e38, finfo(float32).min) become finfo(float16).min; -inf stays -inf."""
    big = np.array([-3.4e38, np.finfo(np.float32).min, -np.inf, 1e5, np.inf, 2.5], np.float32)
    model, _ = check_before_after("""
    g (float[N, 6] x, bool[N, 6] m) => (float[N, 6] y) {
      b = Where(m, zero, c)
      y = Add(x, b)
    }""", CONVERT, """
    g (float[N, 6] x, bool[N, 6] m) => (float[N, 6] y) {
      x16 = Cast<to=10>(x)
      b = Where(m, zero, c)
      s = Add(x16, b)
      y = Cast<to=1>(s)
    }""", initializers={"zero": np.zeros(1, np.float32), "c": big},
        expected_initializers={"zero": np.zeros(1, np.float16), "c": cf.to_fp16(big)}, numeric=False)
    c = model.graph.initializers["c"].const_value.numpy()
    fmin = np.finfo(np.float16).min
    assert c[0] == fmin and c[1] == fmin and c[2] == -np.inf and c[3] == np.finfo(np.float16).max
    assert c[4] == np.inf and c[5] == 2.5
    assert np.isnan(cf.to_fp16(np.array([np.nan, 65519.0, -65520.0], np.float32))).tolist() == [True, False, False]


def test_convert_fp16_masked_softmax_matches():
    text = """
    g (float[2, 5] s, bool[2, 5] m) => (float[2, 5] y) {
      b = Where(m, zero, fmin)
      a = Add(s, b)
      y = Softmax<axis=-1>(a)
    }"""
    inits = {"zero": np.zeros(1, np.float32), "fmin": np.array([np.finfo(np.float32).min], np.float32)}
    model = parse(text, inits)
    run_pass(model, "convert-fp16")
    assert model.graph.initializers["fmin"].const_value.numpy()[0] == np.finfo(np.float16).min
    mask = np.array([[1, 1, 0, 0, 1], [0, 0, 0, 0, 1]], bool)
    fp16_close(parse(text, inits), model, {"s": np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32),
                                           "m": mask})


def test_convert_fp16_leaves_integer_computations_and_casts_int_to_fp16():
    _, counts = check_before_after("""
    g (float[N, 4] x, int64[N, 4] mask) => (float[N, 4] y, int64[1] n) {
      sh = Shape(x)
      n = Gather(sh, zero_i)
      mf = Cast<to=1>(mask)
      y = Mul(x, mf)
    }""", CONVERT, """
    g (float[N, 4] x, int64[N, 4] mask) => (float[N, 4] y, int64[1] n) {
      sh = Shape(x)
      n = Gather(sh, zero_i)
      x16 = Cast<to=10>(x)
      mf = Cast<to=10>(mask)
      p = Mul(x16, mf)
      y = Cast<to=1>(p)
    }""", initializers={"zero_i": np.zeros(1, np.int64)}, expected_initializers={"zero_i": np.zeros(1, np.int64)},
        numeric=False)
    assert counts["convert-node"] == 2


ROTARY = """
g (float[1, S, 16] x, int64[1, S] pos) => (float[1, S, 16] y) {
  p = Unsqueeze(pos, axis2)
  pf = Cast<to=1>(p)
  f = Mul(pf, inv_freq)
  e = Concat<axis=-1>(f, f)
  c = Cos(e)
  s = Sin(e)
  xc = Mul(x, c)
  xs = Mul(x, s)
  y = Add(xc, xs)
}"""
INV_FREQ = (10000.0 ** (-np.arange(8) / 8)).astype(np.float32).reshape(1, 1, 8)


def test_convert_fp16_keeps_rotary_angle_in_fp32():
    """position_ids * inv_freq and Cos/Sin stay float32; cos/sin are cast once for their float16 users."""
    model, _ = check_before_after(ROTARY, CONVERT, """
    g (float[1, S, 16] x, int64[1, S] pos) => (float[1, S, 16] y) {
      x16 = Cast<to=10>(x)
      p = Unsqueeze(pos, axis2)
      pf = Cast<to=1>(p)
      f = Mul(pf, inv_freq)
      e = Concat<axis=-1>(f, f)
      c = Cos(e)
      c16 = Cast<to=10>(c)
      s = Sin(e)
      s16 = Cast<to=10>(s)
      xc = Mul(x16, c16)
      xs = Mul(x16, s16)
      a = Add(xc, xs)
      y = Cast<to=1>(a)
    }""", initializers={"inv_freq": INV_FREQ, "axis2": np.array([2])},
        expected_initializers={"inv_freq": INV_FREQ, "axis2": np.array([2])}, numeric=False)
    feeds = {"x": np.ones((1, 4, 16), np.float32), "pos": np.arange(5000, 5004).reshape(1, 4)}
    fp16_close(parse(ROTARY, {"inv_freq": INV_FREQ, "axis2": np.array([2])}), model, feeds)


def test_convert_fp16_rotary_in_fp16_would_lose_long_positions():
    """Why the angle stays float32: at position 5000 a float16 angle is off by up to 2 (its spacing is 4)."""
    pos = np.arange(5000, 5004, dtype=np.float32)[:, None] * INV_FREQ.reshape(1, 8)
    assert np.abs(np.cos(pos.astype(np.float16).astype(np.float32)) - np.cos(pos)).max() > 0.5


NORM = """
g (float[N, 8] x) => (float[N, 8] y) {
  sq = Pow(x, two)
  ms = ReduceMean<keepdims=1>(sq, axes)
  v = Add(ms, eps)
  r = Sqrt(v)
  inv = Reciprocal(r)
  n = Mul(x, inv)
  y = Mul(n, gamma)
}"""
NORM_INITS = {"two": np.array(2.0, np.float32), "axes": np.array([-1]), "eps": np.array(1e-6, np.float32),
              "gamma": np.linspace(0.5, 1.5, 8).astype(np.float32)}


def test_convert_fp16_keeps_norm_statistics_in_fp32():
    model, _ = check_before_after(NORM, CONVERT, """
    g (float[N, 8] x) => (float[N, 8] y) {
      x16 = Cast<to=10>(x)
      sq = Pow(x, two)
      ms = ReduceMean<keepdims=1>(sq, axes)
      v = Add(ms, eps)
      r = Sqrt(v)
      inv = Reciprocal(r)
      inv16 = Cast<to=10>(inv)
      n = Mul(x16, inv16)
      o = Mul(n, gamma)
      y = Cast<to=1>(o)
    }""", initializers=NORM_INITS,
        expected_initializers={**NORM_INITS, "gamma": NORM_INITS["gamma"].astype(np.float16)}, numeric=False)
    fp16_close(parse(NORM, NORM_INITS), model)


def test_convert_fp16_norm_statistics_survive_large_activations():
    """With |x| ~ 1000, x^2 overflows float16: evaluated in float16 arithmetic (onnx.reference runs numpy in the
    value's dtype, as CUDA kernels do), the kept statistics give the right answer, a float16 Pow gives zeros."""
    from onnx.reference import ReferenceEvaluator

    x = (np.random.default_rng(3).standard_normal((3, 8)) * 1000).astype(np.float32)
    want = ReferenceEvaluator(parse_proto(NORM, NORM_INITS)).run(None, {"x": x})[0]
    kept = parse(NORM, NORM_INITS)
    run_pass(kept, "convert-fp16")
    got = ReferenceEvaluator(ir.serde.serialize_model(kept)).run(None, {"x": x})[0]
    assert verify.compare(want, got, "y", "float16").ok
    saved = (cf.SQUARE_REDUCE, cf.SELF_SQUARE_REDUCE)
    cf.SQUARE_REDUCE = cf.SELF_SQUARE_REDUCE = frozenset()
    try:
        naive = parse(NORM, NORM_INITS)
        run_pass(naive, "convert-fp16")
    finally:
        cf.SQUARE_REDUCE, cf.SELF_SQUARE_REDUCE = saved
    bad = ReferenceEvaluator(ir.serde.serialize_model(naive)).run(None, {"x": x})[0]
    assert not verify.compare(want, bad, "y", "float16").ok


def test_convert_fp16_torchscript_norm_div_one_and_mul_square():
    text = """
    g (float[N, 8] x) => (float[N, 8] y) {
      sq = Mul(x, x)
      ms = ReduceMean<keepdims=1>(sq, axes)
      v = Add(ms, eps)
      r = Sqrt(v)
      inv = Div(one, r)
      y = Mul(x, inv)
    }"""
    inits = {"axes": np.array([-1]), "eps": np.array(1e-6, np.float32), "one": np.array(1.0, np.float32)}
    model = parse(text, inits)
    run_pass(model, "convert-fp16")
    f32 = sorted(n.op_type for n in model.graph if n.op_type != "Cast" and n.outputs[0].dtype == F32)
    assert f32 == ["Add", "Div", "Mul", "ReduceMean", "Sqrt"]
    final = model.graph.outputs[0].producer()
    assert final.op_type == "Cast" and final.inputs[0].producer().op_type == "Mul"
    fp16_close(parse(text, inits), model)


def test_convert_fp16_layer_norm_statistics_outputs_stay_fp32():
    text = """
    g (float[N, 8] x) => (float[N, 8] y, float[N, 1] mean) {
      y, mean, inv = LayerNormalization<axis=-1>(x, gamma, beta)
    }"""
    inits = {"gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)}
    model = parse(text, inits)
    run_pass(model, "convert-fp16")
    ins, outs = dtypes(model, "LayerNormalization")
    assert ins == [F16, F16, F16] and outs[:2] == [F16, F32] and outs[2] != F16     # Mean, InvStdDev: U
    assert [n.op_type for n in model.graph].count("Cast") == 2    # x in, y out; mean needs none
    fp16_close(parse(text, inits), model)


def test_convert_fp16_explicit_upcast_kept_and_cast_pairs_folded_by_cleanup():
    """A float16 model's norm: Cast(x16, float) feeds both the statistics and the scaling Mul."""
    text = """
    g (float16[N, 8] x) => (float16[N, 8] y) {
      x32 = Cast<to=1>(x)
      sq = Pow(x32, two)
      ms = ReduceMean<keepdims=1>(sq, axes)
      v = Add(ms, eps)
      r = Sqrt(v)
      inv = Reciprocal(r)
      n = Mul(x32, inv)
      n16 = Cast<to=10>(n)
      y = Mul(n16, gamma16)
    }"""
    inits = {**{k: v for k, v in NORM_INITS.items() if k != "gamma"}, "gamma16": np.ones(8, np.float16)}
    model = parse(text, inits)
    counts = CONVERT_CLEAN(model)
    assert counts == {"convert-node": 1, "insert-cast": 1}
    assert cast_pairs(model) == []
    assert [n.op_type for n in model.graph].count("Cast") == 2       # x -> float, inv -> float16
    assert dtypes(model, "Mul")[1] == [F16]
    fp16_close(parse(text, inits), model)


def test_convert_fp16_shared_constant_gets_a_float16_copy():
    """eps is read by the kept statistics (float32) and by a float16 Add: both precisions exist afterwards."""
    text = """
    g (float[N, 8] x) => (float[N, 8] y) {
      sq = Pow(x, two)
      ms = ReduceMean<keepdims=1>(sq, axes)
      v = Add(ms, eps)
      r = Sqrt(v)
      inv = Reciprocal(r)
      n = Mul(x, inv)
      y = Add(n, eps)
    }"""
    inits = {k: NORM_INITS[k] for k in ("two", "axes", "eps")}
    model = parse(text, inits)
    counts = run_pass(model, "convert-fp16").counts
    assert counts["convert-initializer"] == 1
    assert model.graph.initializers["eps"].dtype == F32
    assert model.graph.initializers["eps_fp16"].dtype == F16
    fp16_close(parse(text, inits), model)


def test_convert_fp16_large_initializers_are_lazy():
    big = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)
    big[0, 0] = 1e9
    model = parse(MATMUL_RELU.replace("4]", "64]").replace("3]", "64]"), {"w": big})
    run_pass(model, "convert-fp16", fold_limit_bytes=1024)
    t = model.graph.initializers["w"].const_value
    assert isinstance(t, ir.LazyTensor) and t.dtype == F16 and list(t.shape) == [64, 64]
    assert np.array_equal(t.numpy(), cf.to_fp16(big)) and t.numpy()[0, 0] == np.finfo(np.float16).max
    small = parse(MATMUL_RELU.replace("4]", "64]").replace("3]", "64]"), {"w": big})
    run_pass(small, "convert-fp16")
    assert not isinstance(small.graph.initializers["w"].const_value, ir.LazyTensor)


def test_convert_fp16_lazy_weights_from_external_data_save(tmp_path):
    """A model with external weights: converted tensors are computed while saving, and the result verifies."""
    src = parse(MATMUL_RELU.replace("4]", "256]").replace("3]", "256]"),
                {"w": np.random.default_rng(5).standard_normal((256, 256)).astype(np.float32)})
    ir.save(src, tmp_path / "in.onnx", external_data="in.onnx.data", size_threshold_bytes=0)
    result = onnxc.compile(tmp_path / "in.onnx", 3, "cuda", output=tmp_path / "out.onnx",
                           passes="convert-fp16", options={"fold_limit_bytes": 1024}, external_data=True)
    assert result.report["verification"]["status"] == "passed"
    out = irio.load(tmp_path / "out.onnx")
    assert out.graph.initializers["w"].dtype == F16


def test_convert_fp16_keeps_ops_without_fp16_kernels():
    """A custom-domain op and a float Range stay float32; Range's integer-derived inputs stay float32 too."""
    text = """
    <ir_version: 8, opset_import: ["" : 18, "custom" : 1]>
    g (float[N] x, int64 n) => (float[N] y, float[M] r) {
      a = Relu(x)
      b = custom.Op(a)
      y = Neg(b)
      nf = Cast<to=1>(n)
      r = Range(start, nf, step)
    }"""
    inits = {"start": np.array(0.0, np.float32), "step": np.array(1.0, np.float32)}
    model = parse(text, inits)
    next(n for n in model.graph if n.op_type == "Op").outputs[0].dtype = F32    # as infer-shapes or value_info
    run_pass(model, "convert-fp16")
    assert dtypes(model, "Op") == ([F32], [F32])
    assert dtypes(model, "Range") == ([F32, F32, F32], [F32])
    assert dtypes(model, "Relu")[1] == [F16] and dtypes(model, "Neg")[1] == [F16]
    assert next(n for n in model.graph if n.op_type == "Cast" and n.inputs[0].name == "n"
                ).attributes["to"].value == int(F32)


def test_convert_fp16_subgraph_captures_stay_fp32():
    text = """
    g (float[4] x, bool c) => (float[4] y) {
      a = Relu(x)
      y = If(c) <then_branch = t () => (float[4] o) { o = Neg(a) },
                 else_branch = e () => (float[4] o) { o = Abs(a) }>
    }"""
    model = parse(text)
    run_pass(model, "convert-fp16")
    assert check_model(model) == []
    assert dtypes(model, "Relu")[1] == [F16] and dtypes(model, "If")[1] == [F32]
    fp16_close(parse(text), model, {"x": np.array([-1, 2, -3, 4], np.float32), "c": np.array(True)})


def test_convert_fp16_constant_nodes_and_constant_of_shape():
    """Nodes that create float32 values from attributes create float16 ones (default ConstantOfShape value too)."""
    text = """
    g (float[N, 4] x) => (float[N, 4] y) {
      s = Shape(x)
      z = ConstantOfShape(s)
      o = ConstantOfShape<value = float[1] {1.5}>(s)
      c = Constant<value_float = 1e9>()
      d = Constant<value_floats = [0.5, -1e9, 2.0, 3.0]>()
      a = Add(x, z)
      b = Mul(a, o)
      e = Min(b, c)
      y = Max(e, d)
    }"""
    model = parse(text)
    run_pass(model, "convert-fp16")
    assert check_model(model) == []
    for n in model.graph:
        if n.op_type in ("Constant", "ConstantOfShape"):
            assert list(n.attributes) == ["value"] and n.attributes["value"].value.dtype == F16
            assert n.outputs[0].dtype == F16
    consts = [n.attributes["value"].value.numpy() for n in model.graph if n.op_type == "Constant"]
    assert consts[0] == np.finfo(np.float16).max and consts[1][1] == np.finfo(np.float16).min
    fp16_close(parse(text), model)


def test_convert_fp16_one_value_in_two_graph_outputs():
    text = """
    g (float[N, 4] x) => (float[N, 4] y1, float[N, 4] y2) {
      a = Relu(x)
      y1 = Identity(a)
      y2 = Identity(a)
    }"""
    model = parse(text)
    run_pass(model, "remove-noops")
    model.graph.outputs[1] = model.graph.outputs[0]      # one value, two output slots
    before = ir.serde.serialize_model(model)
    run_pass(model, "convert-fp16")
    assert [v.name for v in model.graph.outputs] == [v.name for v in ir.serde.deserialize_model(before).graph.outputs]
    assert [v.dtype for v in model.graph.outputs] == [F32, F32] and check_model(model) == []


def test_convert_fp16_second_run_changes_nothing():
    for text, inits in ((ROTARY, {"inv_freq": INV_FREQ, "axis2": np.array([2])}), (NORM, NORM_INITS),
                        (MATMUL_RELU, {"w": W})):
        model = parse(text, inits)
        run_pass(model, "convert-fp16")
        assert_unchanged_by(model, "convert-fp16")


def test_convert_fp16_leaves_integer_graph_alone():
    check_before_after("""
    g (int64[N] x) => (int64[N] y) {
      y = Add(x, x)
    }""", CONVERT, None)


def test_convert_fp16_sets_fp16_tolerance_for_verification():
    """A 256-deep dot product drifts beyond float32 tolerance in float16: compile still verifies (float16)."""
    w = np.random.default_rng(6).standard_normal((256, 8)).astype(np.float32)
    proto = parse_proto("""
    g (float[N, 256] x) => (float[N, 8] y) {
      y = MatMul(x, w)
    }""", {"w": w})
    ctx = PassContext(level=3, target="cuda")
    cf.ConvertFp16().run(ir.serde.deserialize_model(proto), ctx)
    assert ctx.options["tolerance_dtype"] == "float16"
    ctx = PassContext(level=3, target="cuda", options={"tolerance_dtype": "bfloat16"})
    cf.ConvertFp16().run(ir.serde.deserialize_model(proto), ctx)
    assert ctx.options["tolerance_dtype"] == "bfloat16"
    report = onnxc.compile(proto, 3, "cuda", passes="convert-fp16").report
    checks = report["verification"]["scenarios"][0]["outputs"]
    assert report["verification"]["status"] == "passed" and checks[0]["rtol"] == 2e-2
    assert any("float16 tolerances" in n for n in report["notes"])
    assert checks[0]["max_rel"] > 1e-4                     # would have failed float32 tolerance


def test_convert_fp16_is_level_3_cuda_only():
    p = cf.ConvertFp16()
    assert (p.name, p.level, p.targets) == ("convert-fp16", 3, ("cuda",))


# ------------------------------------------------------------------------------------------------ fused ORT ops
def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


def test_convert_fp16_skip_simplified_layer_norm():
    """input/skip/gamma and output/sum become float16; mean and inv_std_var (type U) stay float32."""
    text = MS_HEADER + """
    g (float[B, S, 64] x, float[B, S, 64] skip) => (float[B, S, 64] y, float[B, S, 1] inv, float[B, S, 64] s) {
      y, mean, inv, s = com.microsoft.SkipSimplifiedLayerNormalization<epsilon: float = 1e-6>(x, skip, gamma)
    }"""
    inits = {"gamma": 1 + 0.1 * _rand(64)}
    model = parse(text, inits)
    run_pass(model, "convert-fp16")
    ins, outs = dtypes(model, "SkipSimplifiedLayerNormalization")
    assert ins == [F16, F16, F16] and outs[0] == outs[3] == F16 and outs[2] == F32 and outs[1] != F16
    node = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert node.attributes["epsilon"].value == pytest.approx(1e-6)
    assert [v.dtype for v in model.graph.outputs] == [F32, F32, F32]
    fp16_close(parse(text, inits), model, {"x": _rand(2, 3, 64), "skip": _rand(2, 3, 64, seed=1)})


def test_convert_fp16_simplified_and_skip_layer_norm():
    text = MS_HEADER + """
    g (float[B, S, 64] x, float[B, S, 64] skip) => (float[B, S, 64] y) {
      n, inv = SimplifiedLayerNormalization<axis: int = -1, epsilon: float = 1e-5>(x, gamma)
      y, m, i, s = com.microsoft.SkipLayerNormalization<epsilon: float = 1e-5>(n, skip, gamma, beta, bias)
    }"""
    inits = {"gamma": 1 + 0.1 * _rand(64), "beta": 0.1 * _rand(64, seed=2), "bias": 0.1 * _rand(64, seed=3)}
    model = parse(text, inits)
    run_pass(model, "convert-fp16")
    assert dtypes(model, "SimplifiedLayerNormalization")[0] == [F16, F16]
    assert dtypes(model, "SimplifiedLayerNormalization")[1][0] == F16
    assert dtypes(model, "SkipLayerNormalization")[0] == [F16] * 5
    fp16_close(parse(text, inits), model, {"x": _rand(2, 3, 64), "skip": _rand(2, 3, 64, seed=1)})


GQA = MS_HEADER + """
g (float[B, S, 64] q, float[B, S, 32] k, float[B, S, 32] v, float[B, 2, P, 16] pk, float[B, 2, P, 16] pv,
   int32[B] seqlens_k, int32 total) => (float[B, S, 64] y, float[B, 2, T, 16] ok, float[B, 2, T, 16] ov) {
  y, ok, ov = com.microsoft.GroupQueryAttention<num_heads: int = 4, kv_num_heads: int = 2, do_rotary: int = 1>(
      q, k, v, pk, pv, seqlens_k, total, cos, sin)
}"""


def _gqa_inputs() -> tuple[dict, dict]:
    angle = np.arange(32)[:, None] * (10000.0 ** (-np.arange(8) / 8))[None]
    inits = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}
    b, p = 2, 4
    feeds = {"q": _rand(b, 1, 64), "k": _rand(b, 1, 32, seed=1), "v": _rand(b, 1, 32, seed=2),
             "pk": _rand(b, 2, p, 16), "pv": _rand(b, 2, p, 16, seed=5), "seqlens_k": np.full(b, p, np.int32),
             "total": np.array(p + 1, np.int32)}
    return inits, feeds


@pytest.mark.parametrize("io_fp16", [False, True])
def test_convert_fp16_group_query_attention(io_fp16):
    """Query/key/value/past and the cos/sin caches become float16; seqlens_k and total_sequence_length stay int32."""
    inits, feeds = _gqa_inputs()
    model = parse(GQA, inits)
    run_pass(model, "convert-fp16", io_fp16=io_fp16)
    ins, outs = dtypes(model, "GroupQueryAttention")
    assert ins == [F16] * 5 + [ir.DataType.INT32] * 2 + [F16] * 2 and outs == [F16] * 3
    node = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert {k: a.value for k, a in node.attributes.items()} == {"num_heads": 4, "kv_num_heads": 2, "do_rotary": 1}
    assert [n.op_type for n in model.graph].count("Cast") == (0 if io_fp16 else 8)
    fp16_close(parse(GQA, inits), model, feeds, io_fp16=io_fp16)


def test_convert_fp16_matmul_nbits_scales_and_bias():
    """A, scales and bias become float16; B and packed uint8 zero points stay uint8; attributes unchanged."""
    b, scales, zp = quantize_rtn(_rand(64, 32), block_size=16, symmetric=False)
    text = MS_HEADER + """
    g (float[B, S, 64] a) => (float[B, S, 32] y) {
      y = com.microsoft.MatMulNBits<K: int = 64, N: int = 32, bits: int = 4, block_size: int = 16,
                                    accuracy_level: int = 4>(a, qb, scales, zp, , bias)
    }"""
    inits = {"qb": b, "scales": scales, "zp": zp, "bias": 0.1 * _rand(32)}
    model = parse(text, inits)
    run_pass(model, "convert-fp16")
    assert dtypes(model, "MatMulNBits") == ([F16, ir.DataType.UINT8, F16, ir.DataType.UINT8, None, F16], [F16])
    assert model.graph.initializers["qb"].const_value.numpy().tobytes() == b.tobytes()
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert node.attributes["accuracy_level"].value == 4 and node.attributes["block_size"].value == 16
    fp16_close(parse(text, inits), model, {"a": _rand(2, 3, 64)})


def test_convert_fp16_other_contrib_ops():
    """MultiHeadAttention, RotaryEmbedding, FastGelu, BiasGelu and Gelu run in float16 (ORT CPU casts where it has
    no float16 kernel); position_ids stay int64."""
    angle = np.arange(16)[:, None] * (10000.0 ** (-np.arange(8) / 8))[None]
    text = MS_HEADER + """
    g (float[B, S, 64] x, int64[B, S] pos) => (float[B, S, 64] y) {
      r = com.microsoft.RotaryEmbedding<num_heads: int = 4>(x, pos, cos, sin)
      a = com.microsoft.MultiHeadAttention<num_heads: int = 4>(r, x, x)
      g1 = com.microsoft.FastGelu(a, bias)
      g2 = com.microsoft.BiasGelu(g1, bias)
      y = com.microsoft.Gelu(g2)
    }"""
    inits = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32),
             "bias": 0.1 * _rand(64)}
    model = parse(text, inits)
    counts = run_pass(model, "convert-fp16").counts
    assert counts["convert-node"] == 5
    assert dtypes(model, "RotaryEmbedding") == ([F16, ir.DataType.INT64, F16, F16], [F16])
    for op in ("MultiHeadAttention", "FastGelu", "BiasGelu", "Gelu"):
        assert set(dtypes(model, op)[0] + dtypes(model, op)[1]) == {F16}, op
    fp16_close(parse(text, inits), model, {"x": _rand(2, 3, 64), "pos": np.array([[0, 1, 2], [4, 5, 6]])})


def test_convert_fp16_unlisted_contrib_op_stays_fp32():
    text = MS_HEADER + """
    g (float[B, 8] x) => (float[B, 8] y) {
      a = Relu(x)
      y = com.microsoft.QOrderedGelu(a)
    }"""
    model = parse(text)
    next(n for n in model.graph if n.op_type == "QOrderedGelu").outputs[0].dtype = F32
    run_pass(model, "convert-fp16")
    assert dtypes(model, "QOrderedGelu") == ([F32], [F32])
    assert cf.ORT_OPS.get(("com.microsoft", "QOrderedGelu"), "absent") == "absent"


# ------------------------------------------------------------------------------------------------ property
BIG = [-3.4e38, float(np.finfo(np.float32).min), -np.inf, -1e5]


@st.composite
def random_graph(draw) -> tuple[str, dict[str, np.ndarray]]:
    """Elementwise/MatMul/Softmax chains over two inputs with constants, including out-of-range ones used where
    their clamping cannot matter (masked Softmax, Min/Max bounds)."""
    dim = draw(st.sampled_from(["N", "2"]))
    pool, lines, inits = ["x", "z"], [], {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for k in range(draw(st.integers(1, 7))):
        a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        kind = draw(st.sampled_from(["bin", "const", "unary", "matmul", "softmax", "bound"]))
        out = f"v{k}"
        if kind == "bin":
            lines.append(f"{out} = {draw(st.sampled_from(['Add', 'Sub', 'Mul', 'Max']))}({a}, {b})")
        elif kind == "const":
            inits[f"c{k}"] = rng.standard_normal(draw(st.sampled_from([(1,), (4,), (2, 4)]))).astype(np.float32)
            args = (a, f"c{k}") if draw(st.booleans()) else (f"c{k}", a)
            lines.append(f"{out} = {draw(st.sampled_from(['Add', 'Mul', 'Sub']))}({args[0]}, {args[1]})")
        elif kind == "unary":
            lines.append(f"{out} = {draw(st.sampled_from(['Relu', 'Tanh', 'Sigmoid', 'Neg', 'Abs']))}({a})")
        elif kind == "matmul":
            inits[f"w{k}"] = (0.5 * rng.standard_normal((4, 4))).astype(np.float32)
            lines.append(f"{out} = MatMul({a}, w{k})")
        elif kind == "softmax":
            inits[f"m{k}"] = np.array([draw(st.sampled_from(BIG))], np.float32)
            lines += [f"t{k} = Where(mask, {a}, m{k})", f"{out} = Softmax<axis=-1>(t{k})"]
        else:
            inits[f"b{k}"] = np.array([draw(st.sampled_from([1e5, 3.4e38, np.inf]))], np.float32)
            lines.append(f"{out} = Min({a}, b{k})" if draw(st.booleans()) else f"n{k} = Neg(b{k})\n{out} = Max({a}, n{k})")
        pool.append(out)
    outs = [pool[-1]] + ([draw(st.sampled_from(pool[2:]))] if draw(st.booleans()) and len(pool) > 3 else [])
    outs = list(dict.fromkeys(outs))
    body = "\n".join(lines + [f"y{i} = Identity({o})" for i, o in enumerate(outs)])
    sig = ", ".join(f"float[{dim}, 4] y{i}" for i in range(len(outs)))
    return f"g (float[{dim}, 4] x, float[{dim}, 4] z, bool[{dim}, 4] mask) => ({sig}) {{\n{body}\n}}", inits


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graph(), io_fp16=st.booleans())
def test_convert_fp16_property_random_graphs(graph, io_fp16):
    text, inits = graph
    model = parse(text, inits)
    run_pass(model, "infer-shapes")
    run_pass(model, "convert-fp16", io_fp16=io_fp16)
    assert check_model(model) == []
    if not io_fp16:
        assert_valid(model, parse(text, inits))
    assert [v.dtype for v in model.graph.outputs] == [F16 if io_fp16 else F32] * len(model.graph.outputs)
    for n in model.graph:           # every float value inside runs in float16; Casts only at the graph boundary
        if n.op_type != "Cast":
            assert all(v.dtype == F16 for v in [*n.inputs, *n.outputs] if v is not None and v.dtype
                       and v.dtype.is_floating_point()), n
    for name, arr in inits.items():
        got = model.graph.initializers[name].const_value.numpy()
        assert got.dtype == np.float16 and np.array_equal(np.isinf(got), np.isinf(arr))
    assert_unchanged_by(model, "convert-fp16", io_fp16=io_fp16)
    feeds = random_feeds(parse_proto(text, inits), 0, {"N": 2})
    feeds["mask"][:, 0] = True                                     # no fully masked Softmax row
    fp16_close(parse(text, inits), model, feeds, io_fp16=io_fp16)


# ------------------------------------------------------------------------------------------------ fixtures
KEPT_FP32 = {"Cast", "Cos", "Sin", "Mul", "Concat", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal"}


def expected_casts(name: str) -> int:
    """Casts the pass inserts: 2 per unfused norm (x in, 1/rms out), cos and sin, every float I/O value."""
    if name.endswith("_fp16"):
        return 5                          # 1/rms back to float16 for the scaling Mul, 5 norms
    family, past = name.split("_")[0], name.endswith("_past")
    if family in ("gpt2", "bert"):
        return 1 + 8 * past               # LayerNormalization runs in float16 (float32 statistics inside)
    norms = 5 + 4 * (family == "qwen3")   # 2 layers x 2 + final; qwen3 adds q/k norms
    return 2 * norms + 2 + 1 + 8 * past


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: os.path.basename(p)[:-5])
def test_convert_fp16_fixture_compiles_and_verifies(path):
    name = os.path.basename(path)[:-5]
    result = onnxc.compile(path, 3, "cuda", passes=PIPELINE)
    report = result.report
    assert report["verification"]["status"] == "passed"
    assert all(o["rtol"] == 2e-2 for sc in report["verification"]["scenarios"] for o in sc["outputs"]
               if o["dtype"].startswith("float"))
    counts = report["rule_counts"]
    assert counts.get("convert-fp16:insert-cast") == expected_casts(name), counts
    model = ir.serde.deserialize_model(result.model)
    assert cast_pairs(model) == []
    f32 = {n.op_type for n in model.graph if any(o.dtype == F32 for o in n.outputs)}
    assert f32 <= KEPT_FP32, f32 - KEPT_FP32
    if name.split("_")[0] not in ("gpt2", "bert"):
        assert {"Cos", "Sin", "Pow", "ReduceMean"} <= f32
    heavy = [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Softmax", "LayerNormalization")]
    assert heavy and all(n.outputs[0].dtype == F16 for n in heavy)


@pytest.mark.parametrize("name", ["llama_dynamo_past", "gpt2_ts_past", "bert_ts"])
def test_convert_fp16_fixture_io_fp16(name):
    """With io_fp16 the float inputs/outputs (KV cache too) are float16 and no boundary Cast is left."""
    path = next(p for p in FIXTURES if os.path.basename(p) == f"{name}.onnx")
    reference = irio.load(path)
    model = PassManager(parse_pipeline(O1)).run(irio.load(path), PassContext())
    counts = cf.convert(model, io_fp16=True)
    model = PassManager(parse_pipeline(CLEANUP)).run(model, PassContext())
    assert "insert-cast" not in counts or counts["insert-cast"] == expected_casts(name) - (
        1 + 8 * name.endswith("_past"))
    floats = [v for v in [*model.graph.inputs, *model.graph.outputs] if v.dtype.is_floating_point()]
    assert floats and all(v.dtype == F16 for v in floats)
    for k, sc in enumerate(verify.scenarios_for(reference)):
        feeds = verify.make_inputs(reference, sc, k)
        fp16_close(reference, model, feeds, io_fp16=True)
