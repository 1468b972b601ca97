"""The loader's rule set: every tensor of a model, wherever it sits, checked before onnx-ir sees it.

A model's tensors live in the main graph's initializers, in subgraphs (If, Loop, Scan bodies), in model-local
functions and in node attributes (Constant's `value`, defaults of function attributes). `prepare` walks all of them
iteratively (no recursion limit; subgraph nesting is capped at MAX_GRAPH_DEPTH) and applies one set of rules:

- the declared size (dims x element type) must fit MAX_TENSOR_BYTES and agree with the data the tensor holds, inline
  or external; dims are non-negative;
- external data: the location is a relative path of at most MAX_LOCATION_BYTES, with no `..`, no absolute or drive
  path, no NUL; it is resolved against the model's folder (never the working directory); no folder on the way and
  not the file itself may be a symbolic link; the file is a regular file (a FIFO or device is never opened) with one
  link (no hard links); offset and length are decimal integers; the bytes they name lie inside the file and are
  exactly the tensor's size (without a length, the file from the offset on must hold at least that); keys other
  than location, offset, length, checksum and basepath are refused (onnxruntime refuses them too);
- every string field is UTF-8;
- sparse tensors are densified (onnx-ir has no sparse tensors), up to MAX_DENSIFIED_BYTES;
- graph inputs, outputs and value_info have no negative dims;
- value_info shapes are hints: those ONNX shape inference contradicts are dropped (a note says which).

Nothing is read from external files here: only their metadata is looked at (`resolve_external`, after
deserialization, reads external data held in node attributes). Every failure is an InvalidModelError
(exit 3) with one line naming the tensor and the reason.
"""
from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from .errors import InvalidModelError, UsageError, quote

MAX_GRAPH_DEPTH = 24                    # subgraphs inside subgraphs (protobuf parsing stops near 32)
MAX_LOCATION_BYTES = 1024
MAX_TENSOR_BYTES = 1 << 40              # 1 TiB: no real tensor comes near; also bounds the dims' product
MAX_DENSIFIED_BYTES = 1 << 30
MAX_ATTRIBUTE_BYTES = 256 << 20         # external data read at load because it sits in a node attribute
_DIGITS = re.compile(r"[0-9]{1,19}")
_KNOWN_KEYS = ("location", "offset", "length", "checksum", "basepath")

# TensorProto's typed fields, per data type: (field, values per element)
_FIELD = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}


@dataclass
class LoadReport:
    """What prepare changed or noticed, for the compile report's details (-v)."""

    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- the walk
@dataclass
class Site:
    tensor: onnx.TensorProto
    where: str                          # "initializer 'w'", "function 'f' node 'c' attribute 'value'", ...


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto | onnx.FunctionProto, str, int]]:
    """The main graph, every function and every subgraph, with a label and a nesting depth; iterative."""
    stack: list[tuple[onnx.GraphProto | onnx.FunctionProto, str, int]] = []
    for fn in reversed(model.functions):
        stack.append((fn, f"function {quote(fn.domain + '::' + fn.name)}", 0))
    stack.append((model.graph, "graph", 0))
    while stack:
        g, label, depth = stack.pop()
        if depth > MAX_GRAPH_DEPTH:
            raise InvalidModelError(f"{label}: subgraphs are nested more than {MAX_GRAPH_DEPTH} deep")
        yield g, label, depth
        for node in reversed(g.node):
            for attr in reversed(node.attribute):
                sub = f"{label} node {quote(node.name or node.op_type)} attribute {quote(attr.name)}"
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((attr.g, sub, depth + 1))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend((sg, f"{sub}[{k}]", depth + 1) for k, sg in reversed(list(enumerate(attr.graphs))))


def _attribute_tensors(attrs, label: str) -> Iterator[Site]:
    for attr in attrs:
        where = f"{label} attribute {quote(attr.name)}"
        if attr.type == onnx.AttributeProto.TENSOR:
            yield Site(attr.t, where)
        elif attr.type == onnx.AttributeProto.TENSORS:
            yield from (Site(t, f"{where}[{k}]") for k, t in enumerate(attr.tensors))


def tensor_sites(model: onnx.ModelProto) -> Iterator[Site]:
    """Every dense tensor of the model (sparse ones are densified before this is asked)."""
    for g, label, _ in _graphs(model):
        if isinstance(g, onnx.GraphProto):
            yield from (Site(t, f"{label} initializer {quote(t.name)}") for t in g.initializer)
        else:
            yield from _attribute_tensors(g.attribute_proto, label)
        for node in g.node:
            yield from _attribute_tensors(node.attribute, f"{label} node {quote(node.name or node.op_type)}")


