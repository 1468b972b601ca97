"""The tutorial docs/writing-a-pass.md runs as written: its blocks, in order, in an empty folder.

A ```python file=NAME block is written to NAME; a ```python block runs; a ```bash block runs in a shell (each line a
command that must succeed) with this interpreter's onnxc and python first on PATH. Python blocks share one process,
like a reader's session; the script runs in a subprocess, so the passes the tutorial registers never reach this
test process's registry.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks(path: Path) -> list[tuple[int, str, dict[str, str], str]]:
    """(line, language, options such as file=NAME, code) for each top-level fenced block."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        options = dict(opt.split("=", 1) for opt in m.group(2).split() if "=" in opt)
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), options, m.group(3)))
    return out


def script(path: Path) -> str:
    """One Python script doing what the page's runnable blocks say, in order."""
    lines = ["import pathlib, subprocess, sys",
             "def _sh(code, where):",
             "    for command in code.splitlines():",
             "        if command.strip() and not command.lstrip().startswith('#'):",
             "            r = subprocess.run(command, shell=True, capture_output=True, text=True)",
             "            print(r.stdout + r.stderr)",
             "            if r.returncode:",
             "                sys.exit(f'{where}: {command!r} exited {r.returncode}')"]
    for line, lang, options, code in blocks(path):
        where = f"{path.name}:{line}"
        if lang == "python" and "file" in options:
            lines.append(f"pathlib.Path({options['file']!r}).write_text({code!r})  # {where}")
        elif lang == "python":
            lines += [f"# ---- {where}", code]
        elif lang == "bash":
            lines.append(f"_sh({code!r}, {where!r})")
    return "\n".join(lines) + "\n"


def test_docs_writing_a_pass_runs_as_written(tmp_path):
    page = DOCS / "writing-a-pass.md"
    found = blocks(page)
    langs = [(lang, "file" in opts) for _, lang, opts, _ in found]
    # the page keeps its parts: the pass file, the test file, code that runs, and the commands
    assert langs.count(("python", True)) == 2 and ("python", False) in langs
    commands = "\n".join(code for _, lang, _, code in found if lang == "bash")
    for part in ("--plugin", "--explain", "--report", "pytest"):
        assert part in commands, part
    (tmp_path / "tutorial.py").write_text(script(page))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run([sys.executable, "tutorial.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (tmp_path / "clip_mlp.onnxc.onnx").is_file()
    assert "3 passed" in r.stdout, r.stdout[-2000:]
