"""fuse-mha: self-attention whose mask GroupQueryAttention cannot express -> MultiHeadAttention (attention_bias)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from attention_graphs import Variant, build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuse_gqa import assert_equivalent, fuse

from onnxc import coverage
from onnxc.pipeline import CLEANUP, O1

PIPE = f"{O1},canonicalize-rotary,fuse-gqa,fuse-mha,{CLEANUP},sort-topologically"
ENCODER = Variant(past=False, kv_heads=4, noncausal=True)     # bidirectional, rotary, padding (ModernBERT-like)


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def mha(model):
    return next(n for n in model.graph if n.op_type == "MultiHeadAttention")


# --------------------------------------------------------------------------------------------- before / after
def test_fuse_mha_takes_bidirectional_rotary_attention_that_gqa_refuses():
    model, ctx = fuse(build(ENCODER), PIPE)
    assert ops(model)["MultiHeadAttention"] == 1 and "Softmax" not in ops(model)
    assert "GroupQueryAttention" not in ops(model)
    node = mha(model)
    assert node.domain == "com.microsoft" and node.attributes["num_heads"].value == 4
    assert node.inputs[5] is not None and node.inputs[3] is None
    assert any(n.startswith("fuse-gqa: attention at") and "mask" in n for n in ctx.notes), ctx.notes
    assert ops(model)["Cos"] >= 1          # the rotary stays in the graph: the op gets Q and K rotated
    assert_equivalent(ENCODER, build(ENCODER), model)


def test_fuse_mha_leaves_causal_attention_to_gqa():
    v = Variant(past=False, kv_heads=4)
    model, _ = fuse(build(v), PIPE)
    assert ops(model)["GroupQueryAttention"] == 1 and "MultiHeadAttention" not in ops(model)


@pytest.mark.parametrize("mask_form", ["add", "where"])
def test_fuse_mha_turns_either_mask_form_into_an_additive_bias(mask_form):
    v = Variant(past=False, kv_heads=4, noncausal=True, window=3, mask_form=mask_form)
    model, _ = fuse(build(v), PIPE)
    bias = mha(model).inputs[5].producer()
    assert bias.op_type == "Where"
    if mask_form == "where":        # Where(keep, 0, lowest) written by the pass
        assert bias.inputs[1].const_value.numpy() == 0
    assert_equivalent(v, build(v), model)


def test_fuse_mha_expands_a_padding_mask_over_the_queries():
    v = Variant(past=False, kv_heads=4, pad_only=True)
    model, _ = fuse(build(v), PIPE)
    assert mha(model).inputs[5].producer().op_type == "Expand"
    assert_equivalent(v, build(v), model)


@pytest.mark.parametrize("rotary", [False, True])
def test_fuse_mha_with_a_kv_cache_returns_the_presents(rotary):
    v = Variant(noncausal=True, kv_heads=4, rotary=rotary)
    model, _ = fuse(build(v), PIPE)
    node = mha(model)
    assert len(node.outputs) == 3 and node.inputs[6].name == "past_key_values.0.key"
    assert {o.name for o in model.graph.outputs} >= {node.outputs[1].name, node.outputs[2].name}
    assert_equivalent(v, build(v), model)


def test_fuse_mha_refuses_grouped_heads_and_a_softcap():
    for v, why in ((Variant(past=False, noncausal=True), "grouped KV heads"),
                   (Variant(past=False, kv_heads=4, noncausal=True, softcap=3.0, scale_on="scores"), "a softcap")):
        proto = build(v)
        next(n for n in proto.graph.node if n.op_type == "Softmax").name = "attn/Softmax"
        model, ctx = fuse(proto, PIPE)
        assert "MultiHeadAttention" not in ops(model), v
        assert any(n.startswith("fuse-mha: attention at") and why in n for n in ctx.notes), (why, ctx.notes)
        cov = coverage.measure(model, ctx.notes)["attention"]
        assert cov["fused"] == 0 and f"MultiHeadAttention: {why}" in cov["misses"][0]["reason"]


def test_fuse_mha_hosts_float16_on_the_cpu_target():
    """onnxruntime runs a float16 MultiHeadAttention on the CPU through inserted Casts (its kernel is float32)."""
    v = Variant(past=False, kv_heads=4, noncausal=True, dtype=onnx.TensorProto.FLOAT16)
    model, ctx = fuse(build(v), PIPE)
    assert ops(model)["MultiHeadAttention"] == 1, ctx.notes
    assert_equivalent(v, build(v), model)


def test_fuse_mha_is_idempotent():
    model, _ = fuse(build(ENCODER), PIPE)
    again, ctx = fuse(model, "fuse-mha")
    assert ops(again) == ops(model) and not ctx.notes


# ------------------------------------------------------------------------------------------------- property
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(rotary=st.booleans(), interleaved=st.booleans(), window=st.sampled_from([0, 2, 4]),
       mask_form=st.sampled_from(["add", "where"]), scale_on=st.sampled_from(["qk", "scores", "q"]),
       pad_only=st.booleans(), qk_norm=st.booleans(), nan_guard=st.booleans(), past=st.booleans())
def test_fuse_mha_property(rotary, interleaved, window, mask_form, scale_on, pad_only, qk_norm, nan_guard, past):
    v = Variant(past=past, kv_heads=4, noncausal=True, rotary=rotary, interleaved=interleaved and rotary,
                window=0 if pad_only else window, mask_form=mask_form, scale_on=scale_on, pad_only=pad_only,
                qk_norm=qk_norm and not interleaved, nan_guard=nan_guard)
    model, ctx = fuse(build(v), PIPE)
    assert ops(model)["MultiHeadAttention"] == 1 and "Softmax" not in ops(model), (v, ctx.notes)
    assert_equivalent(v, build(v), model)
    np.testing.assert_equal(ops(fuse(model, "fuse-mha")[0]), ops(model))
