"""Local verification: each pass's output against its input, restricted to the region it changed.

Used when the whole model cannot run in onnxruntime (an op of a custom domain with no kernel). Every pass that
reports a change is wrapped (`wrap`): a light snapshot of the graph is taken before it runs (per node: op, domain,
attributes, input and output values; no tensor is copied), and afterwards the difference is cut into regions:

- a node that is gone, new, or changed in op, domain or attributes is in the region (on the side, before or after,
  where it exists);
- a node whose only change is which values it reads (a consumer rewired to a replacement) is not: the values it
  read before and reads now, slot by slot, are compared, so the consumer itself (a custom op, say) never runs;
- graph outputs are compared slot by slot, and so are the values in-place-changed nodes produce for unchanged code;
- regions connected through a value one side produces and reads, or through a compared pair, are one site.

Each site becomes two small models over the same inputs: the nodes before the pass and the nodes after it.
Integer and boolean inputs (shape and index arithmetic), inputs only one side reads, and inputs with a dim the
scenario does not size are computed: each model pulls in their producers from its own graph (before or after the
pass), recursively, down to graph inputs (fed as whole-model verification feeds them: token ids below the table
size, masks of ones, positions after the past) or to a custom op, so a rewrite that relies on how its inputs relate
is checked on related inputs. The rest are drawn at random, of their inferred dtype and shape. Both run in
onnxruntime and every compared pair must agree within the dtype's tolerance.
A site whose "before" model cannot run (it holds the custom op, an input of unknown shape, a subgraph, or random
values it rejects) is reported as not checkable, with the reason; a site whose "after" model disagrees, or fails
to run while "before" ran, fails the compile at that pass, naming the site.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from . import pass_manager as pm
from . import verify as numeric
from .errors import VerificationError, first_line

RUNNABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
PULL_MAX_NODES = 400               # unchanged producers pulled into one site's models
MAX_CONSTANT_BYTES = 32 << 20       # a site reading more constant data than this is not checked (noted)
PULL_MAX_WEIGHT_BYTES = 4 << 20     # a producer reading a larger constant is not pulled in (its output is an input)
MAX_SITES = 5000                    # checks per compile; further sites are counted as not checked
DEFAULT_DIM = 3                     # a symbolic dim the verification scenario does not size


def unrunnable_ops(model: ir.Model) -> list[str]:
    """'domain.op' of every op in a domain onnxruntime has no kernels for (model-local functions excepted)."""
    local = {(f.domain, f.name) for f in model.functions.values()}
    found = {f"{n.domain}.{n.op_type}" for g in model.graphs() for n in g
             if n.domain not in RUNNABLE_DOMAINS and (n.domain, n.op_type) not in local}
    return sorted(found)


@dataclass
class LocalReport:
    checked: int = 0                                          # sites compared and agreeing
    unchecked: list[dict[str, str]] = field(default_factory=list)
    per_pass: dict[str, int] = field(default_factory=dict)    # pass -> sites checked

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "unchecked": len(self.unchecked), "per_pass": dict(self.per_pass),
                "not_checked": self.unchecked[:50]}


@dataclass
class _State:
    node: ir.Node
    op_type: str
    domain: str
    attrs: dict[str, Any]
    inputs: tuple[ir.Value | None, ...]
    outputs: tuple[ir.Value, ...]

    @property
    def kind(self) -> tuple:
        return (self.op_type, self.domain, tuple((k, id(a)) for k, a in self.attrs.items()),
                tuple(id(v) for v in self.outputs))


def _same_node(b: _State, a: _State) -> bool:
    """The node computes the same function before and after: the same op, attributes and outputs, and each input
    it reads now like the one it read before (a rewired consumer; a slot that changed meaning, e.g. Q, K, V turned
    into one packed input, makes the node part of the changed region)."""
    if b.kind != a.kind or len(b.inputs) != len(a.inputs):
        return False
    for vb, va in zip(b.inputs, a.inputs):
        if vb is va:
            continue
        if vb is None or va is None or vb.dtype != va.dtype or vb.shape is None or va.shape is None \
                or list(vb.shape) != list(va.shape):
            return False
    return True


def _snapshot(graph: ir.Graph) -> tuple[dict[int, _State], list[ir.Value]]:
    states = {id(n): _State(n, n.op_type, n.domain, dict(n.attributes), tuple(n.inputs), tuple(n.outputs))
              for n in graph}
    return states, list(graph.outputs)


class LocalChecker:
    """Checks each pass run's changed regions (module docstring); collects a LocalReport."""

    def __init__(self, model: ir.Model, seed: int = 0, tolerance_dtype: str | None = None):
        self.seed = seed
        self.tolerance_dtype = tolerance_dtype
        self.report = LocalReport()
        inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        scenario = replace(numeric.scenarios_for(model)[0], pad=0)     # a site's outputs are compared whole
        self.sizes = numeric._assign_dims(inputs, scenario, any(numeric.input_role(v) == "past" for v in inputs))
        self.graph_feeds = numeric.make_inputs(model, scenario, seed)
        self.opsets = dict(model.opset_imports)
        self.ir_version = model.ir_version

    def wrap(self, passes: Sequence[pm.Pass]) -> list[pm.Pass]:
        out: list[pm.Pass] = []
        for p in passes:
            if isinstance(p, pm.FixedPoint):
                out.append(pm.FixedPoint(self.wrap(p.passes), p.max_iterations))
            else:
                out.append(_Checked(p, self))
        return out

    # -------------------------------------------------------------------------------------------- one pass run
    def check(self, pass_name: str, before: tuple[dict[int, _State], list[ir.Value]], model: ir.Model) -> None:
        b_states, b_outputs = before
        a_states, a_outputs = _snapshot(model.graph)
        side_b = {k: s for k, s in b_states.items() if k not in a_states or not _same_node(s, a_states[k])}
        side_a = {k: s for k, s in a_states.items() if k not in b_states or not _same_node(b_states[k], s)}
        pairs: list[tuple[ir.Value | None, ir.Value | None]] = []
        for k, s in a_states.items():           # consumers rewired to other values: compare what they read
            if k in b_states and k not in side_a:
                for vb, va in zip(b_states[k].inputs, s.inputs):
                    if vb is not va:
                        pairs.append((vb, va))
        for vb, va in zip(b_outputs, a_outputs):
            if vb is not va or (vb.producer() is not None and id(vb.producer()) in side_a):
                pairs.append((vb, va))
        changed_in_place = set(side_a) & set(side_b)
        for k in changed_in_place:              # what in-place changed nodes give to unchanged code
            for v in a_states[k].outputs:
                if any(id(u.node) not in side_a for u in v.uses()):
                    pairs.append((v, v))
        if not pairs:
            return                              # only dead code went, or nodes were reordered
        prod_b = {id(v): st for st in b_states.values() for v in st.outputs}
        prod_a = {id(v): st for st in a_states.values() for v in st.outputs}
        for region_b, region_a, site_pairs in _sites(side_b, side_a, pairs):
            self._check_site(pass_name, region_b, region_a, site_pairs, prod_b, prod_a)

    def _check_site(self, pass_name: str, region_b: list[_State], region_a: list[_State],
                    pairs: list[tuple[ir.Value, ir.Value]], prod_b: dict[int, _State],
                    prod_a: dict[int, _State]) -> None:
        first = (region_b or region_a or [None])[0]
        site = (first.node.name or first.op_type) if first is not None else (pairs[0][0].name or "?")
        if self.report.checked + len(self.report.unchecked) >= MAX_SITES:
            self._skip(pass_name, site, f"over {MAX_SITES} sites in one compile")
            return
        pulled_b, pulled_a = _pull(region_b, region_a, pairs, prod_b, prod_a, set(self.sizes))
        try:
            feeds, names = self._feeds(region_b + pulled_b, region_a + pulled_a, pairs)
            before = _build(region_b + pulled_b, [p[0] for p in pairs], names, self.opsets, self.ir_version)
            after = _build(region_a + pulled_a, [p[1] for p in pairs], names, self.opsets, self.ir_version)
        except _NotCheckable as exc:
            self._skip(pass_name, site, str(exc))
            return
        try:
            want = _run(before, feeds)
        except Exception as exc:
            self._skip(pass_name, site, f"the region before the pass does not run ({first_line(exc, 160)})")
            return
        try:
            got = _run(after, feeds, creating=True)
        except _NoKernel as exc:
            self._skip(pass_name, site, f"the region after the pass has no kernel here ({exc})")
            return
        except Exception as exc:
            raise self._failure(pass_name, site, f"the rewritten region does not run ({first_line(exc, 160)})"
                                ) from None
        for k, (w, g) in enumerate(zip(want, got)):
            label = pairs[k][0].name or f"output {k}"
            c = numeric.compare(w, g, label, self.tolerance_dtype)
            if not c.ok:
                raise self._failure(pass_name, site, f"value '{label}' differs: max abs error {c.max_abs:.3g} "
                                    f"(relative {c.max_rel:.3g}), tolerance rtol={c.rtol:g} atol={c.atol:.3g}")
        self.report.checked += 1
        self.report.per_pass[pass_name] = self.report.per_pass.get(pass_name, 0) + 1

    def _failure(self, pass_name: str, site: str, reason: str) -> VerificationError:
        exc = VerificationError(f"verification failed after pass {pass_name} (local check at node {site}): {reason}; "
                                "nothing was written")
        exc.report = {"verification": {"status": "failed", "checks": "local", "reason": reason,   # type: ignore
                                       "bisect": {"status": "found", "pass_name": pass_name, "site": site},
                                       "local": self.report.to_dict()}}
        return exc

    def _skip(self, pass_name: str, site: str, reason: str) -> None:
        self.report.unchecked.append({"pass": pass_name, "site": site, "reason": reason})

    def _feeds(self, nodes_b: list[_State], nodes_a: list[_State], pairs: list[tuple[ir.Value, ir.Value]]
               ) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Random values for the inputs both models read (constants excepted), and a name for every value."""
        names: dict[int, str] = {}
        feeds: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(self.seed)
        made_b = {id(v) for s in nodes_b for v in s.outputs}
        made_a = {id(v) for s in nodes_a for v in s.outputs}
        reads = [(v, made_b) for s in nodes_b for v in s.inputs if v is not None]
        reads += [(v, made_a) for s in nodes_a for v in s.inputs if v is not None]
        reads += [(vb, made_b) for vb, _ in pairs] + [(va, made_a) for _, va in pairs]
        for v, made in reads:
            if id(v) in made or v.const_value is not None:
                names.setdefault(id(v), f"v{len(names)}")
                continue
            if id(v) in made_a or id(v) in made_b:
                raise _NotCheckable(f"value '{v.name}' is computed on one side only")
            if id(v) in names:
                continue
            names[id(v)] = f"v{len(names)}"
            given = self.graph_feeds.get(v.name) if v.is_graph_input() else None
            feeds[names[id(v)]] = given if given is not None else self._random(v, rng)
        for s in nodes_b + nodes_a:
            for v in s.outputs:
                names.setdefault(id(v), f"v{len(names)}")
        return feeds, names

    def _random(self, v: ir.Value, rng: np.random.Generator) -> np.ndarray:
        if v.shape is None or v.dtype is None:
            raise _NotCheckable(f"value '{v.name}' has no inferred {'shape' if v.shape is None else 'type'}")
        shape = []
        for d in v.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(self.sizes.get(d.value, DEFAULT_DIM) if d.value is not None else DEFAULT_DIM)
        try:
            dtype = np.dtype(v.dtype.numpy())
        except Exception:
            raise _NotCheckable(f"value '{v.name}' has type {v.dtype}, which no random input is made for") from None
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, size=shape).astype(bool)
        if dtype.kind in "iu":
            return rng.integers(0, 2, size=shape).astype(dtype)
        raise _NotCheckable(f"value '{v.name}' has type {v.dtype}, which no random input is made for")


class _Checked(pm.Pass):
    """A pass with a local check of what it changed (it keeps the wrapped pass's name and place)."""

    def __init__(self, inner: pm.Pass, checker: LocalChecker):
        self.inner = inner
        self.checker = checker
        self.name, self.level, self.targets = inner.name, inner.level, inner.targets

    def rules(self):
        return self.inner.rules()

    def run(self, model: ir.Model, ctx: pm.PassContext) -> pm.PassResult:
        before = _snapshot(model.graph)
        result = self.inner.run(model, ctx)
        if isinstance(result, pm.PassResult) and result.modified:
            self.checker.check(self.inner.name, before, result.model)
        return result


class _NotCheckable(Exception):
    pass


class _NoKernel(Exception):
    pass


def _sites(side_b: dict[int, _State], side_a: dict[int, _State], pairs: list[tuple[ir.Value, ir.Value]]
           ) -> list[tuple[list[_State], list[_State], list[tuple[ir.Value, ir.Value]]]]:
    """Split the changed regions and the compared pairs into connected sites."""
    parent: dict[Any, Any] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(x, y):
        parent[find(x)] = find(y)

    for tag, side in (("b", side_b), ("a", side_a)):
        producer = {id(v): k for k, s in side.items() for v in s.outputs}
        for k, s in side.items():
            find((tag, k))
            for v in s.inputs:
                if v is not None and id(v) in producer:
                    union((tag, k), (tag, producer[id(v)]))
        if tag == "a":
            for k in side:
                if k in side_b:
                    union(("a", k), ("b", k))
    prod_b = {id(v): k for k, s in side_b.items() for v in s.outputs}
    prod_a = {id(v): k for k, s in side_a.items() for v in s.outputs}
    pair_keys = []
    for vb, va in pairs:
        keys = ([("b", prod_b[id(vb)])] if vb is not None and id(vb) in prod_b else []) + \
               ([("a", prod_a[id(va)])] if va is not None and id(va) in prod_a else [])
        for x in keys[1:]:
            union(keys[0], x)
        pair_keys.append(keys[0] if keys else ("pair", len(pair_keys)))
        find(pair_keys[-1])
    groups: dict[Any, tuple[list[_State], list[_State], list]] = {}
    order = list(parent)
    for key in order:
        root = find(key)
        groups.setdefault(root, ([], [], []))
        if key[0] == "b":
            groups[root][0].append(side_b[key[1]])
        elif key[0] == "a":
            groups[root][1].append(side_a[key[1]])
    for (vb, va), key in zip(pairs, pair_keys):
        if vb is not None and va is not None:
            groups[find(key)][2].append((vb, va))
    return [g for g in groups.values() if g[2]]


def _pull(region_b: list[_State], region_a: list[_State], pairs: list[tuple[ir.Value, ir.Value]],
          prod_b: dict[int, _State], prod_a: dict[int, _State], sized: set[str]) -> tuple[list[_State], list[_State]]:
    """The producers each side's model computes rather than draw at random (the before model from the graph before
    the pass, the after model from the graph after it): those of inputs only one side reads, of integer and boolean
    inputs, and of inputs with a dim the scenario does not size, recursively (at most PULL_MAX_NODES nodes a side),
    stopping at graph inputs, constants, ops onnxruntime cannot run and ops reading a weight (a constant over
    PULL_MAX_WEIGHT_BYTES: the site then takes its output as an input)."""
    pulled: dict[str, list[_State]] = {"b": [], "a": []}
    have = {"b": {id(s.node) for s in region_b}, "a": {id(s.node) for s in region_a}}
    regions = {"b": region_b, "a": region_a}
    producers = {"b": prod_b, "a": prod_a}

    def reads(side: str) -> dict[int, ir.Value]:
        nodes = regions[side] + pulled[side]
        produced = {id(v) for s in nodes for v in s.outputs}
        compared = [p[0 if side == "b" else 1] for p in pairs]
        return {id(v): v for v in [*(v for s in nodes for v in s.inputs), *compared]
                if v is not None and id(v) not in produced}

    def unsized(v: ir.Value) -> bool:
        return v.shape is None or any(not isinstance(d, int) and d.value not in sized for d in v.shape)

    while True:
        r = {"b": reads("b"), "a": reads("a")}
        grew = False
        for side in ("b", "a"):
            for key, v in r[side].items():
                st = producers[side].get(key)
                if st is None or id(st.node) in have[side] or v.const_value is not None \
                        or len(pulled[side]) >= PULL_MAX_NODES:
                    continue
                one_sided = key not in r["a" if side == "b" else "b"]
                narrow = v.dtype is not None and not v.dtype.is_floating_point()
                if (one_sided or narrow or unsized(v)) and st.domain in RUNNABLE_DOMAINS and not any(
                        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in st.attrs.values()) \
                        and not any(w is not None and w.const_value is not None
                                    and w.const_value.nbytes > PULL_MAX_WEIGHT_BYTES for w in st.inputs):
                    pulled[side].append(st)
                    have[side].add(id(st.node))
                    grew = True
        if not grew:
            return pulled["b"], pulled["a"]


def _build(nodes: list[_State], outputs: list[ir.Value], names: dict[int, str], opsets: dict[str, int],
           ir_version: int) -> bytes:
    """A model of `nodes` (as they were when snapshotted) computing `outputs`; inputs are named by `names`."""
    values: dict[int, ir.Value] = {}
    graph_inputs: list[ir.Value] = []
    initializers: list[ir.Value] = []
    constant_bytes = 0
    produced = {id(v) for s in nodes for v in s.outputs}

    def get(v: ir.Value) -> ir.Value:
        nonlocal constant_bytes
        if id(v) not in values:
            new = ir.Value(name=names[id(v)], type=v.type, shape=v.shape)
            if id(v) not in produced:
                if v.const_value is not None:
                    t = v.const_value
                    # a weight in an external data file is read into the site's model (it is serialized to bytes)
                    new.const_value = ir.Tensor(np.array(t.numpy())) if isinstance(t, ir.ExternalTensor) else t
                    constant_bytes += t.nbytes
                    if constant_bytes > MAX_CONSTANT_BYTES:
                        raise _NotCheckable(f"the site reads over {MAX_CONSTANT_BYTES >> 20} MiB of constants")
                    initializers.append(new)
                else:
                    graph_inputs.append(new)
            values[id(v)] = new
        return values[id(v)]

    built = []
    for s in nodes:
        if s.domain not in RUNNABLE_DOMAINS:
            raise _NotCheckable(f"it holds {s.domain}.{s.op_type}, which onnxruntime cannot run")
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in s.attrs.values()):
            raise _NotCheckable(f"it holds {s.op_type} '{s.node.name}', which has a subgraph")
        node = ir.Node(s.domain, s.op_type, [get(v) if v is not None else None for v in s.inputs],
                       attributes=list(s.attrs.values()), num_outputs=len(s.outputs), name=s.node.name)
        for old, new in zip(s.outputs, node.outputs):
            new.name, new.type, new.shape = names[id(old)], old.type, old.shape
            values[id(old)] = new
        built.append(node)
    outs = []
    for k, v in enumerate(outputs):
        src = get(v)
        out = ir.Value(name=f"compared_{k}", type=v.type, shape=v.shape)
        built.append(ir.Node("", "Identity", [src], outputs=[out]))
        outs.append(out)
    graph = ir.Graph(graph_inputs, outs, nodes=built, initializers=initializers, opset_imports=opsets,
                     name="site")
    graph.sort()
    model = ir.Model(graph, ir_version=ir_version)
    return ir.serde.serialize_model(model).SerializeToString()


def _run(model: bytes, feeds: dict[str, np.ndarray], creating: bool = False) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 4          # a site that rejects its random inputs is reported, not logged
    try:
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        if creating and isinstance(exc, state.NotImplemented):      # no kernel for an op on this machine
            raise _NoKernel(first_line(exc, 160)) from None
        raise
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})
