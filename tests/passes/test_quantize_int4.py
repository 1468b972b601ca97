"""quantize-int4: structure before/after, quantized == dequantized-weights twin in onnxruntime, refusals with
their reasons, a property over shapes/blocks/methods/layouts, and every fixture quantized fully and verified."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import assert_valid, canonical, fixture_files, parse, parse_proto, run_pass, session, to_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc.kernels import quantize as kq
from onnxc.kernels.matmul_nbits import dequantize, quantize_rtn
from onnxc import quant_options as qo
from onnxc import quant_precision as qp
from onnxc import quant_sites as qs
from onnxc import quant_store
from onnxc.passes import quantize_int4 as qi
from onnxc.verify import QUANT_META, float_twins

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "models"
HDR = '<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>'
RNG = np.random.default_rng(0)


def w(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def quantize(model: ir.Model, **options):
    return run_pass(model, "quantize-int4", **{"quantize": "int4", **options})


def ops(model: ir.Model) -> list[str]:
    return sorted(n.op_type for n in model.graph)


def twin_outputs(model: ir.Model, feeds: dict, accuracy_level: int = 0):
    """Outputs of the quantized model (at `accuracy_level`) and of its dequantized-weights twin."""
    for n in model.graph:
        if n.op_type == "MatMulNBits":
            n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", accuracy_level)
    q = session(to_bytes(model)).run(None, feeds)
    for value, deq, _ in float_twins(model):
        value.const_value = deq
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    return q, session(to_bytes(model)).run(None, feeds)


def assert_twins_agree(model: ir.Model, feeds: dict, rtol=1e-4, accuracy_level: int = 0) -> None:
    q, d = twin_outputs(model, feeds, accuracy_level)
    for a, b in zip(q, d):
        scale = float(np.abs(b).max()) or 1.0
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------------------------------------ before / after
def test_quantize_int4_matmul_structure():
    W = w(64, 48)
    model = parse("""
    g (float[N, 64] x) => (float[N, 48] y) {
      y = MatMul(x, W)
    }""", {"W": W})
    counts = quantize(model).counts
    assert counts == {"MatMul": 1}
    assert_valid(model)
    b, s, z = kq.quantize(W, "lsq", 32, False)
    want = parse(HDR + """
    g (float[N, 64] x) => (float[N, 48] y) {
      y = com.microsoft.MatMulNBits <K = 64, N = 48, bits = 4, block_size = 32, accuracy_level = 4> (x, B, S, Z)
    }""", {"B": b, "S": s, "Z": z})
    assert canonical(model) == canonical(want)
    assert model.opset_imports["com.microsoft"] == 1
    assert QUANT_META in next(iter(model.graph)).meta


def test_quantize_int4_rtn_symmetric_is_ort_layout_without_zero_points():
    W = w(64, 16)
    model = parse("g (float[N, 64] x) => (float[N, 16] y) { y = MatMul(x, W) }", {"W": W})
    quantize(model, quantize="int4:rtn", symmetric=True, block_size=16, accuracy_level=0)
    (node,) = list(model.graph)
    b, s, z = quantize_rtn(W, 16, True)
    assert len(node.inputs) == 3 and z is None
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), b)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), s)
    assert node.attributes["block_size"].value == 16 and node.attributes["accuracy_level"].value == 0


def test_quantize_int4_transposed_weight_node():
    Wt = w(40, 64)  # (N, K)
    model = parse("""
    g (float[2, 3, 64] x) => (float[2, 3, 40] y) {
      t = Transpose <perm = [1, 0]> (Wt)
      y = MatMul(x, t)
    }""", {"Wt": Wt})
    feeds = {"x": w(2, 3, 64, seed=1)}
    assert quantize(model).counts == {"MatMul": 1}
    assert ops(model) == ["MatMulNBits"]
    src = next(iter(model.graph)).meta[QUANT_META].weight
    np.testing.assert_array_equal(np.asarray(src.numpy()), Wt.T)
    assert_twins_agree(model, feeds)


def test_quantize_int4_gemm_trans_b_alpha_beta_bias():
    W, C = w(24, 64), w(24, seed=2)
    model = parse("""
    g (float[5, 64] x) => (float[5, 24] y) {
      y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W, C)
    }""", {"W": W, "C": C})
    assert quantize(model).counts == {"Gemm+bias": 1}
    (node,) = list(model.graph)
    np.testing.assert_allclose(node.inputs[5].const_value.numpy(), 2 * C)
    np.testing.assert_allclose(np.asarray(node.meta[QUANT_META].weight.numpy()), 0.5 * W.T, rtol=1e-6)
    proto = parse_proto("""
    g (float[5, 64] x) => (float[5, 24] y) {
      y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W, C)
    }""", {"W": W, "C": C})
    feeds = {"x": w(5, 64, seed=3)}
    # the float twin (source weights) is the original Gemm to float tolerance
    for value, _, src in float_twins(model):
        value.const_value = src
    np.testing.assert_allclose(session(to_bytes(model)).run(None, feeds)[0], session(proto.SerializeToString()).run(
        None, feeds)[0], rtol=1e-5, atol=1e-5)


def test_quantize_int4_fused_matmul_trans_b():
    W = w(32, 64)
    model = parse(HDR + """
    g (float[3, 64] x) => (float[3, 32] y) {
      y = com.microsoft.FusedMatMul <transB = 1, alpha = 2.0> (x, W)
    }""", {"W": W})
    assert quantize(model).counts == {"FusedMatMul": 1}
    np.testing.assert_allclose(np.asarray(next(iter(model.graph)).meta[QUANT_META].weight.numpy()), 2 * W.T)
    assert_twins_agree(model, {"x": w(3, 64, seed=4)})


def test_quantize_int4_folds_following_bias_add_either_order():
    W, b = w(64, 32), w(32, seed=5)
    for expr in ("y = Add(m, b)", "y = Add(b, m)"):
        model = parse(f"g (float[N, 7, 64] x) => (float[N, 7, 32] y) {{ m = MatMul(x, W)\n {expr} }}",
                      {"W": W, "b": b})
        assert quantize(model).counts == {"MatMul+bias": 1}
        assert ops(model) == ["MatMulNBits"]
        assert_twins_agree(model, {"x": w(2, 7, 64, seed=6)})


def test_quantize_int4_chained_matmuls_feed_each_other():
    model = parse("""
    g (float[N, 64] x) => (float[N, 32] y) {
      h = MatMul(x, W1)
      y = MatMul(h, W2)
    }""", {"W1": w(64, 64), "W2": w(64, 32, seed=1)})
    assert quantize(model).counts == {"MatMul": 2}
    assert_valid(model)
    a, b = list(model.graph)
    assert b.inputs[0] is a.outputs[0]
    assert_twins_agree(model, {"x": w(3, 64, seed=2)})


def test_quantize_int4_keeps_add_when_matmul_output_has_other_users():
    W, b = w(64, 32), w(32, seed=5)
    model = parse("""
    g (float[N, 64] x) => (float[N, 32] y, float[N, 32] z) {
      m = MatMul(x, W)
      y = Add(m, b)
      z = Relu(m)
    }""", {"W": W, "b": b})
    assert quantize(model).counts == {"MatMul": 1}
    assert ops(model) == ["Add", "MatMulNBits", "Relu"]


def test_quantize_int4_shared_weight_quantized_once():
    W = w(64, 32)
    model = parse("""
    g (float[N, 64] x, float[N, 64] x2) => (float[N, 32] y, float[N, 32] z) {
      y = MatMul(x, W)
      z = MatMul(x2, W)
    }""", {"W": W})
    assert quantize(model).counts == {"MatMul": 2}
    a, b = list(model.graph)
    assert a.inputs[1] is b.inputs[1] and a.inputs[2] is b.inputs[2]
    assert len(model.graph.initializers) == 3


def test_quantize_int4_tied_embedding_becomes_gather_block_quantized():
    E = w(96, 64)
    model = parse("""
    g (int64[B, S] ids) => (float[B, S, 96] logits) {
      h = Gather(E, ids)
      r = Relu(h)
      logits = MatMul(r, Et)
    }""", {"E": E, "Et": np.ascontiguousarray(E.T)})
    assert quantize(model).counts == {"MatMul": 1, "Gather-tied": 1}
    assert ops(model) == ["GatherBlockQuantized", "MatMulNBits", "Relu", "Reshape"]
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert gbq.inputs[0].producer().inputs[0] is mnb.inputs[1]  # one stored table
    assert gbq.inputs[2] is mnb.inputs[2] and gbq.inputs[3] is mnb.inputs[3]
    assert "E" not in model.graph.initializers and "Et" not in model.graph.initializers
    assert_twins_agree(model, {"ids": np.array([[0, 5, 95], [7, 1, 3]], np.int64)})


def test_quantize_int4_untied_gather_and_untied_tail_are_left_alone():
    E = w(96, 64)
    model = parse("""
    g (int64[B, S] ids) => (float[B, S, 96] logits) {
      h = Gather(E, ids)
      logits = MatMul(h, Et)
    }""", {"E": E, "Et": w(64, 96, seed=9)})
    assert quantize(model).counts == {"MatMul": 1}


def test_quantize_int4_tied_table_width_no_multiple_of_the_block_takes_a_smaller_block():
    """H = 48 is no multiple of 32: the tied lm_head takes block 16 so the table is still stored once; the other
    layer keeps the requested block."""
    E = w(80, 48)
    model = parse("""
    g (int64[B, S] ids) => (float[B, S, 80] logits) {
      h = Gather(E, ids)
      r = MatMul(h, W)
      logits = MatMul(r, Et)
    }""", {"E": E, "Et": np.ascontiguousarray(E.T), "W": w(48, 48)})
    assert quantize(model).counts == {"MatMul": 2, "Gather-tied": 1}
    blocks = {n.op_type + str(n.attributes["N"].value if "N" in n.attributes else ""): n.attributes["block_size"].value
              for n in model.graph if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert blocks == {"MatMulNBits80": 16, "MatMulNBits48": 32, "GatherBlockQuantized": 16}
    assert_twins_agree(model, {"ids": np.array([[0, 5, 79], [7, 1, 3]], np.int64)})
    model = parse("""
    g (int64[B, S] ids) => (float[B, S, 80] logits) {
      h = Gather(E, ids)
      logits = MatMul(h, Et)
    }""", {"E": w(80, 40), "Et": np.ascontiguousarray(w(80, 40).T)})
    assert quantize(model).counts == {"MatMul": 1}  # H = 40: no power-of-two block >= 16 divides it


def test_quantize_int4_tied_through_transpose_of_the_same_initializer_reads_no_table(monkeypatch):
    E = w(96, 64)
    model = parse("""
    g (int64[B, S] ids) => (float[B, S, 96] logits) {
      h = Gather(E, ids)
      t = Transpose <perm = [1, 0]> (E)
      logits = MatMul(h, t)
    }""", {"E": E})
    for module in (qi, qs):
        monkeypatch.setattr(module, "table_digest", lambda chunks: pytest.fail("the shared initializer was hashed"))
    assert quantize(model).counts == {"MatMul": 1, "Gather-tied": 1}
    assert ops(model) == ["GatherBlockQuantized", "MatMulNBits", "Reshape"]
    assert_twins_agree(model, {"ids": np.array([[0, 5, 95], [7, 1, 3]], np.int64)})


def test_quantize_int4_tie_compares_bits_not_values():
    E = w(96, 64)
    Et = np.ascontiguousarray(E.T)
    E[3, 7], Et[7, 3] = 0.0, -0.0   # equal as values, different as stored bits: not one table
    model = parse("""
    g (int64[B, S] ids) => (float[B, S, 96] logits) {
      h = Gather(E, ids)
      logits = MatMul(h, Et)
    }""", {"E": E, "Et": Et})
    assert quantize(model).counts == {"MatMul": 1}


def test_quantize_int4_table_digest_does_not_depend_on_chunking():
    E = w(300, 64)
    digest = qs.table_digest([E])
    tensor = ir.tensor(E)
    assert all(qs.table_digest(qs.rows(tensor, r)) == digest for r in (1, 7, 300, 1000))
    W = np.ascontiguousarray(E.T)
    assert qs.table_digest(W[:, c:c + 64].T for c in range(0, 300, 64)) == digest


def _external_model(path: Path, v: int, h: int) -> Path:
    """ids -> Gather(E) -> MatMul(W) -> MatMul(Transpose(E)) with E (v, h) and W (h, h) in an external data file."""
    model = parse(f"""
    g (int64[B, S] ids) => (float[B, S, {v}] logits) {{
      e = Gather(E, ids)
      y = MatMul(e, W)
      t = Transpose <perm = [1, 0]> (E)
      logits = MatMul(y, t)
    }}""", {"E": w(v, h), "W": w(h, h, seed=1)})
    ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=0)
    return path


def _rss_mib(key: str) -> float:
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key)
                ) / 1024


def test_quantize_int4_streams_external_weights_peak_memory(tmp_path):
    """The pass and the save hold about one weight at a time: the peak over the RSS before compiling stays under
    2x the largest tensor (a 32 MiB table read from external data, tied to the lm_head that transposes it)."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    src = _external_model(tmp_path / "m.onnx", 16384, 512)
    largest = 16384 * 512 * 4 / 2**20
    import gc
    gc.collect()
    before = _rss_mib("VmRSS:")
    try:
        clear.write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    r = onnxc.compile(src, 0, "cpu", output=tmp_path / "q.onnx", verify=False, passes="quantize-int4,eliminate-dead",
                      options={"quantize": "int4:rtn"})
    peak = _rss_mib("VmHWM:") - before
    assert r.report["quantization"]["gather_block_quantized"] == 1
    assert peak < 2 * largest, f"peak {peak:.0f} MiB over the start for a {largest:.0f} MiB table"


