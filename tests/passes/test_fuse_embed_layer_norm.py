"""fuse-embed-layer-norm: BERT/GPT-2 embeddings + LayerNorm fuse (structure and numbers), refuse with a reason."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from helpers import (
    assert_close,
    assert_unchanged_by,
    assert_valid,
    canonical,
    counting,
    parse,
    parse_proto,
    run_ort,
    run_pass,
    run_passes,
    to_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxc.kernels.norms import embed_layer_norm
from onnxc.passes import fuse_embed_layer_norm as feln
from onnxc.pipeline import CLEANUP, O1
from onnxc.rules import explain

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "models"
PREP = ("infer-shapes", "fold-constants")
ELN = counting("fuse-embed-layer-norm", before=PREP, after=("eliminate-dead",))
V, P, T, H = 32, 16, 2, 8   # vocabulary, positions, segment types, hidden
NP = {"float": np.float32, "float16": np.float16, "double": np.float64}


# ------------------------------------------------------------------------------------------------ graph builder
@dataclass
class Emb:
    """BERT-style embeddings in ONNX text. positions: slice (of an arange buffer, HF) | range | const | input (B, S)
    | input1 (1, S) | shifted (Slice from 1: not provably 0..S-1)."""

    order: str = "(w+t)+p"     # (w+t)+p | (w+p)+t | w+(p+t) | w+p | p+w
    positions: str = "slice"
    ids: str = "int64"
    dtype: str = "float"
    beta: bool = True
    sum_used: bool = False     # the embedding sum has another user (GPT-2's residual)
    dims: str = "B, S"
    eps: float = 1e-12
    axis: int = -1
    seg_table: tuple | None = None
    seg_dims: str | None = None
    hidden: int = H

    def text(self) -> tuple[str, dict[str, np.ndarray]]:
        it, dt = self.ids, self.dtype
        seq = self.dims.split(", ")[1]
        ins = [f"{it}[{self.dims}] ids"]
        if "t" in self.order:
            ins.append(f"{it}[{self.seg_dims or self.dims}] seg")
        lines = []
        if self.positions == "slice":
            lines += ["n = Shape <start = 1, end = 2> (ids)", "pos = Slice(buf, zero, n, one1)"]
        elif self.positions == "shifted":   # 1..S
            lines += ["n = Shape <start = 1, end = 2> (ids)", "n1 = Add(n, one1)", "pos = Slice(buf, one1, n1, one1)"]
        elif self.positions == "range":
            lines += ["n = Shape <start = 1, end = 2> (ids)", "ns = Squeeze(n)", "r = Range(zs, ns, os)",
                      "pos = Unsqueeze(r, zero)"]
        elif self.positions == "const":
            lines += ["pos = Identity(arange)"]
        else:
            ins.append(f"{it}[{'1, ' + seq if self.positions == 'input1' else self.dims}] pos")
        lines += ["gw = Gather(W, ids)", "gp = Gather(P, pos)"]
        lines += ["gt = Gather(TT, seg)"] if "t" in self.order else []
        sums = {"(w+t)+p": ["s1 = Add(gw, gt)", "e = Add(s1, gp)"], "(w+p)+t": ["s1 = Add(gw, gp)", "e = Add(s1, gt)"],
                "w+(p+t)": ["s1 = Add(gp, gt)", "e = Add(gw, s1)"], "w+p": ["e = Add(gw, gp)"],
                "p+w": ["e = Add(gp, gw)"]}
        lines += sums[self.order]
        lines.append(f"y = LayerNormalization <axis = {self.axis}, epsilon = {self.eps!r}> "
                     f"(e, gamma{', beta' if self.beta else ''})")
        h = self.hidden
        outs = [f"{dt}[{self.dims}, {h}] y"]
        if self.sum_used:
            lines.append("z = Neg(e)")
            outs.append(f"{dt}[{self.dims}, {h}] z")
        text = f"g ({', '.join(ins)}) => ({', '.join(outs)}) {{\n  " + "\n  ".join(lines) + "\n}"
        rng = np.random.default_rng(7)
        f = NP[dt]
        inits = {"W": rng.standard_normal((V, h)).astype(f), "P": rng.standard_normal((P, h)).astype(f),
                 "TT": rng.standard_normal(self.seg_table or (T, h)).astype(f),
                 "gamma": (1 + 0.1 * rng.standard_normal(h)).astype(f), "buf": np.arange(P)[None, :],
                 "zero": np.array([0]), "one1": np.array([1]), "zs": np.array(0), "os": np.array(1)}
        if self.beta:
            inits["beta"] = (0.1 * rng.standard_normal(h)).astype(f)
        if self.positions == "const":
            inits["arange"] = np.arange(int(seq))[None, :]
        return text, {k: v for k, v in inits.items() if f"{k})" in text or f"({k}," in text or f", {k}," in text}


def feeds_for(model: ir.Model, seed: int = 0, b: int = 2, s: int = 5) -> dict[str, np.ndarray]:
    """ids below their table sizes (random_feeds would draw negative ids, which Gather accepts and the fused
    kernel refuses)."""
    rng = np.random.default_rng(seed)
    high = {"ids": V, "seg": T, "pos": P}
    out = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else {"B": b, "S": s}[str(d.value)] for d in v.shape]
        out[v.name] = rng.integers(0, high[v.name], size=shape).astype(v.dtype.numpy())
    return out


def assert_same(before: ir.Model | bytes, after: ir.Model, precision=None, seeds=(0, 1)) -> None:
    for seed in seeds:
        feeds = feeds_for(after, seed)
        want, got = run_ort(before, feeds), run_ort(after, feeds)
        for k, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"output {k}, seed {seed}", precision)


def fuse(case: Emb) -> tuple[ir.Model, dict[str, int], bytes]:
    text, inits = case.text()
    proto = parse_proto(text, inits)
    model = ir.serde.deserialize_model(proto)
    counts = ELN(model)
    assert_valid(model, proto)
    return model, counts, to_bytes(proto)


def assert_refused(case: Emb, reason: str) -> None:
    text, inits = case.text()
    model = parse(text, inits)
    run_passes(model, PREP)
    rows = [r for _, r in explain(model, feln.RULE)]
    assert any(reason in r for r in rows), rows
    before = to_bytes(model)
    result = run_pass(model, "fuse-embed-layer-norm")
    assert result.counts == {} and not result.modified
    assert to_bytes(model) == before


def eln_node(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "EmbedLayerNormalization"]
    return node


# ------------------------------------------------------------------------------------------------ before/after
def test_fuse_embed_layer_norm_bert():
    """HF BERT: (word + token type) + position, positions a Slice [0, S) of the arange buffer: dropped."""
    case = Emb()
    model, counts, before = fuse(case)
    assert counts == {"fuse-embed-layer-norm": 1}
    _, inits = case.text()
    want = parse("""<ir_version: 8, opset_import: ["" : 18, "com.microsoft": 1]>
    g (int64[B, S] ids, int64[B, S] seg) => (float[B, S, 8] y) {
      i = Cast <to = 6> (ids)
      t = Cast <to = 6> (seg)
      y, mask_index, total = com.microsoft.EmbedLayerNormalization <epsilon = 1e-12> (i, t, W, P, TT, gamma, beta)
    }""", {k: inits[k] for k in ("W", "P", "TT", "gamma", "beta")})
    assert canonical(model) == canonical(want)
    assert_same(before, model)
    assert_unchanged_by(model, "fuse-embed-layer-norm")


@pytest.mark.parametrize("order", ["(w+t)+p", "(w+p)+t", "w+(p+t)"])
@pytest.mark.parametrize("positions", ["slice", "range"])
def test_fuse_embed_layer_norm_sum_orders_and_provable_positions(order, positions):
    model, counts, before = fuse(Emb(order=order, positions=positions))
    assert counts == {"fuse-embed-layer-norm": 1}
    node = eln_node(model)
    assert len(node.inputs) == 7                                    # no position_ids: 0..S-1 is the default
    assert [v.name for v in (node.inputs[2], node.inputs[3], node.inputs[4])] == ["W", "P", "TT"]
    assert [n.op_type for n in model.graph if n.op_type not in ("Cast",)] == ["EmbedLayerNormalization"]
    assert_same(before, model)


@pytest.mark.parametrize("order, positions", [("(w+t)+p", "const"), ("w+p", "const"), ("w+p", "range"),
                                              ("(w+t)+p", "slice")])
def test_fuse_embed_layer_norm_static_positions_folded_to_a_constant(order, positions):
    """With a static sequence length fold-constants folds P[0..S-1] into a (1, S, H) constant: it becomes the
    position table, indexed 0..S-1 by default."""
    case = Emb(order=order, positions=positions, dims="B, 5")
    model, counts, before = fuse(case)
    assert counts == {"fuse-embed-layer-norm-folded": 1}
    node = eln_node(model)
    assert len(node.inputs) == 7 and node.inputs[3].const_value.numpy().shape == (5, H)
    np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), case.text()[1]["P"][:5])
    assert_same(before, model)


@pytest.mark.parametrize("slab, reason", [
    (np.ones((1, 1, H), np.float32), "position slab (1, 1, 8) is not (1, S, H) = (1, 5, 8) [slab]"),  # a bias
    (np.ones((2, 5, H), np.float32), "the third term is not a constant (1, S, H) position slab [slab]"),
    (np.ones((5, H), np.float32), None),
])
def test_fuse_embed_layer_norm_folded_slab_must_match_the_sequence(slab, reason):
    text, inits = Emb(order="w+p", positions="input", dims="B, 5").text()
    text = text.replace(", int64[B, 5] pos", "").replace("gp = Gather(P, pos)", "gp = Identity(slab)")
    text = text.replace("float[B, 5, 8] y", "float[?, ?, 8] y")
    inits["slab"] = slab
    if reason is None:
        model, counts, _before = fuse_text(text, inits)
        assert counts == {"fuse-embed-layer-norm-folded": 1}
        return
    model = parse(text, inits)
    run_passes(model, PREP)
    rows = [r for _, r in explain(model, feln.RULE_FOLDED)]
    assert any(reason in r for r in rows), rows
    assert run_pass(model, "fuse-embed-layer-norm").counts == {}


def fuse_text(text: str, inits: dict) -> tuple[ir.Model, dict[str, int], bytes]:
    proto = parse_proto(text, inits)
    model = ir.serde.deserialize_model(proto)
    counts = ELN(model)
    assert_valid(model, proto)
    return model, counts, to_bytes(proto)


@pytest.mark.parametrize("positions, order", [("input", "w+p"), ("input1", "w+p"), ("input", "(w+t)+p"),
                                              ("input1", "w+(p+t)"), ("input", "p+w")])
def test_fuse_embed_layer_norm_position_ids_input(positions, order):
    """GPT-2 passes position_ids: (B, S) or (1, S) go to the fused op as int32."""
    model, counts, before = fuse(Emb(order=order, positions=positions))
    assert counts == {"fuse-embed-layer-norm": 1}
    node = eln_node(model)
    assert len(node.inputs) == 9 and node.inputs[7] is None
    assert node.inputs[8].producer().op_type == "Cast" and node.inputs[8].producer().inputs[0].name == "pos"
    assert node.inputs[2].name == "W" and node.inputs[3].name == "P"
    assert_same(before, model)


def test_fuse_embed_layer_norm_exports_the_sum_gpt2_style():
    """GPT-2: the embedding sum feeds the first LayerNorm and the residual Add: it becomes output 2."""
    model, counts, before = fuse(Emb(order="w+p", positions="input", sum_used=True))
    assert counts == {"fuse-embed-layer-norm": 1}
    node = eln_node(model)
    assert [u.node.op_type for u in node.outputs[2].uses()] == ["Neg"]
    assert not node.outputs[1].uses()
    assert_same(before, model)


def test_fuse_embed_layer_norm_int32_ids_need_no_cast_and_missing_beta_is_zero():
    model, counts, before = fuse(Emb(ids="int32", beta=False))
    assert counts == {"fuse-embed-layer-norm": 1}
    assert [n.op_type for n in model.graph] == ["EmbedLayerNormalization"]
    beta = eln_node(model).inputs[6]
    assert beta.const_value is not None and not beta.const_value.numpy().any()
    assert_same(before, model)


def test_fuse_embed_layer_norm_float16():
    """ORT's CPU kernel is float only: float16 tables run through inserted Casts (float compute)."""
    model, counts, before = fuse(Emb(dtype="float16", eps=1e-5))
    assert counts == {"fuse-embed-layer-norm": 1}
    assert_same(before, model)


