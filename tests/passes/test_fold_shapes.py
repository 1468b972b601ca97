"""fold-shapes: Shape of a derived value becomes Shape of the values its dims come from (structure, numbers,
refusals, property)."""
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
    run_passes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.passes.fold_shapes import shape_fold
from onnxc.rules import explain

FOLD = counting("fold-shapes", before=("infer-shapes",), after=("eliminate-dead",))
TABLE = {"table": np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)}


def test_fold_shapes_gather_reads_the_ids():
    model, counts = check_before_after("""
    g (int64[N, S] ids) => (int64[3] y) <float[10, 8] table> {
      e = Gather(table, ids)
      y = Shape(e)
    }""", FOLD, """
    g (int64[N, S] ids) => (int64[3] y) <int64[1] c = {8}> {
      s = Shape(ids)
      y = Concat<axis=0>(s, c)
    }""", initializers=TABLE, numeric=False)
    assert counts == {"fold-shape-of-derived": 1}
    ids = np.array([[1, 2, 3], [4, 5, 9]], np.int64)
    np.testing.assert_array_equal(run_ort(model, {"ids": ids})[0], [2, 3, 8])


def test_fold_shapes_norm_of_broadcast_add_reads_the_full_operand():
    # Shape(LayerNorm(x + pos)) with pos (1, S, 8): every dim is x's, the static 8 continues the run.
    _, counts = check_before_after("""
    g (float[N, S, 8] x, float[1, S, 8] pos) => (int64[3] y, float[N, S, 8] z) <float[8] w, float[8] b> {
      a = Add(pos, x)
      z = LayerNormalization<axis=-1>(a, w, b)
      y = Shape(z)
    }""", FOLD, """
    g (float[N, S, 8] x, float[1, S, 8] pos) => (int64[3] y, float[N, S, 8] z) <float[8] w, float[8] b> {
      a = Add(pos, x)
      z = LayerNormalization<axis=-1>(a, w, b)
      y = Shape(x)
    }""", initializers={"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)},
        expected_initializers={"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}, dims={"N": 2, "S": 3})
    assert counts == {"fold-shape-of-derived": 2}


def test_fold_shapes_start_end_slice_the_pieces():
    _, counts = check_before_after("""
    g (int64[N, S] ids) => (int64[2] y) <float[10, 8] table> {
      e = Gather(table, ids)
      y = Shape<start=1>(e)
    }""", FOLD, """
    g (int64[N, S] ids) => (int64[2] y) <int64[1] c = {8}> {
      s = Shape<start=1>(ids)
      y = Concat<axis=0>(s, c)
    }""", initializers=TABLE, numeric=False)
    assert counts == {"fold-shape-of-derived": 1}


def test_fold_shapes_slices_a_shape_below_opset_15():
    """Shape has no start/end before opset 15: a partial run (dims 0-1 of x) is Slice(Shape(x)) there."""
    text = """
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[N, S, 8] x, float[N, S, 8] h) => (int64[4] y) {
      s0 = Shape(x)
      s = Slice(s0, zero, two)
      t = Concat<axis=0>(s, k)
      r = Reshape(h, t)
      n = Neg(r)
      y = Shape(n)
    }"""
    inits = {"zero": np.array([0], np.int64), "two": np.array([2], np.int64), "k": np.array([2, 4], np.int64)}
    model = parse(text, inits)
    counts = run_passes(model, ["infer-shapes", "fold-constants", "fold-shapes", "eliminate-dead"])
    assert counts.get("fold-shape-of-derived", 0) >= 1
    y = model.graph.outputs[0].producer()
    assert y.op_type == "Concat" and y.inputs[0].producer().op_type == "Slice"
    assert not any(n.op_type == "Shape" and ("start" in n.attributes or "end" in n.attributes) for n in model.graph)
    assert_valid(model, parse_proto(text, inits))
    feeds = {"x": np.zeros((2, 3, 8), np.float32), "h": np.zeros((2, 3, 8), np.float32)}
    np.testing.assert_array_equal(run_ort(model, feeds)[0], [2, 3, 2, 4])


def test_fold_shapes_reshape_target_read_from_another_shape():
    # Reshape(h, Concat(Shape(x)[0:2], [2, 4])): dims 0 and 1 are x's, so Shape of the result reads x.
    check_before_after("""
    g (float[N, S, 8] x, float[N, S, 8] h) => (int64[4] y) <int64[2] k = {2, 4}> {
      s = Shape<end=2>(x)
      t = Concat<axis=0>(s, k)
      r = Reshape(h, t)
      n = Neg(r)
      y = Shape(n)
    }""", FOLD, """
    g (float[N, S, 8] x, float[N, S, 8] h) => (int64[4] y) <int64[2] k = {2, 4}> {
      s = Shape<end=2>(x)
      y = Concat<axis=0>(s, k)
    }""", expected_initializers={"k": np.array([2, 4], np.int64)}, dims={"N": 2, "S": 3})


def test_fold_shapes_refuses_an_unproven_broadcast():
    text = """
    g (float[N, S, 8] x, float[M, S, 8] z) => (int64[3] y) {
      a = Add(x, z)
      y = Shape(a)
    }"""
    model = parse(text)
    run_passes(model, ["infer-shapes"])
    rows = [r for _, r in explain(model, shape_fold)]
    assert any("dim 0" in r and "is not provably a dim of an earlier value" in r for r in rows), rows
    assert_unchanged_by(model, "fold-shapes")


def test_fold_shapes_refuses_a_graph_input():
    model = parse("g (float[N, 8] x) => (int64[2] y) { y = Shape(x) }")
    run_passes(model, ["infer-shapes"])
    assert any("producer is unknown" in r for _, r in explain(model, shape_fold))


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.sampled_from(["Relu", "Neg", "LN", "AddRow", "AddOne", "Cast"]), min_size=1, max_size=4),
       swap=st.booleans(), static=st.booleans(), fp16=st.booleans(), extra=st.booleans(),
       start=st.sampled_from([None, 0, 1, -1, -2]), end=st.sampled_from([None, 2, -1, 3]))
def test_fold_shapes_property(ops, swap, static, fp16, extra, start, end):
    """Chains of shape-keeping ops: the fold leaves no Shape of a computed value, the result agrees on ORT."""
    t = "float16" if fp16 else "float"
    n, s = ("2", "3") if static else ("N", "S")
    lines, cur = [], "x"
    for k, o in enumerate(ops):
        out = f"v{k}"
        if o == "LN":
            lines.append(f"{out} = LayerNormalization<axis=-1>({cur}, w, b)")
        elif o in ("AddRow", "AddOne"):
            other = "row" if o == "AddRow" else "one"
            a, b = (other, cur) if swap else (cur, other)
            lines.append(f"{out} = Add({a}, {b})")
        elif o == "Cast":
            lines.append(f"{out} = Cast<to={10 if fp16 else 1}>({cur})")
        else:
            lines.append(f"{out} = {o}({cur})")
        cur = out
    attrs = ", ".join(f"{k}={v}" for k, v in (("start", start), ("end", end)) if v is not None)
    lines.append(f"y = Shape{'<' + attrs + '>' if attrs else ''}({cur})")
    outs = f"int64[_] y" + (f", {t}[{n}, {s}, 8] z" if extra else "")
    if extra:
        lines.append(f"z = Identity({cur})")
    text = f"""
    g ({t}[{n}, {s}, 8] x, {t}[1, {s}, 8] one) => ({outs}) <{t}[8] row, {t}[8] w, {t}[8] b> {{
      {chr(10).join(lines)}
    }}"""
    dt = np.float16 if fp16 else np.float32
    inits = {"row": np.arange(8, dtype=dt), "w": np.ones(8, dt), "b": np.zeros(8, dt)}
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = FOLD(model)
    assert counts.get("fold-shape-of-derived", 0) >= 1
    assert all(n.inputs[0].producer() is None for n in model.graph if n.op_type == "Shape")
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims={"N": 2, "S": 3})
    assert_unchanged_by(model, "fold-shapes")


# --------------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("name, fused", [("phi3_ts", {"GroupQueryAttention": 2}),
                                         ("bert_ts", {"Attention": 2, "EmbedLayerNormalization": 1})])
def test_fold_shapes_fixture_in_cleanup_keeps_fusions(name, fused, tmp_path):
    # In the cleanup, TorchScript shape reads fold to the graph inputs; layer 1's head split then has fresh batch
    # and sequence names on its input and the graph input's in its target, which `reshape_input_dims` reconciles.
    from collections import Counter
    from pathlib import Path

    import onnxc
    from onnxc.pipeline import CLEANUP, O2
    assert "fold-shapes" in CLEANUP
    src = Path(__file__).resolve().parents[2] / "fixtures" / "models" / f"{name}.onnx"
    res = onnxc.compile(src, level=2, output=tmp_path / "out.onnx", passes=O2)
    c = Counter(n.op_type for n in res.model.graph.node)
    assert {k: c[k] for k in fused} == fused, res.report["notes"]
    assert res.report["verification"]["status"] == "passed"
    assert sum(r["counts"].get("fold-shape-of-derived", 0) for r in res.report["passes"]) > 0
