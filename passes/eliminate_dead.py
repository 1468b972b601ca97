"""eliminate-dead

    node whose outputs are unused and not graph outputs  ->  (removed)
    initializer with no use that is not a graph input    ->  (removed)
    unused trailing optional outputs / empty inputs      ->  (dropped)

Wraps onnx-ir's RemoveUnusedNodesPass (walks the graph once, last node first, so chains die in one sweep).
The graph's inputs and outputs are never touched.
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDead(Pass):
    """Remove nodes and initializers nothing uses."""

    name = "eliminate-dead"
    level = 0          # -O0 runs it in the optional quantize stage (compiler/pipeline.py)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        nodes = sum(1 for _ in model.graph)
        outputs = sum(len(n.outputs) for n in model.graph)
        inits = len(model.graph.initializers)
        changed = RemoveUnusedNodesPass()(model).modified
        changed |= outputs - nodes != sum(len(n.outputs) for n in model.graph) - sum(1 for _ in model.graph)
        removed_nodes = nodes - sum(1 for _ in model.graph)
        removed_inits = inits - len(model.graph.initializers)
        counts = {k: v for k, v in (("nodes", removed_nodes), ("initializers", removed_inits)) if v}
        if changed and not counts:
            counts = {"outputs": 1}  # only unused optional outputs were dropped
        return PassResult(model, changed or bool(counts), counts)
