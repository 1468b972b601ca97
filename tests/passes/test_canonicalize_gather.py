"""canonicalize-gather: advanced indexing written as Transpose/GatherND/Transpose becomes one Gather on the axis it
selects from; shared intermediates stay for their other readers; the numbers never change."""
from __future__ import annotations

import itertools

import numpy as np
from helpers import assert_same_outputs, assert_unchanged_by, assert_valid, check_before_after, op_types, parse, \
    parse_proto, run_passes
from hypothesis import given, settings
from hypothesis import strategies as st

PASSES = ["infer-shapes", "canonicalize-gather", "eliminate-dead"]

# t[..., [-2], :] on (B, S, 6, 16) as the dynamo exporter writes it (Falcon's multi-query K): the heads axis moved
# first, GatherND of rows, moved back; the result is BNSH (B, 1, S, 16)
FALCON_K = """
g (float[B, S, 6, 16] x) => (float[B, 1, S, 16] k) {
  t = Transpose<perm=[2, 0, 1, 3]>(x)
  r = GatherND(t, idx)
  k = Transpose<perm=[1, 0, 2, 3]>(r)
}"""


def test_falcon_k_becomes_a_gather_on_the_heads_axis():
    check_before_after(FALCON_K, PASSES, """
    g (float[B, S, 6, 16] x) => (float[B, 1, S, 16] k) {
      y = Gather<axis=2>(x, rows)
      k = Transpose<perm=[0, 2, 1, 3]>(y)
    }""", initializers={"idx": np.array([[-2]], np.int64)}, expected_initializers={"rows": np.array([-2], np.int64)},
                       dims={"B": 2, "S": 3})


def test_a_shared_inner_transpose_stays_for_its_other_reader():
    """K and V read one Transpose: both become Gathers, and the Transpose goes only when nothing reads it."""
    text = """
    g (float[B, S, 6, 16] x) => (float[B, 1, S, 16] k, float[B, 1, S, 16] v, int64[4] s) {
      t = Transpose<perm=[2, 0, 1, 3]>(x)
      rk = GatherND(t, ik)
      k = Transpose<perm=[1, 0, 2, 3]>(rk)
      rv = GatherND(t, iv)
      v = Transpose<perm=[1, 0, 2, 3]>(rv)
      s = Shape(rv)
    }"""
    inits = {"ik": np.array([[-2]], np.int64), "iv": np.array([[-1]], np.int64)}
    model = parse(text, inits)
    counts = run_passes(model, PASSES)
    assert counts.get("gathernd-rows") == 2 and counts.get("gather-through-transposes") == 2, counts
    ops = op_types(model)
    assert "GatherND" not in ops and ops.count("Gather") == 3, ops   # the Shape still reads V's first Gather
    assert_valid(model, parse_proto(text, inits))
    assert_same_outputs(parse_proto(text, inits), model, dims={"B": 2, "S": 3})
    assert_unchanged_by(model, "canonicalize-gather")


def test_gathernd_with_batch_dims_or_deeper_indices_is_left():
    for text, idx in (
        ("r = GatherND<batch_dims=1>(x, idx)", np.zeros((2, 1), np.int64)),
        ("r = GatherND(x, idx)", np.zeros((1, 2), np.int64)),       # (m, 2): elements, not rows
    ):
        model = parse(f"""
        g (float[2, 3, 4] x) => (float[N] r) {{
          {text}
        }}""", {"idx": idx})
        counts = run_passes(model, ["infer-shapes", "canonicalize-gather"])
        assert not counts.get("gathernd-rows"), (text, counts)


def test_a_scalar_index_is_left():
    """A scalar index drops the axis: the transposes no longer line up with x's axes, so the rule does not fire."""
    model = parse("""
    g (float[B, S, 6, 16] x) => (float[S, B, 16] k) {
      t = Transpose<perm=[2, 0, 1, 3]>(x)
      r = Gather<axis=0>(t, i)
      k = Transpose<perm=[1, 0, 2]>(r)
    }""", {"i": np.array(3, np.int64)})
    counts = run_passes(model, ["infer-shapes", "canonicalize-gather"])
    assert not counts.get("gather-through-transposes"), counts


PERMS = list(itertools.permutations(range(4)))


@settings(max_examples=40, deadline=None)
@given(p=st.sampled_from(PERMS), q=st.sampled_from(PERMS), axis=st.integers(-4, 3),
       picks=st.lists(st.integers(-3, 2), min_size=1, max_size=3), nd=st.booleans())
def test_property_every_perm_and_axis_agrees(p, q, axis, picks, nd):
    """Any inner and outer perm, any Gather axis (or GatherND rows, axis 0), any 1-D pick with negatives and
    repeats: the rewrite fires, the outputs are the same, and a second run changes nothing."""
    x_dims = [2, 3, 3, 4]              # every axis at least 2 long, so picks in [-2, 1] stay in range everywhere
    t_dims = [x_dims[k] for k in p]
    a = 0 if nd else axis % 4
    picks = [i % t_dims[a] - (t_dims[a] if i < 0 else 0) for i in picks]
    g_dims = t_dims[:a] + [len(picks)] + t_dims[a + 1:]
    out_dims = [g_dims[k] for k in q]
    gather = "GatherND(t, idx)" if nd else f"Gather<axis={axis}>(t, idx)"
    idx = np.array(picks, np.int64).reshape(-1, 1) if nd else np.array(picks, np.int64)
    text = f"""
    g (float[{', '.join(map(str, x_dims))}] x) => (float[{', '.join(map(str, out_dims))}] y) {{
      t = Transpose<perm=[{', '.join(map(str, p))}]>(x)
      r = {gather}
      y = Transpose<perm=[{', '.join(map(str, q))}]>(r)
    }}"""
    proto = parse_proto(text, {"idx": idx})
    model = parse(text, {"idx": idx})
    counts = run_passes(model, PASSES)
    assert counts.get("gather-through-transposes") == 1, counts
    assert "GatherND" not in op_types(model) and op_types(model).count("Transpose") <= 1
    assert_valid(model, proto)
    assert_same_outputs(proto, model)
    assert_unchanged_by(model, "canonicalize-gather")
