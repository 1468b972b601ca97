"""Where int4 (and any weight-only) quantization applies: the linear nodes with a constant 2-D weight (find_sites),
their weights read in chunks without memory-mapping, and the Gather tables that equal a quantized weight transposed
(tied embeddings: _tables, tied).

A site's weight is W (K, N) as the node computes A @ W: MatMul(A, W), MatMul(A, Transpose(Wt)), Gemm and
FusedMatMul with alpha and transB folded in; a Gemm C or a following Add of a constant (N,) becomes its bias.
"""
from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from .domains import MS
from .quant_options import QuantOptions
from .rules import const_tensor

TABLE_ROWS = 4096               # rows per chunk when a Gather table is compared with a weight
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass
class QuantSource:
    """The float weight a quantized node stands for: `weight` (K, N) (lazy), `bias` (N,) or None. Quantize passes
    keep it in the new node's meta[QUANT_META] (compiler/verify.py builds the float twins from it)."""

    weight: ir.TensorProtocol
    bias: np.ndarray | None
    kind: str                     # "matmul" or "gather"


@dataclass
class Site:
    node: ir.Node                 # the MatMul / Gemm / FusedMatMul
    key: tuple                    # identifies the weight view (tensor, transposed, alpha)
    name: str                     # weight name (for --exclude and new initializer names)
    shape: tuple[int, int]        # (K, N)
    dtype: ir.DataType
    load: Callable[[], np.ndarray]   # W (K, N)
    bias: np.ndarray | None
    add: ir.Node | None           # a following Add folded into bias
    source: ir.TensorProtocol     # W (K, N) as a lazy tensor for the float reference


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def rows(t: ir.TensorProtocol, rows: int | None = None) -> Iterator[np.ndarray]:
    """A 2-D tensor's rows in chunks of `rows` (all at once when None); treat them as read-only. External data is
    read from its file, never memory-mapped: mapped pages would count toward RSS until the mapping is dropped."""
    n = int(t.shape[0])
    step = max(1, rows or n)
    if isinstance(t, ir.ExternalTensor) and t.dtype in FLOATS:
        dtype, tail = t.dtype.numpy(), tuple(int(d) for d in t.shape[1:])
        t.release()
        with open(t.path, "rb") as f:
            f.seek(t.offset or 0)
            for r0 in range(0, n, step):
                arr = np.empty((min(step, n - r0),) + tail, dtype)
                if f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != arr.nbytes:
                    raise ValueError(f"external data of '{t.name}' is truncated")
                yield arr
        return
    arr = np.asarray(t.numpy())
    for r0 in range(0, n, step):
        yield arr[r0:r0 + step]


def _read(t: ir.TensorProtocol) -> np.ndarray:
    """The whole tensor (external data read, not mapped; see rows)."""
    return next(rows(t))


def _view(t: ir.TensorProtocol, transpose: bool, alpha: float) -> Callable[[], np.ndarray]:
    """W (K, N) of a weight view; a transposed weight stays a strided view (the kernels read column chunks)."""
    def load() -> np.ndarray:
        w = _read(t)
        w = w if alpha == 1.0 else (w * np.asarray(alpha, w.dtype)).astype(w.dtype)
        return w.T if transpose else w
    return load


def table_digest(chunks: Iterable[np.ndarray]) -> bytes:
    """Digest of a table's bytes in row-major order, fed chunk by chunk (bitwise equality, -0.0 != 0.0)."""
    h = hashlib.blake2b(digest_size=32)
    for c in chunks:
        h.update(np.ascontiguousarray(c).view(np.uint8).reshape(-1).data)
    return h.digest()


def _weight(node: ir.Node) -> tuple[ir.TensorProtocol, ir.Value, bool, float] | str:
    """(tensor, value, transposed, alpha) of a linear node's weight, or why it has none."""
    op = node.op_type
    w = node.inputs[1] if len(node.inputs) > 1 else None
    transpose, alpha = False, 1.0
    if op == "Gemm":
        if _attr(node, "transA", 0):
            return "Gemm transA=1"
        transpose, alpha = bool(_attr(node, "transB", 0)), float(_attr(node, "alpha", 1.0))
    elif op == "FusedMatMul":
        if _attr(node, "transA", 0) or _attr(node, "transBatchA", 0) or _attr(node, "transBatchB", 0):
            return "FusedMatMul with transA or batch transposes"
        transpose, alpha = bool(_attr(node, "transB", 0)), float(_attr(node, "alpha", 1.0))
    t = const_tensor(w)
    if t is None and w is not None and w.producer() is not None and w.producer().op_type == "Transpose":
        p = w.producer()
        perm = _attr(p, "perm", None)
        inner = const_tensor(p.inputs[0])
        if inner is not None and len(inner.shape) == 2 and (perm is None or list(perm) == [1, 0]):
            t, transpose = inner, not transpose
    if t is None:
        return "weight is not constant"
    if len(t.shape) != 2:
        return f"weight has rank {len(t.shape)}, not 2"
    return t, w, transpose, alpha


