"""docs/passes.md's generated part is what the registry renders now (`onnxc passes --markdown`)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from onnxc import passdoc
from onnxc import pass_manager as pm


def _onnxc(*args: str) -> str:
    """The command's stdout, from a fresh process: only the built-in passes are registered there (tests in this
    process register plugins of their own)."""
    r = subprocess.run([sys.executable, "-m", "onnxc.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def markdown() -> str:
    return _onnxc("passes", "--markdown")


def test_passdoc_docs_passes_md_is_current(markdown):
    text = passdoc.DEFAULT_FILE.read_text()
    assert passdoc.BEGIN in text and passdoc.END in text
    if passdoc.splice(text, markdown) != text:
        pytest.fail(f"docs/passes.md is stale: run `{passdoc.REFRESH}` and commit the result")


def test_passdoc_lists_every_pass_and_rule(markdown):
    listed = json.loads(_onnxc("passes", "--json"))
    assert len(listed) > 20
    for p in listed:
        assert f"| `{p['name']}` | {p['level']} |" in markdown
        for r in p["rules"]:
            assert f"| `{p['name']}` | `{r['name']}` |" in markdown


def test_passdoc_declared_placement_is_shown():
    p = pm.RulePass("doc-declared", [], level=2, after="fuse-gelu")
    assert "after `fuse-gelu`" in passdoc.render({"doc-declared": p})
    p = pm.RulePass("doc-staged", [], level=1, stage="cleanup")
    assert "end of the cleanup stage (after `eliminate-dead`)" in passdoc.render({"doc-staged": p})


def test_passdoc_splice_needs_the_markers():
    with pytest.raises(ValueError):
        passdoc.splice("no markers here", "x")
    assert passdoc.splice(f"a\n{passdoc.BEGIN}\nold\n{passdoc.END}\nb", "new\n") == \
        f"a\n{passdoc.BEGIN}\nnew\n{passdoc.END}\nb"


def test_passdoc_pipeline_places_a_declared_plugin(tmp_path):
    plugin = tmp_path / "late_pass.py"
    plugin.write_text("from onnxc import RulePass, register_pass\n"
                      "register_pass(RulePass('doc-late-pass', [], level=2, after='fuse-gelu'))\n")
    o2 = _onnxc("passes", "--pipeline", "-O2", "--plugin", str(plugin)).splitlines()
    assert o2[o2.index("fuse-gelu") + 1] == "doc-late-pass"
    assert o2.count("fixpoint (at most 10 rounds)") == 3 and o2[-1] == "sort-topologically"


def test_passdoc_pipeline_rows_follow_level_and_target(monkeypatch):
    monkeypatch.setattr(pm, "_REGISTRY", dict(pm._REGISTRY))      # the pass registered here goes with the test
    pm.register_pass(pm.RulePass("doc-late-pass", [], level=2, after="fuse-gelu"))
    o2 = passdoc.pipeline_text(2, "cpu").splitlines()
    assert o2[o2.index("fuse-gelu") + 1] == "doc-late-pass"
    o1 = passdoc.pipeline_text(1, "cpu").splitlines()
    assert "doc-late-pass" not in o1 and "fuse-gelu" not in o1           # level 2 passes stay out of -O1
    cuda = passdoc.pipeline_text(3, "cuda").splitlines()
    assert "convert-fp16" in cuda and "convert-fp16" not in o2 and "doc-late-pass" in cuda
