"""onnxc as a stage in other toolchains. Each integration imports its toolchain only when used, so none of them is
a dependency of onnxc:

- `onnxc.integrations.graphsurgeon`: `onnxc.compile` accepts an onnx-graphsurgeon `Graph`, and
  `onnxc.to_graphsurgeon(result)` gives the compiled model back as one (extra `graphsurgeon`).
- `onnxc.integrations.olive`: `OnnxcCompile`, an Olive pass, and `package_config()` to run it in a workflow.
- `onnxc.integrations.exporters`: `compile_export_folder`, a post-export step for Optimum-style export folders.

docs/integrations.md shows each in use.
"""
