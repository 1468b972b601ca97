"""fuse-gelu: every GELU arrangement fuses (structure and numbers), refuses with its reason, and the fixtures fuse."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import (
    assert_close,
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    counting,
    parse,
    parse_proto,
    random_feeds,
    run_ort,
    run_pass,
    run_passes,
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.kernels import activations
from onnxc.passes import fuse_gelu as fg
from onnxc.pipeline import CLEANUP, O1
from onnxc.rules import explain

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "models"
MS_HEADER = '<ir_version: 8, opset_import: ["" : 18, "com.microsoft": 1]>'
GELU = counting("fuse-gelu", before=("infer-shapes",), after=("eliminate-dead",))
APPROX = counting("fuse-gelu", before=("infer-shapes",), after=("eliminate-dead",), approximate_gelu=True)
RULE = {r.name: r for r in fg.FuseGelu().rules()}
NP = {"float": np.float32, "float16": np.float16, "double": np.float64}
TO = {"float": 1, "float16": 10, "double": 11, "bfloat16": 16}
WIDER = {"float": "double", "float16": "float"}


# ------------------------------------------------------------------------------------------------ graph builder
@dataclass
class Gelu:
    """An expanded GELU in ONNX text; `swap` bit i swaps the operands of the i-th commutative node."""

    flavour: str = "erf"          # erf | tanh
    product: str = "xh"           # (0.5x)(1+t) | xp: (x(1+t))0.5 | hp: x(0.5(1+t)) | ht: x(0.5 + 0.5t)
    scale: str = "div"            # erf: x / √2 | mul: x * (1/√2)
    cube: str = "pow"             # tanh: Pow(x, 3) | mul: x*(x*x)
    arg: str = "sum"              # tanh: c(x + kx³) | factored: (xc)(1 + kx²)
    mono: str = "k(xx)"           # tanh: kx² as k(xx) | (kx)x (BLOOM), kx³ as k·cube | ((kx)x)x
    dtype: str = "float"
    swap: int = 0
    cast: str | None = None       # compute Erf/Tanh in this type
    bias: tuple | None = None     # shape of a constant bias added before the GELU
    dims: str = "N, 8"
    consts: dict = field(default_factory=dict)
    also_out: str | None = None   # an intermediate that is also a graph output

    def text(self) -> tuple[str, dict[str, np.ndarray]]:
        lines: list[str] = []
        k = [0]

        def op(out: str, name: str, a: str, b: str, commutative: bool = True) -> str:
            if commutative and (self.swap >> k[0]) & 1:
                a, b = b, a
            k[0] += commutative
            lines.append(f"{out} = {name}({a}, {b})")
            return out

        values = {"h": 0.5, "h2": 0.5, "one": 1.0, "three": 3.0, "k": 0.044715, "c": math.sqrt(2 / math.pi),
                  "s": math.sqrt(2) if self.scale == "div" else 1 / math.sqrt(2), **self.consts}
        inputs = "a" if self.bias else "x"
        if self.bias:
            op("x", "Add", "a", "bias")
        if self.flavour == "erf":
            core = op("u", "Div" if self.scale == "div" else "Mul", "x", "s", self.scale != "div")
        else:
            if self.arg == "sum":
                if self.mono == "(kx)x":
                    kc = op("kc", "Mul", op("kxx", "Mul", op("kx", "Mul", "k", "x"), "x"), "x")
                else:
                    cube = (op("cube", "Pow", "x", "three", False) if self.cube == "pow"
                            else op("cube", "Mul", "x", op("sq", "Mul", "x", "x")))
                    kc = op("kc", "Mul", "k", cube)
                core = op("arg", "Mul", "c", op("inner", "Add", "x", kc))
            else:
                kx2 = (op("kx2", "Mul", op("kx", "Mul", "k", "x"), "x") if self.mono == "(kx)x"
                       else op("kx2", "Mul", "k", op("sq", "Mul", "x", "x")))
                q = op("q", "Add", kx2, "one")
                core = op("arg", "Mul", op("xc", "Mul", "x", "c"), q)
        fn = "Erf" if self.flavour == "erf" else "Tanh"
        if self.cast:
            lines.append(f"cin = Cast<to={TO[self.cast]}>({core})")
            lines.append(f"tc = {fn}(cin)")
            lines.append(f"t = Cast<to={TO[self.dtype]}>(tc)")
        else:
            lines.append(f"t = {fn}({core})")
        if self.product == "xh":
            op("y", "Mul", op("xh", "Mul", "x", "h"), op("p", "Add", "t", "one"))
        elif self.product == "xp":
            op("y", "Mul", op("xp", "Mul", "x", op("p", "Add", "t", "one")), "h")
        elif self.product == "hp":
            op("y", "Mul", "x", op("hp", "Mul", "h", op("p", "Add", "t", "one")))
        else:
            op("y", "Mul", "x", op("ht", "Add", "h", op("ht2", "Mul", "h2", "t")))
        dt = self.dtype
        outs = f"{dt}[{self.dims}] y"
        if self.also_out:   # an outside user of an intermediate value
            lines.append(f"z = Neg({self.also_out})")
            outs += f", {dt}[{self.dims}] z"
        text = f"g ({dt}[{self.dims}] {inputs}) => ({outs}) {{\n  " + "\n  ".join(lines) + "\n}"
        inits = {n: np.array(v, NP.get(dt, np.float32)) for n, v in values.items() if f", {n})" in text
                 or f"({n}," in text}
        if self.bias:
            rng = np.random.default_rng(3)
            inits["bias"] = (0.1 * rng.standard_normal(self.bias)).astype(NP.get(dt, np.float32))
        return text, inits

    @property
    def fused(self) -> str:
        return "Gelu" if self.flavour == "erf" else "FastGelu"


def expected(case: Gelu, op: str | None = None, bias_init: bool = False) -> str:
    op = op or case.fused
    args = "a, bias" if case.bias else "x"
    dt = case.dtype
    return (f"{MS_HEADER}\ng ({dt}[{case.dims}] {'a' if case.bias else 'x'}) => ({dt}[{case.dims}] y) {{\n"
            f"  y = com.microsoft.{op}({args})\n}}")


def gelu_reference(case: Gelu, x: np.ndarray, approximate: str | None = None) -> np.ndarray:
    flavour = approximate or ("none" if case.flavour == "erf" else "tanh")
    return activations.gelu(x, approximate=flavour)


def assert_refused(case: Gelu, rule: str, reason: str, **options) -> None:
    """The rule does not fire, explain gives `reason`, and fuse-gelu leaves the model as it was."""
    text, inits = case.text()
    model = parse(text, inits)
    run_passes(model, ("infer-shapes",))
    rows = [r for _, r in explain(model, RULE[rule])]
    assert any(reason in r for r in rows), rows
    before = to_bytes(model)
    result = run_pass(model, "fuse-gelu", **options)
    assert result.counts == {} and not result.modified, result.counts
    assert to_bytes(model) == before


def assert_accurate(model: ir.Model, case: Gelu, approximate: str | None = None, seed: int = 0) -> None:
    """The fused model's output agrees with the float64 GELU reference at the dtype's tolerance."""
    feeds = random_feeds(ir.serde.serialize_model(model), seed, {"N": 3, "S": 5})
    x = feeds["a"].astype(np.float64) + case.text()[1]["bias"].reshape(-1) if case.bias else feeds["x"]
    want = gelu_reference(case, x, approximate).astype(NP[case.dtype])
    precision = np.float16 if case.dtype == "float16" else None
    assert_close(run_ort(model, feeds)[0], want, "vs reference", precision=precision)


# ------------------------------------------------------------------------------------------------ arrangements
ARRANGEMENTS = [
    pytest.param(Gelu(product="xp"), "fuse-gelu-erf", id="erf-torchscript"),         # (x(1+erf))0.5
    pytest.param(Gelu(product="hp"), "fuse-gelu-erf-factored", id="erf-dynamo"),     # x(0.5(1+erf))
    pytest.param(Gelu(product="xh"), "fuse-gelu-erf", id="erf-half-x"),              # (0.5x)(1+erf)
    pytest.param(Gelu(product="ht"), "fuse-gelu-erf-factored", id="erf-distributed"),  # x(0.5 + 0.5erf)
    pytest.param(Gelu(scale="mul", product="xp", swap=0b101), "fuse-gelu-erf", id="erf-mul-inv-sqrt2"),
    pytest.param(Gelu(flavour="tanh", product="xh"), "fuse-gelu-tanh", id="tanh-gpt2"),
    pytest.param(Gelu(flavour="tanh", product="xp", cube="mul", swap=0b11111), "fuse-gelu-tanh", id="tanh-gemma-ts"),
    pytest.param(Gelu(flavour="tanh", product="hp"), "fuse-gelu-tanh-factored", id="tanh-gemma-dynamo"),
    pytest.param(Gelu(flavour="tanh", product="ht", arg="factored"), "fuse-gelu-tanh-factored", id="tanh-gelu-fast"),
    pytest.param(Gelu(flavour="tanh", product="xp", arg="factored", swap=0b1010101), "fuse-gelu-tanh",
                 id="tanh-factored-swapped"),
    pytest.param(Gelu(flavour="tanh", cast="double"), "fuse-gelu-tanh", id="tanh-in-double"),
    # BLOOM: x·0.5·(1 + tanh((√(2/π)·x)·(1 + (0.044715·x)·x)))
    pytest.param(Gelu(flavour="tanh", product="xh", arg="factored", mono="(kx)x", swap=0b110), "fuse-gelu-tanh",
                 id="tanh-bloom"),
    pytest.param(Gelu(flavour="tanh", product="xp", mono="(kx)x"), "fuse-gelu-tanh", id="tanh-cube-left-assoc"),
]


@pytest.mark.parametrize("case, rule", ARRANGEMENTS)
def test_fuse_gelu_arrangements(case, rule):
    text, inits = case.text()
    model, counts = check_before_after(text, GELU, expected(case), initializers=inits, dims={"N": 3})
    assert counts == {rule: 1}
    assert_accurate(model, case)
    assert_unchanged_by(model, "fuse-gelu")


@pytest.mark.parametrize("flavour", ["erf", "tanh"])
@pytest.mark.parametrize("product", ["xp", "hp"])
def test_fuse_gelu_float16(flavour, product):
    """fp16 constants (√2 -> 1.4140625, 0.044715 -> 0.04474) are within fp16 rounding; ORT runs the fused op in
    float through inserted Casts, so it is at least as accurate as the fp16 chain."""
    case = Gelu(flavour=flavour, product=product, dtype="float16", dims="N, S, 8")
    text, inits = case.text()
    proto = parse_proto(text, inits)
    model, counts = check_before_after(text, GELU, expected(case), initializers=inits, numeric=False)
    assert len(counts) == 1
    assert_same_outputs(proto, model, dims={"N": 2, "S": 3}, seeds=(0, 1))
    assert_accurate(model, case)


def test_fuse_gelu_float16_core_in_float():
    case = Gelu(dtype="float16", cast="float", product="xh")
    text, inits = case.text()
    model, counts = check_before_after(text, GELU, expected(case), initializers=inits, numeric=False)
    assert counts == {"fuse-gelu-erf": 1}
    assert_accurate(model, case)


def test_fuse_gelu_dynamic_dims_and_rank_3():
    case = Gelu(flavour="tanh", product="hp", dims="B, S, H")
    text, inits = case.text()
    _, counts = check_before_after(text, GELU, expected(case), initializers=inits, dims={"B": 2, "S": 3, "H": 5})
    assert counts == {"fuse-gelu-tanh-factored": 1}


def test_fuse_gelu_constant_nodes_as_torchscript_writes_them():
    """TorchScript keeps constants as Constant nodes, with the 0.5 first: Mul(0.5, x * (1 + erf(x / √2)))."""
    _, counts = check_before_after("""
    g (float[N, 8] x) => (float[N, 8] y) {
      s = Constant <value = float {1.4142135}> ()
      one = Constant <value = float {1.0}> ()
      h = Constant <value = float {0.5}> ()
      u = Div(x, s)
      e = Erf(u)
      p = Add(one, e)
      xp = Mul(p, x)
      y = Mul(h, xp)
    }""", GELU, f"""{MS_HEADER}
    g (float[N, 8] x) => (float[N, 8] y) {{
      y = com.microsoft.Gelu(x)
    }}""")
    assert counts == {"fuse-gelu-erf": 1}


def test_fuse_gelu_x_with_other_users_still_fuses():
    text, inits = Gelu(product="hp").text()
    text = text.replace("=> (float[N, 8] y)", "=> (float[N, 8] y, float[N, 8] z)").replace("\n}", "\n  z = Neg(x)\n}")
    _, counts = check_before_after(text, GELU, f"""{MS_HEADER}
    g (float[N, 8] x) => (float[N, 8] y, float[N, 8] z) {{
      y = com.microsoft.Gelu(x)
      z = Neg(x)
    }}""", initializers=inits)
    assert counts == {"fuse-gelu-erf-factored": 1}


# ------------------------------------------------------------------------------------------------ bias
@pytest.mark.parametrize("flavour, op, rule", [("erf", "BiasGelu", "fuse-bias-gelu"),
                                               ("tanh", "FastGelu", "fuse-fast-gelu-bias")])
def test_fuse_gelu_absorbs_a_bias(flavour, op, rule):
    case = Gelu(flavour=flavour, product="xp", bias=(8,), swap=1)
    text, inits = case.text()
    model, counts = check_before_after(text, GELU, expected(case, op), initializers=inits,
                                       expected_initializers={"bias": inits["bias"]})
    assert counts[rule] == 1 and len(counts) == 2
    assert_accurate(model, case)
    assert_unchanged_by(model, "fuse-gelu")


def test_fuse_gelu_flattens_a_broadcast_bias():
    case = Gelu(product="hp", bias=(1, 1, 8), dims="N, S, 8")
    text, inits = case.text()
    _model, counts = check_before_after(text, GELU, expected(case, "BiasGelu"), initializers=inits,
                                       expected_initializers={"bias": inits["bias"].reshape(-1)}, dims={"N": 2, "S": 3})
    assert counts == {"fuse-gelu-erf-factored": 1, "fuse-bias-gelu": 1}


@pytest.mark.parametrize("approximate, op", [("none", "BiasGelu"), ("tanh", "FastGelu")])
def test_fuse_gelu_onnx_gelu_with_bias(approximate, op):
    bias = np.linspace(-1, 1, 8).astype(np.float32)
    attr = "" if approximate == "none" else f'<approximate = "{approximate}">'
    _model, counts = check_before_after(f"""<ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] a) => (float[N, 8] y) {{
      x = Add(bias, a)
      y = Gelu{attr}(x)
    }}""", GELU, f"""<ir_version: 10, opset_import: ["" : 20, "com.microsoft": 1]>
    g (float[N, 8] a) => (float[N, 8] y) {{
      y = com.microsoft.{op}(a, bias)
    }}""", initializers={"bias": bias}, expected_initializers={"bias": bias})
    assert counts == {"fuse-onnx-gelu-bias": 1}


def test_fuse_gelu_onnx_gelu_without_bias_is_left_alone():
    check_before_after("""<ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] x) => (float[N, 8] y) {
      y = Gelu(x)
    }""", GELU, None)


@pytest.mark.parametrize("bias, text_of_a, reason", [
    ((2, 8), "float[N, 8]", "bias of shape (2, 8) is not a vector of the last dim 8 [bias]"),
    ((4,), "float[N, 4]", None),   # fine: H = 4
    ((8,), "float[N, H]", "the last dim of the biased input is not static [a]"),
])
def test_fuse_gelu_bias_shapes(bias, text_of_a, reason):
    case = Gelu(product="hp", bias=bias, dims=text_of_a.split("[")[1][:-1])
    text, inits = case.text()
    model = parse(text, inits)
    run_passes(model, ("infer-shapes",))
    if reason is None:
        assert run_pass(model, "fuse-gelu").counts == {"fuse-gelu-erf-factored": 1, "fuse-bias-gelu": 1}
        return
    rows = [r for _, r in explain(model, RULE["fuse-gelu-erf-factored"])]
    assert "matched" in rows
    counts = run_pass(model, "fuse-gelu").counts
    assert counts == {"fuse-gelu-erf-factored": 1}   # GELU fused, bias kept as an Add
    assert [r for _, r in explain(model, RULE["fuse-bias-gelu"])] == [f"check: {reason}"]


def test_fuse_gelu_non_constant_bias_stays_an_add():
    model = parse("""<ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] a, float[8] b) => (float[N, 8] y) {
      x = Add(a, b)
      y = Gelu(x)
    }""")
    run_passes(model, ("infer-shapes",))
    assert any("bias is not a constant" in r for _, r in explain(model, RULE["fuse-onnx-gelu-bias"]))
    assert run_pass(model, "fuse-gelu").counts == {}


def test_fuse_gelu_bias_add_with_other_users_is_kept():
    case = Gelu(product="hp", bias=(8,))
    text, inits = case.text()
    text = text.replace("=> (float[N, 8] y)", "=> (float[N, 8] y, float[N, 8] z)").replace("\n}", "\n  z = Neg(x)\n}")
    _model, counts = check_before_after(text, GELU, f"""{MS_HEADER}
    g (float[N, 8] a) => (float[N, 8] y, float[N, 8] z) {{
      x = Add(a, bias)
      y = com.microsoft.Gelu(x)
      z = Neg(x)
    }}""", initializers=inits, expected_initializers={"bias": inits["bias"]})
    assert counts == {"fuse-gelu-erf-factored": 1}


# ------------------------------------------------------------------------------------------------ approximate_gelu
@pytest.mark.parametrize("bias", [None, (8,)])
def test_fuse_gelu_erf_stays_erf_without_the_option(bias):
    case = Gelu(product="xp", bias=bias)
    text, inits = case.text()
    model = parse(text, inits)
    counts = GELU(model)
    ops = {n.op_type for n in model.graph}
    assert ops == {"BiasGelu" if bias else "Gelu"}, counts
    assert "FastGelu" not in ops


@pytest.mark.parametrize("bias", [None, (8,)])
def test_fuse_gelu_approximate_option_turns_erf_into_fast_gelu(bias):
    case = Gelu(product="xp", bias=bias)
    text, inits = case.text()
    model = parse(text, inits)
    ctx = onnxc.PassContext(options={"approximate_gelu": True})
    run_passes(model, ("infer-shapes",))
    result = fg.FuseGelu().run(model, ctx)
    run_passes(model, ("eliminate-dead",))
    assert [n.op_type for n in model.graph] == ["FastGelu"]
    assert result.counts["approximate-bias-gelu" if bias else "approximate-gelu"] == 1
    assert ctx.notes and "tanh approximation" in ctx.notes[0]
    assert_accurate(model, case, approximate="tanh")
    # ... and the approximation is within 5e-4 of the exact GELU, no closer than that in general
    feeds = random_feeds(ir.serde.serialize_model(model), 0, {"N": 64})
    x = feeds["a"] + inits["bias"] if bias else feeds["x"]
    err = np.abs(run_ort(model, feeds)[0] - activations.gelu(x)).max()
    assert 1e-5 < err < 5e-4


def test_fuse_gelu_approximate_option_on_onnx_gelu():
    model = parse("""<ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] x) => (float[N, 8] y) {
      y = Gelu(x)
    }""")
    assert APPROX(model) == {"approximate-onnx-gelu": 1}
    assert [(n.domain, n.op_type) for n in model.graph] == [("com.microsoft", "FastGelu")]


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("case, rule, reason", [
    (Gelu(product="xp", consts={"s": 1.5}), "fuse-gelu-erf", "constant s = 1.5, GELU needs 1.414"),
    (Gelu(product="hp", scale="mul", consts={"s": 1.4142135}), "fuse-gelu-erf-factored",
     "constant s = 1.414"),                                                         # Mul by √2, not 1/√2
    (Gelu(product="xp", consts={"s": 1.41421}), "fuse-gelu-erf", "relative tolerance 1e-06 for FLOAT"),
    (Gelu(product="xh", consts={"h": 0.25}), "fuse-gelu-erf", "constant h = 0.25, GELU needs 0.5"),
    (Gelu(product="ht", consts={"h2": 0.4}), "fuse-gelu-erf-factored", "constant h2 = 0.4"),
    (Gelu(flavour="tanh", consts={"k": 0.0447}), "fuse-gelu-tanh", "constant k = 0.0447"),
    (Gelu(flavour="tanh", arg="factored", mono="(kx)x", consts={"k": 0.0447}), "fuse-gelu-tanh",
     "constant k = 0.0447"),
    (Gelu(flavour="tanh", product="hp", consts={"c": 0.8}), "fuse-gelu-tanh-factored", "constant c = 0.8"),
    (Gelu(product="xp", cast="float16"), "fuse-gelu-erf", "the core is computed in FLOAT16, narrower than x"),
    (Gelu(product="xp", dtype="double"), "fuse-gelu-erf", "DOUBLE input: ORT's GELU kernels take float"),
    (Gelu(product="hp", also_out="p"), "fuse-gelu-erf-factored", "has outside users (Neg"),
    (Gelu(product="xh", also_out="xh"), "fuse-gelu-erf", "has outside users (Neg"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("fuse") else None)
def test_fuse_gelu_refuses(case, rule, reason):
    assert_refused(case, rule, reason)


def test_fuse_gelu_refuses_rank_raising_constant():
    case = Gelu(product="xp", dims="8")
    text, inits = case.text()
    inits["h"] = inits["h"].reshape(1, 1)
    model = parse(text.replace("float[8] y", "float[1, 8] y"), inits)
    run_passes(model, ("infer-shapes",))
    assert any("may broadcast x to a higher rank" in r for _, r in explain(model, RULE["fuse-gelu-erf"]))
    assert run_pass(model, "fuse-gelu").counts == {}


def _scalar(text: str, inits: dict) -> ir.Model:
    """The model with its input and output declared rank 0 (the text syntax reads `float[]` as an unknown shape)."""
    model = parse(text, inits)
    for v in (*model.graph.inputs, *model.graph.outputs):
        v.shape = ir.Shape([])
    return model


def test_fuse_gelu_tanh_refuses_a_scalar_x_erf_fuses_it():
    """ORT's FastGelu kernel fails on a rank-0 input ("expected to have 1 or more dimensions"), its Gelu does not.
    Found by `onnxc fuzz --pass fuse-gelu`."""
    model = _scalar(*Gelu(flavour="tanh", dims="").text())
    run_passes(model, ("infer-shapes",))
    rows = [r for _, r in explain(model, RULE["fuse-gelu-tanh"])]
    assert any("x is a scalar: ORT's FastGelu kernel needs rank >= 1" in r for r in rows), rows
    assert run_pass(model, "fuse-gelu").counts == {}
    model = _scalar(*Gelu(dims="").text())
    before = ir.serde.serialize_model(model)
    assert GELU(model) == {"fuse-gelu-erf": 1}
    assert_same_outputs(before, model)
    onnx_gelu = _scalar("""<ir_version: 10, opset_import: ["" : 20]>
    g (float[] x) => (float[] y) {
      y = Gelu(x)
    }""", {})
    assert APPROX(onnx_gelu) == {}


def test_fuse_gelu_fp16_tolerance_is_fp16_only():
    """0.0447 is within fp16 rounding of 0.044715 (fp16 model fuses) but not within fp32's (refused)."""
    case = Gelu(flavour="tanh", product="xp", dtype="float16", consts={"k": 0.0447})
    text, inits = case.text()
    model = parse(text, inits)
    assert GELU(model) == {"fuse-gelu-tanh": 1}
    assert_refused(replace(case, dtype="float"), "fuse-gelu-tanh", "constant k = 0.0447")


