"""fuse-gelu

    0.5 · x · (1 + erf(x / √2))                          ->  Gelu(x)                  fuse-gelu-erf[-factored]
    0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))   ->  FastGelu(x)              fuse-gelu-tanh[-factored]
    Gelu(a + bias)                                       ->  BiasGelu(a, bias)        fuse-bias-gelu
    FastGelu(a + bias)                                   ->  FastGelu(a, bias)        fuse-fast-gelu-bias
    onnx Gelu(a + bias, approximate="none" | "tanh")     ->  BiasGelu(a, bias) | FastGelu(a, bias)
                                                                                      fuse-onnx-gelu-bias
  only with the option `approximate_gelu` (erf GELU becomes the tanh approximation, |error| < 5e-4):
    Gelu(x)                                              ->  FastGelu(x)              approximate-gelu
    onnx Gelu(x, approximate="none")                     ->  FastGelu(x)              approximate-onnx-gelu
    BiasGelu(a, bias)                                    ->  FastGelu(a, bias)        approximate-bias-gelu

Gelu, BiasGelu and FastGelu are com.microsoft ops. Without the option the flavour never changes: erf stays erf.

The expanded forms match in the arrangements exporters write: the product 0.5 · x · (1 + t) as (0.5·x)·(1+t) or
(x·(1+t))·0.5 (fuse-gelu-*), x·(0.5·(1+t)) or x·(0.5 + 0.5·t) (fuse-gelu-*-factored), any operand order;
x/√2 or x·(1/√2); the tanh argument as √(2/π)·(x + 0.044715·x³) or √(2/π)·x·(1 + 0.044715·x²) in any
association, the monomials 0.044715·x³ and 0.044715·x² as any Mul tree of their factors (x² or x³ also as Pow),
e.g. BLOOM's tanh((√(2/π)·x)·(1 + (0.044715·x)·x)); a Cast around the Erf/Tanh (computing it in a type at least as wide
as x's).

Requires: the constants are one-element and equal to 0.5, √2 (or 1/√2), √(2/π) and 0.044715 within the rounding of
their dtype (relative 1e-6 for float32/double, 1e-3 for float16); they do not broadcast x to a higher rank; x is
float32 or float16. ORT registers these kernels for float on CPU (float16 runs through Casts ORT inserts, in float,
so the fused op is at least as accurate as the fp16 chain); CUDA has float and float16. bfloat16 and double are
refused. A bias is a constant vector over x's last axis (shape (H,) or (1, ..., 1, H)), H static. A FastGelu's x is
not a scalar (ORT's kernel needs rank >= 1; its Gelu takes one).
Reference: kernels/activations.py.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxc.domains import MS
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import Attr, Rule, apply_rules, const_array, const_tensor
from onnxc.shapes import dims_of

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_COEF = 0.044715
RTOL = {ir.DataType.FLOAT: 1e-6, ir.DataType.DOUBLE: 1e-6, ir.DataType.FLOAT16: 1e-3, ir.DataType.BFLOAT16: 8e-3}
MANTISSA = {ir.DataType.BFLOAT16: 8, ir.DataType.FLOAT16: 11, ir.DataType.FLOAT: 24, ir.DataType.DOUBLE: 53}
FUSABLE = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


# ---------------------------------------------------------------------------------------------------- patterns
# The product 0.5 · x · (1 + t) has two root shapes: x times the rest (torch.export, onnxscript) or a partial
# product times the last factor (TorchScript, hand-written): one rule each, so every Or alternative is exact.
def _x_times_rest(op, x, h, h2, t):
    """x · (0.5·(1 + t))  |  x · (0.5 + 0.5·t)"""
    return op.Mul(x, op.Or(op.Mul(h, op.Add(t, 1.0)), op.Add(h, op.Mul(h2, t))))


def _pair_times_last(op, x, h, h2, t):
    """(0.5·x) · (1 + t)  |  (x·(1 + t)) · 0.5.  x·0.5·0.5 and x·(1+t)·(1+t) also fit the shape; the check
    refuses them (0.5 or t unbound)."""
    p = op.Add(t, 1.0)
    return op.Mul(op.Mul(x, op.Or(h, p)), op.Or(p, h))


def _erf(op, x, s):
    """erf(x/√2) | erf(x·(1/√2)), optionally computed in a wider type: Cast(Erf(Cast(.)))."""
    u = op.Or(op.Div(x, s, _name="div"), op.Mul(x, s))
    return op.Cast(op.Erf(op.Cast(u, _optional=True, _name="cin")), _optional=True)


def _monomial(op, k, x, n: int, with_k: bool = True):
    """k·xⁿ (or xⁿ) as any binary tree of Mul over its factors, with any xᵐ (m ≥ 2) also as Pow(x, m): the
    alternatives are generated from the monomial, so every association an exporter writes is one of them
    (k·(x·x), (k·x)·x, x·(k·x), ...). Mul's operand order is matched by the engine."""
    if n == 0:
        return k
    if not with_k and n == 1:
        return x
    alts = [op.Pow(x, float(n))] if not with_k else []
    seen = set()
    for k1 in ((False, True) if with_k else (False,)):
        for n1 in range(n + 1):
            left, right = (k1, n1), (with_k and not k1, n - n1)
            if left == (False, 0) or right == (False, 0) or frozenset((left, right)) in seen:
                continue
            seen.add(frozenset((left, right)))
            alts.append(op.Mul(_monomial(op, k, x, n1, k1), _monomial(op, k, x, n - n1, with_k and not k1)))
    return alts[0] if len(alts) == 1 else op.Or(*alts)