@pytest.mark.parametrize("case,reason", [
    ("small_k", "K=16 < block size 32"),
    ("excluded", "excluded"),
    ("int", "activation type"),
    ("gemm_c", "Gemm C is not a constant"),
])
def test_quantize_int4_refusals_are_noted(case, reason):
    texts = {
        "small_k": ("g (float[N, 16] x) => (float[N, 8] y) { y = MatMul(x, W) }", {"W": w(16, 8)}),
        "excluded": ("g (float[N, 64] x) => (float[N, 8] y) { y = MatMul(x, lm_head_weight) }",
                     {"lm_head_weight": w(64, 8)}),
        "int": ("g (int32[N, 64] x) => (int32[N, 8] y) { y = MatMul(x, W) }", {"W": np.ones((64, 8), np.int32)}),
        "gemm_c": ("g (float[4, 64] x, float[4, 8] c) => (float[4, 8] y) { y = Gemm(x, W, c) }", {"W": w(64, 8)}),
    }
    text, inits = texts[case]
    model = parse(text, inits)
    before = to_bytes(model)
    ctx = onnxc.PassContext(options={"quantize": "int4", "exclude": ["lm_head*"]})
    result = qi.QuantizeInt4().run(model, ctx)
    assert not result.modified and to_bytes(model) == before
    assert any(reason in note for note in ctx.notes), ctx.notes


