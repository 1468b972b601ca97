"""eliminate-cse

    y1 = op(x..., attrs); y2 = op(x..., attrs)   ->   y2 := y1        (same op, inputs, attributes)

Wraps onnx-ir's CommonSubexpressionEliminationPass, which hashes (op, input identities, attributes) in one sweep.
Input identity means equal constants must first share one initializer: fold-constants interns small constants,
so `Unsqueeze(x, [0])` written twice by an exporter becomes one node. Nondeterministic ops and control flow are
left alone.
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateCSE(Pass):
    """Merge nodes that compute the same thing from the same inputs."""

    name = "eliminate-cse"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        before = sum(1 for _ in model.graph)
        result = CommonSubexpressionEliminationPass()(model)
        merged = before - sum(1 for _ in result.model.graph)
        if result.modified:
            merged = max(merged, 1)  # a merge of two graph outputs keeps an Identity: same count, still a merge
        return PassResult(result.model, result.modified, {"merged": merged} if merged else {})
