"""The IR layer: load ONNX into onnx-ir (weights stay memory-mapped) and write it back atomically.

Loading never reads external weights: onnx-ir keeps them as ExternalTensor objects that memory-map their
file on first use. Saving streams one tensor at a time into a single data file named after the output.
Both files are first written into a temporary folder beside the output and renamed into place only when
the caller commits, so a failed compile or a failed verification never leaves a partial file behind.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from . import loader
from .errors import InvalidModelError, UsageError, WriteError, first_line

# Models whose weights exceed this are written with external data even if the input had none.
EXTERNAL_DATA_THRESHOLD_BYTES = 512 * 1024 * 1024
# Tensors at or below this size stay inside the .onnx file when external data is used.
INLINE_TENSOR_MAX_BYTES = 1024


LOAD_NOTES = "onnxc.load_notes"     # model.meta key: what the loader changed (dropped shapes, densified tensors)


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model file; raise InvalidModelError with one clear line when it is not a usable ONNX model or breaks
    one of the loader's rules (compiler/loader.py)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidModelError(f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidModelError(f"{path}: {exc.strerror or 'cannot read'}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidModelError(f"{path}: is a directory, not an ONNX file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise InvalidModelError(f"{path}: file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, RecursionError) as exc:
        raise InvalidModelError(f"{path}: not a readable ONNX model ({first_line(exc, 200)})") from None
    return from_proto(proto, base_dir=path.parent)


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """An onnx-ir model from a proto, after the loader's checks (every tensor, wherever it sits). `base_dir` is the
    model's folder; a proto without one may not use external data. The proto is changed in place (sparse tensors
    densified, contradicted value_info dropped)."""
    if not isinstance(proto, onnx.ModelProto) or not proto.HasField("graph"):
        raise InvalidModelError("not an ONNX model: it has no graph")
    if proto.ir_version <= 0:
        raise InvalidModelError(f"not an ONNX model: ir_version is {proto.ir_version}")
    folder = Path(base_dir) if base_dir is not None else None
    report = loader.prepare(proto, folder)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types on malformed protos
        raise InvalidModelError(f"malformed ONNX model ({first_line(exc, 200)})") from None
    if folder is not None:
        loader.resolve_external(model, folder)
    model.meta[LOAD_NOTES] = report.notes
    return model


def load_notes(model: ir.Model) -> list[str]:
    """What the loader changed in `model` (for the report's details)."""
    return list(model.meta.get(LOAD_NOTES, ()))


def as_model(model: str | os.PathLike | onnx.ModelProto | ir.Model | bytes) -> ir.Model:
    """Accept any form the Python API allows and return an onnx-ir Model."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)            # the caller's proto is not changed
        return from_proto(copy)
    if isinstance(model, (bytes, bytearray)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except (DecodeError, RecursionError) as exc:
            raise InvalidModelError(f"not a readable ONNX model ({first_line(exc, 200)})") from None
        return from_proto(proto)
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    raise UsageError(f"cannot compile an object of type {type(model).__name__}; give a path, ModelProto or onnx_ir.Model")


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, read from metadata only (no tensor data is touched)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def release_weights(model: ir.Model) -> None:
    """Unmap memory-mapped weights (they map again on next use), so their pages can leave memory."""
    for g in model.graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                v.const_value.release()


def derived_tensor(fn: Callable[..., np.ndarray], sources: Sequence[ir.TensorProtocol], dtype: ir.DataType,
                   shape: Sequence[int], name: str | None = None) -> ir.LazyTensor:
    """fn(*source arrays), computed only when read (at save time, one tensor at a time). Memory-mapped sources are
    released once it is computed (they map again on next use), so their pages do not stay resident until the model
    is freed."""
    def compute() -> ir.TensorProtocol:
        out = fn(*(t.numpy() for t in sources))
        for t in sources:
            if isinstance(t, ir.ExternalTensor):
                t.release()
        return ir.tensor(out)

    return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(list(shape)), name=name)


def transposed_equal(a: ir.TensorProtocol, b: ir.TensorProtocol, block: int = 1024) -> bool:
    """Whether 2-D `a` (N, K) holds exactly the bytes of `b` (K, N) transposed, compared `block` rows of `a` at a
    time (the columns of `b` read through its memory map, released after), so neither is copied whole."""
    if len(a.shape) != 2 or len(b.shape) != 2 or a.dtype != b.dtype or \
            tuple(int(d) for d in a.shape) != tuple(int(d) for d in b.shape)[::-1]:
        return False
    def equal() -> bool:
        x, y = a.numpy(), b.numpy()
        return all(np.array_equal(x[r0:r0 + block].view(np.uint8), np.ascontiguousarray(y[:, r0:r0 + block].T)
                                  .view(np.uint8)) for r0 in range(0, x.shape[0], block))

    same = equal()       # the arrays (views of the maps) are gone once it returns
    for t in (a, b):
        if isinstance(t, ir.ExternalTensor):
            t.release()
    return same


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(t, ir.ExternalTensor) for t in loader.ir_tensors(model))


def external_data_files(model: ir.Model) -> set[Path]:
    """The files the model's external tensors live in (functions and attributes included)."""
    return {Path(t.base_dir, t.location).resolve() for t in loader.ir_tensors(model)
            if isinstance(t, ir.ExternalTensor)}


def check_writable(path: Path, what: str = "output", suffixes: tuple[str, ...] = (".data",)) -> None:
    """Refuse, before any work, a place a file cannot be written atomically: a directory, a device, FIFO or other
    special file (it would be replaced by a regular file), a missing folder, a folder where no file can be created
    (read-only, /proc, no permission), or a name too long for the folder (with the staging prefix and `suffixes`)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{what} path {path}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} path {path} is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} path {path} is not a regular file (a device, FIFO or socket); choose a file path")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{what} folder {parent} does not exist")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = len(f".{path.name}.xxxxxxxx") + max((len(s) for s in suffixes), default=0)
    if len(path.name.encode()) + max((len(s) for s in suffixes), default=0) > name_max or longest > name_max:
        raise UsageError(f"{what} file name is too long for its folder ({len(path.name)} characters; the folder "
                         f"takes {name_max} with onnxc's staging prefix and suffixes)")
    try:
        fd, probe_path = tempfile.mkstemp(prefix=".onnxc-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe_path)
    except OSError as exc:
        raise UsageError(f"cannot write into the {what} folder {parent}: {exc.strerror or exc}") from None


def check_output_path(output: Path, input_path: Path | None, model: ir.Model) -> None:
    """Refuse to write over the input model or over any file the model's weights live in (and what
    check_writable refuses)."""
    out = output.resolve()
    if input_path is not None and out == input_path.resolve():
        raise UsageError(f"output path {output} is the input model; choose another with -o")
    for f in external_data_files(model):
        if f == out or (f.parent == out.parent and _is_owned(out, f.name)):
            raise UsageError(f"output would overwrite or remove {f}, which holds the input model's weights")
    check_writable(output)


class GraphWriter:
    """Nodes and constants a rewrite writes into a graph: each named `prefix/stem_N` (never an initializer's name
    already taken), inserted before `before` (or the writer's anchor, or the graph's first node), outputs named too
    so the saved file is deterministic."""

    def __init__(self, graph: ir.Graph, prefix: str, anchor: ir.Node | None = None):
        self.graph, self.prefix, self.count = graph, prefix, 0
        self.anchor = anchor if anchor is not None else (graph[0] if len(graph) else None)

    def name(self, stem: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}/{stem}_{self.count}"
            if name not in self.graph.initializers:
                return name

    def const(self, arr: np.ndarray, stem: str = "c") -> ir.Value:
        v = ir.Value(name=self.name(stem), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     shape=ir.Shape(arr.shape), const_value=ir.tensor(arr))
        self.graph.register_initializer(v)
        return v

    def node(self, op: str, inputs: list, before: ir.Node | None = None, domain: str = "", n_out: int = 1,
             **attrs) -> ir.Node:
        node = ir.node(op, inputs, attributes=attrs, domain=domain, num_outputs=n_out, name=self.name(op))
        for o in node.outputs:
            o.name = self.name(f"{op}_out")
        anchor = before or self.anchor
        self.graph.insert_before(anchor, node) if anchor is not None else self.graph.append(node)
        return node


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _hold_signals() -> object | None:
    """Block Ctrl-C and SIGTERM in the main thread; the previous mask, to give to _release_signals."""
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    return signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED) if main else None


def _release_signals(held: object | None) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)    # a held signal is raised here


@contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A new folder, removed with everything in it when the block ends, however it ends. Ctrl-C and SIGTERM are held
    back while it is created until its removal is armed, and while it is removed, so a signal that lands in either
    window leaves nothing (it is raised once the folder is gone)."""
    held = _hold_signals()
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except BaseException:
        _release_signals(held)
        raise
    try:
        _release_signals(held)
        yield path
    finally:
        held = None
        try:
            held = _hold_signals()
        finally:                # a signal before the hold lands here: the folder still goes
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                _release_signals(held)