def test_quantize_int4_exclude_matches_node_names():
    model = parse("""
    g (float[N, 64] x) => (float[N, 8] y) {
      h = MatMul(x, W1)
      y = MatMul(h, W2)
    }""", {"W1": w(64, 64), "W2": w(64, 8)})
    for k, n in enumerate(model.graph):
        n.name = f"/model/layers.{k}/mlp/MatMul"
    assert quantize(model, exclude=["*/layers.1/*"]).counts == {"MatMul": 1}
    assert ops(model) == ["MatMul", "MatMulNBits"]


@pytest.mark.parametrize("opts,message", [
    ({"quantize": "int2"}, "unknown value 'int2'"),
    ({"quantize": "int4:gptq"}, "needs --calibration FILE.npz"),
    ({"quantize": "int4:gptq", "calibration": "/no/such/c.npz"}, "no such file"),
    ({"quantize": "int4:awq"}, "int4:awq:lsq needs --calibration FILE.npz"),
    ({"quantize": "int4:awq:uniform"}, "unknown value"),
    ({"quantize": "int4:gptq", "calibration": __file__, "damp": -1}, "damp must be a number >= 0"),
    ({"quantize": "int4:gptq", "calibration": __file__, "hessian_budget": -5}, "hessian_budget must be a positive"),
    ({"quantize": "int4", "block_size": 24}, "not a power of 2"),
    ({"quantize": "int4", "block_size": 8}, "not a power of 2"),
    ({"quantize": "int4:hqq", "symmetric": True}, "cannot be --symmetric"),
    ({"quantize": "int4", "calibration": "c.npz"}, "no selected method uses calibration"),
])
def test_quantize_int4_rejects_bad_options(opts, message):
    model = parse("g (float[N, 64] x) => (float[N, 8] y) { y = MatMul(x, W) }", {"W": w(64, 8)})
    with pytest.raises(onnxc.UsageError, match=message):
        run_pass(model, "quantize-int4", **opts)


