"""fuse-rms-norm: every exporter form of RMSNorm becomes SimplifiedLayerNormalization, and refusals say why."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import (
    assert_refused,
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
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

PASS = "fuse-rms-norm"
FUSE = counting(PASS, before=("infer-shapes",), after=("eliminate-dead",))
H = 8
EPS = np.float32(1e-6)
W = (1 + 0.1 * np.random.default_rng(0).standard_normal(H)).astype(np.float32)
DT = {"float": (1, np.float32), "float16": (10, np.float16)}


def rms_model(*, opset=18, square="pow", inv="reciprocal", weight="1d", weight_first=False, casts="none",
              dtype="float", dims="N, S", extra_use=False) -> tuple[str, dict]:
    """An RMSNorm over the last axis, written the way one exporter or another writes it.

    casts: none | llama (Cast x up, Cast n back, weight in x's dtype) | gemma (Cast x up, weight in fp32, Cast the
    scaled result back) | in (Cast x up only: fp32 result).
    """
    xdt = dtype
    up = casts != "none"
    wdt = "float" if casts in ("gemma", "in") else xdt
    to = DT[xdt][0]
    out_dt = "float" if casts == "in" else xdt
    shape = f"{dims}, {H}"
    lines = ["xc = Cast<to=1>(x)" if up else "xc = Identity(x)"]
    lines.append("sq = Pow(xc, two)" if square == "pow" else "sq = Mul(xc, xc)")
    lines.append("ms = ReduceMean<keepdims=1>(sq, axes)" if opset >= 18 else "ms = ReduceMean<axes=[-1], keepdims=1>(sq)")
    lines += ["v = Add(ms, eps)", "s = Sqrt(v)"]
    lines.append({"reciprocal": "r = Reciprocal(s)\n n = Mul(xc, r)", "div1": "r = Div(one, s)\n n = Mul(r, xc)",
                  "div": "n = Div(xc, s)"}[inv])
    scaled = "Mul(w, {0})" if weight_first else "Mul({0}, w)"
    if weight == "none":
        lines.append("y = Identity(n)")
    elif casts == "llama":
        lines += [f"nc = Cast<to={to}>(n)", "y = " + scaled.format("nc")]
    elif casts == "gemma":
        lines += ["m = " + scaled.format("n"), f"y = Cast<to={to}>(m)"]
    else:
        lines.append("y = " + scaled.format("n"))
    outputs = f"{out_dt}[{shape}] y"
    if extra_use:
        lines.append("z = Neg(y)")
        outputs += f", {out_dt}[{shape}] z"
    cdt = np.float32 if up else DT[xdt][1]
    w = {"1d": W, "row": W.reshape(1, 1, H), "scalar": np.array(1.5, np.float32), "none": None}[weight]
    inits = {"two": np.array(2.0, cdt), "eps": EPS.astype(cdt), "one": np.array(1.0, cdt),
             "axes": np.array([-1], np.int64)}
    if w is not None:
        inits["w"] = w.astype(DT[wdt][1])
    text = (f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
            f"g ({xdt}[{shape}] x) => ({outputs}) {{\n  " + "\n  ".join(lines) + "\n}")
    return text, inits


def fused(text: str, inits: dict) -> tuple[ir.Model, dict]:
    model = parse(text, inits)
    counts = FUSE(model)
    return model, counts


# ------------------------------------------------------------------------------------------------ before/after
def test_fuse_rms_norm_dynamo_form():
    text, inits = rms_model(opset=18)
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(xc, w)
    }}""", initializers=inits, expected_initializers={"w": W})
    assert counts == {"rms-norm": 1}


def test_fuse_rms_norm_torchscript_form_weight_first_div_one():
    # TorchScript: axes as an attribute, Div(1, Sqrt), the weight as the first operand of the last Mul.
    text, inits = rms_model(opset=17, inv="div1", weight_first=True)
    model, counts = fused(text, inits)
    assert counts == {"rms-norm": 1}
    assert [n.op_type for n in model.graph] == ["Identity", "SimplifiedLayerNormalization"]
    assert_same_outputs(parse_proto(text, inits), model)


