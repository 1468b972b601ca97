"""fuse-skip-norm: residual Add (+ bias) + LayerNorm / RMSNorm -> Skip(Simplified)LayerNormalization, and why not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxc
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
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.passes import fuse_skip_norm as fs
from onnxc.pipeline import CLEANUP, O1
from onnxc.rules import explain
from onnxc.shapes import dims_of

FUSE = counting("fuse-skip-norm", before=("infer-shapes",), after=("eliminate-dead",))
H = 8
rng = np.random.default_rng(0)
G = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
BETA = (0.1 * rng.standard_normal(H)).astype(np.float32)
BIAS = (0.1 * rng.standard_normal(H)).astype(np.float32)
HEADER = '<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>'
NP = {"float": np.float32, "float16": np.float16}


def skip_model(*, norm="sln", bias=False, bias_first=False, residual_first=False, export=False, beta=True,
               dtype="float", x_dims=f"N, S, {H}", h_dims=None) -> tuple[str, dict]:
    """s = h (+ bias) + x; y = norm(s); with `export`, z = s + y uses the sum too."""
    h_dims = h_dims or x_dims
    lines = []
    h = "h"
    if bias:
        lines.append("hb = Add(bias, h)" if bias_first else "hb = Add(h, bias)")
        h = "hb"
    lines.append(f"s = Add(x, {h})" if residual_first else f"s = Add({h}, x)")
    if norm == "sln":
        lines.append("y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(s, g)")
    else:
        lines.append(f"y = LayerNormalization<axis=-1, epsilon=1e-5>(s, g{', beta' if beta else ''})")
    outputs = f"{dtype}[{x_dims}] y"
    if export:
        lines.append("z = Add(s, y)")
        outputs += f", {dtype}[{x_dims}] z"
    inits = {"g": G.astype(NP[dtype]), "beta": BETA.astype(NP[dtype]), "bias": BIAS.astype(NP[dtype])}
    text = (f"{HEADER}\ng ({dtype}[{x_dims}] x, {dtype}[{h_dims}] h) => ({outputs}) {{\n  "
            + "\n  ".join(lines) + "\n}")
    return text, inits


def assert_refused(text: str, inits: dict, reason: str, fallback: dict | None = None) -> None:
    """A rule refuses with `reason`; the pass then changes nothing, or only applies `fallback` (still exact)."""
    model = parse(text, inits)
    run_passes(model, ["infer-shapes"])
    rows = [r for rule in fs.RULES for _, r in explain(model, rule)]
    assert any(reason in r for r in rows), rows
    before = to_bytes(model)
    assert run_pass(model, "fuse-skip-norm").counts == (fallback or {})
    if fallback:
        assert_same_outputs(parse_proto(text, inits), model)
    else:
        assert to_bytes(model) == before


def skip_nodes(model):
    return [n for n in model.graph if n.domain == "com.microsoft" and n.op_type.startswith("Skip")]


# ------------------------------------------------------------------------------------------------ before/after
def test_fuse_skip_norm_rms_exports_the_sum():
    text, inits = skip_model(export=True)
    model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[N, S, {H}] h) => (float[N, S, {H}] y, float[N, S, {H}] z) {{
      y, mean, inv, s = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-6>(h, x, g)
      z = Add(s, y)
    }}""", initializers=inits, expected_initializers={"g": G})
    assert counts == {"skip-simplified-layer-norm": 1}
    (node,) = skip_nodes(model)
    assert [v.name for v in node.outputs[1:3]] == ["", ""]   # mean / inv_std_var left out


