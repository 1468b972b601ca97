"""fold-constants: constant evaluation, shape arithmetic (static and symbolic), lifting and interning, limits."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    counting,
    parse,
    parse_proto,
    run_ort,
    run_pass,
    run_passes,
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.passes.fold_constants import DEFAULT_LIMIT_BYTES
from onnxc.shapes import SYM_KEY

FOLD = counting("fold-constants", before=("infer-shapes",), after=("eliminate-dead",))


def values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    out = {v.name: v for v in model.graph.inputs}
    out.update(model.graph.initializers)
    for n in model.graph:
        out.update({v.name: v for v in n.outputs})
    return out


# ------------------------------------------------------------------------------------------------ shape arithmetic
SHAPE_CHAIN = """
g (float[DIMS] x) => (float[DIMS] y) <int64 i0 = {0}, int64 i1 = {1}, int64[1] ax = {0}, int64[1] last = {8}> {
  a = Neg(x)
  s = Shape(a)
  d0 = Gather(s, i0)
  d1 = Gather(s, i1)
  u0 = Unsqueeze(d0, ax)
  u1 = Unsqueeze(d1, ax)
  t = Concat<axis=0>(u0, u1, last)
  b = Reshape(a, t)
  y = Abs(b)
}"""


def test_fold_constants_static_shape_chain():
    _, counts = check_before_after(SHAPE_CHAIN.replace("DIMS", "2, 3, 8"), FOLD, """
    g (float[2, 3, 8] x) => (float[2, 3, 8] y) <int64[3] t = {2, 3, 8}> {
      a = Neg(x)
      b = Reshape(a, t)
      y = Abs(b)
    }""")
    assert counts == {"Shape": 1, "Gather": 2, "Unsqueeze": 2, "Concat": 1}


def contents(v: ir.Value) -> tuple:
    """What a small int value holds: its constant's elements, or the symbolic elements fold-constants recorded."""
    if v.producer() is None and v.const_value is not None:
        return tuple(v.const_value.numpy().reshape(-1).tolist())
    return v.meta[SYM_KEY]


def test_fold_constants_symbolic_shape_chain_is_recorded_and_merged():
    # Gather(s, 1) is static and folds; the Concat rebuilds exactly Shape(a), so its uses move to s.
    model, counts = check_before_after(SHAPE_CHAIN.replace("DIMS", "N, 3, 8"), FOLD, """
    g (float[N, 3, 8] x) => (float[N, 3, 8] y) {
      a = Neg(x)
      s = Shape(a)
      b = Reshape(a, s)
      y = Abs(b)
    }""", dims={"N": 2})
    assert counts == {"Gather-symbolic": 1, "Unsqueeze": 1, "merge-symbolic": 1}
    s = values_by_name(model)["s"]
    assert s.meta[SYM_KEY] == ("N", 3, 8)


def test_fold_constants_symbolic_values_are_recorded():
    model = parse(SHAPE_CHAIN.replace("DIMS", "N, 3, 8"))
    run_pass(model, "infer-shapes")
    run_pass(model, "fold-constants")
    v = values_by_name(model)
    assert v["d0"].meta[SYM_KEY] == ("N",)
    assert v["u0"].meta[SYM_KEY] == ("N",)
    assert v["t"].meta[SYM_KEY] == ("N", 3, 8)
    assert SYM_KEY not in v["b"].meta


def test_fold_constants_fully_symbolic_shape_chain_is_kept():
    proto = parse_proto("""
    g (float[N, S] x) => (float[S, N] y) <int64 i0 = {0}, int64 i1 = {1}, int64[1] ax = {0}> {
      s = Shape(x)
      d0 = Gather(s, i0)
      d1 = Gather(s, i1)
      u0 = Unsqueeze(d0, ax)
      u1 = Unsqueeze(d1, ax)
      t = Concat<axis=0>(u1, u0)
      y = Reshape(x, t)
    }""")
    model = ir.serde.deserialize_model(proto)
    run_pass(model, "infer-shapes")
    before = to_bytes(model)
    result = run_pass(model, "fold-constants")
    assert not result.modified and result.counts == {}
    assert to_bytes(model) == before
    assert values_by_name(model)["t"].meta[SYM_KEY] == ("S", "N")
    assert_unchanged_by(model, "fold-constants")