# ------------------------------------------------------------------------------------------------ the rules
def declared_bytes(t: onnx.TensorProto, where: str) -> int:
    """The bytes dims x data type make; refuses negative dims, unknown types and sizes past MAX_TENSOR_BYTES."""
    if any(d < 0 for d in t.dims):
        raise InvalidModelError(f"{where}: negative dim in {list(t.dims)}")
    try:
        dtype = ir.DataType(t.data_type)
    except ValueError:
        raise InvalidModelError(f"{where}: unknown data type {t.data_type}") from None
    if dtype == ir.DataType.UNDEFINED:
        raise InvalidModelError(f"{where}: data type is undefined")
    count = math.prod(t.dims)
    if dtype == ir.DataType.STRING:
        return count
    size = (count * dtype.bitwidth + 7) // 8
    if size > MAX_TENSOR_BYTES:
        raise InvalidModelError(f"{where}: dims {list(t.dims)} declare {size} bytes, over the {MAX_TENSOR_BYTES} "
                                "bytes a tensor may have")
    return size


def _check_inline(t: onnx.TensorProto, where: str, size: int) -> None:
    count = math.prod(t.dims)
    dtype = ir.DataType(t.data_type)
    if t.HasField("raw_data") and dtype != ir.DataType.STRING:
        if len(t.raw_data) != size:
            raise InvalidModelError(f"{where}: holds {len(t.raw_data)} bytes but its dims {list(t.dims)} and type "
                                    f"{dtype.name} declare {size}")
        return
    name, per = _FIELD.get(t.data_type, ("int32_data", 1))
    held = len(getattr(t, name))
    wanted = [count * per]
    if dtype.bitwidth < 8 and name == "int32_data":
        wanted.append((count * dtype.bitwidth + 7) // 8)      # packed, as some writers store sub-byte types
    if held not in wanted:
        raise InvalidModelError(f"{where}: holds {held} values in {name} but its dims {list(t.dims)} declare "
                                f"{wanted[0]}")


def _location_parts(location: str, where: str) -> list[str]:
    if not location:
        raise InvalidModelError(f"{where}: external data has no location")
    if len(location.encode("utf-8", "surrogatepass")) > MAX_LOCATION_BYTES:
        raise InvalidModelError(f"{where}: external data location is {len(location)} characters long (at most "
                                f"{MAX_LOCATION_BYTES} bytes)")
    if "\0" in location:
        raise InvalidModelError(f"{where}: external data location holds a NUL byte")
    parts = re.split(r"[/\\]", location)
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location) or os.path.isabs(location) \
            or ".." in parts:
        raise InvalidModelError(f"{where}: external data location {quote(location)} is outside the model's folder")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise InvalidModelError(f"{where}: external data location {quote(location)} names no file")
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        raise InvalidModelError(f"{where}: external data location has a name over 255 bytes")
    return parts