def test_fuse_gelu_not_a_product_of_three():
    """x · (1 + erf(x/√2)) lacks the 0.5; x·(1+erf)·(1+erf) has the shape of (x·(1+t))·0.5 but no 0.5."""
    for text in ("""
        u = Div(x, s)
        e = Erf(u)
        p = Add(e, one)
        y = Mul(x, p)""", """
        u = Div(x, s)
        e = Erf(u)
        p = Add(e, one)
        xp = Mul(x, p)
        y = Mul(xp, p)"""):
        model = parse("g (float[N, 8] x) => (float[N, 8] y) {" + text + "\n}",
                      {"s": np.float32(math.sqrt(2)), "one": np.float32(1)})
        run_passes(model, ("infer-shapes",))
        assert run_pass(model, "fuse-gelu").counts == {}
    rows = [r for _, r in explain(model, RULE["fuse-gelu-erf"])]
    assert any("'h' is not a one-element constant" in r for r in rows), rows


# ------------------------------------------------------------------------------------------------ property
@st.composite
def gelu_cases(draw):
    flavour = draw(st.sampled_from(["erf", "tanh"]))
    case = Gelu(flavour=flavour, product=draw(st.sampled_from(["xh", "xp", "hp", "ht"])),
                scale=draw(st.sampled_from(["div", "mul"])), cube=draw(st.sampled_from(["pow", "mul"])),
                arg=draw(st.sampled_from(["sum", "factored"])), mono=draw(st.sampled_from(["k(xx)", "(kx)x"])),
                dtype=draw(st.sampled_from(["float", "float16"])),
                swap=draw(st.integers(0, 255)), dims=draw(st.sampled_from(["N, 8", "2, 3, 8", "N, S, 8"])),
                bias=draw(st.sampled_from([None, (8,), (1, 8)])))
    wider = WIDER[case.dtype] if case.dtype == "float16" or flavour == "tanh" else None   # ORT has no double Erf
    case = replace(case, cast=draw(st.sampled_from([None, wider])))
    breaks = draw(st.sampled_from([None, None, "const", "output"]))
    if breaks == "const":
        case = replace(case, consts={draw(st.sampled_from(["h", "s"] if flavour == "erf" else ["h", "c", "k"])): 0.3})
    elif breaks == "output":
        case = replace(case, also_out="t")
    return case, breaks


