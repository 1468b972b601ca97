"""What `--quantize` asks for: the mode text parsed (parse_quantize) and the compile's options validated
(options_of), before any pass runs.

A mode is SCHEME[:VARIANT]. Each scheme (a weight format) has one parser in SCHEMES that turns the variant into a
QuantMode; adding a format is adding an entry there (and the pass that implements it).

    int4            mixed precision: DEFAULT_METHOD at 4 bits, the most sensitive weights at HIGH_BITS
    int4:uniform    every weight DEFAULT_METHOD at 4 bits
    int4:METHOD     every weight METHOD (kernels/quantize.py METHODS) at 4 bits
    int4:awq[:METHOD]   AWQ's per-channel scales from --calibration folded into the weights' producers
                    (passes/fold_awq_scales.py), then METHOD (DEFAULT_METHOD) at 4 bits
    int8            weight-only 8 bits (MatMulNBits bits = 8)
    int8:dynamic    int8 weights per column, activations quantized per call (DynamicQuantizeMatMul)
    int8:static[:CALIBRATE]   QDQ: activation scales from --calibration by CALIBRATE (kernels/calibrate.py METHODS)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxc.kernels import calibrate as kcal
from onnxc.kernels import quantize as kq

from .errors import UsageError
from .loader import check_regular_file
from .pass_manager import PassContext
from .verify import available_memory

HESSIAN_BUDGET = (128 << 20, 2 << 30)  # float64 Hessians per pass over the calibration: a quarter of the available
                                       # memory, within these bounds (option hessian_budget: bytes)
DEFAULT_METHOD = "lsq"
UNIFORM = "uniform"              # int4:uniform: every layer int4 with DEFAULT_METHOD
AWQ = "awq"                      # int4:awq[:METHOD]: AWQ's scales (compiler/awq.py), then METHOD
MIXED_BUDGET = 1.25              # int4 (mixed): weight bytes at most this times the all-int4 bytes
HIGH_BITS = 8                    # the precision of the layers mixed precision keeps
MIXED_BLOCKS = (64, 128)         # wider 4-bit blocks mixed precision may use (option mixed_blocks; [] for none)
SENSITIVITIES = ("output", "weight")   # how mixed precision ranks weights (quant_precision.choose_bits)
SENSITIVITY_MAX_BYTES = 2 << 30  # "output" runs the float model: above these weight bytes, "weight" is used
DEFAULT_BLOCK = {"cpu": 32, "cuda": 32}
DEFAULT_ACCURACY = {"cpu": 4, "cuda": 0}
DEFAULT_CALIBRATE = "minmax"     # int8:static's range method (percentile: the same on MiniLM, at 1.3x the time)
REDUCE_RANGE = True              # int8 weights within +-63: exact on CPUs whose u8 x s8 kernels saturate pairs (AVX2)
PERCENTILE = 99.999              # int8:static:percentile keeps this share of each activation's values unclipped
ERROR_BUDGET = 1e-3              # int8:static: summed output error (relative, squared) of the activations quantized
SMOOTH = "auto"                  # int8:static: SmoothQuant's migration strength alpha, or "auto" (chosen per layer)


@dataclass(frozen=True)
class QuantMode:
    """A parsed `--quantize` value."""

    scheme: str                   # the weight format ("int4")
    method: str                   # how weights are fitted (kernels/quantize.py METHODS)
    mixed: bool                   # the most sensitive weights at HIGH_BITS (quant_precision.choose_bits)
    calibrate: str = ""           # int8:static: how activation ranges are chosen (kernels/calibrate.py METHODS)
    awq: bool = False             # int4: AWQ's scales folded in first (passes/fold_awq_scales.py)

    def __str__(self) -> str:
        return f"{self.scheme}:{'awq:' if self.awq else ''}{self.method}"


def _int4(variant: str) -> QuantMode:
    if not variant:
        return QuantMode("int4", DEFAULT_METHOD, True)
    head, _, method = variant.partition(":")
    awq = head == AWQ
    method = (method if awq else variant) or UNIFORM
    return QuantMode("int4", DEFAULT_METHOD if method == UNIFORM else method, False, awq=awq)


def _int8(variant: str) -> QuantMode:
    method, _, calibrate = variant.partition(":")
    return QuantMode("int8", method or "weight", False, calibrate or (DEFAULT_CALIBRATE if method == "static" else ""))


# scheme -> (its variants, the parser of a variant; "" is the bare scheme)
SCHEMES: dict[str, tuple[tuple[str, ...], Callable[[str], QuantMode]]] = {
    "int4": (kq.METHODS + (UNIFORM, AWQ) + tuple(f"{AWQ}:{m}" for m in kq.METHODS), _int4),
    "int8": (("dynamic", "static") + tuple(f"static:{m}" for m in kcal.METHODS), _int8),
}
CALIBRATED = {("int4", m) for m in kq.CALIBRATED} | {("int8", "static")}   # modes that need --calibration


def parse_quantize(text: str | None) -> QuantMode:
    """`--quantize TEXT` -> QuantMode (None means the first scheme's bare form); UsageError on an unknown value."""
    text = (text or next(iter(SCHEMES))).strip().lower()
    scheme, _, variant = text.partition(":")
    if scheme not in SCHEMES or (variant and variant not in SCHEMES[scheme][0]):
        choices = " or ".join(f"{s} or {s}:{{{','.join(v)}}}" for s, (v, _) in SCHEMES.items())
        raise UsageError(f"--quantize: unknown value '{text}'; use {choices}")
    return SCHEMES[scheme][1](variant)


@dataclass(frozen=True)
class QuantOptions:
    method: str
    block_size: int
    symmetric: bool
    accuracy_level: int
    exclude: tuple[str, ...]
    tied_embedding: bool
    calibration: str | None = None   # .npz of model inputs (gptq)
    damp: float = 0.01               # gptq dampening, relative to mean(diag H)
    act_order: bool = False          # gptq: rows by decreasing H[k, k], blocks fitted up front
    hessian_budget: int = HESSIAN_BUDGET[0]  # gptq: bytes of Hessians accumulated per pass over the calibration
    mixed: bool = False              # sensitive layers at HIGH_BITS within mixed_budget (choose_bits)
    mixed_budget: float = MIXED_BUDGET
    scheme: str = "int4"
    sensitivity: str = "output"      # mixed precision's ranking: the model's output error, or the weight error
    mixed_blocks: tuple[int, ...] = MIXED_BLOCKS  # wider 4-bit blocks for weights of low output error (mixed)
    calibrate: str = ""              # int8:static: minmax, percentile or entropy
    percentile: float = PERCENTILE   # int8:static:percentile
    activation_type: str = "uint8"   # int8:static: activations uint8 (asymmetric) or int8 (symmetric)
    reduce_range: bool = REDUCE_RANGE  # int8:dynamic / static: weights within +-63 (7 bits)
    error_budget: float = ERROR_BUDGET   # int8:static: layers of largest error stay float until the rest fit
    smooth: float | str = SMOOTH     # int8:static: SmoothQuant's alpha (0: no smoothing) or "auto"
    awq: bool = False                # int4:awq: AWQ's scales folded into the producers before quantizing


def options_of(ctx: PassContext) -> QuantOptions:
    """Validated quantization options from the context (UsageError on a bad value)."""
    mode = parse_quantize(ctx.option("quantize"))
    method = mode.method
    mixed = bool(ctx.option("mixed", mode.mixed))
    mixed_budget = ctx.option("mixed_budget", MIXED_BUDGET)
    if not isinstance(mixed_budget, (int, float)) or mixed_budget < 1:
        raise UsageError(f"mixed_budget must be a number >= 1 (weight bytes relative to all-int4), got {mixed_budget}")
    sensitivity = ctx.option("sensitivity", SENSITIVITIES[0])
    if sensitivity not in SENSITIVITIES:
        raise UsageError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {sensitivity!r}")
    block = ctx.option("block_size") or DEFAULT_BLOCK.get(ctx.target, 32)
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise UsageError(f"--block-size: {block} is not a power of 2 >= 16 (MatMulNBits requires one)")
    wide = ctx.option("mixed_blocks", MIXED_BLOCKS)
    wide = (wide,) if isinstance(wide, int) else tuple(wide or ())
    if any(not isinstance(b, int) or b < 16 or b & (b - 1) for b in wide):
        raise UsageError(f"mixed_blocks: {list(wide)} are not all powers of 2 >= 16 (MatMulNBits block sizes)")
    symmetric = bool(ctx.option("symmetric", False))
    if method == "hqq" and symmetric:
        raise UsageError("--quantize int4:hqq fits a zero point per block: it cannot be --symmetric")
    calibration = ctx.option("calibration")
    calibrated = (mode.scheme, method) in CALIBRATED or mode.awq
    if calibrated and not calibration:
        raise UsageError(f"--quantize {mode} needs --calibration FILE.npz (model inputs, see "
                         "docs/quantization.md)")
    if calibration and not calibrated:
        raise UsageError(f"--calibration: no selected method uses calibration data ({mode} is data-free; "
                         f"{', '.join(sorted(f'{s}:{m}' for s, m in CALIBRATED))} and int4:awq use it)")
    if calibration:
        check_regular_file(calibration, "--calibration")    # missing, or a FIFO or device: exit 2 before any work
    percentile = ctx.option("percentile", PERCENTILE)
    if not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
        raise UsageError(f"percentile must be a number in (50, 100], got {percentile}")
    smooth = ctx.option("smooth", SMOOTH)
    if smooth != "auto" and (not isinstance(smooth, (int, float)) or not 0 <= smooth <= 1):
        raise UsageError(f"smooth must be 'auto' or a number in [0, 1] (SmoothQuant's alpha; 0: off), got {smooth}")
    error_budget = ctx.option("error_budget", ERROR_BUDGET)
    if not isinstance(error_budget, (int, float)) or error_budget < 0:
        raise UsageError(f"error_budget must be a number >= 0 (inf: every layer int8), got {error_budget}")
    activation_type = ctx.option("activation_type", "uint8")
    if activation_type not in ("uint8", "int8"):
        raise UsageError(f"activation_type must be uint8 or int8, got {activation_type}")
    level = ctx.option("accuracy_level", DEFAULT_ACCURACY.get(ctx.target, 0))
    if level not in (0, 1, 2, 3, 4):
        raise UsageError(f"accuracy_level must be 0-4, got {level}")
    budget = ctx.option("hessian_budget") or min(max(available_memory() // 4, HESSIAN_BUDGET[0]), HESSIAN_BUDGET[1])
    if not isinstance(budget, int) or budget <= 0:
        raise UsageError(f"hessian_budget must be a positive number of bytes, got {budget}")
    damp = ctx.option("damp", 0.01)
    if not isinstance(damp, (int, float)) or not 0 <= damp < 1e6:
        raise UsageError(f"damp must be a number >= 0 (GPTQ adds damp * mean(diag H) to H's diagonal), got {damp}")
    exclude = ctx.option("exclude") or ()
    return QuantOptions(method, block, symmetric, int(level), tuple([exclude] if isinstance(exclude, str) else exclude),
                        bool(ctx.option("tied_embedding", True)), calibration, float(damp),
                        bool(ctx.option("act_order", False)), budget, mixed and mode.scheme == "int4",
                        float(mixed_budget), mode.scheme, sensitivity, wide, mode.calibrate, float(percentile),
                        activation_type, bool(ctx.option("reduce_range", REDUCE_RANGE)), float(error_budget),
                        smooth if smooth == "auto" else float(smooth), mode.awq)
