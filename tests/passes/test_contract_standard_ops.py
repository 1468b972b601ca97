"""contract-standard-ops: expanded opset-23 ops that no fusion took come back as the standard op, exactly."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxc.pass_manager import PassContext, get_pass

from tests.helpers import assert_close, assert_unchanged_by, assert_valid, op_types, parse, parse_proto, run_ort

H23 = '<ir_version: 10, opset_import: ["" : 23, "com.microsoft" : 1]>'
PASS = "contract-standard-ops"


def _run(text: str, between: tuple[str, ...] = ()) -> tuple[ir.Model, dict[str, int], list[str]]:
    """infer-shapes, expand-standard-ops, the passes `between`, then contract-standard-ops (one context)."""
    model = parse(H23 + "\n" + text)
    ctx = PassContext(level=2)
    for name in ("infer-shapes", "expand-standard-ops", *between):
        get_pass(name).run(model, ctx)
    counts = get_pass(PASS).run(model, ctx).counts
    assert_valid(model)
    return model, counts, ctx.notes


def _same(text: str, model: ir.Model, feeds: dict[str, np.ndarray], precision=None) -> None:
    expected = run_ort(parse_proto(H23 + "\n" + text), feeds)
    actual = run_ort(model, feeds)
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, f"output {k}", precision)


def _feeds(shapes: dict[str, tuple], dt=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        out[name] = rng.random(shape) > 0.3 if name == "m" else rng.standard_normal(shape).astype(dt)
    return out


ATTN = """
g (float[B, 4, S, 8] q, float[B, 2, S, 8] k, float[B, 2, S, 8] v, bool[B, 1, S, S] m, float[B, S, 4] cos,
   float[B, S, 4] sin) => (float[B, 4, S, 8] y) {
    rq = RotaryEmbedding(q, cos, sin)
    rk = RotaryEmbedding(k, cos, sin)
    y = Attention<scale=0.25>(rq, rk, v, m)
}"""
ATTN_FEEDS = {"q": (2, 4, 3, 8), "k": (2, 2, 3, 8), "v": (2, 2, 3, 8), "m": (2, 1, 3, 3), "cos": (2, 3, 4),
              "sin": (2, 3, 4)}


def test_contract_standard_ops_restores_unfused_attention_and_rotary() -> None:
    """A padding-mask Attention no fusion takes, and the rotaries feeding it sharing one table pair."""
    model, counts, notes = _run(ATTN, between=("eliminate-cse", "fuse-gqa", "fuse-attention"))
    assert counts == {"contract-standard-ops/rotary": 2, "contract-standard-ops/attention": 1}, notes
    assert op_types(model) == ["RotaryEmbedding", "RotaryEmbedding", "Attention"]
    assert not model.graph.initializers                      # the expansion's constants went with its nodes
    att = next(n for n in model.graph if n.op_type == "Attention")
    assert att.attributes["scale"].value == 0.25 and att.inputs[3].name == "m"
    _same(ATTN, model, _feeds(ATTN_FEEDS))
    assert_unchanged_by(model, PASS)


def test_contract_standard_ops_rotary_read_by_a_non_attention_consumer() -> None:
    text = """
g (float[B, 2, S, 8] x, float[16, 4] cos, float[16, 4] sin, int64[B, S] pos) => (float[B, 2, S, 8] y) {
    r = RotaryEmbedding<rotary_embedding_dim=8>(x, cos, sin, pos)
    y = Relu(r)
}"""
    model, counts, _ = _run(text)
    assert counts == {"contract-standard-ops/rotary": 1}
    assert op_types(model) == ["RotaryEmbedding", "Relu"]
    feeds = _feeds({"x": (2, 2, 3, 8), "cos": (16, 4), "sin": (16, 4)})
    feeds["pos"] = np.random.default_rng(1).integers(0, 16, (2, 3)).astype(np.int64)
    _same(text, model, feeds)


def test_contract_standard_ops_fused_site_stays_fused_mixed_graph() -> None:
    """RMSNormalization(x + skip) is taken by fuse-skip-norm; the rotary and the float-mask Attention come back."""
    text = """