def test_fuse_embed_layer_norm_static_dims_and_distilbert():
    model, counts, before = fuse(Emb(order="w+p", dims="2, 5", positions="input1"))
    assert counts == {"fuse-embed-layer-norm": 1}
    assert len(eln_node(model).inputs) == 9 and eln_node(model).inputs[1] is None   # no segment
    assert_same(before, model)


@pytest.mark.parametrize("hidden", [1, 5, 7, 96])
def test_fuse_embed_layer_norm_any_hidden_size(hidden):
    """ORT's kernels take any hidden size (checked: 1 to 1000 on CPU); nothing to refuse there."""
    model, counts, before = fuse(Emb(hidden=hidden, eps=1e-5))
    assert counts == {"fuse-embed-layer-norm": 1}
    assert_same(before, model, seeds=(0,))


def test_fuse_embed_layer_norm_matches_reference_kernel():
    case = Emb(eps=1e-5)
    model, _, _ = fuse(case)
    _, inits = case.text()
    feeds = feeds_for(model, 3)
    got = run_ort(model, feeds)[0]
    want = embed_layer_norm(feeds["ids"], feeds["seg"], inits["W"], inits["P"], inits["TT"], inits["gamma"],
                            inits["beta"], epsilon=1e-5)[0]
    assert_close(got, want)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("case, reason", [
    (Emb(positions="shifted"), "position ids dims"),                                  # 1..S is not 0..S-1
    (Emb(axis=1), "LayerNormalization axis 1"),
    (Emb(eps=-1e-5), "epsilon -1e-05 < 0 (ORT's kernel refuses it)"),
    (Emb(seg_table=(T, 1)), "not 2-D with one static hidden size"),                   # broadcast segment table
    (Emb(order="w+(p+t)", seg_dims="1, S"), "segment ids dims"),
    (Emb(dtype="double"), "ORT's kernel takes one of float"),
    (Emb(order="w+p", dims="S, S", positions="input"), None),                         # fine: B == S symbolically
])
def test_fuse_embed_layer_norm_refuses(case, reason):
    if reason is None:
        assert fuse(case)[1] == {"fuse-embed-layer-norm": 1}
        return
    assert_refused(case, reason)