def test_fuse_skip_norm_sum_that_is_a_graph_output_is_exported():
    text, inits = skip_model(norm="ln")
    text = text.replace(f"=> (float[N, S, {H}] y)", f"=> (float[N, S, {H}] s, float[N, S, {H}] y)")
    model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[N, S, {H}] h) => (float[N, S, {H}] s, float[N, S, {H}] y) {{
      y, mean, inv, s = com.microsoft.SkipLayerNormalization<epsilon=1e-5>(h, x, g, beta)
    }}""", initializers=inits, expected_initializers={"g": G, "beta": BETA})
    assert counts == {"skip-layer-norm": 1}
    assert [v.name for v in model.graph.outputs] == ["s", "y"]


def test_fuse_skip_norm_rms_without_other_use_has_one_output():
    text, inits = skip_model(residual_first=True)
    _model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[N, S, {H}] h) => (float[N, S, {H}] y) {{
      y = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-6>(x, h, g)
    }}""", initializers=inits, expected_initializers={"g": G})
    assert counts == {"skip-simplified-layer-norm": 1}


@pytest.mark.parametrize("bias_first", [False, True])
def test_fuse_skip_norm_layer_norm_absorbs_projection_bias(bias_first):
    text, inits = skip_model(norm="ln", bias=True, bias_first=bias_first, export=True)
    _, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[N, S, {H}] h) => (float[N, S, {H}] y, float[N, S, {H}] z) {{
      y, mean, inv, s = com.microsoft.SkipLayerNormalization<epsilon=1e-5>(h, x, g, beta, bias)
      z = Add(s, y)
    }}""", initializers=inits, expected_initializers={"g": G, "beta": BETA, "bias": BIAS})
    assert counts == {"skip-layer-norm-bias": 1}


def test_fuse_skip_norm_layer_norm_bias_without_beta_leaves_a_gap():
    text, inits = skip_model(norm="ln", bias=True, beta=False)
    _model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[N, S, {H}] h) => (float[N, S, {H}] y) {{
      y = com.microsoft.SkipLayerNormalization<epsilon=1e-5>(h, x, g, , bias)
    }}""", initializers=inits, expected_initializers={"g": G, "bias": BIAS})
    assert counts == {"skip-layer-norm-bias": 1}


def test_fuse_skip_norm_rms_absorbs_bias():
    text, inits = skip_model(bias=True, export=True)
    _, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[N, S, {H}] h) => (float[N, S, {H}] y, float[N, S, {H}] z) {{
      y, mean, inv, s = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-6>(h, x, g, bias)
      z = Add(s, y)
    }}""", initializers=inits, expected_initializers={"g": G, "bias": BIAS})
    assert counts == {"skip-simplified-layer-norm-bias": 1}


@pytest.mark.parametrize("residual_first", [False, True])
@pytest.mark.parametrize("h_dims", [f"1, S, {H}", f"S, {H}"])
def test_fuse_skip_norm_broadcast_operand_becomes_skip(h_dims, residual_first):
    # ORT's output has input's shape: the (1, S, H) or (S, H) operand must be skip, whatever the Add's order.
    text, inits = skip_model(norm="ln", h_dims=h_dims, residual_first=residual_first)
    _model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[N, S, {H}] x, float[{h_dims}] h) => (float[N, S, {H}] y) {{
      y = com.microsoft.SkipLayerNormalization<epsilon=1e-5>(x, h, g, beta)
    }}""", initializers=inits, expected_initializers={"g": G, "beta": BETA}, dims={"N": 3, "S": 4})
    assert counts == {"skip-layer-norm": 1}


def test_fuse_skip_norm_2d_input():
    text, inits = skip_model(x_dims=f"T, {H}", export=True)
    _model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[T, {H}] x, float[T, {H}] h) => (float[T, {H}] y, float[T, {H}] z) {{
      y, mean, inv, s = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-6>(h, x, g)
      z = Add(s, y)
    }}""", initializers=inits, expected_initializers={"g": G})
    assert counts == {"skip-simplified-layer-norm": 1}


def test_fuse_skip_norm_fp16():
    text, inits = skip_model(dtype="float16", bias=True, export=True)
    _model, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float16[N, S, {H}] x, float16[N, S, {H}] h) => (float16[N, S, {H}] y, float16[N, S, {H}] z) {{
      y, mean, inv, s = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-6>(h, x, g, bias)
      z = Add(s, y)
    }}""", initializers=inits, expected_initializers={"g": G.astype(np.float16), "bias": BIAS.astype(np.float16)})
    assert counts == {"skip-simplified-layer-norm-bias": 1}


