"""quantize-int4

    MatMul(A, W)                          ->  MatMulNBits(A, B, s, z?)                  W constant (K, N)
    MatMul(A, Transpose(Wt))              ->  MatMulNBits(A, B, s, z?)                  W = Wt^T
    FusedMatMul(A, W; alpha, transB)      ->  MatMulNBits(A, B, s, z?)                  W = alpha op(W)
    Gemm(A, W, C?; alpha, beta, transB)   ->  MatMulNBits(A, B, s, z?, bias = beta C)   W = alpha op(W)
    MatMulNBits(A, ...) + b               ->  MatMulNBits(A, ..., bias = b)             b constant, N elements
    Gather(E, ids), E^T == some W above   ->  GatherBlockQuantized(Reshape(B, [N, K/2]), ids, s, z?)

with W[k, n] ~ (code[n, k] - z[n, k / block]) * s[n, k / block] (kernels/quantize.py: rtn, lsq, hqq, gptq), B the codes
packed two per byte (N, ceil(K / block), block / 2). MatMulNBits computes A @ W for any rank of A, so every
constant-weight linear layer is covered, packed QKV and gate-up MatMuls included (the pass runs after the fusions).
A tied embedding (its table equal to the lm_head's weight transposed, compared by value) becomes a
GatherBlockQuantized over the lm_head's own B, so the model stores the table once (a lm_head whose K the block does
not divide takes the largest power-of-two block >= 16 that does).

Requires: A float or float16 with rank >= 2 when known; Gemm transA = 0; FusedMatMul transA = transBatchA =
transBatchB = 0; a Gemm C that is constant and broadcasts to (N,). Skipped, with a note: K < block_size (a block of
mostly padding buys nothing), excluded names (--exclude globs, on node and weight names).

Mixed precision (plain "int4", or option mixed with any method): choose_bits keeps the logits' weights (lm_head, a
tied table) and then the weights of largest int4 round-to-nearest error at 8 bits (MatMulNBits / GatherBlockQuantized
bits = 8) while the bytes stay within mixed_budget (1.25) times the all-int4 bytes; "int4:uniform" and "int4:METHOD"
keep every weight at 4 bits. The choices go to ctx.results["quantize-int4"]["layers"] for the report.

Options (ctx.option): quantize ("int4", "int4:uniform|rtn|lsq|hqq|gptq"), mixed, mixed_budget, block_size (32),
symmetric (False), exclude (globs), accuracy_level (4 on cpu, 0 on cuda), tied_embedding (True), scratch_dir (where
quantized tensors are written); for gptq: calibration (an .npz of model inputs, load_calibration), damp (0.01), act_order (False).
GPTQ's H = X^T X per weight comes from one onnxruntime session of the float graph as this pass finds it, its
linear inputs exposed as outputs (_Hessians); the session is closed before the first weight is quantized.
Streaming: each weight is read alone (memory-mapped weights are released after), quantized, and its tensors of at
least SPILL_BYTES go to a scratch file that the model references lazily; peak memory stays a few times the largest
weight. Each new node keeps its float source in node.meta["onnxc.quantize"] for verification (compiler/verify.py).
"""
from __future__ import annotations

import atexit
import fnmatch
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxc.domains import MS
from onnxc.errors import UsageError, first_line
from onnxc.ir import release_weights
from onnxc.kernels import quantize as kq
from onnxc.loader import check_regular_file
from onnxc.pass_manager import Pass, PassContext, PassResult, register_pass
from onnxc.rules import const_tensor
from onnxc.verify import QUANT_META as META  # node.meta key: the QuantSource a node replaced
from onnxc.verify import available_memory

TABLE_ROWS = 4096               # rows per chunk when a Gather table is compared with a weight
SPILL_BYTES = 4096               # quantized tensors at least this large live in the scratch file
HESSIAN_BUDGET = (128 << 20, 2 << 30)  # float64 Hessians per pass over the calibration: a quarter of the available
                                       # memory, within these bounds (option hessian_budget: bytes)