def test_fold_constants_unknown_dims_are_tokens_equal_only_to_themselves():
    model = parse("""
    g (float[N, 4] x, float[M, 4] z) => (float[N, 4] y, float[M, 4] w) {
      a = Relu(x)
      s = Shape(a)
      y = Neg(a)
      b = Relu(z)
      r = Shape(b)
      w = Neg(b)
    }""")
    for n in model.graph:  # forget the symbols: only "some dim" is known
        if n.op_type == "Relu":
            n.outputs[0].shape = ir.Shape([None, 4])
    result = run_pass(model, "fold-constants")
    assert "merge-symbolic" not in result.counts  # unknown dims are never assumed equal
    v = values_by_name(model)
    s, r = v["s"].meta[SYM_KEY], v["r"].meta[SYM_KEY]
    assert s[1] == 4 and not isinstance(s[0], (int, str))
    assert s[0] != r[0]
    run_pass(model, "fold-constants")
    assert v["s"].meta[SYM_KEY][0] == s[0]  # stable across runs


@pytest.mark.parametrize("start, end, want", [(None, None, ("B", "S", 8)), (1, None, ("S", 8)), (-1, None, (8,)),
                                              (0, 1, ("B",))])
def test_fold_constants_shape_start_end(start, end, want):
    attrs = ", ".join(f"{k}={v}" for k, v in (("start", start), ("end", end)) if v is not None)
    model = parse(f"""
    g (float[B, S, 8] x) => (float[B, S, 8] y) {{
      s = Shape{'<' + attrs + '>' if attrs else ''}(x)
      y = Neg(x)
    }}""")
    run_pass(model, "fold-constants")
    s = values_by_name(model).get("s") or model.graph.initializers["s"]
    assert contents(s) == want
    assert (s.producer() is None) == all(isinstance(d, int) for d in want)


def test_fold_constants_static_element_of_symbolic_shape():
    _, counts = check_before_after("""
    g (float[N, 8] x) => (float[N, 8] y) <int64 i1 = {1}> {
      s = Shape(x)
      d = Gather(s, i1)
      c = Cast<to=1>(d)
      y = Div(x, c)
    }""", FOLD, """
    g (float[N, 8] x) => (float[N, 8] y) <float c = {8.0}> {
      y = Div(x, c)
    }""")
    assert counts == {"Gather-symbolic": 1, "Cast": 1}


@pytest.mark.parametrize("slice_inputs, want", [
    ("s, st, en", (4, 5)),
    ("s, st, en, ax", (4, 5)),
    ('s, st, en, ax, ""', (4, 5)),
    ("s, zero, st", ("N",)),
    ("s, big, neg, ax, step", (5, 4, "N")),
])
def test_fold_constants_symbolic_slice(slice_inputs, want):
    model = parse(f"""
    g (float[N, 4, 5] x) => (float[N, 4, 5] y, int64[A] o) <int64[1] st = {{1}}, int64[1] en = {{9223372036854775807}},
        int64[1] ax = {{0}}, int64[1] zero = {{0}}, int64[1] big = {{-1}}, int64[1] neg = {{-9223372036854775807}},
        int64[1] step = {{-1}}> {{
      s = Shape(x)
      t = Slice({slice_inputs})
      y = Neg(x)
      o = Identity(t)
    }}""")
    run_pass(model, "fold-constants")
    assert contents(list(model.graph)[-1].inputs[0]) == want


@pytest.mark.parametrize("expr, want", [
    ("Add(s, zeros)", ("N", 4)),
    ("Sub(s, s)", (0, 0)),
    ("Mul(s, ones)", ("N", 4)),
    ("Div(s, ones)", ("N", 4)),
    ("Max(s, s)", ("N", 4)),
    ("Mul(s, twos)", None),             # 2 * N: unknown, but 2 * 4 is known
    ("Where(mask, s, ones)", ("N", 1)),
])
def test_fold_constants_symbolic_arithmetic(expr, want):
    proto = parse_proto(f"""
    g (float[N, 4] x) => (float[N, 4] y, int64[2] o) <int64[2] zeros = {{0, 0}}, int64[2] ones = {{1, 1}},
                                           int64[2] twos = {{2, 2}}, bool[2] mask = {{1, 0}}> {{
      s = Shape(x)
      t = {expr}
      y = Neg(x)
      o = Identity(t)
    }}""")
    model = ir.serde.deserialize_model(proto)
    run_pass(model, "infer-shapes")
    run_pass(model, "fold-constants")
    got = contents(list(model.graph)[-1].inputs[0])
    assert_same_outputs(proto, model, dims={"N": 2})
    if want is None:
        assert got[1] == 8 and not isinstance(got[0], (int, str))
    else:
        assert got == want