def _bias_vector(t: ir.TensorProtocol | None, n: int, scale: float = 1.0) -> np.ndarray | None:
    """A constant that broadcasts to (N,) as an (N,) array, else None."""
    if t is None:
        return None
    shape = tuple(int(d) for d in t.shape)
    if int(np.prod(shape)) not in (1, n) or any(d != 1 for d in shape[:-1]):
        return None
    b = np.asarray(t.numpy()).reshape(-1)
    b = np.broadcast_to(b, (n,)) * np.asarray(scale, b.dtype)
    return np.ascontiguousarray(b.astype(t.dtype.numpy()))


def _following_add(node: ir.Node, n: int, dtype: ir.DataType) -> tuple[ir.Node, np.ndarray] | None:
    """An Add of a constant (N,) bias that is the only use of the node's output."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add" or \
            uses[0].node.domain not in ("", "ai.onnx"):
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    t = const_tensor(other)
    if t is None or t.dtype != dtype or len(t.shape) > 1 and (y.shape is None or len(t.shape) > len(y.shape)):
        return None
    b = _bias_vector(t, n)
    return None if b is None or (len(t.shape) and int(t.shape[-1]) != n) else (add, b)


def find_sites(graph: ir.Graph, opts: QuantOptions, notes: list[str], label: str = "quantize-int4") -> list[Site]:
    """Every linear node with a constant 2-D weight that can become MatMulNBits (skips are noted, after `label`)."""
    sites = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm", "FusedMatMul") or \
                node.domain not in (("", "ai.onnx") if node.op_type != "FusedMatMul" else (MS,)):
            continue
        got = _weight(node)
        if isinstance(got, str):
            continue
        t, w, transpose, alpha = got
        a = node.inputs[0]
        shape = tuple(int(d) for d in (t.shape[::-1] if transpose else t.shape))
        k, n = shape
        wname = (w.name if w.producer() is None else w.producer().inputs[0].name) or node.name or "weight"
        why = None
        if t.dtype not in FLOATS or a.dtype not in (None, t.dtype):  # MatMul's own typing makes them equal
            why = f"activation type {a.dtype or t.dtype} (MatMulNBits takes float or float16 matching the weight)"
        elif a.shape is not None and len(a.shape) < 2:
            why = "activation has rank 1"
        elif k < opts.block_size:
            why = f"K={k} < block size {opts.block_size}"
        elif any(fnmatch.fnmatchcase(x, p) for p in opts.exclude for x in (node.name or "", wname)):
            why = "excluded"
        bias, add = None, None
        if why is None and node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = _bias_vector(const_tensor(node.inputs[2]), n, float(_attr(node, "beta", 1.0)))
            if bias is None:
                why = "Gemm C is not a constant that broadcasts to (N,)"
        if why is not None:
            notes.append(f"{label}: kept {node.op_type} '{node.name}' ({wname}) in float: {why}")
            continue
        if bias is None:
            found = _following_add(node, n, t.dtype)
            if found is not None:
                add, bias = found
        load = _view(t, transpose, alpha)
        source = t if not transpose and alpha == 1.0 else ir.LazyTensor(
            lambda f=load: ir.tensor(np.ascontiguousarray(f())), dtype=t.dtype, shape=ir.Shape(list(shape)))
        sites.append(Site(node, (id(t), transpose, alpha), wname, shape, t.dtype, load, bias, add, source))
    return sites


def table_block(h: int, block: int) -> int | None:
    """The block a table of width h is quantized with so that it can be shared: `block` when it divides h, else the
    largest power of two below it (>= 16) that does (GatherBlockQuantized needs whole blocks); None if none does."""
    while block >= 16:
        if h % block == 0:
            return block
        block //= 2
    return None


def tables(graph: ir.Graph, block: int) -> list[tuple[ir.Node, ir.TensorProtocol]]:
    """Gather(E, ids) nodes that could share a quantized table: axis 0, E a constant float (V, H) whose H some
    block <= `block` divides (table_block)."""
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or _attr(node, "axis", 0) != 0:
            continue
        e = const_tensor(node.inputs[0])
        if e is not None and len(e.shape) == 2 and e.dtype in FLOATS and table_block(int(e.shape[1]), block):
            found.append((node, e))
    return found


def table_key(e: ir.TensorProtocol) -> tuple:
    """(shape (V, H), dtype) of a table: a weight W (H, V) of the same dtype may equal E^T."""
    return tuple(int(d) for d in e.shape), e.dtype


def tied(tables: list[tuple[ir.Node, ir.TensorProtocol]], sites: dict[tuple, Site], digests: dict[tuple, bytes]
          ) -> list[tuple[ir.Node, Site]]:
    """The tables equal to a quantized weight transposed: the same initializer behind a Transpose (no data read),
    or equal bytes (digests of W^T taken while each weight was in memory; the table is read in row chunks)."""
    found = []
    for node, e in tables:
        site = sites.get((id(e), True, 1.0))
        if site is None and any(table_key(e) == (site.shape[::-1], site.dtype) for site in sites.values()
                                if site.key in digests):
            d = table_digest(rows(e, TABLE_ROWS))
            site = next((sites[k] for k, dk in digests.items() if dk == d and sites[k].shape[::-1] == table_key(e)[0]
                         and sites[k].dtype == e.dtype), None)
        if site is not None:
            found.append((node, site))
    return found
