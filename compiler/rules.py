"""The rule engine: pattern / check / rewrite over the onnx-ir graph.

A rule is three plain functions:

    pattern(op, x, ...)  builds the shape to look for with the same op syntax as a rewrite; its parameters are
                         pattern variables that bind to any value (a name used twice must bind the same value).
    check(m)             looks at a successful structural match and returns a dict of extra keyword arguments
                         for the rewrite (or None/True), or `m.fail(reason, *names)`.
    rewrite(op, ...)     builds the replacement from the bound variables and the check's values.

Inside a pattern:
    op.Add(a, b)                         two-input commutative ops match either operand order
    op.Cast(x, _optional=True)           the node may be absent: then its output is x itself
    op.Or(p, q)                          alternatives, tried in order
    op.Softmax(x, axis=-1)               attributes given must equal the graph's (schema defaults apply)
    op.Softmax(x, axis=Attr("axis"))     binds the attribute value for check/rewrite
    op.Pow(x, 2.0)                       a literal matches a one-element constant of that value
    op.Split(x, _outputs=2)              multi-output ops return a tuple
    op.X(..., _domain="com.microsoft", _name="n", _allow_other_inputs=True, _allow_other_attrs=False)

A pattern may return several values: the first is the root; the others are exported, i.e. they may have users
outside the match, and the rewrite must return a replacement for each of them.

Matching starts at candidate root nodes indexed by op type and walks producer edges outward; it reads the graph
only, so nothing is mutated before a match, its structural constraints, the outside-user rule and the check have
all succeeded. Commutative operands are pre-filtered by the operand's producer op type before recursing, so only
genuinely ambiguous sites branch, and every match attempt has a hard step budget.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Equal", "And", "Or", "Xor", "Sum", "Mean",
                         "BitwiseAnd", "BitwiseOr", "BitwiseXor"})
MATCH_STEP_BUDGET = 20_000
CONST_READ_MAX_ELEMENTS = 64


# ---------------------------------------------------------------------------------------------------- pattern IR
class PValue:
    """A value in a pattern."""


@dataclass(eq=False)
class Var(PValue):
    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Lit(PValue):
    value: float | int

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(eq=False)
class AnyOf(PValue):
    alternatives: tuple[PValue, ...]

    def __repr__(self) -> str:
        return "Or(" + ", ".join(map(repr, self.alternatives)) + ")"


@dataclass(eq=False)
class Attr:
    """An attribute placeholder: binds the attribute's value under `name`."""
    name: str
    default: Any = None


@dataclass(eq=False)
class PNode:
    op_type: str
    domain: str
    inputs: list[PValue]
    attrs: dict[str, Any]
    num_outputs: int = 1
    optional: bool = False
    name: str | None = None
    allow_other_inputs: bool = False
    allow_other_attrs: bool = True

    @property
    def commutative(self) -> bool:
        return self.domain == "" and self.op_type in COMMUTATIVE and len(self.inputs) == 2


@dataclass(eq=False)
class Out(PValue):
    node: PNode
    index: int = 0

    def __repr__(self) -> str:
        return f"{self.node.op_type}(...)" + (f"[{self.index}]" if self.index else "")


class PatternBuilder:
    """The `op` given to pattern functions."""

    def Or(self, *alternatives: PValue) -> PValue:  # noqa: N802 (op syntax)
        return AnyOf(tuple(_as_pvalue(a) for a in alternatives))

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, _optional: bool = False,
                 _name: str | None = None, _allow_other_inputs: bool = False, _allow_other_attrs: bool = True,
                 **attrs: Any):
            node = PNode(op_type, _domain, [_as_pvalue(i) for i in inputs], attrs, _outputs, _optional, _name,
                         _allow_other_inputs, _allow_other_attrs)
            if _optional and not node.inputs:
                raise ValueError(f"optional {op_type} needs an input to fall through to")
            if _outputs == 1:
                return Out(node, 0)
            return tuple(Out(node, i) for i in range(_outputs))
        return make


def _as_pvalue(x: Any) -> PValue:
    if isinstance(x, PValue):
        return x
    if isinstance(x, (int, float, np.number)) and not isinstance(x, bool):
        return Lit(x)
    if x is None:
        return Lit(None)  # type: ignore[arg-type]  # matches an absent optional input
    raise TypeError(f"pattern input must be a pattern value or a number, got {type(x).__name__}")


