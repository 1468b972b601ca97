"""Hostile and edge-case models, generated: each case writes its files into a folder of its own and says how the
command line must answer (exit code, a fragment of the one error line).

Layout per case (`root` is fresh for each):

    root/secret.bin        bytes outside the model's folder (SECRET, repeated): no output may hold any of them
    root/model/model.onnx  the model, with whatever files, links, FIFOs it needs beside it
    root/out/o.onnx        where the compile writes
    root/tmp/              TMPDIR for the compile: empty again afterwards

Classes: external data (containment, links, special files, malformed keys, lying sizes) in the graph, subgraphs,
functions and Constant attributes; sizes that disagree with the data; negative dims; nesting past the cap; names
with newlines and NUL bytes; models onnxruntime refuses; sparse tensors; value_info that contradicts the graph;
special files given as the model or as --verify-inputs; unreadable bytes.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SECRET = b"\x8fONNXC-OUTSIDE\x17\x01"      # 16 bytes; secret.bin holds it 256 times (4 KiB)
OPSET = 17
W = np.arange(16, dtype=np.float32).reshape(4, 4) / 7.0


@dataclass
class Case:
    name: str
    build: Callable[[Path], Path]            # model folder -> model path
    exit_code: int
    message: str = ""                        # a fragment the error line holds
    args: list[str] = field(default_factory=list)
    chdir_secret: bool = False               # run with the working directory holding secret.bin as "w.bin"


# ------------------------------------------------------------------------------------------------- builders
def _model(nodes, inits=(), functions=(), inputs=None, outputs=None, value_info=(), opsets=None, sparse=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info),
                              sparse_initializer=list(sparse))
    ops = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in (opsets or [])]
    m = helper.make_model(graph, opset_imports=ops, functions=list(functions))
    m.ir_version = 8
    return m


def _external(name: str, location: str, *, dims=(4, 4), offset: str | None = "0", length: str | None = "64",
              dtype=TensorProto.FLOAT, extra: dict[str, str] | None = None) -> TensorProto:
    t = TensorProto(name=name, dims=list(dims), data_type=dtype, data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=location)
    for k, v in (extra or {}).items():
        t.external_data.add(key=k, value=v)
    if offset is not None:
        t.external_data.add(key="offset", value=offset)
    if length is not None:
        t.external_data.add(key="length", value=length)
    return t


def _save(m: onnx.ModelProto, folder: Path, weights: bytes | None = None, name: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        (folder / name).write_bytes(weights)
    path = folder / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def _secret(folder: Path) -> Path:
    return folder.parent / "secret.bin"


def graph_weight(location: str | Callable[[Path], str], weights: bytes | None = None, setup=None, **kw):
    """y = x @ w, w an initializer in external data at `location`."""
    def build(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if setup is not None:
            setup(folder)
        loc = location(folder) if callable(location) else location
        m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_external("w", loc, **kw)])
        return _save(m, folder, weights)
    return build


def constant_weight(location: str, weights: bytes | None = None, **kw):
    """y = x @ Constant(value=<external tensor>) in the main graph."""
    def build(folder: Path) -> Path:
        c = helper.make_node("Constant", [], ["c"], name="const", value=_external("cw", location, **kw))
        m = _model([c, helper.make_node("MatMul", ["x", "c"], ["y"], name="mm")])
        return _save(m, folder, weights)
    return build


def function_weight(location: str | Callable[[Path], str], weights: bytes | None = None, **kw):
    """y = local.Project(x), a model-local function whose body holds Constant(value=<external tensor>)."""
    def build(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        loc = location(folder) if callable(location) else location
        body = [helper.make_node("Constant", [], ["c"], name="fconst", value=_external("fw", loc, **kw)),
                helper.make_node("MatMul", ["X", "c"], ["Y"], name="fmm")]
        fn = helper.make_function("local", "Project", ["X"], ["Y"], body, [helper.make_opsetid("", OPSET)])
        m = _model([helper.make_node("Project", ["x"], ["y"], name="proj", domain="local")], functions=[fn],
                   opsets=["local"])
        return _save(m, folder, weights)
    return build


def subgraph_weight(location: str, weights: bytes | None = None, **kw):
    """y = x @ If(true, then: Constant(<external tensor>), else: Constant(W))."""
    def build(folder: Path) -> Path:
        out = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 4])]
        then = helper.make_graph([helper.make_node("Constant", [], ["c"], value=_external("tw", location, **kw))],
                                 "then", [], out)
        other = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(W, "ew"))],
                                  "else", [], out)
        nodes = [helper.make_node("If", ["cond"], ["cw"], name="if", then_branch=then, else_branch=other),
                 helper.make_node("MatMul", ["x", "cw"], ["y"], name="mm")]
        m = _model(nodes, [numpy_helper.from_array(np.array(True), "cond")])
        return _save(m, folder, weights)
    return build


def inline_weight(tensor: Callable[[], TensorProto], name_out: str = "y"):
    def build(folder: Path) -> Path:
        t = tensor()
        m = _model([helper.make_node("MatMul", ["x", t.name], [name_out], name="mm")], [t],
                   outputs=[helper.make_tensor_value_info(name_out, TensorProto.FLOAT, [2, 4])])
        return _save(m, folder)
    return build


def proto(make: Callable[[], onnx.ModelProto]):
    return lambda folder: _save(make(), folder)


def raw_file(content: bytes):
    def build(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        path.write_bytes(content)
        return path
    return build


def with_setup(build: Callable[[Path], Path], setup: Callable[[Path], None]):
    def wrapped(folder: Path) -> Path:
        path = build(folder)
        setup(folder)
        return path
    return wrapped


# ---------------------------------------------------------------------------------------- special files
def _symlink_to_secret(folder: Path) -> None:
    (folder / "w.bin").unlink(missing_ok=True)
    os.symlink(_secret(folder), folder / "w.bin")


def _symlinked_folder(folder: Path) -> None:
    os.symlink(folder.parent, folder / "up")


def _hard_link(folder: Path) -> None:
    (folder / "w.bin").unlink(missing_ok=True)
    os.link(_secret(folder), folder / "w.bin")


def _fifo(folder: Path, name: str = "w.bin") -> None:
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)


def _socket(folder: Path) -> None:
    (folder / "w.bin").unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(folder / "w.bin"))
    s.close()


def _folder(folder: Path) -> None:
    (folder / "w.bin").unlink(missing_ok=True)
    (folder / "w.bin").mkdir()


def model_fifo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _fifo(folder, "model.onnx")
    return folder / "model.onnx"


def inputs_special(make: Callable[[Path], None]):
    def build(folder: Path) -> Path:
        path = _save(_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                            [numpy_helper.from_array(W, "w")]), folder)
        make(folder)
        return path
    return build


# --------------------------------------------------------------------------------------- other models
def nested_ifs(depth: int) -> onnx.ModelProto:
    """y = x + c, c computed by `depth` If nodes each inside the then-branch of the one above."""
    out = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])]
    inner = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.ones(4, np.float32), "one"))], "leaf", [], out)
    for k in range(depth):
        other = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
            np.zeros(4, np.float32), f"zero{k}"))], f"else{k}", [], out)
        inner = helper.make_graph([helper.make_node("If", ["cond"], ["c"], then_branch=inner, else_branch=other)],
                                  f"level{k}", [], out)
    nodes = list(inner.node) + [helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    return _model(nodes, [numpy_helper.from_array(np.array(True), "cond")])


def untyped_attribute() -> onnx.ModelProto:
    """An If whose then_branch attribute lost its type (the graph is still there)."""
    m = nested_ifs(1)
    m.graph.node[0].attribute[0].type = onnx.AttributeProto.UNDEFINED
    return m


def long_chain(n: int) -> onnx.ModelProto:
    nodes, prev = [], "x"
    for k in range(n):
        nodes.append(helper.make_node("Relu" if k % 2 else "Neg", [prev], [f"v{k}"], name=f"n{k}"))
        prev = f"v{k}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="last"))
    return _model(nodes)


def named(name: str, *, dangling: bool = False) -> onnx.ModelProto:
    """A value named `name`: read but never produced (dangling) or with a lying size."""
    if dangling:
        return _model([helper.make_node("Add", ["x", name], ["y"], name="add")])
    t = numpy_helper.from_array(W, name)
    t.raw_data = t.raw_data[:8]
    return _model([helper.make_node("MatMul", ["x", name], ["y"], name="mm")], [t])


def sparse_weight(indices: np.ndarray, values: np.ndarray, dims=(4, 4)) -> onnx.ModelProto:
    sp = helper.make_sparse_tensor(numpy_helper.from_array(values.astype(np.float32), "w"),
                                   numpy_helper.from_array(indices.astype(np.int64), "w_idx"), list(dims))
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], sparse=[sp])


def sparse_constant() -> onnx.ModelProto:
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "c"),
                                   numpy_helper.from_array(np.array([1, 6], np.int64), "c_idx"), [4, 4])
    c = helper.make_node("Constant", [], ["c"], name="const", sparse_value=sp)
    return _model([c, helper.make_node("MatMul", ["x", "c"], ["y"], name="mm")])


def lying_value_info() -> onnx.ModelProto:
    """r = Relu(x) with x float[2, 4]; value_info says r is float[5, 7]; y = Shape(r) must be [2, 4]."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Shape", ["r"], ["y"], name="s")]
    return _model(nodes, outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
                  value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [5, 7])])


