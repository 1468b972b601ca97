"""The `onnxc` console script: Ctrl-C during start-up (while the command line and its libraries load) is the same one
line and exit code 130 as during a compile, never a traceback."""
import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("onnxc: interrupted; nothing was written\n")
        sys.exit(130)
    cli_main()
