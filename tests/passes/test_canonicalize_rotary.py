"""canonicalize-rotary: rotate_half / rotate_every_two written any way becomes the canonical Slice form, proved by
evaluation; anything that is not exactly a rotation stays."""
from __future__ import annotations

import numpy as np
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    parse,
    parse_proto,
    run_passes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.rotary import parse_rotary

PASS = ["infer-shapes", "canonicalize-rotary", "eliminate-dead"]
H = 8
I64 = np.int64
BIG = 2**63 - 1
CANONICAL = f"""
g (float[B, 2, S, {H}] x, float[B, 1, S, {H}] cos, float[B, 1, S, {H}] sin) => (float[B, 2, S, {H}] y) {{
  xc = Mul(x, cos)
  hi = Slice(x, h, big, m1)
  lo = Slice(x, zero, h, m1)
  nhi = Neg(hi)
  r = Concat<axis=-1>(nhi, lo)
  rs = Mul(r, sin)
  y = Add(xc, rs)
}}"""
CANONICAL_INITS = {"h": np.array([H // 2], I64), "big": np.array([BIG], I64), "m1": np.array([-1], I64),
                   "zero": np.array([0], I64)}
DIMS = {"B": 2, "S": 3}


def _form(kind: str) -> tuple[str, dict[str, np.ndarray]]:
    """rotary(x) with rotate_half written as `kind`."""
    head = f"g (float[B, 2, S, {H}] x, float[B, 1, S, {H}] cos, float[B, 1, S, {H}] sin) => (float[B, 2, S, {H}] y)"
    if kind == "split":
        body, inits = "a, b = Split<axis=-1>(x, halves)\n  nb = Neg(b)\n  r = Concat<axis=-1>(nb, a)", \
            {"halves": np.array([H // 2, H // 2], I64)}
    elif kind == "matmul":
        rot = np.zeros((H, H), np.float32)
        rot[np.arange(H // 2) + H // 2, np.arange(H // 2)] = -1
        rot[np.arange(H // 2), np.arange(H // 2) + H // 2] = 1
        body, inits = "r = MatMul(x, rot)", {"rot": rot}
    elif kind == "gather":
        perm = np.concatenate([np.arange(H // 2, H), np.arange(H // 2)]).astype(I64)
        signs = np.concatenate([-np.ones(H // 2), np.ones(H // 2)]).astype(np.float32)
        body, inits = "g1 = Gather<axis=-1>(x, perm)\n  r = Mul(g1, signs)", {"perm": perm, "signs": signs}
    elif kind == "every_two":     # out[2i] = -x[2i+1], out[2i+1] = x[2i], as a signed Gather
        perm = np.arange(H).reshape(-1, 2)[:, ::-1].reshape(-1).astype(I64)
        signs = np.tile(np.array([-1, 1], np.float32), H // 2)
        body, inits = "g1 = Gather<axis=-1>(x, perm)\n  r = Mul(g1, signs)", {"perm": perm, "signs": signs}
    else:
        raise ValueError(kind)
    return f"{head} {{\n  xc = Mul(x, cos)\n  {body}\n  rs = Mul(r, sin)\n  y = Add(xc, rs)\n}}", inits


def test_canonicalize_rotary_split_form_becomes_the_slice_form():
    text, inits = _form("split")
    model, counts = check_before_after(text, PASS, CANONICAL, initializers=inits,
                                       expected_initializers=CANONICAL_INITS, dims=DIMS)
    assert counts["rotate-half"] == 1
    assert parse_rotary(model.graph.outputs[0]) is not None
    assert_unchanged_by(model, "canonicalize-rotary")


def test_canonicalize_rotary_leaves_the_canonical_form_alone():
    check_before_after(CANONICAL, PASS, None, initializers=CANONICAL_INITS, dims=DIMS)


def test_canonicalize_rotary_leaves_a_near_rotation_alone():
    """One sign off: no rotation, so nothing moves (fuse-gqa then keeps the rotary outside or refuses)."""
    text, inits = _form("gather")
    inits["signs"] = inits["signs"].copy()
    inits["signs"][0] = 1.0
    check_before_after(text, PASS, None, initializers=inits, dims=DIMS)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["split", "matmul", "gather", "every_two"]), swap=st.booleans(), scale=st.booleans())
def test_canonicalize_rotary_property(kind, swap, scale):
    """Every form, either operand order of the Add and of the Muls, a rotation read elsewhere too: canonicalized
    once, parsed as rotary afterwards, same outputs, a second run changes nothing."""
    text, inits = _form(kind)
    if swap:
        text = text.replace("xc = Mul(x, cos)", "xc = Mul(cos, x)").replace("rs = Mul(r, sin)", "rs = Mul(sin, r)") \
            .replace("y = Add(xc, rs)", "y = Add(rs, xc)")
    if scale:       # r also read by another node: only the rotary's use moves
        text = text.replace("=> (float[B, 2, S, 8] y)", "=> (float[B, 2, S, 8] y, float[B, 2, S, 8] z)") \
            .replace("y = Add(", "z = Relu(r)\n  y = Add(")
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = run_passes(model, PASS)
    assert counts.get("rotate-half") == 1, counts
    rot = parse_rotary(model.graph.outputs[0])
    assert rot is not None and rot.interleaved == (kind == "every_two")
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims=DIMS)
    assert_unchanged_by(model, "canonicalize-rotary")
