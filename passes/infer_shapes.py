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
from onnxc.verifier import schema_output_kind


def _restore_value_kinds(graph: ir.Graph) -> None:
    """onnx-ir 1.1 records an inferred sequence as a tensor of the element's type and shape (SplitToSequence's
    output becomes float[B, S, 64]), which onnxruntime refuses to load. An output whose schema allows only
    sequences (or only optionals) gets that kind back, with the element type kept and no shape."""
    for node in graph:
        for i, out in enumerate(node.outputs):
            kind = schema_output_kind(node, i)
            if kind == "seq" and isinstance(out.type, ir.TensorType):
                out.type, out.shape = ir.SequenceType(ir.TensorType(out.type.dtype)), None
            elif kind == "optional" and isinstance(out.type, ir.TensorType):
                out.type, out.shape = ir.OptionalType(ir.TensorType(out.type.dtype)), None


@register_pass
class InferShapes(Pass):
    """Infer value types and shapes with ONNX's shape inference (no weights read)."""

    name = "infer-shapes"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        _restore_value_kinds(model.graph)
        # Shapes are analysis, not a change of the graph: report unmodified so fixed points converge.
        return PassResult(result.model, False, {"refined": int(result.modified)})
