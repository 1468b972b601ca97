"""`onnxc bench` (compiler/benchmark.py): the JSON table's schema, one row per model, provider, scenario, batch and
mode, ratios computed from the rows, the interleaved order, exit codes, the plot extra and bench/gpu_check.sh's dry
run. Nothing here asserts a speed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxc
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnxc import benchmark
from onnxc.cli import main
from onnxc.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "models"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
ROW_KEYS = {"model": str, "model_index": int, "provider": str, "scenario": str, "phase": str, "length": int,
            "batch": int, "mode": str, "tokens": int, "runs": int, "p50_ms": float, "p90_ms": float,
            "p99_ms": float, "mean_ms": float, "min_ms": float, "tokens_per_s": float, "ratio": (float, type(None)),
            "session_s": float, "session_rss_mib": float, "peak_rss_mib": float, "kv_cache": str, "samples_ms": list}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.startswith("onnxc: error")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The dynamo Llama with a KV cache at -O2: every attention is GroupQueryAttention, so in-place may be timed."""
    out = tmp_path_factory.mktemp("bench") / "llama.O2.onnx"
    onnxc.compile(FIXTURES / "llama_dynamo_past.onnx", level=2, output=out)
    return out


@pytest.fixture(scope="module")
def table(compiled, tmp_path_factory):
    """The CLI's JSON for the unoptimized Llama, its -O2 output and BERT (no cache), two scenarios, two batches."""
    path = tmp_path_factory.mktemp("bench-json") / "r.json"
    r = run("bench", FIXTURES / "llama_dynamo_past.onnx", compiled, FIXTURES / "bert_dynamo.onnx",
            "--provider", "cpu", "--scenario", "prefill:4", "--scenario", "decode:6", "--batch", "1,2",
            "--runs", 3, "--warmup", 1, "--threads", 1, "--json", path)
    assert r.exit_code == 0, r.output
    return json.loads(path.read_text()), r.output


def test_bench_json_rows_have_every_key_with_its_type(table):
    data, _ = table
    assert set(data) == {"onnxc", "onnxruntime", "machine", "settings", "sessions", "rows", "best", "skipped"}
    assert data["rows"]
    for row in data["rows"]:
        assert set(row) == set(ROW_KEYS), row.keys()
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert len(row["samples_ms"]) == row["runs"] == 3
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["tokens"] == row["batch"] * (row["length"] if row["phase"] == "prefill" else 1)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (row["p50_ms"] / 1000))
    assert data["settings"]["scenarios"] == ["prefill:4", "decode:6"] and data["settings"]["batches"] == [1, 2]


def test_bench_one_row_per_model_scenario_batch_and_mode(table):
    data, _ = table
    keys = [(r["model_index"], r["provider"], r["scenario"], r["batch"], r["mode"]) for r in data["rows"]]
    assert len(keys) == len(set(keys))
    modes = {}
    for index, _, scenario, batch, mode in keys:
        modes.setdefault((index, scenario, batch), []).append(mode)
    for batch in (1, 2):
        assert modes[(0, "prefill:4", batch)] == ["run", "bound"]
        assert modes[(0, "decode:6", batch)] == ["run", "bound"]       # the export's past feeds a Concat
        assert modes[(1, "prefill:4", batch)] == ["run", "bound"]
        assert modes[(1, "decode:6", batch)] == ["run", "bound", "in-place"]
        assert modes[(2, "prefill:4", batch)] == ["run", "bound"]
        assert (2, "decode:6", batch) not in modes                    # BERT has no cache
    skipped = [s for s in data["skipped"] if "model" in s]
    assert sorted((s["model_index"], s["scenario"], s["batch"]) for s in skipped) == [(2, "decode:6", 1),
                                                                                      (2, "decode:6", 2)]
    assert all(s["reason"] for s in data["skipped"])


def test_bench_in_place_follows_the_kv_cache_check(table):
    data, _ = table
    status = {s["model_index"]: s["kv_cache"]["status"] for s in data["sessions"]}
    assert status == {0: "not applicable", 1: "verified", 2: "not applicable"}
    for row in data["rows"]:
        assert row["kv_cache"] == status[row["model_index"]]
        if row["mode"] == "in-place":
            assert row["kv_cache"] == "verified" and row["phase"] == "decode"


def test_bench_ratio_is_p50_over_the_first_models_p50(table):
    data, _ = table
    first = {(r["scenario"], r["batch"], r["mode"]): r["p50_ms"] for r in data["rows"] if r["model_index"] == 0}
    for row in data["rows"]:
        base = first.get((row["scenario"], row["batch"], row["mode"]))
        if base is None:
            assert row["ratio"] is None and row["mode"] == "in-place"
        else:
            assert row["ratio"] == pytest.approx(row["p50_ms"] / base)
    for best in data["best"]:
        mine = [r for r in data["rows"] if r["model_index"] == best["model_index"]
                and (r["scenario"], r["batch"]) == (best["scenario"], best["batch"])]
        theirs = [r for r in data["rows"] if r["model_index"] == 0
                  and (r["scenario"], r["batch"]) == (best["scenario"], best["batch"])]
        fastest = min(mine, key=lambda r: r["p50_ms"])
        assert (best["mode"], best["p50_ms"]) == (fastest["mode"], fastest["p50_ms"])
        assert best["ratio"] == pytest.approx(fastest["p50_ms"] / min(r["p50_ms"] for r in theirs))