def _tanh(op, x, c, k):
    """tanh(c·(x + k·x³)) | tanh(c·x·(1 + k·x²)) in any association of c·x·(...), k·x³ and k·x² (see _monomial)."""
    q = op.Add(_monomial(op, k, x, 2), 1.0)
    arg = op.Or(op.Mul(c, op.Add(x, _monomial(op, k, x, 3))),
                op.Mul(op.Mul(x, c), q), op.Mul(c, op.Mul(x, q)), op.Mul(x, op.Mul(c, q)))
    return op.Cast(op.Tanh(op.Cast(arg, _optional=True, _name="cin")), _optional=True)


# ---------------------------------------------------------------------------------------------------- checks
def _dtype_ok(m, name: str, value: ir.Value | None = None):
    dt = (value if value is not None else m[name]).dtype
    if dt not in FUSABLE:
        return m.fail(f"{dt.name if dt is not None else 'unknown'} input: ORT's GELU kernels take float (and "
                      "float16 through inserted Casts)", name)
    return None


def _not_scalar(m, name: str):
    """ORT's FastGelu kernel needs rank >= 1 (its Gelu takes a scalar)."""
    dims = dims_of(m[name])
    if dims is not None and len(dims) == 0:
        return m.fail(f"{name} is a scalar: ORT's FastGelu kernel needs rank >= 1", name)
    return None


def _near(m, name: str, want: float):
    """The one-element constant bound to `name` equals `want` within its dtype's rounding and keeps x's rank."""
    v = m.binds.get(name)
    arr = m.const(name, 1) if v is not None else None
    if arr is None:
        return m.fail(f"'{name}' is not a one-element constant", *([name] if v is not None else []))
    tol = RTOL.get(v.dtype, 1e-6)
    got = float(arr.reshape(-1)[0])
    if abs(got - want) > tol * abs(want):
        return m.fail(f"constant {name} = {got!r}, GELU needs {want!r} (relative tolerance {tol:g} for "
                      f"{v.dtype.name})", name)
    x_dims = dims_of(m["x"])
    if arr.ndim > 0 and (x_dims is None or arr.ndim > len(x_dims)):
        return m.fail(f"constant {name} of rank {arr.ndim} may broadcast x to a higher rank", name)
    return None


