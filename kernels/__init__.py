"""Numpy reference implementations of the ONNX Runtime contrib ops onnxc emits.

One module per op family (norms, activations, attention, group_query_attention, rotary, matmul_nbits,
gather_block_quantized, quantize_linear); import the functions from those modules. Each reference takes the node's inputs
positionally in ONNX order (None for an absent optional input) and its attributes as keyword arguments with the
ONNX names and defaults; it returns one array for a single-output op and a tuple, in ORT's output order, otherwise.
`run_node` evaluates a node through that contract.

Pure numpy (plus ml_dtypes for int4), float32 compute, outputs in the input dtype. docs/kernels.md lists what each
reference has been checked against in ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import (activations, attention, gather_block_quantized, group_query_attention, matmul_nbits, norms,
               quantize_linear, rotary)

MS = "com.microsoft"

REFERENCE: dict[tuple[str, str], Callable] = {
    ("", "SimplifiedLayerNormalization"): norms.simplified_layer_norm,
    ("", "LayerNormalization"): norms.layer_norm,
    ("", "Gelu"): activations.gelu,
    (MS, "SkipSimplifiedLayerNormalization"): norms.skip_simplified_layer_norm,
    (MS, "SkipLayerNormalization"): norms.skip_layer_norm,
    (MS, "EmbedLayerNormalization"): norms.embed_layer_norm,
    (MS, "Gelu"): activations.gelu,
    (MS, "BiasGelu"): activations.bias_gelu,
    (MS, "FastGelu"): activations.fast_gelu,
    (MS, "QuickGelu"): activations.quick_gelu,
    (MS, "Attention"): attention.attention,
    (MS, "MultiHeadAttention"): attention.multi_head_attention,
    (MS, "GroupQueryAttention"): group_query_attention.group_query_attention,
    (MS, "RotaryEmbedding"): rotary.rotary_embedding,
    (MS, "MatMulNBits"): matmul_nbits.matmul_nbits,
    (MS, "GatherBlockQuantized"): gather_block_quantized.gather_block_quantized,
    ("", "QuantizeLinear"): quantize_linear.quantize_linear,
    ("", "DequantizeLinear"): quantize_linear.dequantize_linear,
    ("", "DynamicQuantizeLinear"): quantize_linear.dynamic_quantize_linear,
    ("", "MatMulInteger"): quantize_linear.matmul_integer,
    (MS, "DynamicQuantizeMatMul"): quantize_linear.dynamic_quantize_matmul,
}


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def run_node(op_type: str, domain: str, inputs: Sequence[np.ndarray | None], attrs: dict | None = None
             ) -> list[np.ndarray | None]:
    """Evaluate one node by reference: inputs in ONNX order (None = absent), attrs by ONNX name.

    Trailing absent inputs may be omitted. Returns all of the op's outputs as a list, in ORT's order (an output
    the op does not produce for these inputs is None). Raises KeyError for an op without a reference and
    TypeError for an attribute the reference does not know.
    """
    key = (_domain(domain), op_type)
    if key not in REFERENCE:
        raise KeyError(f"no reference kernel for {domain or 'ai.onnx'}::{op_type}")
    args = list(inputs)
    while args and args[-1] is None:
        args.pop()
    kwargs = {k: v.decode() if isinstance(v, bytes) else v for k, v in (attrs or {}).items()}
    out = REFERENCE[key](*args, **kwargs)
    return list(out) if isinstance(out, tuple) else [out]


__all__ = [
    "REFERENCE",
    "activations",
    "attention",
    "gather_block_quantized",
    "group_query_attention",
    "matmul_nbits",
    "norms",
    "quantize_linear",
    "rotary",
    "run_node",
]
