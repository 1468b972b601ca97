"""unflatten-rows: Reshape(x, (-1, H)) -> row-wise ops -> Reshape back runs on x directly, and why not."""
from __future__ import annotations

import numpy as np
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    counting,
    parse,
    parse_proto,
    run_passes,
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.passes import unflatten_rows as ur

PREP = ("infer-shapes", "fold-constants")
UNFLATTEN = counting("unflatten-rows", before=PREP, after=("eliminate-dead",))
H, F = 8, 12
rng = np.random.default_rng(0)
G, B_ = np.ones(H, np.float32), np.zeros(H, np.float32)
W1 = (rng.standard_normal((F, H)) / np.sqrt(H)).astype(np.float32)     # Gemm transB=1 weights, as torch's addmm
C1 = (0.1 * rng.standard_normal(F)).astype(np.float32)
W2 = (rng.standard_normal((H, F)) / np.sqrt(F)).astype(np.float32)
C2 = (0.1 * rng.standard_normal(H)).astype(np.float32)
INITS = {"flat": np.array([-1, H], np.int64), "g": G, "b": B_, "w1": W1, "c1": C1, "w2": W2, "c2": C2,
         "zero": np.array([0], np.int64), "two": np.array([2], np.int64), "hvec": np.array([H], np.int64)}

# OPT's feed-forward block as the dynamo exporter writes it: the residual stream flattened, normed, two Gemms, the
# residual Add in 2-D, then restored with a target assembled from Shape(x).
OPT_FFN = f"""
g (float[B, S, {H}] x) => (float[B, S, {H}] y) {{
  r = Reshape(x, flat)
  n = LayerNormalization<axis=-1>(r, g, b)
  h = Gemm<transB=1>(n, w1, c1)
  a = Relu(h)
  o = Gemm<transB=1>(a, w2, c2)
  s = Add(r, o)
  sx = Shape(x)
  lead = Slice(sx, zero, two)
  t = Concat<axis=0>(lead, hvec)
  y = Reshape(s, t)
}}"""


def test_opt_feed_forward_block_runs_unflattened():
    model, counts = check_before_after(OPT_FFN, UNFLATTEN, f"""
    g (float[B, S, {H}] x) => (float[B, S, {H}] y) {{
      n = LayerNormalization<axis=-1>(x, g, b)
      wt1 = Transpose<perm=[1, 0]>(w1)
      h0 = MatMul(n, wt1)
      h = Add(h0, c1)
      a = Relu(h)
      wt2 = Transpose<perm=[1, 0]>(w2)
      o0 = MatMul(a, wt2)
      o = Add(o0, c2)
      y = Add(x, o)
    }}""", initializers=INITS, expected_initializers={"g": G, "b": B_, "w1": W1, "c1": C1, "w2": W2, "c2": C2},
        dims={"B": 2, "S": 3})
    assert counts == {"unflatten-rows": 1}
    # the region's values now carry x's leading dims, so later proofs see (B, S, .)
    dims = {n.op_type: [str(d) for d in n.outputs[0].shape] for n in model.graph if n.outputs[0].shape is not None}
    assert dims["Relu"] == ["B", "S", str(F)] and dims["LayerNormalization"] == ["B", "S", str(H)]
    assert_unchanged_by(model, "unflatten-rows")


def test_opt_then_skip_norm_fuses():
    """What the pass is for: after it the residual Add and the next LayerNorm line up for fuse-skip-norm."""
    text = OPT_FFN.replace("y = Reshape(s, t)", "u = Reshape(s, t)\n  y = LayerNormalization<axis=-1>(u, g, b)")
    proto = parse_proto(text, INITS)
    model = parse(text, INITS)
    run_passes(model, ["infer-shapes", "fold-constants", "fold-shapes", "unflatten-rows", "eliminate-dead",
                       "fuse-skip-norm"])
    ops = [n.op_type for n in model.graph]
    assert "SkipLayerNormalization" in ops and "Reshape" not in ops, ops
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims={"B": 2, "S": 5})


def _refused(text: str, reason: str, inits=INITS) -> None:
    model = parse(text, inits)
    run_passes(model, PREP)
    found = [why for _, why in ur.sites(model) if isinstance(why, str)]
    assert any(reason in w for w in found), found
    before = to_bytes(model)
    assert not run_passes(model, ["unflatten-rows"])
    assert to_bytes(model) == before


def test_refuses_a_region_value_read_for_its_shape():
    _refused(OPT_FFN.replace("sx = Shape(x)", "sx0 = Shape(r)\n  sx = Shape(x)").replace(
        "y = Reshape(s, t)", "y0 = Reshape(s, t)\n  q = Cast<to=1>(sx0)\n  qq = ReduceSum<keepdims=0>(q)\n"
        "  y = Add(y0, qq)"), "(Shape): not a row-wise op")


def test_refuses_an_unprovable_restore():
    # the restore's leading dims are a constant (2, -1): right only when B = 2, so not provable for a symbolic B
    _refused(OPT_FFN.replace("t = Concat<axis=0>(lead, hvec)", "t = Concat<axis=0>(two, m1, hvec)"),
             "cannot prove the restore target (2, -1, 8)", {**INITS, "m1": np.array([-1], np.int64)})


