"""Puts tests/ on sys.path so test files in subfolders can import the shared test module, with assertion messages."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
pytest.register_assert_rewrite("helpers")