@pytest.mark.parametrize("square, inv", [("mul", "div"), ("pow", "div"), ("mul", "reciprocal"), ("mul", "div1")])
def test_fuse_rms_norm_square_and_inverse_forms(square, inv):
    text, inits = rms_model(square=square, inv=inv)
    model, counts = fused(text, inits)
    assert counts == {"rms-norm": 1}
    assert_valid(model, parse_proto(text, inits))
    assert_same_outputs(parse_proto(text, inits), model)


def test_fuse_rms_norm_llama_fp16_casts_cancel():
    # Llama: x.to(fp32) -> normalize -> .to(fp16) -> weight(fp16) * ...: one fp16 SimplifiedLayerNormalization.
    text, inits = rms_model(casts="llama", dtype="float16")
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float16[N, S, {H}] x) => (float16[N, S, {H}] y) {{
      y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(x, w)
    }}""", initializers=inits, expected_initializers={"w": W.astype(np.float16)})
    assert counts == {"rms-norm": 1}


def test_fuse_rms_norm_gemma_fp32_scale_then_cast():
    # Gemma: the scale (1 + w, folded) multiplies in fp32 before the cast back: the weight is rounded to fp16.
    text, inits = rms_model(casts="gemma", dtype="float16", weight_first=True)
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float16[N, S, {H}] x) => (float16[N, S, {H}] y) {{
      y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(x, w16)
    }}""", initializers=inits, expected_initializers={"w16": W.astype(np.float16)})
    assert counts == {"rms-norm-cast-after-scale": 1}


def test_fuse_rms_norm_up_cast_only_keeps_fp32_result():
    text, inits = rms_model(casts="in", dtype="float16")
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float16[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Cast<to=1>(x)
      y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(xc, w)
    }}""", initializers=inits, expected_initializers={"w": W})
    assert counts == {"rms-norm": 1}


def test_fuse_rms_norm_without_weight_uses_ones():
    text, inits = rms_model(weight="none")
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      n = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(xc, ones)
      y = Identity(n)
    }}""", initializers=inits, expected_initializers={"ones": np.ones(H, np.float32)})
    assert counts == {"rms-norm-unscaled": 1}


def test_fuse_rms_norm_without_weight_div_form():
    text, inits = rms_model(weight="none", inv="div")
    _, counts = fused(text, inits)
    assert counts == {"rms-norm-unscaled-div": 1}