GPTQ_ROWS_PER_K = 4              # fewer calibration rows than this many times K earn a note
DEFAULT_METHOD = "lsq"
UNIFORM = "uniform"              # int4:uniform: every layer int4 with DEFAULT_METHOD
MIXED_BUDGET = 1.25              # int4 (mixed): weight bytes at most this times the all-int4 bytes
HIGH_BITS = 8                    # the precision of the layers mixed precision keeps
DEFAULT_BLOCK = {"cpu": 32, "cuda": 32}
DEFAULT_ACCURACY = {"cpu": 4, "cuda": 0}
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass(frozen=True)
class QuantOptions:
    method: str
    block_size: int
    symmetric: bool
    accuracy_level: int
    exclude: tuple[str, ...]
    tied_embedding: bool
    calibration: str | None = None   # .npz of model inputs (gptq)
    damp: float = 0.01               # gptq dampening, relative to mean(diag H)
    act_order: bool = False          # gptq: rows by decreasing H[k, k], blocks fitted up front
    hessian_budget: int = HESSIAN_BUDGET[0]  # gptq: bytes of Hessians accumulated per pass over the calibration
    mixed: bool = False              # sensitive layers at HIGH_BITS within mixed_budget (choose_bits)
    mixed_budget: float = MIXED_BUDGET


def parse_method(text: str | None) -> tuple[str, bool]:
    """'int4' -> (DEFAULT_METHOD, mixed precision); 'int4:uniform' -> (DEFAULT_METHOD, all int4); 'int4:METHOD' ->
    (METHOD, all int4). UsageError otherwise."""
    text = (text or "int4").strip().lower()
    scheme, _, method = text.partition(":")
    if scheme != "int4" or (method and method not in kq.METHODS + (UNIFORM,)):
        choices = ",".join(kq.METHODS + (UNIFORM,))
        raise UsageError(f"--quantize: unknown value '{text}'; use int4 or int4:{{{choices}}}")
    if not method:
        return DEFAULT_METHOD, True
    return (DEFAULT_METHOD if method == UNIFORM else method), False


