"""canonicalize-sequences: SplitToSequence read by constant SequenceAt / ConcatFromSequence / SequenceLength
becomes Split (the raw dynamo export's torch.split); anything else stays, with the reason."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    parse,
    parse_proto,
    run_pass,
    run_passes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.pass_manager import PassContext, get_pass
from onnxc.verifier import check_model

PASS = ["infer-shapes", "canonicalize-sequences", "eliminate-dead"]
I64 = np.int64

PACKED = """
g (float[B, S, 12] x) => (float[B, S, 4] q, float[B, S, 4] k, float[B, S, 4] v) {
  seq = SplitToSequence<axis=2>(x, sizes)
  q = SequenceAt(seq, i0)
  k = SequenceAt(seq, i1)
  v = SequenceAt(seq, im1)
}"""
PACKED_INITS = {"sizes": np.array([4, 4, 4], I64), "i0": np.array(0, I64), "i1": np.array(1, I64),
                "im1": np.array(-1, I64)}


def test_canonicalize_sequences_packed_split_becomes_split():
    model, counts = check_before_after(PACKED, PASS, """
    g (float[B, S, 12] x) => (float[B, S, 4] q, float[B, S, 4] k, float[B, S, 4] v) {
      q, k, v = Split<axis=2>(x, sizes)
    }""", initializers=PACKED_INITS, expected_initializers={"sizes": np.array([4, 4, 4], I64)},
        dims={"B": 2, "S": 3})
    assert counts["split-to-sequence"] == 1
    assert_unchanged_by(model, "canonicalize-sequences")


def test_canonicalize_sequences_parts_of_one_without_keepdims_are_squeezed():
    text = """
    g (float[2, 3] x) => (float[2] a, int64 n, float[2, 3] c) {
      seq = SplitToSequence<axis=1, keepdims=0>(x)
      a = SequenceAt(seq, i2)
      len = SequenceLength(seq)
      n = Add(len, one)
      c = ConcatFromSequence<axis=1, new_axis=1>(seq)
    }"""
    model, counts = check_before_after(text, PASS, """
    g (float[2, 3] x) => (float[2] a, int64 n, float[2, 3] c) {
      p0, p1, p2 = Split<axis=1>(x, sizes)
      a = Squeeze(p2, ax)
      s0 = Squeeze(p0, ax)
      s1 = Squeeze(p1, ax)
      u0 = Unsqueeze(s0, nax)
      u1 = Unsqueeze(s1, nax)
      u2 = Unsqueeze(a, nax)
      c = Concat<axis=1>(u0, u1, u2)
      n = Add(len, one)
    }""", initializers={"i2": np.array(2, I64), "one": np.array(1, I64)},
        expected_initializers={"sizes": np.array([1, 1, 1], I64), "ax": np.array([1], I64),
                               "nax": np.array([1], I64), "len": np.array(3, I64), "one": np.array(1, I64)})
    assert counts["split-to-sequence"] == 1


def test_canonicalize_sequences_scalar_chunk_on_a_static_axis():
    text = """
    g (float[2, 7] x) => (float[2, 1] last, float[2, 7] c) {
      seq = SplitToSequence<axis=1>(x, chunk)
      last = SequenceAt(seq, im1)
      c = ConcatFromSequence<axis=1>(seq)
    }"""
    model, _ = check_before_after(text, PASS, """
    g (float[2, 7] x) => (float[2, 1] last, float[2, 7] c) {
      p0, p1, last = Split<axis=1>(x, sizes)
      c = Concat<axis=1>(p0, p1, last)
    }""", initializers={"chunk": np.array(3, I64), "im1": np.array(-1, I64)},
        expected_initializers={"sizes": np.array([3, 3, 1], I64)})
    split = next(n for n in model.graph if n.op_type == "Split")
    assert [list(o.shape) for o in split.outputs] == [[2, 3], [2, 3], [2, 1]]


def _refusal(text: str, inits: dict[str, np.ndarray]) -> str:
    model = parse(text, inits)
    run_passes(model, ["infer-shapes"])
    ctx = PassContext(level=2)
    result = get_pass("canonicalize-sequences").run(model, ctx)
    assert not result.modified and "SplitToSequence" in [n.op_type for n in model.graph]
    return "\n".join(ctx.notes)


def test_canonicalize_sequences_refuses_a_computed_index():
    text = PACKED.replace("v = SequenceAt(seq, im1)", "j = Size(x)\n  j2 = Mod(j, three)\n  v = SequenceAt(seq, j2)")
    note = _refusal(text, {**PACKED_INITS, "three": np.array(3, I64)})
    assert "reads no constant index within the 3 parts" in note


def test_canonicalize_sequences_refuses_a_sequence_read_by_another_op():
    text = PACKED.replace("v = SequenceAt(seq, im1)", "s2 = SequenceErase(seq, i0)\n  v = SequenceAt(s2, i0)")
    assert "read by SequenceErase" in _refusal(text, PACKED_INITS)


def test_canonicalize_sequences_refuses_split_sizes_that_are_computed():
    text = PACKED.replace("seq = SplitToSequence<axis=2>(x, sizes)",
                          "sz = Abs(sizes)\n  seq = SplitToSequence<axis=2>(x, sz)")
    assert "split sizes are not a constant" in _refusal(text, PACKED_INITS)


def test_canonicalize_sequences_refuses_keepdims_0_beside_sizes():
    text = PACKED.replace("SplitToSequence<axis=2>", "SplitToSequence<axis=2, keepdims=0>")
    assert "keepdims=0 beside split sizes" in _refusal(text, PACKED_INITS)


def test_canonicalize_sequences_refuses_parts_of_one_on_a_symbolic_axis():
    text = PACKED.replace("SplitToSequence<axis=2>(x, sizes)", "SplitToSequence<axis=1>(x)").replace(
        "float[B, S, 4] q, float[B, S, 4] k, float[B, S, 4] v", "float[B, 1, 12] q, float[B, 1, 12] k, "
        "float[B, 1, 12] v")
    assert "axis of unknown length" in _refusal(text, PACKED_INITS)


def test_infer_shapes_keeps_a_sequence_a_sequence():
    """onnx-ir's inference records SplitToSequence's output as a tensor; infer-shapes gives the kind back, so the
    model still loads (it did not: "expected seq(tensor(float))")."""
    model = parse(PACKED, PACKED_INITS)
    run_pass(model, "infer-shapes")
    seq = next(n for n in model.graph if n.op_type == "SplitToSequence").outputs[0]
    assert isinstance(seq.type, ir.SequenceType) and seq.shape is None
    assert check_model(model) == []
    assert_same_outputs(parse_proto(PACKED, PACKED_INITS), model, dims={"B": 1, "S": 2})


@st.composite
def sequence_graphs(draw):
    """A SplitToSequence with a random axis and split form, read by a random mix of constant SequenceAt (either
    sign), ConcatFromSequence (with or without a new axis) and SequenceLength."""
    rank = draw(st.integers(1, 3))
    dims = [draw(st.integers(1, 5)) for _ in range(rank)]
    axis = draw(st.integers(-rank, rank - 1))
    length = dims[axis]
    form = draw(st.sampled_from(["sizes", "chunk", "none"]))
    inits: dict[str, np.ndarray] = {}
    keepdims = draw(st.integers(0, 1)) if form == "none" else 1
    if form == "sizes":
        cuts = sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=3)))) if length > 1 else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
        inits["sp"] = np.array(sizes, I64)
        split, n, squeeze = "x, sp", len(sizes), False
        part_dims = lambda k: [sizes[k] if i == axis % rank else d for i, d in enumerate(dims)]  # noqa: E731
    elif form == "chunk":
        chunk = draw(st.integers(1, length))
        inits["sp"] = np.array(chunk, I64)
        sizes = [min(chunk, length - k) for k in range(0, length, chunk)]
        split, n, squeeze = "x, sp", len(sizes), False
        part_dims = lambda k: [sizes[k] if i == axis % rank else d for i, d in enumerate(dims)]  # noqa: E731
    else:
        split, n, squeeze = "x", length, keepdims == 0
        part_dims = lambda k: [d for i, d in enumerate(dims) if i != axis % rank] if squeeze else \
            [1 if i == axis % rank else d for i, d in enumerate(dims)]  # noqa: E731
    lines = [f"seq = SplitToSequence<axis={axis}, keepdims={keepdims}>({split})"]
    outs = []
    for j, kind in enumerate(draw(st.lists(st.sampled_from(["at", "concat", "len"]), min_size=1, max_size=4))):
        if kind == "at":
            k = draw(st.integers(0, n - 1))
            idx = k - n if draw(st.booleans()) else k
            inits[f"i{j}"] = np.array(idx, I64)
            lines.append(f"o{j} = SequenceAt(seq, i{j})")
            outs.append(f"float[{', '.join(map(str, part_dims(k)))}] o{j}")
        elif kind == "len":
            lines.append(f"o{j} = SequenceLength(seq)")
            outs.append(f"int64 o{j}")
        else:
            part_rank = len(part_dims(0))
            new_axis = draw(st.integers(0, 1)) if all(part_dims(k) == part_dims(0) for k in range(n)) else 0
            if not part_rank and not new_axis:     # scalars concatenate only along a new axis
                lines.append(f"o{j} = SequenceLength(seq)")
                outs.append(f"int64 o{j}")
                continue
            same = all(part_dims(k) == part_dims(0) for k in range(n))
            c_axis = draw(st.integers(0, part_rank - (1 - new_axis))) if same else axis % rank
            lines.append(f"o{j} = ConcatFromSequence<axis={c_axis}, new_axis={new_axis}>(seq)")
            outs.append(f"float o{j}")
    text = (f"g (float[{', '.join(map(str, dims))}] x) => ({', '.join(outs)}) {{\n  " + "\n  ".join(lines) + "\n}")
    return text, inits


@settings(max_examples=40, deadline=None)
@given(sequence_graphs())
def test_canonicalize_sequences_property(case):
    text, inits = case
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = run_passes(model, PASS)
    assert counts.get("split-to-sequence") == 1, counts
    assert not {"SplitToSequence", "SequenceAt", "ConcatFromSequence", "SequenceLength"} & \
        {n.op_type for n in model.graph}
    assert_valid(model, proto)
    assert_same_outputs(proto, model)
    assert_unchanged_by(model, "canonicalize-sequences")
