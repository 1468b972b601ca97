"""fold-constants

    op(c1, ..., cn)                      ->  c        (every input constant, op deterministic, result small)
    Constant(value=t)                    ->  initializer t (small equal constants share one initializer)
    Shape(x)[i...] where dims are static ->  c        (shape arithmetic folded through Gather/Slice/Concat/...)
    f(W) for a large initializer W       ->  lazy initializer computed at save time (Transpose, Cast)

Each folded node's outputs become initializers; a value that is a graph output is never folded. Results larger
than `fold_limit_bytes` (default 1 MiB) stay as nodes unless they are a Transpose or Cast of one initializer, which
become lazy tensors: nothing is computed until the model is saved, one tensor at a time. Shape vectors that are
only partly static are recorded symbolically (see onnxc.shapes) for later rules.
Reference semantics: the ONNX operator specification; checked against onnxruntime in tests/passes.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from onnxc.domains import DEFAULT_OPSET
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import const_array, const_tensor, read_elsewhere
from onnxc.shapes import SYM_ARRAY_KEY, SYM_KEY, Unknown, dims_of

DEFAULT_LIMIT_BYTES = 1 << 20
INTERN_MAX_ELEMENTS = 64
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})
LAZY_OPS = frozenset({"Transpose", "Cast"})
SYM_MAX_ELEMENTS = 64
SYM_OPS = frozenset({"Gather", "Concat", "Slice", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "Expand",
                     "Equal", "Where", "Add", "Sub", "Mul", "Div", "Max", "Min"})


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    if a is None:
        return default
    v = a.value
    return list(v) if isinstance(v, tuple) else v


def _axes(node: ir.Node, inputs: list, index: int) -> list[int] | None:
    if len(inputs) > index and inputs[index] is not None:
        return [int(x) for x in np.asarray(inputs[index]).reshape(-1)]
    return _attr(node, "axes")


def _slice(node: ir.Node, x: np.ndarray, ins: list) -> np.ndarray:
    if len(ins) == 1:  # opset < 10: attributes
        starts, ends, axes = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes")
        steps = None
    else:
        starts, ends = ins[1].tolist(), ins[2].tolist()
        axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else None
        steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _reshape(node: ir.Node, x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    target = [int(d) for d in shape]
    if not _attr(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _cast(node: ir.Node, x: np.ndarray) -> np.ndarray:
    to = ir.DataType(_attr(node, "to"))
    if to in (ir.DataType.STRING,) or x.dtype.kind in "SOU":
        raise NotImplementedError
    return x.astype(to.numpy())


def _range(start, limit, delta):
    return np.arange(start.item(), limit.item(), delta.item()).astype(np.asarray(start).dtype)


def _expand(x, shape):
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))).copy()


def _constant_of_shape(node, shape):
    t = node.attributes.get("value")
    fill = t.value.numpy().reshape(-1)[0] if t is not None else np.float32(0)
    return np.full([int(d) for d in shape], fill, dtype=np.asarray(fill).dtype)


# op -> (node, numpy inputs) -> list of outputs
EVAL: dict[str, Callable[..., list[np.ndarray]]] = {
    "Add": lambda n, a, b: [a + b],
    "Sub": lambda n, a, b: [a - b],
    "Mul": lambda n, a, b: [a * b],
    "Div": lambda n, a, b: [_int_div(a, b) if a.dtype.kind in "iu" else a / b],
    "Pow": lambda n, a, b: [np.power(a, b).astype(a.dtype)],
    "Neg": lambda n, a: [-a],
    "Abs": lambda n, a: [np.abs(a)],
    "Sqrt": lambda n, a: [np.sqrt(a)],
    "Reciprocal": lambda n, a: [np.reciprocal(a)],
    "Floor": lambda n, a: [np.floor(a)],
    "Ceil": lambda n, a: [np.ceil(a)],
    "Equal": lambda n, a, b: [np.equal(a, b)],
    "Less": lambda n, a, b: [np.less(a, b)],
    "Greater": lambda n, a, b: [np.greater(a, b)],
    "LessOrEqual": lambda n, a, b: [np.less_equal(a, b)],
    "GreaterOrEqual": lambda n, a, b: [np.greater_equal(a, b)],
    "Not": lambda n, a: [np.logical_not(a)],
    "And": lambda n, a, b: [np.logical_and(a, b)],
    "Or": lambda n, a, b: [np.logical_or(a, b)],
    "Where": lambda n, c, a, b: [np.where(c, a, b)],
    "Max": lambda n, *xs: [np.maximum.reduce(np.broadcast_arrays(*xs))],
    "Min": lambda n, *xs: [np.minimum.reduce(np.broadcast_arrays(*xs))],
    "Cast": lambda n, x: [_cast(n, x)],
    "Identity": lambda n, x: [x],
    "Shape": lambda n, x: [np.array(x.shape[_attr(n, "start", 0):_attr(n, "end", None)], dtype=np.int64)],
    "Size": lambda n, x: [np.array(x.size, dtype=np.int64)],
    "Gather": lambda n, x, i: [np.take(x, i.astype(np.int64), axis=_attr(n, "axis", 0))],
    "Concat": lambda n, *xs: [np.concatenate(xs, axis=_attr(n, "axis"))],
    "Unsqueeze": lambda n, x, *r: [np.expand_dims(x, tuple(_normalize_axes(_axes(n, [x, *r], 1), x.ndim + len(_axes(n, [x, *r], 1)))))],
    "Squeeze": lambda n, x, *r: [np.squeeze(x, axis=None if _axes(n, [x, *r], 1) is None else tuple(_normalize_axes(_axes(n, [x, *r], 1), x.ndim)))],
    "Reshape": lambda n, x, s: [_reshape(n, x, s)],
    "Slice": lambda n, x, *r: [_slice(n, x, [x, *r])],
    "Range": lambda n, s, l, d: [_range(s, l, d)],
    "ConstantOfShape": lambda n, s: [_constant_of_shape(n, s)],
    "Expand": lambda n, x, s: [_expand(x, s)],
    "Transpose": lambda n, x: [np.transpose(x, _attr(n, "perm"))],
}


def _normalize_axes(axes: list[int], rank: int) -> list[int]:
    return [a + rank if a < 0 else a for a in axes]


def _reference_eval(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate one node with onnx's reference implementation (slow; used for ops not in EVAL)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if x is not None else "" for k, x in enumerate(inputs)]
    outs = [f"o{k}" for k in range(len(node.outputs))]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    graph = onnx.helper.make_graph(
        [proto], "fold",
        [onnx.helper.make_tensor_value_info(nm, onnx.helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
         for nm, x in zip(names, inputs) if x is not None],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {nm: x for nm, x in zip(names, inputs) if x is not None}
    return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]


def _output_too_big(node: ir.Node, inputs: list[np.ndarray | None], limit: int) -> bool:
    """Estimate ops whose output can dwarf their inputs before running them."""
    if node.op_type in ("ConstantOfShape", "Expand", "Tile", "Range"):
        out = node.outputs[0]
        if out.shape is not None and all(isinstance(d, int) for d in out.shape):
            return int(np.prod(list(out.shape))) * 8 > limit
        if node.op_type in ("ConstantOfShape",) and inputs[0] is not None:
            return int(np.prod(inputs[0])) * 8 > limit
        if node.op_type == "Expand":
            return int(np.prod(np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1])))) * 8 > limit
        if node.op_type == "Range":
            s, l, d = (x.item() for x in inputs)
            return d == 0 or abs((l - s) / d) * 8 > limit
        return True
    return False


@register_pass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant; fold static shape arithmetic; lift Constant nodes."""

    name = "fold-constants"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        limit = int(ctx.option("fold_limit_bytes", DEFAULT_LIMIT_BYTES))
        opset = model.opset_imports.get("", DEFAULT_OPSET)
        graph = model.graph
        interned: dict[tuple, ir.Value] = {}
        for v in graph.initializers.values():
            key = _intern_key(v)
            if key is not None:
                interned.setdefault(key, v)
        counts: dict[str, int] = {}
        numbering: dict[tuple, ir.Value] = {}
        for node in list(graph):
            if node.graph is not graph:
                continue
            what = self._fold_node(graph, node, opset, limit, interned, numbering)
            if what:
                counts[what] = counts.get(what, 0) + 1
        return PassResult(model, bool(counts), counts)

    def _fold_node(self, graph: ir.Graph, node: ir.Node, opset: int, limit: int,
                   interned: dict[tuple, ir.Value], numbering: dict[tuple, ir.Value]) -> str | None:
        if node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC:
            return None
        if any(o.is_graph_output() for o in node.outputs):
            return None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        if node.op_type == "Constant":
            tensor = const_tensor(node.outputs[0])
            if tensor is None:
                return None
            _replace_with_constant(graph, node, [tensor.numpy()] if tensor.size <= INTERN_MAX_ELEMENTS else [tensor],
                                   interned)
            return "lift-constant"
        if node.op_type == "Shape":
            return self._fold_shape(graph, node, interned, numbering)
        tensors = [const_tensor(v) if v is not None else None for v in node.inputs]
        if any(t is None and v is not None for t, v in zip(tensors, node.inputs)):
            return self._propagate_symbolic(graph, node, interned, numbering)
        if not node.inputs:
            return None
        in_bytes = sum(t.nbytes for t in tensors if t is not None)
        if in_bytes > limit:
            return self._fold_lazy(graph, node, tensors, interned)
        arrays = [t.numpy() if t is not None else None for t in tensors]
        if _output_too_big(node, arrays, limit):
            return None
        try:
            fn = EVAL.get(node.op_type)
            results = fn(node, *arrays) if fn is not None else _reference_eval(node, arrays, opset)
        except Exception:
            return None  # not foldable here (unsupported variant); leave it to run time
        if len(results) != len(node.outputs) or sum(np.asarray(r).nbytes for r in results) > limit:
            return None
        results = [_as_declared(np.asarray(r), out) for r, out in zip(results, node.outputs)]
        if any(r is None for r in results):
            return None
        _replace_with_constant(graph, node, results, interned)
        return node.op_type

    def _fold_shape(self, graph: ir.Graph, node: ir.Node, interned: dict[tuple, ir.Value],
                    numbering: dict[tuple, ir.Value]) -> str | None:
        dims = dims_of(node.inputs[0])
        if dims is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        dims = dims[start:end]
        if all(isinstance(d, int) for d in dims):
            _replace_with_constant(graph, node, [np.array(dims, dtype=np.int64)], interned)
            return "Shape"
        arr = np.empty(len(dims), dtype=object)
        arr[:] = list(dims)
        return self._record_symbolic(node.outputs[0], arr, numbering)

    def _propagate_symbolic(self, graph: ir.Graph, node: ir.Node, interned: dict[tuple, ir.Value],
                            numbering: dict[tuple, ir.Value]) -> str | None:
        """Evaluate a shape-vector op over symbolic elements; fold it when every element turns out known."""
        if node.op_type not in SYM_OPS or len(node.outputs) != 1:
            return None
        ins: list[np.ndarray | None] = []
        any_sym = False
        for v in node.inputs:
            if v is None:
                ins.append(None)
                continue
            arr = v.meta.get(SYM_ARRAY_KEY)
            if arr is not None:
                any_sym = True
            else:
                arr = const_array(v, SYM_MAX_ELEMENTS)
                if arr is None or arr.dtype.kind not in "iub":
                    return None
            ins.append(arr)
        if not any_sym:
            return None
        try:
            result = _sym_eval(node, ins)
        except Exception:
            return None
        if result is None or result.size > SYM_MAX_ELEMENTS:
            return None
        if all(isinstance(x, (int, bool, np.integer, np.bool_)) for x in result.reshape(-1)):
            dtype = node.outputs[0].dtype or _result_dtype(node)
            if dtype is None:  # the folded constant's type must be known, not guessed
                return self._record_symbolic(node.outputs[0], result, numbering)
            _replace_with_constant(graph, node, [result.astype(dtype.numpy())], interned)
            return f"{node.op_type}-symbolic"
        return self._record_symbolic(node.outputs[0], result, numbering)

    @staticmethod
    def _record_symbolic(out: ir.Value, arr: np.ndarray, numbering: dict[tuple, ir.Value]) -> str | None:
        """Store the symbolic contents; a value equal to an earlier one (same known symbols) is merged into it."""
        out.meta[SYM_ARRAY_KEY] = arr
        out.meta[SYM_KEY] = tuple(arr.reshape(-1).tolist())
        flat = arr.reshape(-1).tolist()
        if any(isinstance(x, Unknown) for x in flat) or out.is_graph_output():
            return None
        key = (int(out.dtype) if out.dtype is not None else None, arr.shape, tuple(map(str, flat)),
               tuple(type(x).__name__ for x in flat))
        prior = numbering.get(key)
        if prior is None or prior.producer() is None or prior.producer().graph is None:
            numbering[key] = out
            return None
        if not out.uses():
            return None  # merged on an earlier run: nothing left to do
        out.replace_all_uses_with(prior)
        return "merge-symbolic"
    def _fold_lazy(self, graph: ir.Graph, node: ir.Node, tensors: list, interned: dict[tuple, ir.Value]
                   ) -> str | None:
        if node.op_type not in LAZY_OPS or len(tensors) != 1 or tensors[0] is None:
            return None
        src = tensors[0]
        shape = list(src.shape)
        if node.op_type == "Transpose":
            if len(shape) == 2 and read_elsewhere(node.inputs[0]):
                return None     # a table read elsewhere too (a tied lm_head): fuse-transposed-matmul reads it as is
            perm = _attr(node, "perm") or list(reversed(range(len(shape))))
            shape = [shape[p] for p in perm]
            dtype = src.dtype
            fn = (lambda t=src, p=perm: _computed(t, lambda a: np.ascontiguousarray(np.transpose(a, p))))
        else:
            dtype = ir.DataType(_attr(node, "to"))
            if dtype.numpy() is None or src.dtype == ir.DataType.STRING:
                return None
            fn = (lambda t=src, d=dtype: _computed(t, lambda a: a.astype(d.numpy())))
        lazy = ir.LazyTensor(fn, dtype=dtype, shape=ir.Shape(shape))
        _replace_with_constant(graph, node, [lazy], interned)
        return f"{node.op_type}-lazy"


