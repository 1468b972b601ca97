"""Pipelines: one table of (level, target) -> pipeline text.

Passes also declare the lowest level and the targets they serve; `build_pipeline` drops any pass the table names
that the context excludes, so a row may be shared between targets. Larger fusions sit before smaller ones inside a
pass by pattern size, not by position here. A row may hold optional stages, written `STAGE?(passes)`: their passes
run only when the compile enables the stage (OPTIONAL_STAGES: the option that does, e.g. --quantize).
"""
from __future__ import annotations

import re

from . import pass_manager as pm
from .errors import UsageError

import onnxc.passes  # noqa: F401,E402  (registers the built-in passes)

LEVELS = (0, 1, 2, 3)

# The cleanup every level from 1 runs, to a fixed point: exporter noise goes here.
CLEANUP = "fixpoint(fold-constants,canonicalize-sequences,remove-noops,fold-shapes,lower-gemm,unflatten-rows,eliminate-cse,eliminate-dead)"

# Optional stages: stage -> the compile option that enables it (set, not None).
OPTIONAL_STAGES = {"quantize": "quantize"}

# Quantization runs last, after every fusion, so that packed QKV and gate-up MatMuls are quantized as the single
# MatMuls they are (each quantize pass serves one --quantize format and leaves the others' alone; fold-awq-scales
# acts for int4:awq only, before quantize-int4); eliminate-dead drops the float weights they replaced. A row
# without a final sort (level 0) runs the stage with one, as does an explicit --passes text that names none of the
# stage's passes (appended).
QUANTIZE = "fold-awq-scales,quantize-int4,quantize-int8,eliminate-dead"
STANDALONE = {"quantize": f"{QUANTIZE},sort-topologically"}
STAGE_PASSES = {"quantize": ("fold-awq-scales", "quantize-int4", "quantize-int8")}   # an explicit text naming one
                                                                                      # runs as written


def quantizing(row: str) -> str:
    """A row with the optional quantize stage before its final sort (the stage and a sort for an empty row)."""
    if not row:
        return f"quantize?({STANDALONE['quantize']})"
    head, sep, _ = row.rpartition(",sort-topologically")
    if not sep or row[len(head) + len(sep):]:
        raise ValueError(f"a pipeline row ends with sort-topologically: {row[-40:]!r}")
    return f"{head},quantize?({QUANTIZE}),sort-topologically"


# Level 1: exporter noise out, with shapes refreshed once between two cleanup rounds.
O1 = f"infer-shapes,{CLEANUP},infer-shapes,{CLEANUP},sort-topologically"

# Fusions, on the cleaned graph. Each pass orders its own rules by pattern size; between passes the order is:
# norms first (attention and skip-norm patterns read fused norms), attention before the residual/skip norms that
# consume its output projection, packing last (it reads the attention ops' Q/K/V inputs).
# expand-standard-ops comes first: it rewrites opset-23 RMSNormalization/RotaryEmbedding/Attention into what they read.
FUSE = ("expand-standard-ops,split-packed-heads,canonicalize-gather,canonicalize-rotary,canonicalize-merged-heads,canonicalize-attention-key,canonicalize-softmax-cast,fuse-layer-norm,fuse-rms-norm,fuse-gelu,fuse-attention,fuse-gqa,fuse-mha,"
        "fuse-embed-layer-norm,fuse-skip-norm,pack-projections,fuse-transposed-matmul,contract-standard-ops")

O2 = f"infer-shapes,{CLEANUP},infer-shapes,{CLEANUP},{FUSE},{CLEANUP},sort-topologically"

# Level 3 on CUDA computes in float16 (CUDA's GroupQueryAttention has no float32 kernel); graph I/O keeps its types
# unless --io-fp16.
O3_CUDA = f"infer-shapes,{CLEANUP},infer-shapes,{CLEANUP},{FUSE},{CLEANUP},convert-fp16,{CLEANUP},sort-topologically"

# Each row ends with the optional quantize stage (quantizing): before its final sort, or alone with one at -O0.
PIPELINES: dict[tuple[int, str], str] = {
    (0, "cpu"): quantizing(""),
    (0, "cuda"): quantizing(""),
    (1, "cpu"): quantizing(O1),
    (1, "cuda"): quantizing(O1),
    (2, "cpu"): quantizing(O2),
    (2, "cuda"): quantizing(O2),
    (3, "cpu"): quantizing(O2),
    (3, "cuda"): quantizing(O3_CUDA),
}

_OPTIONAL = re.compile(r"([a-z][a-z0-9-]*)\?\(([^()]*)\)")


def enabled_stages(ctx: pm.PassContext) -> frozenset[str]:
    """The optional stages the context's options enable."""
    return frozenset(stage for stage, option in OPTIONAL_STAGES.items() if ctx.option(option) is not None)


