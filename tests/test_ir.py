"""The IR layer: lazy loading, external data, atomic staged writes, unsafe inputs."""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxc import ir as irio
from onnxc.errors import InvalidModelError, UsageError
from tests.modelgen import tiny_lm


def _save_external(proto: onnx.ModelProto, path) -> None:
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_load_keeps_external_weights_lazy(tmp_path):
    path = tmp_path / "m.onnx"
    _save_external(tiny_lm(), path)
    model = irio.load(path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert irio.uses_external_data(model)
    assert irio.weight_bytes(model) == sum(t.nbytes for t in tensors) > 0


def test_staged_save_writes_nothing_until_commit(tmp_path):
    src = tmp_path / "m.onnx"
    _save_external(tiny_lm(vocab=64, hidden=16), src)
    model = irio.load(src)
    dest = tmp_path / "out.onnx"
    with irio.staged_save(model, dest) as staged:
        assert staged.model_file.exists() and not dest.exists()
        assert staged.data_file is not None
        assert re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", staged.data_file.name)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_staged_save_names_the_data_by_its_bytes(tmp_path):
    """The same weights give the same data file name (the output is deterministic), other weights another."""
    names = []
    for seed in (0, 0, 1):
        src = tmp_path / f"m{seed}.onnx"
        _save_external(tiny_lm(vocab=64, hidden=16, seed=seed), src)
        with irio.staged_save(irio.load(src), tmp_path / "out.onnx") as staged:
            names.append(staged.data_file.name)
    assert names[0] == names[1] != names[2]


def test_commit_replaces_the_old_weights_after_the_model(tmp_path):
    """A second compile to the same path leaves one model and the one data file it references."""
    dest = tmp_path / "out.onnx"
    for seed in (0, 1):
        src = tmp_path / f"m{seed}.onnx"
        _save_external(tiny_lm(vocab=64, hidden=16, seed=seed), src)
        with irio.staged_save(irio.load(src), dest) as staged:
            written = staged.commit()
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.onnx"))
    assert beside == ["out.onnx", written[1].name]
    assert irio.owned_data_files(dest) == {written[1].name}
    proto = onnx.load(str(dest))
    assert onnx.numpy_helper.to_array(proto.graph.initializer[0]).tobytes() == \
        onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "m1.onnx")).graph.initializer[0]).tobytes()


def test_small_tensors_leave_no_data_file(tmp_path):
    """Every tensor under the inline limit: no empty, unreferenced <output>.*.data."""
    src = tmp_path / "m.onnx"
    _save_external(tiny_lm(), src)
    dest = tmp_path / "out.onnx"
    with irio.staged_save(irio.load(src), dest, external_data=True) as staged:
        assert staged.data_file is None
        written = staged.commit()
    assert written == [dest]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "out.onnx"]


def test_staged_save_commit_round_trips(tmp_path):
    src = tmp_path / "m.onnx"
    _save_external(tiny_lm(vocab=64, hidden=16), src)
    model = irio.load(src)
    dest = tmp_path / "out.onnx"
    with irio.staged_save(model, dest) as staged:
        written = staged.commit()
    assert written[0] == dest and written[1].parent == tmp_path and len(written) == 2
    again = onnx.load(str(dest))
    original = onnx.load(str(src))
    for a, b in zip(again.graph.initializer, original.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary folder removed


def test_small_model_without_external_data_stays_one_file(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(tiny_lm(), str(src))
    dest = tmp_path / "o.onnx"
    with irio.staged_save(irio.load(src), dest) as staged:
        staged.commit()
    assert dest.exists() and not (tmp_path / "o.onnx.data").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"this is not a protobuf at all", "not a readable ONNX model"),
])
def test_load_rejects_garbage(tmp_path, content, message):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InvalidModelError, match=message):
        irio.load(p)


def test_load_rejects_truncated_file(tmp_path):
    p = tmp_path / "t.onnx"
    data = tiny_lm().SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError):
        irio.load(p)


def test_load_rejects_missing_and_truncated_external_data(tmp_path):
    p = tmp_path / "m.onnx"
    _save_external(tiny_lm(), p)
    data = tmp_path / "m.onnx.data"
    blob = data.read_bytes()
    data.write_bytes(blob[:10])
    with pytest.raises(InvalidModelError, match="truncated"):
        irio.load(p)
    os.remove(data)
    with pytest.raises(InvalidModelError, match="not found"):
        irio.load(p)


