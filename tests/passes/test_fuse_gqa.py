"""fuse-gqa and pack-projections: synthetic attention variants, refusals with reasons, properties, fixtures."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxc
import pytest
from attention_graphs import Variant, build
from helpers import run_ort
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnxc import pass_manager as pm
from onnxc.pipeline import CLEANUP, O1
from onnxc.shapes import derived_dims

ROOT = Path(__file__).resolve().parents[2] / "fixtures"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())["models"]
DECODERS = [e for e in MANIFEST if e["kind"] == "decoder" and e["family"] != "gpt2"]
PIPE = f"{O1},canonicalize-rotary,fuse-gqa,pack-projections,{CLEANUP},sort-topologically"


def fuse(proto: onnx.ModelProto | ir.Model, passes: str = PIPE, **options) -> tuple[ir.Model, pm.PassContext]:
    model = proto if isinstance(proto, ir.Model) else ir.from_proto(proto)
    ctx = pm.PassContext(level=2, options=options)
    for p in pm.flatten(pm.parse_pipeline(passes)):
        model = p.run(model, ctx).model
    return model, ctx


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def feeds_for(v: Variant, batch: int, seq: int, past: int, pad: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dt = onnx.helper.tensor_dtype_to_np_dtype(v.dtype)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    if pad:
        mask[-1, past + seq - pad:] = 0
    f = {"x": rng.standard_normal((batch, seq, 32)).astype(dt), "attention_mask": mask,
         "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64).copy()}
    if not v.positions:
        del f["position_ids"]
    if not v.mask_input:
        del f["attention_mask"]
    if v.past:
        for kind in ("key", "value"):
            f[f"past_key_values.0.{kind}"] = rng.standard_normal((batch, v.kv_heads, past, v.head)).astype(
                np.float16 if v.past_fp16 else dt)
    return f


def assert_equivalent(v: Variant, before: onnx.ModelProto, after: ir.Model) -> None:
    tol = 2e-2 if v.dtype == onnx.TensorProto.FLOAT16 else 2e-4
    cases = [(2, 5, 0, 0), (2, 6, 0, 2)]
    if v.static:                      # the one shape a static model accepts, plain and right-padded
        cases = [v.static + (0,)] + ([v.static + (1,)] if not v.static[2] else [])
    elif v.past:
        cases += [(2, 1, 7, 0), (1, 3, 4, 0)]
    if v.window and not v.static:
        cases += [(1, v.window + 3, 0, 0)] + ([(2, 1, v.window + 4, 0)] if v.past else [])
    for batch, seq, past, pad in cases:
        if (not v.past and past) or (pad and not v.mask_input):
            continue
        feeds = feeds_for(v, batch, seq, past, pad)
        want = run_ort(before, feeds)
        got = run_ort(after, feeds)
        for w, g in zip(want, got):
            w, g = w.astype(np.float64), g.astype(np.float64)
            if pad and w.shape[:2] == (batch, seq):
                w[-1, seq - pad:] = 0
                g[-1, seq - pad:] = 0
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, np.abs(w).max()),
                                       err_msg=f"{v} batch={batch} seq={seq} past={past} pad={pad}")


# --------------------------------------------------------------------------------------------- before / after
def test_fuse_gqa_replaces_the_attention_core():
    v = Variant()
    model, _ = fuse(build(v))
    c = ops(model)
    assert c["GroupQueryAttention"] == 1 and c["Softmax"] == 0 and c["Expand"] == 0 and c["Concat"] == 0
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    attrs = {k: a.value for k, a in gqa.attributes.items()}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and attrs["do_rotary"] == 1
    assert attrs["local_window_size"] == -1
    assert attrs["scale"] == pytest.approx(0.25, rel=1e-6)
    # packed QKV: one MatMul feeds the query input, key/value are absent
    assert gqa.inputs[0].producer().op_type == "MatMul" and gqa.inputs[1] is None and gqa.inputs[2] is None
    assert [o.name for o in model.graph.outputs] == ["out", "present.0.key", "present.0.value"]
    assert gqa.outputs[1].name == "present.0.key"
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_without_cache_keeps_the_signature():
    v = Variant(past=False)
    model, _ = fuse(build(v))
    assert ops(model)["GroupQueryAttention"] == 1
    assert [i.name for i in model.graph.inputs] == ["x", "attention_mask", "position_ids"]
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("past", [False, True])
def test_fuse_gqa_reads_head_counts_inference_lost_by_evaluating_shapes(past):
    """CodeGen's TorchScript form: the heads are split by two reshapes of computed shapes, so inference knows
    neither the head count nor the KV head count; their shapes, evaluated on two probe sizes, give them."""
    v = Variant(lost_heads=True, past=past, kv_heads=4)     # CodeGen: as many KV heads as query heads
    pre, _ = fuse(build(v), f"{O1},canonicalize-rotary")
    views = [n.outputs[0] for n in pre.graph if n.op_type == "Reshape" and len(derived_dims(n.outputs[0]) or ()) == 4
             and derived_dims(n.outputs[0])[3] == v.head]
    assert views and all(not isinstance(derived_dims(x)[2], int) for x in views), [derived_dims(x) for x in views]
    model, _ = fuse(build(v))
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert (gqa.attributes["num_heads"].value, gqa.attributes["kv_num_heads"].value) == (v.heads, v.kv_heads)
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("variant", [
    Variant(rotary_f32=True, dtype=onnx.TensorProto.FLOAT16),                 # OLMo
    Variant(rotary_f32=True, dtype=onnx.TensorProto.FLOAT16, past=False),
    Variant(k_cast=True, dtype=onnx.TensorProto.FLOAT16, scale_on="scores"),  # GPT-J
    Variant(k_cast=True, dtype=onnx.TensorProto.FLOAT16, scale_on="scores", past=False),
    Variant(past_fp16=True),                                                  # a float32 layer, float16 cache
], ids=["rotary-f32", "rotary-f32-prefill", "k-cast", "k-cast-prefill", "past-fp16"])
def test_fuse_gqa_reads_through_float_casts(variant):
    """Exporters' float16 forms: rotary computed in float32 and cast back (rotate_half taken before the Cast), K
    cast to float32 before its transposition, a float16 cache cast up before the Concat."""
    model, ctx = fuse(build(variant))
    assert ops(model)["GroupQueryAttention"] == 1, ctx.notes
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    if variant.rotary_f32:
        assert gqa.attributes["do_rotary"].value == 1
    if variant.past_fp16:       # the op reads the cast-up cache; its presents are the graph's (float32)
        assert gqa.inputs[3].producer().op_type == "Cast"
    assert_equivalent(variant, build(variant), model)


def test_fuse_gqa_finds_the_sliding_window():
    v = Variant(window=5)
    model, _ = fuse(build(v))
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["local_window_size"].value == 5
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_rotary_outside_when_the_kernel_cannot_take_it():
    v = Variant(head=8)          # ORT's rotary inside GQA needs a head size that is a multiple of 16
    model, _ = fuse(build(v))
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["do_rotary"].value == 0 and ops(model)["Cos"] == 1
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_rotary_tables_cover_max_seq_len():
    model, _ = fuse(build(Variant()), max_seq_len=64)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    cos = gqa.inputs[7].const_value.numpy()
    assert cos.shape == (64, 8)
    np.testing.assert_allclose(cos[10], np.cos(10 / 10000 ** (np.arange(0, 16, 2) / 16)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("past", [False, True])
def test_fuse_gqa_static_shapes_are_probed_at_their_own_size(past):
    """Every dim fixed: the probes run at the model's one shape; the rotary tables cover its one length."""
    v = Variant(past=past, static=(1, 3, 4 if past else 0))
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1, ctx.notes
    assert gqa[0].attributes["local_window_size"].value == -1 and gqa[0].inputs[7].const_value.shape[0] >= 3 + v.static[2]
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_static_window_shorter_than_the_length_is_found():
    v = Variant(past=False, static=(1, 9, 0), window=4)
    model, _ = fuse(build(v))
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["local_window_size"].value == 4
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_refuses_a_window_probe_it_cannot_size():
    """A static query length with a dynamic mask length, no cache: the long window probe cannot be sized."""
    proto = build(Variant(past=False))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    proto.graph.input[2].type.tensor_type.shape.dim[1].dim_value = 3
    model, ctx = fuse(proto)
    assert ops(model)["GroupQueryAttention"] == 0
    assert any("is not (B, N, S, T)" in n for n in ctx.notes), ctx.notes


