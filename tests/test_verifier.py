"""The IR verifier (onnxc.verifier): each invariant broken on purpose, and clean models accepted."""
from __future__ import annotations

import onnx_ir as ir
import pytest
from helpers import parse, run_pass
from onnxc.errors import IRVerificationError
from onnxc.verifier import Signature, check_model, verify

CHAIN = """
g (float[2, 3] x) => (float[2, 3] y) <float[3] w = {1, 2, 3}> {
  a = Neg(x)
  b = Add(a, w)
  y = Relu(b)
}"""

IF_MODEL = """
g (float[2] x, bool c) => (float[2] y) {
  a = Neg(x)
  y = If(c) <then_branch = g1 () => (float[2] t) { t = Relu(a) }, else_branch = g2 () => (float[2] e) { e = Abs(x) }>
}"""


def nodes(model: ir.Model) -> list[ir.Node]:
    return list(model.graph)


def move_to_end(model: ir.Model, node: ir.Node) -> None:
    model.graph.remove(node, safe=False)
    model.graph.append(node)


@pytest.mark.parametrize("text", [CHAIN, IF_MODEL, """
g (float[2] x, float[2] w) => (float[2] y, float[2] x2) <float[2] w = {1, 2}> {
  y = Mul(x, w)
  x2 = Identity(x)
}"""])
def test_verifier_accepts_clean_model(text):
    model = parse(text)
    assert check_model(model) == []
    assert check_model(model, Signature.of(model)) == []
    verify(model)


def test_verifier_rejects_topological_order_violation():
    model = parse(CHAIN)
    move_to_end(model, nodes(model)[0])
    assert check_model(model) == ["Add '<unnamed>' input 0 'a' is used before it is defined (order or cycle)"]


def test_verifier_sort_topologically_repairs_order():
    model = parse(CHAIN)
    move_to_end(model, nodes(model)[0])
    assert run_pass(model, "sort-topologically").modified
    assert [n.op_type for n in model.graph] == ["Neg", "Add", "Relu"]
    assert check_model(model) == []
    assert not run_pass(model, "sort-topologically").modified


def test_verifier_rejects_cycle():
    model = parse(CHAIN)
    neg, add, _ = nodes(model)
    neg.replace_input_with(0, add.outputs[0])
    problems = check_model(model)
    assert problems == ["Neg '<unnamed>' input 0 'b' is used before it is defined (order or cycle)"]


def test_verifier_rejects_dangling_use():
    model = parse(CHAIN)
    model.graph.remove(nodes(model)[0], safe=False)
    assert check_model(model) == ["Add '<unnamed>' input 0 'a' dangles: its producer was removed"]


def test_verifier_rejects_dangling_use_inside_subgraph():
    model = parse(IF_MODEL)
    model.graph.remove(nodes(model)[0], safe=False)
    assert check_model(model) == ["Relu '<unnamed>' input 0 'a' dangles: its producer was removed"]


def test_verifier_accepts_outer_value_used_in_subgraph():
    model = parse(IF_MODEL)
    relu = next(iter(nodes(model)[1].attributes["then_branch"].as_graph()))
    assert relu.inputs[0] is nodes(model)[0].outputs[0]
    assert check_model(model) == []


@pytest.mark.xfail(strict=True, reason="verifier reports an outer value used in a subgraph before its definition as "
                                       "'dangles: its producer was removed' instead of an order violation")
def test_verifier_reports_subgraph_use_before_definition_as_order():
    model = parse(IF_MODEL)
    move_to_end(model, nodes(model)[0])
    problems = check_model(model)
    assert len(problems) == 1 and "used before it is defined" in problems[0]


