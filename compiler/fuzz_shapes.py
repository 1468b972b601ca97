"""Shape-carrying inputs of generated graphs (compiler/fuzz_graph.py), drawn by op from the shapes flowing in.

A pattern says `op.Reshape(x, shape)` and no more: the fuzzer draws `shape` here, from the shape of `x` as the
graph built so far gives it (fuzz_infer.py: declared dims and fed sizes, node by node), so
that onnxruntime accepts the graph. By op, never by rule:

    Reshape      the target: x's dims kept, merged, split into factors, or given extra 1s (as many entries as a
                 consumer demands, e.g. a Transpose with a literal perm), each entry written as the number, 0 (copy,
                 where the dim stays at its index) or one -1; the same shape (a no-op) about half the time
    Transpose    perm (a placeholder in the pattern): absent, the identity or a random permutation of the rank
    Gather       indices within the axis size; a table's ids (a graph input of int64 ids below its row count)
    GatherND     index tuples (m, k) within the leading dims
    Split        an axis and sizes that sum to it (as many parts as the pattern's outputs)
    Expand       a shape x broadcasts to: all 1s, x's own dims, or a new leading dim
    Unsqueeze    distinct axes within the result's rank;   Squeeze: axes of x's 1-dims
    Slice        starts and ends within the axis (and the axis, a step of 1 or 2)
    Concat       an axis (when the pattern gives none); the other inputs shaped like the computed one off it
    ReduceX      axes [-1] when the pattern leaves them to the graph

A drawn value is valid for the fed sizes; whether it is also provable for symbolic dims (0 / -1 versus the fed
number) is drawn as well, so a rule sees both shapes it can prove and shapes it must refuse.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Dim = int | str | None
Draw = Callable[[Any], Any]

REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"})
# (op, input position) -> what a pattern variable there holds
INT_INPUTS = {("Reshape", 1), ("Expand", 1), ("Gather", 1), ("GatherND", 1), ("GatherElements", 1), ("Split", 1),
              ("Squeeze", 1), ("Unsqueeze", 1), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4),
              ("Tile", 1), ("ConstantOfShape", 0), ("Range", 0), ("Range", 1), ("Range", 2)}
BOOL_INPUTS = {("Where", 0), ("And", 0), ("And", 1), ("Or", 0), ("Or", 1), ("Xor", 0), ("Xor", 1), ("Not", 0)}


@dataclass
class Shape:
    sym: list[Dim]          # as declared: ints, dim names, None where inference could not say
    conc: list[int]         # as fed

    @property
    def rank(self) -> int:
        return len(self.conc)


@dataclass
class Ids:
    """An int64 graph input whose fed values index `high` rows."""
    dims: list[Dim]
    high: int


@dataclass
class Plan:
    """What the builder gives one node beyond the pattern: values for input positions, attributes, extra inputs."""
    inputs: dict[int, np.ndarray | Ids] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    extra: list[np.ndarray] = field(default_factory=list)     # appended after the pattern's inputs
    like: Shape | None = None                                  # the shape of a data input drawn here (Concat)
    choices: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- by op
def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _maybe_negative(draw: Draw, a: int, rank: int) -> int:
    return a - rank if draw((False, True)) else a


def reshape_target(draw: Draw, x: Shape, want: int | None) -> tuple[np.ndarray, str]:
    """A target with the same element count as x (entries: value, declared dim, source index or None)."""
    entries: list[tuple[int, Dim, int | None]] = []
    if draw(("same", "regroup")) == "same":
        entries = [(c, s, i) for i, (c, s) in enumerate(zip(x.conc, x.sym))]
    else:
        i, ones = 0, 0
        while i < x.rank:
            c, s = x.conc[i], x.sym[i]
            acts = ["keep", "split"] + (["merge"] if i + 1 < x.rank else []) + (["one"] if ones < 1 else [])
            act = draw(acts)
            if act == "keep":
                entries.append((c, s, i))
            elif act == "merge":
                c2, s2 = x.conc[i + 1], x.sym[i + 1]
                both = isinstance(s, int) and isinstance(s2, int)
                entries.append((c * c2, s * s2 if both else None, None))
                i += 1
            elif act == "split":
                a = draw([d for d in range(1, c + 1) if c % d == 0] if isinstance(s, int) else [1])
                entries += [(a, a, None), (c // a, c // a if isinstance(s, int) else s, None)]
            else:
                entries.append((1, 1, None))
                ones += 1
                continue
            i += 1
    while want is not None and len(entries) > want:          # merge neighbours down to the demanded rank
        j = draw(range(len(entries) - 1))
        (c1, s1, _), (c2, s2, _) = entries[j], entries[j + 1]
        both = isinstance(s1, int) and isinstance(s2, int)
        entries[j:j + 2] = [(c1 * c2, s1 * s2 if both else None, None)]
    while want is not None and len(entries) < want:          # split a dim in two (a head split), or add a 1
        j = draw(range(len(entries)))
        c, s, _ = entries[j]
        factors = [a for a in range(2, c) if c % a == 0] if isinstance(s, int) else []
        if factors and draw(("split", "one")) == "split":
            a = draw(factors)
            entries[j:j + 1] = [(a, a, None), (c // a, c // a, None)]
        else:
            entries.insert(draw(range(len(entries) + 1)), (1, 1, None))
    target, minus = [], False
    for j, (c, s, src) in enumerate(entries):
        options: list[int] = []
        if src == j:
            options.append(0)           # copies x's dim at this index
        if isinstance(s, int):
            options.insert(0, c)
        if not minus:
            options.append(-1)
        options.append(c)              # the fed number: valid, but not provable for a symbolic dim
        t = draw(options)
        minus = minus or t == -1
        target.append(t)
    return np.array(target, np.int64), f"target {target}"


def permutation(draw: Draw, rank: int) -> list[int]:
    left, perm = list(range(rank)), []
    while left:
        perm.append(left.pop(draw(range(len(left)))))
    return perm


def expand_shape(draw: Draw, x: Shape) -> tuple[np.ndarray, str]:
    kind = draw(("own", "ones", "leading"))
    if kind == "own":
        t = [s if isinstance(s, int) else draw((1, c)) for s, c in zip(x.sym, x.conc)]
    elif kind == "ones":
        t = [1] * draw(range(1, x.rank + 1))
    else:
        t = [draw((2, 3))] + [1] * x.rank
    return np.array(t, np.int64), f"expand to {t}"


def gather_indices(draw: Draw, rng: np.random.Generator, n: int) -> np.ndarray:
    shape = draw(((2,), (), (2, 2), (1,)))
    return rng.integers(-n if draw((False, True)) else 0, n, size=shape).astype(np.int64)


def gathernd_indices(draw: Draw, rng: np.random.Generator, x: Shape) -> np.ndarray:
    k = draw(range(1, min(2, x.rank) + 1))
    rows = draw((2, 1, 3))
    cols = [rng.integers(0, x.conc[j], size=rows) for j in range(k)]
    idx = np.stack(cols, axis=1).astype(np.int64)
    return idx[0] if draw((False, True)) and rows == 1 else idx


def split_plan(draw: Draw, x: Shape, parts: int, plan: Plan) -> None:
    axes = [a for a in range(x.rank) if x.conc[a] >= parts]
    if not axes:
        return
    axis = draw(axes[::-1])                                  # the last axis first
    c = x.conc[axis]
    cuts: list[int] = []
    left = list(range(1, c))
    for _ in range(parts - 1):
        cuts.append(left.pop(draw(range(len(left)))))
    cuts.sort()
    sizes = np.diff([0, *cuts, c]).astype(np.int64)
    plan.attrs["axis"] = _maybe_negative(draw, axis, x.rank)
    if c % parts == 0 and draw((False, True)):
        plan.attrs["num_outputs"] = parts
        plan.choices.append(f"Split axis {axis} into {parts} equal parts")
    else:
        plan.extra.append(sizes)
        plan.choices.append(f"Split axis {axis} sizes {sizes.tolist()}")


def slice_inputs(draw: Draw, x: Shape) -> list[np.ndarray]:
    axis = draw(range(x.rank)[::-1])
    c = x.conc[axis]
    start = draw(range(c))
    end = draw((c, *range(start + 1, c), 2 ** 62))
    step = draw((1, 2))
    return [np.array([v], np.int64) for v in (start, end, _maybe_negative(draw, axis, x.rank), step)]


def plan_node(op_type: str, domain: str, given: int, allow_more: bool, attrs: dict, outputs: int,
              x: Shape | None, table: bool, draw: Draw, rng: np.random.Generator, want: int | None) -> Plan:
    """Values for `op_type`'s shape-carrying inputs, from its data input's shape `x` (the pattern gives `given`
    inputs; more may be appended when it allows other inputs)."""
    plan = Plan()
    if domain or x is None or x.rank == 0:
        return plan
    if op_type == "Reshape":
        plan.inputs[1], note = reshape_target(draw, x, want)
        plan.choices.append(f"Reshape {note}")
    elif op_type == "Expand":
        plan.inputs[1], note = expand_shape(draw, x)
        plan.choices.append(f"Expand {note}")
    elif op_type == "Gather":
        axis = _axis(int(attrs.get("axis", 0)), x.rank)
        if not 0 <= axis < x.rank:
            return plan
        n = x.conc[axis]
        if table and draw(("ids", "constant")) == "ids":
            plan.inputs[1] = Ids([], n)
        else:
            plan.inputs[1] = gather_indices(draw, rng, n)
    elif op_type == "GatherND":
        plan.inputs[1] = gathernd_indices(draw, rng, x)
    elif op_type == "Split" and given == 1 and allow_more:
        split_plan(draw, x, outputs, plan)
    elif op_type == "Unsqueeze":
        k = draw((1, 2))
        axes = permutation(draw, x.rank + k)[:k]
        arr = np.array([_maybe_negative(draw, a, x.rank + k) for a in axes], np.int64)
        plan.inputs[1] = arr
        plan.choices.append(f"Unsqueeze axes {arr.tolist()}")
    elif op_type == "Squeeze":
        ones = [a for a in range(x.rank) if x.conc[a] == 1]
        if ones:
            chosen = sorted(set(permutation(draw, len(ones))[:draw(range(1, len(ones) + 1))]))
            arr = np.array([_maybe_negative(draw, ones[a], x.rank) for a in chosen], np.int64)
            plan.inputs[1] = arr
            plan.choices.append(f"Squeeze axes {arr.tolist()}")
    elif op_type == "Slice":
        for pos, arr in enumerate(slice_inputs(draw, x), start=1):
            plan.inputs[pos] = arr
    elif op_type == "Concat":
        axis = attrs.get("axis")
        if axis is None:
            axis = plan.attrs["axis"] = _maybe_negative(draw, draw(range(x.rank)[::-1]), x.rank)
        axis = _axis(int(axis), x.rank)
        size = draw((1, 2, 3))
        plan.like = Shape([*x.sym[:axis], size, *x.sym[axis + 1:]], [*x.conc[:axis], size, *x.conc[axis + 1:]])
        plan.choices.append(f"Concat axis {axis}, other inputs {size} along it")
    elif op_type in REDUCE_OPS and given == 1 and allow_more:
        plan.extra.append(np.array([-1], np.int64))
    if op_type in ("Unsqueeze", "Squeeze") and given == 1 and allow_more and 1 in plan.inputs:
        plan.extra.append(plan.inputs.pop(1))
    return plan


def transpose_perm(draw: Draw, rank: int) -> list[int] | None:
    """A drawn perm for a Transpose whose pattern leaves it open: absent (reverse), identity, or random."""
    kind = draw(("random", "identity", "absent"))
    if kind == "absent":
        return None
    return list(range(rank)) if kind == "identity" else permutation(draw, rank)