@pytest.mark.parametrize("opset", [14, 15, 18])
def test_fuse_gqa_emits_nodes_valid_at_the_model_opset(opset):
    v = Variant(opset=opset)
    model, _ = fuse(build(v))
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)       # Shape(start, end) at opset 14 fails here: "Unrecognized attribute"
    assert ops(model)["GroupQueryAttention"] == 1
    assert not any(n.op_type == "Shape" and "start" in n.attributes for n in model.graph)
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("window", [0, 4])
def test_fuse_gqa_softcap_becomes_the_attribute(window):
    """Gemma2: c * tanh(s * QK^T / c) + mask -> softcap=c, scale=s (the kernel's order: scale, softcap, mask)."""
    v = Variant(softcap=3.0, scale_on="scores", window=window)
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and ops(model)["Tanh"] == 0, ctx.notes
    assert gqa[0].attributes["softcap"].value == pytest.approx(3.0)
    assert gqa[0].attributes["scale"].value == pytest.approx(0.25, rel=1e-6)
    assert gqa[0].attributes["local_window_size"].value == (window or -1)
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_softcap_with_a_scale_inside_the_tanh():
    """c * tanh(a * x) = c * tanh((c*a*x) / c): the factor inside the tanh folds into the scale."""
    proto = build(Variant(softcap=2.0, scale_on="q"))
    div = next(n for n in proto.graph.node if n.op_type == "Div")
    c = next(i for i in proto.graph.initializer if i.name == div.input[1])
    c.CopyFrom(onnx.numpy_helper.from_array(np.array(0.25, np.float32), c.name))     # 2 * tanh(x / 0.25)
    model, _ = fuse(proto)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["softcap"].value == pytest.approx(2.0)
    assert gqa.attributes["scale"].value == pytest.approx(0.25 * 4 * 2, rel=1e-6)   # s * a * c
    assert_equivalent(Variant(softcap=2.0, scale_on="q"), proto, model)


