"""Every generated hostile or edge-case model (tests/hostile/cases.py) through `onnxc compile`, in process:

- the documented exit code, with exactly one line on stderr and no traceback;
- nothing beside the output but the output (and its weights file) on success, nothing at all on failure;
- nothing left in TMPDIR (a fresh folder per case);
- no byte of the file outside the model's folder in any output file.
"""
from __future__ import annotations

import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxc import cli
from onnxc import ir as irio

from .cases import SECRET, W, cases, left_in, make_secret

CASES = {c.name: c for c in cases()}
TIMEOUT_S = 60


def _alarm(signum, frame):
    raise TimeoutError("the command did not finish (blocked on a special file?)")


def run_case(case, root: Path, monkeypatch, capfd) -> tuple[int, list[str], Path]:
    make_secret(root)
    model = case.build(root / "model")
    out_dir, tmp = root / "out", root / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    if case.chdir_secret:
        cwd = root / "cwd"
        cwd.mkdir()
        shutil.copyfile(root / "secret.bin", cwd / "w.bin")
        monkeypatch.chdir(cwd)
    args = ["compile", str(model), "-o", str(out_dir / "o.onnx"), "-q",
            *[a.replace("{folder}", str(model.parent)) for a in case.args]]
    capfd.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SystemExit) as exited:
                cli.main.main(args=args, prog_name="onnxc")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    err = capfd.readouterr().err
    lines = err.splitlines() + [f"warning: {w.message}" for w in caught]
    return exited.value.code, lines, out_dir


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case(name, tmp_path, monkeypatch, capfd):
    case = CASES[name]
    code, lines, out_dir = run_case(case, tmp_path, monkeypatch, capfd)
    assert code == case.exit_code, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "\0" not in lines[0]
    if code:
        assert lines[0].startswith("onnxc: error: ") and case.message in lines[0], lines
        assert not list(out_dir.iterdir())
    else:
        output = out_dir / "o.onnx"
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(["o.onnx", *irio.owned_data_files(output)])
    assert not left_in(tmp_path / "tmp")
    for f in out_dir.rglob("*"):
        assert SECRET not in f.read_bytes(), f"{f.name} holds bytes of the file outside the model's folder"


def _run(path: Path, feeds: dict) -> list:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", ["valid-external-graph", "valid-external-function", "valid-external-subgraph",
                                  "valid-external-constant", "valid-external-subfolder", "sparse-initializer",
                                  "sparse-constant"])
def test_valid_edge_case_computes_what_its_input_does(name, tmp_path, monkeypatch, capfd):
    code, lines, out_dir = run_case(CASES[name], tmp_path, monkeypatch, capfd)
    assert code == 0, lines
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    want = _run(tmp_path / "model" / "model.onnx", {"x": x})[0]
    np.testing.assert_allclose(_run(out_dir / "o.onnx", {"x": x})[0], want, rtol=1e-6)
    if name.startswith("valid-external"):
        np.testing.assert_allclose(want, x @ W, rtol=1e-6)


def test_contradicted_value_info_is_dropped_not_folded(tmp_path, monkeypatch, capfd):
    """value_info says Relu(x) is [5, 7]; compiled without verification, Shape still computes [2, 4]."""
    code, lines, out_dir = run_case(CASES["value-info-contradicts"], tmp_path, monkeypatch, capfd)
    assert code == 0, lines
    x = np.zeros((2, 4), np.float32)
    np.testing.assert_array_equal(_run(out_dir / "o.onnx", {"x": x})[0], [2, 4])
    assert not any(vi.name == "r" and vi.type.tensor_type.shape.dim[0].dim_value == 5
                   for vi in onnx.load(str(out_dir / "o.onnx")).graph.value_info)


def test_contradicted_value_info_is_noted(tmp_path):
    path = CASES["value-info-contradicts"].build(tmp_path)
    notes = irio.load_notes(irio.load(path))
    assert any("value_info 'r' declares float[5, 7]" in n and "float[2, 4]" in n for n in notes), notes


def test_generator_has_enough_cases():
    assert len(CASES) >= 40
    assert {c.exit_code for c in CASES.values()} == {0, 2, 3}
