"""The `onnxc` console script: Ctrl-C during start-up (while the command line and its libraries load) is the same one
line and exit code 130 as during a compile, never a traceback. Python may wrap the KeyboardInterrupt on its way out
of an import (3.11 re-raises an exception from a class's `__set_name__` as a RuntimeError caused by it), so the
cause chain is read, not only the exception's type."""
import sys


def _interrupted(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def main() -> None:
    try:
        from .cli import main as cli_main
    except BaseException as exc:  # noqa: BLE001 - only an interrupt is turned into the one line; the rest re-raise
        if not _interrupted(exc):
            raise
        sys.stderr.write("onnxc: interrupted; nothing was written\n")
        sys.exit(130)
    cli_main()