def test_fold_constants_exporter_expand_target():
    # Expand(x, Where(Equal(t, -1), 1, t)): the mask is known (a dim is never -1), the target is t itself.
    _, counts = check_before_after("""
    g (float[N, 1, 4] x) => (float[N, 3, 4] y) <int64 i0 = {0}, int64[1] ax = {0}, int64[2] rest = {3, 4},
                                               int64[3] m1 = {-1, -1, -1}, int64[3] one = {1, 1, 1}> {
      s = Shape(x)
      d = Gather(s, i0)
      u = Unsqueeze(d, ax)
      t = Concat<axis=0>(u, rest)
      e = Equal(t, m1)
      w = Where(e, one, t)
      y = Expand(x, w)
    }""", FOLD, """
    g (float[N, 1, 4] x) => (float[N, 3, 4] y) <int64 i0 = {0}, int64[1] ax = {0}, int64[2] rest = {3, 4}> {
      s = Shape(x)
      d = Gather(s, i0)
      u = Unsqueeze(d, ax)
      t = Concat<axis=0>(u, rest)
      y = Expand(x, t)
    }""", dims={"N": 2})
    assert counts == {"Equal-symbolic": 1, "merge-symbolic": 1}


def test_fold_constants_merges_equal_symbolic_values():
    _, counts = check_before_after("""
    g (float[N, 4] x, float[N, 4] z) => (float[N, 4] y) {
      s1 = Shape(x)
      s2 = Shape(x)
      s3 = Shape(z)
      a = Reshape(x, s1)
      b = Reshape(a, s2)
      c = Reshape(z, s3)
      y = Add(b, c)
    }""", FOLD, """
    g (float[N, 4] x, float[N, 4] z) => (float[N, 4] y) {
      s1 = Shape(x)
      a = Reshape(x, s1)
      b = Reshape(a, s1)
      c = Reshape(z, s1)
      y = Add(b, c)
    }""", dims={"N": 2})
    assert counts == {"merge-symbolic": 2}   # the same dim name means the same size


