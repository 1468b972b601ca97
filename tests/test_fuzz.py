"""onnxc fuzz: a small budget over every rule, usage errors, and broken rules caught with a shrunk graph."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from onnxc import fuzz
from onnxc import pass_manager as pm
from onnxc.cli import main
from onnxc.rules import Rule, apply_rules


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fuzz_all_small_budget_passes_and_fires():
    r = run("fuzz", "--all", "--examples", "5", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert "all checks passed" in r.output
    lines = {line.split(":")[0]: line for line in r.output.splitlines() if line.count("/") == 1 and ": " in line}
    # rules with declared or pattern-given constants get graphs that really fuse, not only refusals
    for rule in ("fuse-rms-norm/rms-norm-unscaled", "fuse-layer-norm/layer-norm-unscaled",
                 "remove-noops/lower-castlike", "remove-noops/fold-cast-chain"):
        assert rule in lines, r.output
        assert " fired 0," not in lines[rule], lines[rule]


@pytest.mark.parametrize("args, message", [
    (("--pass", "no-such-pass"), "unknown pass 'no-such-pass'"),
    (("--pass", "fold-constants"), "has no pattern rules"),
    ((), "give --pass NAME or --all"),
    (("--all", "--pass", "fuse-rms-norm"), "give --pass NAME or --all"),
    (("--pass", "fuse-rms-norm", "--rule", "rms"), "unknown rule 'rms'"),
    (("--pass", "fuse-rms-norm", "--examples", "0"), "--examples must be at least 1"),
])
def test_fuzz_usage_errors_exit_2(args, message):
    r = run("fuzz", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_fuzz_same_seed_same_graphs():
    p = pm.get_pass("fuse-rms-norm")
    rule = p.rules()[0]
    assert fuzz.fuzz_rule(p, rule, 6, 7).line() == fuzz.fuzz_rule(p, rule, 6, 7).line()


# ---------------------------------------------------------------------------------------------------- broken rules
def _wrong_add_zero():
    """x + c -> Neg(x), whatever c: outputs differ wherever it fires."""
    return Rule("wrong-add", lambda op, x, c: op.Add(x, c), lambda op, x: op.Neg(x), None)


def test_fuzz_catches_wrong_rewrite_and_shrinks():
    rule = _wrong_add_zero()
    stats = fuzz.fuzz_rule(pm.RulePass("fuzz-test-wrong", [rule]), rule, 30, 0)
    assert stats.failure is not None
    assert "differs" in stats.failure
    # shrunk: the first option of every draw (no op before the input, no extra reader) where the failure allows
    assert "before input" not in stats.failure and "extra reader" not in stats.failure
    assert "Add" in stats.failure   # the graph is printed


def _grow_neg():
    """Neg(x) -> Neg(Neg(Neg(x))): its result matches again."""
    return Rule("grow-neg", lambda op, x: op.Neg(x), lambda op, x: op.Neg(op.Neg(op.Neg(x))), None)


def test_fuzz_catches_rule_that_fires_more_often_than_it_matches():
    rule = _grow_neg()
    stats = fuzz.fuzz_rule(pm.RulePass("fuzz-test-grow", [rule]), rule, 10, 0)
    assert stats.failure is not None and "--explain found 1 sites" in stats.failure


class _OneSweep(pm.RulePass):
    """Applies its rules in one sweep only, so a rule whose result matches again is left for the next run."""

    def run(self, model, ctx):
        stats = apply_rules(model, self.rules(), max_sweeps=1)
        return pm.PassResult(model, bool(stats.applied), dict(stats.applied))


def test_fuzz_catches_pass_whose_second_run_changes_the_model():
    rule = _grow_neg()
    stats = fuzz.fuzz_rule(_OneSweep("fuzz-test-sweep", [rule]), rule, 10, 0)
    assert stats.failure is not None and "a second run of fuzz-test-sweep changed the model" in stats.failure


class _Lazy(pm.RulePass):
    """Claims its rule but never applies it."""

    def run(self, model, ctx):
        return pm.PassResult(model, False, {})


def test_fuzz_catches_rule_that_matches_but_does_not_fire():
    rule = Rule("never", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x, None)
    stats = fuzz.fuzz_rule(_Lazy("fuzz-test-lazy", [rule]), rule, 10, 0)
    assert stats.failure is not None and "but the pass left it" in stats.failure


def test_fuzz_broken_plugin_exits_1_with_replay_command(tmp_path):
    plugin = tmp_path / "wrong_add.py"
    plugin.write_text(textwrap.dedent("""
        from onnxc.pass_manager import RulePass, register_pass
        from onnxc.rules import Rule
        register_pass(RulePass("wrong-add", [Rule("wrong-add", lambda op, x, c: op.Add(x, c),
                                                   lambda op, x: op.Neg(x), None)]))
    """))
    p = subprocess.run([sys.executable, "-m", "onnxc.cli", "fuzz", "--plugin", str(plugin), "--pass", "wrong-add",
                        "--examples", "20", "--seed", "4"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAILED wrong-add/wrong-add (seed 4)" in p.stdout
    assert "replay: onnxc fuzz --pass wrong-add --rule wrong-add --examples 20 --seed 4 --plugin" in p.stdout
    assert "Traceback" not in p.stderr