def test_fuse_embed_layer_norm_refuses_one_dimensional_ids():
    """(S,) ids: the kernel needs (B, S) (and a 1-D position_ids aborts it)."""
    text, inits = Emb(order="w+p", positions="input").text()
    text = text.replace("int64[B, S] ids", "int64[S] ids").replace("int64[B, S] pos", "int64[S] pos")
    text = text.replace("float[B, S, 8]", "float[S, 8]")
    model = parse(text, inits)
    run_passes(model, PREP)
    rows = [r for _, r in explain(model, feln.RULE)]
    assert any("on a rank-2 sum" in r for r in rows), rows
    assert run_pass(model, "fuse-embed-layer-norm").counts == {}


def test_fuse_embed_layer_norm_refuses_slice_of_other_length():
    """A Slice [0, S') with S' another symbol than the ids' sequence dim: not provably 0..S-1."""
    text, inits = Emb().text()
    text = text.replace("g (int64[B, S] ids, int64[B, S] seg)", "g (int64[B, S] ids, int64[B, S] seg, int64[K] m)")
    text = text.replace("n = Shape <start = 1, end = 2> (ids)", "n = Shape(m)")
    assert_refused_text(text, inits, "position ids are 0..K-1, not 0..S-1 for S = S")


def test_fuse_embed_layer_norm_refuses_negative_constant_ids():
    """Constant ids with a negative entry: Gather reads row V - 3, ORT's fused kernel fails ("input index out of
    range"). fold-constants folds such a Gather unless its output is over fold_limit_bytes (a long constant id
    tensor on a wide table), so the pass runs here after infer-shapes only. Found by `onnxc fuzz`."""
    text = """
g (int64[2, 2] pos) => (float[2, 2, 8] y) {
    gw = Gather(W, ids)
    gp = Gather(P, pos)
    e = Add(gw, gp)
    y = LayerNormalization <axis = -1, epsilon = 1e-5> (e, gamma)
}"""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(V, H)).astype(np.float32), "P": rng.normal(size=(P, H)).astype(np.float32),
             "gamma": np.ones(H, np.float32), "ids": np.array([[5, -3], [4, 8]], np.int64)}
    fuse = counting("fuse-embed-layer-norm", before=("infer-shapes",))
    for ids, want in (([[5, -3], [4, 8]], {}), ([[5, 3], [4, 8]], {"fuse-embed-layer-norm": 1})):
        inits["ids"] = np.array(ids, np.int64)
        proto = parse_proto(text, inits)
        model = ir.serde.deserialize_model(proto)
        run_passes(model, ("infer-shapes",))
        rows = [r for _, r in explain(model, feln.RULE)]
        assert any("constant ids include -3: the fused kernel refuses negative ids" in r for r in rows) == (not want)
        model = ir.serde.deserialize_model(proto)
        assert fuse(model) == want
        assert_valid(model, proto)
        assert_same(to_bytes(proto), model)


