"""Pattern nodes as graph nodes (for compiler/fuzz.py): operands, shape-carrying inputs, attributes, and the
graph around the pattern. The values a node reads are described in compiler/fuzz_graph.py, the shape-carrying
inputs in compiler/fuzz_shapes.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from . import fuzz_shapes as fs
from . import rules as _rules
from .fuzz_graph import (BOOL_OUT, CONCRETE, FLOATS, HIDDEN, INT_OUT, NP, POST_OPS, Builder, Discard, Example)

PLANNED = frozenset({"Reshape", "Expand", "Gather", "GatherND", "Split", "Unsqueeze", "Squeeze", "Slice", "Concat"}) \
    | fs.REDUCE_OPS


class NodeBuilder(Builder):
    def make(self, pn: _rules.PNode, dtype: int) -> list[tuple[str, int]]:
        leafy = (_rules.Var, _rules.Lit)
        names: list[str | None] = [None] * len(pn.inputs)
        compute, first = None, None
        for i, p in enumerate(pn.inputs):          # computed inputs first: leaves take their dtype and shape
            if not isinstance(p, leafy):
                names[i], d = self.value(p, dtype)
                first = first or names[i]
                if compute is None and d in FLOATS:
                    compute = d
        compute = compute or dtype

        def ref() -> fs.Shape | None:
            base = first or names[0]
            x = self.shape(base) if base else None
            return x if x is not None and x.rank else None

        plan = None
        for i, p in enumerate(pn.inputs):
            if not isinstance(p, leafy):
                continue
            if plan is None and (i > 0 or pn.op_type == "Concat" and first):
                plan = self.plan(pn, names, ref)
            names[i] = self.leaf(p, compute, pn.op_type, i, ref, plan or fs.Plan())[0]
        plan = plan or self.plan(pn, names, ref)
        self.choices += plan.choices
        if pn.commutative and self.draw((False, True)):
            names.reverse()
            self.choices.append(f"{pn.op_type} operands swapped")
        names += [self.const(a, "extra") for a in plan.extra]
        attrs = dict(plan.attrs)
        for k, v in pn.attrs.items():
            if isinstance(v, _rules.Attr):
                if pn.op_type == "Cast" and k == "to":
                    v = self._cast_to(compute)
                elif pn.op_type == "Transpose" and k == "perm" and v.default is None:
                    x = self.shape(names[0] or "")
                    if x is None:
                        raise Discard
                    v = fs.transpose_perm(self.draw, x.rank)
                    self.choices.append(f"Transpose perm {v}")
                    if v is None:
                        continue
                elif v.default is None:
                    continue
                else:
                    v = v.default
            attrs[k] = v
        if pn.op_type == "Cast" and "to" not in attrs:   # a Cast the pattern leaves open: back to the graph's dtype
            attrs["to"] = self.dtype if compute != self.dtype else self.draw((compute, self._cast_to(compute)))
        out_dtype = compute
        if pn.op_type == "Cast":
            out_dtype = attrs.get("to", compute)
        elif pn.op_type in BOOL_OUT:
            out_dtype = TensorProto.BOOL
        elif pn.op_type in INT_OUT:
            out_dtype = TensorProto.INT64
        outs = self.node(pn.op_type, [n or "" for n in names], out_dtype, pn.domain, attrs, pn.num_outputs)
        if pn.name:
            self.names[pn.name] = self.nodes[-1].name
        self.pattern_values.extend(outs)
        return outs

    def plan(self, pn: _rules.PNode, names: list[str | None], ref: Callable[[], fs.Shape | None]) -> fs.Plan:
        if pn.op_type not in PLANNED or pn.domain or not names:
            return fs.Plan()
        if pn.op_type == "Concat":
            x = ref()
        elif names[0]:
            x = self.shape(names[0])
        else:
            return fs.Plan()
        attrs = {k: v for k, v in pn.attrs.items() if not isinstance(v, _rules.Attr)}
        want = self.want.get(id(pn))
        # a node like one built before (same op, input shape and demanded rank) may take the same values: the
        # parallel Q, K and V head splits of an attention agree
        key = (pn.op_type, repr(attrs), len(pn.inputs), x and tuple(x.sym), x and tuple(x.conc), want)
        if key in self.memo and self.draw(("same", "fresh")) == "same":
            self.choices.append(f"{pn.op_type} as before")
            return self.memo[key]
        plan = fs.plan_node(pn.op_type, pn.domain, len(pn.inputs), pn.allow_other_inputs, attrs, pn.num_outputs,
                            x, names[0] in self.tables, self.draw, self.rng, want)
        self.memo.setdefault(key, plan)
        return plan

    def _cast_to(self, src: int) -> int:
        """A Cast that widens from the graph's dtype and narrows back to it."""
        if self.dtype == TensorProto.FLOAT16:
            return TensorProto.FLOAT if src == TensorProto.FLOAT16 else TensorProto.FLOAT16
        return TensorProto.DOUBLE if src == TensorProto.FLOAT else TensorProto.FLOAT


def build_example(draw: Callable[[Any], Any], rule: _rules.Rule, seed: int) -> Example:
    """One random graph containing `rule`'s pattern."""
    dtype = draw((TensorProto.FLOAT, TensorProto.FLOAT16))
    dims: list[int | str] = [draw((2, "batch")), draw((3, "seq")), draw(HIDDEN)]
    b = NodeBuilder(draw, rule, dtype, dims, seed)
    b.choices.append(f"{TensorProto.DataType.Name(dtype).lower()} {dims}")
    outs, _, _ = rule.compiled()
    built = [b.value(o, dtype) for o in outs]
    root_name, root_dtype = built[0]
    root_node = next((n.name for n in b.nodes if root_name in n.output), None)
    if root_node is None:
        raise Discard
    graph_outs: list[tuple[str, int]] = []
    post = draw(POST_OPS)
    if post is not None and root_dtype in FLOATS:
        b.choices.append(f"{post} after the root")
        graph_outs.append(b.node(post, [root_name], root_dtype, stem="y")[0])
    else:
        graph_outs.append(built[0])
    inputs_and_consts = {v.name for v in b.inputs} | {t.name for t in b.inits}
    for v in built[1:]:
        if v[0] not in inputs_and_consts and v not in graph_outs:
            graph_outs.append(v)
    extra = None
    exported = {v[0] for v in built}
    inner = [v for v in b.pattern_values if v[0] not in exported and v[0] not in inputs_and_consts]
    if inner and draw((False, True)):
        v = inner[draw(range(len(inner)))]
        extra = v[0]
        b.choices.append(f"extra reader of {extra}")
        graph_outs.append(b.node("Identity", [extra], v[1], stem="extra")[0])
    graph = helper.make_graph(b.nodes, f"fuzz_{rule.name}", b.inputs,
                              [helper.make_tensor_value_info(n, d, None) for n, d in graph_outs], b.inits)
    used = {n.domain for n in b.nodes if n.domain}
    opsets = [o for o in b.opsets if not o.domain or o.domain in used]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    rng = np.random.default_rng(seed + 1)
    feeds = {}
    for name, (shape, elem, high) in b.feeds.items():
        if high is not None:
            feeds[name] = rng.integers(0, high, shape).astype(np.int64)
        else:
            feeds[name] = rng.normal(0, 1, shape).astype(NP[elem])
    precision = "float16" if dtype == TensorProto.FLOAT16 else "float32"
    return Example(proto, root_node, extra, feeds, b.choices, precision)


__all__ = ["CONCRETE", "Discard", "Example", "NodeBuilder", "build_example"]