@pytest.mark.parametrize("weight, expected", [("row", W), ("scalar", np.full(H, 1.5, np.float32))])
def test_fuse_rms_norm_broadcast_weight_becomes_1d(weight, expected):
    text, inits = rms_model(weight=weight)
    _model, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(xc, w1)
    }}""", initializers=inits, expected_initializers={"w1": expected})
    assert counts == {"rms-norm": 1}


@pytest.mark.parametrize("dims", ["B, S, 4", "B, 4, S"])
def test_fuse_rms_norm_per_head_4d(dims):
    # Qwen3's q/k norms: (B, S, N, head_dim) before the transpose, (B, N, S, head_dim) after; last axis only.
    text, inits = rms_model(dims=dims, weight_first=True)
    model, counts = fused(text, inits)
    assert counts == {"rms-norm": 1}
    assert_same_outputs(parse_proto(text, inits), model, dims={"B": 2, "S": 3})


@pytest.mark.parametrize("opset", [14, 17, 18, 23])
def test_fuse_rms_norm_opsets(opset):
    text, inits = rms_model(opset=opset)
    model, counts = fused(text, inits)
    assert counts == {"rms-norm": 1}
    assert_same_outputs(parse_proto(text, inits), model)


def test_fuse_rms_norm_output_used_twice_still_fuses():
    text, inits = rms_model(extra_use=True)
    model, counts = fused(text, inits)
    assert counts == {"rms-norm": 1}
    assert_same_outputs(parse_proto(text, inits), model)


def test_fuse_rms_norm_non_constant_weight():
    text, inits = rms_model()
    del inits["w"]
    text = text.replace(f"g (float[N, S, {H}] x)", f"g (float[N, S, {H}] x, float[{H}] w)")
    model, counts = fused(text, inits)
    assert counts == {"rms-norm": 1}
    assert any(n.op_type == "SimplifiedLayerNormalization" and n.inputs[1].name == "w" for n in model.graph)


def test_fuse_rms_norm_gemma_unfolded_one_plus_weight():
    # Before fold-constants Gemma's scale is Add(1, w): a computed 1-D scale is taken as it is.
    text, inits = rms_model(weight_first=True)
    text = text.replace("y = Mul(w, n)", "wp = Add(one, w)\n  y = Mul(wp, n)")
    _, counts = check_before_after(text, FUSE, f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, S, {H}] x) => (float[N, S, {H}] y) {{
      xc = Identity(x)
      wp = Add(one, w)
      y = SimplifiedLayerNormalization<axis=-1, epsilon=1e-6>(xc, wp)
    }}""", initializers=inits, expected_initializers={"w": W, "one": np.array(1.0, np.float32)})
    assert counts == {"rms-norm": 1}


def test_fuse_rms_norm_is_idempotent():
    text, inits = rms_model()
    model, _ = fused(text, inits)
    assert_unchanged_by(model, "fuse-rms-norm")


# ------------------------------------------------------------------------------------------------ refusals
def test_fuse_rms_norm_rejects_non_constant_epsilon():
    text, inits = rms_model()
    del inits["eps"]
    text = text.replace(f"g (float[N, S, {H}] x)", f"g (float[N, S, {H}] x, float eps)")
    assert_refused(PASS, text, inits, "epsilon is not a scalar constant")


def test_fuse_rms_norm_rejects_vector_epsilon():
    text, inits = rms_model()
    inits["eps"] = np.full(H, 1e-6, np.float32)
    assert_refused(PASS, text, inits, "epsilon is not a scalar constant")


def test_fuse_rms_norm_rejects_reduction_over_other_axis():
    text, inits = rms_model()
    inits["axes"] = np.array([1], np.int64)
    assert_refused(PASS, text.replace(f"float[N, S, {H}]", f"float[N, {H}, {H}]"), inits,
                   "ReduceMean axes [1] are not the last axis only")


def test_fuse_rms_norm_rejects_reduction_over_two_axes():
    text, inits = rms_model()
    inits["axes"] = np.array([-2, -1], np.int64)
    assert_refused(PASS, text, inits, "are not the last axis only")


def test_fuse_rms_norm_rejects_dynamic_hidden_size():
    text, inits = rms_model(weight="none")
    assert_refused(PASS, text.replace(f"N, S, {H}]", "N, S, H]"), inits, "hidden size (last dim H) is not static")


def test_fuse_rms_norm_rejects_per_row_weight():
    text, inits = rms_model(dims="3")
    inits["w"] = np.ones((3, H), np.float32)
    # The normalization alone still fuses; the per-row Mul stays outside.
    assert_refused(PASS, text, inits, "does not broadcast along the last axis only", {"rms-norm-unscaled": 1})


def test_fuse_rms_norm_rejects_2d_runtime_weight():
    text, inits = rms_model()
    del inits["w"]
    text = text.replace(f"g (float[N, S, {H}] x)", f"g (float[N, S, {H}] x, float[S, {H}] w)")
    assert_refused(PASS, text, inits, "non-constant weight of shape ('S', 8) is not 1-D of size 8",
                   {"rms-norm-unscaled": 1})


