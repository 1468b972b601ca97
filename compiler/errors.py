"""Errors onnxc reports to its users, each with the exit code the CLI returns for it.

Exit codes (documented in README.md and docs/cli.md):
    0  success
    1  numeric verification failed (nothing was written)
    2  usage error (bad option, unknown pass name, output path equal to the input)
    3  invalid or unsafe input model (not ONNX, truncated, cycles, dangling inputs, ...)
    4  internal error: a pass broke an invariant; the message names the pass
    5  the output could not be written (disk full, I/O error); nothing partial is left
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): temporary folders are removed, nothing is written
"""
from __future__ import annotations

import re

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_INTERNAL = 4
EXIT_WRITE = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters."""
    text = str(exc).strip().splitlines()
    return one_line(text[0] if text else type(exc).__name__)[:limit]


_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str | bytes) -> str:
    """`text` with newlines, NUL and other control characters escaped (\\n, \\x00), so it prints as one line.
    Bytes (protobuf gives a string field that is not UTF-8 as bytes) are decoded with escapes."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(m.group(), ascii(m.group())[1:-1]),
                        text)


def quote(name: str | bytes, limit: int = 200) -> str:
    """A name from the model as it is shown in messages: quoted, control characters escaped, cut to `limit`."""
    shown = one_line(name)
    return f"'{shown[:limit]}" + ("...'" if len(shown) > limit else "'")


def summarize(problems: list[str]) -> str:
    """The first problem, with how many more there are."""
    return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


class OnnxcError(Exception):
    """Base class: a one-line message meant for the user, plus an exit code."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        message = one_line(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(OnnxcError):
    exit_code = EXIT_USAGE


class WriteError(OnnxcError):
    """Writing the output failed (no space left, an I/O error); what was staged has been removed."""

    exit_code = EXIT_WRITE


class InvalidModelError(OnnxcError):
    exit_code = EXIT_INVALID_INPUT


class VerificationError(OnnxcError):
    exit_code = EXIT_VERIFY


class PassError(OnnxcError):
    """A pass crashed or left the IR in a state the verifier rejects."""

    exit_code = EXIT_INTERNAL

    def __init__(self, pass_name: str, message: str, *, rule: str | None = None, previous: tuple[str, ...] = ()):
        where = f"pass '{pass_name}'" + (f", rule '{rule}'" if rule else "")
        after = f" (after {', '.join(previous[-5:])})" if previous else ""
        super().__init__(f"{where}{after}: {message}")
        self.pass_name = pass_name
        self.rule = rule
        self.previous = previous


class IRVerificationError(OnnxcError):
    """The IR verifier found a broken invariant; raised with a list of problems."""

    exit_code = EXIT_INVALID_INPUT

    def __init__(self, problems: list[str]):
        super().__init__(summarize(problems))
        self.problems = problems
