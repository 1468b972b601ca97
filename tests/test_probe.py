"""The subgraph evaluator (onnxc.probe): data vs shape-only reads, stand-ins for shape-only weights, refusals."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import parse
from onnxc import probe
from onnxc.probe import ProbeError

MASK = """
g (float[B, S, 4] x, int64[B, T] mask) => (float[B, 1, 1, T] bias) {
  m4 = Unsqueeze(mask, ax)
  mf = Cast <to = 1> (m4)
  hid = Sub(one, mf)
  b0 = Mul(hid, neg)
  batch = Shape <end = 1> (x)
  target = Concat <axis = 0> (batch, ones)
  bias = Reshape(b0, target)
}"""
MASK_INITS = {"ax": np.array([1, 2], np.int64), "one": np.array(1.0, np.float32),
              "neg": np.array(-1e4, np.float32), "ones": np.array([1, 1, -1], np.int64)}
# y's data needs the table's data; s needs only the table's shape.
TABLE = """
g (int64[B, S] ids) => (float[B, S, D] y, int64[3] s) {
  e = Gather(W, ids)
  y = Identity(e)
  e2 = Gather(W, ids)
  s = Shape(e2)
}"""


def lazy_table(model: ir.Model, rows: int, cols: int, load=None) -> list[int]:
    """Make initializer W a lazy (rows, cols) float table; returns a list that counts loads."""
    loads: list[int] = []

    def read():
        loads.append(1)
        if load is None:
            raise AssertionError("the probe read the table's data")
        return ir.tensor(load)

    w = model.graph.initializers["W"]
    w.const_value = ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=ir.Shape([rows, cols]))
    w.shape = ir.Shape([rows, cols])
    return loads


def out(model: ir.Model, name: str) -> ir.Value:
    return next(v for v in model.graph.outputs if v.name == name)


def test_probe_tells_data_reads_from_shape_only_reads():
    model = parse(MASK, MASK_INITS)
    x, mask = model.graph.inputs
    c = probe.cone(model.graph, [out(model, "bias")])
    assert c.data_inputs == [mask]
    assert {v.name for v in c.inputs} == {"x", "mask"}
    assert id(x) in c.shape_only and id(mask) not in c.shape_only
    assert [n.op_type for n in c.nodes] == [n.op_type for n in model.graph]    # graph order


def test_probe_evaluates_the_cone():
    model = parse(MASK, MASK_INITS)
    mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], np.int64)
    (bias,) = probe.evaluate(model.graph, [out(model, "bias")], {
        "x": np.zeros((2, 3, 4), np.float32), "mask": mask, "unused": np.zeros(1)})
    np.testing.assert_array_equal(bias, ((1 - mask) * -1e4).astype(np.float32)[:, None, None, :])


def test_probe_reads_the_operands_of_shape_producing_inputs_for_their_data():
    """Shape(Reshape(x, t)) reads x's shape and t's data; Shape(NonZero(x)) depends on x's data."""
    model = parse("""
    g (float[N] x, int64[2] t) => (int64[2] s, int64[2] z) {
      r = Reshape(x, t)
      s = Shape(r)
      nz = NonZero(x)
      z = Shape(nz)
    }""")
    x, t = model.graph.inputs
    reshape = probe.cone(model.graph, [out(model, "s")])
    assert reshape.data_inputs == [t] and id(x) in reshape.shape_only
    assert probe.cone(model.graph, [out(model, "z")]).data_inputs == [x]
    both = probe.cone(model.graph, [out(model, "s"), out(model, "z")])
    assert {v.name for v in both.data_inputs} == {"x", "t"} and id(x) not in both.shape_only


def test_probe_stands_in_zeros_for_a_large_weight_read_only_for_its_shape():
    """An 8 MiB table read only through Shape is never loaded: ConstantOfShape zeros stand in for it."""
    model = parse(TABLE, {"W": np.zeros((2, 2), np.float32)})
    loads = lazy_table(model, 1 << 16, 32)
    c = probe.cone(model.graph, [out(model, "s")])
    assert c.data_bytes == 0 and id(model.graph.initializers["W"]) in c.shape_only
    (s,) = probe.evaluate(model.graph, [out(model, "s")], {"ids": np.zeros((2, 3), np.int64)})
    np.testing.assert_array_equal(s, [2, 3, 32])
    assert not loads


def test_probe_evaluates_only_the_shape_of_a_value_whose_data_needs_a_large_weight():
    """shapes=True: y's data needs the table, its shape does not, so y's shape is evaluated without loading it."""
    model = parse(TABLE, {"W": np.zeros((2, 2), np.float32)})
    loads = lazy_table(model, 1 << 16, 32)
    y = out(model, "y")
    assert probe.cone(model.graph, [y], shapes=True).data_bytes == 0
    assert probe.cone(model.graph, [y]).data_bytes > 0
    (s,) = probe.evaluate(model.graph, [y], {"ids": np.zeros((2, 7), np.int64)}, shapes=True)
    np.testing.assert_array_equal(s, [2, 7, 32])
    assert not loads


def test_probe_copies_a_small_weight_read_only_for_its_shape():
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = parse(TABLE, {"W": table})
    c = probe.cone(model.graph, [out(model, "s")])
    assert c.data_bytes == table.nbytes
    (s,) = probe.evaluate(model.graph, [out(model, "s")], {"ids": np.zeros((1, 5), np.int64)})
    np.testing.assert_array_equal(s, [1, 5, 4])