g (float[B, S, 32] x, float[B, S, 32] skip, float[32] w, float[B, 4, S, 8] q, float[B, 4, S, 8] k,
   float[B, 4, S, 8] v, float[B, 1, S, S] fm, float[B, S, 4] cos, float[B, S, 4] sin)
  => (float[B, S, 32] n, float[B, 4, S, 8] y) {
    s = Add(x, skip)
    n = RMSNormalization<epsilon=1e-6>(s, w)
    rq = RotaryEmbedding(q, cos, sin)
    y = Attention(rq, k, v, fm)
}"""
    model, counts, notes = _run(text, between=("fuse-gqa", "fuse-attention", "fuse-skip-norm"))
    assert counts == {"contract-standard-ops/rotary": 1, "contract-standard-ops/attention": 1}, notes
    assert sorted(op_types(model)) == ["Attention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"]
    feeds = _feeds({"x": (2, 3, 32), "skip": (2, 3, 32), "w": (32,), "q": (2, 4, 3, 8), "k": (2, 4, 3, 8),
                    "v": (2, 4, 3, 8), "fm": (2, 1, 3, 3), "cos": (2, 3, 4), "sin": (2, 3, 4)})
    _same(text, model, feeds)


def test_contract_standard_ops_keeps_single_simplified_layer_norm() -> None:
    """An RMSNormalization expanded to one SimplifiedLayerNormalization is left as that fused kernel."""
    model, counts, _ = _run("""
g (float[B, S, 8] x, float[8] w) => (float[B, S, 8] y) {
    y = RMSNormalization<epsilon=1e-6>(x, w)
}""")
    assert counts == {} and op_types(model) == ["SimplifiedLayerNormalization"]


def test_contract_standard_ops_restores_primitive_rms_norm() -> None:
    text = """
g (float16[2, 3, 8] x, float16[3, 8] w) => (float16[2, 3, 8] y) {
    y = RMSNormalization<axis=1, epsilon=1e-5>(x, w)
}"""
    model, counts, _ = _run(text, between=("eliminate-cse", "fold-constants"))
    assert counts == {"contract-standard-ops/rms-norm": 1} and op_types(model) == ["RMSNormalization"]
    _same(text, model, _feeds({"x": (2, 3, 8), "w": (3, 8)}, np.float16), precision=np.float16)


def test_contract_standard_ops_refuses_rewritten_chain() -> None:
    """A node of the chain replaced by something the expansion did not build: the site stays expanded."""
    model = parse(H23 + "\n" + ATTN)
    ctx = PassContext(level=2)
    for name in ("infer-shapes", "expand-standard-ops"):
        get_pass(name).run(model, ctx)
    soft = next(n for n in model.graph if n.op_type == "Softmax")
    copy = ir.node("Softmax", [soft.inputs[0]], attributes={"axis": -1}, name="other")
    model.graph.insert_before(soft, copy)
    soft.outputs[0].replace_all_uses_with(copy.outputs[0])
    model.graph.remove(soft, safe=True)
    counts = get_pass(PASS).run(model, ctx).counts
    assert counts == {"contract-standard-ops/rotary": 2}
    assert "Attention" not in op_types(model)
    assert any("left expanded" in n and "is not computed by the expansion any more" in n for n in ctx.notes)
    _same(ATTN, model, _feeds(ATTN_FEEDS))


def test_contract_standard_ops_refuses_rewritten_input() -> None:
    """An original input rewritten into another value (here: its producer replaced): not restored."""
    text = """
g (float[B, 2, S, 8] x0, float[B, S, 4] cos, float[B, S, 4] sin) => (float[B, 2, S, 8] y) {
    x = Relu(x0)
    y = RotaryEmbedding(x, cos, sin)
}"""
    model = parse(H23 + "\n" + text)
    ctx = PassContext(level=2)
    for name in ("infer-shapes", "expand-standard-ops"):
        get_pass(name).run(model, ctx)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    other = ir.node("Relu", [relu.inputs[0]], name="other")
    model.graph.insert_before(relu, other)
    relu.outputs[0].replace_all_uses_with(other.outputs[0])
    model.graph.remove(relu, safe=True)
    counts = get_pass(PASS).run(model, ctx).counts
    assert counts == {} and "RotaryEmbedding" not in op_types(model)
    assert any("input 0 was rewritten" in n for n in ctx.notes), ctx.notes


def test_contract_standard_ops_shared_tables_one_site_taken() -> None:
    """Two rotaries share one expanded cos/sin pair; a consumer replacing one site's output leaves the other's
    restorable, and the shared tables stay while the taken site's chain still reads them."""
    text = """
g (float[B, 2, S, 8] a, float[B, 2, S, 8] c, float[B, S, 4] cos, float[B, S, 4] sin)
  => (float[B, 2, S, 8] ya, float[B, 2, S, 8] yc) {
    ya = RotaryEmbedding(a, cos, sin)
    yc = RotaryEmbedding(c, cos, sin)
}"""
    model = parse(H23 + "\n" + text)
    ctx = PassContext(level=2)
    for name in ("infer-shapes", "expand-standard-ops", "eliminate-cse"):
        get_pass(name).run(model, ctx)
    # stand-in for a fusion taking site a: a new op on the original inputs takes the chain output's readers
    old = model.graph.outputs[0]
    taken = ir.node("RotaryEmbedding", [model.graph.inputs[0], *model.graph.inputs[2:]], name="taken")
    model.graph.append(taken)
    model.graph.outputs[0] = taken.outputs[0]
    taken.outputs[0].name, old.name = "ya", None
    counts = get_pass(PASS).run(model, ctx).counts
    assert counts == {"contract-standard-ops/rotary": 1}
    assert op_types(model).count("RotaryEmbedding") == 2 and op_types(model).count("Unsqueeze") == 2
    back = next(n for n in model.graph if n.op_type == "RotaryEmbedding" and n.name != "taken")
    assert [v.name for v in back.inputs] == ["c", "cos", "sin"]
    _same(text, model, _feeds({"a": (2, 2, 3, 8), "c": (2, 2, 3, 8), "cos": (2, 3, 4), "sin": (2, 3, 4)}))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dt=st.sampled_from(["float", "float16"]), heads=st.sampled_from([(2, 2), (4, 2)]),
       mask=st.sampled_from(["bool", "float"]), causal=st.integers(0, 1), past=st.booleans(),
       swap=st.booleans(), extra=st.booleans(), static=st.booleans())
