"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton, so that the kernels run on the
CPU through Triton's interpreter; conftest.py is imported by pytest before any test module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile  # noqa: E402

# harness/provenance.py caches weight digests in $HSCR_CACHE (default ~/.cache/hscr): tests keep theirs
# in a folder of their own, so that a test run never writes into the user's cache.
os.environ.setdefault("HSCR_CACHE", tempfile.mkdtemp(prefix="hscr-test-cache-"))

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Tests import the project's top-level modules (model, kernels, data, hscr, train, eval).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    # `python -m pytest tests/ -m "not slow"` runs the fast set (under a minute on 2 cores);
    # the slow tests start processes (torchrun), or run the demo at a reduced size.
    config.addinivalue_line("markers", "slow: starts processes or runs a pipeline end to end")
