"""Command lines: options declared once as dataclass fields (`option`, `dataclass_parser`), and
an error the user can fix as one line (`UserError`, `run_main`: exit status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from harness.files import DataError


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
           required: bool = False, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that is also a command-line option (`--field-name`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "required": required}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def add_dataclass_options(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One `--flag` per field of `cls`: `X | None` parses as X, `bool` is a --flag/--no-flag switch,
    `list[str]` repeats. Each default is printed once, after the help text."""
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        required = meta.get("required", False) or default is dataclasses.MISSING
        default = (defaults or {}).get(f.name, None if default is dataclasses.MISSING else default)
        help = meta.get("help", "")
        if default not in (None, [], ()) and not required:
            help += f" (default: {default})"
        kind = str(f.type).removesuffix(" | None")  # the annotation as a string; 'int | None' parses as int
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help)
        elif kind == "list[str]":
            parser.add_argument(flag, dest=f.name, action="append", required=required,
                                default=None if required else list(default or []), help=help + "; repeat")
        else:  # int, float, str (a KeyError for any other type)
            parser.add_argument(flag, dest=f.name, type={"int": int, "float": float, "str": str}[kind],
                                default=default, required=required, choices=meta.get("choices"), help=help)


def dataclass_parser(cls, *, prog: str | None = None, description: str | None = None,
                     defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(parser, cls, defaults)
    return parser


class UserError(Exception):
    """An error the user can fix (a bad file, record, option or checkpoint): one line on stderr, exit status 2
    (HSCR_DEBUG=1 or --debug: the traceback). Anything else is a bug and keeps its traceback."""


def few(items, sep: str = ", ", n: int = 3) -> str:
    """The first `n` of `items` and how many more: an error names a few, never hundreds."""
    items = list(items)
    return sep.join(items[:n]) + (f"{sep}and {len(items) - n} more" if len(items) > n else "")


def run_main(main, argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a UserError becomes one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HSCR_DEBUG", "") not in ("", "0")
    try:
        return main([a for a in argv if a != "--debug"]) or 0
    except (UserError, DataError) as e:
        if debug:
            raise
        print(f"{Path(sys.argv[0]).name or 'hscr'}: error: {e}", file=sys.stderr)
        return 2