def test_fuse_gqa_refuses_a_negative_softcap_multiplier():
    proto = build(Variant(softcap=3.0))
    tanh_mul = next(n for n in proto.graph.node if n.op_type == "Mul" and n.input[0].startswith("tanh"))
    c = next(i for i in proto.graph.initializer if i.name == tanh_mul.input[1])
    c.CopyFrom(onnx.numpy_helper.from_array(np.array(-3.0, np.float32), c.name))
    model, ctx = fuse(proto)
    assert ops(model)["GroupQueryAttention"] == 0
    assert any("softcap multiplier -3.0 that is not positive" in n for n in ctx.notes), ctx.notes


@pytest.mark.parametrize("past, rotary", [(True, True), (False, True), (True, False)])
def test_fuse_gqa_commutes_a_head_norm_through_the_transpose(past, rotary):
    """Gemma3: SLN(Transpose(q4, [0,2,1,3])) = Transpose(SLN(q4)); the norm moves onto the BSNH input."""
    v = Variant(qk_norm=True, past=past, rotary=rotary)
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1, ctx.notes
    sln = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization"]
    assert len(sln) == 2 and all(len(n.inputs[0].shape) == 4 and n.inputs[0].shape[2] in (2, 4) for n in sln)
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_refuses_a_head_norm_over_more_than_the_last_axis():
    proto = build(Variant(qk_norm=True))
    sln = next(n for n in proto.graph.node if n.op_type == "SimplifiedLayerNormalization")
    next(a for a in sln.attribute if a.name == "axis").i = 2
    model, ctx = fuse(proto)
    assert ops(model)["GroupQueryAttention"] == 0
    assert any("normalized over more than its last axis" in n for n in ctx.notes), ctx.notes


