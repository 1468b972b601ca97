"""onnxc.shapes: where an element of a shape vector was read from, and proofs that two dims are equal."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import parse, run_passes
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.shapes import dims_of, reshape_input_dims, reshape_target, same_dim, shape_source, sym_value

CONSTS = {"zero": np.array([0], np.int64), "one": np.array(1, np.int64), "m1": np.array([-1], np.int64),
          "m2": np.array(-2, np.int64), "big": np.array([1 << 40], np.int64), "k": np.array([7], np.int64),
          "two": np.array([2], np.int64)}


def values(text: str, inits: dict | None = None, prep=("infer-shapes",)) -> dict:
    model = parse(text, {**CONSTS, **(inits or {})})
    run_passes(model, prep)
    found = {v.name: v for v in model.graph.inputs}
    found.update({o.name: o for n in model.graph for o in n.outputs})
    return found


SHAPES = """
g (float[B, S, H, D] x) => (int64[4] t) {
  sx = Shape(x)
  tail = Shape<start=-2>(x)
  b = Gather<axis=0>(sx, zero)
  s = Gather<axis=0>(sx, one)
  h = Gather<axis=0>(sx, m2)
  su = Unsqueeze(s, zero)
  hc = Cast<to=6>(h)
  hl = Cast<to=7>(hc)
  hu = Unsqueeze(hl, zero)
  sl = Slice(sx, one, big, zero)
  t = Concat<axis=0>(b, su, hu, k)
  hf = Cast<to=1>(h)
}"""


@pytest.mark.parametrize("name, i, want", [
    ("sx", 2, 2), ("tail", 1, 3), ("b", 0, 0), ("s", 0, 1), ("h", 0, 2), ("su", 0, 1), ("hu", 0, 2), ("sl", 0, 1),
    ("sl", 2, 3), ("t", 0, 0), ("t", 1, 1), ("t", 2, 2),
])
def test_shape_source_reads_through_shape_arithmetic(name, i, want):
    v = values(SHAPES)
    src = shape_source(v[name], i)
    assert src is not None and src[0] is v["x"] and src[1] == want


@pytest.mark.parametrize("name, i", [("t", 3), ("hf", 0), ("k", 0), ("x", 0), ("sx", -1)])
def test_shape_source_refuses_what_is_not_a_dim(name, i):
    # a constant element, a float cast, a graph input, a negative index
    v = values(SHAPES)
    assert shape_source(v.get(name), i) is None


DIMS = """
g (float[B, S, 8] x, float[M, S, 8] z, float[1, S, 8] one_row) => (float[B, S, 8] y) <float[X0, 2, S, 4] t> {
  r = Reshape(x, heads)
  t = Transpose<perm=[0, 2, 1, 3]>(r)
  st = Shape(t)
  b0 = Gather<axis=0>(st, zero)
  s0 = Gather<axis=0>(st, two)
  mt = Concat<axis=0>(b0, s0, m1)
  u = Transpose<perm=[0, 2, 1, 3]>(t)
  m = Reshape(u, mt)
  p = Add(m, one_row)
  q = Add(x, z)
  y = Relu(p)
}"""


def test_same_dim_through_transpose_and_reshape():
    v = values(DIMS, {"heads": np.array([0, 0, 2, 4], np.int64)})
    assert str(v["t"].shape[0]) == "X0"                 # a fresh name: only the producers tie it to x
    assert same_dim(v["y"], 0, v["x"], 0)              # Relu, Add with a (1, S, 8) row, Reshape, Transposes
    assert same_dim(v["t"], 2, v["x"], 1)              # the transposed sequence axis
    assert same_dim(v["m"], 1, v["x"], 1)
    assert not same_dim(v["t"], 1, v["x"], 1)          # heads, not sequence


def test_same_dim_refuses_broadcast_of_unrelated_dims():
    v = values(DIMS, {"heads": np.array([0, 0, 2, 4], np.int64)})
    assert not same_dim(v["z"], 0, v["x"], 0)          # M and B: either may be 1
    assert not same_dim(v["q"], 0, v["x"], 0)          # their broadcast, named afresh
    assert same_dim(v["q"], 1, v["x"], 1)              # S is S


def test_same_dim_through_concat_off_its_axis():
    # partial rotary as TorchScript writes it: [rotated | passed] concatenated on the last axis, dims named afresh
    v = values("""
    g (float[B, S, 4, 8] x) => (float[P, Q, 4, 8] y, float[B, S, 4, 12] w) {
      a, b = Split<axis=-1, num_outputs=2>(x)
      r = Neg(a)
      y = Concat<axis=-1>(r, b)
      w = Concat<axis=-1>(x, a)
    }""")
    assert str(v["y"].shape[0]) == "P"                 # declared afresh: only the producers tie it to x
    assert same_dim(v["y"], 0, v["x"], 0) and same_dim(v["y"], 1, v["x"], 1)
    assert same_dim(v["w"], 2, v["x"], 2)
    assert not same_dim(v["w"], 3, v["x"], 3)          # the concatenation axis: a sum, not a copy


def test_same_dim_through_onnx_attention():
    # opset 23's Attention keeps the query's leading dims (here named afresh by a declared value info)
    v = values("""<ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S, 8] q, float[B, T, 8] key, float[B, T, 8] val) => (float[B, S, 8] z) <float[X0, X1, 8] a> {
      a = Attention<q_num_heads=2, kv_num_heads=2>(q, key, val)
      r = Relu(a)
      z = Identity(r)
    }""")
    assert [str(d) for d in v["r"].shape] == ["X0", "X1", "8"]
    assert same_dim(v["r"], 0, v["q"], 0) and same_dim(v["r"], 1, v["q"], 1)
    assert not same_dim(v["r"], 1, v["key"], 1)        # S, not the keys' T


def split_heads(heads: int, head_dim: int, between: str = "h = Relu(x)", batch: str = "x") -> str:
    """x (B, S, heads*head_dim) -> h, named afresh (X0, X1) -> Reshape(h, (B, S, -1, head_dim)) with B and S read
    from `batch`'s shape."""
    return f"""
    g (float[B, S, {heads * head_dim}] x, float[M, S, {heads * head_dim}] z) => (float[B, S, {heads}, {head_dim}] y)
      <float[X0, X1, {heads * head_dim}] h> {{
      {between}
      sb = Shape({batch})
      b = Gather<axis=0>(sb, z0)
      s = Gather<axis=0>(sb, one)
      bu = Unsqueeze(b, zero)
      su = Unsqueeze(s, zero)
      t = Concat<axis=0>(bu, su, m1, hd)
      y = Reshape(h, t)
    }}"""