def negative_dim(where: str) -> onnx.ModelProto:
    if where == "input":
        return _model([helper.make_node("Relu", ["x"], ["y"])],
                      inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, -4])])
    return _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
                  value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [-1, 4])])


def unknown_op() -> onnx.ModelProto:
    """An op the standard domain does not have: onnxruntime cannot load the model, which is invalid."""
    return _model([helper.make_node("Frobnicate", ["x"], ["y"], name="f")])


def custom_op() -> onnx.ModelProto:
    """A custom-domain op onnxruntime has no kernel for: it passes through, and the rewrites are checked locally."""
    return _model([helper.make_node("Frobnicate", ["x"], ["y"], name="f", domain="example.custom")],
                  opsets=["example.custom"])


def _tensor(dims, raw: bytes | None = None, name: str = "w", **fields) -> Callable[[], TensorProto]:
    def make() -> TensorProto:
        t = TensorProto(name=name, dims=list(dims), data_type=fields.pop("data_type", TensorProto.FLOAT), **fields)
        if raw is not None:
            t.raw_data = raw
        return t
    return make


def _valid_tensor() -> TensorProto:
    return numpy_helper.from_array(W, "w")


def _function_uses_cwd(folder: Path) -> str:
    return "w.bin"          # there is no w.bin in the model folder: only in the working directory


