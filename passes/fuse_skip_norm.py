"""fuse-skip-norm

    s = a + b                         (optionally a = h + bias, bias a constant vector: the projection's bias)
    LayerNormalization(s, g, beta?)       ->  SkipLayerNormalization(input, skip, g, beta?, bias?, epsilon)
    SimplifiedLayerNormalization(s, g)    ->  SkipSimplifiedLayerNormalization(input, skip, g, bias?, epsilon)
    rules: skip-layer-norm(-bias), skip-simplified-layer-norm(-bias)

When s is used elsewhere (the next residual Add) it becomes the fused op's 4th output, input_skip_bias_sum; the
2nd and 3rd outputs (mean, inv_std_var) are then unnamed placeholders, which ORT leaves unwritten. In a decoder layer,
r1 = x + attn_out; n1 = RMSNorm(r1); r2 = r1 + mlp_out; n2 = RMSNorm(r2) ...: every norm after the first of the model
becomes a skip norm exporting its sum. Run after fuse-layer-norm and fuse-rms-norm.

Requires (what ORT's kernels accept, checked on onnxruntime 1.31.1 CPU; docs/kernels.md):
  - the norm normalizes the last axis only; s is 2-D or 3-D (the kernels reject other ranks);
  - a, b and s share one static hidden size H (the kernels never broadcast H); g, beta are 1-D of size H; the bias
    is a constant with H elements (made 1-D);
  - skip broadcasts to input: ORT's output has input's shape and reads skip modulo its size, so a skip larger than
    input silently gives a wrong result. Accepted: the leading dims are proved equal dim by dim (onnxc.shapes.same_dim:
    the same name, or producer chains that keep the dim and meet -- elementwise ops, MatMul by a matrix, norms and
    fused attention, Transpose, Reshape elements that copy a dim or read it from Shape(v), as an attention output's
    head merge does), or skip is (1, S, H) / (S, H) under an input (B, S, H). Unprovable sites are refused;
  - one dtype for a, b, g, beta, bias and the result;
  - a sum of embedding lookups (Gather of a constant table, e.g. BERT's word + position + token type) is left for
    EmbedLayerNormalization.
Epsilon is always written (the Skip kernels default to 1e-12, LayerNormalization to 1e-5).
Reference: kernels/norms.skip_layer_norm, kernels/norms.skip_simplified_layer_norm.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.domains import MS
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, const_tensor
from onnxc.shapes import dims_of, same_dim



# ---------------------------------------------------------------------------------------------------- shape proofs
def same_rows(a: ir.Value, b: ir.Value) -> bool:
    """a and b provably have the same rank and leading dims (all but the last), dim by dim (onnxc.shapes.same_dim:
    equal named dims, or chains of shape-keeping producers that meet)."""
    da, db = dims_of(a), dims_of(b)
    if da is None or db is None or len(da) != len(db) or not da:
        return False
    memo: dict = {}
    return all(same_dim(a, i, b, i, memo=memo) for i in range(len(da) - 1))


def _orient(a: ir.Value, b: ir.Value) -> tuple[ir.Value, ir.Value] | str:
    """(input, skip) such that skip broadcasts to input the way ORT's Skip kernels allow, or why not."""
    da, db = dims_of(a), dims_of(b)
    if da is None or db is None:
        return "rank of an operand of the sum is unknown"
    if len(da) == len(db) and same_rows(a, b):
        return a, b
    for x, y, dx, dy in ((a, b, da, db), (b, a, db, da)):
        if len(dx) == 3 and dy[:-1] in ((1, dx[1]), (dx[1],)):
            return x, y
    return f"cannot prove that one operand broadcasts to the other as skip (dims {da} and {db})"


def _embedding(v: ir.Value, depth: int = 3) -> bool:
    """v is an embedding lookup (Gather from a constant table) or a sum of them."""
    p = v.producer()
    if p is None or p.domain != "" or depth == 0:
        return False
    if p.op_type == "Gather":
        return const_tensor(p.inputs[0]) is not None
    return p.op_type == "Add" and all(x is not None and _embedding(x, depth - 1) for x in p.inputs)


# ---------------------------------------------------------------------------------------------------- patterns
def _ln(op, a, b, g):
    s = op.Add(a, b)
    return op.LayerNormalization(s, g, _allow_other_inputs=True, _name="norm", axis=Attr("axis", -1),
                                 epsilon=Attr("epsilon", 1e-5)), s


def _ln_bias(op, a, bias, b, g):
    s = op.Add(op.Add(a, bias), b)
    return op.LayerNormalization(s, g, _allow_other_inputs=True, _name="norm", axis=Attr("axis", -1),
                                 epsilon=Attr("epsilon", 1e-5)), s


def _sln(op, a, b, g):
    s = op.Add(a, b)
    return op.SimplifiedLayerNormalization(s, g, _name="norm", axis=Attr("axis", -1),
                                           epsilon=Attr("epsilon", 1e-5)), s