# ---------------------------------------------------------------------------------------------------- symbolic
def _is_num(x) -> bool:
    return isinstance(x, (int, bool, np.integer, np.bool_))


def _sym_binary(op: str, a, b):
    """One element of a shape-vector op: exact where the algebra allows, otherwise a fresh Unknown."""
    if _is_num(a) and _is_num(b):
        a, b = int(a), int(b)
        if op == "Div":
            return (abs(a) // abs(b)) * (1 if (a < 0) == (b < 0) else -1) if b else Unknown()
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Equal": a == b, "Max": max(a, b),
                "Min": min(a, b)}[op]
    if op == "Equal":
        # A dim is never negative, so a symbolic dim differs from any negative constant.
        # A named dim is never negative, so it differs from any negative constant. (Unknown elements may be
        # results of arithmetic, which can be negative: no conclusion for them.)
        sym, other = (a, b) if _is_num(b) else (b, a) if _is_num(a) else (None, None)
        if isinstance(sym, str) and int(other) < 0:
            return False
        if a is b or (isinstance(a, str) and a == b):
            return True
        return Unknown()
    if op in ("Add", "Sub") and _is_num(b) and int(b) == 0:
        return a
    if op == "Add" and _is_num(a) and int(a) == 0:
        return b
    if op in ("Mul", "Div") and _is_num(b) and int(b) == 1:
        return a
    if op == "Mul" and _is_num(a) and int(a) == 1:
        return b
    if op == "Sub" and (a is b or (isinstance(a, str) and a == b)):
        return 0
    if op in ("Max", "Min") and (a is b or (isinstance(a, str) and a == b)):
        return a
    return Unknown()