def _pattern_nodes(outputs: Sequence[PValue]) -> list[PNode]:
    seen: dict[int, PNode] = {}
    stack = list(outputs)
    while stack:
        pv = stack.pop()
        if isinstance(pv, Out) and id(pv.node) not in seen:
            seen[id(pv.node)] = pv.node
            stack.extend(pv.node.inputs)
        elif isinstance(pv, AnyOf):
            stack.extend(pv.alternatives)
    return list(seen.values())


def _pattern_size(outputs: Sequence[PValue]) -> int:
    """Required nodes one match uses: shared nodes count once; of alternatives, the largest counts."""

    def size(pv: PValue, seen: set[int]) -> int:
        if isinstance(pv, AnyOf):
            best, best_seen = 0, seen
            for alt in pv.alternatives:
                trial = set(seen)
                n = size(alt, trial)
                if n > best:
                    best, best_seen = n, trial
            seen |= best_seen
            return best
        if not isinstance(pv, Out) or id(pv.node) in seen:
            return 0
        seen.add(id(pv.node))
        return (0 if pv.node.optional else 1) + sum(size(i, seen) for i in pv.node.inputs)

    seen: set[int] = set()
    return sum(size(o, seen) for o in outputs)


# ---------------------------------------------------------------------------------------------------- matching
@dataclass
class Failure:
    reason: str
    values: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.reason + (f" [{', '.join(self.values)}]" if self.values else "")


class _BudgetExceeded(Exception):
    pass


