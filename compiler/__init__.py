"""onnxc: a verified ONNX graph-transformation compiler for language models.

    import onnxc
    result = onnxc.compile("model.onnx", level=2, target="cpu", output="model.opt.onnx")
    result.model   # onnx.ModelProto
    result.report  # dict: passes, rule counts, node counts, verification
    table = onnxc.bench(["model.onnx", "model.opt.onnx"], scenarios=["decode:256"])   # latency, memory, ratios

Importing onnxc is light: the pass API (Pass, RulePass, Rule, ...) and the compiler load on first use.
"""
__version__ = "0.1.0"

from .errors import (  # noqa: E402
    InvalidModelError,
    OnnxcError,
    PassError,
    UsageError,
    VerificationError,
    WriteError,
)

_LAZY = {"Pass": "pass_manager", "PassContext": "pass_manager", "PassResult": "pass_manager",
         "RulePass": "pass_manager", "register_pass": "pass_manager", "Rule": "rules", "Attr": "rules"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'onnxc' has no attribute '{name}'")


def compile(model, level: int = 2, target: str = "cpu", **kwargs):  # noqa: A001 (the API's name)
    """Compile `model` (path, onnx.ModelProto, onnx_ir.Model, bytes, or an onnx-graphsurgeon Graph) at the command
    line's default level (-O2); see onnxc.driver.compile."""
    from .driver import compile as _compile
    from .integrations import graphsurgeon

    if graphsurgeon.is_graph(model):
        model = graphsurgeon.to_model_proto(model)
    return _compile(model, level, target, **kwargs)


def bench(models, **kwargs):
    """Time models interleaved in one process and return the table as data (rows with p50/p90/p99 latency, tokens/s,
    session time, memory and the ratio to the first model); see onnxc.benchmark.bench."""
    from .benchmark import bench as _bench

    return _bench(models, **kwargs)


def to_graphsurgeon(result):
    """The compiled model of an onnxc.compile result as an onnx-graphsurgeon Graph (docs/integrations.md)."""
    from .integrations import graphsurgeon

    return graphsurgeon.to_graphsurgeon(result)


__all__ = ["compile", "bench", "to_graphsurgeon", "Pass", "PassContext", "PassResult", "RulePass", "register_pass",
           "Rule", "Attr",
           "OnnxcError", "UsageError", "InvalidModelError", "VerificationError", "PassError", "WriteError",
           "__version__"]
