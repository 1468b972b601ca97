"""onnxc: a verified ONNX graph-transformation compiler for language models."""
__version__ = "0.1.0"