def _sln_bias(op, a, bias, b, g):
    s = op.Add(op.Add(a, bias), b)
    return op.SimplifiedLayerNormalization(s, g, _name="norm", axis=Attr("axis", -1),
                                           epsilon=Attr("epsilon", 1e-5)), s


# ---------------------------------------------------------------------------------------------------- check
def _check(m):
    s, y = m.outputs[1], m.outputs[0]
    ds = dims_of(s)
    if ds is None or len(ds) not in (2, 3):
        return m.fail(f"ORT's skip norms take 2-D or 3-D input, the sum has dims {ds}")
    hidden, rank = ds[-1], len(ds)
    if not isinstance(hidden, int):
        return m.fail(f"hidden size (last dim {hidden}) is not static")
    if m["axis"] % rank != rank - 1:
        return m.fail(f"the norm's axis {m['axis']} is not the last")
    for name in ("a", "b"):
        d = dims_of(m[name])
        if d is None or not d or d[-1] != hidden:
            return m.fail(f"operand's last dim is not the hidden size {hidden} (dims {d})", name)
    norm = m.node("norm")
    beta = norm.inputs[2] if len(norm.inputs) > 2 else None
    for v, what in ((m["g"], "gamma"), (beta, "beta")):
        if v is not None and dims_of(v) != (hidden,):
            return m.fail(f"{what} of dims {dims_of(v)} is not 1-D of size {hidden}")
    found = {"epsilon": float(m["epsilon"]), "beta": beta, "bias_array": None}
    if "bias" in m.binds:
        bias = m.const("bias")
        if bias is None or bias.size != hidden or any(d != 1 for d in bias.shape[:-1]):
            return m.fail("bias is not a constant vector of the hidden size", "bias")
        if dims_of(m["bias"]) != (hidden,):
            found["bias_array"] = np.ascontiguousarray(bias.reshape(-1))
    dtypes = {v.dtype for v in (m["a"], m["b"], m["g"], beta, m.binds.get("bias"), y) if v is not None}
    if len(dtypes) != 1 or None in dtypes:
        return m.fail(f"operands have different or unknown dtypes {sorted(str(d) for d in dtypes)}")
    if _embedding(m["a"]) and _embedding(m["b"]):
        return m.fail("a sum of embedding lookups is left for EmbedLayerNormalization")
    oriented = _orient(m["a"], m["b"])
    if isinstance(oriented, str):
        return m.fail(oriented, "a", "b")
    found["input"], found["skip"] = oriented
    found["export"] = s.is_graph_output() or any(u.node is not norm for u in s.uses())
    return found


# ---------------------------------------------------------------------------------------------------- rewrites
def _fused(op, op_type: str, inputs: list, epsilon: float, export: bool):
    while inputs[-1] is None:
        inputs.pop()
    if not export:
        return getattr(op, op_type)(*inputs, epsilon=epsilon, _domain=MS), None
    y, mean, inv_std, total = getattr(op, op_type)(*inputs, epsilon=epsilon, _domain=MS, _outputs=4)
    mean.name = inv_std.name = ""  # optional outputs left out
    return y, total


def _bias(op, bias, bias_array):
    return op.const(bias_array, "bias") if bias_array is not None else bias


def _rewrite_ln(op, input, skip, g, beta, epsilon, export, bias=None, bias_array=None):
    return _fused(op, "SkipLayerNormalization", [input, skip, g, beta, _bias(op, bias, bias_array)], epsilon, export)


def _rewrite_sln(op, input, skip, g, epsilon, export, bias=None, bias_array=None):
    return _fused(op, "SkipSimplifiedLayerNormalization", [input, skip, g, _bias(op, bias, bias_array)], epsilon,
                  export)


RULES = [
    Rule("skip-layer-norm", _ln, _rewrite_ln, _check, summary="LayerNorm(a + b) -> SkipLayerNormalization"),
    Rule("skip-layer-norm-bias", _ln_bias, _rewrite_ln, _check,
         summary="LayerNorm(a + bias + b) -> SkipLayerNormalization(a, b, bias=bias)"),
    Rule("skip-simplified-layer-norm", _sln, _rewrite_sln, _check,
         summary="RMSNorm(a + b) -> SkipSimplifiedLayerNormalization"),
    Rule("skip-simplified-layer-norm-bias", _sln_bias, _rewrite_sln, _check,
         summary="RMSNorm(a + bias + b) -> SkipSimplifiedLayerNormalization(a, b, bias=bias)"),
]

register_pass(RulePass("fuse-skip-norm", RULES, level=2, targets=("cpu", "cuda"),
                       summary="Residual Add (+ bias) + LayerNorm/RMSNorm -> Skip(Simplified)LayerNormalization, "
                               "exporting the sum"))