def decoder_text(layers: int, rows_only: bool = False) -> tuple[str, dict]:
    """A residual stream as exported: r0 = x; r_{k+1} = r_k + MatMul(RMSNorm(r_k), W_k); y = RMSNorm(r_last).

    With `rows_only`, the projection is a gated MLP whose halves are sliced at a computed point (as Phi-3 splits
    gate_up): shape inference cannot name the slices' dims, so the operands of each residual Add share their leading
    dims only through the row-wise chain back to r_k.
    """
    lines, inits = [], {"eps": np.array(1e-6, np.float32), "axes": np.array([-1], np.int64),
                        "minus1": np.array([-1], np.int64), "m1s": np.array(-1, np.int64), "two": np.array(2, np.int64),
                        "zero": np.array([0], np.int64), "big": np.array([1 << 40], np.int64)}

    def rms(k, r, out):
        lines.extend([f"sq{k} = Mul({r}, {r})", f"ms{k} = ReduceMean(sq{k}, axes)", f"v{k} = Add(ms{k}, eps)",
                      f"s{k} = Sqrt(v{k})", f"i{k} = Reciprocal(s{k})", f"nn{k} = Mul({r}, i{k})",
                      f"{out} = Mul(nn{k}, g{k})"])
        inits[f"g{k}"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)

    r = "x"
    for k in range(2 * layers):
        inits[f"w{k}"] = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
        rms(k, r, f"n{k}")
        if rows_only:
            inits[f"w{k}"] = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(np.float32)
            inits[f"d{k}"] = (rng.standard_normal((2 * H, H)) / np.sqrt(2 * H)).astype(np.float32)
            lines += [f"gu{k} = MatMul(n{k}, w{k})", f"sh{k} = Shape(gu{k})", f"last{k} = Gather(sh{k}, m1s)",
                      f"half{k} = Div(last{k}, two)", f"h{k} = Unsqueeze(half{k}, zero)",
                      f"ga{k} = Slice(gu{k}, zero, h{k}, minus1)", f"up{k} = Slice(gu{k}, h{k}, big, minus1)",
                      f"sg{k} = Sigmoid(ga{k})", f"si{k} = Mul(ga{k}, sg{k})", f"mm{k} = Mul(si{k}, up{k})",
                      f"o{k} = MatMul(mm{k}, d{k})"]
        else:
            lines.append(f"o{k} = MatMul(n{k}, w{k})")
        lines.append(f"r{k + 1} = Add({r}, o{k})")
        r = f"r{k + 1}"
    rms(2 * layers, r, "y")
    text = f"{HEADER}\ng (float[N, S, {H}] x) => (float[N, S, {H}] y) {{\n  " + "\n  ".join(lines) + "\n}"
    return text, inits


@pytest.mark.parametrize("rows_only", [False, True])
def test_fuse_skip_norm_decoder_residual_chain(rows_only):
    # Every norm but the first becomes a skip norm; all but the last export their sum to the next residual Add.
    text, inits = decoder_text(2, rows_only)
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = counting("fuse-skip-norm", before=("infer-shapes", "fuse-rms-norm"), after=("eliminate-dead",))(model)
    assert counts == {"skip-simplified-layer-norm": 4}
    if rows_only:   # the residual Add's operands have unrelated dims: the proof goes through the row-wise chain
        shaped = parse(text, inits)
        run_passes(shaped, ["infer-shapes"])
        (o1,) = [n.outputs[0] for n in shaped.graph if n.outputs[0].name == "o1"]
        assert dims_of(o1)[:2] != ("N", "S")
    nodes = skip_nodes(model)
    assert [len(n.outputs) for n in nodes] == [4, 4, 4, 1]
    assert [n.op_type for n in model.graph].count("SimplifiedLayerNormalization") == 1
    assert "Add" not in [n.op_type for n in model.graph]
    assert_valid(model, proto)
    assert_same_outputs(proto, model)
    assert_unchanged_by(model, "fuse-skip-norm")


