"""The documents agree with the code: every option a script's --help lists is named in
docs/METHOD.md or docs/FORMATS.md, so that a reader who meets it in --help finds what it does."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long options of a parser (a --x/--no-x switch counts once, as --x)."""
    return [o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o != "--help" and not o.startswith("--no-")]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    import eval as evaluation
    import hscr
    import train
    from demo import run as demo_run
    from harness.cli import dataclass_parser

    return {"hscr.py": dataclass_parser(hscr.Options), "train.py train": train.build_parser(),
            "eval.py": evaluation.build_parser(), "train.py (the demo)": demo_run.build_parser("python train.py")}


@pytest.mark.parametrize("script", ["hscr.py", "train.py train", "eval.py", "train.py (the demo)"])
def test_every_option_is_documented(script):
    text = (DOCS / "METHOD.md").read_text(encoding="utf-8") + (DOCS / "FORMATS.md").read_text(encoding="utf-8")
    missing = [f for f in _flags(_parsers()[script]) if f"`{f}" not in text]
    assert not missing, f"{script}: options in --help that docs/METHOD.md and docs/FORMATS.md never name: {missing}"
