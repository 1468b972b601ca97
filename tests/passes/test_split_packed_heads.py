"""split-packed-heads: per-head packed QKV (GPT-NeoX) -> one projection per part; refusals; property; models."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxc
import pytest
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    parse,
    parse_proto,
    run_passes,
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc import pass_manager as pm
from onnxc.pipeline import O1

ROOT = Path(__file__).resolve().parents[2]
NAME = "split-packed-heads"
INT64_MAX = 9223372036854775807


def packed(n: int, h: int, *, bias: bool = True, form: str = "split", after: bool = True, target: str = "const",
           dtype: str = "float", bias_first: bool = False, extra: str | None = None, d: int = 8,
           parts: tuple[int, int, int] | None = None, const_weight: bool = True) -> tuple[str, dict[str, np.ndarray]]:
    """x (B, S, d) @ W (d, 3NH) [+ b] viewed as (B, S, N, 3H), split in thirds before or after Transpose [0,2,1,3].

    form: split (sizes input), split3 (num_outputs), slice (three Slices); target: const ([0, 0, N, 3H]),
    concat (Shape(x)[0:2] ++ [N, 3H]) or concat-1 (Shape(x)[0:2] ++ [-1, 3H]); extra: 'part' (q has another user)
    or 'view' (the view is a graph output too)."""
    np_dt = np.float16 if dtype == "float16" else np.float32
    rng = np.random.default_rng(n * 100 + h)
    w3 = 3 * n * h
    sizes = parts or (h, h, h)
    inits = {"b": rng.standard_normal(w3).astype(np_dt)} if bias else {}
    if const_weight:
        inits["W"] = (rng.standard_normal((d, w3)) / np.sqrt(d)).astype(np_dt)
    body = ["y = MatMul(x, W)"]
    if bias:
        body.append("yb = Add(b, y)" if bias_first else "yb = Add(y, b)")
    tail = [n if target != "concat-1" else -1, 3 * h]
    if target == "const":
        inits["shape"] = np.array([0, 0, *tail], np.int64)
    else:
        inits["tail"] = np.array(tail, np.int64)
        body += ["bs = Shape <start = 0, end = 2> (x)", "shape = Concat <axis = 0> (bs, tail)"]
    body.append(f"view = Reshape({'yb' if bias else 'y'}, shape)")
    src = "view"
    if after:
        body.append("t = Transpose <perm = [0, 2, 1, 3]> (view)")
        src = "t"
    names = ["q", "k", "v"] if after else ["q0", "k0", "v0"]
    if form == "split":
        inits["sizes"] = np.array(sizes, np.int64)
        body.append(f"{', '.join(names)} = Split <axis = -1> ({src}, sizes)")
    elif form == "split3":
        body.append(f"{', '.join(names)} = Split <axis = 3, num_outputs = 3> ({src})")
    else:
        bounds = np.cumsum((0,) + sizes)
        for j, nm in enumerate(names):
            end = INT64_MAX if j == 2 else bounds[j + 1]
            inits[f"s{j}"], inits[f"e{j}"] = np.array([bounds[j]], np.int64), np.array([end], np.int64)
            body.append(f"{nm} = Slice({src}, s{j}, e{j}, ax)")
        inits["ax"] = np.array([-1], np.int64)
    if not after:
        body += [f"{nm} = Transpose <perm = [0, 2, 1, 3]> ({nm}0)" for nm in "qkv"]
    outs = [f"{dtype}[B, {n}, S, {h}] {nm}" for nm in "qkv"]
    if extra == "part":
        body.append("q2 = Neg(q)")
        outs.append(f"{dtype}[B, {n}, S, {h}] q2")
    if extra == "view":
        outs.append(f"{dtype}[B, S, {n}, {3 * h}] view")
    wdecl = "" if const_weight else f", {dtype}[{d}, {w3}] W"
    text = (f"g ({dtype}[B, S, {d}] x{wdecl}) => ({', '.join(outs)}) {{\n  " + "\n  ".join(body) + "\n}")
    return text, inits


def run(text: str, inits: dict[str, np.ndarray], before: tuple[str, ...] = ("infer-shapes",)
        ) -> tuple[ir.Model, dict[str, int], list[str]]:
    model = parse(text, inits)
    run_passes(model, list(before))
    ctx = pm.PassContext(level=2)
    counts = pm.get_pass(NAME).run(model, ctx).counts
    return model, counts, ctx.details     # a refusal is a detail: most models have no packed heads


# ------------------------------------------------------------------------------------------------ before / after
def test_before_after_split_after_transpose():
    text, inits = packed(2, 4)
    w, b = inits["W"], inits["b"]
    cols = [(np.arange(2)[:, None] * 12 + j * 4 + np.arange(4)).reshape(-1) for j in range(3)]
    expected = """g (float[B, S, 8] x) => (float[B, 2, S, 4] q, float[B, 2, S, 4] k, float[B, 2, S, 4] v) {
      yq = MatMul(x, Wq)
      bq2 = Add(yq, bq)
      rq = Reshape(bq2, shp)
      q = Transpose <perm = [0, 2, 1, 3]> (rq)
      yk = MatMul(x, Wk)
      bk2 = Add(yk, bk)
      rk = Reshape(bk2, shp)
      k = Transpose <perm = [0, 2, 1, 3]> (rk)
      yv = MatMul(x, Wv)
      bv2 = Add(yv, bv)
      rv = Reshape(bv2, shp)
      v = Transpose <perm = [0, 2, 1, 3]> (rv)
    }"""
    shp = np.array([0, 0, 2, 4], np.int64)
    exp_inits = {"Wq": w[:, cols[0]], "Wk": w[:, cols[1]], "Wv": w[:, cols[2]], "bq": b[cols[0]], "bk": b[cols[1]],
                 "bv": b[cols[2]], "shp": shp, "sizes": inits["sizes"]}
    # the Split's size constant is no longer read but not this pass's to drop
    _, counts = check_before_after(text, ["infer-shapes", NAME], expected, initializers=inits,
                                       expected_initializers=exp_inits)
    assert counts[NAME] == 1


def test_gathered_weight_is_lazy():
    text, inits = packed(2, 4)
    model, counts, _ = run(text, inits)
    assert counts == {NAME: 1}
    gathered = [v.const_value for v in model.graph.initializers.values() if v.name.endswith("/weight")]
    assert len(gathered) == 3 and all(isinstance(t, ir.LazyTensor) for t in gathered)
    assert "W" not in model.graph.initializers


@pytest.mark.parametrize("form", ["split", "split3", "slice"])
@pytest.mark.parametrize("after", [True, False])
@pytest.mark.parametrize("target", ["const", "concat", "concat-1"])
def test_forms_fire_and_agree(form: str, after: bool, target: str):
    text, inits = packed(3, 4, form=form, after=after, target=target)
    model, counts, notes = run(text, inits)
    assert counts == {NAME: 1}, notes
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Split"] == ops["Slice"] == 0 and ops["MatMul"] == 3, ops
    assert_valid(model, parse_proto(text, inits))
    assert_same_outputs(parse_proto(text, inits), model, dims={"B": 2, "S": 5})
    assert_unchanged_by(model, NAME)


def test_minus_one_heads_resolved():
    """Shape(x)[0:2] ++ [-1, 3H]: once fold-constants reads the target, the -1 is proven N, so the new target and
    views say N."""
    text, inits = packed(2, 4, target="concat-1")
    model, counts, _ = run(text, inits, ("infer-shapes", "fold-constants"))
    assert counts == {NAME: 1}
    views = [n.outputs[0] for n in model.graph if n.op_type == "Reshape"]
    assert len(views) == 3 and all(v.shape[2] == 2 and v.shape[3] == 4 for v in views)
    concat = views[0].producer().inputs[1].producer()
    assert concat.op_type == "Concat" and concat.inputs[-1].const_value.numpy().tolist() == [2, 4]
    assert_same_outputs(parse_proto(text, inits), model, dims={"B": 2, "S": 3})


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs, reason", [
    ({"parts": (4, 8, 12)}, "are not equal to H = 8"),
    ({"form": "slice", "parts": (4, 8, 12)}, "is not one part of H = 8"),
    ({"const_weight": False}, "the weight is not a constant 2-D tensor"),
    ({"extra": "view"}, "the packed projection is a graph output"),
])
def test_refusals(kwargs: dict, reason: str):
    text, inits = packed(2, 8, **kwargs)
    model, counts, notes = run(text, inits)
    before = to_bytes(model)
    assert counts == {}
    assert any(reason in n for n in notes), notes
    assert to_bytes(model) == before


def test_refuses_target_not_n_3h():
    text, inits = packed(2, 4)
    for shape, sizes in (([0, 0, 6, 4], [1, 1, 2]),      # last element not 3H
                         ([0, -1, 1, 12], [4, 4, 4])):    # heads element neither N = 24 / 12 nor -1
        inits["shape"], inits["sizes"] = np.array(shape, np.int64), np.array(sizes, np.int64)
        _, counts, notes = run(text, inits)
        assert counts == {}, shape
        assert any("the Reshape target is not (.., N, 3H) with N*3H = 24" in n for n in notes), notes


def test_not_a_site_is_silent():
    """A Reshape whose view nobody splits is no site: nothing fires and nothing is noted."""
    text = """g (float[B, S, 24] y) => (float[B, S, 2, 12] view) {
      view = Reshape(y, shape)
    }"""
    _, counts, notes = run(text, {"shape": np.array([0, 0, 2, 12], np.int64)})
    assert counts == {} and notes == []


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), h=st.sampled_from([2, 4, 8]), bias=st.booleans(), bias_first=st.booleans(),
       form=st.sampled_from(["split", "split3", "slice"]), after=st.booleans(),
       target=st.sampled_from(["const", "concat", "concat-1"]), dtype=st.sampled_from(["float", "float16"]),
       extra=st.sampled_from([None, "part"]), dims=st.sampled_from([{"B": 1, "S": 1}, {"B": 2, "S": 3}]))
def test_property(n, h, bias, bias_first, form, after, target, dtype, extra, dims):
    text, inits = packed(n, h, bias=bias, bias_first=bias_first, form=form, after=after, target=target,
                         dtype=dtype, extra=extra)
    model, counts, notes = run(text, inits)
    assert counts == {NAME: 1}, notes
    assert Counter(n.op_type for n in model.graph)["MatMul"] == 3
    assert_valid(model, parse_proto(text, inits))
    assert_same_outputs(parse_proto(text, inits), model, dims=dims)
    assert_unchanged_by(model, NAME)


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("fixture", ["gpt2_ts", "llama_dynamo", "phi3_ts"])
def test_fixtures_have_no_site(fixture: str):
    """No committed fixture packs per head: the pass never fires there (GPT-2 splits before its head reshape)."""
    model = onnxc.ir.load(ROOT / "fixtures" / "models" / f"{fixture}.onnx")
    ctx = pm.PassContext(level=2)
    for p in pm.flatten(pm.parse_pipeline(O1)):
        model = p.run(model, ctx).model
    assert pm.get_pass(NAME).run(model, ctx).counts == {}


ZOO = ROOT / "bench" / "out" / "zoo"


@pytest.mark.slow
@pytest.mark.parametrize("export", ["gpt_neox_ts", "gpt_neox_dynamo_past"])
def test_gpt_neox_fuses(export: str, tmp_path: Path):
    path = ZOO / export / "model.onnx"
    if not path.exists():
        pytest.skip("run `python bench/zoo.py --only 'gpt_neox*'` to export the GPT-NeoX models")
    onnxc.compile(str(path), 2, "cpu", output=str(tmp_path / "o.onnx"))   # verifies on onnxruntime
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0, ops
