"""In-place KV cache (compiler/kvcache.py): which compiled decoders may keep past and present in one buffer, and a
decode loop run that way gives the outputs of the copying loop, step by step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc import kvcache, verify

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "models"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The TorchScript Llama with a KV cache at -O2: every attention is GroupQueryAttention."""
    out = tmp_path_factory.mktemp("kv") / "llama.onnx"
    res = onnxc.compile(FIXTURES / "llama_ts_past.onnx", level=2, output=out)
    model = ir.load(out)
    return out, model, verify.session_for(out), res.report


def _inputs(model: ir.Model, batch: int, seq: int, past: int, seed: int) -> dict[str, np.ndarray]:
    return verify.make_inputs(model, verify.Scenario("s", batch, seq, past), seed)


def test_compiled_llama_pairs_every_past_with_its_present(llama):
    _, model, _, report = llama
    layout = kvcache.shared_cache_pairs(model)
    assert layout.shareable, layout.reason
    pasts = [v.name for v in model.graph.inputs if verify.input_role(v) == "past"]
    assert [p for p, _ in layout.pairs] == pasts
    outputs = [v.name for v in model.graph.outputs]
    assert all(present in outputs for _, present in layout.pairs)
    assert report["kv_cache"]["status"] == "verified"
    assert report["kv_cache"]["pairs"] == len(pasts)


def test_uncompiled_export_and_mha_model_are_not_shareable(tmp_path):
    raw = ir.load(FIXTURES / "llama_ts_past.onnx")
    layout = kvcache.shared_cache_pairs(raw)
    assert not layout.shareable and "not by GroupQueryAttention alone" in layout.reason
    res = onnxc.compile(FIXTURES / "gpt2_ts_past.onnx", level=2, output=tmp_path / "gpt2.onnx")
    assert res.report["ops_after"].get("com.microsoft.MultiHeadAttention")
    assert res.report["kv_cache"]["status"] == "not applicable"
    assert "not by GroupQueryAttention alone" in res.report["kv_cache"]["reason"]
    bert = onnxc.compile(FIXTURES / "bert_ts.onnx", level=2, output=tmp_path / "bert.onnx")
    assert bert.report["kv_cache"] == {"status": "not applicable", "reason": "the model has no past key/value inputs"}


def test_a_fixed_length_past_is_not_shareable(llama):
    _, model, _, _ = llama
    model = model.clone()
    past = next(v for v in model.graph.inputs if verify.input_role(v) == "past")
    past.shape = ir.Shape([1, past.shape[1], 4, past.shape[3]])
    layout = kvcache.shared_cache_pairs(model)
    assert not layout.shareable and "fixed length (4)" in layout.reason


def _decode_both_ways(path: Path, model: ir.Model, session, prompt: int, steps: int, capacity: int, seed: int):
    """A prompt then `steps` single tokens, run by copying (present fed back as past) and in place (one buffer
    per past, bound as input and output). Yields both runs' outputs, step by step."""
    layout = kvcache.shared_cache_pairs(model)
    present_of = dict(layout.pairs)
    feeds = _inputs(model, 1, prompt, 0, seed)
    copied = dict(feeds)
    names = [o.name for o in session.get_outputs()]
    buffers = {p: np.zeros(a.shape[:2] + (capacity,) + a.shape[3:], a.dtype) for p, a in feeds.items()
               if p in present_of}
    rng = np.random.default_rng(seed)
    length = 0
    for step in range(steps + 1):
        seq = prompt if step == 0 else 1
        ref = dict(zip(names, session.run(None, copied)))
        got = _run_in_place(session, copied, present_of, buffers, names)
        yield ref, got, {n: buffers[p][:, :, :length + seq] for p, n in present_of.items()}
        length += seq
        nxt = {}
        for v in model.graph.inputs:
            role = verify.input_role(v)
            if role == "past":
                nxt[v.name] = ref[present_of[v.name]]
            elif role == "mask":
                nxt[v.name] = np.ones((1, length + 1), copied[v.name].dtype)
            elif role == "position":
                nxt[v.name] = np.array([[length]], copied[v.name].dtype)
            else:
                nxt[v.name] = rng.integers(0, 8, (1, 1)).astype(copied[v.name].dtype)
        copied = nxt


def _run_in_place(session, feeds, present_of, buffers, names):
    import onnxruntime as ort

    binding = session.io_binding()
    others = [n for n in names if n not in set(present_of.values())]
    for n in others:
        binding.bind_output(n, "cpu")
    for name, a in feeds.items():
        if name in present_of:
            value = ort.OrtValue.ortvalue_from_numpy(buffers[name])
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present_of[name], value)
        else:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(a))
    session.run_with_iobinding(binding)
    return {n: binding.get_outputs()[k].numpy() for k, n in enumerate(others)}


def test_decode_loop_in_one_buffer_matches_the_copying_loop(llama):
    path, model, session, _ = llama
    steps = 0
    for ref, got, cache in _decode_both_ways(path, model, session, prompt=5, steps=4, capacity=32, seed=1):
        np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        for name, part in cache.items():
            np.testing.assert_allclose(part, ref[name], rtol=1e-6, atol=1e-6)
        steps += 1
    assert steps == 5


def test_check_shared_reports_a_difference(llama, monkeypatch):
    path, model, _, _ = llama
    feeds = [_inputs(model, 1, 1, 4, 0)]
    assert kvcache.check_shared(path, model, feeds)["status"] == "verified"
    real = kvcache.run_shared

    def off_by_a_little(*args, **kw):
        out = real(*args, **kw)
        out["logits"] = out["logits"] + 1e-2 * np.abs(out["logits"]).max()
        return out
    monkeypatch.setattr(kvcache, "run_shared", off_by_a_little)
    rep = kvcache.check_shared(path, model, feeds)
    assert rep["status"] == "differs" and "'logits'" in rep["reason"]


def test_check_shared_skips_padded_masks_and_empty_pasts(llama):
    path, model, _, _ = llama
    padded = _inputs(model, 2, 1, 3, 0)
    mask = next(v.name for v in model.graph.inputs if verify.input_role(v) == "mask")
    padded[mask][-1, -1] = 0
    prefill = _inputs(model, 1, 3, 0, 0)
    rep = kvcache.check_shared(path, model, [padded, prefill])
    assert rep["status"] == "not run"


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), past=st.integers(1, 20), seq=st.integers(1, 3), slack=st.integers(0, 12),
       seed=st.integers(0, 2**16))
def test_one_run_in_a_buffer_matches_a_copying_run(llama, batch, past, seq, slack, seed):
    _, model, session, _ = llama
    seq = 1 if batch > 1 else seq            # onnxruntime's GroupQueryAttention takes a past with batch 1 only
    feeds = _inputs(model, batch, seq, past, seed)
    names = [o.name for o in session.get_outputs()]
    ref = dict(zip(names, session.run(None, feeds)))
    new = kvcache.appended_positions(model, feeds)
    assert new == seq
    got = kvcache.run_shared(session, feeds, kvcache.shared_cache_pairs(model).pairs, past + seq + slack, new)
    for name in names:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
