"""contract-standard-ops: an opset-23 op that expand-standard-ops expanded and no fusion took -> the op again

    chain(x1..xn) -> (y1..ym), recorded by expand-standard-ops as Site(op, attrs, (x1..xn), (y1..ym))
        ->  (y1..ym) = op<attrs>(x1..xn)                                  when the chain is still what was built

The expansion is exact, so the original op computes what its chain computes; the op runs faster in onnxruntime
(Attention 8q/2kv heads, S=256: 28 ms vs 48 ms expanded; RotaryEmbedding 0.08 vs 0.31 ms).
Requires, per site: the first output's value is still read (a fusion that took the site rerouted its readers); every
original input is still a live value of the graph (not rewritten into something else; an input that was an earlier
site's output is followed to that site's restored op); and walking up from each read output, every node reached
before the original inputs or a constant is a node the expansion built (by any site: eliminate-cse may have merged
equal nodes of two sites, such as one cos/sin table pair). Chain nodes nothing reads any more are then removed, with
the expansion's initializers they alone read; nodes another site or a fusion still reads stay.
An RMSNormalization expanded to one SimplifiedLayerNormalization stays so: that is the same kernel in onnxruntime
(equal time on CPU) and the one its CUDA EP surely has.
The record lives in value/node meta (it survives in-place passes; a value or node a pass replaces loses it, and
that site is left expanded).
"""
from __future__ import annotations

import onnx_ir as ir
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import replace_value

MARK = "expand-standard-ops"          # node/initializer meta set by expand-standard-ops: built by the expansion
SITE = "expand-standard-ops/site"     # value meta set by expand-standard-ops: the Site whose output it replaced


def _used(v: ir.Value | None) -> bool:
    return v is not None and (bool(v.uses()) or v.is_graph_output())


def _alive(v: ir.Value, graph: ir.Graph) -> bool:
    p = v.producer()
    if p is not None:
        return p.graph is graph
    return graph.initializers.get(v.name) is v or any(v is i for i in graph.inputs)


def _const(v: ir.Value, graph: ir.Graph) -> bool:
    p = v.producer()
    return (p is None and graph.initializers.get(v.name) is v and v.const_value is not None) \
        or (p is not None and p.op_type == "Constant" and p.domain == "")


def _chain(outs: list[ir.Value], inputs: list[ir.Value], graph: ir.Graph) -> tuple[list[ir.Node], str | None]:
    """The expansion's nodes between the inputs and outs, or the reason the chain is no longer the expansion's."""
    stop = {id(v) for v in inputs}
    seen: dict[int, ir.Node] = {}
    todo = list(outs)
    while todo:
        v = todo.pop()
        if id(v) in stop or _const(v, graph):
            continue
        p = v.producer()
        if p is None or p.graph is not graph or not p.meta.get(MARK):
            return [], f"'{v.name}' is not computed by the expansion any more"
        if id(p) not in seen:
            seen[id(p)] = p
            todo.extend(i for i in p.inputs if i is not None)
    return list(seen.values()), None


@register_pass
class ContractStandardOps(Pass):
    """Expanded opset-23 Attention / RotaryEmbedding / RMSNormalization that no fusion took -> the standard op."""

    name = "contract-standard-ops"
    level = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        sites, seen = [], set()
        for node in graph:
            for o in node.outputs:
                site = o.meta.get(SITE)
                if site is not None and id(site) not in seen:
                    seen.add(id(site))
                    sites.append(site)
        counts: dict[str, int] = {}
        restored: dict[int, ir.Value] = {}   # an earlier site's output value -> the restored op's output
        for site in sites:
            ins = [restored.get(id(v), v) if v is not None else None for v in site.inputs]
            outs = [v if v is not None and v.meta.get(SITE) is site and _used(v) else None for v in site.outputs]
            if outs[0] is None:                              # a fusion took it (or nothing reads it)
                continue
            where = f"contract-standard-ops: {site.node.op_type} '{site.node.name}' left expanded:"
            bad = next((k for k, v in enumerate(ins) if v is not None and not _alive(v, graph)), None)
            if bad is not None:
                ctx.notes.append(f"{where} input {bad} was rewritten")
                continue
            chain, why = _chain([v for v in outs if v is not None], [v for v in ins if v is not None], graph)
            if why:
                ctx.notes.append(f"{where} {why}")
                continue
            if len(chain) == 1 and chain[0].op_type == "SimplifiedLayerNormalization":
                continue                                     # already onnxruntime's fused kernel, on CPU and CUDA
            while ins and ins[-1] is None:
                ins.pop()
            last = max(k for k, v in enumerate(outs) if v is not None)
            n = site.node
            new = ir.Node(n.domain, n.op_type, ins, attributes=list(n.attributes.values()), num_outputs=last + 1,
                          name=n.name)
            graph.insert_before(next(x for x in graph if any(x is c for c in chain)), new)
            for k, v in enumerate(outs[:last + 1]):
                if v is not None:
                    replace_value(v, new.outputs[k])
                    restored[id(v)] = new.outputs[k]
            self._remove_dead(graph, chain)
            key = f"contract-standard-ops/{site.rule}"
            counts[key] = counts.get(key, 0) + 1
        if counts:
            graph.sort()
        return PassResult(model, bool(counts), counts)

    @staticmethod
    def _remove_dead(graph: ir.Graph, chain: list[ir.Node]) -> None:
        """Chain nodes (consumers first) and expansion initializers that nothing reads any more."""
        live = list(chain)
        changed = True
        while changed:
            changed = False
            for x in list(live):
                if not any(_used(o) for o in x.outputs):
                    leaves = [i for i in x.inputs if i is not None and i.producer() is None]
                    graph.remove(x, safe=True)
                    live.remove(x)
                    changed = True
                    for v in leaves:
                        if v.meta.get(MARK) and not _used(v) and graph.initializers.get(v.name) is v:
                            graph.initializers.pop(v.name)
