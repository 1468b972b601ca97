"""fuse-transposed-matmul

    MatMul(x, Transpose(W, [1, 0]))  ->  FusedMatMul(x, W; transB = 1)        (com.microsoft)
    rule: matmul-transposed-weight                  W a constant 2-D table that something else reads too

A tied lm_head reads the embedding table E (V, H) as E^T through a Transpose, while the embedding Gather reads E.
Folding the Transpose (what fold-constants does for an unshared weight) would store a second, transposed copy of
the largest tensor in the model (on a 1B-parameter model with a 128K vocabulary, 1 GB in float32); leaving the
node makes onnxruntime fold it at load, the same copy in memory. FusedMatMul reads E as it is stored: the product
is the same sum over H, computed by the same GEMM with B transposed. The quantizer then finds the tie by identity
(the same initializer), not by comparing bytes.

    MatMul(x, W)  ->  FusedMatMul(x, E; transB = 1)                           (com.microsoft)
    rule: matmul-tied-copy                          W = E^T bit for bit, E a table some Gather reads

The TorchScript exporter folds the tied lm_head's Transpose itself: the input model stores E and a copy E^T, and
the MatMul reads the copy. Where W's bytes are exactly E's transposed (compared block by block, never both whole),
reading E instead lets the copy go.

Requires: W a constant of rank 2 with a use besides this Transpose (first rule), or read by this MatMul alone and
equal to a Gather table transposed (second); perm [1, 0] (or absent); x of rank >= 2 when known. fold-constants
leaves such Transposes unfolded (an unshared W is folded into W^T instead).
"""
from __future__ import annotations

from onnxc.domains import MS
from onnxc.ir import transposed_equal
from onnxc.pass_manager import RulePass, register_pass
from onnxc.rules import Attr, Rule, attr_value, const_tensor, read_elsewhere
from onnxc.shapes import dims_of



def pattern(op, x, w):
    return op.MatMul(x, op.Transpose(w, perm=Attr("perm"), _name="t"), _name="mm")


def check(m):
    w, perm = m["w"], m["perm"]
    t = const_tensor(w)
    if t is None or len(t.shape) != 2:
        return m.fail("the transposed weight is not a constant 2-D tensor", "w")
    if perm is not None and list(perm) != [1, 0]:
        return m.fail(f"perm {list(perm)} is not [1, 0]")
    if not read_elsewhere(w):
        return m.fail("the weight has no other use (fold-constants folds the Transpose instead)", "w")
    dx = dims_of(m["x"])
    if dx is not None and len(dx) < 2:
        return m.fail(f"the input has rank {len(dx)}", "x")
    return None


def rewrite(op, x, w):
    return op.FusedMatMul(x, w, transB=1, alpha=1.0, _domain=MS)


def copy_pattern(op, x, w):
    return op.MatMul(x, w, _name="mm")


def copy_check(m):
    """W (K, N) a constant read by this MatMul alone, equal to E^T for an embedding table E (N, K) some Gather reads."""
    w = m["w"]
    t = const_tensor(w)
    if t is None or len(t.shape) != 2 or read_elsewhere(w):
        return m.fail("the weight is not a constant 2-D tensor read here alone", "w")
    dx = dims_of(m["x"])
    if dx is not None and len(dx) < 2:
        return m.fail(f"the input has rank {len(dx)}", "x")
    want = tuple(int(d) for d in t.shape)[::-1]
    graph = m.nodes[0].graph
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or attr_value(node, "axis", default=0):
            continue
        e = const_tensor(node.inputs[0])
        if e is not None and e.dtype == t.dtype and tuple(int(d) for d in e.shape) == want and \
                transposed_equal(e, t):
            return {"table": node.inputs[0]}
    return m.fail("no embedding table equals the weight transposed", "w")


def copy_rewrite(op, x, table):
    return op.FusedMatMul(x, table, transB=1, alpha=1.0, _domain=MS)


RULES = [Rule("matmul-transposed-weight", pattern, rewrite, check,
              summary="MatMul(x, Transpose(W)) -> FusedMatMul(x, W, transB=1) for a shared constant W"),
         Rule("matmul-tied-copy", copy_pattern, copy_rewrite, copy_check,
              summary="MatMul(x, W) with W a stored copy of an embedding table transposed -> FusedMatMul(table)")]

register_pass(RulePass("fuse-transposed-matmul", RULES, level=2,
                       summary="MatMul by a transposed shared table (tied lm_head) -> FusedMatMul transB, no copy"))