def options_of(ctx: PassContext) -> QuantOptions:
    """Validated quantization options from the context (UsageError on a bad value)."""
    method, mixed = parse_method(ctx.option("quantize"))
    mixed = bool(ctx.option("mixed", mixed))
    mixed_budget = ctx.option("mixed_budget", MIXED_BUDGET)
    if not isinstance(mixed_budget, (int, float)) or mixed_budget < 1:
        raise UsageError(f"mixed_budget must be a number >= 1 (weight bytes relative to all-int4), got {mixed_budget}")
    block = ctx.option("block_size") or DEFAULT_BLOCK.get(ctx.target, 32)
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise UsageError(f"--block-size: {block} is not a power of 2 >= 16 (MatMulNBits requires one)")
    symmetric = bool(ctx.option("symmetric", False))
    if method == "hqq" and symmetric:
        raise UsageError("--quantize int4:hqq fits a zero point per block: it cannot be --symmetric")
    calibration = ctx.option("calibration")
    if method in kq.CALIBRATED and not calibration:
        raise UsageError(f"--quantize int4:{method} needs --calibration FILE.npz (model inputs, see "
                         "docs/quantization.md)")
    if calibration and method not in kq.CALIBRATED:
        raise UsageError(f"--calibration: no selected method uses calibration data (int4:{method} is data-free; "
                         f"{', '.join('int4:' + m for m in kq.CALIBRATED)} uses it)")
    if calibration:
        check_regular_file(calibration, "--calibration")    # missing, or a FIFO or device: exit 2 before any work
    level = ctx.option("accuracy_level", DEFAULT_ACCURACY.get(ctx.target, 0))
    if level not in (0, 1, 2, 3, 4):
        raise UsageError(f"accuracy_level must be 0-4, got {level}")
    budget = ctx.option("hessian_budget") or min(max(available_memory() // 4, HESSIAN_BUDGET[0]), HESSIAN_BUDGET[1])
    if not isinstance(budget, int) or budget <= 0:
        raise UsageError(f"hessian_budget must be a positive number of bytes, got {budget}")
    damp = ctx.option("damp", 0.01)
    if not isinstance(damp, (int, float)) or not 0 <= damp < 1e6:
        raise UsageError(f"damp must be a number >= 0 (GPTQ adds damp * mean(diag H) to H's diagonal), got {damp}")
    exclude = ctx.option("exclude") or ()
    return QuantOptions(method, block, symmetric, int(level), tuple([exclude] if isinstance(exclude, str) else exclude),
                        bool(ctx.option("tied_embedding", True)), calibration, float(damp),
                        bool(ctx.option("act_order", False)), budget, mixed, float(mixed_budget))


@dataclass
class QuantSource:
    """The float weight a quantized node stands for: `weight` (K, N) (lazy), `bias` (N,) or None."""

    weight: ir.TensorProtocol
    bias: np.ndarray | None
    kind: str                     # "matmul" or "gather"


@dataclass
class _Site:
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


def _rows(t: ir.TensorProtocol, rows: int | None = None) -> Iterator[np.ndarray]:
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
    """The whole tensor (external data read, not mapped; see _rows)."""
    return next(_rows(t))


def _view(t: ir.TensorProtocol, transpose: bool, alpha: float) -> Callable[[], np.ndarray]:
    """W (K, N) of a weight view; a transposed weight stays a strided view (the kernels read column chunks)."""
    def load() -> np.ndarray:
        w = _read(t)
        w = w if alpha == 1.0 else (w * np.asarray(alpha, w.dtype)).astype(w.dtype)
        return w.T if transpose else w
    return load


def _table_digest(chunks: Iterable[np.ndarray]) -> bytes:
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


def find_sites(graph: ir.Graph, opts: QuantOptions, notes: list[str]) -> list[_Site]:
    """Every linear node with a constant 2-D weight that can become MatMulNBits (skips are noted)."""
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
            notes.append(f"quantize-int4: kept {node.op_type} '{node.name}' ({wname}) in float: {why}")
            continue
        if bias is None:
            found = _following_add(node, n, t.dtype)
            if found is not None:
                add, bias = found
        load = _view(t, transpose, alpha)
        source = t if not transpose and alpha == 1.0 else ir.LazyTensor(
            lambda f=load: ir.tensor(np.ascontiguousarray(f())), dtype=t.dtype, shape=ir.Shape(list(shape)))
        sites.append(_Site(node, (id(t), transpose, alpha), wname, shape, t.dtype, load, bias, add, source))
    return sites


class _Store:
    """Quantized tensors: tiny ones in memory, the rest appended to one scratch file and read back on use."""

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


def _initializer(graph: ir.Graph, tensor: ir.TensorProtocol, name: str, taken: set[str]) -> ir.Value:
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    v = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(v)
    return v


def table_block(h: int, block: int) -> int | None:
    """The block a table of width h is quantized with so that it can be shared: `block` when it divides h, else the
    largest power of two below it (>= 16) that does (GatherBlockQuantized needs whole blocks); None if none does."""
    while block >= 16:
        if h % block == 0:
            return block
        block //= 2
    return None


def _tables(graph: ir.Graph, block: int) -> list[tuple[ir.Node, ir.TensorProtocol]]:
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


def _table_key(e: ir.TensorProtocol) -> tuple:
    """(shape (V, H), dtype) of a table: a weight W (H, V) of the same dtype may equal E^T."""
    return tuple(int(d) for d in e.shape), e.dtype


def _tied(tables: list[tuple[ir.Node, ir.TensorProtocol]], sites: dict[tuple, _Site], digests: dict[tuple, bytes]
          ) -> list[tuple[ir.Node, _Site]]:
    """The tables equal to a quantized weight transposed: the same initializer behind a Transpose (no data read),
    or equal bytes (digests of W^T taken while each weight was in memory; the table is read in row chunks)."""
    found = []
    for node, e in tables:
        site = sites.get((id(e), True, 1.0))
        if site is None and any(_table_key(e) == (site.shape[::-1], site.dtype) for site in sites.values()
                                if site.key in digests):
            d = _table_digest(_rows(e, TABLE_ROWS))
            site = next((sites[k] for k, dk in digests.items() if dk == d and sites[k].shape[::-1] == _table_key(e)[0]
                         and sites[k].dtype == e.dtype), None)
        if site is not None:
            found.append((node, site))
    return found


def weight_bytes(k: int, n: int, bits: int, block: int, symmetric: bool, scale_bytes: int) -> int:
    """Bytes of one MatMulNBits weight: codes, scales and (asymmetric) packed zero points."""
    kb = -(-k // block)
    return n * kb * block * bits // 8 + n * kb * scale_bytes + (0 if symmetric else n * (-(-kb * bits // 8)))


@dataclass
class LayerChoice:
    """One weight's precision under mixed precision, and why (the report lists them)."""

    name: str
    shape: tuple[int, int]          # (K, N)
    bits: int
    block_size: int
    error: float                    # relative weight-space error of int4 round-to-nearest, ||W - Q(W)|| / ||W||
    reason: str                     # "logits" (lm_head or tied table), "error rank N", "int4", "over budget"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bits": self.bits, "block_size": self.block_size,
                "int4_rel_error": round(self.error, 5), "reason": self.reason}


def choose_bits(sites: list[_Site], blocks: dict[tuple, int], logits: set[tuple], opts: QuantOptions
                ) -> dict[tuple, LayerChoice]:
    """Mixed precision: which weights keep HIGH_BITS, within opts.mixed_budget times the all-int4 bytes.

    Sensitivity is measured without data: each weight's relative error under int4 round-to-nearest (blocks with
    outliers lose the most). The layers that produce the logits (`logits`: the lm_head, and a weight that may be a
    tied embedding table, whose error also enters every embedded token) come first; the others follow by
    decreasing error. Each is promoted while the total stays within the budget."""
    from onnxc.kernels.matmul_nbits import dequantize

    unique = list({s.key: s for s in sites}.values())
    choices: dict[tuple, LayerChoice] = {}
    cost4, cost8 = {}, {}
    for site in unique:
        k, n = site.shape
        block = blocks[site.key]
        sb = 2 if site.dtype == ir.DataType.FLOAT16 else 4
        cost4[site.key] = weight_bytes(k, n, 4, block, opts.symmetric, sb)
        cost8[site.key] = weight_bytes(k, n, HIGH_BITS, block, opts.symmetric, sb)
        w = site.load()
        sq, ref = 0.0, 0.0
        step = max(1, TABLE_ROWS * 64 // max(k, 1))   # column chunks: a few MiB at a time, never the whole copy
        for c0 in range(0, n, step):
            x = np.ascontiguousarray(w[:, c0:c0 + step], np.float32)
            b, sc, z = kq.quantize(x, "rtn", block, opts.symmetric)
            sq += float(np.square(dequantize(b, sc, z, K=k, N=x.shape[1], bits=4, block_size=block) - x).sum())
            ref += float(np.square(x).sum())
        del w
        err = (sq / max(ref, 1e-30)) ** 0.5
        choices[site.key] = LayerChoice(site.name, site.shape, 4, block, err, "int4")
    budget = opts.mixed_budget * sum(cost4.values())
    total = sum(cost4.values())
    order = sorted(choices, key=lambda key: (key not in logits, -choices[key].error))
    rank = 0
    for key in order:
        c = choices[key]
        if key not in logits:
            rank += 1
        extra = cost8[key] - cost4[key]
        if total + extra > budget:
            c.reason = "over budget" if key in logits else "int4"
            continue
        total += extra
        c.bits = HIGH_BITS
        c.reason = "logits" if key in logits else f"error rank {rank}"
    return choices


def load_calibration(path: str, graph: ir.Graph) -> list[dict[str, np.ndarray]]:
    """--calibration FILE.npz -> batches of feeds. Arrays are named after graph inputs and fed as they are (their
    leading axis is the model's batch axis, so one array holds many samples): one batch with keys NAME, or several
    (other shapes, e.g. sequence lengths) with keys NAME/0, NAME/1, ... Every batch gives every graph input that is
    not an initializer; arrays are cast to the input's type."""
    inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - zip, pickle and format errors alike
        raise UsageError(f"--calibration {path}: cannot read ({first_line(exc)})") from None
    batches: dict[int | None, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        name, _, idx = key.rpartition("/")
        if key in inputs:
            name, k = key, None
        elif name in inputs and idx.isdigit():
            k = int(idx)
        else:
            raise UsageError(f"--calibration {path}: array '{key}' names no graph input (inputs: "
                             f"{', '.join(inputs)}; several batches use NAME/0, NAME/1, ...)")
        dtype = inputs[name].dtype.numpy() if inputs[name].dtype is not None else arr.dtype
        batches.setdefault(k, {})[name] = arr.astype(dtype, copy=False)
    if None in batches and len(batches) > 1:
        raise UsageError(f"--calibration {path}: mixes NAME and NAME/K keys; use one form")
    if not batches:
        raise UsageError(f"--calibration {path}: holds no arrays")
    for k, feeds in sorted(batches.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise UsageError(f"--calibration {path}: batch {k or 0} lacks input(s) {', '.join(missing)}")
    return [batches[k] for k in sorted(batches, key=lambda k: -1 if k is None else k)]


class _Hessians:
    """H = X^T X (float64, summed over every calibration row) of each weight's inputs X, and GPTQ's factor of it.

    The float model (the graph as this pass finds it, before any rewrite) is saved to the scratch folder with the
    inputs of the linear sites as its only outputs (nodes that feed none of them are dropped) and run in one
    onnxruntime session. Weights that read the same inputs (Q, K and V; gate and up) share one H. The Hessians are
    taken in groups that fit in opts.hessian_budget bytes (HESSIAN_BUDGET), one pass over the batches per group
    fetching only that group's inputs, and each finished H is spilled to the scratch folder until its weights are
    quantized; the session is closed before the first weight is. Peak memory: the session (it holds the float
    model, as verification does) plus one group. A weight used by several nodes sums their inputs' X^T X. The
    grouping does not change the result: each H sums the same batches in the same order."""

    def __init__(self, model: ir.Model, sites: list[_Site], batches: list[dict[str, np.ndarray]], folder: Path,
                 label: str, opts: QuantOptions):
        self.folder = Path(tempfile.mkdtemp(prefix="hessians-", dir=folder))
        self.damp, self.act_order = opts.damp, opts.act_order
        self.rows, self.runs = 0, 0          # calibration rows at the first input, session runs
        uses: dict[tuple, list[ir.Value]] = {}
        dims: dict[tuple[str, ...], int] = {}
        for site in sites:
            a = site.node.inputs[0]
            if a.type is None:
                a.type = ir.TensorType(site.dtype)  # MatMul's typing: the input has the weight's type
            if all(v is not a for v in uses.setdefault(site.key, [])):
                uses[site.key].append(a)
        self.sig = {key: tuple(v.name for v in vs) for key, vs in uses.items()}
        for site in sites:
            dims[self.sig[site.key]] = site.shape[0]
        self.left = {sig: sum(1 for s in self.sig.values() if s == sig) for sig in dims}  # weights still to come
        self.files: dict[tuple[str, ...], Path] = {}
        self.factors: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        fed = {v.name for v in model.graph.inputs}
        values = list({id(v): v for vs in uses.values() for v in vs if v.name not in fed}.values())
        path = self.folder / "calibration.onnx"
        session = None  # every weight reads a graph input: the batches are its inputs
        if values:
            _save_exposing(model, path, values)
            session = _session(path)
        group: list[tuple[str, ...]] = []
        size = 0
        for i, sig in enumerate(dims):
            group.append(sig)
            size += dims[sig] ** 2 * 8
            if size >= opts.hessian_budget or i == len(dims) - 1:
                self._group(session, group, dims, batches, label)
                group, size = [], 0
        del session
        _trim_heap()
        for f in (path, path.with_name(path.name + ".data")):
            f.unlink(missing_ok=True)

    def _group(self, session: Any, group: list[tuple[str, ...]], dims: dict[tuple[str, ...], int],
               batches: list[dict[str, np.ndarray]], label: str) -> None:
        hs = {sig: np.zeros((dims[sig], dims[sig]), np.float64) for sig in group}
        wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        names = list(dict.fromkeys(n for sig in group for n in sig))
        for b, feeds in enumerate(batches):
            fetch = [n for n in names if n not in feeds]
            outs = {}
            if fetch:
                try:
                    outs = dict(zip(fetch, session.run(fetch, {n: a for n, a in feeds.items() if n in wanted})))
                except Exception as exc:  # noqa: BLE001 - onnxruntime has its own types for bad shapes and values
                    raise UsageError(f"{label}: onnxruntime cannot run batch {b} ({first_line(exc)})") from None
                self.runs += 1
            for sig in group:
                for n in sig:
                    x = np.asarray(outs[n] if n in outs else feeds[n], np.float64).reshape(-1, dims[sig])
                    hs[sig] += x.T @ x
                    if not self.files and n == group[0][0]:
                        self.rows += x.shape[0]
            del outs
        for sig in group:
            self.files[sig] = self.folder / f"h{len(self.files)}.npy"
            np.save(self.files[sig], hs.pop(sig))

    def factor(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        """gptq_factor of the weight's H (computed once for the weights that share it), None when it saw no rows."""
        sig = self.sig[key]
        if sig not in self.factors:
            h = np.load(self.files[sig])
            self.files.pop(sig).unlink()
            self.factors[sig] = kq.gptq_factor(h, self.damp, self.act_order) if np.any(np.diag(h) > 0) else None
        f = self.factors[sig]
        self.left[sig] -= 1
        if not self.left[sig]:
            del self.factors[sig]
        return f


def _save_exposing(model: ir.Model, path: Path, values: list[ir.Value]) -> None:
    """Save the model with `values` as its only outputs, dropping the nodes that feed none of them."""
    import onnx

    graph = model.graph
    outputs = list(graph.outputs)
    graph.outputs.clear()
    graph.outputs.extend(values)
    try:
        ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    finally:
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        release_weights(model)
    proto = onnx.load(str(path), load_external_data=False)
    needed = {o.name for o in proto.graph.output}
    keep = []
    for node in reversed(proto.graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(_captured(node))
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(keep))
    onnx.save(proto, str(path))


def _captured(node: Any) -> set[str]:
    """Names a node's subgraphs read (they may come from the outer graph)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for n in g.node:
                names.update(n.input)
                names.update(_captured(n))
    return names


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc keeps the hundreds of MiB a closed onnxruntime session
    freed, which would otherwise stay in RSS through the quantization that follows); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _session(path: Path) -> Any:
    """An onnxruntime CPU session without graph optimizations (exact float semantics) or prepacked copies."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@register_pass
class QuantizeInt4(Pass):
    """Linear layers with constant weights -> int4 MatMulNBits (tied embedding -> GatherBlockQuantized)."""

    name = "quantize-int4"
    level = 1

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = options_of(ctx)
        graph = model.graph
        sites = find_sites(graph, opts, ctx.notes)
        if not sites:
            return PassResult(model, False, {})
        store = _Store(ctx.option("scratch_dir"))
        taken = {v.name for v in graph.initializers.values()} | {v.name for n in graph for v in n.outputs}
        done: dict[tuple, tuple[ir.Value, ir.Value, ir.Value | None]] = {}
        counts: dict[str, int] = {}
        transposes: list[ir.Node] = []   # Transpose(weight) nodes the rewrite may leave unused
        tie = opts.tied_embedding and opts.method != "hqq"  # GatherBlockQuantized takes no float zero points
        tables = _tables(graph, opts.block_size) if tie else []
        shapes = {_table_key(e) for _, e in tables}
        same = {(id(e), True, 1.0) for _, e in tables}
        digests: dict[tuple, bytes] = {}
        external = [v.const_value for v in graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
        started = time.perf_counter()
        hessians = None
        if opts.method in kq.CALIBRATED:
            label = f"--calibration {opts.calibration}"
            hessians = _Hessians(model, sites, load_calibration(opts.calibration, graph), store.scratch(), label,
                                 opts)
            ctx.notes.append(f"quantize-int4: calibration {opts.calibration}: {hessians.rows} rows at the first "
                             f"weight, {hessians.runs} onnxruntime runs, {time.perf_counter() - started:.2f} s")
            widest = max(site.shape[0] for site in sites)
            if hessians.rows < GPTQ_ROWS_PER_K * widest:
                ctx.notes.append(f"quantize-int4: {hessians.rows} calibration rows for inputs up to K = {widest} wide: "
                                 f"GPTQ fits the calibration set and generalizes poorly below about "
                                 f"{GPTQ_ROWS_PER_K} K = {GPTQ_ROWS_PER_K * widest} rows")
        blocks: dict[tuple, int] = {}   # a weight that may be a tied table takes a block its K is a multiple of
        for site in sites:
            if site.key not in blocks:
                block = opts.block_size
                if (site.shape[::-1], site.dtype) in shapes and site.shape[0] % block:
                    block = table_block(site.shape[0], block) or block
                    ctx.notes.append(f"quantize-int4: '{site.name}' may be a tied table of width {site.shape[0]}: "
                                     f"block {block} so the table can be shared")
                blocks[site.key] = block
        plan: dict[tuple, LayerChoice] = {}
        if opts.mixed:
            outputs = {id(v) for v in graph.outputs}
            logits = {s.key for s in sites if (s.shape[::-1], s.dtype) in shapes
                      or any(id((s.add or s.node).outputs[0]) == o for o in outputs)}
            plan = choose_bits(sites, blocks, logits, opts)
            high = [c for c in plan.values() if c.bits != 4]
            ctx.notes.append(f"quantize-int4: mixed precision: {len(high)} of {len(plan)} weights at {HIGH_BITS} bits "
                             f"({', '.join(c.name for c in high[:8])}{', ...' if len(high) > 8 else ''})")
        bits_of = {key: c.bits for key, c in plan.items()}
        for site in sites:
            if site.key not in done:
                block = blocks[site.key]
                bits = bits_of.get(site.key, 4)
                w = site.load()
                if (site.shape[::-1], site.dtype) in shapes and site.key not in same:
                    digests[site.key] = _table_digest(w[:, c:c + TABLE_ROWS].T
                                                      for c in range(0, w.shape[1], TABLE_ROWS))
                factor = hessians.factor(site.key) if hessians is not None else None
                if hessians is not None and factor is None:
                    ctx.notes.append(f"quantize-int4: '{site.name}' saw no calibration rows: {DEFAULT_METHOD} instead")
                if bits != 4:  # 8 bits: round-to-nearest is within a few percent of the best fit at this precision
                    b, s, z = kq.quantize(w, "rtn", block, opts.symmetric, bits=bits)
                elif factor is not None:
                    b, s, z = kq.gptq(w, None, block, opts.symmetric, factor=factor)
                else:
                    b, s, z = kq.quantize(w, opts.method if hessians is None else DEFAULT_METHOD, block,
                                          opts.symmetric)
                del w, factor
                for t in external:  # tensors mapped by an earlier pass (a lazy concatenation's parts) leave memory
                    t.release()
                done[site.key] = tuple(None if x is None else _initializer(graph, store.tensor(x, f"{site.name}_{tag}"),
                                                                            f"{site.name}_{tag}", taken)
                                       for x, tag in ((b, "q4"), (s, "scales"), (z, "zero_points")))
            qb, qs, qz = done[site.key]
            k, n = site.shape
            w_in = site.node.inputs[1]
            if w_in.producer() is not None and w_in.producer().op_type == "Transpose":
                transposes.append(w_in.producer())
            bias = None
            if site.bias is not None:
                bias = _initializer(graph, ir.tensor(site.bias), f"{site.name}_bias", taken)
            inputs = [site.node.inputs[0], qb, qs, qz, None, bias]  # read now: an earlier rewrite may feed it
            while inputs[-1] is None:
                inputs.pop()
            new = ir.Node(MS, "MatMulNBits", inputs, attributes=[
                ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits_of.get(site.key, 4)),
                ir.AttrInt64("block_size", blocks[site.key]), ir.AttrInt64("accuracy_level", opts.accuracy_level)],
                name=f"{site.node.name or site.name}_MatMulNBits")
            new.meta[META] = QuantSource(site.source, site.bias, "matmul")
            old_nodes = [site.node] + ([site.add] if site.add is not None else [])
            old_out = old_nodes[-1].outputs[0]
            new.outputs[0].shape, new.outputs[0].type = old_out.shape, old_out.type
            ir.convenience.replace_nodes_and_values(graph, site.node, old_nodes, [new], [old_out], [new.outputs[0]])
            kind = f"{site.node.op_type}+bias" if site.bias is not None else site.node.op_type
            counts[kind] = counts.get(kind, 0) + 1
        if hessians is not None:
            _trim_heap()
        if tables:
            for gather, site in _tied(tables, {s.key: s for s in sites}, digests):
                qb, qs, qz = done[site.key]
                k, n = site.shape
                bits = bits_of.get(site.key, 4)
                shape = _initializer(graph, ir.tensor(np.array([n, k * bits // 8], np.int64)),
                                     f"{site.name}_table_shape", taken)
                table = ir.Node("", "Reshape", [qb, shape], name=f"{gather.name or site.name}_table")
                inputs = [table.outputs[0], gather.inputs[1], qs] + ([qz] if qz is not None else [])
                new = ir.Node(MS, "GatherBlockQuantized", inputs, attributes=[
                    ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                    ir.AttrInt64("block_size", blocks[site.key]), ir.AttrInt64("bits", bits)],
                    name=f"{gather.name or site.name}_GatherBlockQuantized")
                new.meta[META] = QuantSource(site.source, None, "gather")
                old_out = gather.outputs[0]
                new.outputs[0].shape, new.outputs[0].type = old_out.shape, old_out.type
                ir.convenience.replace_nodes_and_values(graph, gather, [gather], [table, new], [old_out],
                                                        [new.outputs[0]])
                counts["Gather-tied"] = counts.get("Gather-tied", 0) + 1
        model.opset_imports.setdefault(MS, 1)
        ctx.results["quantize-int4"] = {"layers": [c.as_dict() for c in plan.values()]} if plan else {}
        ctx.notes.append(f"quantize-int4: {len(done)} weights, int4:{opts.method}"
                         f"{' mixed' if opts.mixed else ''}, block {opts.block_size}, "
                         f"{'symmetric' if opts.symmetric else 'asymmetric'}, accuracy_level {opts.accuracy_level}, "
                         f"{time.perf_counter() - started:.2f} s")
        for t in transposes:
            if t.graph is graph and not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
                graph.remove(t, safe=True)
        for v in list(graph.initializers.values()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                graph.initializers.pop(v.name)
        return PassResult(model, True, counts)
