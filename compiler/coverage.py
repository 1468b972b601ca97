"""Fusion coverage: per fusion family, how many sites the compiled model has, how many were fused, and why each
of the others was not.

A site is counted in the compiled graph, by what it computes, not by which pass looked at it:

- attention: a fused attention op (GroupQueryAttention, MultiHeadAttention, Attention, ONNX Attention), or a
  Softmax left whose probabilities are multiplied by values (MatMul(P, V), through Cast/Where/Reshape); a router's
  Softmax (read by TopK) is no attention site;
- norm: a fused norm (LayerNormalization, SimplifiedLayerNormalization, RMSNormalization and the skip and embed
  forms), or a ReduceMean left over a square (Pow(x, 2) or Mul(x, x)): each LayerNorm or RMSNorm has exactly one;
- skip norm: a norm that reads a residual sum (Add of two computed values) and is not a skip norm, against the skip
  norms fused (SkipLayerNormalization, SkipSimplifiedLayerNormalization);
- gelu: Gelu, FastGelu, BiasGelu, QuickGelu (fused) against Erf left (an erf GELU) and Tanh left inside
  0.5 * x * (1 + tanh(...)) (a tanh GELU).

The reason for a missed attention site is the refusal fuse-gqa noted at its Softmax, then fuse-mha's; other misses name the pass and
rule to ask (`--explain`).
"""
from __future__ import annotations

import re
from typing import Any

import onnx_ir as ir

ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedAttention",
                           "PackedMultiHeadAttention", "SparseAttention"})
NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})
SKIP_NORM_OPS = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
EMBED_NORM_OPS = frozenset({"EmbedLayerNormalization"})
GELU_OPS = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasFastGelu"})
PASSTHROUGH = frozenset({"Cast", "Where", "Dropout", "Identity", "Reshape"})   # BLOOM/DeBERTa merge heads first
_NOTE = re.compile(r"^fuse-(?P<pass>gqa|mha): attention at (?P<site>.+?) not fused: (?P<reason>.*)$")
FAMILIES = ("attention", "norm", "skip_norm", "gelu")


class Refusal(Exception):
    """A site a fusion leaves as it is, with the reason (one line): what coverage reports for the site."""


def _readers(v: ir.Value) -> list[ir.Node]:
    return [n for n, _ in v.uses()]


def _feeds_value_product(sm: ir.Node, depth: int = 3) -> bool:
    """Softmax output reaches MatMul as its first operand, through at most `depth` Cast/Where/Reshape."""
    frontier = [sm.outputs[0]]
    for _ in range(depth + 1):
        nxt = []
        for v in frontier:
            for n, i in v.uses():
                if n.op_type == "MatMul" and i == 0:
                    return True
                if n.op_type in PASSTHROUGH and n.outputs:
                    nxt.append(n.outputs[0])
        frontier = nxt
    return False


def _is_square(v: ir.Value | None) -> bool:
    p = v.producer() if v is not None else None
    if p is None:
        return False
    if p.op_type == "Pow":
        e = p.inputs[1].const_value if len(p.inputs) > 1 and p.inputs[1] is not None else None
        return e is not None and e.numpy().size == 1 and float(e.numpy().reshape(-1)[0]) == 2.0
    return p.op_type == "Mul" and p.inputs[0] is p.inputs[1]


def _computed(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is None and (v.producer() is not None or v.is_graph_input())


def _residual(v: ir.Value | None) -> bool:
    """v is Add(a, b) of two computed values (a residual sum; a bias Add has a constant operand)."""
    p = v.producer() if v is not None else None
    return p is not None and p.op_type == "Add" and len(p.inputs) == 2 and all(_computed(i) for i in p.inputs)


def _tanh_gelu(t: ir.Node) -> bool:
    """Tanh whose output is 1 + tanh(...), multiplied on (the GELU's shape, either operand order)."""
    return any(n.op_type == "Add" and any(m.op_type == "Mul" for m in _readers(n.outputs[0]))
               for n in _readers(t.outputs[0]))


def noted_miss(note: str) -> tuple[str | None, str | None]:
    """(site, reason) of a pass note recording an attention site left unfused, (None, None) for other notes."""
    m = _NOTE.match(note)
    return (m["site"], m["reason"]) if m else (None, None)


def measure(model: ir.Model, notes: list[str]) -> dict[str, dict[str, Any]]:
    """{family: {"found": N, "fused": M, "misses": [{"site": name, "reason": text}, ...]}} for the compiled graph."""
    reasons: dict[str, str] = {}
    for note in notes:       # each attention fusion's reason, named by the op it would have written
        site, reason = noted_miss(note)
        if site is not None:
            op = "MultiHeadAttention" if note.startswith("fuse-mha") else "GroupQueryAttention"
            reasons[site] = f"{reasons[site]}; {op}: {reason}" if site in reasons else f"{op}: {reason}"
    out = {f: {"found": 0, "fused": 0, "misses": []} for f in FAMILIES}

    def miss(family: str, node: ir.Node, reason: str) -> None:
        out[family]["found"] += 1
        out[family]["misses"].append({"site": node.name or f"<{node.op_type}>", "reason": reason})

    def fused(family: str) -> None:
        out[family]["found"] += 1
        out[family]["fused"] += 1

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = node.op_type
        ms = node.domain in ("com.microsoft", "")
        if ms and op in ATTENTION_OPS:
            fused("attention")
        elif op == "Softmax" and node.domain == "" and _feeds_value_product(node):
            miss("attention", node, reasons.get(node.name or "", "no attention fusion recognized it "
                                                "(--explain fuse-attention, fuse-gqa)"))
        if ms and op in SKIP_NORM_OPS:
            fused("norm")
            fused("skip_norm")
        elif ms and op in EMBED_NORM_OPS:
            fused("norm")
        elif ms and op in NORM_OPS:
            fused("norm")
            if _residual(node.inputs[0]):
                miss("skip_norm", node, "the norm reads a residual sum that fuse-skip-norm did not take "
                                        "(--explain skip-layer-norm, skip-simplified-layer-norm)")
        elif op == "ReduceMean" and node.domain == "" and _is_square(node.inputs[0]):
            miss("norm", node, "no norm rule matched this mean of squares (--explain layer-norm, rms-norm)")
        if ms and op in GELU_OPS:
            fused("gelu")
        elif op == "Erf" and node.domain == "":
            miss("gelu", node, "no GELU rule matched this Erf (--explain fuse-gelu-erf)")
        elif op == "Tanh" and node.domain == "" and _tanh_gelu(node):
            miss("gelu", node, "no GELU rule matched this tanh approximation (--explain fuse-gelu-tanh)")
    return out


def lines(coverage: dict[str, dict[str, Any]], limit: int = 8) -> list[str]:
    """Human lines: one per family with sites, then one per miss (at most `limit` per family, then a count)."""
    label = {"attention": "attention", "norm": "norms", "skip_norm": "skip norms", "gelu": "GELU"}
    rows = []
    for family in FAMILIES:
        c = coverage.get(family)
        if not c or not c["found"]:
            continue
        rows.append(f"{label[family]}: {c['fused']} of {c['found']} sites fused")
        for m in c["misses"][:limit]:
            rows.append(f"  not fused: {m['site']}: {m['reason']}")
        if len(c["misses"]) > limit:
            rows.append(f"  ... and {len(c['misses']) - limit} more")
    return rows
