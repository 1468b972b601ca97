"""infer-shapes

    value.type, value.shape  :=  onnx.shape_inference(model)      (non-strict, with data propagation)

Wraps onnx-ir's ShapeInferencePass, which runs ONNX's C++ inference on a copy of the graph whose initializers are
stripped of data, so no weight is read. Ops ONNX does not know (com.microsoft) are skipped, not errors. Existing
shapes are only refined. Never changes the graph's nodes.
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass
class InferShapes(Pass):
    """Infer value types and shapes with ONNX's shape inference (no weights read)."""

    name = "infer-shapes"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        # Shapes are analysis, not a change of the graph: report unmodified so fixed points converge.
        return PassResult(result.model, False, {"refined": int(result.modified)})