def _result_dtype(node: ir.Node) -> ir.DataType | None:
    """The output type the ONNX schema implies for the shape-vector ops (all but Equal/Where/Cast keep T)."""
    if node.op_type == "Equal":
        return ir.DataType.BOOL
    if node.op_type == "Cast":
        return ir.DataType(_attr(node, "to"))
    source = node.inputs[1] if node.op_type == "Where" else node.inputs[0]
    return source.dtype if source is not None else None


def _sym_eval(node: ir.Node, ins: list) -> np.ndarray | None:
    op = node.op_type
    if op in ("Equal", "Add", "Sub", "Mul", "Div", "Max", "Min"):
        if len(ins) != 2 or any(x is None for x in ins):
            return None
        a, b = np.broadcast_arrays(np.asarray(ins[0], dtype=object), np.asarray(ins[1], dtype=object))
        out = np.empty(a.shape, dtype=object)
        for idx in np.ndindex(a.shape):
            out[idx] = _sym_binary(op, a[idx], b[idx])
        return out
    if op == "Where":
        c, a, b = np.broadcast_arrays(*(np.asarray(x, dtype=object) for x in ins))
        out = np.empty(c.shape, dtype=object)
        for idx in np.ndindex(c.shape):
            cond = c[idx]
            out[idx] = (a[idx] if cond else b[idx]) if _is_num(cond) else Unknown()
        return out
    if op == "Cast":
        to = ir.DataType(_attr(node, "to"))
        if to not in (ir.DataType.INT64, ir.DataType.INT32):
            return None
        return np.asarray(ins[0], dtype=object)
    obj = [np.asarray(x, dtype=object) if (x is not None and k == 0) or op == "Concat" else x
           for k, x in enumerate(ins)]
    return np.asarray(EVAL[op](node, *obj)[0], dtype=object)