def merged_heads_text(source: str = "t", fresh: bool = True, bias: bool = True, norm: str = "ln",
                      dtype: str = "float", residual_first: bool = False) -> tuple[str, dict]:
    """An attention-style output path: n = norm(x) split into 2 heads of 4, transposed there and back, merged with a
    target read from Shape(`source`) (TorchScript's Concat(Gather(Shape(t), 0), Gather(Shape(t), 2), -1)), projected,
    and added to the residual x. With `fresh`, shape inference's names for t and u are unrelated to x's (X0, X1), so
    only the dims' producers prove the sum's operands share (B, S); source "z" reads an unrelated input's shape."""
    ln = ("LayerNormalization<axis=-1, epsilon=1e-5>(x, g, beta)" if norm == "ln"
          else "SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(x, g)")
    # n's dims as fuse-rms-norm writes them (ONNX shape inference does not know SimplifiedLayerNormalization)
    value_info = f" <{dtype}[B, S, {H}] n" + (f", {dtype}[X0, 2, S, 4] t, {dtype}[X1, S, 2, 4] u>" if fresh else ">")
    lines = [f"n = {ln}", "r = Reshape(n, heads)", "t = Transpose<perm=[0, 2, 1, 3]>(r)",
             "u = Transpose<perm=[0, 2, 1, 3]>(t)", f"sh = Shape({source})", "b0 = Gather<axis=0>(sh, zero)",
             f"s0 = Gather<axis=0>(sh, {'two' if source == 't' else 'one'})", "mt = Concat<axis=0>(b0, s0, m1)",
             "m = Reshape(u, mt)", "o = MatMul(m, w)"]
    lines += ["ob = Add(o, bias)"] if bias else []
    proj = "ob" if bias else "o"
    lines += [f"s = Add(x, {proj})" if residual_first else f"s = Add({proj}, x)", ln.replace("(x,", "(s,").join(
        ["y = ", ""])]
    extra = f", {dtype}[M, S, {H}] z" if source == "z" else ""
    text = (f"{HEADER}\ng ({dtype}[B, S, {H}] x{extra}) => ({dtype}[B, S, {H}] y){value_info} {{\n  "
            + "\n  ".join(lines) + "\n}")
    npd = NP[dtype]
    inits = {"g": G.astype(npd), "beta": BETA.astype(npd), "bias": BIAS.astype(npd),
             "w": (np.random.default_rng(2).standard_normal((H, H)) / np.sqrt(H)).astype(npd), "heads": np.array([0, 0, 2, 4], np.int64),
             "zero": np.array([0], np.int64), "one": np.array([1], np.int64), "two": np.array([2], np.int64),
             "m1": np.array([-1], np.int64)}
    return text, inits


def test_fuse_skip_norm_proves_rows_through_merged_heads():
    text, inits = merged_heads_text()
    model = parse(text, inits)
    run_passes(model, ["infer-shapes"])
    o = next(n.outputs[0] for n in model.graph if n.outputs[0].name == "ob")
    assert dims_of(o)[0] == "X0"   # not B: the proof follows the dims back through the Reshape and Transposes
    _, counts = check_before_after(text, FUSE, f"""
    {HEADER}
    g (float[B, S, {H}] x) => (float[B, S, {H}] y) {{
      n = LayerNormalization<axis=-1, epsilon=1e-5>(x, g, beta)
      r = Reshape(n, heads)
      t = Transpose<perm=[0, 2, 1, 3]>(r)
      u = Transpose<perm=[0, 2, 1, 3]>(t)
      sh = Shape(t)
      b0 = Gather<axis=0>(sh, zero)
      s0 = Gather<axis=0>(sh, two)
      mt = Concat<axis=0>(b0, s0, m1)
      m = Reshape(u, mt)
      o = MatMul(m, w)
      y = com.microsoft.SkipLayerNormalization<epsilon=1e-5>(o, x, g, beta, bias)
    }}""", initializers=inits, expected_initializers={k: v for k, v in inits.items() if k != "one"})
    assert counts == {"skip-layer-norm-bias": 1}


