"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton, so that the kernels run on the
CPU through Triton's interpreter; conftest.py is imported by pytest before any test module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Tests import the project's top-level modules (model, kernels, data, hscr, train, eval).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