def const_tensor(v: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind a value (initializer that is not a graph input, or a Constant node), else None."""
    if v is None:
        return None
    if v.const_value is not None:
        return None if v.is_graph_input() else v.const_value
    node = v.producer()
    if node is None or node.op_type != "Constant" or node.domain != "" or len(node.attributes) != 1:
        return None
    (name, attr), = node.attributes.items()
    if attr.is_ref():
        return None
    if name == "value":
        return attr.as_tensor()
    if name in ("value_float", "value_floats"):
        return ir.tensor(np.array(attr.value, dtype=np.float32))
    if name in ("value_int", "value_ints"):
        return ir.tensor(np.array(attr.value, dtype=np.int64))
    return None  # strings and sparse tensors are not folded


def const_array(v: ir.Value | None, max_elements: int | None = None) -> np.ndarray | None:
    t = const_tensor(v)
    if t is None:
        return None
    if max_elements is not None and _num_elements(t.shape) > max_elements:
        return None
    return t.numpy()


def _num_elements(shape: ir.Shape) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 1 << 40
    return n


_schema_cache: dict[tuple[str, str, int], dict[str, Any]] = {}


def attr_default(node: ir.Node, name: str, opset: int) -> Any:
    key = (node.domain, node.op_type, opset)
    if key not in _schema_cache:
        defaults: dict[str, Any] = {}
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
            for aname, a in schema.attributes.items():
                if a.default_value is not None and a.default_value.type != 0:
                    defaults[aname] = onnx.helper.get_attribute_value(a.default_value)
        except Exception:
            pass
        _schema_cache[key] = defaults
    d = _schema_cache[key].get(name)
    return d.decode() if isinstance(d, bytes) else d


def attr_value(node: ir.Node, name: str, opset: int = 21, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        d = attr_default(node, name, opset)
        return default if d is None else d
    v = a.value
    if isinstance(v, (tuple, list)):
        return list(v)
    return v


def read_elsewhere(v: ir.Value) -> bool:
    """More than one node reads v, or it is also a graph output."""
    return v.is_graph_output() or len({id(n) for n, _ in v.uses()}) > 1


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Every use of `old` (graph outputs included) reads `new` instead. `new` takes old's type where it has none and
    old's shape where old has one (the rest of the graph was inferred against it); a graph output keeps its name."""
    if new.type is None:
        new.type = old.type
    if old.shape is not None:
        new.shape = old.shape
    name, was_output = old.name, old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name = None
        new.name = name


def _attr_equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and list(actual) == list(expected)
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return abs(float(actual) - expected) <= 1e-7 * max(1.0, abs(expected))
    return actual == expected


class _Matcher:
    """One match attempt at one root; keeps bindings and undoes them when backtracking."""

    def __init__(self, graph: ir.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.binds: dict[str, Any] = {}
        self.node_map: dict[int, ir.Node] = {}          # id(PNode) -> graph node
        self.pnode_of: dict[int, PNode] = {}            # id(graph node) -> PNode
        self.skipped: set[int] = set()                  # optional PNodes matched as absent
        self.steps = 0
        self.best: tuple[int, str] = (-1, "no candidate")

    def fail(self, reason: str) -> None:
        depth = len(self.node_map)
        if depth > self.best[0]:
            self.best = (depth, reason)

    def value(self, pv: PValue, v: ir.Value | None) -> Iterator[None]:
        self.steps += 1
        if self.steps > MATCH_STEP_BUDGET:
            raise _BudgetExceeded
        if isinstance(pv, Var):
            bound = self.binds.get(pv.name, _UNSET)
            if bound is _UNSET:
                self.binds[pv.name] = v
                yield
                del self.binds[pv.name]
            elif bound is v:
                yield
            else:
                self.fail(f"'{pv.name}' would bind two different values ({_vname(bound)} and {_vname(v)})")
        elif isinstance(pv, Lit):
            if pv.value is None:
                if v is None:
                    yield
                else:
                    self.fail(f"expected an absent input, found {_vname(v)}")
                return
            arr = const_array(v, CONST_READ_MAX_ELEMENTS)
            if arr is None or arr.size != 1:
                self.fail(f"expected constant {pv.value}, found {_describe(v)}")
            elif float(arr.reshape(-1)[0]) != float(pv.value):
                self.fail(f"expected constant {pv.value}, found constant {arr.reshape(-1)[0]}")
            else:
                yield
        elif isinstance(pv, AnyOf):
            for alt in pv.alternatives:
                yield from self.value(alt, v)
        elif isinstance(pv, Out):
            yield from self.out(pv, v)
        else:  # pragma: no cover - pattern construction prevents this
            raise TypeError(pv)

    def out(self, pv: Out, v: ir.Value | None) -> Iterator[None]:
        pn = pv.node
        done = self.node_map.get(id(pn))
        if done is not None:
            if v is not None and v.producer() is done and v.index() == pv.index:
                yield
            else:
                self.fail(f"{pn.op_type} output reached by two different values")
            return
        if id(pn) in self.skipped:
            yield from self.value(pn.inputs[0], v)
            return
        node = v.producer() if v is not None else None
        if node is not None and node.graph is self.graph and v.index() == pv.index:
            yield from self.node(pn, node)
        elif not pn.optional:
            self.fail(f"expected {pn.op_type}, found {_describe(v)}")
        if pn.optional:
            self.skipped.add(id(pn))
            yield from self.value(pn.inputs[0], v)
            self.skipped.discard(id(pn))

    def node(self, pn: PNode, node: ir.Node) -> Iterator[None]:
        if node.op_type != pn.op_type or node.domain != pn.domain:
            self.fail(f"expected {pn.op_type}, found {node.op_type} '{node.name}'")
            return
        if id(node) in self.pnode_of:
            self.fail(f"node '{node.name}' would match two pattern nodes")
            return
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        n = len(pn.inputs)
        if len(inputs) < n and not all(isinstance(p, Lit) and p.value is None for p in pn.inputs[len(inputs):]):
            self.fail(f"{node.op_type} '{node.name}' has {len(inputs)} inputs, pattern needs {n}")
            return
        if len(inputs) > n and not pn.allow_other_inputs:
            self.fail(f"{node.op_type} '{node.name}' has {len(inputs)} inputs, pattern has {n}")
            return
        if len(node.outputs) < pn.num_outputs:
            self.fail(f"{node.op_type} '{node.name}' has fewer outputs than the pattern")
            return
        inputs += [None] * max(0, n - len(inputs))
        attr_binds: list[str] = []
        for aname, expected in pn.attrs.items():
            actual = attr_value(node, aname, self.opset)
            if isinstance(expected, Attr):
                value = expected.default if actual is None else actual
                prior = self.binds.get(expected.name, _UNSET)
                if prior is not _UNSET and prior != value:
                    self.fail(f"attribute '{expected.name}' differs between nodes")
                    self._undo_attrs(attr_binds)
                    return
                if prior is _UNSET:
                    self.binds[expected.name] = value
                    attr_binds.append(expected.name)
            elif not _attr_equal(actual, expected):
                self.fail(f"{node.op_type} '{node.name}': {aname}={actual!r}, pattern needs {expected!r}")
                self._undo_attrs(attr_binds)
                return
        if not pn.allow_other_attrs:
            extra = set(node.attributes) - set(pn.attrs)
            if extra:
                self.fail(f"{node.op_type} '{node.name}' has other attributes {sorted(extra)}")
                self._undo_attrs(attr_binds)
                return
        self.node_map[id(pn)] = node
        self.pnode_of[id(node)] = pn
        orders = [inputs[:n]]
        if pn.commutative and _plausible(pn.inputs[0], inputs[1]) and _plausible(pn.inputs[1], inputs[0]):
            if not (_plausible(pn.inputs[0], inputs[0]) and _plausible(pn.inputs[1], inputs[1])):
                orders = [[inputs[1], inputs[0]]]
            elif inputs[0] is not inputs[1]:
                orders.append([inputs[1], inputs[0]])
        for order in orders:
            yield from self.inputs(pn.inputs, order, 0)
        del self.node_map[id(pn)]
        del self.pnode_of[id(node)]
        self._undo_attrs(attr_binds)

    def _undo_attrs(self, names: list[str]) -> None:
        for name in names:
            del self.binds[name]

    def inputs(self, pvs: list[PValue], vs: list[ir.Value | None], i: int) -> Iterator[None]:
        if i == len(pvs):
            yield
            return
        for _ in self.value(pvs[i], vs[i]):
            yield from self.inputs(pvs, vs, i + 1)


_UNSET = object()


def _plausible(pv: PValue, v: ir.Value | None) -> bool:
    """A cheap necessary condition for pv to match v, used to prune commutative branches."""
    if isinstance(pv, Out):
        node = v.producer() if v is not None else None
        ok = node is not None and node.op_type == pv.node.op_type and node.domain == pv.node.domain
        return ok or pv.node.optional
    if isinstance(pv, Lit):
        return (v is None) if pv.value is None else const_tensor(v) is not None
    if isinstance(pv, AnyOf):
        return any(_plausible(a, v) for a in pv.alternatives)
    return True


def _vname(v: Any) -> str:
    return repr(v.name) if isinstance(v, ir.Value) else repr(v)


def _describe(v: ir.Value | None) -> str:
    if v is None:
        return "an absent input"
    node = v.producer()
    if node is None:
        return f"{'initializer' if v.const_value is not None else 'graph input'} {v.name!r}"
    return f"{node.op_type} '{node.name}'"


# ---------------------------------------------------------------------------------------------------- match object
class Match:
    """What check functions see: bound values and attributes, matched nodes, and helpers."""

    def __init__(self, rule: Rule, graph: ir.Graph, binds: dict[str, Any], nodes: list[ir.Node],
                 named: dict[str, ir.Node], outputs: list[ir.Value], opset: int):
        self.rule = rule
        self.graph = graph
        self.binds = binds
        self.nodes = nodes
        self.named = named
        self.outputs = outputs
        self.opset = opset

    def __getitem__(self, name: str) -> Any:
        return self.binds[name]

    def fail(self, reason: str, *names: str) -> Failure:
        return Failure(reason, tuple(names))

    def const(self, name: str, max_elements: int | None = None) -> np.ndarray | None:
        v = self.binds[name]
        return const_array(v, max_elements) if isinstance(v, ir.Value) else None

    def scalar(self, name: str) -> float | int | None:
        arr = self.const(name, CONST_READ_MAX_ELEMENTS)
        if arr is None or arr.size != 1:
            return None
        return arr.reshape(-1)[0].item()

    def dtype(self, name: str) -> ir.DataType | None:
        return self.binds[name].dtype

    def shape(self, name: str) -> tuple[int | str | None, ...] | None:
        s = self.binds[name].shape
        if s is None:
            return None
        return tuple(d if isinstance(d, int) else d.value for d in s)

    def node(self, pname: str) -> ir.Node:
        return self.named[pname]

    def attr(self, pname: str, attr: str, default: Any = None) -> Any:
        return attr_value(self.named[pname], attr, self.opset, default)


# ---------------------------------------------------------------------------------------------------- rewriting
class RewriteBuilder:
    """The `op` given to rewrite functions: records new nodes and initializers without touching the graph."""

    def __init__(self, name_prefix: str, namer: Callable[[str], str] | None = None):
        self.prefix = name_prefix
        self.namer = namer           # reserves each further node name (the prefix itself is reserved already)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.domains: set[str] = set()

    def const(self, value: Any, name: str | None = None, dtype: Any = None) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        tensor = ir.tensor(arr, name=None)
        v = ir.Value(name=f"{self.prefix}/{name or 'c' + str(len(self.initializers))}",
                     shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(v)
        return v

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: ir.Value | None, _domain: str = "", _outputs: int = 1, _version: int | None = None,
                 **attrs: Any):
            attrs = {k: v for k, v in attrs.items() if v is not None}
            # "/k" (not "_k"): the namer hands out "base_k" to other rewrites; "/k" is reserved too, since a
            # later rewrite rooted at a node named "prefix" may take "rule/prefix" with "/k" suffixes of its own
            name = f"{self.prefix}/{len(self.nodes)}" if self.nodes else self.prefix
            if self.nodes and self.namer is not None:
                name = self.namer(name)
            node = ir.Node(_domain, op_type, inputs, attributes=ir.convenience.convert_attributes(attrs),
                           num_outputs=_outputs, version=_version, name=name)
            for i, out in enumerate(node.outputs):
                out.name = f"{node.name}:{i}"
            self.nodes.append(node)
            self.domains.add(_domain)
            return node.outputs[0] if _outputs == 1 else tuple(node.outputs)
        return make


@dataclass
class Rule:
    """A named rewrite. `level` and `targets` say where pipelines may use it."""

    name: str
    pattern: Callable[..., Any]
    rewrite: Callable[..., Any]
    check: Callable[[Match], Any] | None = None
    summary: str = ""
    # Optional values for pattern variables in generated graphs (compiler/fuzz_graph.py): a number (a one-element
    # constant), a tuple to draw from, "input", "channel" (a constant along the last axis) or "scalar".
    examples: dict[str, Any] | None = None
    _compiled: tuple[list[PValue], PNode, int] | None = field(default=None, repr=False)

    def compiled(self) -> tuple[list[PValue], PNode, int]:
        if self._compiled is None:
            params = list(inspect.signature(self.pattern).parameters)[1:]
            outs = self.pattern(PatternBuilder(), *[Var(p) for p in params])
            outs = list(outs) if isinstance(outs, tuple) else [outs]
            root = outs[0]
            if not isinstance(root, Out) or root.node.optional:
                raise ValueError(f"rule {self.name}: the pattern's first output must come from a required node")
            size = _pattern_size(outs)
            self._compiled = (outs, root.node, size)
        return self._compiled

    @property
    def root_op(self) -> tuple[str, str]:
        root = self.compiled()[1]
        return root.domain, root.op_type

    @property
    def size(self) -> int:
        return self.compiled()[2]

    # -- one site
    def match(self, graph: ir.Graph, node: ir.Node, opset: int = 21,
              positions: dict[int, int] | None = None) -> Match | Failure:
        outs, root, _ = self.compiled()
        if (node.domain, node.op_type) != (root.domain, root.op_type):
            return Failure(f"root is {node.op_type}, rule needs {root.op_type}")
        mt = _Matcher(graph, opset)
        first = outs[0]
        assert isinstance(first, Out)
        try:
            for _ in mt.node(root, node) if first.index < len(node.outputs) else ():
                # Retrieve pattern outputs (root + exported) while the bindings are live.
                values = [self._resolve(mt, pv) for pv in outs]
                if any(v is None for v in values):
                    mt.fail("an exported value was not matched")
                    continue
                nodes = [mt.node_map[id(pn)] for pn in _pattern_nodes(outs) if id(pn) in mt.node_map]
                leak = _outside_use(graph, nodes, values) or _export_cycle(nodes, values[1:], positions)
                if leak:
                    mt.fail(leak)
                    continue
                named = {pn.name: mt.node_map[id(pn)] for pn in _pattern_nodes(outs)
                         if pn.name and id(pn) in mt.node_map}
                m = Match(self, graph, dict(mt.binds), nodes, named, values, opset)
                result = self.check(m) if self.check is not None else None
                if isinstance(result, Failure):
                    mt.best = (1 << 30, "check: " + str(result))
                    continue
                if result is not None and result is not True:
                    m.binds.update(result)
                return m
        except _BudgetExceeded:
            return Failure(f"match budget of {MATCH_STEP_BUDGET} steps exceeded")
        return Failure(mt.best[1])

    @staticmethod
    def _resolve(mt: _Matcher, pv: PValue) -> ir.Value | None:
        if isinstance(pv, Var):
            return mt.binds.get(pv.name)
        if isinstance(pv, Out):
            if id(pv.node) in mt.skipped:
                return Rule._resolve(mt, pv.node.inputs[0])
            node = mt.node_map.get(id(pv.node))
            return node.outputs[pv.index] if node is not None else None
        return None

    def apply(self, graph: ir.Graph, m: Match, namer: Callable[[str], str],
              positions: dict[int, int] | None = None) -> tuple[bool, bool, set[str]]:
        """Build the replacement and splice it in. Returns (applied, needs_topological_sort, domains used)."""
        root_node = m.outputs[0].producer()
        assert root_node is not None
        op = RewriteBuilder(namer(f"{self.name}/{root_node.name or root_node.op_type}"), namer)
        params = inspect.signature(self.rewrite).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in m.binds.items() if takes_all or k in params}
        new = self.rewrite(op, **kwargs)
        new_values = list(new) if isinstance(new, tuple) else [new]
        if len(new_values) != len(m.outputs):
            raise ValueError(f"rule {self.name}: rewrite returned {len(new_values)} values, pattern has "
                             f"{len(m.outputs)} outputs")
        if _output_refusal(m.outputs, new_values, op) is not None:
            _discard(op)
            return False, False, set()
        needs_sort = False
        graph.insert_before(root_node, op.nodes)
        if positions is not None:
            for n in op.nodes:  # new nodes sit where the root was
                positions[id(n)] = positions.get(id(root_node), 0)
        for v in op.initializers:
            graph.register_initializer(v)
        for old, repl in zip(m.outputs, new_values):
            if repl is None or repl is old:
                continue
            if old is not m.outputs[0]:
                needs_sort = True
            if repl.type is None:
                repl.type = old.type
            if repl.shape is None and old.shape is not None:
                repl.shape = old.shape
            was_output = old.is_graph_output()
            name = old.name
            old.replace_all_uses_with(repl, replace_graph_outputs=True)
            if was_output or _is_new(repl, op):
                old.name = None
                repl.name = name
        graph.remove(m.nodes, safe=True)
        return True, needs_sort, op.domains


    def refusal(self, m: Match) -> str | None:
        """Why `apply` would leave this match as it is, or None when it would rewrite it. Only a match whose outputs
        include a graph output can be refused (_output_refusal); its replacement is built aside and discarded."""
        if not any(v.is_graph_output() for v in m.outputs):
            return None
        op = RewriteBuilder(f"{self.name}/explain")
        params = inspect.signature(self.rewrite).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        new = self.rewrite(op, **{k: v for k, v in m.binds.items() if takes_all or k in params})
        try:
            return _output_refusal(m.outputs, list(new) if isinstance(new, tuple) else [new], op)
        finally:
            _discard(op)


def _output_refusal(outputs: Sequence[ir.Value], new_values: Sequence[ir.Value | None], op: RewriteBuilder
                    ) -> str | None:
    """A graph output keeps its name, so a pre-existing value may replace it only if that value can take the name:
    not a graph input, another graph output, an initializer or any value without a producer."""
    for old, repl in zip(outputs, new_values):
        if old.is_graph_output() and repl is not None and not _is_new(repl, op):
            kind = ("a graph input" if repl.is_graph_input() else "a graph output" if repl.is_graph_output()
                    else "an initializer" if repl.is_initializer() else
                    "a value without a producer" if repl.producer() is None else None)
            if kind is not None:
                return (f"matched, not rewritten: graph output '{old.name}' would be replaced by {kind} "
                        f"'{repl.name}', which cannot take its name")
    return None


def _discard(op: RewriteBuilder) -> None:
    """Detach the nodes a rewrite built but that were never inserted, so the values they read lose those uses."""
    for node in op.nodes:
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)


