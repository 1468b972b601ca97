"""onnxc: a verified ONNX graph-transformation compiler for language models.

    import onnxc
    result = onnxc.compile("model.onnx", level=2, target="cpu", output="model.opt.onnx")
    result.model   # onnx.ModelProto
    result.report  # dict: passes, rule counts, node counts, verification
"""
__version__ = "0.1.0"

from .errors import (  # noqa: E402
    InvalidModelError,
    OnnxcError,
    PassError,
    UsageError,
    VerificationError,
)
from .pass_manager import Pass, PassContext, PassResult, RulePass, register_pass  # noqa: E402
from .rules import Attr, Rule  # noqa: E402


def compile(model, level: int = 3, target: str = "cpu", **kwargs):  # noqa: A001 (the API's name)
    """Compile `model` (path, onnx.ModelProto, onnx_ir.Model or bytes); see onnxc.driver.compile."""
    from .driver import compile as _compile

    return _compile(model, level, target, **kwargs)


__all__ = ["compile", "Pass", "PassContext", "PassResult", "RulePass", "register_pass", "Rule", "Attr",
           "OnnxcError", "UsageError", "InvalidModelError", "VerificationError", "PassError", "__version__"]