@pytest.mark.parametrize("past", [True, False])
def test_fuse_gqa_interleaved_rotary_on_bsnh_goes_inside(past):
    """GPT-J: x*cos + rotate_every_two(x)*sin on the BSNH views, cos/sin repeated pairwise -> rotary_interleaved=1."""
    v = Variant(interleaved=True, past=past)
    model, ctx = fuse(build(v), max_seq_len=64)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and ops(model)["Cos"] == 0, ctx.notes
    attrs = {k: a.value for k, a in gqa[0].attributes.items()}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 1
    cos = gqa[0].inputs[7].const_value.numpy()
    np.testing.assert_allclose(cos[10], np.cos(10 / 10000 ** (np.arange(0, 16, 2) / 16)), rtol=1e-5, atol=1e-6)
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_interleaved_rotary_stays_outside_below_the_kernel_size():
    v = Variant(interleaved=True, head=8)
    model, ctx = fuse(build(v))
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["do_rotary"].value == 0 and gqa.attributes["rotary_interleaved"].value == 0
    assert ops(model)["Cos"] == 1, ctx.notes
    assert_equivalent(v, build(v), model)


def _rotary_outside(model: ir.Model, ctx: pm.PassContext, reason: str) -> None:
    """Attention fused, the graph's own rotation left outside the kernel (do_rotary=0), with the reason noted."""
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and gqa[0].attributes["do_rotary"].value == 0, ctx.notes
    assert any("stays outside GroupQueryAttention" in n and reason in n for n in ctx.notes), ctx.notes


def test_fuse_gqa_keeps_interleaved_tables_that_are_not_pairwise_outside():
    v = Variant(interleaved=True)
    proto = build(v)
    g = proto.graph
    pairs = next(n for n in g.node if n.op_type == "Concat" and len(n.input) == 2 and n.input[0] == n.input[1])
    g.initializer.append(onnx.numpy_helper.from_array(np.array(1.5, np.float32), "c_odd"))
    g.node.insert(list(g.node).index(pairs), onnx.helper.make_node("Mul", [pairs.input[1], "c_odd"], ["f_odd"]))
    pairs.input[1] = "f_odd"
    model, ctx = fuse(proto)
    _rotary_outside(model, ctx, "not repeated pairwise")
    assert_equivalent(v, proto, model)


