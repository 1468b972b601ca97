"""canonicalize-attention-key: the key of a self-attention in the form fuse-attention reads

With heads(k) = Transpose(Reshape(k, (B, S, N, H)), (0, 2, 1, 3)) and K = heads(k) or Concat(past, heads(k)):

    Reshape(Transpose(Reshape(K, (-1, T, H)), (0, 2, 1)), (B, N, H, T))  ->  Transpose(K, (0, 1, 3, 2))
                                                                               attention-key-transpose
    Shape(K)  ->  Concat(Shape(x)[0], N, [Shape(past)[2] +] Shape(x)[1], H)       attention-key-shape

The first is dynamo's K^T: its reshapes are proved (from inferred or symbolic shapes) to swap the last two axes,
and it is rewritten only where K is a head split feeding an attention Softmax. The second rebuilds the shape the
exporter's plumbing (masks, K^T's targets) reads from the key out of Shape(x) of the projection input x (and of the
past), so no value inside the attention has a reader outside it (the rule engine refuses a match whose
intermediate values have outside users). Dead nodes they leave are dropped.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxc.attention_parts import (checked, feeds_softmax, key_parts, projection_source, same, split_heads,
                                   unique_names)
from onnxc.coverage import Refusal
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import Rule, apply_rules
from onnxc.shapes import dims_of, sym_value


def pattern_key_transpose(op, key, r1, r2):
    return op.Reshape(op.Transpose(op.Reshape(key, r1, _name="r1"), perm=[0, 2, 1]), r2)


@checked
def check_key_transpose(m):
    kd, mid, out = dims_of(m["key"]), dims_of(m.node("r1").outputs[0]), dims_of(m.outputs[0])
    if kd is None or len(kd) != 4:
        raise Refusal("key is not 4-D")
    want = (kd[0], kd[1], kd[3], kd[2])
    ok_mid = mid is not None and len(mid) == 3 and same(mid[1], kd[2]) and same(mid[2], kd[3])
    t1, t2 = sym_value(m["r1"]), sym_value(m["r2"])
    if not ok_mid and t1 is not None and len(t1) == 3:
        ok_mid = t1[0] == -1 and same(t1[1], kd[2]) and same(t1[2], kd[3])
    ok_out = out is not None and len(out) == 4 and all(same(a, b) for a, b in zip(out, want))
    if not ok_out and t2 is not None and len(t2) == 4:
        ok_out = sum(x == -1 for x in t2) <= 1 and all(x == -1 or same(x, w) for x, w in zip(t2, want))
    if not (ok_mid and ok_out):
        raise Refusal("cannot prove the reshapes around the transpose swap the last two axes of the key")
    key_parts(m["key"])
    if not feeds_softmax(m.outputs[0]):
        raise Refusal("the transposed key does not feed an attention Softmax")


def rewrite_key_transpose(op, key):
    out = op.Transpose(key, perm=[0, 1, 3, 2])
    unique_names(op)
    return out


@checked
def check_key_shape(m):
    k, reshape, past = key_parts(m["key"])
    n, h, _ = split_heads(reshape, "key")
    k = projection_source(k)
    if len(dims_of(k) or ()) != 3:
        raise Refusal("the key's projection input is not (batch, sequence, hidden)")
    if not any(feeds_softmax(u.node.outputs[0]) for u in m["key"].uses() if u.node.op_type == "Transpose") \
            and not any(feeds_softmax(v) for u in m["key"].uses() for v in u.node.outputs
                        if u.node.op_type == "Reshape"):
        raise Refusal("the key does not feed an attention Softmax")
    start, end = m.attr("shape", "start", 0), m.attr("shape", "end", None)
    return {"k": k, "past": past, "num_heads": n, "head_size": h, "start": start, "end": end}


def rewrite_key_shape(op, k, past, num_heads, head_size, start, end):
    """Shape(key) = (B, N, [P +] S, H) from Shape(k) = (B, S, D) (and Shape(past) = (B, N, P, H))."""
    seq = op.Shape(k, start=1, end=2)
    if past is not None:
        seq = op.Add(op.Shape(past, start=2, end=3), seq)
    parts = [op.Shape(k, start=0, end=1), op.const(np.array([num_heads], np.int64)), seq,
             op.const(np.array([head_size], np.int64))]
    out = op.Concat(*parts[slice(start, end)], axis=0)
    unique_names(op)
    return out


key_transpose = Rule("attention-key-transpose", pattern_key_transpose, rewrite_key_transpose,
                     check_key_transpose,
                     summary="Reshape(Transpose(Reshape(K, (-1,T,H)), (0,2,1)), (B,N,H,T)) -> Transpose(K, (0,1,3,2))")


key_shape = Rule("attention-key-shape", lambda op, key: op.Shape(key, _name="shape"), rewrite_key_shape,
                 check_key_shape, summary="Shape(heads(k)) -> (B, N, S, H) from Shape(k), so the key's shape is "
                                          "read outside the attention (exporters size masks and Kt from it)")


def _drop_dead(graph: ir.Graph) -> None:
    """Remove nodes none of whose outputs is used (what the key-transpose rewrite leaves behind)."""
    for node in reversed(list(graph)):
        if not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)


RULES = [key_transpose, key_shape]


@register_pass
class CanonicalizeAttentionKey(Pass):
    """Dynamo's K^T and Shape(K) read outside the attention -> Transpose(K) and Shape of the projection input."""

    name = "canonicalize-attention-key"
    level = 2
    targets = ("cpu", "cuda")

    def rules(self):
        return RULES

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        counts = dict(apply_rules(model, RULES, disabled=ctx.disabled_rules).applied)
        if counts:
            _drop_dead(model.graph)
        return PassResult(model, bool(counts), counts)