@settings(max_examples=40, deadline=None)
@given(gelu_cases())
def test_fuse_gelu_property(drawn):
    case, breaks = drawn
    text, inits = case.text()
    proto = parse_proto(text, inits)
    model = ir.serde.deserialize_model(proto)
    counts = GELU(model)
    fired = sum(v for k, v in counts.items() if k.startswith("fuse-gelu-"))
    assert fired == (breaks is None), counts
    if case.bias and breaks is None:
        assert sum(v for k, v in counts.items() if "bias" in k) == 1
    assert_valid(model, proto)
    precision = np.float16 if case.dtype == "float16" else None
    if breaks is None:
        assert_accurate(model, case)
    if case.dtype == "float":
        assert_same_outputs(proto, model, dims={"N": 2, "S": 3}, seeds=(0,), precision=precision)
    assert_unchanged_by(model, "fuse-gelu")


# ------------------------------------------------------------------------------------------------ fixtures
FIXTURE_COUNTS = {  # fixture -> fuse-gelu counts (2 layers, one GELU each)
    "gpt2_ts": {"fuse-gelu-tanh": 2, "fuse-fast-gelu-bias": 2},
    "gpt2_dynamo": {"fuse-gelu-tanh": 2, "fuse-fast-gelu-bias": 2},
    "gpt2_ts_past": {"fuse-gelu-tanh": 2, "fuse-fast-gelu-bias": 2},
    "gpt2_dynamo_past": {"fuse-gelu-tanh": 2, "fuse-fast-gelu-bias": 2},
    "bert_ts": {"fuse-gelu-erf": 2, "fuse-bias-gelu": 2},
    "bert_dynamo": {"fuse-gelu-erf-factored": 2, "fuse-bias-gelu": 2},
    "gemma_ts": {"fuse-gelu-tanh": 2},
    "gemma_dynamo": {"fuse-gelu-tanh-factored": 2},
    "gemma_ts_past": {"fuse-gelu-tanh": 2},
    "gemma_dynamo_past": {"fuse-gelu-tanh-factored": 2},
    "llama_dynamo": {},
    "llama_dynamo_past_fp16": {},
}