def _check_common(m, core: str):
    if "h" not in m.binds or core not in m.binds:
        return m.fail("not a GELU product: x, 0.5 and (1 + t) must each appear once")
    failure = _dtype_ok(m, "x") or _near(m, "h", 0.5) or ("h2" in m.binds and _near(m, "h2", 0.5)) or None
    if failure:
        return failure
    if "cin" in m.named:
        to, x_type = ir.DataType(m.attr("cin", "to")), m.dtype("x")
        if MANTISSA.get(to, 0) < MANTISSA[x_type]:
            return m.fail(f"the core is computed in {to.name}, narrower than x ({x_type.name})")
    return None


def _check_erf(m):
    want = SQRT2 if "div" in m.named else 1.0 / SQRT2
    return _check_common(m, "s") or _near(m, "s", want)


def _check_tanh(m):
    return _check_common(m, "c") or _near(m, "c", SQRT_2_OVER_PI) or _near(m, "k", TANH_COEF) or _not_scalar(m, "x")


def _check_bias(m):
    """bias is a constant vector over a's last axis; the Add does not broadcast a. The constant operand is the
    bias whichever order the Add has, so both operand orders give the same verdict."""
    a, bias = m["a"], m["bias"]
    if const_tensor(bias) is None and const_tensor(a) is not None:
        a, bias = bias, a
    arr = const_array(bias)
    if arr is None:
        return m.fail("bias is not a constant", "bias")
    failure = _dtype_ok(m, "a", a)
    if failure:
        return failure
    dims = dims_of(a)
    if dims is None or not dims or not isinstance(dims[-1], int):
        return m.fail("the last dim of the biased input is not static", "a")
    if arr.ndim == 0 or arr.ndim > len(dims) or any(d != 1 for d in arr.shape[:-1]) or arr.shape[-1] != dims[-1]:
        return m.fail(f"bias of shape {tuple(arr.shape)} is not a vector of the last dim {dims[-1]}", "bias")
    return {"a": a, "bias": bias, "flat": None if arr.ndim == 1 else arr.reshape(-1)}


def _check_onnx_gelu_bias(m):
    if m["approximate"] not in ("none", "tanh"):
        return m.fail(f"unknown approximate={m['approximate']!r}")
    return _check_bias(m)


def _check_onnx_gelu(m):
    return _dtype_ok(m, "x") or _not_scalar(m, "x")


# ---------------------------------------------------------------------------------------------------- rewrites
def _vector(op, bias: ir.Value, flat: np.ndarray | None) -> ir.Value:
    return bias if flat is None else op.const(flat, "bias")


def _biased(op, a, bias, flat, approximate="none"):
    b = _vector(op, bias, flat)
    return op.FastGelu(a, b, _domain=MS) if approximate == "tanh" else op.BiasGelu(a, b, _domain=MS)


def erf_gelu(op, x, s, h, h2):
    return _pair_times_last(op, x, h, h2, _erf(op, x, s))


def erf_gelu_factored(op, x, s, h, h2):
    return _x_times_rest(op, x, h, h2, _erf(op, x, s))


def tanh_gelu(op, x, c, k, h, h2):
    return _pair_times_last(op, x, h, h2, _tanh(op, x, c, k))


def tanh_gelu_factored(op, x, c, k, h, h2):
    return _x_times_rest(op, x, h, h2, _tanh(op, x, c, k))


def _gelu(op, x):
    return op.Gelu(x, _domain=MS)


def _fast_gelu(op, x):
    return op.FastGelu(x, _domain=MS)


