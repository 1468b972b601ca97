"""fuse-transposed-matmul: a tied lm_head reads the embedding table through FusedMatMul(transB=1), no copy; and
fold-constants leaves the Transpose of a shared table for it."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from helpers import (
    assert_same_outputs,
    assert_unchanged_by,
    assert_valid,
    check_before_after,
    parse,
    parse_proto,
    run_passes,
)
from hypothesis import given, settings
from hypothesis import strategies as st

V, H = 40, 8
rng = np.random.default_rng(0)
E = rng.standard_normal((V, H)).astype(np.float32)
SMALL = {"fold_limit_bytes": 256}     # E (1280 bytes) counts as a large table: folded lazily, or left for the rule

TIED = f"""
g (int64[B, S] ids) => (float[B, S, {V}] logits) {{
  h = Gather<axis=0>(e, ids)
  r = Relu(h)
  et = Transpose<perm=[1, 0]>(e)
  logits = MatMul(r, et)
}}"""


def test_tied_lm_head_reads_the_table_as_stored():
    model, _ = check_before_after(TIED, ["fold-constants", "fuse-transposed-matmul", "eliminate-dead"], f"""
    g (int64[B, S] ids) => (float[B, S, {V}] logits) {{
      h = Gather<axis=0>(e, ids)
      r = Relu(h)
      logits = com.microsoft.FusedMatMul<transB=1, alpha=1.0>(r, e)
    }}""", initializers={"e": E}, expected_initializers={"e": E}, dims={"B": 2, "S": 3}, **SMALL)
    assert len(model.graph.initializers) == 1            # one table, not E and E^T
    assert_unchanged_by(model, "fuse-transposed-matmul")


def test_unshared_weight_is_folded_instead():
    text = TIED.replace("h = Gather<axis=0>(e, ids)", "h = Gather<axis=0>(e2, ids)")
    model = parse(text, {"e": E, "e2": E + 1.0})
    run_passes(model, ["fold-constants", "fuse-transposed-matmul", "eliminate-dead"], **SMALL)
    ops = [n.op_type for n in model.graph]
    assert "Transpose" not in ops and "FusedMatMul" not in ops and "MatMul" in ops
    w = next(n for n in model.graph if n.op_type == "MatMul").inputs[1].const_value
    np.testing.assert_array_equal(w.numpy(), E.T)


def test_torchscript_tied_copy_reads_the_table():
    """TorchScript folds the tied lm_head's Transpose at export: the model stores E and E^T; the MatMul then reads
    E itself and the copy goes. One element off, and it stays."""
    text = f"""
    g (int64[B, S] ids) => (float[B, S, {V}] logits) {{
      h = Gather<axis=0>(e, ids)
      r = Relu(h)
      logits = MatMul(r, et)
    }}"""
    model, counts = check_before_after(text, ["fuse-transposed-matmul", "eliminate-dead"], f"""
    g (int64[B, S] ids) => (float[B, S, {V}] logits) {{
      h = Gather<axis=0>(e, ids)
      r = Relu(h)
      logits = com.microsoft.FusedMatMul<transB=1, alpha=1.0>(r, e)
    }}""", initializers={"e": E, "et": np.ascontiguousarray(E.T)}, expected_initializers={"e": E},
        dims={"B": 2, "S": 3})
    assert counts["matmul-tied-copy"] == 1
    off = np.ascontiguousarray(E.T)
    off[3, 7] = np.nextafter(off[3, 7], np.float32(np.inf))
    model = parse(text, {"e": E, "et": off})
    assert not run_passes(model, ["fuse-transposed-matmul"])


def test_refuses_a_permuted_3d_or_computed_weight():
    text = f"""
    g (float[B, S, {H}] x, float[{V}, {H}] w) => (float[B, S, {V}] y, float[{V}, {H}] z) {{
      z = Relu(w)
      wt = Transpose<perm=[1, 0]>(w)
      y = MatMul(x, wt)
    }}"""
    model = parse(text)
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not run_passes(model, ["fuse-transposed-matmul"])
    assert ir.serde.serialize_model(model).SerializeToString() == before


@settings(max_examples=20, deadline=None)
@given(vocab=st.integers(6, 50), hidden=st.integers(1, 12), lead=st.integers(1, 3),
       table=st.sampled_from(["shared", "copy", "distinct"]), batch=st.integers(1, 3))
def test_fuse_transposed_matmul_property(vocab, hidden, lead, table, batch):
    """Verifier, numbers, idempotence; the table is stored once when the lm_head reads it (shared) or an equal copy
    (copy), twice when the Gather reads another table (ids are -5..5: vocab >= 6)."""
    e = rng.standard_normal((vocab, hidden)).astype(np.float32)
    dims = ", ".join(["B", "S", "T"][:lead])
    src = "e" if table == "shared" else "e2"
    text = f"""
    g (float[{dims}, {hidden}] x, int64[N] ids) => (float[{dims}, {vocab}] y, float[N, {hidden}] g) {{
      g = Gather<axis=0>({src}, ids)
      et = Transpose<perm=[1, 0]>(e)
      y = MatMul(x, et)
    }}"""
    inits = {"e": e} if table == "shared" else {"e": e, "e2": e.copy() if table == "copy" else e + 0.5}
    proto = parse_proto(text, inits)
    model = parse(text, inits)
    counts = run_passes(model, ["fold-constants", "fuse-transposed-matmul", "eliminate-dead"], fold_limit_bytes=0)
    want = {"shared": {"matmul-transposed-weight": 1}, "copy": {"matmul-tied-copy": 1}, "distinct": {}}[table]
    assert {k: v for k, v in counts.items() if k.startswith("matmul-")} == want
    assert_valid(model, proto)
    stored = sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values())
    assert stored == vocab * hidden * (2 if table == "distinct" else 1)
    assert_same_outputs(proto, model, dims={"B": batch, "S": 2, "T": 3, "N": 4})
    assert_unchanged_by(model, "fuse-transposed-matmul")
