"""sort-topologically

    nodes  :=  a stable topological order of nodes   (ties keep their current order)

Wraps onnx-ir's Graph.sort. Run last so emitted files list nodes producer-first, deterministically.
"""
from __future__ import annotations

import onnx_ir as ir

from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass
class SortTopologically(Pass):
    """Order nodes topologically (stable)."""

    name = "sort-topologically"
    level = 0

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        before = [id(n) for n in model.graph]
        model.graph.sort()
        return PassResult(model, before != [id(n) for n in model.graph])