def test_quantize_int4_fp16_scales_and_cuda_defaults():
    W = w(64, 32, dtype=np.float16)
    model = parse("g (float16[N, 64] x) => (float16[N, 32] y) { y = MatMul(x, W) }", {"W": W})
    ctx = onnxc.PassContext(target="cuda", options={"quantize": "int4"})
    qi.QuantizeInt4().run(model, ctx)
    (node,) = list(model.graph)
    assert node.inputs[2].const_value.dtype == ir.DataType.FLOAT16
    assert node.attributes["accuracy_level"].value == 0
    assert_twins_agree(model, {"x": w(3, 64, dtype=np.float16, seed=1)}, rtol=2e-3)


def test_quantize_int4_is_idempotent_and_spills_large_tensors(monkeypatch, tmp_path):
    monkeypatch.setattr(quant_store, "SPILL_BYTES", 0)
    model = parse("g (float[N, 64] x) => (float[N, 32] y) { y = MatMul(x, W) }", {"W": w(64, 32)})
    quantize(model, scratch_dir=str(tmp_path))
    (node,) = list(model.graph)
    assert all(isinstance(v.const_value, ir.LazyTensor) for v in node.inputs[1:])
    assert len(list(tmp_path.iterdir())) == 1
    assert not quantize(model).modified
    assert_twins_agree(model, {"x": w(3, 64, seed=1)})


def test_quantize_int4_accuracy_level_4_stays_close():
    model = parse("g (float[N, 256] x) => (float[N, 64] y) { y = MatMul(x, W) }", {"W": w(256, 64)})
    quantize(model)
    assert_twins_agree(model, {"x": w(4, 256, seed=1)}, rtol=3e-2, accuracy_level=4)


