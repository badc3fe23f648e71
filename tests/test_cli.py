"""harness/cli.py: the dataclass option parser and run_main (one line for expected errors)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness import cli
from harness.cli import option


@dataclass
class _Cfg:
    name: str = option(help="a required name", required=True)
    ratio: float | None = option(None, "an optional float")
    steps: int | None = option(None, "an optional int")
    size: int = option(3, "an int with a default")
    flag: bool = option(True, "a switch")
    files: list[str] = option(help="repeatable", default_factory=list)


def test_parser_types_and_defaults():
    p = cli.dataclass_parser(_Cfg)
    args = vars(p.parse_args(["--name", "x", "--ratio", "0.5", "--steps", "7", "--no-flag",
                              "--files", "a", "--files", "b"]))
    cfg = _Cfg(**args)
    # `float | None` parses as float (a string here was the bug the helper replaces).
    assert cfg.ratio == 0.5 and isinstance(cfg.ratio, float)
    assert cfg.steps == 7 and cfg.size == 3 and cfg.flag is False and cfg.files == ["a", "b"]
    assert _Cfg(**vars(p.parse_args(["--name", "x"]))).ratio is None
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required


def test_help_shows_each_default_once():
    text = cli.dataclass_parser(_Cfg).format_help()
    assert text.count("(default: 3)") == 1
    assert "(default: None)" not in text


def test_run_main_one_line_for_expected_errors(capsys):
    def main(argv):
        raise cli.UserError("data.json: record 3 has no image")

    assert cli.run_main(main, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("error: data.json: record 3 has no image")
    with pytest.raises(cli.UserError):
        cli.run_main(main, ["--debug"])

    def buggy(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):  # unexpected errors keep their traceback
        cli.run_main(buggy, [])
