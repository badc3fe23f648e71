"""harness/rundir.py: train.py's inputs, refused as one line naming the option before anything slow."""
from __future__ import annotations

import pytest

import train
from harness.cli import run_main
from test_train import workspace  # noqa: F401 (fixture)


@pytest.mark.parametrize("flag,what", [("--data", "missing"), ("--data", "folder"),
                                       ("--eval-data", "missing"), ("--eval-data", "folder")])
def test_data_that_is_no_file_is_one_line(workspace, tmp_path, capsys, flag, what):
    """A --data or --eval-data that is missing or a folder: exit status 2 and one line naming the
    option and the path, not a FileNotFoundError or IsADirectoryError traceback."""
    root, ckpt, prefs = workspace
    path = tmp_path / "nope.jsonl" if what == "missing" else tmp_path
    given = {"--data": str(prefs), flag: str(path)}
    argv = ["--model", str(ckpt), *[a for kv in given.items() for a in kv], "--out", str(tmp_path / "run")]
    assert run_main(train.main, argv) == 2
    err = capsys.readouterr().err
    why = "file not found" if what == "missing" else "not a file"
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"error: {flag} {path}: {why}")