DATA_DIGEST_CHARS = 16
_OLD_MODEL_MAX_BYTES = 64 << 20     # an output model larger than this holds its weights inline: no data file to remove


def data_file_name(destination: Path, digest: str) -> str:
    """`<output>.<digest>.data`: the weights file of one compiled model, named by a hash of its bytes."""
    return f"{destination.name}.{digest[:DATA_DIGEST_CHARS]}.data"


def owned_data_files(destination: Path) -> set[str]:
    """Names of the data files beside `destination` that the model now there references and that onnxc would have
    written for it (`<name>.*.data`, or the `<name>.data` of earlier versions); empty when there is none."""
    try:
        st = destination.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _OLD_MODEL_MAX_BYTES:
            return set()
        proto = onnx.load(str(destination), load_external_data=False)
        sites = [s.tensor for s in loader.tensor_sites(proto)]
    except Exception:  # noqa: BLE001 - whatever is there is not a model onnxc wrote: leave its files alone
        return set()
    names = set()
    for t in sites:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if _is_owned(destination, loc):
                names.add(loc)
    return names


def _is_owned(destination: Path, name: str) -> bool:
    return "/" not in name and "\\" not in name and name.startswith(destination.name + ".") and name.endswith(".data")


class StagedOutput:
    """Files written to a temporary folder beside the destination; `commit` moves them into place as one unit.

    The data file's name carries a hash of its bytes, so it never replaces the weights of another model: it is
    renamed into place first, then the model (the one step readers see), then the data files of the model it
    replaced are removed, unless the model now in place references them. Commits to one folder hold a lock on it, so
    a concurrent writer to the same path never leaves a model beside another model's weights, or without its own."""

    def __init__(self, destination: Path, model_file: Path, data_file: Path | None):
        self.destination = destination
        self.model_file = model_file
        self.data_file = data_file

    def commit(self) -> list[Path]:
        folder = self.destination.parent
        with _folder_lock(folder):
            old = owned_data_files(self.destination)
            placed = None
            try:
                if self.data_file is not None:
                    placed = folder / self.data_file.name
                    os.replace(self.data_file, placed)
                os.replace(self.model_file, self.destination)
            except OSError as exc:
                if placed is not None and placed.name not in owned_data_files(self.destination):
                    placed.unlink(missing_ok=True)
                raise WriteError(f"cannot move the output into place at {self.destination}: "
                                 f"{exc.strerror or exc}") from None
            for name in old - owned_data_files(self.destination):
                try:
                    (folder / name).unlink(missing_ok=True)
                except OSError:
                    pass        # a stale weights file left behind is harmless; the model in place is whole
        return [self.destination] + ([placed] if placed is not None else [])


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the output folder while a commit runs, so that two onnxc commits to one folder never
    interleave: one could otherwise remove a data file (named by its bytes) that the other has just put back for the
    model it is about to rename into place. Where the folder cannot be locked, the commit runs unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)            # releases the lock