def test_reshape_input_dims_names_fresh_dims_after_the_target():
    v = values(split_heads(2, 4), {"hd": np.array([4], np.int64), "z0": np.array(0, np.int64)}, prep=("infer-shapes", "fold-constants"))
    h, t = v["h"], v["t"]
    assert dims_of(h) == ("X0", "X1", 8) and sym_value(t) == ("B", "S", -1, 4)
    assert reshape_target(dims_of(h), sym_value(t)) is None            # X0, X1 do not cancel B, S by name
    assert reshape_input_dims(h, t) == ("B", "S", 8)
    assert reshape_target(reshape_input_dims(h, t), sym_value(t)) == ("B", "S", 2, 4)


def test_reshape_input_dims_refuses_an_unrelated_batch():
    # B read from z's (M, S, ...): M is not provably X0, so batch stays unresolved and -1 with it; S is proven
    v = values(split_heads(2, 4, batch="z"), {"hd": np.array([4], np.int64), "z0": np.array(0, np.int64)}, prep=("infer-shapes", "fold-constants"))
    h, t = v["h"], v["t"]
    assert sym_value(t) == ("M", "S", -1, 4)
    assert reshape_input_dims(h, t) == ("X0", "S", 8)
    assert reshape_target(reshape_input_dims(h, t), sym_value(t)) is None


@settings(max_examples=15, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.sampled_from([2, 4, 8]),
       between=st.sampled_from(["h = Relu(x)", "h = Add(x, x)", "xr = Sigmoid(x)\n h = Mul(x, xr)",
                                "h = MatMul(x, w)"]))
def test_reshape_input_dims_property(heads, head_dim, between):
    n = heads * head_dim
    inits = {"hd": np.array([head_dim], np.int64), "z0": np.array(0, np.int64), "w": np.ones((n, n), np.float32)}
    v = values(split_heads(heads, head_dim, between), inits, prep=("infer-shapes", "fold-constants"))
    h, t = v["h"], v["t"]
    assert reshape_target(reshape_input_dims(h, t), sym_value(t)) == ("B", "S", heads, head_dim)
