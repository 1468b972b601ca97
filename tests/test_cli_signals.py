"""The command line as a user meets it: signals, output places checked before any work, a full disk, defaults.
Each case checks the exit code, the one line said, and what is left on disk."""
from __future__ import annotations

import errno
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnxc
import pytest
from click.testing import CliRunner
from helpers import FIXTURES_ROOT
from onnxc.cli import main

MODEL = FIXTURES_ROOT / "models" / "llama_dynamo_past.onnx"


def _wait_for(pred, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_compile_removes_every_temporary_folder(tmp_path, sig, code, word):
    out_dir, scratch = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    scratch.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "from onnxc._entry import main; main()", "compile", str(MODEL),
                          "-O2", "-q", "-o", str(out_dir / "m.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "TMPDIR": str(scratch)})
    # the compile's scratch folder exists (not just the file Python's tempfile writes and removes once, to test the
    # folder, which a signal landing at that instant would leave behind before onnxc runs any code of its own)
    _wait_for(lambda: any(f.is_dir() and f.name.startswith("onnxc-") for f in scratch.iterdir())
              or p.poll() is not None)
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    assert p.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"onnxc: {word}; nothing was written"]
    assert list(out_dir.iterdir()) == [] and list(scratch.iterdir()) == []


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    # the signal lands once the console script's entry point runs (a signal during Python's own start-up, before
    # any onnxc code, is Python's to report), while the command line's libraries are still loading
    p = subprocess.Popen([sys.executable, "-c", "from onnxc._entry import main; print('start', flush=True); main()",
                          "compile", str(MODEL), "-o", str(tmp_path / "m.onnx")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    assert p.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "onnxc: interrupted; nothing was written"


def _compile(*args: object):
    return CliRunner().invoke(main, ["compile", str(MODEL), "-O1", *map(str, args)])


@pytest.mark.parametrize("place, says", [
    ("/dev/null", "is not a regular file"),
    ("{tmp}/missing/m.onnx", "does not exist"),
    ("/proc/m.onnx", "cannot write into the output folder"),
    ("{tmp}/" + "a" * 300 + ".onnx", "too long"),
    ("{tmp}", "is a directory"),
])
def test_bad_output_place_is_refused_before_any_work(tmp_path, place, says, monkeypatch):
    import onnxc.driver

    monkeypatch.setattr(onnxc.driver, "compile", lambda *a, **k: pytest.fail("compiled before checking the output"))
    r = _compile("-o", place.format(tmp=tmp_path))
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert Path("/dev/null").is_char_device()


def test_bad_report_place_is_refused_before_any_work(tmp_path, monkeypatch):
    import onnxc.driver

    monkeypatch.setattr(onnxc.driver, "compile", lambda *a, **k: pytest.fail("compiled before checking --report"))
    r = _compile("-o", tmp_path / "m.onnx", "--report", tmp_path / "no" / "r.json")
    assert r.exit_code == 2 and "--report folder" in r.output, r.output
    r = _compile("-o", tmp_path / "m.onnx", "--report", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "is the output model" in r.output, r.output


def test_full_disk_during_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import onnxc.ir as irio

    def full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(irio, "_save_inline", full)
    r = _compile("-o", tmp_path / "m.onnx")
    assert r.exit_code == 5, r.output
    assert "no space left on the device; nothing was written" in r.output
    assert list(tmp_path.iterdir()) == []


def test_missing_input_is_exit_3_even_with_a_bracketed_name(tmp_path):
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "a[" / "x]b[/i].onnx")])
    assert r.exit_code == 3 and "no such file" in r.output and "x]b[/i]" in r.output, r.output


def test_bracketed_file_names_are_printed_as_written(tmp_path):
    folder = tmp_path / "a["
    folder.mkdir()
    src = folder / "x]b[bold].onnx"
    src.write_bytes(MODEL.read_bytes())
    r = CliRunner().invoke(main, ["compile", str(src), "-O1", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert f"wrote {folder / 'x]b[bold].onnxc.onnx'}" in r.output


def test_io_fp16_on_cpu_is_a_usage_error(tmp_path):
    r = _compile("-o", tmp_path / "m.onnx", "--io-fp16")
    assert r.exit_code == 2 and "--io-fp16 needs --target cuda" in r.output, r.output


def test_the_api_default_level_is_the_command_line_one():
    from onnxc import driver

    cli_default = next(p.default for p in main.commands["compile"].params if p.name == "level")
    assert inspect.signature(onnxc.compile).parameters["level"].default == cli_default == 2
    assert inspect.signature(driver.compile).parameters["level"].default == cli_default


# ------------------------------------------------------------------------------------------------ onnxc verify
@pytest.fixture(scope="module")
def compiled_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    r = CliRunner().invoke(main, ["compile", str(MODEL), "-O3", "--target", "cuda", "-o", str(d / "fp16.onnx"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["compile", str(MODEL), "-O2", "--quantize", "int4", "-o", str(d / "q.onnx"), "-q"])
    assert r.exit_code == 0, r.output
    return d / "fp16.onnx", d / "q.onnx"


def test_verify_passes_on_compiles_own_float16_output(compiled_pair):
    r = CliRunner().invoke(main, ["verify", str(MODEL), str(compiled_pair[0])])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1] == "passed (float16 tolerances)"
    assert all(" ok" in line and "passes at tol>=" in line for line in lines[:-1])


def test_verify_with_tight_tolerances_fails_and_names_the_output(compiled_pair):
    r = CliRunner().invoke(main, ["verify", str(MODEL), str(compiled_pair[0]), "--rtol", "1e-7", "--atol", "1e-7"])
    assert r.exit_code == 1, r.output
    assert "MISMATCH" in r.output and r.output.strip().splitlines()[-1].startswith("failed (--rtol 1e-07")


def test_verify_reports_a_quantized_candidate_without_failing_unless_asked(compiled_pair):
    r = CliRunner().invoke(main, ["verify", str(MODEL), str(compiled_pair[1])])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("reported")
    r = CliRunner().invoke(main, ["verify", str(MODEL), str(compiled_pair[1]), "--rtol", "1e-6", "--atol", "1e-6"])
    assert r.exit_code == 1 and "MISMATCH" in r.output, r.output


def test_verify_takes_inputs_and_a_seed(compiled_pair, tmp_path):
    import numpy as np

    feeds = {"input_ids": np.array([[5, 6, 7]], np.int64), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.array([[2, 3, 4]], np.int64)}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.random.default_rng(i).standard_normal((1, 2, 2, 16), np.float32)
    np.savez(tmp_path / "in.npz", **feeds)
    r = CliRunner().invoke(main, ["verify", str(MODEL), str(compiled_pair[0]), "--inputs", str(tmp_path / "in.npz")])
    assert r.exit_code == 0 and "user-0" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", str(MODEL), str(compiled_pair[0]), "--seed", "7"])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------------ onnxc passes
def test_passes_piped_names_every_pass_and_rule_whole():
    from onnxc import pass_manager as pm

    r = CliRunner().invoke(main, ["passes", "--rules"])
    assert r.exit_code == 0, r.output
    first = {line.split("\t")[0].strip() for line in r.output.splitlines()}
    assert set(pm.registered_passes()) | set(pm.all_rules()) <= first
    assert "…" not in r.output


def test_passes_json_lists_passes_and_rules():
    import json

    r = CliRunner().invoke(main, ["passes", "--json"])
    assert r.exit_code == 0, r.output
    listed = {p["name"]: p for p in json.loads(r.output)}
    assert listed["fuse-rms-norm"]["level"] == 2 and "rms-norm" in [x["name"] for x in listed["fuse-rms-norm"]["rules"]]
    assert listed["canonicalize-sequences"]["rules"] == [] and listed["fuse-gqa"]["targets"] == ["cpu", "cuda"]


# ------------------------------------------------------------------------------------------------ the summary
def test_summary_gives_sizes_groups_the_cleanup_and_warns_when_the_output_grows(tmp_path):
    r = CliRunner().invoke(main, ["compile", str(MODEL), "-O2", "--no-verify", "-o", str(tmp_path / "m.onnx"),
                                  "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    import json

    sizes = json.loads((tmp_path / "r.json").read_text())["sizes"]
    assert sizes["input"] == {"model": MODEL.stat().st_size, "data": 0}
    assert sizes["output"] == {"model": (tmp_path / "m.onnx").stat().st_size, "data": 0}
    assert "size: model " in r.output
    # the tiny fixture's rotary caches (4096 positions) outweigh its weights: the output is larger, and says so
    grew = sizes["output"]["model"] > sizes["input"]["model"]
    assert ("warning: the output is larger than the input" in r.output) == grew
    progress = [line for line in r.output.splitlines() if line.startswith("  ")]
    assert sum("fixpoint(fold-constants..eliminate-dead) x" in line for line in progress) == 3   # -O2 cleans 3 times
    assert not any(line.split()[0] == "fold-constants" for line in progress)


def test_level_help_says_what_o3_does_on_cpu():
    r = CliRunner().invoke(main, ["compile", "--help"])
    assert r.exit_code == 0 and "on cpu, -O3 is -O2" in " ".join(r.output.split())


def test_every_dependency_states_a_tested_range():
    """A fresh install gets only releases CI has run: each requirement has a lower and an upper bound (or a pin)."""
    import tomllib

    project = tomllib.loads((FIXTURES_ROOT.parent / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for req in reqs:
        assert "==" in req or (">=" in req and "<" in req.replace("<=", "")), req


class _Raising:
    """A module finder whose import of onnxc.cli raises `exc` (as Python 3.11 does when Ctrl-C lands in a class's
    `__set_name__`: a RuntimeError caused by the KeyboardInterrupt)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def find_spec(self, name, path=None, target=None):
        if name == "onnxc.cli":
            raise self.exc
        return None


@pytest.mark.parametrize("wrapped", [True, False])
def test_interrupt_wrapped_during_import_is_one_line(monkeypatch, capsys, wrapped):
    from onnxc import _entry
    interrupt = KeyboardInterrupt()
    exc = RuntimeError("Error calling __set_name__")
    exc.__cause__ = interrupt
    monkeypatch.delitem(sys.modules, "onnxc.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Raising(exc if wrapped else interrupt), *sys.meta_path])
    with pytest.raises(SystemExit) as stop:
        _entry.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "onnxc: interrupted; nothing was written\n"


def test_other_import_errors_are_not_called_an_interrupt(monkeypatch):
    from onnxc import _entry
    monkeypatch.delitem(sys.modules, "onnxc.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Raising(RuntimeError("broken install")), *sys.meta_path])
    with pytest.raises(RuntimeError, match="broken install"):
        _entry.main()