@contextmanager
def staged_save(model: ir.Model, destination: str | os.PathLike, *, external_data: bool | None = None
                ) -> Iterator[StagedOutput]:
    """Save `model` into a temporary folder next to `destination`; the folder is removed on exit.

    The caller verifies the staged files and calls `.commit()` to move them into place atomically.
    external_data: True/False forces the layout; None keeps weights inline unless the input used external data
    or the weights exceed EXTERNAL_DATA_THRESHOLD_BYTES. The data file is `<output>.<hash of its bytes>.data`, and
    only exists when some tensor is larger than INLINE_TENSOR_MAX_BYTES.
    """
    destination = Path(destination)
    if external_data is None:
        external_data = uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    try:
        staging = scratch_dir(f".{destination.name}.", destination.parent)
        tmpdir = staging.__enter__()
    except OSError as exc:
        raise WriteError(f"cannot create a staging folder beside {destination}: {exc.strerror or exc}") from None
    try:
        model_file = tmpdir / destination.name
        data_file = None
        try:
            if external_data:
                data_file = _save_external(model, model_file, destination)
            else:
                _save_inline(model, model_file)
        except OSError as exc:
            why = "no space left on the device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
                (exc.strerror or str(exc))
            raise WriteError(f"cannot write {destination}: {why}; nothing was written") from None
        yield StagedOutput(destination, model_file, data_file)
    finally:
        staging.__exit__(None, None, None)


def _save_external(model: ir.Model, model_file: Path, destination: Path) -> Path | None:
    """Save with tensors over INLINE_TENSOR_MAX_BYTES in one data file beside `model_file`, then name that file by
    the hash of its bytes (and point the model at it). No data file when no tensor went there."""
    staged_name = destination.name + ".staged.data"
    ir.save(model, model_file, external_data=staged_name, size_threshold_bytes=INLINE_TENSOR_MAX_BYTES)
    data = model_file.parent / staged_name
    proto = onnx.load(str(model_file), load_external_data=False)
    users = []
    for site in loader.tensor_sites(proto):
        for e in site.tensor.external_data:
            if e.key == "location" and e.value == staged_name:
                users.append(e)
    if not users or not data.exists() or data.stat().st_size == 0:
        if users:
            raise WriteError(f"cannot write {destination}: the weights file came out empty")
        data.unlink(missing_ok=True)
        return None
    with open(data, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    final = model_file.parent / data_file_name(destination, digest)
    os.replace(data, final)
    for e in users:
        e.value = final.name
    with open(model_file, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
    return final


def _save_inline(model: ir.Model, path: Path) -> None:
    proto = to_proto(model)
    if proto.ByteSize() > 2**31 - 1:
        raise UsageError("model exceeds the 2 GB protobuf limit; save it with external data")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize with every tensor inline (reads external weights; use for small models)."""
    proto = ir.serde.serialize_model(model)
    onnx.external_data_helper.load_external_data_for_model(proto, _base_dir(model))
    return proto


def _base_dir(model: ir.Model) -> str:
    for v in model.graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            return str(v.const_value.base_dir)
    return "."
