"""Mixed precision: which weights keep HIGH_BITS within a size budget (choose_bits), and what a weight costs in
MatMulNBits' layout (weight_bytes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxc.kernels import quantize as kq
from onnxc.kernels.matmul_nbits import dequantize

from .quant_options import HIGH_BITS, QuantOptions
from .quant_sites import TABLE_ROWS, Site


def weight_bytes(k: int, n: int, bits: int, block: int, symmetric: bool, scale_bytes: int) -> int:
    """Bytes of one MatMulNBits weight: codes, scales and (asymmetric) packed zero points."""
    kb = -(-k // block)
    return n * kb * block * bits // 8 + n * kb * scale_bytes + (0 if symmetric else n * (-(-kb * bits // 8)))


@dataclass
class LayerChoice:
    """One weight's precision under mixed precision, and why (the report lists them)."""

    name: str
    shape: tuple[int, int]          # (K, N)
    bits: int
    block_size: int
    error: float                    # relative weight-space error of int4 round-to-nearest, ||W - Q(W)|| / ||W||
    reason: str                     # "logits" (lm_head or tied table), "error rank N", "int4", "over budget"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bits": self.bits, "block_size": self.block_size,
                "int4_rel_error": round(self.error, 5), "reason": self.reason}


def choose_bits(sites: list[Site], blocks: dict[tuple, int], logits: set[tuple], opts: QuantOptions
                ) -> dict[tuple, LayerChoice]:
    """Mixed precision: which weights keep HIGH_BITS, within opts.mixed_budget times the all-int4 bytes.

    Sensitivity is measured without data: each weight's relative error under int4 round-to-nearest (blocks with
    outliers lose the most). The layers that produce the logits (`logits`: the lm_head, and a weight that may be a
    tied embedding table, whose error also enters every embedded token) come first; the others follow by
    decreasing error. Each is promoted while the total stays within the budget."""
    unique = list({s.key: s for s in sites}.values())
    choices: dict[tuple, LayerChoice] = {}
    cost4, cost8 = {}, {}
    for site in unique:
        k, n = site.shape
        block = blocks[site.key]
        sb = 2 if site.dtype == ir.DataType.FLOAT16 else 4
        cost4[site.key] = weight_bytes(k, n, 4, block, opts.symmetric, sb)
        cost8[site.key] = weight_bytes(k, n, HIGH_BITS, block, opts.symmetric, sb)
        w = site.load()
        sq, ref = 0.0, 0.0
        step = max(1, TABLE_ROWS * 64 // max(k, 1))   # column chunks: a few MiB at a time, never the whole copy
        for c0 in range(0, n, step):
            x = np.ascontiguousarray(w[:, c0:c0 + step], np.float32)
            b, sc, z = kq.quantize(x, "rtn", block, opts.symmetric)
            sq += float(np.square(dequantize(b, sc, z, K=k, N=x.shape[1], bits=4, block_size=block) - x).sum())
            ref += float(np.square(x).sum())
        del w
        err = (sq / max(ref, 1e-30)) ** 0.5
        choices[site.key] = LayerChoice(site.name, site.shape, 4, block, err, "int4")
    budget = opts.mixed_budget * sum(cost4.values())
    total = sum(cost4.values())
    order = sorted(choices, key=lambda key: (key not in logits, -choices[key].error))
    rank = 0
    for key in order:
        c = choices[key]
        if key not in logits:
            rank += 1
        extra = cost8[key] - cost4[key]
        if total + extra > budget:
            c.reason = "over budget" if key in logits else "int4"
            continue
        total += extra
        c.bits = HIGH_BITS
        c.reason = "logits" if key in logits else f"error rank {rank}"
    return choices