def test_fold_constants_second_run_after_merge_changes_nothing():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y) {
      s1 = Shape(x)
      s2 = Shape(x)
      a = Reshape(x, s1)
      y = Reshape(a, s2)
    }""")
    assert run_pass(model, "fold-constants").counts == {"merge-symbolic": 1}
    assert_unchanged_by(model, "fold-constants")


def test_fold_constants_equal_of_negated_dim():
    # -N == -1 holds for N == 1.
    proto = parse_proto("""
    g (float[N, 4] x) => (float[N, 4] y) <int64 i0 = {0}, int64 m1 = {-1}> {
      s = Shape(x)
      n = Gather(s, i0)
      neg = Mul(n, m1)
      e = Equal(neg, m1)
      a = Neg(x)
      y = Where(e, a, x)
    }""")
    model = ir.serde.deserialize_model(proto)
    FOLD(model)
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims={"N": 1})


def test_fold_constants_symbolic_equal_without_inferred_types():
    proto = parse_proto("""
    g (float[N, 4] x) => (float[N, 4] y) <int64[2] m1 = {-1, -1}, int64[2] one = {1, 1}> {
      s = Shape(x)
      e = Equal(s, m1)
      t = Where(e, one, s)
      y = Expand(x, t)
    }""")
    model = ir.serde.deserialize_model(proto)
    run_pass(model, "fold-constants")          # no infer-shapes: e has no declared type
    assert model.graph.initializers["e"].dtype == ir.DataType.BOOL
    assert_same_outputs(proto, model, dims={"N": 2})


# ------------------------------------------------------------------------------------------------ constants
def test_fold_constants_lifts_and_interns_small_constants():
    model = parse("""
    g (float[N, 4] x) => (float[1, 1, 1, N, 4] y) <int64[1] existing = {0}> {
      c1 = Constant<value = int64[1] {0}>()
      c2 = Constant<value_ints = [0]>()
      c3 = Constant<value = int64[1] {1}>()
      a = Unsqueeze(x, existing)
      b = Unsqueeze(a, c1)
      c = Unsqueeze(b, c2)
      d = Unsqueeze(c, c3)
      y = Squeeze(d, c3)
    }""")
    result = run_pass(model, "fold-constants")
    assert result.counts == {"lift-constant": 3}
    assert [n.op_type for n in model.graph] == ["Unsqueeze"] * 4 + ["Squeeze"]
    zero = model.graph.initializers["existing"]
    unsq = list(model.graph)
    assert unsq[1].inputs[1] is zero and unsq[2].inputs[1] is zero
    assert unsq[3].inputs[1] is unsq[4].inputs[1]
    assert unsq[3].inputs[1].const_value.numpy().tolist() == [1]
    assert sorted(model.graph.initializers) == ["c3", "existing"]
    assert_valid(model)


def test_fold_constants_does_not_intern_across_dtypes_or_large_tensors():
    big = ", ".join(["1"] * 65)
    model = parse(f"""
    g () => (y, z) {{
      a = Constant<value = int64[1] {{1}}>()
      b = Constant<value = int32[1] {{1}}>()
      c = Constant<value = float[65] {{{big}}}>()
      d = Constant<value = float[65] {{{big}}}>()
      y = Concat<axis=0>(c, d)
      z = Sum(a, a)
      w = Identity(b)
    }}""")
    run_pass(model, "fold-constants")
    inits = model.graph.initializers
    assert sorted(inits) == ["a", "b", "c", "d"]
    assert inits["a"].dtype == ir.DataType.INT64 and inits["b"].dtype == ir.DataType.INT32


def test_fold_constants_never_folds_graph_outputs():
    check_before_after("""
    g (float[2] x) => (float[2] y, float[2] k) <float[2] a = {1, 2}, float[2] b = {3, 4}> {
      y = Add(a, b)
      k = Constant<value = float[2] {5, 6}>()
    }""", "fold-constants", None)


def test_fold_constants_folds_into_graph_output_producer():
    _, counts = check_before_after("""
    g (float[2] x) => (float[2] y) <float[2] a = {1, 2}, float[2] b = {3, 4}> {
      s = Add(a, b)
      m = Mul(s, s)
      y = Sub(x, m)
    }""", FOLD, """
    g (float[2] x) => (float[2] y) <float[2] m = {16, 36}> {
      y = Sub(x, m)
    }""")
    assert counts == {"Add": 1, "Mul": 1}


def test_fold_constants_skips_nondeterministic_and_custom_ops():
    check_before_after("""<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
    g (float[2] x) => (float[2] y) <float[2] a = {1, 2}> {
      r = RandomNormalLike(a)
      g = com.microsoft.FastGelu(a)
      s = Add(r, g)
      y = Mul(x, s)
    }""", "fold-constants", None, numeric=False)


@pytest.mark.parametrize("op", ["Mod(a, b)", "BitShift<direction=\"LEFT\">(u, v)"])
def test_fold_constants_uses_reference_for_other_ops(op):
    _, counts = check_before_after(f"""
    g () => (y) <int64[3] a = {{-7, 7, -8}}, int64[3] b = {{2, -2, 3}}, uint8[2] u = {{1, 3}}, uint8[2] v = {{2, 1}}> {{
      r = {op}
      y = Identity(r)
    }}""", FOLD, """
    g () => (y) <int64[3] r = {1, -1, 1}> {
      y = Identity(r)
    }""" if op.startswith("Mod") else """
    g () => (y) <uint8[2] r = {4, 6}> {
      y = Identity(r)
    }""")
    assert counts == {op.split("(")[0].split("<")[0]: 1}


def test_fold_constants_multi_output_op():
    _, counts = check_before_after("""
    g (int64[5] x) => (int64[5] y) <int64[5] a = {1, 2, 3, 4, 5}, int64[2] sp = {2, 3}> {
      p, q = Split<axis=0>(a, sp)
      c = Concat<axis=0>(q, p)
      y = Add(x, c)
    }""", FOLD, """
    g (int64[5] x) => (int64[5] y) <int64[5] c = {3, 4, 5, 1, 2}> {
      y = Add(x, c)
    }""")
    assert counts == {"Split": 1, "Concat": 1}


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_fold_constants_integer_div_truncates_toward_zero(dtype):
    _, counts = check_before_after(f"""
    g ({dtype}[4] x) => ({dtype}[4] y) <{dtype}[4] a = {{-7, 7, -8, 9}}, {dtype}[4] b = {{2, -2, 3, 3}}> {{
      q = Div(a, b)
      y = Add(x, q)
    }}""", FOLD, f"""
    g ({dtype}[4] x) => ({dtype}[4] y) <{dtype}[4] q = {{-3, -3, -2, 3}}> {{
      y = Add(x, q)
    }}""")
    assert counts == {"Div": 1}


# ------------------------------------------------------------------------------------------------ limits
def test_fold_constants_respects_size_limit():
    text = """
    g (float[64] x) => (float[64] y) <float[64] a = {VALUES}, float[64] b = {VALUES}> {
      s = Add(a, b)
      y = Mul(x, s)
    }""".replace("VALUES", ", ".join(["1"] * 64))
    model = parse(text)
    assert run_pass(model, "fold-constants", fold_limit_bytes=256).counts == {}  # 512 input bytes
    model = parse(text)
    assert run_pass(model, "fold-constants").counts == {"Add": 1}


def test_fold_constants_refuses_huge_constant_of_shape():
    before = parse_proto("""
    g (float[1000, 1000] x) => (float[1000, 1000] y) <int64[2] shape = {1000, 1000}> {
      z = ConstantOfShape(shape)
      y = Add(x, z)
    }""")
    model = ir.serde.deserialize_model(before)
    assert DEFAULT_LIMIT_BYTES < 1000 * 1000 * 4
    assert run_pass(model, "fold-constants").counts == {}
    assert run_pass(model, "fold-constants", fold_limit_bytes=16 << 20).counts == {"ConstantOfShape": 1}


def test_fold_constants_transpose_and_cast_of_large_initializer_are_lazy(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    before = parse_proto("""
    g (float[N, 16] x, float16[16, 8] x16) => (float[N, 8] y, float16[16, 8] m, float[N, 8] z) {
      wt = Transpose<perm=[1, 0]>(w)
      y = MatMul(x, wt)
      wh = Cast<to=10>(wt)
      m = Add(x16, wh)
      wn = Neg(wt)
      z = MatMul(x, wn)
    }""", {"w": w})
    model = ir.serde.deserialize_model(before)
    counts = run_pass(model, "fold-constants", fold_limit_bytes=64).counts
    assert counts == {"Transpose-lazy": 1, "Cast-lazy": 1}
    inits = model.graph.initializers
    assert isinstance(inits["wt"].const_value, ir.LazyTensor)
    assert isinstance(inits["wh"].const_value, ir.LazyTensor)
    assert inits["wt"].shape == ir.Shape([16, 8]) and inits["wh"].dtype == ir.DataType.FLOAT16
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Neg", "MatMul"]  # Neg is not lazy
    np.testing.assert_array_equal(inits["wh"].const_value.numpy(), w.T.astype(np.float16))
    path = tmp_path / "lazy.onnx"
    ir.save(model, path)
    assert_same_outputs(before, ir.load(path), dims={"N": 3})


# ------------------------------------------------------------------------------------------------ properties
BINARY = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater", "Pow"]
UNARY = ["Neg", "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil", "Identity"]
DTYPES = {"int64": np.int64, "int32": np.int32, "float": np.float32, "float16": np.float16}


@st.composite
def constant_expressions(draw):
    """One op over constant initializers (dtypes, broadcasting, negative integer division), seen through Identity."""
    dtype = draw(st.sampled_from(list(DTYPES)))
    np_dtype = DTYPES[dtype]
    kind = draw(st.sampled_from(["binary", "unary", "shape-op"]))
    if kind == "unary" and dtype.startswith("int"):
        kind = "binary"
    shape_a = draw(st.sampled_from([[], [3], [2, 3]]))
    shape_b = draw(st.sampled_from([[], [3], [1, 3], [2, 3]]))
    low = 1 if kind == "unary" else -9
    a = np.array(draw(st.lists(st.integers(low, 9), min_size=int(np.prod(shape_a)), max_size=int(np.prod(shape_a)))),
                 dtype=np_dtype).reshape(shape_a)
    b = np.array(draw(st.lists(st.integers(-9, 9).filter(lambda v: v != 0),
                               min_size=int(np.prod(shape_b)), max_size=int(np.prod(shape_b)))),
                 dtype=np_dtype).reshape(shape_b)
    inits = {"a": a, "b": b}
    if kind == "binary":
        op = draw(st.sampled_from(BINARY))
        if op == "Pow":
            inits["b"] = np.abs(b) % 3
        expr = f"r = {op}(a, b)"
    elif kind == "unary":
        expr = f"r = {draw(st.sampled_from(UNARY))}(a)"
    else:
        expr = draw(st.sampled_from([
            "r = Concat<axis=0>(a2, a2)", "r = Unsqueeze(a, ax)", "r = Transpose(a2)", "r = Cast<to=1>(a)",
            "r = Expand(a, sh)", "r = Gather<axis=1>(a2, idx)", "r = Slice(a2, st, en, ax1)", "r = Reshape(a2, flat)",
            "r = Where(cond, a2, b2)", "r = Max(a2, b2, a2)", "r = Squeeze(a1)", "r = Tile(a2, reps)",
        ]))
        inits.update({
            "a2": np.arange(6, dtype=np_dtype).reshape(2, 3) - 2, "b2": np.arange(6, dtype=np_dtype)[::-1].reshape(2, 3),
            "a1": np.arange(3, dtype=np_dtype).reshape(1, 3), "ax": np.array([0], np.int64),
            "ax1": np.array([1], np.int64), "sh": np.array([2, 1, 1], np.int64), "idx": np.array([2, 0], np.int64),
            "st": np.array([-2], np.int64), "en": np.array([3], np.int64), "flat": np.array([-1], np.int64),
            "cond": np.array([[True, False, True], [False, True, False]]), "reps": np.array([1, 2], np.int64),
        })
    # `r` reaches the output through Identity (a graph output is never folded itself).
    text = f"g (float[2] x) => (r_out, float[2] x_out) {{\n  {expr}\n  r_out = Identity(r)\n  x_out = Neg(x)\n}}"
    return text, inits


@settings(max_examples=40, deadline=None)
@given(constant_expressions())
def test_fold_constants_property_matches_onnxruntime(case):
    text, inits = case
    proto = parse_proto(text, inits)
    model = ir.serde.deserialize_model(proto)
    run_pass(model, "infer-shapes")
    result = run_pass(model, "fold-constants")
    assert result.modified
    assert [n.op_type for n in model.graph] == ["Identity", "Neg"]
    folded = next(iter(model.graph)).inputs[0].const_value.numpy()
    (expected,) = run_ort(proto, {"x": np.zeros(2, np.float32)})[:1]
    assert folded.dtype == expected.dtype and folded.shape == expected.shape
    np.testing.assert_allclose(folded.astype(np.float64), expected.astype(np.float64), rtol=1e-3 if
                               folded.dtype == np.float16 else 1e-6)
    assert_valid(model, proto)
    assert_unchanged_by(model, "fold-constants")


@st.composite
def shape_programs(draw):
    """Shape(x) -> Gather(indices) -> Concat(..., constant): fold when static, else record symbolically."""
    rank = draw(st.integers(1, 4))
    dims = [draw(st.sampled_from([2, 3, 5, f"D{i}"])) for i in range(rank)]
    picks = draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=4))
    tail = draw(st.lists(st.integers(-1, 7), max_size=2))
    dims_text = ", ".join(str(d) for d in dims)
    lines = ["s = Shape(a)", "g = Gather(s, idx)"]
    inits = {"idx": np.array(picks, np.int64)}
    if tail:
        inits["tail"] = np.array(tail, np.int64)
        lines.append("t = Concat<axis=0>(g, tail)")
    else:
        lines.append("t = Identity(g)")
    lines.append("c = Cast<to=1>(t)")
    text = (f"g (float[{dims_text}] x) => (float[{dims_text}] y, float[{len(picks) + len(tail)}] z) {{\n"
            "  a = Neg(x)\n  " + "\n  ".join(lines) + "\n  y = Abs(a)\n  z = Neg(c)\n}")
    want = tuple(dims[p] for p in picks) + tuple(tail)
    return text, inits, want, all(isinstance(d, int) for d in dims)


@settings(max_examples=30, deadline=None)
@given(shape_programs())
def test_fold_constants_property_shape_programs(case):
    text, inits, want, all_static = case
    proto = parse_proto(text, inits)
    model = ir.serde.deserialize_model(proto)
    run_passes(model, ("infer-shapes", "fold-constants"))
    z_input = list(model.graph)[-1].inputs[0]
    if all(isinstance(d, int) for d in want):      # every picked dim is static: folded to a constant
        assert z_input.const_value.numpy().tolist() == [float(d) for d in want]
    else:
        assert z_input.producer().op_type == "Cast"
        assert values_by_name(model)["t"].meta[SYM_KEY] == want
    if all_static:
        assert [n.op_type for n in model.graph] == ["Neg", "Abs", "Neg"]
    assert_valid(model, proto)
    dims = {f"D{i}": 4 + i for i in range(4)}
    assert_same_outputs(proto, model, dims=dims, seeds=(0,))
    run_pass(model, "eliminate-dead")   # values merged into equal earlier ones leave their nodes dead
    assert_unchanged_by(model, "fold-constants")


@st.composite
def symbolic_programs(draw):
    """Shape-vector arithmetic over Shape(x) with static and symbolic dims, observed through a graph output."""
    rank = draw(st.integers(2, 3))
    dims = [draw(st.sampled_from([1, 3, "N", "M"])) for _ in range(rank)]
    lines, inits, length = ["s = Shape(x)"], {}, rank
    current = "s"
    if draw(st.booleans()):   # the exporter idiom Where(Equal(shape, c), 1, shape) on raw dims
        inits["cmp"] = np.array(draw(st.lists(st.sampled_from([-1, 0, 1, 3]), min_size=rank, max_size=rank)), np.int64)
        inits["ones"] = np.ones(rank, np.int64)
        lines += ["e = Equal(s, cmp)", "w = Where(e, ones, s)"]
        current = "w"
    for k in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["Add", "Sub", "Mul", "Div", "Max", "Min", "Gather", "Concat", "Slice"]))
        name = f"v{k}"
        if kind in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
            low = 1 if kind == "Div" else 0
            inits[f"c{k}"] = np.array(draw(st.lists(st.integers(low, 3), min_size=length, max_size=length)), np.int64)
            args = [current, f"c{k}"]
            if kind not in ("Sub", "Div") and draw(st.booleans()):
                args.reverse()
            lines.append(f"{name} = {kind}({args[0]}, {args[1]})")
        elif kind == "Gather":
            idx = draw(st.lists(st.integers(-length, length - 1), min_size=1, max_size=3))
            inits[f"i{k}"] = np.array(idx, np.int64)
            lines.append(f"{name} = Gather({current}, i{k})")
            length = len(idx)
        elif kind == "Concat":
            extra = draw(st.lists(st.integers(0, 5), min_size=1, max_size=2))
            inits[f"c{k}"] = np.array(extra, np.int64)
            lines.append(f"{name} = Concat<axis=0>({current}, c{k}, {current})")
            length = 2 * length + len(extra)
        else:
            start = draw(st.integers(-length, length - 1))
            inits[f"b{k}"], inits[f"e{k}"] = np.array([start], np.int64), np.array([length], np.int64)
            lines.append(f"{name} = Slice({current}, b{k}, e{k})")
            length = length - (start % length)
        current = name
    lines.append(f"o = Identity({current})")
    dims_text = ", ".join(map(str, dims))
    text = f"g (float[{dims_text}] x) => (int64[{length}] o) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, inits


@settings(max_examples=40, deadline=None)
@given(symbolic_programs())
def test_fold_constants_property_symbolic_programs_match_onnxruntime(case):
    text, inits = case
    proto = parse_proto(text, inits)
    model = ir.serde.deserialize_model(proto)
    run_passes(model, ("infer-shapes", "fold-constants"))
    assert_valid(model, proto)
    for n, m in ((1, 1), (2, 5), (4, 3)):
        assert_same_outputs(proto, model, dims={"N": n, "M": m}, seeds=(0,))
    run_pass(model, "eliminate-dead")
    assert_unchanged_by(model, "fold-constants")