def _is_new(v: ir.Value, op: RewriteBuilder) -> bool:
    p = v.producer()
    return (p is not None and any(p is n for n in op.nodes)) or any(v is i for i in op.initializers)


def _export_cycle(nodes: list[ir.Node], exported: list[ir.Value], positions: dict[int, int] | None) -> str | None:
    """An outside user of an exported value must not feed the match: the fused node would depend on itself."""
    if not exported:
        return None
    inside = {id(n) for n in nodes}
    users = {id(u.node) for v in exported for u in v.uses() if id(u.node) not in inside}
    if not users:
        return None
    pos = positions or {}
    floor = min((pos.get(id(n), 0) for n in nodes), default=0)
    stack = [v.producer() for n in nodes for v in n.inputs if v is not None and v.producer() is not None
             and id(v.producer()) not in inside]
    seen: set[int] = set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen or pos.get(id(n), floor) < floor:
            continue
        if id(n) in users:
            return f"exported value is used by {n.op_type} '{n.name}', which feeds the match (would form a cycle)"
        seen.add(id(n))
        stack.extend(v.producer() for v in n.inputs if v is not None)
    return None


def _outside_use(graph: ir.Graph, nodes: list[ir.Node], outputs: list[ir.Value]) -> str | None:
    inside = {id(n) for n in nodes}
    allowed = {id(v) for v in outputs}
    for n in nodes:
        for out in n.outputs:
            if id(out) in allowed:
                continue
            if out.is_graph_output():
                return f"intermediate value '{out.name}' is a graph output"
            for use in out.uses():
                if id(use.node) not in inside:
                    return f"intermediate value '{out.name}' has outside users ({use.node.op_type} '{use.node.name}')"
    return None