def with_stages(text: str, stages: frozenset[str] | set[str] = frozenset()) -> str:
    """Pipeline text with each `STAGE?(passes)` replaced by its passes when STAGE is in `stages`, else dropped."""
    for m in _OPTIONAL.finditer(text):
        if m.group(1) not in OPTIONAL_STAGES:
            raise UsageError(f"pipeline: unknown optional stage '{m.group(1)}'; choose one of "
                             f"{', '.join(OPTIONAL_STAGES)}")
    text = _OPTIONAL.sub(lambda m: m.group(2) if m.group(1) in stages else "", text)
    return ",".join(item for item in text.split(",") if item.strip())


def pipeline_text(level: int, target: str, stages: frozenset[str] | set[str] = frozenset()) -> str:
    """The row for (level, target) with the given optional stages enabled."""
    if level not in LEVELS:
        raise UsageError(f"unknown optimization level {level}; choose one of {', '.join(map(str, LEVELS))}")
    if target not in pm.TARGETS:
        raise UsageError(f"unknown target '{target}'; choose one of {', '.join(pm.TARGETS)}")
    return with_stages(PIPELINES[(level, target)], stages)


def chosen_text(ctx: pm.PassContext, passes: str | None = None) -> str:
    """The pipeline text a compile runs: the table's row with the stages the options enable, or an explicit text
    with each enabled stage that it names none of the passes of appended in its standalone form."""
    stages = enabled_stages(ctx)
    if passes is None:
        return pipeline_text(ctx.level, ctx.target, stages)
    text = with_stages(passes, stages)
    named = {p.name for p in pm.flatten(pm.parse_pipeline(text))}
    return ",".join([text] * bool(text) + [STANDALONE[s] for s in sorted(stages)
                                           if not named.intersection(STAGE_PASSES[s])])


def build_pipeline(ctx: pm.PassContext, passes: str | None = None, disable: tuple[str, ...] = ()) -> list[pm.Pass]:
    """The passes to run: the table's row for (level, target), or an explicit `passes` text, minus `disable`, with
    the optional stages the context enables (chosen_text).

    An explicit pipeline runs as written (levels and targets are not filtered), so a user can force a pass.
    `disable` names passes, rules, or parts a pass lets a user turn off; unknown names are errors.
    """
    known_rules = {**pm.all_rules(), **{n: v for n, v in pm.all_parts().items() if v[1].can_disable}}
    for name in disable:
        if name not in pm.registered_passes() and name not in known_rules:
            raise UsageError(f"--disable: no pass or rule named '{name}'"
                             + pm._rules.suggest(name, [*pm.registered_passes(), *known_rules]))
    disabled = frozenset(disable)
    ctx.disabled_rules = frozenset(n for n in disabled if n in known_rules)
    text = chosen_text(ctx, passes)
    if passes is not None:
        return pm.drop_disabled(pm.parse_pipeline(text), disabled)
    chosen = place_declared(pm.parse_pipeline(text))
    return pm.filter_passes(chosen, ctx, disabled)


# The pass each stage ends with in the table: a pass declaring `stage` runs right after it.
STAGE_ENDS = {"cleanup": "eliminate-dead", "canonicalize": "canonicalize-softmax-cast",
              "fuse": "fuse-transposed-matmul", "lower": "contract-standard-ops"}
_TABLED = frozenset(name for text in PIPELINES.values() for name in
                    with_stages(text, set(OPTIONAL_STAGES)).replace("fixpoint(", "").replace(")", "").split(",")
                    if name)


def place_declared(passes: list[pm.Pass]) -> list[pm.Pass]:
    """The table's passes with every registered pass it does not name but that declares where it runs (after=,
    before= or stage=) put there, at each place its anchor occurs (inside a fixed point too); a declared anchor
    that is not a pass is a usage error. Level and target filtering come after, so a pass's `level` decides the
    rows it joins."""
    declared = [p for name, p in pm.registered_passes().items() if name not in _TABLED
                and (p.after or p.before or p.stage)]
    for p in declared:
        if p.stage is not None and p.stage not in STAGE_ENDS:
            raise UsageError(f"pass '{p.name}': unknown stage '{p.stage}'; choose one of {', '.join(STAGE_ENDS)}")
        anchor = p.after or p.before or STAGE_ENDS[p.stage]
        if anchor not in pm.registered_passes():
            raise UsageError(f"pass '{p.name}' runs {'before' if p.before else 'after'} '{anchor}', which is no pass"
                             + pm._rules.suggest(anchor, list(pm.registered_passes())))

    def place(items: list[pm.Pass]) -> list[pm.Pass]:
        out: list[pm.Pass] = []
        for item in items:
            if isinstance(item, pm.FixedPoint):
                item = pm.FixedPoint(place(item.passes), item.max_iterations)
            out += [p for p in declared if p.before == item.name] + [item]
            out += [p for p in declared if (p.after or (STAGE_ENDS.get(p.stage) if not p.before else None))
                    == item.name]
        return out

    return place(passes) if declared else passes
