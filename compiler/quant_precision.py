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


def dequantized_rtn(site: Site, block: int, symmetric: bool, bits: int = 4) -> np.ndarray:
    """The site's W (K, N) after round-to-nearest at `bits`, dequantized (float32; column chunks of a few MiB)."""
    w = site.load()
    k, n = site.shape
    out = np.empty((k, n), np.float32)
    step = max(1, TABLE_ROWS * 64 // max(k, 1))
    for c0 in range(0, n, step):
        x = np.ascontiguousarray(w[:, c0:c0 + step], np.float32)
        b, sc, z = kq.quantize(x, "rtn", block, symmetric, bits=bits)
        out[:, c0:c0 + x.shape[1]] = dequantize(b, sc, z, K=k, N=x.shape[1], bits=bits, block_size=block)
    return out


def _rel_error(site: Site, block: int, symmetric: bool, bits: int = 4) -> float:
    """||W - Q(W)|| / ||W|| under round-to-nearest at (bits, block), read in column chunks."""
    w = site.load()
    k, n = site.shape
    sq, ref = 0.0, 0.0
    step = max(1, TABLE_ROWS * 64 // max(k, 1))   # column chunks: a few MiB at a time, never the whole copy
    for c0 in range(0, n, step):
        x = np.ascontiguousarray(w[:, c0:c0 + step], np.float32)
        b, sc, z = kq.quantize(x, "rtn", block, symmetric, bits=bits)
        sq += float(np.square(dequantize(b, sc, z, K=k, N=x.shape[1], bits=bits, block_size=block) - x).sum())
        ref += float(np.square(x).sum())
    return (sq / max(ref, 1e-30)) ** 0.5


@dataclass
class LayerChoice:
    """One weight's precision under mixed precision, and why (the report lists them)."""

    name: str
    shape: tuple[int, int]          # (K, N)
    bits: int
    block_size: int
    error: float                    # relative weight-space error of int4 round-to-nearest, ||W - Q(W)|| / ||W||
    reason: str                     # "logits", "output error rank N", "error rank N", "int4", "over budget"
    output_error: float | None = None   # the model's relative output error with this weight alone int4 (sensitivity)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bits": self.bits, "block_size": self.block_size,
                "int4_rel_error": round(self.error, 5),
                **({"int4_output_error": float(f"{self.output_error:.4g}")} if self.output_error is not None else {}),
                "reason": self.reason}


def choose_bits(sites: list[Site], blocks: dict[tuple, int], logits: set[tuple], opts: QuantOptions,
                output_error: dict[tuple, float] | None = None) -> dict[tuple, LayerChoice]:
    """Mixed precision: which weights keep HIGH_BITS, within opts.mixed_budget times the all-int4 bytes.

    Each weight's relative error under int4 round-to-nearest is measured (weight space; blocks with outliers lose
    the most). With `output_error` (compiler/sensitivity.py: the model's output error with that weight alone at
    int4, on synthetic inputs), weights are promoted by decreasing output error per extra byte, the others (no
    output error measured) after them; a promotion removes about all of a weight's error (8 bits: 256 times less
    squared error), so this is the greedy answer to "least total error within the budget". Without it, the layers
    that produce the logits (`logits`: the lm_head, and a weight that may be a tied embedding table, whose error
    also enters every embedded token) come first and the others follow by decreasing weight-space error. Each is
    promoted while the total stays within the budget."""
    unique = list({s.key: s for s in sites}.values())
    choices: dict[tuple, LayerChoice] = {}
    cost4, cost8 = {}, {}
    for site in unique:
        k, n = site.shape
        block = blocks[site.key]
        sb = 2 if site.dtype == ir.DataType.FLOAT16 else 4
        cost4[site.key] = weight_bytes(k, n, 4, block, opts.symmetric, sb)
        cost8[site.key] = weight_bytes(k, n, HIGH_BITS, block, opts.symmetric, sb)
        err = _rel_error(site, block, opts.symmetric)
        choices[site.key] = LayerChoice(site.name, site.shape, 4, block, err, "int4",
                                        (output_error or {}).get(site.key))
    budget = opts.mixed_budget * sum(cost4.values())
    if opts.mixed_blocks and output_error and all(c.output_error is not None for c in choices.values()):
        return _allocate(unique, choices, blocks, cost4, budget, opts)
    total = sum(cost4.values())
    measured = output_error is not None
    if measured:
        order = sorted(choices, key=lambda key: (choices[key].output_error is None,
                                                 -(choices[key].output_error or 0.0) / (cost8[key] - cost4[key]),
                                                 -choices[key].error))
    else:
        order = sorted(choices, key=lambda key: (key not in logits, -choices[key].error))
    rank = 0
    for key in order:
        c = choices[key]
        first = key in logits and not measured
        if not first:
            rank += 1
        extra = cost8[key] - cost4[key]
        if total + extra > budget:
            c.reason = "over budget" if first else "int4"
            continue
        total += extra
        c.bits = HIGH_BITS
        c.reason = ("logits" if first else
                    f"output error rank {rank}" if c.output_error is not None else f"error rank {rank}")
    return choices


def _allocate(unique: list[Site], choices: dict[tuple, LayerChoice], blocks: dict[tuple, int],
              cost4: dict[tuple, int], budget: float, opts: QuantOptions) -> dict[tuple, LayerChoice]:
    """Mixed precision over (bits, block) options: each weight at HIGH_BITS, at 4 bits with its block, or at 4 bits
    with a wider block of opts.mixed_blocks (fewer scale bytes, freed for other weights' 8 bits).

    An option's output error is estimated from the measured one at 4 bits by the squared ratio of the weight-space
    errors (RTN at that option over RTN at 4 bits with the weight's block). The choice minimizes the total error
    within the budget by a Lagrangian: each weight takes the option of least error + lam * bytes, lam the smallest
    (bisected on a log scale) for which the bytes fit, then the bytes left buy the moves of most error saved per
    byte that still fit. Wider blocks are offered where they divide K (a tied table
    needs whole blocks)."""
    options: dict[tuple, list[tuple[int, int, float, int]]] = {}    # key -> [(bits, block, error, bytes)]
    for site in unique:
        c = choices[site.key]
        k, n = site.shape
        sb = 2 if site.dtype == ir.DataType.FLOAT16 else 4
        base = max(c.error, 1e-12) ** 2
        opt = [(4, c.block_size, c.output_error, cost4[site.key])]
        e8 = _rel_error(site, c.block_size, opts.symmetric, HIGH_BITS) ** 2
        opt.append((HIGH_BITS, c.block_size, c.output_error * e8 / base,
                    weight_bytes(k, n, HIGH_BITS, c.block_size, opts.symmetric, sb)))
        for wide in opts.mixed_blocks:
            if wide > c.block_size and k % wide == 0:
                e = _rel_error(site, wide, opts.symmetric) ** 2
                opt.append((4, wide, c.output_error * e / base, weight_bytes(k, n, 4, wide, opts.symmetric, sb)))
        options[site.key] = opt

    def pick(lam: float) -> dict[tuple, tuple[int, int, float, int]]:
        return {key: min(opt, key=lambda o: (o[2] + lam * o[3], o[3])) for key, opt in options.items()}

    lo, hi = -40.0, 10.0        # log10 lam: at 1e10 every weight takes its fewest bytes
    best = pick(10.0 ** hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        got = pick(10.0 ** mid)
        if sum(o[3] for o in got.values()) <= budget:
            best, hi = got, mid
        else:
            lo = mid
    total = sum(o[3] for o in best.values())
    while True:     # the Lagrangian stops short of the budget: spend what is left on the best error per byte
        moves = [(-(cur[2] - o[2]) / (o[3] - cur[3]), key, o) for key, cur in best.items() for o in options[key]
                 if o[2] < cur[2] and o[3] > cur[3] and total + o[3] - cur[3] <= budget]
        if not moves:
            break
        _, key, o = min(moves, key=lambda m: (m[0], m[2][3]))
        total += o[3] - best[key][3]
        best[key] = o
    promoted = sorted((key for key, o in best.items() if o[0] != 4),
                      key=lambda key: -choices[key].output_error / (best[key][3] - cost4[key]))
    for key, (bits, block, _, _) in best.items():
        c = choices[key]
        c.bits, c.block_size = bits, block
        c.reason = (f"output error rank {promoted.index(key) + 1}" if bits != 4 else
                    f"int4, block {block}: low output error" if block != blocks[key] else "int4")
    return choices