def test_bench_memory_and_session_figures(table):
    data, output = table
    assert len(data["sessions"]) == 3
    for s in data["sessions"]:
        assert s["session_s"] > 0
        assert 0 <= s["session_rss_mib"] <= s["peak_rss_mib"]
    assert "ratio" in output and "in-place KV cache verified" in output


def test_bench_api_returns_the_cli_table(compiled, table):
    data, _ = table
    result = onnxc.bench([FIXTURES / "llama_dynamo_past.onnx", compiled], providers="cpu", scenarios=["decode:6"],
                         runs=2, warmup=0)
    assert set(result) == set(data)
    assert {(r["model_index"], r["mode"]) for r in result["rows"]} == {(0, "run"), (0, "bound"), (1, "run"),
                                                                       (1, "bound"), (1, "in-place")}
    assert all(set(r) == set(ROW_KEYS) for r in result["rows"])


def test_interleave_takes_turns_and_times_only_after_warmup():
    calls: list[int] = []
    now = [0]

    def clock() -> int:
        return now[0]

    def runner(k: int):
        def step() -> None:
            calls.append(k)
            now[0] += (k + 1) * 1_000_000      # runner k takes k + 1 ms on the fake clock
        return step

    samples = benchmark.interleave([runner(0), runner(1), runner(2)], runs=3, warmup=2, clock=clock)
    # every round runs each runner once, starting one place further on each round
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2, 1, 2, 0]
    assert samples == [[1.0] * 3, [2.0] * 3, [3.0] * 3]


def test_resolve_providers_skips_a_missing_default_and_refuses_a_missing_request():
    assert benchmark.resolve_providers(None, ["CPUExecutionProvider"]) == (
        ["cpu"], [{"provider": "cuda", "reason": "onnxruntime has no CUDAExecutionProvider (it has "
                                                 "CPUExecutionProvider)"}])
    assert benchmark.resolve_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (["cpu", "cuda"],
                                                                                                   [])
    assert benchmark.resolve_providers(["cuda"], ["CUDAExecutionProvider"]) == (["cuda"], [])
    with pytest.raises(UsageError):
        benchmark.resolve_providers(["cpu,cuda"], ["CPUExecutionProvider"])
    with pytest.raises(UsageError):
        benchmark.resolve_providers(["tpu"], ["CPUExecutionProvider"])


@pytest.mark.parametrize("content", [None, b"", b"not a model"])
def test_bench_missing_or_invalid_model_exits_3(tmp_path, content):
    p = tmp_path / "m.onnx"
    if content is not None:
        p.write_bytes(content)
    r = run("bench", p, "--provider", "cpu", "--json", tmp_path / "r.json")
    assert r.exit_code == 3
    one_error_line(r)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime here has CUDAExecutionProvider")
def test_bench_cuda_without_the_provider_is_a_usage_error():
    r = run("bench", FIXTURES / "bert_dynamo.onnx", "--provider", "cuda")
    assert r.exit_code == 2
    assert "CUDAExecutionProvider" in one_error_line(r)


@pytest.mark.parametrize("option", [("--scenario", "decode"), ("--scenario", "prefill:0"), ("--scenario", "gen:4"),
                                    ("--scenario", "decode:-1"), ("--batch", "0"), ("--batch", "1,x"),
                                    ("--provider", "tpu"), ("--runs", "0"), ("--warmup", "-1"),
                                    ("--plot", "r.jpg")])
def test_bench_bad_option_exits_2(tmp_path, option):
    args = [option[0], str(tmp_path / option[1]) if option[0] == "--plot" else option[1]]
    if option[0] == "--plot":
        pytest.importorskip("matplotlib")
    r = run("bench", FIXTURES / "bert_dynamo.onnx", "--provider", "cpu", *args)
    assert r.exit_code == 2
    one_error_line(r)


def test_bench_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib now raises ImportError
    r = run("bench", FIXTURES / "bert_dynamo.onnx", "--provider", "cpu", "--plot", tmp_path / "r.png")
    assert r.exit_code == 2
    assert "onnxc[plot]" in one_error_line(r)
    assert not (tmp_path / "r.png").exists()


def test_bench_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    r = run("bench", FIXTURES / "llama_dynamo_past.onnx", FIXTURES / "llama_dynamo_past.onnx", "--provider", "cpu",
            "--scenario", "decode:4", "--runs", 2, "--warmup", 0, "--plot", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]        # no staging file left


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh --dry-run: the CUDA check's steps on the CPU provider with one fixture."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "compiled at -O3 --target cuda: 1, verified on cpu: 1" in summary
    assert "skipped in --dry-run" in summary and "FAILED" not in summary
    data = json.loads((out / "bench-fixture.json").read_text())
    assert {(r["model_index"], r["scenario"], r["mode"]) for r in data["rows"]} >= {(0, "decode:16", "bound"),
                                                                                   (1, "decode:16", "in-place")}
    assert (out / "reports.tar.gz").is_file()
    assert not list(tmp_path.glob("onnxc-gpu-check*"))                # its scratch folder is removed