def test_load_rejects_external_data_outside_model_folder(tmp_path):
    proto = tiny_lm()
    t = proto.graph.initializer[0]
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../etc/passwd")
    p = tmp_path / "evil.onnx"
    p.write_bytes(proto.SerializeToString())
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        irio.load(p)


def test_output_path_may_not_be_input_or_its_weights(tmp_path):
    p = tmp_path / "m.onnx"
    _save_external(tiny_lm(), p)
    model = irio.load(p)
    with pytest.raises(UsageError, match="is the input model"):
        irio.check_output_path(p, p, model)
    # An output whose data file would be the input's weights file.
    with pytest.raises(UsageError, match="holds the input model's weights"):
        irio.check_output_path(tmp_path / "m.onnx.data", None, model)
    # An output whose old data files would be removed on commit: the input's weights are among them.
    with pytest.raises(UsageError, match="holds the input model's weights"):
        irio.check_output_path(tmp_path / "m.onnx", None, model)
    with pytest.raises(UsageError, match="does not exist"):
        irio.check_output_path(tmp_path / "nope" / "o.onnx", p, model)


def test_derived_tensor_computes_when_read_and_releases_mapped_sources(tmp_path, monkeypatch):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 2), np.float32)
    (tmp_path / "w.bin").write_bytes(a.tobytes())
    ext = ir.ExternalTensor("w.bin", offset=0, length=a.nbytes, dtype=ir.DataType.FLOAT, shape=ir.Shape([2, 3]),
                            name="w", base_dir=str(tmp_path))
    released = []
    monkeypatch.setattr(ir.ExternalTensor, "release", lambda self: released.append(self.name))
    calls = []

    def concat(x, y):
        calls.append(1)
        return np.concatenate([x, y], axis=1)

    t = irio.derived_tensor(concat, [ext, ir.tensor(b)], ir.DataType.FLOAT, [2, 5], name="c")
    assert calls == [] and released == []             # nothing computed or mapped before it is read
    np.testing.assert_array_equal(t.numpy(), np.concatenate([a, b], axis=1))
    assert calls == [1] and released == ["w"]
    assert t.dtype == ir.DataType.FLOAT and list(t.shape) == [2, 5]


def test_concurrent_commits_leave_a_model_with_its_own_weights(tmp_path):
    """Two writers commit different models to one path, over and over: whatever is in place at the end (and at
    each step a reader looks) is one writer's model with that writer's weights, never a mix. A reader that holds a
    model while the next commit replaces it may find its data file gone, never another model's."""
    import threading

    sources = []
    for seed in (0, 1):
        src = tmp_path / f"m{seed}.onnx"
        _save_external(tiny_lm(vocab=64, hidden=16, seed=seed), src)
        sources.append(src)
    weights = {tuple(onnx.numpy_helper.to_array(t).ravel()[:4]) for s in sources
               for t in onnx.load(str(s)).graph.initializer if t.name == "emb"}
    dest = tmp_path / "out" / "o.onnx"
    dest.parent.mkdir()
    errors = []

    def writer(src):
        try:
            for _ in range(12):
                with irio.staged_save(irio.load(src), dest) as staged:
                    staged.commit()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        try:
            before = os.stat(dest).st_ino
            proto = onnx.load(str(dest))
        except FileNotFoundError:
            continue                      # before the first commit
        except onnx.checker.ValidationError:
            # Its data file went with the next commit while this reader held the model: it must have been replaced.
            assert os.stat(dest).st_ino != before
            continue
        emb = next(t for t in proto.graph.initializer if t.name == "emb")
        assert tuple(onnx.numpy_helper.to_array(emb).ravel()[:4]) in weights
        seen += 1
    for t in threads:
        t.join()
    assert not errors
    proto = onnx.load(str(dest))
    assert {tuple(onnx.numpy_helper.to_array(t).ravel()[:4]) for t in proto.graph.initializer
            if t.name == "emb"} <= weights
    assert irio.owned_data_files(dest) <= {p.name for p in dest.parent.iterdir()}
