"""lower-gemm: flatten -> Gemm -> unflatten becomes MatMul (+ Add) on the unflattened input, and why not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
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
from onnxc.passes import lower_gemm as lg
from onnxc.pipeline import O1
from onnxc.rules import explain

PREP = ("infer-shapes", "fold-constants")
LOWER = counting("lower-gemm", before=PREP, after=("eliminate-dead",))
K, N = 8, 6
rng = np.random.default_rng(0)
W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
WT = np.ascontiguousarray(W.T)
C = (0.1 * rng.standard_normal(N)).astype(np.float32)
SHAPE_CONSTS = {"m1": np.array([-1], np.int64), "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
                "nvec": np.array([N], np.int64), "flat": np.array([-1, K], np.int64)}
# Conv1D as TorchScript exports it: flatten to (-1, K) with K read from Shape(x), unflatten to Shape(x)[:-1] + [N].
TS_CONV1D = f"""
g (float[B, S, {K}] x) => (float[B, S, {N}] y) {{
  sx = Shape(x)
  kk = Slice(sx, m1, big, zero)
  ft = Concat<axis=0>(m1, kk)
  xf = Reshape(x, ft)
  h = Gemm(xf, w, c)
  lead = Slice(sx, zero, m1, zero)
  ut = Concat<axis=0>(lead, nvec)
  y = Reshape(h, ut)
}}"""
TS_INITS = {**SHAPE_CONSTS, "big": np.array([1 << 40], np.int64), "w": W, "c": C}


def assert_refused(text: str, inits: dict, reason: str) -> None:
    """The rule refuses with `reason` and lower-gemm leaves the model as it was."""
    model = parse(text, inits)
    run_passes(model, PREP)
    rows = [r for _, r in explain(model, lg.RULES[0])]
    assert any(reason in r for r in rows), rows
    before = to_bytes(model)
    assert not run_pass(model, "lower-gemm").modified
    assert to_bytes(model) == before


# ------------------------------------------------------------------------------------------------ before/after
def test_lower_gemm_torchscript_conv1d():
    _, counts = check_before_after(TS_CONV1D, LOWER, f"""
    g (float[B, S, {K}] x) => (float[B, S, {N}] y) {{
      h = MatMul(x, w)
      y = Add(h, c)
    }}""", initializers=TS_INITS, expected_initializers={"w": W, "c": C})
    assert counts == {"unflatten-gemm": 1}


def test_lower_gemm_constant_targets_and_allowzero():
    # dynamo: constant flatten target, unflatten target with a -1 standing for the one dim left, allowzero=1
    _, counts = check_before_after(f"""
    g (float[2, S, {K}] x) => (float[2, S, {N}] y) {{
      xf = Reshape<allowzero=1>(x, flat)
      h = Gemm<transB=1>(xf, wt, c)
      y = Reshape<allowzero=1>(h, ut)
    }}""", LOWER, f"""
    g (float[2, S, {K}] x) => (float[2, S, {N}] y) {{
      t = Transpose<perm=[1, 0]>(wt)
      h = MatMul(x, t)
      y = Add(h, c)
    }}""", initializers={"flat": SHAPE_CONSTS["flat"], "ut": np.array([2, -1, N], np.int64), "wt": WT, "c": C},
        expected_initializers={"wt": WT, "c": C})
    assert counts == {"unflatten-gemm": 1}


def test_lower_gemm_alpha_beta_and_no_bias():
    text = f"""
    g (float[B, S, {K}] x) => (float[B, S, {N}] y, float[B, S, {N}] z) {{
      xf = Reshape(x, flat)
      h = Gemm<alpha=0.5, beta=2.0>(xf, w, c)
      sx = Shape(x)
      lead = Slice(sx, zero, m1, zero)
      ut = Concat<axis=0>(lead, nvec)
      y = Reshape(h, ut)
      xf2 = Reshape(x, flat)
      h2 = Gemm(xf2, w)
      z = Reshape(h2, ut)
    }}"""
    _, counts = check_before_after(text, LOWER, f"""
    g (float[B, S, {K}] x) => (float[B, S, {N}] y, float[B, S, {N}] z) {{
      h = MatMul(x, w)
      ha = Mul(h, alpha)
      cb = Mul(c, beta)
      y = Add(ha, cb)
      z = MatMul(x, w)
    }}""", initializers={**SHAPE_CONSTS, "w": W, "c": C},
        expected_initializers={"w": W, "c": C, "alpha": np.array(0.5, np.float32), "beta": np.array(2.0, np.float32)})
    assert counts == {"unflatten-gemm": 2}


def test_lower_gemm_flatten_that_merges_heads():
    # dynamo's attention output projection: (B, S, 2, 4) -> (-1, 8) -> Gemm -> (B, S, N); the heads stay merged
    _, counts = check_before_after(f"""
    g (float[B, S, 2, 4] x) => (float[B, S, {N}] y) {{
      xf = Reshape(x, flat)
      h = Gemm(xf, w, c)
      sx = Shape(x)
      lead = Slice(sx, zero, two, zero)
      ut = Concat<axis=0>(lead, nvec)
      y = Reshape(h, ut)
    }}""", LOWER, f"""
    g (float[B, S, 2, 4] x) => (float[B, S, {N}] y) {{
      xm = Reshape(x, merge)
      h = MatMul(xm, w)
      y = Add(h, c)
    }}""", initializers={**SHAPE_CONSTS, "two": np.array([2], np.int64), "w": W, "c": C},
        expected_initializers={"merge": np.array([0, 0, K], np.int64), "w": W, "c": C})
    assert counts == {"unflatten-gemm": 1}


def test_lower_gemm_unflatten_target_read_from_another_value():
    # TorchScript GPT-2's attention projection: the target's batch is read from Shape(a) while shape inference named
    # x's batch afresh (X0 here); the proof follows the dim back from x to a (onnxc.shapes.same_dim).
    text = f"""
    g (float[B, 2, S, 4] a) => (float[B, S, {N}] y) <float[X0, S, 2, 4] at, float[X0, S, {K}] x> {{
      at = Transpose<perm=[0, 2, 1, 3]>(a)
      x = Reshape(at, xt)
      xf = Reshape(x, flat)
      h = Gemm(xf, w, c)
      sa = Shape(a)
      b0 = Gather<axis=0>(sa, zero)
      s0 = Gather<axis=0>(sa, two)
      ut = Concat<axis=0>(b0, s0, nvec)
      y = Reshape(h, ut)
    }}"""
    inits = {**SHAPE_CONSTS, "two": np.array([2], np.int64), "xt": np.array([0, 0, -1], np.int64), "w": W, "c": C}
    model, counts = check_before_after(text, LOWER, f"""
    g (float[B, 2, S, 4] a) => (float[B, S, {N}] y) {{
      at = Transpose<perm=[0, 2, 1, 3]>(a)
      x = Reshape(at, xt)
      h = MatMul(x, w)
      y = Add(h, c)
    }}""", initializers=inits, expected_initializers={"xt": inits["xt"], "w": W, "c": C})
    assert counts == {"unflatten-gemm": 1}
    (x,) = [n.outputs[0] for n in model.graph if n.op_type == "Reshape"]
    assert str(x.shape[0]) == "X0"   # the names never met: the proof went through the dims' producers


# ------------------------------------------------------------------------------------------------ refusals
def test_lower_gemm_rejects_transposed_input():
    text = TS_CONV1D.replace("Gemm(xf, w, c)", "Gemm<transA=1>(xf, w, c)")
    assert_refused(text, TS_INITS, "Gemm transposes its flattened input (transA = 1)")


def test_lower_gemm_rejects_flatten_that_splits_rows():
    # (B, S, 8) -> (-1, 4): two rows per position, a different product; the graph is valid (N doubles back)
    text = f"""
    g (float[B, S, {K}] x) => (float[B, S, {2 * N}] y) {{
      xf = Reshape(x, half)
      h = Gemm(xf, w4, c)
      sx = Shape(x)
      lead = Slice(sx, zero, m1, zero)
      ut = Concat<axis=0>(lead, n2)
      y = Reshape(h, ut)
    }}"""
    inits = {**SHAPE_CONSTS, "half": np.array([-1, K // 2], np.int64), "n2": np.array([2 * N], np.int64),
             "w4": W[: K // 2], "c": C}
    assert_refused(text, inits, "cannot prove the flatten's K 4 is the last dim(s) of the input ('B', 'S', 8)")
    assert_same_outputs(parse_proto(text, inits), parse(text, inits))   # runs, so it is a real graph


def test_lower_gemm_rejects_unflatten_to_other_layout():
    # (B, S) rows regrouped as (S, B): same element count, different tensor
    text = TS_CONV1D.replace("lead = Slice(sx, zero, m1, zero)", "lead = Gather<axis=0>(sx, sb)")
    inits = {**TS_INITS, "sb": np.array([1, 0], np.int64)}
    assert_refused(text.replace(f"float[B, S, {N}] y", f"float[S, B, {N}] y"), inits,
                   "cannot prove the unflatten target ('S', 'B', 6) is ('B', 'S', 6)")


def test_lower_gemm_rejects_unflatten_from_unrelated_batch():
    # Shape(u)[0] of another input: M may differ from B (then the original fails at run time, but nothing says so)
    text = f"""
    g (float[B, S, {K}] x, float[M, S] u) => (float[M, S, {N}] y) {{
      xf = Reshape(x, flat)
      h = Gemm(xf, w, c)
      su = Shape(u)
      ut = Concat<axis=0>(su, nvec)
      y = Reshape(h, ut)
    }}"""
    assert_refused(text, {**SHAPE_CONSTS, "w": W, "c": C}, "cannot prove the unflatten target ('M', 'S', 6)")


def test_lower_gemm_rejects_bias_per_row():
    text = f"""
    g (float[2, 3, {K}] x) => (float[2, 3, {N}] y) {{
      xf = Reshape(x, flat)
      h = Gemm(xf, w, crow)
      y = Reshape(h, ut)
    }}"""
    inits = {"flat": SHAPE_CONSTS["flat"], "ut": np.array([2, 3, N], np.int64), "w": W,
             "crow": rng.standard_normal((6, 1)).astype(np.float32)}
    assert_refused(text, inits, "Gemm C of dims (6, 1) is not the same for every row")


def test_lower_gemm_rejects_vector_input():
    text = f"""
    g (float[{K}] x) => (float[{N}] y) {{
      xf = Reshape(x, flat)
      h = Gemm(xf, w, c)
      y = Reshape(h, nvec)
    }}"""
    assert_refused(text, {**SHAPE_CONSTS, "w": W, "c": C}, "input rank is unknown or below 2 (dims (8,))")


def test_lower_gemm_rejects_runtime_target():
    text = f"""
    g (float[B, S, {K}] x, int64[3] t) => (float[B, S, {N}] y) {{
      xf = Reshape(x, flat)
      h = Gemm(xf, w, c)
      y = Reshape(h, t)
    }}"""
    assert_refused(text, {**SHAPE_CONSTS, "w": W, "c": C}, "unflatten target None does not restore")


def test_lower_gemm_keeps_a_flattened_product_used_elsewhere():
    text = TS_CONV1D.replace(f"=> (float[B, S, {N}] y)", f"=> (float[B, S, {N}] y, float[P, {N}] h)")
    model = parse(text, TS_INITS)
    run_passes(model, PREP)
    rows = [r for _, r in explain(model, lg.RULES[0])]
    assert any("is a graph output" in r for r in rows), rows
    assert not run_pass(model, "lower-gemm").modified


# ------------------------------------------------------------------------------------------------ property
@st.composite
def conv1d_cases(draw):
    lead = draw(st.sampled_from([("B", "S"), (2, 3), ("T",), ("B", 2, "S")]))
    return {"lead": lead, "dtype": draw(st.sampled_from(["float", "float16"])),
            "flat": draw(st.sampled_from(["const", "shape"])), "unflat": draw(st.sampled_from(["shape", "minus1"])),
            "trans_b": draw(st.booleans()), "bias": draw(st.sampled_from(["none", "vec", "row", "scalar"])),
            "alpha": draw(st.sampled_from([1.0, 0.5])), "beta": draw(st.sampled_from([1.0, 2.0])),
            "extra_use": draw(st.booleans()), "broken": draw(st.sampled_from([None, None, None, "swap", "other"]))}


def conv1d_model(case: dict) -> tuple[str, dict, bool]:
    """Flatten -> Gemm -> unflatten in the drawn variant; returns (text, initializers, whether the rule must fire)."""
    lead, dt = case["lead"], case["dtype"]
    np_dt = np.float16 if dt == "float16" else np.float32
    dims = ", ".join(map(str, lead))
    lines = ["sx = Shape(x)"]
    if case["flat"] == "const":
        lines.append("xf = Reshape(x, flat)")
    else:
        lines += ["kk = Slice(sx, m1, big, zero)", "ft = Concat<axis=0>(m1, kk)", "xf = Reshape(x, ft)"]
    attrs = [f"transB={int(case['trans_b'])}"] + [f"{k}={case[k]}" for k in ("alpha", "beta") if case[k] != 1.0]
    cin = {"none": "", "vec": ", c", "row": ", c2", "scalar": ", c1"}[case["bias"]]
    lines.append(f"h = Gemm<{', '.join(attrs)}>(xf, w{cin})")
    lines.append("lead = Slice(sx, zero, m1, zero)")
    if case["unflat"] == "minus1" and len(lead) > 1:
        lines += ["l0 = Slice(lead, one, big, zero)", "ut = Concat<axis=0>(m1, l0, nvec)"]
    else:
        lines.append("ut = Concat<axis=0>(lead, nvec)")
    fires = not case["extra_use"]
    out_dims = dims
    if case["broken"] == "swap" and len(lead) > 1:   # the leading dims regrouped in another order
        lines[-1] = "ut = Concat<axis=0>(rl, nvec)"
        lines.insert(-1, "rl = Gather<axis=0>(lead, rev)")
        out_dims = ", ".join(map(str, lead[::-1]))
        fires = False
    elif case["broken"] == "other":                # x's last dim is 2K: the flatten makes two rows per position
        lines[1:1 + (1 if case["flat"] == "const" else 3)] = ["xf = Reshape(x, flat)"]
        lines[-1] = lines[-1].replace("nvec", "n2")
        fires = False
    lines.append("y = Reshape(h, ut)")
    n_out = 2 * N if case["broken"] == "other" else N
    outputs = f"{dt}[{out_dims}, {n_out}] y" + (f", {dt}[P, {N}] h" if case["extra_use"] else "")
    last_k = K if case["broken"] != "other" else 2 * K
    text = f"<ir_version: 8, opset_import: [\"\" : 18]>\ng ({dt}[{dims}, {last_k}] x) => ({outputs}) {{\n  " + \
        "\n  ".join(lines) + "\n}"
    r = np.random.default_rng(1)
    w = r.standard_normal((K, N)).astype(np_dt)
    inits = {**SHAPE_CONSTS, "big": np.array([1 << 40], np.int64), "rev": np.arange(len(lead))[::-1].astype(np.int64),
             "n2": np.array([2 * N], np.int64), "w": np.ascontiguousarray(w.T) if case["trans_b"] else w,
             "c": r.standard_normal(N).astype(np_dt), "c2": r.standard_normal((1, N)).astype(np_dt),
             "c1": r.standard_normal(1).astype(np_dt)}
    return text, inits, fires


@settings(max_examples=40, deadline=None)
@given(conv1d_cases())
def test_lower_gemm_property(case):
    """Verifier, numbers, idempotence; fires exactly when the flatten, unflatten and uses allow it."""
    text, inits, fires = conv1d_model(case)
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = LOWER(model)
    assert counts == ({"unflatten-gemm": 1} if fires else {}), (case, counts)
    ops = [n.op_type for n in model.graph]
    assert ("Gemm" in ops) != fires
    assert_valid(model, proto)
    dims = {"B": 2, "S": 3, "T": 5}
    assert_same_outputs(proto, model, dims=dims, precision=np.float16 if case["dtype"] == "float16" else None)
    assert_unchanged_by(model, "lower-gemm")


# ------------------------------------------------------------------------------------------------ fixtures
ROOT = Path(__file__).resolve().parents[2] / "fixtures"
ENTRIES = json.loads((ROOT / "manifest.json").read_text())["models"]


def _flat_gemms(path: Path) -> int:
    graph = onnx.load(path, load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    return sum(1 for n in graph.node if n.op_type == "Reshape" and n.input[0] in producer
               and producer[n.input[0]].op_type == "Gemm")


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: Path(e["file"]).stem)
def test_lower_gemm_fixture_sites(entry):
    # GPT-2's Conv1D (c_attn, c_proj, c_fc, mlp c_proj) is the only flatten -> Gemm -> unflatten in the fixtures
    want = 4 * entry["config"]["num_layers"] if entry["family"] == "gpt2" else 0
    assert _flat_gemms(ROOT / entry["file"]) == want


@pytest.mark.parametrize("name", ["gpt2_ts", "gpt2_ts_past", "gpt2_dynamo", "gpt2_dynamo_past"])
def test_lower_gemm_fixture(name):
    res = onnxc.compile(ROOT / "models" / f"{name}.onnx", level=1, passes=O1)   # verifies in onnxruntime
    assert res.report["verification"]["status"] == "passed"
    assert res.report["rule_counts"].get("lower-gemm:unflatten-gemm") == 8
    ops = res.report["ops_after"]
    assert "Gemm" not in ops and ops["MatMul"] == 8 + 2 * 2 + 1   # + QK and PV per layer, lm_head
