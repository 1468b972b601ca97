"""Names every pass shares: the contrib-op domain onnxruntime's fused ops live in, and the default ONNX opset a
model without an opset import for the standard domain is read at."""
from __future__ import annotations

MS = "com.microsoft"
DEFAULT_OPSET = 17
