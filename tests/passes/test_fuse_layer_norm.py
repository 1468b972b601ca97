"""fuse-layer-norm: decomposed LayerNorm (every exporter form, any opset) becomes LayerNormalization."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxc
import pytest
from helpers import (
    assert_refused,
    assert_same_outputs,
    assert_unchanged_by,
    break_norm,
    check_before_after,
    check_fusion,
    counting,
    parse,
    parse_proto,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.pipeline import CLEANUP, O1

PASS = "fuse-layer-norm"
FUSE = counting(PASS, before=("infer-shapes",), after=("eliminate-dead",))
H = 8
rng = np.random.default_rng(0)
G = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
B = (0.1 * rng.standard_normal(H)).astype(np.float32)
DT = {"float": (1, np.float32), "float16": (10, np.float16)}


def ln_model(*, opset=17, square="pow", inv="div", affine="both", gamma_first=False, casts=False, dtype="float",
             dims="N, S", extra_use=False) -> tuple[str, dict]:
    """A LayerNorm over the last axis as torch writes it below opset 17 (casts: fp16 x cast up, n cast back)."""
    shape = f"{dims}, {H}"
    lines = ["xc = Cast<to=1>(x)" if casts else "xc = Identity(x)"]
    reduce = "ReduceMean<keepdims=1>({}, axes)" if opset >= 18 else "ReduceMean<axes=[-1], keepdims=1>({})"
    lines += ["mean = " + reduce.format("xc"), "d = Sub(xc, mean)",
              "sq = Pow(d, two)" if square == "pow" else "sq = Mul(d, d)", "var = " + reduce.format("sq"),
              "v = Add(var, eps)", "s = Sqrt(v)"]
    lines.append({"reciprocal": "r = Reciprocal(s)\n  n = Mul(d, r)", "div1": "r = Div(one, s)\n  n = Mul(r, d)",
                  "div": "n = Div(d, s)"}[inv])
    nc = "nc" if casts else "n"
    if casts:
        lines.append(f"nc = Cast<to={DT[dtype][0]}>(n)")
    if affine == "none":
        lines.append(f"y = Identity({nc})")
    else:
        lines.append(f"m = Mul(g, {nc})" if gamma_first else f"m = Mul({nc}, g)")
        lines.append("y = Add(m, b)" if affine == "both" else "y = Identity(m)")
    outputs = f"{dtype}[{shape}] y"
    if extra_use:
        lines.append("z = Neg(y)")
        outputs += f", {dtype}[{shape}] z"
    cdt = np.float32 if casts else DT[dtype][1]
    inits = {"two": np.array(2.0, cdt), "eps": np.array(1e-5, cdt), "one": np.array(1.0, cdt),
             "axes": np.array([-1], np.int64), "g": G.astype(DT[dtype][1]), "b": B.astype(DT[dtype][1])}
    text = (f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
            f"g ({dtype}[{shape}] x) => ({outputs}) {{\n  " + "\n  ".join(lines) + "\n}")
    return text, inits


def fused(text: str, inits: dict):
    model = parse(text, inits)
    return model, FUSE(model)


# ------------------------------------------------------------------------------------------------ before/after
def test_fuse_layer_norm_torchscript_form():
    text, inits = ln_model()
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      y = LayerNormalization<axis=-1, epsilon=1e-5>(xc, g, b)
    }}""", initializers=inits, expected_initializers={"g": G, "b": B})
    assert counts == {"layer-norm": 1}


def test_fuse_layer_norm_opset18_axes_input_gamma_first_reciprocal():
    text, inits = ln_model(opset=18, gamma_first=True, inv="reciprocal", square="mul")
    model, counts = fused(text, inits)
    assert counts == {"layer-norm": 1}
    assert [n.op_type for n in model.graph] == ["Identity", "LayerNormalization"]
    assert_same_outputs(parse_proto(text, inits), model)


@pytest.mark.parametrize("opset", [11, 14, 16])
def test_fuse_layer_norm_below_opset_17_emits_layer_normalization(opset):
    # LayerNormalization is ONNX from 17, but onnxruntime registers it in the default domain from version 1:
    # the fused model runs (and matches) on ORT at the model's own opset.
    text, inits = ln_model(opset=opset, inv="div1")
    model, counts = fused(text, inits)
    assert counts == {"layer-norm": 1}
    assert model.opset_imports[""] == opset
    assert_same_outputs(parse_proto(text, inits), model)