# ------------------------------------------------------------------------------------------------ gptq
def _calibration(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "calibration.npz"
    np.savez(path, **arrays)
    return str(path)


def _gram(*xs: np.ndarray) -> np.ndarray:
    h = 0
    for x in xs:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        h = h + x.T @ x
    return h


def _tensors(node: ir.Node) -> list[np.ndarray]:
    return [np.asarray(v.const_value.numpy()) for v in node.inputs[1:4] if v is not None]


def test_quantize_int4_gptq_uses_the_calibration_hessian(tmp_path):
    """Weights reading a graph input: H is exactly sum X^T X over the batches; two weights on one input share it;
    the layer after a Relu gets its H from onnxruntime's activations and the model stays twin-exact."""
    W1, W2, W3 = w(64, 64), w(64, 48, seed=1), w(64, 32, seed=2)
    model = parse("""
    g (float[N, 64] x) => (float[N, 32] y, float[N, 48] z) {
      h = MatMul(x, W1)
      z = MatMul(x, W2)
      r = Relu(h)
      y = MatMul(r, W3)
    }""", {"W1": W1, "W2": W2, "W3": W3})
    x0, x1 = w(300, 64, seed=3), w(200, 64, seed=4)
    cal = _calibration(tmp_path, **{"x/0": x0, "x/1": x1})
    ctx = onnxc.PassContext(options={"quantize": "int4:gptq", "calibration": cal, "scratch_dir": str(tmp_path)})
    assert qi.QuantizeInt4().run(model, ctx).counts == {"MatMul": 3}
    assert any("500 rows" in n and "calibration" in n for n in ctx.notes), ctx.notes
    h = _gram(x0, x1)
    by_k = {int(n.attributes["N"].value): n for n in model.graph if n.op_type == "MatMulNBits"}
    for weight, node in ((W1, by_k[64]), (W2, by_k[48])):
        for got, want in zip(_tensors(node), kq.gptq(weight, h, 32)):
            np.testing.assert_array_equal(got, want)
    r = np.maximum(np.concatenate([x0, x1]) @ W1, 0)
    third = kq.gptq(W3, _gram(r), 32)
    assert np.mean(_tensors(by_k[32])[0] == third[0]) > 0.98   # onnxruntime's MatMul rounds like numpy's, nearly
    assert_twins_agree(model, {"x": w(5, 64, seed=5)})
    assert not list(tmp_path.glob("hessians-*/*")), "spilled Hessians and the calibration model are removed"


def test_quantize_int4_gptq_grouping_does_not_change_the_result(tmp_path):
    """One onnxruntime pass per Hessian (a 1-byte budget) or one for all: the same bytes; few rows earn a note."""
    text = """
    g (float[N, 64] x) => (float[N, 32] y) {
      h = MatMul(x, W1)
      r = Relu(h)
      t = MatMul(r, W2)
      u = Tanh(t)
      y = MatMul(u, W3)
    }"""
    inits = {"W1": w(64, 64), "W2": w(64, 64, seed=1), "W3": w(64, 32, seed=2)}
    cal = _calibration(tmp_path, **{"x/0": w(100, 64, seed=3), "x/1": w(60, 64, seed=4)})
    got = []
    for budget in (1, 1 << 30):
        model = parse(text, inits)
        ctx = onnxc.PassContext(options={"quantize": "int4:gptq", "calibration": cal, "hessian_budget": budget})
        qi.QuantizeInt4().run(model, ctx)
        runs = next(n for n in ctx.notes if "onnxruntime runs" in n)
        assert f"{2 * 2 if budget == 1 else 2} onnxruntime runs" in runs, runs  # W1 reads x: no run
        assert any("160 calibration rows for inputs up to K = 64" in n for n in ctx.notes), ctx.notes
        got.append(to_bytes(model))
    assert got[0] == got[1]


def test_quantize_int4_gptq_beats_lsq_on_the_layer_output(tmp_path):
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((128, 128)) / 8
    x = ((rng.standard_normal((2048, 128)) @ mix) * rng.lognormal(0, 1, 128)).astype(np.float32)
    W = w(128, 64)
    err = {}
    for method in ("lsq", "gptq"):
        model = parse("g (float[N, 128] x) => (float[N, 64] y) { y = MatMul(x, W) }", {"W": W})
        quantize(model, quantize=f"int4:{method}", accuracy_level=0,
                 **({"calibration": _calibration(tmp_path, x=x[:1024])} if method == "gptq" else {}))
        (y,) = session(to_bytes(model)).run(None, {"x": x[1024:]})
        err[method] = np.linalg.norm(y - x[1024:] @ W)
    assert err["gptq"] < 0.9 * err["lsq"], err


def test_quantize_int4_gptq_without_rows_falls_back_to_lsq(tmp_path):
    W = w(64, 16)
    model = parse("g (float[N, 64] x) => (float[N, 16] y) { y = MatMul(x, W) }", {"W": W})
    ctx = onnxc.PassContext(options={"quantize": "int4:gptq",
                                     "calibration": _calibration(tmp_path, x=np.zeros((8, 64), np.float32))})
    qi.QuantizeInt4().run(model, ctx)
    assert any("saw no calibration rows: lsq instead" in n for n in ctx.notes), ctx.notes
    for got, want in zip(_tensors(next(iter(model.graph))), kq.quantize(W, "lsq", 32)):
        np.testing.assert_array_equal(got, want)


X, M = np.ones((2, 64), np.float32), np.ones((2, 3), np.float32)


@pytest.mark.parametrize("arrays,message", [
    ({"x/0": X, "mask/0": M, "x": X, "mask": M}, "mixes NAME and NAME/K keys"),
    ({"x": X, "mask": M, "y": X}, "array 'y' names no graph input"),
    ({"x/0": X, "mask/0": M, "mask/1": M}, "batch 1 lacks input(s) x"),
    ({"x": X[:, :63], "mask": M}, "onnxruntime cannot run batch 0"),
    ({}, "holds no arrays"),
])
def test_quantize_int4_calibration_file_errors(tmp_path, arrays, message):
    model = parse("""
    g (float[N, 64] x, float[N, 3] mask) => (float[N, 16] y, float[N, 3] m) {
      r = Relu(x)
      y = MatMul(r, W)
      m = Relu(mask)
    }""", {"W": w(64, 16)})
    with pytest.raises(onnxc.UsageError) as err:
        quantize(model, quantize="int4:gptq", calibration=_calibration(tmp_path, **arrays))
    assert message in str(err.value)


def test_quantize_int4_calibration_file_unreadable(tmp_path):
    bad = tmp_path / "c.npz"
    bad.write_bytes(b"not a zip")
    model = parse("g (float[N, 64] x) => (float[N, 16] y) { y = MatMul(x, W) }", {"W": w(64, 16)})
    with pytest.raises(onnxc.UsageError, match="cannot read"):
        quantize(model, quantize="int4:gptq", calibration=str(bad))


def test_quantize_int4_gptq_cli_without_calibration_exits_2_one_line(tmp_path):
    from click.testing import CliRunner
    from onnxc.cli import main

    src = tmp_path / "m.onnx"
    src.write_bytes(to_bytes(parse("g (float[N, 64] x) => (float[N, 16] y) { y = MatMul(x, W) }", {"W": w(64, 16)})))
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int4:gptq"])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("onnxc: error")]
    assert len(errors) == 1 and "needs --calibration FILE.npz" in errors[0]
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(16, 150), n=st.integers(1, 40), block=st.sampled_from([16, 32, 64]),
       method=st.sampled_from(["rtn", "lsq", "hqq"]), symmetric=st.booleans(),
       layout=st.sampled_from(["matmul", "transpose", "gemm", "fused"]), rank=st.sampled_from([2, 3]),
       fp16=st.booleans(), seed=st.integers(0, 1000))
