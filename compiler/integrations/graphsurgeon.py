"""onnx-graphsurgeon graphs in and out of onnxc.

    graph = gs.import_onnx(onnx.load("model.onnx"))
    result = onnxc.compile(graph, level=2)          # any onnxc.compile input form; the Graph is exported first
    compiled = onnxc.to_graphsurgeon(result)        # a gs.Graph of the compiled model

onnx-graphsurgeon is imported only here, when one of these runs (extra `graphsurgeon`).
"""
from __future__ import annotations

from typing import Any

import onnx

from ..errors import UsageError


def is_graph(obj: Any) -> bool:
    """Whether `obj` is an onnx-graphsurgeon Graph (checked by type, without importing onnx-graphsurgeon)."""
    return any(c.__module__.startswith("onnx_graphsurgeon.") and c.__name__ == "Graph" for c in type(obj).__mro__)


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise UsageError("onnx-graphsurgeon is not installed (pip install 'onnxc[graphsurgeon]')") from None
    return gs


def to_model_proto(graph: Any) -> onnx.ModelProto:
    """The Graph as an onnx.ModelProto (onnx-graphsurgeon's own export, with the graph's opset and IR version)."""
    return _gs().export_onnx(graph)


def to_graphsurgeon(result: Any) -> Any:
    """The compiled model of `result` (an onnxc CompileResult, or an onnx.ModelProto) as an onnx-graphsurgeon Graph.

    A result written to a file with external data is loaded with its weights, so the Graph's constants hold
    values, as onnx-graphsurgeon expects."""
    gs = _gs()
    if isinstance(result, onnx.ModelProto):
        return gs.import_onnx(result)
    output = getattr(result, "output", None)
    if output is not None:
        return gs.import_onnx(onnx.load(str(output), load_external_data=True))
    return gs.import_onnx(result.model)
