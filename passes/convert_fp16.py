"""convert-fp16 (level 3, target cuda)

    y = f(x1, ..., xn) in float32         ->  y16 = f(x16_1, ..., x16_n)     every op with a float16 kernel
    W (float32 initializer)               ->  clamp(W, -65504, 65504) as float16   (lazy when large; +-inf kept)
    x (float32 graph input / output)      ->  Cast at the boundary; with option io_fp16 the input/output itself
                                              becomes float16 (KV cache included)
    kept fp32 node k(x16)                 ->  k(Cast(x16, float))  and  Cast(k(..), float16) for fp16 consumers

ONNX Runtime's CUDA kernels are fastest (GroupQueryAttention: only) in float16. The pass decides per node whether
it runs in float16 ("converted") or float32 ("kept"), sets the element type of every float32 value a converted
node produces, and inserts one shared Cast per value and direction where a value meets a consumer of the other
precision. Constants are converted instead of cast: values beyond the float16 range are clamped to
finfo(float16).min/max (an attention mask's finfo(float32).min or -3.4e38 becomes -65504, not -inf; -inf stays
-inf). Initializers over `fold_limit_bytes` (1 MiB) become LazyTensors, converted one at a time while saving.
Nothing but float32 changes: integer, bool and shape computations are left alone. After the pass the cleanup
(fixpoint(fold-constants, remove-noops, ...)) folds Cast(Cast(x16, float), float16) pairs away.

Which slots convert (every float32 input of a converted node, and these outputs):

    | op                                                  | outputs that become float16               |
    |-----------------------------------------------------|-------------------------------------------|
    | standard ONNX ops                                   | slots whose schema type allows float16    |
    |                                                     | (LayerNormalization Mean/InvStdDev: U =   |
    |                                                     | float, stay float32)                      |
    | Cast(to=float) from an integer or bool              | the output (to=float16)                   |
    | SimplifiedLayerNormalization (domain "")            | Y (inv_std_var stays float32)             |
    | SkipSimplifiedLayerNormalization, SkipLayerNorm.    | output, input_skip_bias_sum (mean and     |
    |                                                     | inv_std_var stay float32)                 |
    | EmbedLayerNormalization                             | output, embedding_sum                     |
    | GroupQueryAttention (cos/sin caches, past K/V too;  | output, present_key, present_value        |
    |   seqlens_k, total_sequence_length stay int32)      |                                           |
    | MultiHeadAttention, Attention, RotaryEmbedding      | all float outputs (masks, position ids,   |
    |                                                     | past_sequence_length stay integer)        |
    | FastGelu, BiasGelu, Gelu, QuickGelu, FusedMatMul    | all                                       |
    | MatMulNBits (A, scales, bias, float zero points;    | Y                                         |
    |   B and uint8 zero points stay uint8)               |                                           |
    | GatherBlockQuantized (scales)                       | output                                    |

Attributes are never changed, except the element type a node creates: Cast's `to` and the `value` tensor of
Constant / ConstantOfShape. Shape, Size and Cast take any input type (no Cast is inserted in front of them).

Kept in float32 (the rest of the graph runs in float16):

- ops without a float16 kernel: other domains' ops and ORT ops absent from the table above, standard ops whose
  schema slot has no float16 (Range), CUDA_FP32_ONLY, ops that take a `dtype` attribute, ops with subgraphs (If,
  Loop, Scan; their inner graphs see the float32 values they capture);
- an explicit upcast Cast(x16, to=float) already in the model (the author asked for it; a float16 consumer of
  its output reads x16 itself, so no Cast round trip appears);
- integer-derived float computations that end in integers or in Cos/Sin: walking back from any kept node, every
  producer whose inputs are all constants, non-float graph inputs or shapes is kept too (activations enter through
  float graph inputs and lookups of float tables). This keeps the rotary angle position_ids * inv_freq in float32
  (float16 has 11 significant bits: at position 5000 the angle is off by up to 2 radians) and float shape arithmetic exact;
  cos/sin are cast to float16 once, shared by every layer. Masks are integer-derived too but end in float16
  arithmetic, so they convert (with their constants clamped);
- the statistics of unfused norms: a square (Pow(x, 2) or Mul(x, x)) feeding ReduceMean/ReduceSum (or a
  ReduceSumSquare/ReduceL2), the reduction, and the elementwise chain after it whose other operands are constants
  (+ eps, Sqrt, Reciprocal, 1 / .): x^2 overflows float16 for |x| > 256, which real hidden states reach. Cost per
  norm: one Cast of (B, S, H) in, one of (B, S, 1) out. Fused norms (SimplifiedLayerNormalization, Skip*,
  LayerNormalization) accumulate in float32 inside ORT's kernels and convert whole.
- NOT kept: Softmax (unfused attention). ORT's Softmax kernels accumulate float16 in float32; keeping it would
  cast (B, N, S, T) scores twice per layer, for no measured gain (below).

Measured (ORT 1.31.1 CPU EP; O1, convert-fp16, cleanup; error = max |y - y_ref| / max |y_ref| of the logits or
last_hidden_state against the float32 model, on the verification inputs):

    | case                                             | this policy | variant                     | variant |
    |--------------------------------------------------|-------------|-----------------------------|---------|
    | 30 float32 fixtures (worst)                      | 1.6e-3      | Softmax kept float32        | 1.6e-3  |
    | llama / phi3 / gemma with past, positions 4000+  | 5.7e-4 (*)  | rotary angle in float16     | 8.2e-3  |
    | llama_dynamo, embeddings x300 (hidden ~ 300),    | 7.7e-4      | norm statistics in float16  | 1.0     |
    |   float16 arithmetic (onnx.reference)            |             |   (x^2 = inf: logits wrong) |         |

    (*) llama 5.7e-4 vs 8.2e-3, phi3 5.6e-4 vs 2.6e-3, gemma 3.0e-4 vs 4.0e-3.

(ORT's CPU EP runs float16 Pow/ReduceMean/Softmax in float32 through inserted Casts, so it cannot show the norm
overflow; onnx.reference computes in the value's dtype.) Verification tolerance is float16's (2e-2). With the
fusion passes run first (GQA, attention, norms, GELU), everything but the I/O Casts (and phi3's partial-rotary
cos/sin) is float16 and every fixture verifies. The float16 llama fixture keeps its float32 norm statistics and rotary
angle (the same policy); only each norm's scaling Mul moves to float16. A 1 GiB external-data model (4 x 8192^2 MatMuls) converts and saves
with a peak RSS of 494 MiB (one weight mapped plus its float16 copy; -O1 alone: 92 MiB).

Options: io_fp16 (bool), fold_limit_bytes (lazy threshold). When it changed the model the pass sets
ctx.options["tolerance_dtype"] = "float16" (unless a tolerance dtype was given), so onnxc.compile verifies with
float16 tolerances even when the I/O stays float32. Element types should be known (infer-shapes runs first in every
pipeline); the pass fills outputs that follow from the schema (e.g. values a fusion created) and leaves a value
whose type it cannot tell alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxc.domains import DEFAULT_OPSET, MS
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import const_array

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
DEFAULT_LAZY_BYTES = 1 << 20
ALL = None  # every float output

# ORT ops (domain, op) -> output slots that become float16 (inputs: every float32 input).
ORT_OPS: dict[tuple[str, str], tuple[int, ...] | None] = {
    ("", "SimplifiedLayerNormalization"): (0,),
    (MS, "SimplifiedLayerNormalization"): (0,),
    (MS, "SkipSimplifiedLayerNormalization"): (0, 3),
    (MS, "SkipLayerNormalization"): (0, 3),
    (MS, "EmbedLayerNormalization"): (0, 2),
    (MS, "GroupQueryAttention"): ALL,
    (MS, "MultiHeadAttention"): ALL,
    (MS, "Attention"): ALL,
    (MS, "RotaryEmbedding"): ALL,
    (MS, "FastGelu"): ALL,
    (MS, "BiasGelu"): ALL,
    (MS, "Gelu"): ALL,
    (MS, "QuickGelu"): ALL,
    (MS, "FusedMatMul"): ALL,
    (MS, "MatMulNBits"): ALL,
    (MS, "GatherBlockQuantized"): ALL,
}
# Standard ops whose schema allows float16 but that ORT's CUDA EP lacks a float16 kernel for.
CUDA_FP32_ONLY = frozenset({"Range", "NonMaxSuppression", "RoiAlign", "Det", "Multinomial"})
ANY_INPUT = frozenset({"Shape", "Size", "Cast"})          # read any element type: never cast their inputs
SQUARE_REDUCE = frozenset({"ReduceMean", "ReduceSum"})
SELF_SQUARE_REDUCE = frozenset({"ReduceSumSquare", "ReduceL2"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sqrt", "Reciprocal", "Neg", "Abs",
                         "Exp", "Log", "Identity"})
ANGLE_OPS = frozenset({"Cos", "Sin"})
KEEP_OPS: frozenset[str] = frozenset()                   # standard ops kept in float32 (measured: none needed)
LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND"})


def _std(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def _f32(v: ir.Value | None) -> bool:
    return v is not None and v.dtype == F32


def to_fp16(a: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """float32 -> float16 with finite values clamped to +-65504 (NaN and +-inf kept), in chunks: no full-size
    float32 temporaries."""
    a = np.asarray(a)
    out = np.empty(a.shape, np.float16)
    src, dst = a.reshape(-1), out.reshape(-1)
    for i in range(0, src.size, chunk):
        c = src[i:i + chunk]
        dst[i:i + chunk] = np.where(np.isfinite(c), np.clip(c, -FP16_MAX, FP16_MAX), c)
    return out


# ---------------------------------------------------------------------------------------------------- slots
_schemas: dict[tuple[str, int], onnx.defs.OpSchema | None] = {}


def _schema(op: str, opset: int) -> onnx.defs.OpSchema | None:
    if (op, opset) not in _schemas:
        try:
            _schemas[(op, opset)] = onnx.defs.get_schema(op, opset, "")
        except onnx.defs.SchemaError:
            _schemas[(op, opset)] = None
    return _schemas[(op, opset)]


def _schema_fp16(op: str, opset: int) -> tuple[list[bool], list[bool]] | None:
    """Per formal input/output of the standard op: does its type constraint allow float16?"""
    s = _schema(op, opset)
    if s is None:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in s.type_constraints}
    ok = lambda p: "tensor(float16)" in allowed.get(p.type_str, {p.type_str})
    return [ok(p) for p in s.inputs], [ok(p) for p in s.outputs]


def _infer_dtypes(graph: ir.Graph, opset: int) -> None:
    """Fill unknown output element types that follow from an input's (values a fusion created, say).

    Standard ops: an output whose schema type parameter is also an input's takes that input's type; Cast takes
    `to`. ORT ops of the table: the float16-capable outputs take the first float input's type.
    """
    for node in graph:
        if all(o.dtype is not None for o in node.outputs):
            continue
        key = ("" if _std(node.domain) else node.domain, node.op_type)
        if key in ORT_OPS:
            src = next((v.dtype for v in node.inputs if v is not None and v.dtype is not None
                        and v.dtype.is_floating_point()), None)
            table = ORT_OPS[key]
            for i, o in enumerate(node.outputs):
                if o.dtype is None and src is not None and (table is ALL or i in table):
                    o.dtype = src
            continue
        s = _schema(node.op_type, opset) if _std(node.domain) else None
        if s is None:
            continue
        if node.op_type == "Cast" and "to" in node.attributes:
            node.outputs[0].dtype = ir.DataType(node.attributes["to"].value)
            continue
        if node.op_type in ("Constant", "ConstantOfShape"):
            a = node.attributes.get("value")
            if a is not None and a.type == ir.AttributeType.TENSOR:
                node.outputs[0].dtype = a.value.dtype
            elif a is None and (node.op_type == "ConstantOfShape" or {"value_float", "value_floats"} & set(
                    node.attributes)):
                node.outputs[0].dtype = F32
            continue
        known = {}
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype is not None and s.inputs:
                known.setdefault(s.inputs[min(i, len(s.inputs) - 1)].type_str, v.dtype)
        for i, o in enumerate(node.outputs):
            dtype = known.get(s.outputs[min(i, len(s.outputs) - 1)].type_str) if s.outputs else None
            if o.dtype is None and dtype is not None:
                o.dtype = dtype


def _slot(flags: list[bool], i: int) -> bool:
    return bool(flags) and flags[min(i, len(flags) - 1)]


def _slots(node: ir.Node, opset: int) -> tuple[set[int], set[int]] | None:
    """(input slots, output slots) that run in float16, or None when the node must stay float32."""
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return None
    ins = {i for i, v in enumerate(node.inputs) if _f32(v)}
    outs = {i for i, v in enumerate(node.outputs) if _f32(v)}
    key = ("" if _std(node.domain) else node.domain, node.op_type)
    if key in ORT_OPS:
        table = ORT_OPS[key]
        return ins, outs if table is ALL else outs & set(table)
    if not _std(node.domain) or node.op_type in CUDA_FP32_ONLY | KEEP_OPS or "dtype" in node.attributes:
        return None
    if node.op_type == "Cast":
        src = node.inputs[0].dtype if node.inputs and node.inputs[0] is not None else None
        return None if src is not None and src.is_floating_point() else (set(), outs)
    if node.op_type in ANY_INPUT:
        return set(), set()
    flags = _schema_fp16(node.op_type, opset)
    if flags is None:
        return None
    return {i for i in ins if _slot(flags[0], i)}, {i for i in outs if _slot(flags[1], i)}


# ---------------------------------------------------------------------------------------------------- policy
def _free_values(graph: ir.Graph) -> set[int]:
    """Integer-derived values: computed from constants, non-float graph inputs and shapes only.

    Activations enter through float graph inputs and through lookups of float tables (Gather* of a float tensor,
    e.g. the embedding), and leave this set through every other-domain op.
    """
    free = {id(v) for v in graph.initializers.values() if not v.is_graph_input()}
    free |= {id(v) for v in graph.inputs if v.dtype is not None and not v.dtype.is_floating_point()}
    for node in graph:
        if not _std(node.domain) or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue
        if node.op_type in LOOKUPS and node.inputs[0] is not None and node.inputs[0].dtype is not None \
                and node.inputs[0].dtype.is_floating_point():
            continue
        if node.op_type in ("Shape", "Size") or all(v is None or id(v) in free for v in node.inputs):
            free |= {id(o) for o in node.outputs}
    return free


def _is_square(node: ir.Node | None) -> bool:
    if node is None or not _std(node.domain):
        return False
    if node.op_type == "Mul":
        return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
    if node.op_type == "Pow":
        e = const_array(node.inputs[1], 1)
        return e is not None and float(e.reshape(-1)[0]) == 2.0
    return False


def _norm_statistics(graph: ir.Graph) -> set[ir.Node]:
    """Square -> reduction -> elementwise chain with constant operands (+eps, Sqrt, 1/.) of unfused norms."""
    kept: set[ir.Node] = set()
    for node in graph:
        if not _std(node.domain) or not _f32(node.inputs[0] if node.inputs else None):
            continue
        if node.op_type in SQUARE_REDUCE and _is_square(node.inputs[0].producer()):
            kept |= {node, node.inputs[0].producer()}
        elif node.op_type not in SELF_SQUARE_REDUCE:
            continue
        kept.add(node)
        frontier = [node]
        while frontier:
            n = frontier.pop()
            for use in n.outputs[0].uses():
                c = use.node
                if (c not in kept and _std(c.domain) and c.op_type in ELEMENTWISE and c.graph is graph
                        and all(v is n.outputs[0] or (v is not None and v.const_value is not None)
                                for v in c.inputs)):
                    kept.add(c)
                    frontier.append(c)
    return kept


def _plan(graph: ir.Graph, opset: int) -> dict[ir.Node, tuple[set[int], set[int]]]:
    """The converted nodes with their float16 slots; every other node touching float32 stays float32."""
    free = _free_values(graph)
    slots = {n: _slots(n, opset) for n in graph}
    kept = {n for n, s in slots.items() if s is None} | _norm_statistics(graph)
    for n in graph:
        f32_free_in = any(_f32(v) and id(v) in free for v in n.inputs)
        ends_integer = not any(o.dtype is not None and o.dtype.is_floating_point() for o in n.outputs)
        if f32_free_in and ((n.op_type in ANGLE_OPS and _std(n.domain))
                            or (ends_integer and n.op_type not in ("Shape", "Size"))):
            kept.add(n)
    # Keep the integer-derived float producers of every kept node in float32 (no lossy round trip).
    work = list(kept)
    while work:
        n = work.pop()
        for v in n.inputs:
            p = v.producer() if _f32(v) and id(v) in free else None
            if p is not None and p.graph is graph and p not in kept:
                kept.add(p)
                work.append(p)
    return {n: s for n, s in slots.items() if s is not None and n not in kept and (s[0] or s[1])}


# ---------------------------------------------------------------------------------------------------- rewrite
class _Namer:
    def __init__(self, graph: ir.Graph):
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        self.used |= {o.name for n in graph for o in n.outputs}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _fp16_tensor(t: ir.TensorProtocol, lazy_bytes: int) -> ir.TensorProtocol:
    if t.nbytes <= lazy_bytes:
        return ir.tensor(to_fp16(t.numpy()))

    def compute(src: ir.TensorProtocol = t) -> ir.Tensor:
        out = ir.tensor(to_fp16(src.numpy()))
        if isinstance(src, ir.ExternalTensor):
            src.release()
        return out
    return ir.LazyTensor(compute, dtype=F16, shape=ir.Shape(list(t.shape)))


def _convert_attr_tensor(node: ir.Node) -> None:
    """The float32 `value` a Constant / ConstantOfShape creates becomes float16 (value_float(s) included)."""
    for key in ("value_float", "value_floats"):
        if key in node.attributes:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array(node.attributes.pop(key).value,
                                                                                 np.float32)))
    a = node.attributes.get("value")
    if a is None and node.op_type == "ConstantOfShape":
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
    elif a is not None and a.type == ir.AttributeType.TENSOR and a.value.dtype == F32:
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(to_fp16(a.value.numpy())))


class _Rewriter:
    def __init__(self, graph: ir.Graph, lazy_bytes: int):
        self.graph, self.lazy_bytes, self.name = graph, lazy_bytes, _Namer(graph)
        self.cache: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.anchor = next(iter(graph), None)     # casts of graph inputs go before it, in order
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def cast(self, v: ir.Value, to: ir.DataType) -> ir.Value:
        """One shared Cast (or, for a constant, one converted copy) of v per target type."""
        key = (id(v), to)
        if key in self.cache:
            return self.cache[key]
        p = v.producer()
        if to == F16 and p is not None and p.op_type == "Cast" and p.inputs[0].dtype == F16:
            return p.inputs[0]          # v = Cast(x16, float): x16 is v in float16, exactly
        if v.const_value is not None and not v.is_graph_input() and to == F16:
            out = ir.Value(name=self.name(f"{v.name}_fp16"), shape=v.shape, type=ir.TensorType(F16),
                           const_value=_fp16_tensor(v.const_value, self.lazy_bytes))
            self.graph.register_initializer(out)
            self.count("convert-initializer")
        else:
            out = self.cast_node(v, to, self.name(f"{v.name}_{'fp16' if to == F16 else 'fp32'}"))
        self.cache[key] = out
        return out

    def cast_node(self, v: ir.Value, to: ir.DataType, name: str) -> ir.Value:
        """A new Cast(v, to) named `name`, placed right after v's producer (graph inputs: at the top)."""
        out = ir.Value(name=name, shape=v.shape, type=ir.TensorType(to))
        node = ir.Node("", "Cast", [v], [ir.AttrInt64("to", int(to))], outputs=[out],
                       name=self.name(f"{v.name}_cast"))
        producer = v.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, node)
        elif self.anchor is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(self.anchor, node)
        self.count("insert-cast")
        return out