def assert_refused_text(text: str, inits: dict, reason: str) -> None:
    model = parse(text, inits)
    run_passes(model, PREP)
    rows = [r for _, r in explain(model, feln.RULE)]
    assert any(reason in r for r in rows), rows
    assert run_pass(model, "fuse-embed-layer-norm").counts == {}


@pytest.mark.parametrize("edit, reason", [
    (("gw = Gather(W, ids)", "gw = Gather <axis = 1> (W, ids)"), "axis=1, pattern needs 0"),
    (("y = LayerNormalization", "y, mean = LayerNormalization"), "intermediate value 'mean' is a graph output"),
    (("s1 = Add(gw, gt)", "s1 = Add(gw, gt)\n  z = Neg(s1)"), "has outside users (Neg"),
])
def test_fuse_embed_layer_norm_structure_refusals(edit, reason):
    text, inits = Emb().text()
    text = text.replace(*edit)
    if "mean" in edit[1]:
        text = text.replace("(float[B, S, 8] y)", "(float[B, S, 8] y, float[B, S, 1] mean)")
    if "z = Neg" in edit[1]:
        text = text.replace("(float[B, S, 8] y)", "(float[B, S, 8] y, float[B, S, 8] z)")
    assert_refused_text(text, inits, reason)


# ------------------------------------------------------------------------------------------------ arange proofs
@pytest.mark.parametrize("text, inits, want", [
    (None, {"c": np.arange(6)}, 6),
    (None, {"c": np.arange(6)[None]}, 6),
    (None, {"c": np.arange(1, 7)[None]}, None),
    (None, {"c": np.zeros((2, 3), np.int64)}, None),
    (None, {"c": np.arange(6.0)}, None),
    ("pos = Slice(c, z, e, a)", {"c": np.arange(9)[None], "z": np.array([0]), "e": np.array([4]),
                                 "a": np.array([1])}, 4),
    ("pos = Slice(c, z, e, a)", {"c": np.arange(9)[None], "z": np.array([0]), "e": np.array([4]),
                                 "a": np.array([0])}, None),      # slices the batch axis
    ("pos = Slice(c, z, e)", {"c": np.arange(9), "z": np.array([0]), "e": np.array([12])}, None),   # clamps
    ("pos = Slice(c, z, e, a, st)", {"c": np.arange(9)[None], "z": np.array([0]), "e": np.array([4]),
                                     "a": np.array([-1]), "st": np.array([2])}, None),
    ("pos = Range(z, e, o)", {"z": np.array(0), "e": np.array(5), "o": np.array(1)}, 5),
    ("pos = Range(z, e, o)", {"z": np.array(0), "e": np.array(5), "o": np.array(2)}, None),
    ("r = Range(z, e, o)\n  pos = Unsqueeze(r, a)", {"z": np.array(0), "e": np.array(5), "o": np.array(1),
                                                     "a": np.array([0])}, 5),
    ("r = Range(z, e, o)\n  pos = Unsqueeze(r, a)", {"z": np.array(0), "e": np.array(5), "o": np.array(1),
                                                     "a": np.array([1])}, None),
])
def test_fuse_embed_layer_norm_arange_length(text, inits, want):
    if text is None:
        model = parse("g (float[1] x) => (float[1] y) {\n  y = Identity(x)\n}", inits)
        value = model.graph.initializers["c"]
    else:
        model = parse("g (float[1] x) => (int64[?] pos) {\n  " + text + "\n}", inits)
        value = model.graph.outputs[0]
    assert feln.arange_length(value) == want


