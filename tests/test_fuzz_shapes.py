"""onnxc fuzz's shape-aware builder: shape-carrying inputs drawn valid by op, and rules that used to get no valid
graph (Reshape, Squeeze/Unsqueeze, GatherND patterns) now fire in a small campaign."""
from __future__ import annotations

import random

import numpy as np
import pytest

from onnxc import fuzz
from onnxc import fuzz_shapes as fs
from onnxc import pass_manager as pm
from onnxc.fuzz_graph import Discard
from onnxc.fuzz_node import build_example
from onnxc.rules import Attr, Rule

FAMILIES = {
    "reshape": lambda op, x, s: op.Reshape(x, s),
    "reshape-chain": lambda op, x, a, b: op.Reshape(op.Reshape(x, a), b),
    "reshape-to-rank-4": lambda op, x, s: op.Transpose(op.Reshape(x, s), perm=[0, 2, 1, 3]),
    "gather": lambda op, x, i: op.Gather(x, i, axis=1),
    "gather-table": lambda op, t, i: op.Gather(t, i, axis=0),
    "gathernd": lambda op, x, i: op.GatherND(x, i),
    "transpose-open-perms": lambda op, x: op.Transpose(op.Transpose(x, perm=Attr("p")), perm=Attr("q")),
    "split": lambda op, x: op.Split(x, _outputs=3, _allow_other_inputs=True)[1],
    "expand": lambda op, x, s: op.Expand(x, s),
    "squeeze-unsqueeze": lambda op, x: op.Squeeze(op.Unsqueeze(x, _allow_other_inputs=True),
                                                  _allow_other_inputs=True),
    "slice": lambda op, x, a, b, c, d: op.Slice(x, a, b, c, d),
    "concat": lambda op, x, y: op.Concat(x, op.Neg(y)),
    "gemm": lambda op, x, s, w: op.Gemm(op.Reshape(x, s), w),
}


def _examples(pattern, n):
    rule = Rule("family", pattern, lambda op, x: x)
    for seed in range(n):
        rnd = random.Random(seed)
        yield build_example(lambda options: rnd.choice(list(options)), rule, seed)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz_shapes_drawn_inputs_make_graphs_onnxruntime_runs(family):
    for ex in _examples(FAMILIES[family], 12):
        try:
            fuzz._run(ex.proto, ex.feeds)
        except Exception as exc:   # noqa: BLE001 (onnxruntime's errors have no common class)
            pytest.fail(f"onnxruntime refuses a {family} graph: {str(exc).splitlines()[0]}\n{ex.describe()}")


def test_fuzz_shapes_reshape_target_is_a_factorization():
    rnd = random.Random(0)
    x = fs.Shape(["batch", 3, 8], [3, 3, 8])
    for _ in range(200):
        want = rnd.choice((None, 2, 4))
        target, _ = fs.reshape_target(lambda options: rnd.choice(list(options)), x, want)
        assert want is None or len(target) == want
        assert list(target).count(-1) <= 1
        known = [x.conc[j] if t == 0 else t for j, t in enumerate(target)]
        assert all(j < x.rank for j, t in enumerate(target) if t == 0)
        rest = int(np.prod([k for k in known if k != -1]))
        total = int(np.prod(x.conc))
        assert total % rest == 0 and (-1 in known or rest == total), (target, x)


def test_fuzz_shapes_perms_splits_and_axes_are_valid():
    rnd = random.Random(1)

    def draw(options):
        return rnd.choice(list(options))

    x = fs.Shape([2, "seq", 8], [2, 5, 8])
    for _ in range(50):
        assert sorted(fs.permutation(draw, 4)) == [0, 1, 2, 3]
        plan = fs.Plan()
        fs.split_plan(draw, x, 3, plan)
        axis = plan.attrs["axis"] % 3
        assert plan.attrs.get("num_outputs") == 3 or int(plan.extra[0].sum()) == x.conc[axis]
        unsq = fs.plan_node("Unsqueeze", "", 2, False, {}, 1, x, False, draw, np.random.default_rng(0), None)
        axes = [a % 5 if a < 0 else a for a in unsq.inputs[1]]
        assert len(set(axes)) == len(axes) and all(0 <= a < 5 for a in axes)
        idx = fs.gather_indices(draw, np.random.default_rng(0), 5)
        assert np.all((idx >= -5) & (idx < 5))


@pytest.mark.parametrize("pass_name, rule_name", [
    ("remove-noops", "remove-reshape-noop"),
    ("remove-noops", "remove-squeeze-unsqueeze"),
    ("canonicalize-gather", "gathernd-rows"),
])
def test_fuzz_shapes_previously_graphless_rule_fires_and_refuses(pass_name, rule_name):
    p = fuzz.fuzzable_passes()[pass_name]
    rule = next(r for r in p.rules() if r.name == rule_name)
    stats = fuzz.fuzz_rule(p, rule, 15, 1)
    assert stats.failure is None, stats.failure
    assert stats.fired > 0 and stats.graphs > stats.fired, stats.line()


def test_fuzz_shapes_target_without_a_shape_to_fit_discards():
    """A Reshape of a scalar gets no drawn target (there is no shape to regroup): the graph is discarded, not built
    with a float constant onnxruntime would refuse."""
    with pytest.raises(Discard):
        next(_examples(lambda op, s: op.Reshape(op.Neg(2.0), s), 1))