def stat_external(base_dir: Path, location: str, where: str) -> os.stat_result:
    """The stat of `location` under `base_dir`, walked one name at a time without following any link and without
    opening the file itself (a FIFO is never opened)."""
    parts = _location_parts(location, where)
    try:
        fd = os.open(base_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise InvalidModelError(f"{where}: the model's folder cannot be read ({exc.strerror})") from None
    try:
        for k, name in enumerate(parts):
            shown = quote("/".join(parts[:k + 1]))
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise InvalidModelError(f"{where}: external data file {quote(location)} not found") from None
            except OSError as exc:
                raise InvalidModelError(f"{where}: external data {shown}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise InvalidModelError(f"{where}: external data {shown} is a symbolic link")
            if k == len(parts) - 1:
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidModelError(f"{where}: external data {shown} is not a regular file")
                if st.st_nlink > 1:
                    raise InvalidModelError(f"{where}: external data {shown} has {st.st_nlink} hard links")
                return st
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidModelError(f"{where}: external data {shown} is not a folder")
            try:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise InvalidModelError(f"{where}: external data {shown}: {exc.strerror}") from None
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    raise AssertionError("unreachable")


def _check_external(t: onnx.TensorProto, where: str, size: int, base_dir: Path | None,
                    seen: dict[str, os.stat_result]) -> None:
    if base_dir is None:
        raise InvalidModelError(f"{where}: external data needs the model's folder; give the model as a file path")
    if ir.DataType(t.data_type) == ir.DataType.STRING:
        raise InvalidModelError(f"{where}: a string tensor cannot live in external data")
    info: dict[str, str] = {}
    for entry in t.external_data:
        if entry.key not in _KNOWN_KEYS:        # onnxruntime refuses the model too
            raise InvalidModelError(f"{where}: unknown external data key {quote(entry.key, 40)} (known: "
                                    f"{', '.join(_KNOWN_KEYS)})")
        info[entry.key] = entry.value
    location = info.get("location", "")
    if location not in seen:
        seen[location] = stat_external(base_dir, location, where)
    file_size = seen[location].st_size
    numbers = {}
    for key in ("offset", "length"):
        text = info.get(key)
        if text is None:
            continue
        if not _DIGITS.fullmatch(text):
            raise InvalidModelError(f"{where}: external data {key} {quote(text[:40])} is not a non-negative integer")
        numbers[key] = int(text)
    offset = numbers.get("offset", 0)
    if "length" in numbers and numbers["length"] != size:
        raise InvalidModelError(f"{where}: external data length {numbers['length']} but its dims {list(t.dims)} "
                                f"declare {size} bytes")
    if offset + size > file_size:
        raise InvalidModelError(f"{where}: external data {quote(location)} is truncated (needs {offset + size} "
                                f"bytes, has {file_size})")


def check_tensor(t: onnx.TensorProto, where: str, base_dir: Path | None,
                 seen: dict[str, os.stat_result] | None = None) -> None:
    size = declared_bytes(t, where)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        _check_external(t, where, size, base_dir, {} if seen is None else seen)
    elif t.data_location != onnx.TensorProto.DEFAULT:
        raise InvalidModelError(f"{where}: unknown data location {t.data_location}")
    else:
        _check_inline(t, where, size)


# --------------------------------------------------------------------------------------------- sparse tensors
def _densify(sp: onnx.SparseTensorProto, where: str) -> onnx.TensorProto:
    """The dense twin of a sparse tensor (indices checked: in range, the layout the spec allows)."""
    values, indices = sp.values, sp.indices
    for t, what in ((values, "values"), (indices, "indices")):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise InvalidModelError(f"{where}: sparse {what} in external data are not supported")
        check_tensor(t, f"{where} {what}", None)
    dims = list(sp.dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(f"{where}: negative dim in {dims}")
    count = math.prod(dims)
    try:
        dtype = ir.DataType(values.data_type)
        itemsize = dtype.itemsize
    except (ValueError, TypeError, AttributeError):
        raise InvalidModelError(f"{where}: sparse values have an unsupported data type") from None
    if count * itemsize > MAX_DENSIFIED_BYTES or dtype.bitwidth < 8 or dtype == ir.DataType.STRING:
        raise InvalidModelError(f"{where}: a sparse tensor of {count} {dtype.name} elements cannot be densified")
    vals = onnx.numpy_helper.to_array(values).reshape(-1)
    idx = onnx.numpy_helper.to_array(indices).astype(np.int64, copy=False)
    nnz = vals.size
    if idx.ndim == 1 and idx.size == nnz:
        flat = idx
    elif idx.ndim == 2 and idx.shape == (nnz, len(dims)):
        if np.any(idx < 0) or np.any(idx >= np.asarray(dims, np.int64)):
            raise InvalidModelError(f"{where}: sparse indices out of range for dims {dims}")
        flat = np.ravel_multi_index(idx.T, dims) if nnz else np.zeros(0, np.int64)
    else:
        raise InvalidModelError(f"{where}: sparse indices of shape {list(idx.shape)} do not fit {nnz} values")
    if np.any(flat < 0) or np.any(flat >= max(count, 1)) or (count == 0 and nnz):
        raise InvalidModelError(f"{where}: sparse indices out of range for dims {dims}")
    dense = np.zeros(count, vals.dtype)
    dense[flat] = vals
    out = onnx.numpy_helper.from_array(dense.reshape(dims), values.name)
    out.data_type = values.data_type         # bfloat16 and float8 come back from numpy as their storage type
    return out


def _densify_all(model: onnx.ModelProto, report: LoadReport) -> None:
    for g, label, _ in _graphs(model):
        if isinstance(g, onnx.GraphProto) and len(g.sparse_initializer):
            for sp in g.sparse_initializer:
                g.initializer.append(_densify(sp, f"{label} sparse initializer {quote(sp.values.name)}"))
            report.notes.append(f"{label}: {len(g.sparse_initializer)} sparse initializer(s) stored dense")
            del g.sparse_initializer[:]
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.SPARSE_TENSOR and node.op_type == "Constant" \
                        and node.domain in ("", "ai.onnx") and attr.name == "sparse_value":
                    where = f"{label} node {quote(node.name or node.op_type)} attribute 'sparse_value'"
                    dense = _densify(attr.sparse_tensor, where)
                    attr.Clear()
                    attr.name, attr.type = "value", onnx.AttributeProto.TENSOR
                    attr.t.CopyFrom(dense)
                elif attr.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                    raise InvalidModelError(f"{label} node {quote(node.name or node.op_type)}: sparse tensor "
                                            f"attribute {quote(attr.name)} is not supported")


# ------------------------------------------------------------------------------------------- declared shapes
def _check_value_dims(model: onnx.ModelProto) -> None:
    g = model.graph
    for kind, infos in (("input", g.input), ("output", g.output), ("value_info", g.value_info)):
        for vi in infos:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                if any(d.HasField("dim_value") and d.dim_value < 0 for d in dims):
                    raise InvalidModelError(f"graph {kind} {quote(vi.name)} has a negative dim")


def _shape_of(t: onnx.TypeProto) -> tuple[int, list[int | None]] | None:
    if not t.HasField("tensor_type"):
        return None
    tt = t.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
        if tt.HasField("shape") else None
    return tt.elem_type, dims


def _contradicts(declared: onnx.TypeProto, inferred: onnx.TypeProto) -> bool:
    a, b = _shape_of(declared), _shape_of(inferred)
    if a is None or b is None:
        return False
    if a[0] and b[0] and a[0] != b[0]:
        return True
    if a[1] is None or b[1] is None:
        return False
    return len(a[1]) != len(b[1]) or any(x is not None and y is not None and x != y for x, y in zip(a[1], b[1]))


def _describe(t: onnx.TypeProto) -> str:
    s = _shape_of(t)
    if s is None:
        return "?"
    elem = onnx.TensorProto.DataType.Name(s[0]) if s[0] in onnx.TensorProto.DataType.values() else str(s[0])
    return elem.lower() + ("" if s[1] is None else str(["?" if d is None else d for d in s[1]]))


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """ONNX shape inference on a weightless copy of the main graph, without its value_info (so the declared shapes
    cannot feed the inference that checks them). Large initializers become typed graph inputs."""
    stub = onnx.ModelProto(ir_version=model.ir_version)
    stub.opset_import.extend(model.opset_import)
    stub.functions.extend(model.functions)
    g = stub.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    declared = {vi.name for vi in g.input}
    for t in model.graph.initializer:
        small = t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= 4096
        if small:
            g.initializer.append(t)
        if not small and t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for o in model.graph.output:
        g.output.add(name=o.name)
    try:
        done = onnx.shape_inference.infer_shapes(stub, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference that fails checks nothing; the hints stay as they are
        return {}
    return {vi.name: vi.type for vi in [*done.graph.value_info, *done.graph.output] if vi.type.ByteSize()}


def _drop_contradicted_shapes(model: onnx.ModelProto, report: LoadReport) -> None:
    g = model.graph
    if not len(g.value_info) and not any(_shape_of(o.type) for o in g.output):
        return
    inferred = _inferred_types(model)
    keep = []
    for vi in g.value_info:
        got = inferred.get(vi.name)
        if got is not None and _contradicts(vi.type, got):
            report.notes.append(f"value_info {quote(vi.name)} declares {_describe(vi.type)} but the graph computes "
                                f"{_describe(got)}; the declaration is dropped")
        else:
            keep.append(vi)
    if len(keep) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(keep)
    for o in g.output:
        got = inferred.get(o.name)
        if got is not None and _contradicts(o.type, got):
            report.notes.append(f"graph output {quote(o.name)} declares {_describe(o.type)} but the graph computes "
                                f"{_describe(got)}; the inferred type is kept")
            o.type.CopyFrom(got)


_ATTRIBUTE_FIELD = {onnx.AttributeProto.GRAPH: "g", onnx.AttributeProto.TENSOR: "t",
                    onnx.AttributeProto.SPARSE_TENSOR: "sparse_tensor", onnx.AttributeProto.TYPE_PROTO: "tp"}


def _check_attributes(model: onnx.ModelProto) -> None:
    """Every node attribute has a type, and holds the value its type names (a GRAPH attribute has a graph)."""
    for g, label, _ in _graphs(model):
        for node in g.node:
            for attr in node.attribute:
                if attr.ref_attr_name:
                    continue
                where = f"{label} node {quote(node.name or node.op_type)} attribute {quote(attr.name)}"
                if attr.type == onnx.AttributeProto.UNDEFINED:
                    raise InvalidModelError(f"{where} has no type")
                if attr.type not in onnx.AttributeProto.AttributeType.values():
                    raise InvalidModelError(f"{where} has an unknown type {attr.type}")
                field = _ATTRIBUTE_FIELD.get(attr.type)
                if field is not None and not attr.HasField(field):
                    raise InvalidModelError(f"{where} is typed {onnx.AttributeProto.AttributeType.Name(attr.type)} "
                                            "but holds no such value")


def _check_text(model: onnx.ModelProto) -> None:
    """Every string field is UTF-8 (protobuf hands one that is not over as bytes, which no name may be)."""
    stack: list = [model]
    while stack:
        msg = stack.pop()
        for fd, value in msg.ListFields():
            repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
            if fd.type == fd.TYPE_STRING:
                if any(isinstance(v, bytes) for v in (value if repeated else [value])):
                    raise InvalidModelError(f"field {fd.full_name} is not valid UTF-8")
            elif fd.type == fd.TYPE_MESSAGE:
                if repeated:
                    stack.extend(value)
                else:
                    stack.append(value)


# ------------------------------------------------------------------------------------------------- entry points
def prepare(model: onnx.ModelProto, base_dir: Path | None) -> LoadReport:
    """Check (and, for sparse tensors and contradicted shapes, fix) a model proto in place before deserializing it.
    `base_dir` is the model's folder; None for a model that did not come from a file (it may not use external
    data)."""
    report = LoadReport()
    _check_text(model)
    _check_attributes(model)
    _densify_all(model, report)
    seen: dict[str, os.stat_result] = {}
    for site in tensor_sites(model):
        check_tensor(site.tensor, site.where, base_dir, seen)
    _check_value_dims(model)
    _drop_contradicted_shapes(model, report)
    return report


def ir_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of an onnx-ir model: initializers and attribute tensors of the main graph, its subgraphs and the
    model's functions; iterative."""
    stack: list[ir.Graph | ir.Function] = [*model.functions.values(), model.graph]
    while stack:
        g = stack.pop()
        if isinstance(g, ir.Graph):
            yield from (v.const_value for v in g.initializers.values() if v.const_value is not None)
        for node in g:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value
                elif attr.type == ir.AttributeType.GRAPH:
                    stack.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    stack.extend(attr.value)


def resolve_external(model: ir.Model, base_dir: Path) -> None:
    """Point every external tensor at the model's folder. Initializers stay memory-mapped; a tensor held in a node
    attribute (a Constant in a function or a subgraph) is read now, up to MAX_ATTRIBUTE_BYTES, because onnx-ir
    saves only initializers to a data file: kept external, the output would point into its own folder."""
    for t in ir_tensors(model):
        if isinstance(t, ir.ExternalTensor):
            t.base_dir = str(base_dir)
    stack: list[ir.Graph | ir.Function] = [*model.functions.values(), model.graph]
    while stack:
        g = stack.pop()
        for node in g:
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    node.attributes[name] = ir.AttrTensor(name, _read_attribute(attr.value, node, name))
                elif attr.type == ir.AttributeType.TENSORS and \
                        any(isinstance(t, ir.ExternalTensor) for t in attr.value):
                    node.attributes[name] = ir.AttrTensors(name, [_read_attribute(t, node, name) if isinstance(
                        t, ir.ExternalTensor) else t for t in attr.value])
                elif attr.type == ir.AttributeType.GRAPH:
                    stack.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    stack.extend(attr.value)


def _read_attribute(t: ir.ExternalTensor, node: ir.Node, name: str) -> ir.TensorProtocol:
    if t.nbytes > MAX_ATTRIBUTE_BYTES:
        raise InvalidModelError(f"node {quote(node.name or node.op_type)} attribute {quote(name)}: {t.nbytes} bytes "
                                f"of external data in an attribute (at most {MAX_ATTRIBUTE_BYTES}; use an "
                                "initializer)")
    data = np.array(t.numpy())          # a copy: the file's map is released
    t.release()
    return ir.Tensor(data, dtype=t.dtype, name=t.name)


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """A file an option names exists and is a regular file (a FIFO or device would block or never end)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or 'cannot read'}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path}: not a regular file")
    return path