@pytest.mark.parametrize("past", [True, False])
def test_fuse_gqa_reads_the_head_repeat_through_an_fp32_cast_of_v(past):
    """fp16 TorchScript: Cast(QK^T, fp32) + mask, Softmax, MatMul(P, Cast(repeat(V), fp32)), Cast back to fp16."""
    v = Variant(upcast=True, dtype=onnx.TensorProto.FLOAT16, past=past)
    model, ctx = fuse(build(v))
    c = ops(model)
    assert c["GroupQueryAttention"] == 1 and c["Softmax"] == 0 and c["Expand"] == 0, ctx.notes
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_casts_the_output_back_to_the_wider_type():
    """A site whose output stays fp32 (the Cast back to fp16 removed): GQA's fp16 output is cast to fp32."""
    proto = build(Variant(upcast=True, dtype=onnx.TensorProto.FLOAT16, past=False))
    g = proto.graph
    back = [n for n in g.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16][-1]
    final = next(n for n in g.node if n.output[0] == "out")
    final.input[0] = back.input[0]
    g.initializer.append(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(next(i for i in g.initializer if i.name == final.input[1])).astype(np.float32), "wo32"))
    final.input[1] = "wo32"
    g.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    model, _ = fuse(proto)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.outputs[0].dtype == ir.DataType.FLOAT16
    assert [u.op_type for u, _ in gqa.outputs[0].uses()] == ["Cast"]
    feeds = feeds_for(Variant(dtype=onnx.TensorProto.FLOAT16, past=False), 2, 5, 0)
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(proto, feeds)[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("past", [True, False])
def test_fuse_gqa_scale_after_the_mask(past):
    """CodeGen: Softmax((S + M) / c) = Softmax(S/c + M/c); M/c is still 0 or very negative, and is probed so."""
    v = Variant(scale_on="after_mask", past=past)
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1, ctx.notes
    assert gqa[0].attributes["scale"].value == pytest.approx(0.25, rel=1e-6)
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("factor, reason", [(-4.0, "not positive"), (None, "values other than 0 and a large negative")])
def test_fuse_gqa_refuses_a_scale_after_the_mask_it_cannot_prove(factor, reason):
    """A negative scale after the mask flips it; a bias of 0.5 scaled is still a bias, not a mask."""
    proto = build(Variant(scale_on="after_mask", bias_value=0.5 if factor is None else 0.0))
    if factor is not None:
        div = next(n for n in proto.graph.node if n.op_type == "Div")
        c = next(i for i in proto.graph.initializer if i.name == div.input[1])
        c.CopyFrom(onnx.numpy_helper.from_array(np.array(factor, np.float32), c.name))
    model, ctx = fuse(proto)
    assert ops(model)["GroupQueryAttention"] == 0
    assert any(reason in n for n in ctx.notes), ctx.notes


def test_fuse_gqa_probes_a_mask_sized_through_a_large_table_without_loading_it():
    """The mask's size comes from Shape(Gather(embedding, ids)) with a 5 MB table: read only for its shape, so
    the probe evaluates zeros of its shape in its place (a cone reading that much weight data is refused)."""
    proto = build(Variant(past=False))
    g = proto.graph
    g.input.remove(next(i for i in g.input if i.name == "x"))
    g.input.insert(0, onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]))
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 32), np.float32), "embed"))
    g.node.insert(0, onnx.helper.make_node("Gather", ["embed", "input_ids"], ["x"]))
    table = (np.random.default_rng(0).standard_normal((40000, 32)) * 0.1).astype(np.float32)
    loads: list[int] = []

    def load() -> ir.TensorProtocol:
        loads.append(1)
        return ir.tensor(table)

    model = ir.from_proto(proto)
    embed = model.graph.initializers["embed"]
    embed.const_value = ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(table.shape))
    embed.shape = ir.Shape(table.shape)
    before = ir.to_proto(model)
    loads.clear()
    model, ctx = fuse(model, "infer-shapes,fuse-gqa,eliminate-dead")
    assert ops(model)["GroupQueryAttention"] == 1 and ops(model)["Softmax"] == 0, ctx.notes
    assert not loads
    rng = np.random.default_rng(1)
    for batch, seq, pad in ((2, 5, 0), (2, 6, 2)):
        feeds = feeds_for(Variant(past=False), batch, seq, 0, pad)
        del feeds["x"]
        feeds["input_ids"] = rng.integers(0, len(table), (batch, seq))
        want, got = run_ort(before, feeds)[0], run_ort(model, feeds)[0]
        rows = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[rows], want[rows], rtol=2e-4, atol=2e-4 * np.abs(want).max())


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("variant, reason", [
    (Variant(bias_value=0.5), "values other than 0 and a large negative"),
    (Variant(noncausal=True), "not causal"),
])
def test_fuse_gqa_refuses_masks_it_cannot_express(variant, reason):
    model, ctx = fuse(build(variant))
    assert ops(model)["GroupQueryAttention"] == 0 and ops(model)["Softmax"] == 1
    assert any(reason in note for note in ctx.notes), ctx.notes