# ------------------------------------------------------------------------------------------------ property
@st.composite
def emb_cases(draw):
    order = draw(st.sampled_from(["(w+t)+p", "(w+p)+t", "w+(p+t)", "w+p", "p+w"]))
    positions = draw(st.sampled_from(["slice", "range", "const", "input", "input1", "shifted"]))
    static = positions == "const" or draw(st.booleans())
    case = Emb(order=order, positions=positions, ids=draw(st.sampled_from(["int64", "int32"])),
               dtype=draw(st.sampled_from(["float", "float16"])), beta=draw(st.booleans()),
               sum_used=draw(st.booleans()), eps=draw(st.sampled_from([1e-12, 1e-5, 0.0])),
               dims="2, 5" if static else "B, S")
    # static provable positions fold to a constant slab: fused only where it is the last term of the sum
    folded = static and positions in ("slice", "range", "const", "shifted")
    fires = (folded or positions != "shifted") and not (folded and order in ("(w+p)+t", "w+(p+t)"))
    return case, ({"fuse-embed-layer-norm" + ("-folded" if folded else ""): 1} if fires else {})


@settings(max_examples=30, deadline=None)
@given(emb_cases())
def test_fuse_embed_layer_norm_property(drawn):
    case, expected = drawn
    model, counts, before = fuse(case)
    assert counts == expected
    assert_same(before, model, precision=np.float16 if case.dtype == "float16" else None, seeds=(0,))
    assert_unchanged_by(model, "fuse-embed-layer-norm")


