"""Puts tests/ on sys.path so test files in subfolders can import the shared test module, with assertion messages."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
pytest.register_assert_rewrite("helpers")

# The suite writes nothing into the repository: no hypothesis example database (failing examples are printed,
# and fixed ones are kept as @example in the tests), and hypothesis' other files go to the temporary folder.
import tempfile  # noqa: E402

from hypothesis import settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(pathlib.Path(tempfile.gettempdir()) / "onnxc-hypothesis")
settings.register_profile("onnxc", database=None)
settings.load_profile("onnxc")
