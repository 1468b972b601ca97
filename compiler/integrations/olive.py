"""onnxc as an Olive pass: `OnnxcCompile` compiles an ONNX model handler with onnxc (verified, like the command line).

    from olive.workflows import run
    from onnxc.integrations import olive as onnxc_olive

    run({"input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
         "passes": {"onnxc": {"type": "OnnxcCompile", "level": 2, "target": "cpu"}},
         "output_dir": "out"}, package_config=onnxc_olive.package_config())

Olive is imported only when `OnnxcCompile` or `package_config` is first used, so importing this module (and onnxc)
never needs it (extra `olive`). The pass follows Olive's interface: `_default_config(accelerator_spec)` declares the
options, `_run_for_config(model, config, output_model_path)` returns the new ONNXModelHandler. docs/integrations.md
has a workflow.
"""
from __future__ import annotations

from typing import Any

PASS_TYPE = "OnnxcCompile"
MODULE_PATH = f"{__name__}.{PASS_TYPE}"
_CLASS: type | None = None


def package_config() -> dict[str, Any]:
    """Olive's default package config (its olive_config.json) with `OnnxcCompile` added, as the dict
    `olive.workflows.run(..., package_config=...)` takes."""
    import json

    from olive.package_config import OlivePackageConfig

    with open(OlivePackageConfig.get_default_config_path()) as f:
        config = json.load(f)
    config["passes"][PASS_TYPE] = {"module_path": MODULE_PATH, "supported_providers": ["*"],
                                   "supported_accelerators": ["*"], "supported_precisions": ["*"],
                                   "supported_algorithms": [], "supported_quantization_encodings": []}
    return config


def _build() -> type:
    from pathlib import Path

    from olive.model import ONNXModelHandler
    from olive.model.utils import resolve_onnx_path
    from olive.passes import Pass
    from olive.passes.pass_config import BasePassConfig, PassConfigParam
    from olive.resource_path import LocalFile, LocalFolder

    import onnxc

    class OnnxcCompile(Pass):
        """Compile the ONNX model with onnxc: cleanup and fusions for ONNX Runtime, verified numerically."""

        @classmethod
        def _default_config(cls, accelerator_spec: Any) -> dict[str, PassConfigParam]:
            return {
                "level": PassConfigParam(type_=int, default_value=2, description="onnxc -O level, 0 to 3."),
                "target": PassConfigParam(type_=str, default_value="cpu", description="onnxc target: cpu or cuda."),
                "disable": PassConfigParam(type_=list, default_value=[],
                                           description="Passes or rules to disable (onnxc --disable)."),
                "verify": PassConfigParam(type_=bool, default_value=True,
                                          description="Check the output against the input in onnxruntime."),
                "seed": PassConfigParam(type_=int, default_value=0, description="Seed of the verification inputs."),
                "options": PassConfigParam(type_=dict, default_value={},
                                           description="onnxc pass options, e.g. {'quantize': 'int4'}."),
            }

        def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                            output_model_path: str) -> ONNXModelHandler:
            output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
            result = onnxc.compile(model.model_path, config.level, config.target, output=output,
                                   disable=tuple(config.disable), verify=config.verify, seed=config.seed,
                                   options=dict(config.options))
            if len(result.report["written"]) > 1:      # external data beside the model: hand Olive the folder
                return ONNXModelHandler(model_path=LocalFolder({"path": output.parent}), onnx_file_name=output.name)
            return ONNXModelHandler(model_path=LocalFile({"path": output}))

    OnnxcCompile.__module__ = __name__
    OnnxcCompile.__qualname__ = PASS_TYPE
    return OnnxcCompile


def __getattr__(name: str) -> Any:
    global _CLASS
    if name == PASS_TYPE:
        if _CLASS is None:
            _CLASS = _build()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
