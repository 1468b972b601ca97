"""Mixed precision ranked by output error (compiler/sensitivity.py): the measure equals the forward pass computed
by hand, it sees an amplified layer that weight-space error misses, and it falls back to the weight error where it
cannot run."""
from __future__ import annotations

import numpy as np
import onnxc
import pytest
from helpers import parse, run_pass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc import quant_options as qo
from onnxc import quant_precision as qp
from onnxc import quant_sites as qs
from onnxc import sensitivity
from onnxc.verify import make_inputs


def w(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _amplified(gain: float = 30.0):
    """y = 30 (x W1) + x W2: W2 has an outlier input row (the larger int4 weight error), W1's error is amplified."""
    w2 = w(64, 32, seed=2)
    w2[5] *= 25.0
    return parse("""
    g (float[N, 64] x) => (float[N, 32] y) {
      a = MatMul(x, W1)
      s = Mul(a, k)
      b = MatMul(x, W2)
      y = Add(s, b)
    }""", {"W1": w(64, 32, seed=1), "W2": w2, "k": np.array(gain, np.float32)})


def _bits(model, **options) -> dict[str, int]:
    run_pass(model, "quantize-int4", quantize="int4", mixed_budget=1.5, **options)
    return {n.inputs[1].name.split("_")[0]: n.attributes["bits"].value for n in model.graph
            if n.op_type == "MatMulNBits"}


def test_quantize_sensitivity_output_error_promotes_the_amplified_layer():
    # budget 1.5x: room for one of the two weights at 8 bits (each costs 9.125 / 5.125 of its int4 bytes)
    assert _bits(_amplified()) == {"W1": 8, "W2": 4}
    assert _bits(_amplified(), sensitivity="weight") == {"W1": 4, "W2": 8}


def test_quantize_sensitivity_report_gives_each_weight_its_output_error(tmp_path):
    model = _amplified()
    ctx = onnxc.pass_manager.PassContext(options={"quantize": "int4", "mixed_budget": 1.5})
    onnxc.pass_manager.get_pass("quantize-int4").run(model, ctx)
    layers = {x["name"]: x for x in ctx.results["quantize-int4"]["layers"]}
    assert layers["W1"]["reason"] == "output error rank 1" and layers["W2"]["reason"] == "int4"
    assert layers["W1"]["int4_output_error"] > layers["W2"]["int4_output_error"] > 0
    assert layers["W1"]["int4_rel_error"] < layers["W2"]["int4_rel_error"]
    assert any("output errors of 2 weights" in n for n in ctx.notes)


def test_quantize_sensitivity_above_the_size_limit_ranks_by_weight_error(monkeypatch):
    from onnxc.passes import quantize_int4 as qi

    monkeypatch.setattr(qi, "SENSITIVITY_MAX_BYTES", 0)
    model = _amplified()
    ctx = onnxc.pass_manager.PassContext(options={"quantize": "int4", "mixed_budget": 1.5})
    onnxc.pass_manager.get_pass("quantize-int4").run(model, ctx)
    assert any("ranks weights by their int4 weight error" in n for n in ctx.notes)
    layers = {x["name"]: x for x in ctx.results["quantize-int4"]["layers"]}
    assert layers["W2"]["reason"] == "error rank 1" and "int4_output_error" not in layers["W2"]


def test_quantize_sensitivity_rejects_an_unknown_ranking():
    with pytest.raises(onnxc.errors.UsageError, match="sensitivity must be one of output, weight"):
        run_pass(_amplified(), "quantize-int4", quantize="int4", sensitivity="hessian")


def test_quantize_sensitivity_weights_that_cannot_be_fed_are_ranked_after_the_measured_ones():
    """A Gemm with alpha != 1 cannot be overridden by feeding its initializer: no output error, ranked last."""
    model = parse("""
    g (float[N, 64] x) => (float[N, 32] y) {
      a = Gemm<alpha = 2.0>(x, W1)
      y = MatMul(a, W2)
    }""", {"W1": w(64, 32, seed=1), "W2": w(32, 32, seed=2)})
    opts = qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True, mixed_budget=10.0)
    sites = qs.find_sites(model.graph, opts, [])
    assert [sensitivity.weight_value(s) is not None for s in sites] == [False, True]
    blocks = {s.key: 32 for s in sites}
    errors = sensitivity.output_errors(model, sites, lambda s: qp.dequantized_rtn(s, 32, False), _tmp())
    assert set(errors) == {sites[1].key}
    plan = qp.choose_bits(sites, blocks, set(), opts, errors)
    assert [plan[s.key].reason for s in sites] == ["error rank 2", "output error rank 1"]


def _tmp():
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp(prefix="onnxc-test-sensitivity-"))