# ---------------------------------------------------------------------------------------------------- rule sets
@dataclass
class RuleStats:
    applied: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    sites: list[tuple[str, str]] = field(default_factory=list)    # (rule, root node name) of each rewrite, in order


def apply_rules(model: ir.Model, rules: Sequence[Rule], *, max_sweeps: int = 8,
                disabled: frozenset[str] = frozenset(), limit: int | None = None) -> RuleStats:
    """Apply rules, larger patterns first, sweeping until no rule fires (or max_sweeps). With `limit`, stop after
    that many rewrites: the same rewrites, in the same order, as the first `limit` of an unlimited run (bisection
    over a pass's rewrites, compiler/bisect.py)."""
    graph = model.graph
    opset = model.opset_imports.get("", 21)
    order = sorted((r for r in rules if r.name not in disabled), key=lambda r: (-r.size, r.name))
    stats = RuleStats()
    used_names = {n.name for n in graph} | {v.name for v in graph.initializers.values()}
    for n in graph:
        used_names.update(o.name for o in n.outputs if o.name)

    def namer(base: str) -> str:
        name, k = base, 1
        while name in used_names:
            name = f"{base}_{k}"
            k += 1
        used_names.add(name)
        return name

    for _ in range(max_sweeps):
        fired = False
        needs_sort = False
        index: dict[tuple[str, str], list[ir.Node]] = {}
        positions: dict[int, int] = {}
        for pos, node in enumerate(graph):
            index.setdefault((node.domain, node.op_type), []).append(node)
            positions[id(node)] = pos
        for rule in order:
            for node in index.get(rule.root_op, ()):
                if node.graph is not graph:
                    continue  # removed by an earlier rewrite in this sweep
                m = rule.match(graph, node, opset, positions)
                if isinstance(m, Failure):
                    continue
                if limit is not None and len(stats.sites) >= limit:
                    break
                site = node.name or node.op_type
                applied, sort, domains = rule.apply(graph, m, namer, positions)
                if applied:
                    fired = True
                    needs_sort |= sort
                    stats.applied[rule.name] = stats.applied.get(rule.name, 0) + 1
                    stats.sites.append((rule.name, site))
                    for d in domains:
                        model.opset_imports.setdefault(d, 1)
                else:
                    stats.refused[rule.name] = stats.refused.get(rule.name, 0) + 1
        if needs_sort:
            graph.sort()
        if not fired or (limit is not None and len(stats.sites) >= limit):
            break
    return stats


def explain(model: ir.Model, rule: Rule) -> list[tuple[str, str]]:
    """For each candidate root node: (node name, 'matched' or the reason the match failed). A match the rewrite
    would refuse (a graph output's replacement that cannot take its name) says so instead of 'matched'."""
    graph = model.graph
    opset = model.opset_imports.get("", 21)
    rows = []
    positions = {id(n): i for i, n in enumerate(graph)}
    for node in graph:
        if (node.domain, node.op_type) != rule.root_op:
            continue
        m = rule.match(graph, node, opset, positions)
        why = (rule.refusal(m) or "matched") if isinstance(m, Match) else str(m)
        rows.append((node.name or "<unnamed>", why))
    return rows


def suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