def test_fuse_layer_norm_without_bias():
    text, inits = ln_model(affine="scale")
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      ln = LayerNormalization<axis=-1, epsilon=1e-5>(xc, g)
      y = Identity(ln)
    }}""", initializers=inits, expected_initializers={"g": G})
    assert counts == {"layer-norm-no-bias": 1}


@pytest.mark.parametrize("inv, rule", [("div", "layer-norm-unscaled-div"), ("reciprocal", "layer-norm-unscaled")])
def test_fuse_layer_norm_without_affine_uses_ones(inv, rule):
    text, inits = ln_model(affine="none", inv=inv)
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      ln = LayerNormalization<axis=-1, epsilon=1e-5>(xc, ones)
      y = Identity(ln)
    }}""", initializers=inits, expected_initializers={"ones": np.ones(H, np.float32)})
    assert counts == {rule: 1}


def test_fuse_layer_norm_fp16_casts_cancel():
    text, inits = ln_model(casts=True, dtype="float16")
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float16[N, S, {H}] x) => (float16[N, S, {H}] y) {{
      y = LayerNormalization<axis=-1, epsilon=1e-5>(x, g, b)
    }}""", initializers=inits, expected_initializers={"g": G.astype(np.float16), "b": B.astype(np.float16)})
    assert counts == {"layer-norm": 1}


@pytest.mark.parametrize("dims", ["N", "2, 3", "B, 4, S"])
def test_fuse_layer_norm_ranks(dims):
    text, inits = ln_model(dims=dims)
    model, counts = fused(text, inits)
    assert counts == {"layer-norm": 1}
    assert_same_outputs(parse_proto(text, inits), model, dims={"N": 3, "B": 2, "S": 3})


def test_fuse_layer_norm_broadcast_params_become_1d():
    text, inits = ln_model()
    inits["g"], inits["b"] = G.reshape(1, 1, H), np.array(0.5, np.float32)
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      y = LayerNormalization<axis=-1, epsilon=1e-5>(xc, g1, b1)
    }}""", initializers=inits, expected_initializers={"g1": G, "b1": np.full(H, 0.5, np.float32)})
    assert counts == {"layer-norm": 1}


def test_fuse_layer_norm_is_idempotent():
    text, inits = ln_model()
    model, _ = fused(text, inits)
    assert_unchanged_by(model, "fuse-layer-norm")


# ------------------------------------------------------------------------------------------------ refusals
def test_fuse_layer_norm_rejects_non_constant_epsilon():
    text, inits = ln_model()
    del inits["eps"]
    assert_refused(PASS, text.replace("g (float[N, S", "g (float eps, float[N, S"), inits,
                   "epsilon is not a scalar constant")


def test_fuse_layer_norm_rejects_mean_over_other_axis():
    text, inits = ln_model(opset=18)
    text = text.replace("mean = ReduceMean<keepdims=1>(xc, axes)", "mean = ReduceMean<keepdims=1>(xc, ax0)")
    inits["ax0"] = np.array([0], np.int64)
    assert_refused(PASS, text, inits, "ReduceMean axes [0] are not the last axis only")


def test_fuse_layer_norm_rejects_dynamic_hidden_size():
    text, inits = ln_model(affine="none")
    assert_refused(PASS, text.replace(f"N, S, {H}]", "N, S, H]"), inits, "hidden size (last dim H) is not static")


def test_fuse_layer_norm_rejects_per_row_bias():
    text, inits = ln_model(dims="3")
    inits["b"] = np.ones((3, H), np.float32)
    # Scale and normalization still fuse; the per-row Add stays outside.
    assert_refused(PASS, text, inits, "b of shape [3, 8] does not broadcast along the last axis only",
                   {"layer-norm-no-bias": 1})


def test_fuse_layer_norm_rejects_centered_value_used_elsewhere():
    text, inits = ln_model()
    text = text.replace(f"=> (float[N, S, {H}] y)", f"=> (float[N, S, {H}] y, float[N, S, {H}] d)")
    assert_refused(PASS, text, inits, "intermediate value 'd' is a graph output")


