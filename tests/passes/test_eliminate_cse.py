"""eliminate-cse: nodes computing the same thing from the same inputs merge; with fold-constants, equal constants too."""
from __future__ import annotations

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
    run_pass,
    run_passes,
)
from hypothesis import given, settings
from hypothesis import strategies as st

CSE = counting("eliminate-cse", after=("eliminate-dead",))
FOLD_CSE = counting("eliminate-cse", before=("fold-constants",), after=("eliminate-dead",))


def test_eliminate_cse_merges_duplicate_nodes():
    _, counts = check_before_after("""
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Neg(x)
      b = Neg(x)
      y = Add(a, b)
    }""", CSE, """
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Neg(x)
      y = Add(a, a)
    }""")
    assert counts == {"merged": 1}


def test_eliminate_cse_merges_duplicate_chains_in_one_run():
    _, counts = check_before_after("""
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Neg(x)
      b = Exp(a)
      c = Neg(x)
      d = Exp(c)
      y = Sub(b, d)
    }""", CSE, """
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Neg(x)
      b = Exp(a)
      y = Sub(b, b)
    }""")
    assert counts == {"merged": 2}


@pytest.mark.parametrize("a, b", [
    ("Softmax<axis=0>(x)", "Softmax<axis=1>(x)"),      # attributes differ
    ("Neg(x)", "Neg(z)"),                              # inputs differ
    ("Sub(x, z)", "Sub(z, x)"),                        # operand order differs
    ("RandomNormalLike(x)", "RandomNormalLike(x)"),    # nondeterministic
])
def test_eliminate_cse_keeps_different_or_random_nodes(a, b):
    check_before_after(f"""
    g (float[2, 4] x, float[2, 4] z) => (float[2, 4] y) {{
      p = {a}
      q = {b}
      y = Add(p, q)
    }}""", CSE, None, numeric="Random" not in a)


def test_eliminate_cse_merges_equal_constant_nodes_itself():
    # Constant nodes with equal small values are merged directly, so the Unsqueezes become equal too.
    _, counts = check_before_after("""
    g (float[N, 4] x) => (float[1, N, 4] y) {
      c1 = Constant<value = int64[1] {0}>()
      c2 = Constant<value = int64[1] {0}>()
      u1 = Unsqueeze(x, c1)
      u2 = Unsqueeze(x, c2)
      y = Add(u1, u2)
    }""", CSE, """
    g (float[N, 4] x) => (float[1, N, 4] y) {
      c1 = Constant<value = int64[1] {0}>()
      u1 = Unsqueeze(x, c1)
      y = Add(u1, u1)
    }""")
    assert counts == {"merged": 2}


UNSQUEEZE_TWICE = """
g (float[N, 4] x) => (float[1, N, 4] y) {
  c1 = Constant<value_ints = [0]>()
  c2 = Constant<value = int64[1] {0}>()
  u1 = Unsqueeze(x, c1)
  u2 = Unsqueeze(x, c2)
  y = Add(u1, u2)
}"""


def test_eliminate_cse_alone_keeps_constants_written_differently():
    # value_ints=[0] and value=int64[1]{0} are different attributes: only their values are equal.
    check_before_after(UNSQUEEZE_TWICE, CSE, None)


def test_eliminate_cse_with_fold_constants_merges_equal_constants():
    _, counts = check_before_after(UNSQUEEZE_TWICE, FOLD_CSE, """
    g (float[N, 4] x) => (float[1, N, 4] y) <int64[1] c1 = {0}> {
      u1 = Unsqueeze(x, c1)
      y = Add(u1, u1)
    }""")
    assert counts == {"merged": 1}


def test_eliminate_cse_with_fold_constants_merges_constant_into_existing_initializer():
    _, counts = check_before_after("""
    g (float[N, 4] x) => (float[1, N, 4] y) <int64[1] axes = {0}> {
      c = Constant<value_ints = [0]>()
      u1 = Unsqueeze(x, axes)
      u2 = Unsqueeze(x, c)
      y = Add(u1, u2)
    }""", FOLD_CSE, """
    g (float[N, 4] x) => (float[1, N, 4] y) <int64[1] axes = {0}> {
      u1 = Unsqueeze(x, axes)
      y = Add(u1, u1)
    }""")
    assert counts == {"merged": 1}


def test_eliminate_cse_keeps_both_graph_outputs():
    model, _ = check_before_after("""
    g (float[N, 4] x) => (float[N, 4] y1, float[N, 4] y2) {
      y1 = Neg(x)
      y2 = Neg(x)
    }""", CSE, """
    g (float[N, 4] x) => (float[N, 4] y1, float[N, 4] y2) {
      y1 = Neg(x)
      y2 = Identity(y1)
    }""")
    assert [v.name for v in model.graph.outputs] == ["y1", "y2"]


def test_eliminate_cse_counts_merge_into_graph_outputs():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y1, float[N, 4] y2) {
      y1 = Neg(x)
      y2 = Neg(x)
    }""")
    result = run_pass(model, "eliminate-cse")
    assert result.modified
    assert result.counts == {"merged": 1}


# ------------------------------------------------------------------------------------------------ property
OPS = {"Neg": 1, "Exp": 1, "Tanh": 1, "Add": 2, "Mul": 2, "Sub": 2}


@st.composite
def dags_with_duplicates(draw):
    """A DAG over x where nodes may repeat earlier ones; returns how many distinct computations it has."""
    lines, values, key_of = [], ["x"], {"x": ("x",)}
    distinct = set()
    for i in range(draw(st.integers(2, 12))):
        op = draw(st.sampled_from(sorted(OPS)))
        args = [draw(st.sampled_from(values)) for _ in range(OPS[op])]
        if draw(st.booleans()) and len(lines):     # repeat an earlier line verbatim, on a new name
            line = draw(st.sampled_from(lines))
            op, args = line.split(" = ")[1].split("(")[0], line.split("(")[1].rstrip(")").split(", ")
        name = f"v{i}"
        lines.append(f"{name} = {op}({', '.join(args)})")
        key_of[name] = (op, *(key_of[a] for a in args))
        distinct.add(key_of[name])
        values.append(name)
    lines.append(f"y = Concat<axis=0>({', '.join(values[1:])})")
    text = f"g (float[2, 3] x) => (float[{2 * (len(values) - 1)}, 3] y) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, len(distinct)


@settings(max_examples=40, deadline=None)
@given(dags_with_duplicates())
def test_eliminate_cse_property(case):
    text, distinct = case
    proto = parse_proto(text)
    model = ir.serde.deserialize_model(proto)
    result = run_pass(model, "eliminate-cse")
    n_before = len(proto.graph.node)
    assert sum(1 for _ in model.graph) == distinct + 1          # + the Concat
    assert result.modified == (distinct + 1 < n_before)
    assert result.counts == ({"merged": n_before - distinct - 1} if result.modified else {})
    assert_valid(model, proto)
    assert_same_outputs(proto, model, seeds=(0,))
    assert_unchanged_by(model, "eliminate-cse")
    run_passes(model, ("fold-constants", "remove-noops", "eliminate-dead"))
    assert_unchanged_by(model, "eliminate-cse")