WEIGHTS = W.tobytes()
OUT = "--no-verify"


def cases() -> list[Case]:
    up = "../secret.bin"
    absolute = lambda folder: str(_secret(folder).resolve())   # noqa: E731
    return [
        # external data: containment, in every place a tensor can sit
        Case("ext-dotdot-graph", graph_weight(up), 3, "outside the model's folder"),
        Case("ext-absolute-graph", graph_weight(absolute), 3, "outside the model's folder"),
        Case("ext-dotdot-constant", constant_weight(up), 3, "outside the model's folder"),
        Case("ext-dotdot-subgraph", subgraph_weight(up), 3, "outside the model's folder"),
        Case("ext-dotdot-function", function_weight(up), 3, "outside the model's folder"),
        Case("ext-absolute-function", function_weight(absolute), 3, "outside the model's folder"),
        Case("ext-dotdot-function-no-verify", function_weight(up), 3, "outside the model's folder", [OUT]),
        Case("ext-function-cwd", function_weight(_function_uses_cwd), 3, "not found", [OUT], chdir_secret=True),
        Case("ext-backslash-dotdot", graph_weight("..\\secret.bin"), 3, "outside the model's folder"),
        Case("ext-inner-dotdot", graph_weight("sub/../../secret.bin"), 3, "outside the model's folder"),
        # links and special files
        Case("ext-symlink-file", graph_weight("w.bin", setup=_symlink_to_secret), 3, "symbolic link"),
        Case("ext-symlink-folder", graph_weight("up/secret.bin", setup=_symlinked_folder), 3, "symbolic link"),
        Case("ext-symlink-file-function", with_setup(function_weight("w.bin"), _symlink_to_secret), 3,
             "symbolic link"),
        Case("ext-hard-link", graph_weight("w.bin", setup=_hard_link), 3, "hard links"),
        Case("ext-fifo", graph_weight("w.bin", setup=_fifo), 3, "not a regular file"),
        Case("ext-socket", graph_weight("w.bin", setup=_socket), 3, "not a regular file"),
        Case("ext-folder", graph_weight("w.bin", setup=_folder), 3, "not a regular file"),
        Case("ext-missing", graph_weight("nowhere.bin"), 3, "not found"),
        # malformed external data keys
        Case("ext-long-location", graph_weight("a" * 5000, WEIGHTS), 3, "location is 5000 characters"),
        Case("ext-nul-location", graph_weight("w.bin\0x", WEIGHTS), 3, "NUL"),
        Case("ext-unknown-key", graph_weight("w.bin", WEIGHTS, extra={"\0ffset": "0"}), 3, "unknown external data key"),
        Case("ext-no-location", graph_weight("", WEIGHTS), 3, "no location"),
        Case("ext-text-offset", graph_weight("w.bin", WEIGHTS, offset="12abc"), 3, "offset"),
        Case("ext-negative-offset", graph_weight("w.bin", WEIGHTS, offset="-4"), 3, "offset"),
        Case("ext-text-length", graph_weight("w.bin", WEIGHTS, length="sixty-four"), 3, "length"),
        Case("ext-no-length-short-file", graph_weight("w.bin", WEIGHTS[:20], length=None), 3, "truncated"),
        Case("ext-length-disagrees", graph_weight("w.bin", WEIGHTS * 2, length="128"), 3, "declare 64 bytes"),
        Case("ext-offset-past-end", graph_weight("w.bin", WEIGHTS, offset="60"), 3, "truncated"),
        Case("ext-string-tensor", graph_weight("w.bin", WEIGHTS, dtype=TensorProto.STRING), 3, "string tensor"),
        # lying sizes
        Case("size-2e40-inline", inline_weight(_tensor([1 << 40], b"\0" * 4)), 3, "bytes"),
        Case("size-2e40-external", graph_weight("w.bin", WEIGHTS, dims=(1 << 40,), length="4"), 3, "bytes"),
        Case("size-short-raw", inline_weight(_tensor([4, 4], b"\0" * 8)), 3, "holds 8 bytes"),
        Case("size-float-data-count", inline_weight(_tensor([4, 4], float_data=[1.0, 2.0, 3.0])), 3,
             "holds 3 values"),
        Case("size-no-data", inline_weight(_tensor([4, 4])), 3, "holds 0 values"),
        Case("size-negative-dim", inline_weight(_tensor([4, -4], b"")), 3, "negative dim"),
        Case("size-unknown-type", inline_weight(_tensor([4, 4], b"\0" * 64, data_type=999)), 3, "data type"),
        Case("size-lying-function-constant", function_weight("w.bin", WEIGHTS, dims=(1 << 40,), length="64"), 3,
             "declare"),
        # declared shapes
        Case("dims-negative-input", proto(lambda: negative_dim("input")), 3, "negative dim"),
        Case("dims-negative-value-info", proto(lambda: negative_dim("value_info")), 3, "negative dim"),
        # structure
        Case("nesting-too-deep", proto(lambda: nested_ifs(28)), 3, "nested more than"),
        Case("nesting-allowed", proto(lambda: nested_ifs(4)), 0),
        Case("long-chain", proto(lambda: long_chain(1500)), 0, args=["-O1"]),
        Case("attribute-without-type", proto(untyped_attribute), 3, "has no type"),
        # names
        Case("name-newline-dangling", proto(lambda: named("evil\nname", dangling=True)), 3, "evil\\nname"),
        Case("name-invalid-utf8", raw_file(named("QQQQ", dangling=True).SerializeToString().replace(
            b"QQQQ", b"\xff\xfe\xfd\xfc")), 3, "not valid UTF-8"),
        Case("name-nul-lying-size", proto(lambda: named("nul\0name")), 3, "nul\\x00name"),
        # models onnxruntime refuses
        Case("ort-unknown-op", proto(unknown_op), 3, "Frobnicate"),
        Case("custom-domain-op", proto(custom_op), 0),
        # sparse tensors
        Case("sparse-initializer", proto(lambda: sparse_weight(np.array([0, 5, 15]), np.array([1.0, 2.0, 3.0]))),
             0),
        Case("sparse-initializer-coordinates", proto(lambda: sparse_weight(np.array([[0, 1], [3, 3]]),
                                                                           np.array([4.0, 5.0]))), 0),
        Case("sparse-constant", proto(sparse_constant), 0),
        Case("sparse-index-out-of-range", proto(lambda: sparse_weight(np.array([0, 99]), np.array([1.0, 2.0]))), 3,
             "out of range"),
        # value_info is a hint
        Case("value-info-contradicts", proto(lying_value_info), 0, args=[OUT, "-O1"]),
        # special files as the model or as an option's file
        Case("model-fifo", model_fifo, 3, "not a regular file"),
        Case("verify-inputs-fifo", inputs_special(lambda f: _fifo(f, "in.npz")), 2, "not a regular file",
             ["--verify-inputs", "{folder}/in.npz"]),
        Case("calibration-fifo", inputs_special(lambda f: _fifo(f, "cal.npz")), 2, "not a regular file",
             ["--quantize", "int4:gptq", "--calibration", "{folder}/cal.npz"]),
        Case("verify-inputs-device", inputs_special(lambda f: None), 2, "not a regular file",
             ["--verify-inputs", "/dev/zero"]),
        Case("model-garbage", raw_file(b"\x08\x07garbage that is not protobuf \xff\xff\xff"), 3, "ONNX"),
        Case("model-empty", raw_file(b""), 3, "empty"),
        Case("model-truncated", raw_file(nested_ifs(2).SerializeToString()[:57]), 3, ""),
        # valid models whose tensors sit everywhere
        Case("valid-external-graph", graph_weight("w.bin", WEIGHTS), 0),
        Case("valid-external-subfolder", graph_weight(
            "sub/w.bin", setup=lambda f: ((f / "sub").mkdir(), (f / "sub" / "w.bin").write_bytes(WEIGHTS))), 0),
        Case("valid-external-function", function_weight("w.bin", WEIGHTS), 0),
        Case("valid-external-subgraph", subgraph_weight("w.bin", WEIGHTS), 0),
        Case("valid-external-constant", constant_weight("w.bin", WEIGHTS), 0),
        Case("valid-external-no-length", graph_weight("w.bin", WEIGHTS, length=None), 0),
    ]


# `import onnxruntime` writes the state file of its telemetry library (`.ses`) into TMPDIR once; it is not onnxc's
# and is the same for any program that imports onnxruntime.
ORT_STATE_FILES = frozenset({".ses"})


def left_in(tmp: Path) -> list[str]:
    """What is left in a TMPDIR after a compile, but onnxruntime's own state file."""
    return sorted(p.name for p in tmp.iterdir() if p.name not in ORT_STATE_FILES)


def make_secret(root: Path) -> bytes:
    data = SECRET * 256
    (root / "secret.bin").write_bytes(data)
    return data