# ------------------------------------------------------------------------------------------------ property
@st.composite
def ln_cases(draw):
    casts = draw(st.booleans())
    return {"opset": draw(st.sampled_from([14, 17, 18, 23])), "square": draw(st.sampled_from(["pow", "mul"])),
            "inv": draw(st.sampled_from(["reciprocal", "div1", "div"])),
            "affine": draw(st.sampled_from(["both", "both", "scale", "none"])), "gamma_first": draw(st.booleans()),
            "casts": casts, "dtype": "float16" if casts or draw(st.booleans()) else "float",
            "dims": draw(st.sampled_from(["N, S", "2, 5", "N", "B, 4, S"])), "extra_use": draw(st.booleans())}


@settings(max_examples=30, deadline=None)
@given(ln_cases(), st.sampled_from([None, None, None, "eps", "axes"]))
def test_fuse_layer_norm_property(kw, broken):
    """Verifier, numbers, idempotence; fires exactly once, or never when epsilon is a vector or the axis not last."""
    text, inits = break_norm(*ln_model(**kw), broken, H)
    check_fusion(text, inits, FUSE, PASS, fires=not broken, removed_op="ReduceMean",
                 dims={"N": 2, "S": 3, "B": 2}, precision=np.float16 if kw["dtype"] == "float16" else None)


# ------------------------------------------------------------------------------------------------ fixtures
ROOT = Path(__file__).resolve().parents[2] / "fixtures"
LN_FIXTURES = [e for e in json.loads((ROOT / "manifest.json").read_text())["models"] if e["family"] in ("bert", "gpt2")]


def decompose_layer_norms(proto: onnx.ModelProto, opset: int | None = None) -> tuple[onnx.ModelProto, int]:
    """Rewrite every LayerNormalization (last axis) into the primitives torch exports below opset 17."""
    opset = opset or next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    g = proto.graph
    nodes, count = [], 0
    for node in g.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        count += 1
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        x, scale, bias = (list(node.input) + [""])[:3]
        p = f"ln{count}_"
        g.initializer.extend(onnx.numpy_helper.from_array(v, p + k) for k, v in (
            ("two", np.array(2.0, np.float32)), ("eps", np.array(eps, np.float32)), ("axes", np.array([-1]))))
        axes = {} if opset >= 18 else {"axes": [-1]}
        extra = [p + "axes"] if opset >= 18 else []
        nodes += [onnx.helper.make_node("ReduceMean", [x, *extra], [p + "mean"], keepdims=1, **axes),
                  onnx.helper.make_node("Sub", [x, p + "mean"], [p + "d"]),
                  onnx.helper.make_node("Pow", [p + "d", p + "two"], [p + "sq"]),
                  onnx.helper.make_node("ReduceMean", [p + "sq", *extra], [p + "var"], keepdims=1, **axes),
                  onnx.helper.make_node("Add", [p + "var", p + "eps"], [p + "ve"]),
                  onnx.helper.make_node("Sqrt", [p + "ve"], [p + "s"]),
                  onnx.helper.make_node("Div", [p + "d", p + "s"], [p + "n"]),
                  onnx.helper.make_node("Mul", [p + "n", scale], [p + "m" if bias else node.output[0]])]
        if bias:
            nodes.append(onnx.helper.make_node("Add", [p + "m", bias], [node.output[0]]))
    del g.node[:]
    g.node.extend(nodes)
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    return proto, count


# TorchScript fixtures also at opset 14 (their ops mean the same there); dynamo graphs use opset-18 forms.
@pytest.mark.parametrize("entry, opset", [(e, None) for e in LN_FIXTURES] + [
    (e, 14) for e in LN_FIXTURES if e["exporter"] == "ts"], ids=lambda v: Path(v["file"]).stem if isinstance(v, dict)
    else f"opset{v or 'export'}")
def test_fuse_layer_norm_fixture(entry, opset):
    """BERT / GPT-2 with their LayerNorms decomposed (at the export opset, and at 14) get every one back."""
    proto, count = decompose_layer_norms(onnx.load(ROOT / entry["file"]), opset)
    res = onnxc.compile(proto, level=2, passes=f"{O1},fuse-layer-norm,{CLEANUP}")
    assert res.report["verification"]["status"] == "passed"
    assert {k: v for k, v in res.report["rule_counts"].items() if k.startswith("fuse-layer-norm:")} == {
        "fuse-layer-norm:layer-norm": count}
    assert count == 2 * entry["config"]["num_layers"] + 1
    assert "ReduceMean" not in res.report["ops_after"]