def _wanted(node: ir.Node, index: int, graph: ir.Graph, plan: dict) -> ir.DataType | None:
    if node.graph is not graph:
        return F32                      # captured by a subgraph: its inner graph expects float32
    if _std(node.domain) and node.op_type in ANY_INPUT:
        return None
    s = plan.get(node)
    return F16 if s is not None and index in s[0] else F32


def convert(model: ir.Model, *, io_fp16: bool = False, lazy_bytes: int = DEFAULT_LAZY_BYTES) -> dict[str, int]:
    """Convert the main graph in place; return counts (converted nodes, casts, initializers)."""
    graph = model.graph
    opset = model.opset_imports.get("", DEFAULT_OPSET)
    _infer_dtypes(graph, opset)
    plan = _plan(graph, opset)
    rw = _Rewriter(graph, lazy_bytes)
    inputs = [v for v in graph.inputs if _f32(v) and not v.is_initializer()]
    outputs = [(i, v) for i, v in enumerate(graph.outputs) if _f32(v)]
    values = inputs + [v for v in graph.initializers.values() if _f32(v) and not v.is_graph_input()]
    values += [o for n in graph for o in n.outputs if _f32(o)]
    if not plan and not (io_fp16 and (inputs or outputs)):
        return {}
    # Element types: converted nodes produce float16; graph inputs with io_fp16.
    for node, (_, outs) in plan.items():
        for i in outs:
            node.outputs[i].type = ir.TensorType(F16)
        if node.op_type == "Cast" and outs:
            node.attributes["to"] = ir.AttrInt64("to", int(F16))
        elif node.op_type in ("Constant", "ConstantOfShape") and outs:
            _convert_attr_tensor(node)
        rw.count("convert-node")
    if io_fp16:
        for v in inputs:
            v.type = ir.TensorType(F16)
    # Uses: cast where a value meets a consumer of the other precision. A constant only float16 consumers read
    # is converted in place; one read in both precisions gets a converted copy.
    for v in values:
        uses = [(u, _wanted(u.node, u.idx, graph, plan)) for u in list(v.uses())]
        if (v.const_value is not None and not v.is_graph_input() and not v.is_graph_output() and uses
                and all(w in (F16, None) for _, w in uses) and any(w == F16 for _, w in uses)):
            v.const_value = _fp16_tensor(v.const_value, lazy_bytes)
            v.type = ir.TensorType(F16)
            rw.count("convert-initializer")
            continue
        for use, want in uses:
            if want is not None and want != v.dtype:
                use.node.replace_input_with(use.idx, rw.cast(v, want))
    # Graph outputs keep their names and (without io_fp16) their float32 type; with io_fp16 a graph input or
    # initializer that is also an output keeps its type (its name cannot move to a Cast).
    done: dict[int, ir.Value] = {}
    for i, v in outputs:
        want = F16 if io_fp16 else F32
        if id(v) in done:                              # one value in several output slots
            graph.outputs[i] = done[id(v)]
        elif v.dtype != want and not v.is_graph_input() and not v.is_initializer():
            name = v.name
            v.name = rw.name(f"{name}_{'fp32' if want == F16 else 'fp16'}")
            graph.outputs[i] = done[id(v)] = rw.cast_node(v, want, name)
    return rw.counts


@register_pass
class ConvertFp16(Pass):
    """Run float32 compute in float16 (CUDA), keeping I/O types, integer math, rotary angles and norm statistics."""

    name = "convert-fp16"
    level = 3
    targets = ("cuda",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        counts = convert(model, io_fp16=bool(ctx.option("io_fp16", False)),
                         lazy_bytes=int(ctx.option("fold_limit_bytes", DEFAULT_LAZY_BYTES)))
        if counts and ctx.option("tolerance_dtype") in (None, "float32", "float64"):
            ctx.options["tolerance_dtype"] = "float16"
            ctx.notes.append("convert-fp16: compute runs in float16; verified with float16 tolerances")
        return PassResult(model, bool(counts), counts)


__all__ = ["ORT_OPS", "ConvertFp16", "convert", "to_fp16"]