def _computed(src: ir.TensorProtocol, f) -> ir.Tensor:
    """Apply f to a (possibly memory-mapped) tensor, then drop the mapping so its pages can leave memory."""
    out = ir.tensor(f(src.numpy()))
    if isinstance(src, ir.ExternalTensor):
        src.release()
    return out


def _as_declared(arr: np.ndarray, out: ir.Value) -> np.ndarray | None:
    if out.dtype is None:
        return arr
    want = out.dtype.numpy()
    if arr.dtype == want:
        return arr
    if arr.dtype.kind == np.dtype(want).kind or (arr.dtype.kind in "iub" and np.dtype(want).kind in "iub"):
        return arr.astype(want)
    return None


def _const_key(arr: np.ndarray) -> tuple:
    """Equal small constants get equal keys, so they can share one initializer."""
    return (str(arr.dtype), arr.shape, arr.tobytes())


def _intern_key(v: ir.Value) -> tuple | None:
    t = v.const_value
    if t is None or v.is_graph_input() or v.is_graph_output() or t.size > INTERN_MAX_ELEMENTS:
        return None
    if isinstance(t, ir.LazyTensor):
        return None
    return _const_key(t.numpy())


def _replace_with_constant(graph: ir.Graph, node: ir.Node, results: list, interned: dict[tuple, ir.Value]) -> None:
    """Replace every output of `node` with an initializer holding the result, then remove the node."""
    for out, result in zip(node.outputs, results):
        if isinstance(result, np.ndarray):
            key = _const_key(result) if result.size <= INTERN_MAX_ELEMENTS else None
            shared = interned.get(key) if key is not None else None
            if shared is not None:
                out.replace_all_uses_with(shared)
                continue
            tensor = ir.tensor(result)
        else:
            key, tensor = None, result
        name = out.name
        new = ir.Value(name=None, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype),
                       const_value=tensor)
        out.replace_all_uses_with(new)
        out.name = None
        new.name = name
        graph.register_initializer(new)
        if key is not None:
            interned[key] = new
    graph.remove(node, safe=True)
