"""eliminate-dead: unused nodes, initializers and trailing outputs go; graph inputs and outputs stay."""
from __future__ import annotations

import onnx_ir as ir
import pytest
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    parse,
    parse_proto,
    run_pass,
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def test_eliminate_dead_removes_unused_chain():
    _, counts = check_before_after("""
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Neg(x)
      b = Relu(a)
      c = Abs(b)
      d = Sin(c)
      y = Exp(a)
    }""", "eliminate-dead", """
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Neg(x)
      y = Exp(a)
    }""")
    assert counts == {"nodes": 3}


def test_eliminate_dead_removes_unused_initializers_only():
    model, counts = check_before_after("""
    g (float[N, 4] x, float[4] b) => (float[N, 4] y) <float[4] w = {1, 2, 3, 4}, float[4] unused = {5, 6, 7, 8},
                                                     float[4] b = {0, 0, 0, 0}> {
      y = Add(x, w)
    }""", "eliminate-dead", """
    g (float[N, 4] x, float[4] b) => (float[N, 4] y) <float[4] w = {1, 2, 3, 4}, float[4] b = {0, 0, 0, 0}> {
      y = Add(x, w)
    }""")
    assert counts == {"initializers": 1}
    assert sorted(model.graph.initializers) == ["b", "w"]   # b is a graph input: it stays


def test_eliminate_dead_removes_node_feeding_only_dead_nodes_and_its_initializer():
    _, counts = check_before_after("""
    g (float[N, 4] x) => (float[N, 4] y) <float[4] w = {1, 2, 3, 4}> {
      a = Mul(x, w)
      b = Neg(a)
      y = Relu(x)
    }""", "eliminate-dead", """
    g (float[N, 4] x) => (float[N, 4] y) {
      y = Relu(x)
    }""")
    assert counts == {"nodes": 2, "initializers": 1}


def test_eliminate_dead_keeps_graph_outputs_and_unused_inputs():
    check_before_after("""
    g (float[N, 4] x, float[N, 4] unused) => (float[N, 4] y, float[N, 4] z) {
      y = Neg(x)
      z = Relu(y)
    }""", "eliminate-dead", None)


def test_eliminate_dead_keeps_node_with_one_used_output():
    model, counts = check_before_after("""
    g (float[N, 4] x) => (float[N, 2] y) {
      p, q = Split<num_outputs=2, axis=1>(x)
      y = Neg(p)
    }""", "eliminate-dead", None)
    assert counts == {}
    assert len(next(iter(model.graph)).outputs) == 2   # q is not trailing-dropped: Split needs both


def test_eliminate_dead_drops_unused_trailing_optional_output():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y) {
      b, mask = Dropout(x)
      y = Relu(b)
    }""")
    run_pass(model, "eliminate-dead")
    assert len(next(iter(model.graph)).outputs) == 1
    assert_valid(model)


def test_eliminate_dead_reports_dropped_trailing_output():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y) {
      b, mask = Dropout(x)
      y = Relu(b)
    }""")
    before = to_bytes(model)
    result = run_pass(model, "eliminate-dead")
    assert to_bytes(model) != before
    assert result.modified


def test_eliminate_dead_second_run_changes_nothing():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y) <float[4] w = {1, 2, 3, 4}> {
      a = Mul(x, w)
      b = Neg(a)
      y = Relu(x)
    }""")
    assert run_pass(model, "eliminate-dead").modified
    assert_unchanged_by(model, "eliminate-dead")


# ------------------------------------------------------------------------------------------------ property
UNARY = ["Neg", "Relu", "Abs", "Sin", "Tanh"]
BINARY = ["Add", "Mul", "Sub", "Max"]


@st.composite
def dags(draw):
    """A random DAG over x; some values feed graph outputs, the rest is dead. Returns the live node count."""
    n = draw(st.integers(1, 12))
    lines, values, deps = [], ["x"], {"x": set()}
    for i in range(n):
        name = f"v{i}"
        if draw(st.booleans()) and len(values) > 1:
            op = draw(st.sampled_from(BINARY))
            a, b = draw(st.sampled_from(values)), draw(st.sampled_from(values))
            lines.append(f"{name} = {op}({a}, {b})")
            deps[name] = {name} | deps[a] | deps[b]
        else:
            a = draw(st.sampled_from(values))
            lines.append(f"{name} = {draw(st.sampled_from(UNARY))}({a})")
            deps[name] = {name} | deps[a]
        values.append(name)
    outs = draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=3, unique=True))
    live = set().union(*(deps[o] for o in outs))
    out_names = [f"y{k}" for k in range(len(outs))]
    lines += [f"{y} = Identity({o})" for y, o in zip(out_names, outs)]
    decl = ", ".join(f"float[N, 3] {y}" for y in out_names)
    text = f"g (float[N, 3] x) => ({decl}) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, n - len(live)


@settings(max_examples=40, deadline=None)
@given(dags())
def test_eliminate_dead_property(case):
    text, dead = case
    proto = parse_proto(text)
    model = ir.serde.deserialize_model(proto)
    result = run_pass(model, "eliminate-dead")
    assert result.counts == ({"nodes": dead} if dead else {})
    assert result.modified == bool(dead)
    assert sum(1 for _ in model.graph) == len(proto.graph.node) - dead
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims={"N": 2}, seeds=(0,))
    assert_unchanged_by(model, "eliminate-dead")