# ------------------------------------------------------------------------------------------------ fixtures
FIXTURE_COUNTS = {
    "bert_ts": 1, "bert_dynamo": 1,
    # GPT-2's first ln_1 reads wte[input_ids] + wpe[position_ids], whose sum also feeds the residual: expressible
    # with position_ids passed on and the sum as output 2.
    "gpt2_ts": 1, "gpt2_dynamo": 1, "gpt2_ts_past": 1, "gpt2_dynamo_past": 1,
    "llama_dynamo": 0, "gemma_ts": 0, "phi3_ts": 0, "qwen3_dynamo_past": 0, "llama_dynamo_past_fp16": 0,
}


@pytest.mark.parametrize("name", sorted(FIXTURE_COUNTS))
def test_fuse_embed_layer_norm_fixtures(name):
    passes = "fuse-gelu,fuse-embed-layer-norm"
    result = onnxc.compile(str(FIXTURES / f"{name}.onnx"), 2, "cpu", passes=f"{O1},{passes},{CLEANUP}")  # verifies
    counts = {}
    for record in result.report["passes"]:
        if record["name"] == "fuse-embed-layer-norm":
            counts = record["counts"]
    assert counts.get("fuse-embed-layer-norm", 0) == FIXTURE_COUNTS[name]
    nodes = [n for n in result.model.graph.node if n.op_type == "EmbedLayerNormalization"]
    assert len(nodes) == FIXTURE_COUNTS[name]
    if name.startswith("bert"):
        assert len(nodes[0].input) == 7                  # positions proven 0..S-1 and dropped; segment kept
    if name.startswith("gpt2"):
        assert nodes[0].input[8] and not nodes[0].input[1]   # position_ids passed on; no segment
