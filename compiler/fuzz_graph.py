"""Random graphs that contain a rule's pattern (for compiler/fuzz.py), every choice drawn from `draw`.

The pattern itself (the `op.X(...)` description the matcher walks) is instantiated node by node:

    Var        by what its position holds: an op's data input (a graph input shaped like the node's other operand,
               or (B, S, H)), a per-channel constant along that operand's last axis, a one-element constant, (for an
               Add) a constant of the operand's shape with a leading 1, a position slab; a MatMul/Gemm weight (K, N) with K the data's
               last dim; a Gather's table (V, H) or a graph input; a Where's condition (bool); a shape-carrying
               input (a Reshape target, Gather indices, ...) drawn from the shapes flowing in (fuzz_shapes.py).
               A name in the rule's `examples` takes the declared value instead (a number, a tuple to draw from,
               "input", "channel" or "scalar"): how a check that needs particular constants gets graphs it accepts
    Lit        a one-element constant of that value (int64 where the position holds a shape)
    Or(...)    one alternative, drawn;   optional: present or absent (an optional Cast widens or narrows)
    Add/Mul..  either operand order, drawn

Ranks flow backward first: a Transpose with a literal perm, a Gemm (2-D) demand the rank of what feeds them, so a
Reshape target there has that many entries. Around the pattern: float32 or float16; B and S static or symbolic, H
static; a random unary op before each float graph input and after the root; sometimes an extra reader (a graph
output) of one intermediate value. The opset is the newest that any of the pattern's ops needs, at least 18.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import fuzz_shapes as fs
from .fuzz_infer import ShapeTable
from . import rules as _rules

OPSET = 18
HIDDEN = (4, 8)
CONCRETE = {"batch": 3, "seq": 5}           # sizes fed for symbolic dims (static dims are 2 and 3)
PRE_OPS = (None, "Neg", "Tanh", "Sigmoid")
POST_OPS = (None, "Neg", "Relu", "Sigmoid")
BOOL_OUT = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                      "IsNaN", "IsInf"})
INT_OUT = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})
SAME_RANK = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Cast", "CastLike", "Neg", "Relu", "Sigmoid",
                       "Tanh", "Erf", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Softmax", "Identity", "Dropout",
                       "Where", "IsNaN", "LayerNormalization", "Gelu", "FastGelu", "BiasGelu", "QuickGelu"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"})
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
      TensorProto.INT64: np.int64, TensorProto.BOOL: np.bool_}


class Discard(Exception):
    """The generated graph is not a valid model (onnxruntime refuses it)."""


def demanded_ranks(outs: list[_rules.PValue]) -> dict[Any, int]:
    """Ranks consumers need of pattern values (by id of a producing node, or by a Var's name)."""
    want: dict[Any, int] = {}

    def key(pv: _rules.PValue) -> Any:
        return id(pv.node) if isinstance(pv, _rules.Out) else pv.name if isinstance(pv, _rules.Var) else None

    def demand(pv: _rules.PValue, rank: int) -> None:
        for alt in pv.alternatives if isinstance(pv, _rules.AnyOf) else (pv,):
            k = key(alt)
            if k is None or want.get(k) == rank:
                continue
            want.setdefault(k, rank)
            if isinstance(alt, _rules.Out) and alt.node.op_type in SAME_RANK:
                for i in alt.node.inputs[:1] if alt.node.op_type == "LayerNormalization" else alt.node.inputs:
                    demand(i, rank)

    for pn in _rules._pattern_nodes(outs):
        perm = pn.attrs.get("perm")
        if pn.op_type == "Transpose" and isinstance(perm, (list, tuple)):
            demand(pn.inputs[0], len(perm))
        elif pn.op_type == "Gemm":
            for i in pn.inputs[:2]:
                demand(i, 2)
    return want


def pattern_opsets(outs: list[_rules.PValue]) -> list[onnx.OperatorSetIdProto]:
    version, domains = OPSET, set()
    for pn in _rules._pattern_nodes(outs):
        if pn.domain:
            domains.add(pn.domain)
            continue
        try:
            version = max(version, onnx.defs.get_schema(pn.op_type).since_version)
        except Exception:
            pass
    return [helper.make_opsetid("", version)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]


def default_dims(dims: list, rank: int | None) -> list:
    if rank is None or rank == len(dims):
        return list(dims)
    return {1: dims[-1:], 2: dims[1:], 4: [dims[0], 2, *dims[1:]]}.get(rank, [*dims, *([1] * (rank - 3))][:rank])


class Builder:
    """Instantiates one pattern as an ONNX graph."""

    def __init__(self, draw: Callable[[Any], Any], rule: _rules.Rule, dtype: int, dims: list[int | str], seed: int):
        self.draw = draw
        self.examples = getattr(rule, "examples", None) or {}
        self.dtype, self.dims, self.hidden = dtype, dims, int(dims[-1])
        self.rng = np.random.default_rng(seed)
        outs = rule.compiled()[0]
        self.want = demanded_ranks(outs)
        self.opsets = pattern_opsets(outs)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, tuple[list[int], int, int | None]] = {}   # input -> (fed dims, dtype, id bound)
        self.inits: list[onnx.TensorProto] = []
        self.tables: set[str] = set()
        self.memo: dict[Any, Any] = {}                     # values drawn for a kind of node, to draw again
        self.vars: dict[str, tuple[str, int]] = {}
        self.built: dict[int, list[tuple[str, int]]] = {}
        self.pattern_values: list[tuple[str, int]] = []      # outputs of nodes built for pattern nodes
        self.names: dict[str, str] = {}                      # pattern node name -> graph node name
        self.choices: list[str] = []
        self.counter = 0
        self.table = ShapeTable(self.opsets, CONCRETE)

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def const(self, arr: np.ndarray, stem: str = "c") -> str:
        name = self.fresh(stem)
        self.inits.append(onnx.numpy_helper.from_array(arr, name))
        self.table.add_const(self.inits[-1])
        return name

    def node(self, op: str, inputs: list[str], dtype: int, domain: str = "", attrs: dict | None = None,
             outputs: int = 1, stem: str = "v") -> list[tuple[str, int]]:
        outs = [self.fresh(stem) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"n_{op}_"), domain=domain or None,
                                           **(attrs or {})))
        return [(o, dtype) for o in outs]

    def shape(self, name: str) -> fs.Shape | None:
        """The declared and fed shape of a value built so far (onnx shape inference), None where unknown."""
        self.table.update(self.nodes)
        return self.table.shape(name)

    def graph_input(self, stem: str, dtype: int, dims: list, fed: list[int], high: int | None = None) -> str:
        name = self.fresh(stem)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        self.feeds[name] = (fed, dtype, high)
        self.table.add_input(self.inputs[-1], fed)
        pre = self.draw(PRE_OPS) if dtype in FLOATS else None
        if pre is None:
            return name
        self.choices.append(f"{pre} before input {name}")
        return self.node(pre, [name], dtype)[0][0]

    def input_like(self, stem: str, dtype: int, like: fs.Shape | None, rank: int | None) -> str:
        if like is None:
            dims = default_dims(self.dims, rank)
            fed = [CONCRETE[d] if isinstance(d, str) else d for d in dims]
        else:
            dims = [s if isinstance(s, int) or s in CONCRETE else c for s, c in zip(like.sym, like.conc)]
            fed = list(like.conc)
        return self.graph_input(stem, dtype, dims, fed)

    # -- pattern values
    def leaf(self, pv: _rules.PValue, dtype: int, parent: str, position: int, ref: Callable[[], fs.Shape | None],
             plan: fs.Plan) -> tuple[str, int]:
        if isinstance(pv, _rules.Lit):
            if pv.value is None:
                return "", dtype
            int_pos = (parent, position) in fs.INT_INPUTS
            return self.const(np.array(pv.value, dtype=np.int64 if int_pos else NP.get(dtype, np.float32))), dtype
        assert isinstance(pv, _rules.Var)
        if pv.name in self.vars:
            return self.vars[pv.name]
        name, kind = self.var(pv.name, dtype, parent, position, ref, plan)
        self.choices.append(f"{pv.name} = {kind}")
        self.vars[pv.name] = (name, dtype)
        return name, dtype

    def var(self, var: str, dtype: int, parent: str, position: int, ref: Callable[[], fs.Shape | None],
            plan: fs.Plan) -> tuple[str, str]:
        np_dtype, rank = NP.get(dtype, np.float32), self.want.get(var)
        given = plan.inputs.get(position)
        if isinstance(given, fs.Ids):
            dims = self.dims[:2]
            return self.graph_input(f"{var}_ids", TensorProto.INT64, dims,
                                    [CONCRETE[d] if isinstance(d, str) else d for d in dims], given.high), "ids"
        if plan.like is not None:
            return self.input_like(f"{var}_in", dtype, plan.like, rank), "input"
        if given is not None:
            return self.const(given, f"{var}_s"), repr(given.tolist())
        if (parent, position) in fs.INT_INPUTS:
            raise Discard             # a shape-carrying input whose data shape is not known
        if (parent, position) in fs.BOOL_INPUTS:
            like = ref()
            shape = (like.conc[-1],) if like is not None and self.draw(("channel", "scalar")) == "channel" else ()
            return self.const(self.rng.random(shape) < 0.7, f"{var}_b"), f"bool {shape}"
        if parent in ("MatMul", "Gemm") and position == 1:
            like = ref()
            k = like.conc[-1] if like is not None else self.hidden
            n = self.memo.get(("matrix", k)) if ("matrix", k) in self.memo and self.draw((True, False)) else \
                self.draw((k, *[h for h in HIDDEN if h != k]))
            self.memo.setdefault(("matrix", k), n)
            return self.const(self.rng.normal(0, 0.5, (k, n)).astype(np_dtype), f"{var}_m"), f"matrix {k}x{n}"
        if parent == "Transpose" and self.draw(("matrix", "input")) == "matrix":
            return self.const(self.rng.normal(0, 0.5, (self.hidden, self.hidden)).astype(np_dtype), f"{var}_m"), \
                "matrix"
        if parent == "Gather" and position == 0 and self.draw(("table", "input")) == "table":
            rows = self.draw((7, 11))
            name = self.const(self.rng.normal(0, 1, (rows, self.hidden)).astype(np_dtype), f"{var}_t")
            self.tables.add(name)
            return name, f"table {rows}x{self.hidden}"
        if var in self.examples:
            kind = self.examples[var]
            kind = self.draw(kind) if isinstance(kind, tuple) else kind
        elif not self.vars or parent and parent not in BINARY and position == 0:    # the data an op works on
            kind = "input"
        else:
            kind = self.draw(("input", "channel", "scalar") + (("slab",) if parent == "Add" else ()))
        if kind == "input":
            return self.input_like(f"{var}_in", dtype, ref() if parent in BINARY else None, rank), kind
        like = ref() if kind in ("channel", "slab") else None
        if kind == "channel":
            n = like.conc[-1] if like is not None else self.hidden
            return self.const(self.rng.uniform(0.5, 1.5, n).astype(np_dtype), f"{var}_c"), kind
        if kind == "slab":
            shape = (1, *like.conc[1:]) if like is not None else (1, self.hidden)
            return self.const(self.rng.uniform(0.5, 1.5, shape).astype(np_dtype), f"{var}_c"), f"slab {shape}"
        value = self.rng.uniform(0.5, 1.5) if kind == "scalar" else kind
        return self.const(np.array(value, dtype=np_dtype), f"{var}_c"), kind if kind == "scalar" else repr(kind)

    def value(self, pv: _rules.PValue, dtype: int) -> tuple[str, int]:
        if isinstance(pv, _rules.AnyOf):
            return self.value(pv.alternatives[self.draw(range(len(pv.alternatives)))], dtype)
        if isinstance(pv, _rules.Out):
            return self.out(pv, dtype)
        return self.leaf(pv, dtype, "", 0, lambda: None, fs.Plan())

    def out(self, pv: _rules.Out, dtype: int) -> tuple[str, int]:
        pn = pv.node
        if id(pn) not in self.built:
            if pn.optional and not self.draw((True, False)):
                self.choices.append(f"optional {pn.op_type} absent")
                self.built[id(pn)] = [self.value(pn.inputs[0], dtype)] * max(1, pn.num_outputs)
            else:
                self.built[id(pn)] = self.make(pn, dtype)
        return self.built[id(pn)][pv.index]

    def make(self, pn: _rules.PNode, dtype: int) -> list[tuple[str, int]]:
        raise NotImplementedError    # fuzz_node.NodeBuilder


@dataclass
class Example:
    proto: onnx.ModelProto
    root: str                          # the built root node's name
    extra_reader: str | None           # the intermediate value given an extra reader
    feeds: dict[str, np.ndarray]
    choices: list[str]
    precision: str                     # the graph's compute dtype: its outputs carry that precision, even widened

    def describe(self) -> str:
        text = onnx.printer.to_text(self.proto.graph)
        return "choices: " + ("; ".join(self.choices) or "none") + "\n" + text