def test_fuse_rms_norm_rejects_narrowing_input_cast():
    # fp32 x normalized in fp16 and cast back: a fused fp32 kernel would be *more* accurate than the graph.
    text, inits = rms_model(casts="llama", dtype="float16")
    text = text.replace("float16[N, S", "float[N, S").replace("Cast<to=1>(x)", "Cast<to=10>(x)").replace(
        "Cast<to=10>(n)", "Cast<to=1>(n)")
    for k in ("two", "eps", "one"):
        inits[k] = inits[k].astype(np.float16)
    inits["w"] = inits["w"].astype(np.float32)
    # The narrowing Cast is refused; without it (x := the fp16 Cast) the fp32 weight Mul is refused too, so only the
    # fp16 normalization fuses and the weight Mul stays outside.
    assert_refused(PASS, text, inits, "the result (FLOAT) is wider than the normalization (FLOAT16)",
                   {"rms-norm-unscaled": 1}, np.float16)


def test_fuse_rms_norm_rejects_intermediate_used_elsewhere():
    text, inits = rms_model()
    text = text.replace(f"=> (float[N, S, {H}] y)", f"=> (float[N, S, {H}] y, float[N, S, 1] s)")
    assert_refused(PASS, text, inits, "intermediate value 's' is a graph output")


# ------------------------------------------------------------------------------------------------ property
@st.composite
def rms_cases(draw):
    casts = draw(st.sampled_from(["none", "none", "llama", "gemma", "in"]))
    dtype = "float" if casts == "none" and draw(st.booleans()) else "float16"
    weight = "none" if casts == "none" and draw(st.integers(0, 4)) == 0 else draw(
        st.sampled_from(["1d", "1d", "row", "scalar"]))
    return {"opset": draw(st.sampled_from([14, 17, 18, 23])), "square": draw(st.sampled_from(["pow", "mul"])),
            "inv": draw(st.sampled_from(["reciprocal", "div1", "div"])), "weight": weight,
            "weight_first": draw(st.booleans()), "casts": casts, "dtype": dtype,
            "dims": draw(st.sampled_from(["N, S", "2, 5", "N", "B, 4, S"])), "extra_use": draw(st.booleans())}


@settings(max_examples=30, deadline=None)
@given(rms_cases(), st.sampled_from([None, None, None, "eps", "axes"]))
def test_fuse_rms_norm_property(kw, broken):
    """Verifier, numbers, idempotence; fires exactly once, or never when epsilon is a vector or the axis not last."""
    text, inits = break_norm(*rms_model(**kw), broken, H)
    check_fusion(text, inits, FUSE, PASS, fires=not broken, removed_op="ReduceMean",
                 dims={"N": 2, "S": 3, "B": 2}, precision=np.float16 if kw["dtype"] == "float16" else None)


# ------------------------------------------------------------------------------------------------ fixtures
ROOT = Path(__file__).resolve().parents[2] / "fixtures"
# Without a KV cache, plus the fp16 model (test_fuse_skip_norm compiles every fixture through all three passes).
DECODERS = [e for e in json.loads((ROOT / "manifest.json").read_text())["models"]
            if e.get("kind") == "decoder" and e["family"] != "gpt2" and (not e["past"] or e["dtype"] != "float32")]


@pytest.mark.parametrize("entry", DECODERS, ids=lambda e: Path(e["file"]).stem)
def test_fuse_rms_norm_fixture(entry):
    layers = entry["config"]["num_layers"]
    expected = 2 * layers + 1 + (2 * layers if entry["family"] == "qwen3" else 0)   # qwen3: q/k norms per layer
    res = onnxc.compile(ROOT / entry["file"], level=2, passes=f"{O1},fuse-rms-norm,{CLEANUP}")
    assert res.report["verification"]["status"] == "passed"
    assert res.report["rule_counts"] == {**{k: v for k, v in res.report["rule_counts"].items()
                                            if not k.startswith("fuse-rms-norm:")}, "fuse-rms-norm:rms-norm": expected}
    assert "ReduceMean" not in res.report["ops_after"]
