"""Fusion coverage in the report and the summary: per family, sites found and fused, and one reason per miss."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxc
import pytest
from click.testing import CliRunner
from helpers import FIXTURES_ROOT, fixture_entries, parse
from onnxc import coverage
from onnxc.cli import main

MODELS = FIXTURES_ROOT / "models"


def _layers(name: str) -> int:
    return next(e for e in fixture_entries() if Path(e["file"]).stem == name)["config"]["num_layers"]


@pytest.mark.parametrize("name", ["llama_dynamo_raw_past", "llama_ts_nopos", "gpt2_dynamo_raw", "bert_ts"])
def test_coverage_counts_every_site_of_a_fully_fused_fixture(name):
    report = onnxc.compile(MODELS / f"{name}.onnx", level=2, target="cpu", verify=False).report
    cov, layers = report["coverage"], _layers(name)
    assert cov["attention"] == {"found": layers, "fused": layers, "misses": []}
    assert cov["norm"] == {"found": 2 * layers + 1, "fused": 2 * layers + 1, "misses": []}
    assert cov["skip_norm"] == {"found": 2 * layers, "fused": 2 * layers, "misses": []}
    gelu = layers if name.startswith(("gpt2", "bert")) else 0
    assert cov["gelu"] == {"found": gelu, "fused": gelu, "misses": []}


def test_coverage_names_each_missed_site_with_a_reason():
    report = onnxc.compile(MODELS / "llama_dynamo_past.onnx", level=2, target="cpu", verify=False,
                           disable=["fuse-gqa", "skip-simplified-layer-norm"]).report
    cov = report["coverage"]
    assert (cov["attention"]["found"], cov["attention"]["fused"]) == (2, 0)
    assert len({m["site"] for m in cov["attention"]["misses"]}) == 2 == report["ops_after"]["Softmax"]
    # fuse-gqa is off; fuse-mha looked and says why it cannot take these sites
    assert all(m["reason"].startswith("MultiHeadAttention: grouped KV heads") for m in cov["attention"]["misses"])
    assert (cov["skip_norm"]["found"], cov["skip_norm"]["fused"]) == (4, 0)
    assert (cov["norm"]["found"], cov["norm"]["fused"]) == (5, 5)


def test_coverage_of_an_erf_gelu_left_unfused():
    report = onnxc.compile(MODELS / "bert_ts.onnx", level=2, target="cpu", verify=False,
                           disable=["fuse-gelu"]).report
    gelu = report["coverage"]["gelu"]
    assert (gelu["found"], gelu["fused"]) == (2, 0)
    assert all("fuse-gelu-erf" in m["reason"] for m in gelu["misses"])


def test_coverage_takes_the_reason_fuse_gqa_noted_at_the_softmax():
    model = parse("""
    g (float[1, 2, 4, 4] q, float[1, 2, 4, 8] k, float[1, 2, 8, 4] v) => (float[1, 2, 4, 4] y) {
      s = MatMul(q, k)
      p = Softmax<axis=-1>(s)
      y = MatMul(p, v)
    }""")
    sm = next(n for n in model.graph if n.op_type == "Softmax")
    sm.name = "layer0/Softmax"
    cov = coverage.measure(model, ["fuse-gqa: attention at layer0/Softmax not fused: Q and K are not rotated",
                                   "fuse-mha: attention at layer0/Softmax not fused: a softcap"])
    why = "GroupQueryAttention: Q and K are not rotated; MultiHeadAttention: a softcap"
    assert cov["attention"] == {"found": 1, "fused": 0, "misses": [{"site": "layer0/Softmax", "reason": why}]}
    assert coverage.lines(cov) == ["attention: 0 of 1 sites fused", f"  not fused: layer0/Softmax: {why}"]


def test_coverage_ignores_a_router_softmax_and_a_non_gelu_tanh():
    model = parse("""
    g (float[4, 8] x) => (float[4, 2] w, int64[4, 2] i, float[4, 8] t) {
      p = Softmax<axis=-1>(x)
      w, i = TopK<axis=-1>(p, two)
      t = Tanh(x)
    }""", {"two": np.array([2], np.int64)})
    cov = coverage.measure(model, [])
    assert all(c["found"] == 0 for c in cov.values()), cov


def test_coverage_is_absent_below_the_fusion_levels():
    report = onnxc.compile(MODELS / "llama_dynamo_past.onnx", level=1, verify=False).report
    assert "coverage" not in report


def test_cli_summary_prints_coverage_and_hides_details_without_v(tmp_path):
    args = ["compile", str(MODELS / "llama_dynamo_past.onnx"), "-O2", "--no-verify", "-o", str(tmp_path / "o.onnx")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "attention: 2 of 2 sites fused" in r.output and "skip norms: 4 of 4 sites fused" in r.output
    assert "split-packed-heads:" not in r.output         # it found nothing to do on a Llama: a detail
    r = CliRunner().invoke(main, [*args, "-v"])
    assert r.exit_code == 0 and "detail: split-packed-heads:" in r.output
    r = CliRunner().invoke(main, [*args, "-q"])
    assert r.exit_code == 0 and r.output.strip().splitlines() == [f"wrote {tmp_path / 'o.onnx'}"]


def test_cli_explain_names_fuse_gqa_parts_and_what_each_found():
    model = str(MODELS / "llama_dynamo_past.onnx")
    r = CliRunner().invoke(main, ["compile", model, "-O2", "--explain", "fuse-gqa/mask"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "fuse-gqa/mask: 2 candidate sites" in r.output and r.output.count("causal + padding of 'attention_mask'") == 2
    assert "fuse-gqa/rotary-inside" not in r.output
    # every part of the pass; the rotary part turned off keeps the rotation outside the op
    r = CliRunner().invoke(main, ["compile", model, "-O2", "--explain", "fuse-gqa", "--disable", "fuse-gqa/rotary-inside"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    for part in ("fuse-gqa/site", "fuse-gqa/mask", "fuse-gqa/lengths", "fuse-gqa/rotary-inside"):
        assert f"{part}: 2 candidate sites" in r.output, part
    assert r.output.count("outside: disabled (--disable fuse-gqa/rotary-inside)") == 2
    assert "fuse-gqa: fired fuse-gqa=2, fuse-gqa/rotary-outside=2" in r.output
    r = CliRunner().invoke(main, ["compile", model, "--disable", "fuse-gqa/mask"])     # a part one cannot turn off
    assert r.exit_code == 2 and "no pass or rule named 'fuse-gqa/mask'" in r.output


def test_explain_of_a_part_says_which_earlier_part_refused():
    from onnxc import pass_manager as pm
    from onnxc.passes import fuse_gqa
    from onnxc import ir as irio
    model = irio.load(MODELS / "llama_dynamo_past.onnx")
    sm = next(n for n in model.graph if n.op_type == "Softmax")
    sm.attributes["axis"] = ir.AttrInt64("axis", 1)          # no longer the last axis: the site reader refuses
    ctx = pm.PassContext(level=2)
    rows = dict(next(p for p in fuse_gqa.PARTS if p.name == "fuse-gqa/mask").explain(model, ctx))
    assert rows[sm.name] == "not reached: fuse-gqa/site refused (Softmax is not over the last axis)"


def test_cli_explain_takes_a_pass_without_rules():
    r = CliRunner().invoke(main, ["compile", str(MODELS / "llama_dynamo_past.onnx"), "-O2", "--explain", "fuse-gqa"])
    assert r.exit_code == 0, r.output
    assert "fuse-gqa: fired fuse-gqa=2" in r.output
    r = CliRunner().invoke(main, ["compile", str(MODELS / "llama_dynamo_past.onnx"), "--explain", "fuse-gq"])
    assert r.exit_code == 2 and "did you mean 'fuse-gqa'" in r.output


def test_coverage_follows_a_head_merging_reshape_to_the_value_product():
    """BLOOM and DeBERTa merge batch and heads between the Softmax and MatMul(P, V): still an attention site."""
    model = parse("""
    g (float[2, 4, 3, 3] s, float[8, 3, 5] v) => (float[8, 3, 5] y) {
      p = Softmax<axis=-1>(s)
      pr = Reshape(p, shape)
      y = MatMul(pr, v)
    }""", {"shape": np.array([8, 3, 3], np.int64)})
    cov = coverage.measure(model, [])
    assert (cov["attention"]["found"], cov["attention"]["fused"]) == (1, 0)