def test_contract_standard_ops_property(dt, heads, mask, causal, past, swap, extra, static) -> None:
    """Attention (masked, so no fusion takes it) after a rotary: both come back; an extra reader of the rotary's
    output, node order, dtype and static/dynamic dims do not matter; outputs equal the input model's on ORT."""
    nq, nkv = heads
    b, s, p = ("2", "3", "2") if static else ("B", "S", "P")
    t = "5" if static and past else ("3" if static else "T")
    mdt = "bool" if mask == "bool" else dt
    ins = [f"{dt}[{b}, {nq}, {s}, 8] q", f"{dt}[{b}, {nkv}, {s}, 8] k", f"{dt}[{b}, {nkv}, {s}, 8] v",
           f"{mdt}[{b}, 1, {s}, {t}] m", f"{dt}[{b}, {s}, 4] cos", f"{dt}[{b}, {s}, 4] sin"]
    outs, res, args = ["y"], [f"{dt}[{b}, {nq}, {s}, 8] y"], ["rq", "k", "v", "m"]
    if past:
        ins += [f"{dt}[{b}, {nkv}, {p}, 8] pk", f"{dt}[{b}, {nkv}, {p}, 8] pv"]
        args += ["pk", "pv"]
        outs += ["pk2", "pv2"]
        res += [f"{dt}[{b}, {nkv}, {t}, 8] pk2", f"{dt}[{b}, {nkv}, {t}, 8] pv2"]
    body = ["rq = RotaryEmbedding(q, cos, sin)",
            f"{', '.join(outs)} = Attention<is_causal={causal}>({', '.join(args)})"]
    if extra:
        body.append("e = Neg(rq)")
        res.append(f"{dt}[{b}, {nq}, {s}, 8] e")
    if swap and extra:
        body = [body[0], body[2], body[1]]
    text = f"g ({', '.join(ins)}) => ({', '.join(res)}) {{\n" + "\n".join(body) + "\n}"
    model, counts, notes = _run(text, between=("eliminate-cse", "fuse-gqa", "fuse-attention"))
    assert counts == {"contract-standard-ops/rotary": 1, "contract-standard-ops/attention": 1}, notes
    assert sorted(op_types(model)) == sorted(["RotaryEmbedding", "Attention"] + (["Neg"] if extra else []))
    np_dt = np.float16 if dt == "float16" else np.float32
    rng = np.random.default_rng(0)
    shapes = {"q": (2, nq, 3, 8), "k": (2, nkv, 3, 8), "v": (2, nkv, 3, 8), "cos": (2, 3, 4), "sin": (2, 3, 4)}
    if past:
        shapes |= {"pk": (2, nkv, 2, 8), "pv": (2, nkv, 2, 8)}
    feeds = _feeds(shapes, np_dt)
    tt = 5 if past else 3
    feeds["m"] = rng.random((2, 1, 3, tt)) > 0.3 if mask == "bool" \
        else rng.standard_normal((2, 1, 3, tt)).astype(np_dt)
    _same(text, model, feeds, precision=np_dt if dt == "float16" else None)