def test_fuse_gqa_keeps_rotary_that_depends_on_more_than_position_outside():
    v = Variant()
    proto = build(v)
    # scale cos by the attention mask's length: no longer a function of the position alone
    g = proto.graph
    cos_node = next(n for n in g.node if n.op_type == "Cos")
    t = onnx.helper.make_node("Shape", ["attention_mask"], ["t_len"], start=1, end=2)
    tf = onnx.helper.make_node("Cast", ["t_len"], ["t_len_f"], to=onnx.TensorProto.FLOAT)
    old = cos_node.output[0]
    cos_node.output[0] = "cos_raw"
    mul = onnx.helper.make_node("Mul", ["cos_raw", "t_len_f"], [old])
    idx = list(g.node).index(cos_node)
    for k, n in enumerate([t, tf, mul]):
        g.node.insert(idx + 1 + k, n)
    model, ctx = fuse(proto)
    _rotary_outside(model, ctx, "not a function of the position alone")
    assert_equivalent(v, proto, model)


def _cases_agree(v: Variant, before: onnx.ModelProto, after: ir.Model, cases) -> None:
    for batch, seq, past in cases:
        feeds = feeds_for(v, batch, seq, past)
        for w, g in zip(run_ort(before, feeds), run_ort(after, feeds)):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * max(1.0, np.abs(w).max()),
                                       err_msg=f"{v} batch={batch} seq={seq} past={past}")


def test_fuse_gqa_longrope_switches_tables_at_the_total_length():
    """Phi-3 longrope: the tables switch when max(position_ids) + 1 exceeds 6. GQA reads both regimes stacked and
    slices the one the total length selects; outputs agree on both sides of the switch and across it."""
    v = Variant(longrope=6)
    proto = build(v)
    model, _ = fuse(proto, max_seq_len=64)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["do_rotary"].value == 1
    cos, sin = gqa.inputs[7], gqa.inputs[8]
    for t in (cos, sin):
        sl = t.producer()
        assert sl.op_type == "Slice" and sl.inputs[0].const_value.shape[0] == 2 * 64
    greater = next(n for n in model.graph if n.op_type == "Greater")
    assert greater.inputs[0] is gqa.inputs[6]                  # total_sequence_length
    assert int(greater.inputs[1].const_value.numpy()) == 6
    assert "Where" not in ops(model) and "Cos" not in ops(model)
    _cases_agree(v, proto, model, [(1, 6, 0), (1, 7, 0), (2, 9, 0), (2, 1, 5), (2, 1, 6), (2, 1, 11), (1, 3, 4),
                                   (1, 2, 5)])


def test_fuse_gqa_keeps_a_switch_that_reads_more_than_the_largest_position_outside():
    # the condition reads the sum of the position ids: a decode step (one position) and a prefill of the same total
    # length disagree, so no threshold on the total length expresses it
    proto = build(Variant(longrope=6))
    g = proto.graph
    red = next(n for n in g.node if n.op_type == "ReduceMax")
    red.op_type = "ReduceSum"
    red.ClearField("attribute")
    red.attribute.append(onnx.helper.make_attribute("keepdims", 0))
    model, ctx = fuse(proto, max_seq_len=64)
    _rotary_outside(model, ctx, "not a function of the position alone")
    _cases_agree(Variant(longrope=6), proto, model, [(1, 4, 0), (1, 1, 9), (1, 3, 6)])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(threshold=st.integers(1, 20), cases=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 6),
                                                               st.integers(0, 24)), min_size=2, max_size=4))
def test_fuse_gqa_longrope_property(threshold, cases):
    v = Variant(longrope=threshold)
    proto = build(v)
    model, _ = fuse(proto, max_seq_len=32)
    assert ops(model)["GroupQueryAttention"] == 1
    # ORT's GroupQueryAttention takes a past with batch 1 only when more than one token is new
    _cases_agree(v, proto, model, [(b if s == 1 or p == 0 else 1, s, p) for b, s, p in cases])