def test_quantize_int4_property_quantized_equals_dequantized(k, n, block, method, symmetric, layout, rank, fp16,
                                                             seed):
    symmetric = symmetric and method != "hqq"
    dt, npdt = ("float16", np.float16) if fp16 else ("float", np.float32)
    x_shape = "[2, 3, K]" if rank == 3 else "[3, K]"
    y_shape = x_shape.replace("K", str(n))
    x_shape = x_shape.replace("K", str(k))
    if layout == "gemm" or layout == "fused":
        rank = 2
        x_shape, y_shape = f"[3, {k}]", f"[3, {n}]"
    body = {"matmul": "y = MatMul(x, W)", "transpose": "t = Transpose(W)\n y = MatMul(x, t)",
            "gemm": "y = Gemm <transB = 1> (x, W)", "fused": "y = com.microsoft.FusedMatMul <transB = 1> (x, W)"}
    weight = w(*((n, k) if layout != "matmul" else (k, n)), dtype=npdt, seed=seed)
    model = parse(HDR + f"g ({dt}{x_shape} x) => ({dt}{y_shape} y) {{ {body[layout]} }}", {"W": weight})
    result = quantize(model, quantize=f"int4:{method}", block_size=block, symmetric=symmetric)
    assert result.modified == (k >= block)
    assert_valid(model)
    if k < block:
        return
    assert ops(model) == ["MatMulNBits"]
    assert not quantize(model, quantize=f"int4:{method}", block_size=block, symmetric=symmetric).modified
    feeds = {"x": w(*((2, 3, k) if rank == 3 else (3, k)), dtype=npdt, seed=seed + 1)}
    assert_twins_agree(model, feeds, rtol=3e-3 if fp16 else 1e-4)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(16, 100), n=st.integers(1, 30), block=st.sampled_from([16, 32]), symmetric=st.booleans(),
       seed=st.integers(0, 1000))