def test_probe_refuses_more_than_4_mib_of_weight_data():
    model = parse(TABLE, {"W": np.zeros((2, 2), np.float32)})
    loads = lazy_table(model, (probe.MAX_DATA_BYTES // 128) + 1, 32)
    with pytest.raises(ProbeError, match=r"reads \d+ bytes of constants for their data"):
        probe.evaluate(model.graph, [out(model, "y")], {"ids": np.zeros((2, 3), np.int64)})
    assert not loads


def test_probe_evaluates_weight_data_up_to_4_mib():
    table = np.random.default_rng(0).standard_normal((probe.MAX_DATA_BYTES // 128, 32)).astype(np.float32)
    model = parse(TABLE, {"W": np.zeros((2, 2), np.float32)})
    loads = lazy_table(model, *table.shape, load=table)
    ids = np.array([[0, 5, table.shape[0] - 1]], np.int64)
    y, s = probe.evaluate(model.graph, [out(model, "y"), out(model, "s")], {"ids": ids})
    np.testing.assert_array_equal(y, table[ids])
    np.testing.assert_array_equal(s, [1, 3, 32])
    assert loads


IF = """
g (bool c, float[2] x) => (float[2] y) {
  y = If (c) <then_branch: graph = t () => (float[2] a) { a = Identity(x) },
              else_branch: graph = e () => (float[2] b) { b = Neg(x) }>
}"""


def test_probe_refuses_a_cone_holding_a_subgraph():
    model = parse(IF)
    with pytest.raises(ProbeError, match="subgraph"):
        probe.evaluate(model.graph, [out(model, "y")], {"c": np.array(True), "x": np.ones(2, np.float32)})


def test_probe_refuses_a_value_computed_inside_a_subgraph():
    model = parse(IF)
    then_branch = next(iter(model.graph)).attributes["then_branch"].value
    inner = next(iter(then_branch)).outputs[0]
    with pytest.raises(ProbeError, match="subgraph or outer-scope"):
        probe.cone(model.graph, [inner])


def test_probe_refuses_a_cone_over_the_node_cap():
    body = "\n".join(f"  v{i + 1} = Neg(v{i})" for i in range(probe.MAX_NODES + 1))
    model = parse(f"g (float[2] v0) => (float[2] v{probe.MAX_NODES + 1}) {{\n{body}\n}}")
    last = model.graph.outputs[0]
    with pytest.raises(ProbeError, match=f"more than {probe.MAX_NODES} nodes"):
        probe.cone(model.graph, [last])
    assert len(probe.cone(model.graph, [last], max_nodes=probe.MAX_NODES + 1).nodes) == probe.MAX_NODES + 1
    with pytest.raises(ProbeError, match="more than 3 nodes"):
        probe.evaluate(model.graph, [last], {"v0": np.ones(2, np.float32)}, max_nodes=3)


def test_probe_refuses_a_missing_feed():
    model = parse(MASK, MASK_INITS)
    with pytest.raises(ProbeError, match="no probe value for input 'x'"):
        probe.evaluate(model.graph, [out(model, "bias")], {"mask": np.ones((1, 2), np.int64)})


def test_probe_reports_onnxruntime_failures():
    model = parse("g (float[N] x, int64[2] t) => (float[A, B] y) {\n  y = Reshape(x, t)\n}")
    with pytest.raises(ProbeError, match="^onnxruntime: "):
        probe.evaluate(model.graph, [model.graph.outputs[0]],
                       {"x": np.ones(5, np.float32), "t": np.array([2, 2], np.int64)})


def test_probe_returns_inputs_and_constants_asked_for():
    model = parse(MASK, MASK_INITS)
    x = model.graph.inputs[0]
    neg = model.graph.initializers["neg"]
    feed = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    got_x, got_neg, again = probe.evaluate(model.graph, [x, neg, x], {"x": feed})
    np.testing.assert_array_equal(got_x, feed)
    np.testing.assert_array_equal(again, feed)
    assert got_neg == np.float32(-1e4)


INVARIANT = """
g (float[B, S, 8] x) => (float[] head, float[] seq, float[] data) {
  v = Reshape(x, t)
  vs = Shape(v)
  hd = Slice(vs, m1, big)
  hq = Squeeze(hd, z)
  hf = Cast <to = 1> (hq)
  head = Sqrt(hf)
  xs = Shape(x)
  sl = Slice(xs, one, two)
  sq = Squeeze(sl, z)
  sf = Cast <to = 1> (sq)
  seq = Sqrt(sf)
  g2 = GatherElements <axis = -1> (x, idx)
  gs = Shape(g2)
  data = ReduceSum <keepdims = 0> (x)
}"""
INVARIANT_INITS = {"t": np.array([0, 0, 2, -1], np.int64), "m1": np.array([-1], np.int64),
                   "big": np.array([2 ** 62], np.int64), "z": np.array([0], np.int64),
                   "one": np.array([1], np.int64), "two": np.array([2], np.int64),
                   "idx": np.zeros((1, 1, 1), np.int64)}


def test_probe_invariant_proves_a_value_computed_from_shapes_alone():
    model = parse(INVARIANT, INVARIANT_INITS)
    feeds = [{"x": np.zeros((2, 5, 8), np.float32)}, {"x": np.ones((3, 3, 8), np.float32)}]
    assert float(probe.invariant(model.graph, out(model, "head"), feeds)) == pytest.approx(2.0)   # sqrt(8 / 2)
    assert probe.invariant(model.graph, out(model, "seq"), feeds) is None       # sqrt(S): differs with the size
    assert probe.invariant(model.graph, out(model, "data"), feeds) is None      # reads x's data


def test_probe_reads_gather_elements_for_its_shape_only():
    model = parse(INVARIANT, INVARIANT_INITS)
    gs = next(n for n in model.graph if n.name == "" and n.op_type == "Shape" and n.inputs[0].name == "g2")
    assert probe.cone(model.graph, [gs.outputs[0]]).data_inputs == []