# --------------------------------------------------------------------------------------------- property
variants = st.builds(
    Variant,
    heads=st.sampled_from([4, 2]),
    kv_heads=st.sampled_from([2, 1]),
    head=st.sampled_from([16, 8]),
    past=st.booleans(),
    rotary=st.booleans(),
    scale_on=st.sampled_from(["qk", "scores", "q", "after_mask"]),
    mask_form=st.sampled_from(["add", "where"]),
    k_transpose=st.sampled_from(["perm", "reshape"]),
    window=st.sampled_from([0, 0, 4]),
    nan_guard=st.booleans(),
    softcap=st.sampled_from([0.0, 0.0, 5.0]),
    qk_norm=st.booleans(),
    interleaved=st.booleans(),
    upcast=st.booleans(),
    dtype=st.sampled_from([onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16]),
    rotate=st.sampled_from(["slice", "slice", "split", "matmul", "gather"]),
    tables_per_use=st.booleans(),
    positions=st.booleans(),
    mask_input=st.sampled_from([True, True, False]),
    rotary_f32=st.booleans(),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v=variants)
@example(v=Variant(past=False, scale_on="after_mask", softcap=5.0))   # the post-mask scale caps too
@example(v=Variant(past=False, qk_norm=True, rotary_f32=True, dtype=onnx.TensorProto.FLOAT16, nan_guard=False,
                   positions=False))   # float16 head norm, rotary in float32 on its Cast
def test_fuse_gqa_property_every_variant_fuses_and_agrees(v):
    proto = build(v)
    model, ctx = fuse(proto)
    c = ops(model)
    assert c["GroupQueryAttention"] == 1 and c["Softmax"] == 0, ctx.notes
    assert_equivalent(v, proto, model)
    # idempotent: a second run finds nothing to do
    again = pm.get_pass("fuse-gqa").run(model, pm.PassContext(level=2))
    assert not again.modified


# --------------------------------------------------------------------------------------------- rotary forms
@pytest.mark.parametrize("rotate", ["split", "matmul", "gather"])
@pytest.mark.parametrize("past", [True, False])
def test_fuse_gqa_proves_rotate_half_by_evaluation(rotate, past):
    """rotate_half written as a Split, a matrix product or a signed Gather has no form the structural reader
    knows; evaluating it from x proves it is rotate_half(x), and the rotary goes inside the kernel."""
    v = Variant(rotate=rotate, past=past)
    model, ctx = fuse(build(v))
    c = ops(model)
    assert c["GroupQueryAttention"] == 1 and c["Softmax"] == 0, ctx.notes
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["do_rotary"].value == 1
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("past", [True, False])
def test_fuse_gqa_reads_the_positions_of_a_model_without_a_position_input(past):
    """Positions Range(past, total) from the shapes (HF's cache_position): the tables are read at the positions the
    mask's length implies, and the rotary goes inside the kernel."""
    v = Variant(positions=False, past=past)
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and gqa[0].attributes["do_rotary"].value == 1, ctx.notes
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("past", [True, False])
@pytest.mark.parametrize("window", [0, 5])
def test_fuse_gqa_reads_the_lengths_of_a_model_without_a_mask_input(past, window):
    """A mask made from the shapes alone (input_ids and the cache, no attention_mask) is proven causal (+ a window)
    with nothing padded; seqlens_k and the total length come from the shapes: S + the cache's length."""
    v = Variant(positions=False, mask_input=False, past=past, window=window)
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and gqa[0].attributes["do_rotary"].value == 1, ctx.notes
    assert gqa[0].attributes["local_window_size"].value == (window or -1)
    assert not any(n.op_type == "ReduceSum" for n in model.graph)
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("past", [True, False])
def test_fuse_gqa_one_kv_head_broadcast_by_the_matmuls(past):
    """One KV head that the scores' and the values' MatMuls broadcast over the query heads (no repeat chain) is
    multi-query attention: kv_num_heads 1."""
    v = Variant(heads=4, kv_heads=1, broadcast_kv=True, past=past)
    model, ctx = fuse(build(v))
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1, ctx.notes
    assert gqa[0].attributes["num_heads"].value == 4 and gqa[0].attributes["kv_num_heads"].value == 1
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_longrope_switch_without_a_position_input():
    """longrope's switch reads the total length from the shapes alone: found, both regimes stored, rotary inside;
    prefills and decode steps on both sides of the switch agree."""
    v = Variant(longrope=6, positions=False)
    proto = build(v)
    model, ctx = fuse(proto, max_seq_len=64)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and gqa[0].attributes["do_rotary"].value == 1, ctx.notes
    _cases_agree(v, proto, model, [(1, 4, 0), (1, 9, 0), (1, 1, 3), (1, 1, 9), (1, 3, 6), (2, 1, 12)])