def test_fuse_skip_norm_rejects_merged_heads_sized_by_another_input():
    # the merge's batch is read from Shape(z) of an unrelated input (M): nothing ties it to x's B
    text, inits = merged_heads_text(source="z")
    assert_refused(text, inits, "cannot prove that one operand broadcasts to the other as skip "
                                "(dims ('B', 'S', 8) and ('M', 'S', 8))")


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["t", "u", "n", "z"]), st.booleans(), st.booleans(), st.sampled_from(["ln", "sln"]),
       st.sampled_from(["float", "float16"]), st.booleans())
def test_fuse_skip_norm_merged_heads_property(source, fresh, bias, norm, dtype, residual_first):
    """Fires exactly when the merge target's batch is read from the attention path (t, u or n), whatever the names."""
    text, inits = merged_heads_text(source, fresh, bias, norm, dtype, residual_first)
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = FUSE(model)
    rule = ("skip-layer-norm" if norm == "ln" else "skip-simplified-layer-norm") + ("-bias" if bias else "")
    assert counts == ({} if source == "z" else {rule: 1}), counts
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims={"B": 2, "S": 3, "M": 2},
                        precision=np.float16 if dtype == "float16" else None)
    assert_unchanged_by(model, "fuse-skip-norm")


# ------------------------------------------------------------------------------------------------ refusals
def test_fuse_skip_norm_rejects_4d_sum():
    text, inits = skip_model(x_dims=f"N, A, S, {H}")
    assert_refused(text, inits, "ORT's skip norms take 2-D or 3-D input, the sum has dims ('N', 'A', 'S', 8)")


def test_fuse_skip_norm_rejects_dynamic_hidden_size():
    text, inits = skip_model(x_dims="N, S, C")
    inits["g"] = G  # the graph is only inspected
    assert_refused(text, inits, "hidden size (last dim C) is not static")


def test_fuse_skip_norm_rejects_unprovable_batch_broadcast():
    # x (N, S, H) + h (M, S, H): one of N, M may be 1 at run time, and ORT would silently read the larger one modulo.
    text, inits = skip_model(h_dims=f"M, S, {H}")
    assert_refused(text, inits, "cannot prove that one operand broadcasts to the other as skip "
                                "(dims ('N', 'S', 8) and ('M', 'S', 8))")


def test_fuse_skip_norm_rejects_sequence_broadcast():
    # (N, 1, H) broadcasts in the graph, but ORT needs skip's last two dims equal to input's.
    text, inits = skip_model(h_dims=f"N, 1, {H}")
    assert_refused(text, inits, "cannot prove that one operand broadcasts to the other as skip")


def test_fuse_skip_norm_rejects_broadcast_hidden():
    text, inits = skip_model(h_dims="N, S, 1")
    assert_refused(text, inits, "operand's last dim is not the hidden size 8 (dims ('N', 'S', 1))")


def test_fuse_skip_norm_leaves_embedding_sums():
    text = f"""{HEADER}
    g (int64[N, S] ids, int64[N, S] pos) => (float[N, S, {H}] y) {{
      we = Gather(wte, ids)
      pe = Gather(wpe, pos)
      s = Add(we, pe)
      y = LayerNormalization<axis=-1, epsilon=1e-5>(s, g, beta)
    }}"""
    inits = {"wte": rng.standard_normal((16, H)).astype(np.float32),
             "wpe": rng.standard_normal((16, H)).astype(np.float32), "g": G, "beta": BETA}
    assert_refused(text, inits, "a sum of embedding lookups is left for EmbedLayerNormalization")