def compile_fixture(name: str, passes: str = "fuse-gelu,fuse-embed-layer-norm", **kwargs):
    result = onnxc.compile(str(FIXTURES / f"{name}.onnx"), 2, "cpu", passes=f"{O1},{passes},{CLEANUP}", **kwargs)
    counts: dict[str, int] = {}
    for record in result.report["passes"]:
        if record["name"] == "fuse-gelu":
            counts.update(record["counts"])
    return result, counts


@pytest.mark.parametrize("name", sorted(FIXTURE_COUNTS))
def test_fuse_gelu_fixtures(name):
    result, counts = compile_fixture(name)     # onnxc.compile verifies the outputs in onnxruntime
    assert counts == FIXTURE_COUNTS[name]
    ops = [n.op_type for n in result.model.graph.node]
    assert "Erf" not in ops and "Tanh" not in ops
    assert ops.count("Gelu") + ops.count("BiasGelu") + ops.count("FastGelu") == (2 if counts else 0)


def test_fuse_gelu_fixture_erf_never_becomes_tanh_unless_asked():
    result, _ = compile_fixture("bert_dynamo")
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("BiasGelu") == 2 and "FastGelu" not in ops
    result, counts = compile_fixture("bert_dynamo", options={"approximate_gelu": True}, verify=False)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("FastGelu") == 2 and "BiasGelu" not in ops
    assert counts["approximate-bias-gelu"] == 2