@pytest.mark.parametrize("layout", ["plain", "transpose", "gemm-transB", "fused-transB-of-transpose"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.sampled_from([32, 64, 96]), n=st.sampled_from([16, 48]), m=st.sampled_from([32, 40, 64]),
       seed=st.integers(0, 1000))
def test_quantize_sensitivity_equals_the_forward_pass_by_hand(layout, k, n, m, seed):
    """e = ||y(W1q) - y||^2 / ||y||^2 for y = relu(x W1) W2, W1 stored as (K, M) or (M, K) and read directly, through
    a Transpose, by Gemm transB = 1, or by FusedMatMul transB = 1 over a Transpose (stored (K, M) again)."""
    w1, w2 = w(k, m, seed=seed), w(m, n, seed=seed + 1)
    first = {"plain": "a = MatMul(x, W1)",
             "transpose": "t = Transpose<perm = [1, 0]>(W1)\n      a = MatMul(x, t)",
             "gemm-transB": "a = Gemm<transB = 1>(x, W1)",
             "fused-transB-of-transpose": "t = Transpose<perm = [1, 0]>(W1)\n"
                                          "      a = com.microsoft.FusedMatMul<transB = 1>(x, t)"}[layout]
    stored = np.ascontiguousarray(w1.T) if layout in ("transpose", "gemm-transB") else w1
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
    g (float[N, {k}] x) => (float[N, {n}] y) {{
      {first}
      r = Relu(a)
      y = MatMul(r, W2)
    }}""", {"W1": stored, "W2": w2})
    opts = qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True)
    sites = qs.find_sites(model.graph, opts, [])
    deq = {s.key: qp.dequantized_rtn(s, 32, False) for s in sites}
    errors = sensitivity.output_errors(model, sites, lambda s: deq[s.key], _tmp())
    x = make_inputs(model, sensitivity.SCENARIO, sensitivity.SEED)["x"].astype(np.float64)
    y = np.maximum(x @ w1, 0) @ w2
    by_name = {s.name: s.key for s in sites}
    y1 = np.maximum(x @ deq[by_name["W1"]], 0) @ w2
    y2 = np.maximum(x @ w1, 0) @ deq[by_name["W2"]]
    ref = float(np.square(y).sum())
    np.testing.assert_allclose(errors[by_name["W1"]], float(np.square(y1 - y).sum()) / ref, rtol=1e-3)
    np.testing.assert_allclose(errors[by_name["W2"]], float(np.square(y2 - y).sum()) / ref, rtol=1e-3)
    assert len(model.graph.inputs) == 1          # the graph is left as it was


# ------------------------------------------------------------------------------------------------ wider blocks
def _three():
    return parse("""
    g (float[N, 128] x) => (float[N, 128] y) {
      a = MatMul(x, W1)
      b = MatMul(a, W2)
      y = MatMul(b, W3)
    }""", {"W1": w(128, 128, seed=1), "W2": w(128, 128, seed=2), "W3": w(128, 128, seed=3)})


def _bytes(plan) -> int:
    return sum(qp.weight_bytes(*c.shape, c.bits, c.block_size, False, 4) for c in plan.values())


def test_quantize_sensitivity_wider_blocks_pay_for_an_8_bit_weight():
    """Three equal weights, budget 1.25x: 8 bits for one costs 0.27x of the total, so without wider blocks nothing
    fits; a wider block for a weight of low output error frees the bytes the sensitive one needs."""
    model = _three()
    sites = qs.find_sites(model.graph, qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True), [])
    errors = {sites[0].key: 1e-2, sites[1].key: 1e-5, sites[2].key: 2e-5}
    blocks = {s.key: 32 for s in sites}
    base = qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True, mixed_budget=1.25)
    plain = qp.choose_bits(sites, blocks, set(), base, errors)
    assert {c.bits for c in plain.values()} == {4}
    wide = qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True, mixed_budget=1.25, mixed_blocks=(64, 128))
    plan = qp.choose_bits(sites, blocks, set(), wide, errors)
    got = [(plan[s.key].bits, plan[s.key].block_size) for s in sites]
    assert got[0] == (8, 32) and all(bits == 4 for bits, _ in got[1:]) and max(b for _, b in got[1:]) > 32, got
    assert _bytes(plan) <= 1.25 * _bytes(plain)
    widened = [plan[s.key] for s in sites[1:] if plan[s.key].block_size > 32]
    assert widened[0].reason == f"int4, block {widened[0].block_size}: low output error"
    assert plan[sites[0].key].reason == "output error rank 1"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(errors=st.lists(st.floats(1e-7, 1e-1), min_size=3, max_size=3), budget=st.floats(1.0, 2.0),
       wide=st.sampled_from([(), (64,), (64, 128)]))
def test_quantize_sensitivity_plans_stay_within_the_budget(errors, budget, wide):
    model = _three()
    sites = qs.find_sites(model.graph, qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True), [])
    blocks = {s.key: 32 for s in sites}
    opts = qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True, mixed_budget=budget, mixed_blocks=wide)
    plan = qp.choose_bits(sites, blocks, set(), opts, dict(zip((s.key for s in sites), errors)))
    all4 = sum(qp.weight_bytes(128, 128, 4, 32, False, 4) for _ in sites)
    assert _bytes(plan) <= budget * all4 + 1e-6
    assert all(c.bits in (4, 8) and (c.block_size == 32 or (c.bits == 4 and c.block_size in wide))
               for c in plan.values())
    if budget * all4 >= all4 + (qp.weight_bytes(128, 128, 8, 32, False, 4) - qp.weight_bytes(128, 128, 4, 32, False, 4)):
        assert any(c.bits == 8 for c in plan.values())     # room for one 8-bit weight is used


def test_quantize_sensitivity_rejects_bad_mixed_blocks():
    with pytest.raises(onnxc.errors.UsageError, match="mixed_blocks"):
        run_pass(_three(), "quantize-int4", quantize="int4", mixed_blocks=[48])