def test_fuse_skip_norm_rejects_mixed_dtypes():
    text, inits = skip_model(dtype="float16")
    inits["g"] = G  # fp32 scale under an fp16 sum (ORT's SimplifiedLayerNormalization allows it; Skip does not)
    assert_refused(text, inits, "operands have different or unknown dtypes")


def test_fuse_skip_norm_rejects_norm_over_other_axis():
    text, inits = skip_model(norm="ln", x_dims=f"N, {H}, {H}")
    text = text.replace("LayerNormalization<axis=-1", "LayerNormalization<axis=1")
    assert_refused(text, inits, "the norm's axis 1 is not the last")


def test_fuse_skip_norm_runtime_bias_stays_in_the_sum():
    text, inits = skip_model(bias=True, export=True)
    del inits["bias"]
    text = text.replace(f"float[N, S, {H}] h)", f"float[N, S, {H}] h, float[{H}] bias)")
    assert_refused(text, inits, "bias is not a constant vector of the hidden size",
                   {"skip-simplified-layer-norm": 1})


def test_fuse_skip_norm_rejects_used_mean_output():
    text, inits = skip_model(norm="ln")
    text = text.replace("y = LayerNormalization<axis=-1, epsilon=1e-5>(s, g, beta)",
                        "y, mu = LayerNormalization<axis=-1, epsilon=1e-5>(s, g, beta)")
    text = text.replace(f"=> (float[N, S, {H}] y)", f"=> (float[N, S, {H}] y, float[N, S, 1] mu)")
    assert_refused(text, inits, "intermediate value 'mu' is a graph output")


# ------------------------------------------------------------------------------------------------ property
@st.composite
def skip_cases(draw):
    norm = draw(st.sampled_from(["sln", "ln"]))
    x_dims = draw(st.sampled_from([f"N, S, {H}", f"2, 3, {H}", f"T, {H}"]))
    h_dims = x_dims
    if x_dims != f"T, {H}" and draw(st.integers(0, 3)) == 0:
        h_dims = draw(st.sampled_from([f"1, {x_dims.split(', ')[1]}, {H}", f"{x_dims.split(', ')[1]}, {H}"]))
    return {"norm": norm, "bias": draw(st.booleans()), "bias_first": draw(st.booleans()),
            "residual_first": draw(st.booleans()), "export": draw(st.booleans()),
            "beta": norm == "ln" and draw(st.booleans()), "dtype": draw(st.sampled_from(["float", "float16"])),
            "x_dims": x_dims, "h_dims": h_dims}


@settings(max_examples=30, deadline=None)
@given(skip_cases(), st.sampled_from([None, None, None, "unprovable"]))
def test_fuse_skip_norm_property(kw, broken):
    """Verifier, numbers, idempotence; fires exactly once, never when the skip's batch is not provably input's."""
    if broken:
        kw = {**kw, "x_dims": f"N, S, {H}", "h_dims": f"M, S, {H}"}
    text, inits = skip_model(**kw)
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = FUSE(model)
    rule = ("skip-layer-norm" if kw["norm"] == "ln" else "skip-simplified-layer-norm") + ("-bias" if kw["bias"] else "")
    assert counts == ({} if broken else {rule: 1}), (kw, counts)
    if not broken:
        (node,) = skip_nodes(model)
        assert len(node.outputs) == (4 if kw["export"] else 1)
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims={"N": 2, "S": 3, "T": 5, "M": 2},
                        precision=np.float16 if kw["dtype"] == "float16" else None)
    assert_unchanged_by(model, "fuse-skip-norm")


# ------------------------------------------------------------------------------------------------ fixtures
ROOT = Path(__file__).resolve().parents[2] / "fixtures"
ENTRIES = json.loads((ROOT / "manifest.json").read_text())["models"]