RULES = [
    Rule("fuse-gelu-erf", erf_gelu, _gelu, _check_erf, summary="(0.5·x)·(1 + erf(x/√2)), its mirror -> Gelu(x)"),
    Rule("fuse-gelu-erf-factored", erf_gelu_factored, _gelu, _check_erf,
         summary="x·(0.5·(1 + erf(x/√2))) | x·(0.5 + 0.5·erf(x/√2)) -> Gelu(x)"),
    Rule("fuse-gelu-tanh", tanh_gelu, _fast_gelu, _check_tanh,
         summary="(0.5·x)·(1 + tanh(√(2/π)·(x + 0.044715·x³))), its mirror -> FastGelu(x)"),
    Rule("fuse-gelu-tanh-factored", tanh_gelu_factored, _fast_gelu, _check_tanh,
         summary="x·(0.5·(1 + tanh(...))) | x·(0.5 + 0.5·tanh(...)) -> FastGelu(x)"),
    Rule("fuse-bias-gelu", lambda op, a, bias: op.Gelu(op.Add(a, bias), _domain=MS), _biased, _check_bias,
         summary="Gelu(a + bias) -> BiasGelu(a, bias)"),
    Rule("fuse-fast-gelu-bias", lambda op, a, bias: op.FastGelu(op.Add(a, bias), _domain=MS),
         lambda op, a, bias, flat: _biased(op, a, bias, flat, "tanh"), _check_bias,
         summary="FastGelu(a + bias) -> FastGelu(a, bias)"),
    Rule("fuse-onnx-gelu-bias",
         lambda op, a, bias: op.Gelu(op.Add(a, bias), approximate=Attr("approximate", "none")), _biased,
         _check_onnx_gelu_bias, summary="onnx Gelu(a + bias) -> BiasGelu(a, bias) or FastGelu(a, bias)"),
]
# values onnxc fuzz draws for the constants (compiler/fuzz.py): the right ones, and a few the check refuses
for _rule in RULES[:4]:
    _rule.examples = {"h": 0.5, "h2": (0.5, 1.0), "s": (SQRT2, 1 / SQRT2), "c": SQRT_2_OVER_PI,
                      "k": (TANH_COEF, 0.05)}

APPROXIMATE = [
    Rule("approximate-gelu", _gelu, _fast_gelu, _check_onnx_gelu, summary="Gelu(x) -> FastGelu(x) (approximate_gelu)"),
    Rule("approximate-onnx-gelu", lambda op, x: op.Gelu(x, approximate="none"), _fast_gelu, _check_onnx_gelu,
         summary="onnx Gelu(x, approximate='none') -> FastGelu(x) (approximate_gelu)"),
    Rule("approximate-bias-gelu", lambda op, a, bias: op.BiasGelu(a, bias, _domain=MS),
         lambda op, a, bias: op.FastGelu(a, bias, _domain=MS),
         summary="BiasGelu(a, bias) -> FastGelu(a, bias) (approximate_gelu)"),
]


class FuseGelu(Pass):
    """GELU (erf and tanh forms, with a bias Add) -> Gelu / BiasGelu / FastGelu; option approximate_gelu."""

    name = "fuse-gelu"
    level = 2
    targets = ("cpu", "cuda")

    def rules(self):
        return RULES + APPROXIMATE

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        approximate = bool(ctx.option("approximate_gelu", False))
        stats = apply_rules(model, RULES + (APPROXIMATE if approximate else []), disabled=ctx.disabled_rules)
        swapped = sum(stats.applied.get(r.name, 0) for r in APPROXIMATE)
        if swapped:
            ctx.notes.append(f"fuse-gelu: {swapped} erf GELU(s) replaced by the tanh approximation (approximate_gelu); "
                             "verified with float16 tolerances")
            # The approximation differs from erf GELU by up to ~5e-4: beyond float32 tolerances, by request.
            if ctx.option("tolerance_dtype") in (None, "float32", "float64"):
                ctx.options["tolerance_dtype"] = "float16"
        return PassResult(model, bool(stats.applied), dict(stats.applied))


register_pass(FuseGelu)
