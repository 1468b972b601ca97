"""Shared test code: ONNX text in, structural comparison by position, and runs in onnxruntime.

    model = parse(TEXT)                                   # onnx_ir.Model from ONNX text syntax
    check_before_after(BEFORE, "remove-noops", AFTER)     # run, verify, compare structure and numbers
    assert_same_outputs(before_proto, after_model)        # seeded random inputs, tolerance by dtype
    assert_refused("fuse-rms-norm", TEXT, inits, REASON)  # a rule says why it does not fire; nothing changes
    check_fusion(TEXT, inits, transform, "fuse-rms-norm", fires=True, removed_op="ReduceMean")   # property body

Structure is compared after normalizing value names away: a node is (domain, op type, attributes, inputs) where
an input is a graph input's position, another node's position and output index, or a constant's value. Node
positions come from a walk from the graph outputs, so the order nodes happen to be listed in does not matter.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxc.pipeline  # noqa: F401  (registers the built-in passes)
import onnxruntime as ort
import pytest
from onnxc.pass_manager import PassContext, PassResult, get_pass
from onnxc.rules import explain
from onnxc.verifier import Signature, check_model

HEADER = '<ir_version: 8, opset_import: ["" : 18]>'

FIXTURES_ROOT = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_entries() -> list[dict[str, Any]]:
    """The bundled models the committed manifest lists (exports that failed are listed as skipped, and left out).
    Tests find fixtures only here, never by listing fixtures/models, so nothing else written there is picked up."""
    manifest = json.loads((FIXTURES_ROOT / "manifest.json").read_text())
    return [e for e in manifest["models"] if not e.get("skipped")]


def fixture_files() -> list[Path]:
    """The manifest's model files, sorted by name."""
    return sorted((FIXTURES_ROOT / e["file"] for e in fixture_entries()), key=lambda p: p.name)

TOLERANCES = {  # dtype -> (rtol, atol)
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float16): (1e-3, 1e-3),
    np.dtype(np.float64): (1e-12, 1e-12),
}


