"""The IR verifier: structural invariants checked on load and between passes.

    - nodes are in topological order (every input is defined before its use, or in an enclosing scope);
    - every value has one producer and a unique name;
    - no node uses a value whose producer was removed from the graph (dangling use);
    - the graph's inputs and outputs are those of the input model (names, element types, ranks);
    - every domain a node uses is imported by the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from .errors import IRVerificationError


@dataclass(frozen=True)
class Signature:
    """Names, element types and ranks of a graph's inputs and outputs."""

    inputs: tuple[tuple[str, int | None, int | None], ...]
    outputs: tuple[tuple[str, int | None, int | None], ...]
    narrow_float: bool = False   # float32 I/O may become float16 (--io-fp16)

    @staticmethod
    def of(model: ir.Model) -> Signature:
        def row(v: ir.Value) -> tuple[str, int | None, int | None]:
            return (v.name or "", int(v.dtype) if v.dtype is not None else None,
                    v.shape.rank() if v.shape is not None else None)
        return Signature(tuple(row(v) for v in model.graph.inputs), tuple(row(v) for v in model.graph.outputs))

    def diff(self, other: Signature) -> list[str]:
        problems = []
        for kind, a, b in (("input", self.inputs, other.inputs), ("output", self.outputs, other.outputs)):
            if [r[0] for r in a] != [r[0] for r in b]:
                problems.append(f"graph {kind}s changed: {[r[0] for r in a]} -> {[r[0] for r in b]}")
                continue
            for ra, rb in zip(a, b):
                if self.narrow_float and (ra[1], rb[1]) == (1, 10):
                    pass
                elif ra[1] != rb[1] and None not in (ra[1], rb[1]):
                    problems.append(f"graph {kind} '{ra[0]}' changed element type {ra[1]} -> {rb[1]}")
                if ra[2] != rb[2] and None not in (ra[2], rb[2]):
                    problems.append(f"graph {kind} '{ra[0]}' changed rank {ra[2]} -> {rb[2]}")
        return problems


def check_model(model: ir.Model, signature: Signature | None = None, max_problems: int = 20) -> list[str]:
    """Return the list of broken invariants (empty when the model is well formed)."""
    problems: list[str] = []
    if signature is not None:
        problems += signature.diff(Signature.of(model))
    imported = set(model.opset_imports) | {"ai.onnx"}
    _check_graph(model.graph, set(), imported, problems, max_problems)
    for fn in model.functions.values():
        _check_graph(fn, set(), imported | set(fn.opset_imports), problems, max_problems)
    return problems[:max_problems]


def verify(model: ir.Model, signature: Signature | None = None) -> None:
    problems = check_model(model, signature)
    if problems:
        raise IRVerificationError(problems)


def _check_graph(graph: ir.Graph | ir.Function, outer: set[int], imported: set[str], problems: list[str],
                 max_problems: int) -> None:
    defined: set[int] = set(outer)
    names: dict[str, int] = {}

    def define(v: ir.Value, what: str) -> None:
        if id(v) in defined and id(v) not in outer:
            problems.append(f"value '{v.name}' is defined twice ({what})")
        defined.add(id(v))
        if v.name:
            prior = names.get(v.name)
            if prior is not None and prior != id(v):
                problems.append(f"two values share the name '{v.name}'")
            names[v.name] = id(v)

    for v in graph.inputs:
        define(v, "graph input")
    if isinstance(graph, ir.Graph):
        for v in graph.initializers.values():
            if not v.is_graph_input():
                define(v, "initializer")
    for node in graph:
        if len(problems) >= max_problems:
            return
        label = f"{node.op_type} '{node.name or '<unnamed>'}'"
        if node.domain not in imported:
            problems.append(f"{label} uses domain '{node.domain}', which the model does not import")
        for i, v in enumerate(node.inputs):
            if v is None or id(v) in defined:
                continue
            producer = v.producer()
            if producer is None:
                problems.append(f"{label} input {i} '{v.name}' is not produced by any node, input or initializer")
            elif producer.graph is not graph:
                problems.append(f"{label} input {i} '{v.name}' dangles: its producer was removed")
            else:
                problems.append(f"{label} input {i} '{v.name}' is used before it is defined (order or cycle)")
        for attr in node.attributes.values():
            if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH:
                _check_graph(attr.as_graph(), defined, imported, problems, max_problems)
            elif isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    _check_graph(g, defined, imported, problems, max_problems)
        for out in node.outputs:
            if out.producer() is not node:
                problems.append(f"{label} output '{out.name}' names another producer")
            define(out, label)
    for v in graph.outputs:
        if id(v) not in defined:
            problems.append(f"graph output '{v.name}' is not defined")