def test_quantize_lsq_never_worse_than_rtn_per_block(k, n, block, symmetric, seed):
    W = np.random.default_rng(seed).standard_t(4, (k, n)).astype(np.float32)
    errs = {}
    for method in ("rtn", "lsq"):
        b, s, z = kq.quantize(W, method, block, symmetric)
        d = dequantize(b, s, z, K=k, N=n, block_size=block)
        pad = -(-k // block) * block - k
        e = np.pad((d - W) ** 2, ((0, pad), (0, 0))).reshape(-1, block, n).sum(1)
        errs[method] = e
    assert np.all(errs["lsq"] <= errs["rtn"] * (1 + 1e-5) + 1e-12)


# ------------------------------------------------------------------------------------------------ fixtures
def _linear_with_const_weight(model: ir.Model) -> list[str]:
    left = []
    for n in model.graph:
        if n.op_type in ("MatMul", "Gemm", "FusedMatMul") and len(n.inputs) > 1:
            got = qs._weight(n)
            if not isinstance(got, str):
                left.append(n.name)
    return left


ALL = [p.name for p in fixture_files()]
FAST = ["llama_dynamo_past.onnx", "gpt2_ts.onnx", "bert_dynamo.onnx", "qwen3_ts.onnx"]


def _compile_quantized(name, tmp_path, **opts):
    from onnxc import pipeline
    r = onnxc.compile(FIXTURES / name, 1, "cpu", output=tmp_path / "q.onnx",
                      passes=pipeline.O1, options={"quantize": "int4", **opts})
    rep = r.report
    assert rep["verification"]["status"] == "passed", rep["verification"]
    assert all("quantized_outputs" in s for s in rep["verification"]["scenarios"])
    q = onnxc.ir.load(tmp_path / "q.onnx")
    assert _linear_with_const_weight(q) == []
    assert rep["quantization"]["matmul_nbits"] > 0
    return rep


@pytest.mark.parametrize("name", FAST)
def test_quantize_int4_fixture_quantizes_fully_and_verifies(name, tmp_path):
    rep = _compile_quantized(name, tmp_path)
    tied = name.startswith(("gpt2", "qwen3", "gemma"))
    assert rep["quantization"]["gather_block_quantized"] == (1 if tied else 0)
    assert rep["quantization"]["weight_bytes_after"] < rep["quantization"]["weight_bytes_before"]
    summary = rep["quantization"]["error"]["summary"]
    assert summary["cosine"] > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_quantize_int4_every_fixture_quantizes_fully_and_verifies(name, tmp_path):
    _compile_quantized(name, tmp_path)
    _compile_quantized(name, tmp_path, quantize="int4:rtn", symmetric=True)


def _fixture_calibration(src: Path, tmp_path: Path) -> str:
    """Two random-token batches of 4 x 32 for the model's inputs (NAME/K keys), seeds apart from verification's."""
    from onnxc import verify

    m = onnxc.ir.load(src)
    sc = verify.Scenario("calibration", 4, 32, 0)
    return _calibration(tmp_path, **{f"{n}/{k}": a for k in range(2)
                                     for n, a in verify.make_inputs(m, sc, 1000 + k).items()})


@pytest.mark.parametrize("name,level", [("llama_dynamo_past.onnx", 1), ("gpt2_ts.onnx", 1),
                                        ("llama_dynamo_past.onnx", 2)])
def test_quantize_int4_gptq_fixture_compiles_and_verifies(name, level, tmp_path):
    from onnxc import pipeline

    src = FIXTURES / name
    cal = _fixture_calibration(src, tmp_path)
    r = onnxc.compile(src, level, "cpu", output=tmp_path / "q.onnx", passes=pipeline.O1 if level == 1 else None,
                      options={"quantize": "int4:gptq", "calibration": cal})
    rep = r.report
    assert rep["verification"]["status"] == "passed", rep["verification"]
    assert _linear_with_const_weight(onnxc.ir.load(tmp_path / "q.onnx")) == []
    assert rep["quantization"]["method"] == "int4:gptq"
    assert rep["quantization"]["gather_block_quantized"] == (1 if name.startswith("gpt2") else 0)
    assert any("calibration" in n and "256 rows" in n for n in rep["notes"]), rep["notes"]
    assert rep["quantization"]["error"]["summary"]["cosine"] > 0.9


def test_quantize_int4_gptq_is_deterministic(tmp_path):
    from onnxc import pipeline

    src = FIXTURES / "gpt2_ts.onnx"
    cal = _fixture_calibration(src, tmp_path)
    outs = []
    for k in range(2):
        onnxc.compile(src, 1, "cpu", output=tmp_path / f"q{k}.onnx", passes=pipeline.O1, verify=False,
                      options={"quantize": "int4:gptq", "calibration": cal})
        outs.append((tmp_path / f"q{k}.onnx").read_bytes())
    assert outs[0] == outs[1]



# ------------------------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("text,method,mixed", [("int4", "lsq", True), ("int4:uniform", "lsq", False),
                                                ("int4:rtn", "rtn", False), ("INT4:HQQ", "hqq", False),
                                                ("int4:awq", "lsq", False), ("int4:awq:gptq", "gptq", False)])
def test_quantize_int4_parse_quantize_precision(text, method, mixed):
    awq = text.startswith("int4:awq")
    assert qo.parse_quantize(text) == qo.QuantMode("int4", method, mixed, awq=awq)


def test_quantize_int4_mixed_budget_is_checked():
    model = parse("""
    g (float[N, 64] x) => (float[N, 48] y) {
      y = MatMul(x, W)
    }""", {"W": w(64, 48)})
    with pytest.raises(onnxc.errors.UsageError, match="mixed_budget"):
        quantize(model, mixed_budget=0.5)


def _tied_lm(v=256, h=64, ffn=512):
    """Embedding E (V, H) tied to the lm_head (MatMul over Transpose(E)), two hidden layers, one with outliers."""
    outlier = w(h, ffn, seed=2)
    outlier[3, :] *= 40.0          # one input feature 40x larger: int4 blocks holding it lose the most
    return parse("""
    g (int64[B, S] ids) => (float[B, S, 256] logits) {
      x = Gather(E, ids)
      a = MatMul(x, W1)
      b = MatMul(a, W2)
      c = Add(x, b)
      et = Transpose<perm = [1, 0]>(E)
      logits = MatMul(c, et)
    }""", {"E": w(v, h, seed=1) * 0.5, "W1": outlier, "W2": w(ffn, h, seed=3) * 0.1})