def test_refuses_a_norm_over_the_rows():
    _refused(OPT_FFN.replace("LayerNormalization<axis=-1>(r, g, b)", "Softmax<axis=0>(r)"), "axis 0 is not the last")


def test_refuses_a_region_value_as_graph_output():
    _refused(OPT_FFN.replace("=> (float[B, S, 8] y)", "=> (float[B, S, 8] y, float[N, 8] n)"), "graph output")


def test_refuses_a_row_operand_from_outside():
    text = f"""
    g (float[B, S, {H}] x, float[P, {H}] z) => (float[B, S, {H}] y) {{
      r = Reshape(x, flat)
      s = Add(r, z)
      sx = Shape(x)
      lead = Slice(sx, zero, two)
      t = Concat<axis=0>(lead, hvec)
      y = Reshape(s, t)
    }}"""
    _refused(text, "from outside")


def test_refuses_rank_two_input_and_leaves_it():
    text = f"""
    g (float[P, {H}] x) => (float[P, {H}] y) {{
      r = Reshape(x, flat)
      y = Relu(r)
    }}"""
    model = parse(text, INITS)
    run_passes(model, PREP)
    assert not run_passes(model, ["unflatten-rows"])


# ------------------------------------------------------------------------------------------------ property
_UNARY = ["Relu", "Tanh", "Sigmoid", "Neg"]
DIMS = {"B": 2, "S": 3, "T": 2}


@st.composite
def regions(draw):
    lead = draw(st.lists(st.sampled_from(["B", "S", "T", 3]), min_size=2, max_size=3, unique=True))
    steps = draw(st.lists(st.sampled_from(["unary", "bias", "norm", "matmul", "gemm", "residual", "softmax"]),
                          min_size=1, max_size=6))
    restore = draw(st.sampled_from(["shape", "const_minus", "wrong_const"]))
    return lead, steps, restore


def region_model(case):
    lead, steps, restore = case
    lines, inits, width, cur, k = ["r = Reshape(x, flat)"], dict(INITS), H, "r", 0
    for step in steps:
        k += 1
        out = f"v{k}"
        if step == "unary":
            lines.append(f"{out} = {_UNARY[k % len(_UNARY)]}({cur})")
        elif step == "bias":
            inits[f"b{k}"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
            lines.append(f"{out} = Add({cur}, b{k})")
        elif step == "norm":
            inits[f"g{k}"], inits[f"z{k}"] = np.ones(width, np.float32), np.zeros(width, np.float32)
            lines.append(f"{out} = LayerNormalization<axis=1>({cur}, g{k}, z{k})")
        elif step == "softmax":
            lines.append(f"{out} = Softmax<axis=-1>({cur})")
        elif step in ("matmul", "gemm"):
            new = width + 2 if width == H else H
            inits[f"w{k}"] = (rng.standard_normal((width, new)) / np.sqrt(width)).astype(np.float32)
            if step == "matmul":
                lines.append(f"{out} = MatMul({cur}, w{k})")
            else:
                inits[f"c{k}"] = (0.1 * rng.standard_normal(new)).astype(np.float32)
                lines.append(f"{out} = Gemm<alpha=0.5>({cur}, w{k}, c{k})")
            width = new
        elif step == "residual":
            if width != H:
                continue
            lines.append(f"{out} = Add({cur}, r)")
        cur = out
    inits["wvec"] = np.array([width], np.int64)
    n = len(lead)
    if restore == "shape":
        lines += ["sx = Shape(x)", "ld = Slice(sx, zero, nlead)", "t = Concat<axis=0>(ld, wvec)"]
        inits["nlead"] = np.array([n], np.int64)
        fires = True
    else:
        # "wrong_const": the run's sizes written as constants: right for this run, not provable for every size
        static = [d if isinstance(d, int) else (DIMS[d] if restore == "wrong_const" else -1) for d in lead]
        if restore == "const_minus" and sum(1 for d in static if d == -1) > 1:
            static = [d if isinstance(d, int) else DIMS[d] for d in lead]
            restore = "wrong_const"
        inits["tconst"] = np.array(static + [width], np.int64)
        lines.append("t = Identity(tconst)")
        fires = restore == "const_minus"
    lines.append(f"y = Reshape({cur}, t)")
    dims = ", ".join(str(d) for d in lead)
    text = f"g (float[{dims}, {H}] x) => (float[{dims}, {width}] y) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, inits, fires


@settings(max_examples=40, deadline=None)
@given(regions())
def test_unflatten_rows_property(case):
    """Verifier, numbers, idempotence; fires exactly when the restore is provable."""
    text, inits, fires = region_model(case)
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = UNFLATTEN(model)
    assert counts == ({"unflatten-rows": 1} if fires else {}), (case, counts)
    assert ("Reshape" in [n.op_type for n in model.graph]) != fires
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims=DIMS)
    assert_unchanged_by(model, "unflatten-rows")
