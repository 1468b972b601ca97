"""Where quantized tensors live until the model is saved: tiny ones in memory, the rest appended to one scratch file
that the model references lazily, so a compile holds a few weights at a time, never the quantized model."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

SPILL_BYTES = 4096               # quantized tensors at least this large live in the scratch file


class QuantStore:
    """Quantized tensors: tiny ones in memory, the rest appended to one scratch file and read back on use.
    `scratch` is the folder (the compile's scratch folder; a folder of this process, removed at exit, if None)."""

    def __init__(self, scratch: str | None):
        self.dir = Path(scratch) if scratch else None
        self.file: Path | None = None
        self.offset = 0

    def scratch(self) -> Path:
        self.dir = self.dir or _process_scratch()
        return self.dir

    def tensor(self, arr: np.ndarray, name: str) -> ir.TensorProtocol:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < SPILL_BYTES:
            return ir.tensor(arr, name=name)
        if self.file is None:
            self.file = Path(tempfile.mkstemp(prefix="quantized-", suffix=".bin", dir=self.scratch())[1])
        with open(self.file, "ab") as f:
            arr.tofile(f)
        path, offset, dtype, shape, count = str(self.file), self.offset, arr.dtype, arr.shape, arr.size
        self.offset += arr.nbytes
        return ir.LazyTensor(lambda: ir.tensor(np.fromfile(path, dtype, count, offset=offset).reshape(shape),
                                               name=name),
                             dtype=ir.DataType.from_numpy(dtype), shape=ir.Shape(list(shape)), name=name)


_SCRATCH: list[str] = []


def _process_scratch() -> Path:
    """A scratch folder for this process (removed at exit), used when the driver gives none."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="onnxc-quantize-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return Path(_SCRATCH[0])


def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol, name: str, taken: set[str]) -> ir.Value:
    """Register `tensor` as an initializer named `name` (suffixed _1, _2, ... past the names in `taken`)."""
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    v = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(v)
    return v
