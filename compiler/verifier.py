"""The IR verifier: structural invariants checked on load and between passes.

    - nodes are in topological order (every input is defined before its use, or in an enclosing scope);
    - every value has one producer and a unique name;
    - no node uses a value whose producer was removed from the graph (dangling use);
    - the graph's inputs and outputs are those of the input model (names, element types, ranks);
    - every domain a node uses is imported by the model;
    - every node of an ONNX domain ("", ai.onnx.ml) exists at the imported opset and fits its schema there:
      no unknown attribute, no missing required attribute, input and output counts within the schema's bounds
      (Shape(start, end) in an opset-14 model fails here, at the pass that wrote it);
    - every typed input and output of such a node has a kind (tensor, sequence, optional) and an element type its
      schema allows, and the values one type constraint binds agree (Add(float, float16) fails here): a
      SplitToSequence output typed as a tensor fails at the pass that typed it, not when onnxruntime loads the model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import onnx
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
    _check_graph(model.graph, set(), imported, problems, max_problems, dict(model.opset_imports))
    for fn in model.functions.values():
        _check_graph(fn, set(), imported | set(fn.opset_imports), problems, max_problems,
                     {**model.opset_imports, **fn.opset_imports})
    return problems[:max_problems]


def verify(model: ir.Model, signature: Signature | None = None) -> None:
    problems = check_model(model, signature)
    if problems:
        raise IRVerificationError(problems)


_SCHEMA_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml"}
# onnxruntime registers these in the default domain at every opset (LayerNormalization before ONNX's opset 17)
_ORT_DEFAULT_DOMAIN = frozenset({"SimplifiedLayerNormalization", "LayerNormalization"})


@functools.lru_cache(maxsize=4096)
def _schema(op: str, domain: str, version: int) -> onnx.defs.OpSchema | None:
    try:
        s = onnx.defs.get_schema(op, max_inclusive_version=version, domain=domain)
    except onnx.defs.SchemaError:
        return None
    return None if s.deprecated else s


def type_string(t: ir.TypeProtocol | None) -> str | None:
    """The ONNX type string of an IR type ("tensor(float)", "seq(tensor(int64))"), or None where it is not known."""
    if isinstance(t, ir.TensorType):
        return None if t.dtype is None or t.dtype == ir.DataType.UNDEFINED else \
            f"tensor({onnx.TensorProto.DataType.Name(int(t.dtype)).lower()})"
    for cls, kind in ((ir.SequenceType, "seq"), (ir.OptionalType, "optional")):
        if isinstance(t, cls):
            inner = type_string(t.elem_type)
            return None if inner is None else f"{kind}({inner})"
    return None


def _allowed(s: onnx.defs.OpSchema, param: onnx.defs.OpSchema.FormalParameter) -> tuple[str | None, set[str]]:
    """(type constraint name or None, the type strings `param` may take)."""
    for tc in s.type_constraints:
        if tc.type_param_str == param.type_str:
            return tc.type_param_str, set(tc.allowed_type_strs)
    return None, {param.type_str}


def _schema_of(node: ir.Node, opsets: dict[str, int]) -> onnx.defs.OpSchema | None:
    domain = _SCHEMA_DOMAINS.get(node.domain)
    version = opsets.get(node.domain, opsets.get("ai.onnx") if domain == "" else None)
    return None if domain is None or version is None else _schema(node.op_type, domain, version)


def schema_output_kind(node: ir.Node, i: int, opset: int | None = None) -> str | None:
    """"seq" or "optional" when output i of `node` (an ONNX-domain op) can only be that kind, "tensor" when only a
    tensor, None when unknown or mixed. Read at `opset`, or at the node's graph's opset, or the newest."""
    if _SCHEMA_DOMAINS.get(node.domain) != "":
        return None
    if opset is None:
        graph = node.graph
        opset = graph.opset_imports.get("", 10**6) if graph is not None else 10**6
    s = _schema(node.op_type, "", opset)
    if s is None or not s.outputs:
        return None
    _, allowed = _allowed(s, s.outputs[min(i, len(s.outputs) - 1)])
    kinds = {t.split("(")[0] for t in allowed}
    return kinds.pop() if len(kinds) == 1 else None


def _type_problems(node: ir.Node, s: onnx.defs.OpSchema, where: str) -> list[str]:
    problems: list[str] = []
    bound: dict[str, tuple[str, str]] = {}
    for role, values, params in (("input", node.inputs, s.inputs), ("output", node.outputs, s.outputs)):
        for i, v in enumerate(values):
            if v is None or not params:
                continue
            param = params[min(i, len(params) - 1)]
            if i >= len(params) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
                continue
            got = type_string(v.type)
            if got is None:
                continue
            constraint, allowed = _allowed(s, param)
            what = f"{where} {role} {i} '{v.name}'"
            if got not in allowed:
                kinds = sorted({t.split("(")[0] for t in allowed})
                if got.split("(")[0] not in kinds:
                    problems.append(f"{what} is typed {got}, but the schema gives a {' or '.join(kinds)} there")
                else:
                    problems.append(f"{what} is typed {got}, which the schema does not allow there")
                continue
            homogeneous = param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic or param.is_homogeneous
            if constraint is not None and homogeneous:
                first = bound.setdefault(constraint, (got, f"{role} {i}"))
                if first[0] != got:
                    problems.append(f"{what} is typed {got}, but {first[1]} of the same type {constraint} is "
                                    f"{first[0]}")
    return problems


def _schema_problems(node: ir.Node, label: str, opsets: dict[str, int]) -> list[str]:
    """The node against its ONNX schema at the model's opset (domains onnx.defs knows; others are not checked)."""
    domain = _SCHEMA_DOMAINS.get(node.domain)
    version = opsets.get(node.domain, opsets.get("ai.onnx") if domain == "" else None)
    if domain is None or version is None:
        return []
    s = _schema(node.op_type, domain, version)
    if s is None:
        if node.op_type in _ORT_DEFAULT_DOMAIN:
            return []
        return [f"{label} is not an operator of domain '{node.domain}' at opset {version}"]
    where = f"{label} (opset {version}, schema version {s.since_version})"
    problems = [f"{where} has attribute '{a}', which the schema does not define"
                for a in node.attributes if a not in s.attributes]
    problems += [f"{where} lacks required attribute '{a}'" for a, d in s.attributes.items()
                 if d.required and a not in node.attributes]
    n_in = len(node.inputs)
    while n_in and node.inputs[n_in - 1] is None:     # trailing optional inputs left empty
        n_in -= 1
    if not s.min_input <= n_in <= s.max_input:
        problems.append(f"{where} has {n_in} inputs; the schema takes {s.min_input} to {s.max_input}")
    if not s.min_output <= len(node.outputs) <= s.max_output:
        problems.append(f"{where} has {len(node.outputs)} outputs; the schema gives {s.min_output} to {s.max_output}")
    return problems + _type_problems(node, s, where)


def _check_graph(graph: ir.Graph | ir.Function, outer: set[int], imported: set[str], problems: list[str],
                 max_problems: int, opsets: dict[str, int] | None = None) -> None:
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
        elif opsets is not None:
            problems += _schema_problems(node, label, opsets)
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
                _check_graph(attr.as_graph(), defined, imported, problems, max_problems, opsets)
            elif isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    _check_graph(g, defined, imported, problems, max_problems, opsets)
        for out in node.outputs:
            if out.producer() is not node:
                problems.append(f"{label} output '{out.name}' names another producer")
            define(out, label)
    for v in graph.outputs:
        if id(v) not in defined:
            problems.append(f"graph output '{v.name}' is not defined")