def test_verifier_rejects_value_without_producer():
    model = parse(CHAIN)
    stray = ir.Value(name="stray", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    nodes(model)[1].replace_input_with(1, stray)
    assert check_model(model) == ["Add '<unnamed>' input 1 'stray' is not produced by any node, input or initializer"]


def test_verifier_rejects_duplicate_value_names():
    model = parse(CHAIN)
    nodes(model)[1].outputs[0].name = "a"
    assert check_model(model) == ["two values share the name 'a'"]


def test_verifier_rejects_node_output_named_like_initializer():
    model = parse(CHAIN)
    nodes(model)[0].outputs[0].name = "w"
    assert check_model(model) == ["two values share the name 'w'"]


def test_verifier_rejects_missing_domain_import():
    model = parse("""<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
    g (float[2, 3] x) => (float[2, 3] y) {
      y = com.microsoft.FastGelu(x)
    }""")
    assert check_model(model) == []
    del model.opset_imports["com.microsoft"]
    assert check_model(model) == ["FastGelu '<unnamed>' uses domain 'com.microsoft', which the model does not import"]


def test_verifier_accepts_ai_onnx_spelling_of_default_domain():
    model = parse(CHAIN)
    nodes(model)[0].domain = "ai.onnx"
    assert check_model(model) == []


def test_verifier_rejects_undefined_graph_output():
    model = parse(CHAIN)
    relu = nodes(model)[2]
    model.graph.remove(relu, safe=False)
    assert check_model(model) == ["graph output 'y' is not defined"]


def test_verifier_rejects_extra_undefined_graph_output():
    model = parse(CHAIN)
    model.graph.outputs.append(ir.Value(name="ghost", type=ir.TensorType(ir.DataType.FLOAT)))
    assert check_model(model) == ["graph output 'ghost' is not defined"]


def test_verifier_signature_changes():
    original = Signature.of(parse(CHAIN))
    model = parse(CHAIN)
    model.graph.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
    model.graph.inputs[0].shape = ir.Shape([6])
    assert check_model(model, original) == ["graph input 'x' changed rank 2 -> 1",
                                            "graph output 'y' changed element type 1 -> 10"]
    model = parse(CHAIN)
    model.graph.outputs[0].name = "z"
    assert check_model(model, original) == ["graph outputs changed: ['y'] -> ['z']"]


def test_verifier_signature_ignores_unknown_type_and_rank():
    model = parse(CHAIN)
    original = Signature.of(model)
    model.graph.outputs[0].type = None
    model.graph.outputs[0].shape = None
    assert check_model(model, original) == []


def test_verifier_verify_raises_with_all_problems():
    model = parse(CHAIN)
    model.graph.remove(nodes(model)[0], safe=False)
    nodes(model)[1].outputs[0].name = "x"
    with pytest.raises(IRVerificationError) as info:
        verify(model)
    assert info.value.problems == ["Add '<unnamed>' input 0 'a' dangles: its producer was removed",
                                   "two values share the name 'x'"]
    assert str(info.value) == "Add '<unnamed>' input 0 'a' dangles: its producer was removed (+1 more)"
    assert info.value.exit_code == 3


def test_verifier_caps_problem_count():
    lines = "\n".join(f"  y{i} = Neg(gone)" for i in range(30))
    model = parse(f"""
    g (float[2] x) => (float[2] y0) {{
      gone = Neg(x)
    {lines}
    }}""")
    model.graph.remove(nodes(model)[0], safe=False)
    assert len(check_model(model)) == 20
    assert len(check_model(model, max_problems=5)) == 5


# ------------------------------------------------------------------------------------------- op schemas
def _opset(text: str, version: int) -> ir.Model:
    model = parse(text)
    model.opset_imports[""] = version
    return model


SHAPE_SLICE = """
g (float[2, 3] x) => (int64[1] y) {
  y = Shape <start = 1, end = 2> (x)
}"""


def test_verifier_rejects_attribute_unknown_at_the_model_opset():
    problems = check_model(_opset(SHAPE_SLICE, 14))
    assert any("Shape" in p and "opset 14" in p and "'start'" in p for p in problems), problems
    assert check_model(_opset(SHAPE_SLICE, 15)) == []


def test_verifier_rejects_input_count_outside_the_schema():
    model = _opset("""
g (float[2, 3] x) => (float[2] y) {
  y = ReduceSum <keepdims = 0> (x)
}""", 13)
    assert check_model(model) == []
    reduce = nodes(model)[0]
    reduce.resize_inputs(3)
    reduce.replace_input_with(1, model.graph.inputs[0])
    reduce.replace_input_with(2, model.graph.inputs[0])
    assert any("has 3 inputs; the schema takes 1 to 2" in p for p in check_model(model))


def test_verifier_rejects_op_absent_at_the_model_opset_and_missing_required_attribute():
    model = _opset("""
g (float[2, 3] x) => (float[2, 3] y) {
  y = Gelu(x)
}""", 18)
    assert any("Gelu" in p and "not an operator" in p for p in check_model(model))
    model = _opset("""
g (float[2, 3] x) => (float[2, 3] y) {
  y = Cast(x)
}""", 18)
    assert any("lacks required attribute 'to'" in p for p in check_model(model))


def test_verifier_accepts_onnxruntime_default_domain_ops_and_other_domains():
    model = _opset("""
g (float[2, 3] x, float[3] w) => (float[2, 3] y, float[2, 3] z) {
  y = SimplifiedLayerNormalization <axis = -1> (x, w)
  z = com.microsoft.FastGelu <anything = 1> (x)
}""", 14)
    model.opset_imports["com.microsoft"] = 1
    assert check_model(model) == []


def test_pass_manager_names_the_pass_that_wrote_an_invalid_node():
    from onnxc import pass_manager as pm
    from onnxc.errors import PassError

    class WriteShapeSlice(pm.Pass):
        name = "write-shape-slice"

        def run(self, model, ctx):
            x = model.graph.inputs[0]
            node = ir.node("Shape", [x], attributes={"start": 1}, name="bad_shape")
            model.graph.append(node)
            return pm.PassResult(model, True, {})

    model = _opset(CHAIN, 14)
    with pytest.raises(PassError, match=r"write-shape-slice.*Shape 'bad_shape' \(opset 14"):
        pm.PassManager([WriteShapeSlice()]).run(model, pm.PassContext(level=1))


SEQ = """
g (float[2, 6] x) => (float[2, 3] y) {
  seq = SplitToSequence<axis=1>(x, sizes)
  y = SequenceAt(seq, zero)
}"""


def _seq_model() -> ir.Model:
    import numpy as np
    return parse(SEQ, {"sizes": np.array([3, 3], np.int64), "zero": np.array(0, np.int64)})


def test_verifier_accepts_a_sequence_typed_as_one():
    model = _seq_model()
    seq = next(n for n in model.graph if n.op_type == "SplitToSequence").outputs[0]
    seq.type = ir.SequenceType(ir.TensorType(ir.DataType.FLOAT))
    assert check_model(model) == []


def test_verifier_rejects_a_sequence_typed_as_a_tensor():
    """What onnx-ir's shape inference wrote for the raw dynamo export's torch.split: onnxruntime refuses the model
    ("expected seq(tensor(float))"); the verifier says so at the pass boundary."""
    model = _seq_model()
    seq = next(n for n in model.graph if n.op_type == "SplitToSequence").outputs[0]
    seq.type = ir.TensorType(ir.DataType.FLOAT)
    problems = check_model(model)
    assert any("output 0 'seq' is typed tensor(float), but the schema gives a seq there" in p for p in problems), \
        problems
    assert any("SequenceAt" in p and "input 0 'seq'" in p for p in problems), problems


def test_verifier_rejects_one_type_constraint_bound_to_two_element_types():
    model = parse(CHAIN)
    add = next(n for n in model.graph if n.op_type == "Add")
    add.inputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
    problems = check_model(model)
    assert any("Add" in p and "is typed tensor(float)" in p and "of the same type T is tensor(float16)" in p
               for p in problems), problems


def test_verifier_rejects_an_element_type_the_schema_does_not_allow():
    model = parse(CHAIN)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].type = ir.TensorType(ir.DataType.STRING)
    problems = check_model(model)
    assert any("Relu" in p and "typed tensor(string), which the schema does not allow" in p for p in problems), \
        problems