def test_quantize_int4_mixed_keeps_lm_head_and_table_at_8_bits():
    model = quantize(_tied_lm()).model
    nodes = {n.op_type: n for n in model.graph if n.domain == "com.microsoft" and n.op_type != "MatMulNBits"}
    bits = {(n.attributes["K"].value, n.attributes["N"].value): n.attributes["bits"].value
            for n in model.graph if n.op_type == "MatMulNBits"}
    assert bits == {(64, 256): 8, (64, 512): 4, (512, 64): 4}   # W1 at 8 bits would pass the budget
    assert nodes["GatherBlockQuantized"].attributes["bits"].value == 8
    ids = np.array([[1, 7, 200, 255]], np.int64)
    assert_twins_agree(model, {"ids": ids})


def test_quantize_int4_uniform_keeps_every_layer_int4():
    model = quantize(_tied_lm(), quantize="int4:uniform").model
    assert {n.attributes["bits"].value for n in model.graph if n.domain == "com.microsoft"} == {4}


def _plan(budget: float):
    ctx_model = _tied_lm()
    opts = qo.QuantOptions("lsq", 32, False, 4, (), True, mixed=True, mixed_budget=budget)
    notes: list[str] = []
    sites = qs.find_sites(ctx_model.graph, opts, notes)
    blocks = {s.key: 32 for s in sites}
    lm = {s.key for s in sites if s.shape == (64, 256)}
    return sites, qp.choose_bits(sites, blocks, lm, opts)


def test_quantize_int4_choose_bits_order_and_budget():
    sites, plan = _plan(10.0)       # room for everything: all at 8 bits, logits first
    assert {c.bits for c in plan.values()} == {8}
    assert [c.reason for c in plan.values() if c.shape == (64, 256)] == ["logits"]
    _, plan = _plan(1.0)             # no room: every weight int4
    assert {c.bits for c in plan.values()} == {4}
    # room for the lm_head (64 x 256) and one more: the outlier weight W1 has the larger int4 error and wins
    costs = {c.shape: qp.weight_bytes(*c.shape, 8, 32, False, 4) - qp.weight_bytes(*c.shape, 4, 32, False, 4)
             for c in plan.values()}
    base = sum(qp.weight_bytes(*c.shape, 4, 32, False, 4) for c in plan.values())
    _, plan = _plan((base + costs[(64, 256)] + costs[(64, 512)]) / base)
    chosen = {c.shape: (c.bits, c.reason) for c in plan.values()}
    assert chosen == {(64, 256): (8, "logits"), (64, 512): (8, "error rank 1"), (512, 64): (4, "int4")}
    w1, w2 = (next(c for c in plan.values() if c.shape == s) for s in ((64, 512), (512, 64)))
    assert w1.error > w2.error > 0
    total = sum(qp.weight_bytes(*c.shape, c.bits, 32, False, 4) for c in plan.values())
    assert total <= base * (base + costs[(64, 256)] + costs[(64, 512)]) / base + 1e-6


@pytest.mark.parametrize("name", ["gpt2_ts.onnx"])
def test_quantize_int4_mixed_report_lists_layers_and_verifies(name, tmp_path):
    full = _compile_quantized(name, tmp_path)
    import json
    from onnxc import report as report_frame
    from test_report import problems
    schema = json.loads((Path(__file__).resolve().parents[2] / report_frame.SCHEMA_FILE).read_text())
    assert problems(json.loads(json.dumps(full)), schema) == []
    rep = full["quantization"]
    assert rep["precision"] == "mixed" and rep["mixed_budget"] == qo.MIXED_BUDGET
    layers = rep["layers"]
    assert layers and {x["bits"] for x in layers} <= {4, 8}
    high = [x for x in layers if x["bits"] == 8]     # ranked by their measured output error (sensitivity.py)
    assert high and all(x["reason"].startswith("output error rank ") for x in high)
    assert all(x["int4_output_error"] >= 0 for x in layers)
    size = {b: sum(qp.weight_bytes(*x["shape"], b, x["block_size"], False, 4) for x in layers) for b in (4,)}
    mixed = sum(qp.weight_bytes(*x["shape"], x["bits"], x["block_size"], False, 4) for x in layers)
    assert mixed <= qo.MIXED_BUDGET * size[4]
    uni = _compile_quantized(name, tmp_path, quantize="int4:uniform")["quantization"]
    assert uni["precision"] == "uniform" and "layers" not in uni
    assert uni["weight_bytes_after"] < rep["weight_bytes_after"] <= qo.MIXED_BUDGET * uni["weight_bytes_after"] + \
        (rep["weight_bytes_before"] - sum(4 * x["shape"][0] * x["shape"][1] for x in layers))