# ------------------------------------------------------------------------------------------------ building models
def parse_proto(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """ONNX text (a header is added when missing) plus optional numpy initializers -> ModelProto."""
    if not text.lstrip().startswith("<"):
        text = HEADER + "\n" + text
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    return proto


def parse(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    return ir.serde.deserialize_model(parse_proto(text, initializers))


def to_bytes(model: ir.Model | onnx.ModelProto) -> bytes:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return proto.SerializeToString(deterministic=True)


# ------------------------------------------------------------------------------------------------ running passes
def run_pass(model: ir.Model, name: str, **options: Any) -> PassResult:
    return get_pass(name).run(model, PassContext(options=options))


def run_passes(model: ir.Model, names: Sequence[str], **options: Any) -> dict[str, int]:
    """Run passes in order; return the merged counts."""
    counts: dict[str, int] = {}
    for name in names:
        for k, v in run_pass(model, name, **options).counts.items():
            counts[k] = counts.get(k, 0) + v
    return counts


def counting(name: str, before: Sequence[str] = (), after: Sequence[str] = (), **options: Any
             ) -> Callable[[ir.Model], dict[str, int]]:
    """A transform that runs `before`, then `name`, then `after`, and returns the counts of `name` alone."""
    def transform(model: ir.Model) -> dict[str, int]:
        run_passes(model, before, **options)
        counts = run_pass(model, name, **options).counts
        run_passes(model, after, **options)
        return counts
    transform.__name__ = name
    return transform


def assert_valid(model: ir.Model, original: ir.Model | onnx.ModelProto | None = None) -> None:
    signature = None
    if original is not None:
        signature = Signature.of(original if isinstance(original, ir.Model) else ir.serde.deserialize_model(original))
    problems = check_model(model, signature)
    assert problems == [], problems


def assert_unchanged_by(model: ir.Model, name: str, **options: Any) -> None:
    """Idempotence: a second run reports no change, counts nothing and leaves the same bytes."""
    before = to_bytes(model)
    result = run_pass(model, name, **options)
    assert not result.modified, result.counts
    if name != "infer-shapes":  # infer-shapes reports what it refined, never a change
        assert result.counts == {}
    assert to_bytes(model) == before


# ------------------------------------------------------------------------------------------------ structure
def _tensor_key(t: ir.TensorProtocol) -> tuple:
    arr = np.asarray(t.numpy())
    return ("tensor", str(arr.dtype), tuple(arr.shape), arr.reshape(-1).tolist())


def _attr_key(a: ir.Attr) -> Any:
    if a.type == ir.AttributeType.TENSOR:
        return _tensor_key(a.value)
    if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return ("graph",)
    v = a.value
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _walk_order(graph: ir.Graph) -> list[ir.Node]:
    """Nodes in post-order from the graph outputs (inputs by position), then unreachable ones in list order."""
    order: list[ir.Node] = []
    seen: set[int] = set()

    def visit(node: ir.Node) -> None:
        stack: list[tuple[ir.Node, int]] = [(node, 0)]
        while stack:
            n, i = stack.pop()
            if i == 0 and id(n) in seen:
                continue
            seen.add(id(n))
            if i < len(n.inputs):
                stack.append((n, i + 1))
                v = n.inputs[i]
                p = v.producer() if v is not None else None
                if p is not None and p.graph is graph and id(p) not in seen:
                    stack.append((p, 0))
            else:
                order.append(n)

    for out in graph.outputs:
        p = out.producer()
        if p is not None and p.graph is graph:
            visit(p)
    for n in graph:
        if id(n) not in seen:
            visit(n)
    return order


def canonical(model: ir.Model) -> dict[str, Any]:
    """A name-free description of the main graph (see the module docstring)."""
    graph = model.graph
    order = _walk_order(graph)
    position = {id(n): k for k, n in enumerate(order)}
    inputs = {id(v): i for i, v in enumerate(graph.inputs)}

    def ref(v: ir.Value | None) -> Any:
        if v is None:
            return None
        if id(v) in inputs:
            return ("input", inputs[id(v)])
        p = v.producer()
        if p is not None and id(p) in position:
            return ("node", position[id(p)], v.index())
        if v.const_value is not None:
            return _tensor_key(v.const_value)
        return ("undefined", v.name)

    nodes = []
    for n in order:
        attrs = tuple(sorted((k, _attr_key(a)) for k, a in n.attributes.items()))
        domain = "" if n.domain in ("", "ai.onnx") else n.domain
        nodes.append((domain, n.op_type, attrs, tuple(ref(v) for v in n.inputs), len(n.outputs)))
    initializers = sorted((_tensor_key(v.const_value) for v in graph.initializers.values()
                           if v.const_value is not None and not v.is_graph_input()), key=repr)
    return {
        "inputs": [(v.name, v.dtype) for v in graph.inputs],
        "outputs": [(v.name, ref(v)) for v in graph.outputs],
        "nodes": nodes,
        "initializers": initializers,
    }


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in _walk_order(model.graph)]


# ------------------------------------------------------------------------------------------------ numbers
def session(model: ir.Model | onnx.ModelProto | bytes) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else to_bytes(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_ort(model: ir.Model | onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def random_feeds(model: ir.Model | onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None
                 ) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input; symbolic dims take their size from `dims` (default 3)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else (dims or {}).get(str(d.value), 3) for d in (v.shape or ())]
        dtype = v.dtype.numpy()
        if np.dtype(dtype).kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif np.dtype(dtype).kind == "b":
            arr = rng.random(shape) > 0.5
        else:
            arr = rng.integers(-5, 6, size=shape).astype(dtype)
        feeds[v.name] = np.asarray(arr)
    return feeds


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str = "", precision: Any = None) -> None:
    """Equal within the tolerance of the output's dtype, or of `precision` (a float dtype the values went through)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = TOLERANCES.get(expected.dtype)
    if tol is not None and precision is not None:
        tol = max(tol, TOLERANCES[np.dtype(precision)])
    if tol is None:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tol[0],
                                   atol=tol[1], err_msg=what)


def assert_same_outputs(before: ir.Model | onnx.ModelProto, after: ir.Model | onnx.ModelProto, *,
                        dims: dict[str, int] | None = None, seeds: Iterable[int] = (0, 1), precision: Any = None
                        ) -> None:
    """Run both models in onnxruntime on the same seeded inputs and compare every output.

    `precision`: the lowest float dtype the computation goes through, when an output has a wider one (an fp16
    kernel may round differently by one unit depending on buffer alignment, and a Cast to double keeps that).
    """
    before_bytes, after_bytes = to_bytes(before), to_bytes(after)
    s_before, s_after = session(before_bytes), session(after_bytes)
    for seed in seeds:
        feeds = random_feeds(before if isinstance(before, onnx.ModelProto) else ir.serde.serialize_model(before),
                             seed, dims)
        expected = s_before.run(None, feeds)
        actual = s_after.run(None, feeds)
        assert len(actual) == len(expected)
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"output {k}, seed {seed}", precision)


# ------------------------------------------------------------------------------------------------ before/after
Transform = str | Sequence[str] | Callable[[ir.Model], Any]


def apply(transform: Transform, model: ir.Model, **options: Any) -> Any:
    if callable(transform):
        return transform(model)
    names = [transform] if isinstance(transform, str) else list(transform)
    return run_passes(model, names, **options)


def check_before_after(before: str, transform: Transform, expected: str | type[BaseException] | None, *,
                       initializers: dict[str, np.ndarray] | None = None,
                       expected_initializers: dict[str, np.ndarray] | None = None, numeric: bool = True,
                       dims: dict[str, int] | None = None, **options: Any) -> tuple[ir.Model, Any]:
    """TVM-style: `expected` is the graph after the transform, None for "unchanged", or an exception class.

    `initializers` are added to the input graph, `expected_initializers` to the expected one.

    Also checks the verifier (with the input's signature) and, when `numeric`, the outputs in onnxruntime.
    """
    proto = parse_proto(before, initializers)
    model = ir.serde.deserialize_model(proto)
    if isinstance(expected, type) and issubclass(expected, BaseException):
        with pytest.raises(expected):
            apply(transform, model, **options)
        return model, None
    result = apply(transform, model, **options)
    assert_valid(model, proto)
    want = ir.serde.deserialize_model(proto) if expected is None else parse(expected, expected_initializers)
    assert canonical(model) == canonical(want)
    if numeric:
        assert_same_outputs(proto, model, dims=dims)
    return model, result


# ------------------------------------------------------------------------------------------------ fusions
def assert_refused(name: str, text: str, initializers: dict[str, np.ndarray], reason: str,
                   fallback: dict[str, int] | None = None, precision: Any = None) -> None:
    """After infer-shapes, a rule of pass `name` refuses with `reason` (explain); the pass then changes nothing, or
    applies only the rules counted in `fallback` (and the outputs still agree)."""
    model = parse(text, initializers)
    run_passes(model, ["infer-shapes"])
    rows = [r for rule in get_pass(name).rules() for _, r in explain(model, rule)]
    assert any(reason in r for r in rows), rows
    before = to_bytes(model)
    assert run_pass(model, name).counts == (fallback or {})
    if fallback:
        assert_same_outputs(parse_proto(text, initializers), model, precision=precision)
    else:
        assert to_bytes(model) == before


def check_fusion(text: str, initializers: dict[str, np.ndarray], transform: Callable[[ir.Model], dict[str, int]],
                 name: str, *, fires: bool, removed_op: str, dims: dict[str, int] | None = None,
                 precision: Any = None) -> ir.Model:
    """A property test's body: `transform` (which runs pass `name`) fires exactly once when `fires` (else never),
    `removed_op` is left exactly when it does not fire, the verifier passes, outputs agree, and a second run of the
    pass changes nothing."""
    proto = parse_proto(text, initializers)
    model = parse(text, initializers)
    counts = transform(model)
    assert sum(counts.values()) == int(fires), counts
    assert (removed_op in op_types(model)) != fires, op_types(model)
    assert_valid(model, proto)
    assert_same_outputs(proto, model, dims=dims, precision=precision)
    assert_unchanged_by(model, name)
    return model


def break_norm(text: str, initializers: dict[str, np.ndarray], how: str | None, hidden: int) -> tuple[str, dict]:
    """A norm graph over `hidden` channels that no norm rule may fuse: "eps" makes epsilon (initializer `eps`) a
    vector, "axes" reduces axis 0 (initializer `axes`, or the ReduceMean attribute below opset 18); None leaves it."""
    initializers = dict(initializers)
    if how == "eps":
        initializers["eps"] = np.full(hidden, initializers["eps"], initializers["eps"].dtype)
    elif how == "axes":
        initializers["axes"] = np.array([0], np.int64)
        text = text.replace("ReduceMean<axes=[-1], keepdims=1>", "ReduceMean<axes=[0], keepdims=1>")
    elif how is not None:
        raise ValueError(f"unknown way to break a norm: {how}")
    return text, initializers


# ------------------------------------------------------------------------------------------------ plugins
_ADD_TO_SUB = '''\
import onnxc
from onnxc.pass_manager import Pass, PassResult

@onnxc.register_pass
class FirstAddToSub(Pass):
    """Turns the first Add into a Sub: a numerically wrong rewrite."""
    name = "NAME"
    level = 1
    stage = "fuse"
    def run(self, model, ctx):
        for node in model.graph:
            if node.op_type == "Add":
                node.op_type = "Sub"
                return PassResult(model, True, {"broken": 1})
        return PassResult(model, False, {})
'''


def add_to_sub_plugin(folder: Path, name: str) -> Path:
    """A plugin file registering pass `name`, which turns the model's first Add into a Sub: a numerically wrong
    rewrite, for the checks that must catch it and name the pass."""
    path = folder / f"{name}.py"
    path.write_text(_ADD_TO_SUB.replace('"NAME"', repr(name)))
    return path