def test_fuse_gqa_proves_tables_computed_twice_equal():
    v = Variant(tables_per_use=True)
    model, ctx = fuse(build(v))
    assert ops(model)["GroupQueryAttention"] == 1, ctx.notes
    assert_equivalent(v, build(v), model)


def test_fuse_gqa_refuses_a_rotation_that_is_not_rotate_half():
    """A signed permutation other than rotate_half is no rotary form: refused with the reason, nothing fused."""
    v = Variant(rotate="gather")
    proto = build(v)
    for init in proto.graph.initializer:            # the sign vector: flip one sign, so it rotates wrongly
        arr = onnx.numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.shape == (v.head,) and set(np.unique(arr)) == {-1.0, 1.0}:
            arr = arr.copy()
            arr[0] = -arr[0]
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    model, ctx = fuse(proto)
    assert ops(model)["GroupQueryAttention"] == 0
    assert any("not fused" in n for n in ctx.notes), ctx.notes


# --------------------------------------------------------------------------------------------- pack-projections
def test_pack_projections_packs_biased_and_unbiased_projections():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 3, 8] x) => (float[2, 3, 4] a, float[2, 3, 6] b, float[2, 3, 4] c) {
        a = MatMul(x, wa)
        mb = MatMul(x, wb)
        b = Add(mb, bb)
        c = MatMul(x, wc)
    }"""
    rng = np.random.default_rng(0)
    inits = {"wa": rng.standard_normal((8, 4)).astype(np.float32), "wb": rng.standard_normal((8, 6)).astype(np.float32),
             "bb": rng.standard_normal(6).astype(np.float32), "wc": rng.standard_normal((8, 4)).astype(np.float32)}
    from helpers import parse_proto
    proto = parse_proto(text, inits)
    model, _ = fuse(proto, "pack-projections")
    c = ops(model)
    assert c["MatMul"] == 1 and c["Split"] == 1 and c["Add"] == 1
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    for w, g in zip(run_ort(proto, feeds), run_ort(model, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_pack_projections_leaves_different_inputs_alone():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 8] x, float[2, 8] y) => (float[2, 4] a, float[2, 4] b) {
        a = MatMul(x, wa)
        b = MatMul(y, wb)
    }"""
    from helpers import parse_proto
    inits = {"wa": np.ones((8, 4), np.float32), "wb": np.ones((8, 4), np.float32)}
    model, _ = fuse(parse_proto(text, inits), "pack-projections")
    assert ops(model)["MatMul"] == 2 and ops(model)["Split"] == 0


# --------------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("entry", DECODERS, ids=[e["file"].split("/")[-1][:-5] for e in DECODERS])
def test_fuse_gqa_fixture(entry, tmp_path):
    res = onnxc.compile(ROOT / entry["file"], level=1, output=tmp_path / "out.onnx", passes=PIPE)
    c = Counter(n.op_type for n in res.model.graph.node)
    layers = entry["config"]["num_layers"]
    assert c["GroupQueryAttention"] == layers and c["Softmax"] == 0, res.report["notes"]
    assert res.report["verification"]["status"] == "passed"
    if entry.get("mask", True):
        assert any(s["pad"] for s in res.report["verification"]["scenarios"])      # a right-padded row checked
    gqa = [n for n in res.model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["local_window_size"] == entry["config"].get("sliding_window", -1) or -1
    rotary_dim = entry["config"].get("rotary_dim", entry["config"]["head_dim"])
    assert attrs["do_rotary"] == int((rotary_dim // 2) % 8 == 0)
