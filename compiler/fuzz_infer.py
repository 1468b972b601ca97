"""Shapes of a graph being built by onnxc fuzz (compiler/fuzz_graph.py): onnx shape inference on each node alone,
once with the declared dims and once with the fed sizes."""
from __future__ import annotations

import onnx
from onnx import helper

from .fuzz_shapes import Dim, Shape


class ShapeTable:
    """Declared and fed shapes of a graph being built, node by node: each node is inferred alone, so one that
    inference cannot type leaves the values before it known."""

    def __init__(self, opsets: list, concrete: dict[str, int]):
        self.opsets, self.concrete = opsets, concrete
        self.sym: dict[str, list[Dim]] = {}
        self.conc: dict[str, list[int] | None] = {}
        self.types: dict[str, int] = {}
        self.consts: dict[str, onnx.TensorProto] = {}
        self.done = 0

    def add_input(self, vi: onnx.ValueInfoProto, fed: list[int]) -> None:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        self.sym[vi.name], self.conc[vi.name] = dims, list(fed)
        self.types[vi.name] = vi.type.tensor_type.elem_type

    def add_const(self, t: onnx.TensorProto) -> None:
        self.sym[t.name] = self.conc[t.name] = list(t.dims)
        self.types[t.name] = t.data_type
        self.consts[t.name] = t

    def update(self, nodes: list[onnx.NodeProto]) -> None:
        for node in nodes[self.done:]:
            self._infer(node)
        self.done = len(nodes)

    def _infer(self, node: onnx.NodeProto) -> None:
        names = [n for n in node.input if n]
        if any(n not in self.types or self.conc.get(n) is None for n in names):
            return
        for table, fed in ((self.sym, False), (self.conc, True)):
            vis = [helper.make_tensor_value_info(n, self.types[n], self.conc[n] if fed else self.sym[n])
                   for n in names if n not in self.consts]
            graph = helper.make_graph([node], "one", vis, [], [self.consts[n] for n in names if n in self.consts])
            model = helper.make_model(graph, opset_imports=self.opsets, ir_version=9)
            try:
                model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            except Exception:
                return
            for vi in model.graph.output or model.graph.value_info:
                tt = vi.type.tensor_type
                if not tt.HasField("shape"):
                    continue
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
                if fed and any(not isinstance(d, int) for d in dims):
                    continue
                table[vi.name] = dims
                self.types[vi.name] = tt.elem_type

    def shape(self, name: str) -> Shape | None:
        c, s = self.conc.get(name), self.sym.get(name)
        if c is None or any(not isinstance(d, int) or d <= 0 for d in c):
            return None
        s = s if s is not None and len(s) == len(c) else [None] * len(c)
        return Shape([d if d not in (0, "") else None for d in s], list(c))