def expected_counts(entry: dict) -> tuple[dict[str, int], int]:
    """(fuse-skip-norm counts, plain norms left) for a fixture."""
    layers = entry["config"]["num_layers"]
    if entry["family"] == "bert":   # post-LN: both norms of a layer follow the bias Add of a projection
        return {"skip-layer-norm-bias": 2 * layers}, 1               # the embedding LayerNorm is left
    if entry["family"] == "gpt2":   # lower-gemm (in the cleanup) leaves each projection's bias Add visible
        if entry["exporter"] == "ts":
            # ln_2's residual Add, with attention unfused: the attention output's batch dim is the broadcast of the
            # mask's and the hidden states' (MatMul(P, V), P's batch named afresh), so skip-broadcasts-to-input is
            # unprovable here; after fuse-attention it is (test_fuse_skip_norm_gpt2_ts_after_attention).
            return {"skip-layer-norm-bias": 2 * layers - 2}, 3
        return {"skip-layer-norm-bias": 2 * layers}, 1               # ln_1 of layer 0 sums embeddings
    per_head = 2 * layers if entry["family"] == "qwen3" else 0        # qwen3's q/k norms have no residual
    return {"skip-simplified-layer-norm": 2 * layers}, 1 + per_head


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: Path(e["file"]).stem)
def test_fuse_skip_norm_fixture(entry):
    res = onnxc.compile(ROOT / entry["file"], level=2,
                        passes=f"{O1},fuse-layer-norm,fuse-rms-norm,fuse-skip-norm,{CLEANUP}")
    assert res.report["verification"]["status"] == "passed"
    want, plain_left = expected_counts(entry)
    got = {k.split(":")[1]: v for k, v in res.report["rule_counts"].items() if k.startswith("fuse-skip-norm:")}
    assert got == want
    if entry["family"] not in ("bert", "gpt2"):   # every RMSNorm fused first (test_fuse_rms_norm has the details)
        layers = entry["config"]["num_layers"]
        rms = 2 * layers + 1 + (2 * layers if entry["family"] == "qwen3" else 0)
        assert res.report["rule_counts"].get("fuse-rms-norm:rms-norm") == rms
    ops = res.report["ops_after"]
    assert "ReduceMean" not in ops
    assert ops.get("LayerNormalization", 0) + ops.get("SimplifiedLayerNormalization", 0) == plain_left
    skips = [n for n in res.model.graph.node if n.op_type.startswith("Skip")]
    exported = [n for n in skips if len(n.output) == 4 and n.output[3]]
    assert all(n.output[1] == n.output[2] == "" for n in exported)
    if entry["kind"] == "decoder" and entry["family"] != "gpt2":     # all but the final norm feed the next residual
        assert len(exported) == len(skips) - 1


@pytest.mark.parametrize("lowered", [True, False])
@pytest.mark.parametrize("name", ["gpt2_ts", "gpt2_ts_past"])
def test_fuse_skip_norm_gpt2_ts_after_attention(name, lowered):
    # The attention output path keeps exporter Reshape/Transpose whose targets were sized from the unfused attention;
    # the proof follows each dim to the fused op's query (see merged_heads_text): every residual norm fuses. Without
    # lower-gemm (and unflatten-rows, which lowers the same Gemm as a one-op region) the projection stays
    # Reshape(Gemm(Reshape(x))), its unflatten target read from Shape of the attention output: the same proof goes
    # through it (the bias then stays in the Gemm).
    o1 = O1 if lowered else O1.replace("lower-gemm,", "").replace("unflatten-rows,", "")
    res = onnxc.compile(ROOT / "models" / f"{name}.onnx", level=2,
                        passes=f"{o1},fuse-layer-norm,fuse-attention,fuse-embed-layer-norm,fuse-skip-norm,{CLEANUP}")
    assert res.report["verification"]["status"] == "passed"
    got = {k.split(":")[1]: v for k, v in res.report["rule_counts"].items() if k.startswith("fuse-skip-norm:")}
    assert got == ({"skip-layer-norm-bias": 4} if lowered else {"skip-layer-norm": 4})
    assert "LayerNormalization" not in res.report["ops_after"]
