"""Plumbing shared by hscr.py, train.py, eval.py and the demo: command lines built from a config
dataclass, torchrun's environment, dtype names, left padding, and JSON / JSON-lines reading.

Nothing here is part of the method; it lives in one place so the scripts agree on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

# ---------------------------------------------------------------------------------------------
# Command lines from dataclasses


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
           required: bool = False, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that is also a command-line option (`--field-name`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "required": required}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# Annotation (as a string: every module uses `from __future__ import annotations`) → argparse type.
_TYPES = {"int": int, "float": float, "str": str}


def _base_type(annotation: str) -> str:
    """'int | None' → 'int', 'float' → 'float'."""
    parts = [p.strip() for p in str(annotation).split("|") if p.strip() != "None"]
    if len(parts) != 1:
        raise TypeError(f"cannot build an option from the annotation {annotation!r}")
    return parts[0]


def add_dataclass_options(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One `--flag` per field of `cls`: `X | None` parses as X, `bool` is a --flag/--no-flag
    switch, `list[str]` repeats. Each default is printed once, after the help text."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        required = meta.get("required", False) or (f.default is dataclasses.MISSING
                                                   and f.default_factory is dataclasses.MISSING)
        help = meta.get("help", "")
        if default not in (None, [], ()) and not required:
            help += f" (default: {default})"
        kind = _base_type(f.type)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif kind == "list[str]":
            parser.add_argument(flag, dest=f.name, action="append", required=required,
                                default=None if required else list(default or []), help=help + "; repeat")
        else:
            if kind not in _TYPES:
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {f.type!r}")
            parser.add_argument(flag, dest=f.name, type=_TYPES[kind], default=default, required=required,
                                choices=meta.get("choices"), help=help)


def dataclass_parser(cls, *, prog: str | None = None, description: str | None = None,
                     defaults: dict | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose options are the fields of `cls` (see add_dataclass_options)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(parser, cls, defaults)
    return parser


# ---------------------------------------------------------------------------------------------
# Distributed runs and dtypes


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device, *, gpu_default: str = "bfloat16") -> torch.dtype:
    """A dtype name of DTYPES, or "auto": `gpu_default` on CUDA, float32 elsewhere."""
    if name == "auto":
        name = gpu_default if str(device).startswith("cuda") else "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Padding


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (R, T) and attention mask (R, T) of `rows` right-aligned (left-padded) to the longest,
    as generation with a shared write position expects."""
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, T - len(r):] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


# Word-start marks of SentencePiece / byte-level BPE pieces, and punctuation glued to words.
_MARKS = "▁Ġ "
_PUNCT = ".,;:!?\"'()[]"


def piece_word(piece: str | None) -> str:
    """A tokenizer piece as a word, case kept: no word-start mark, no surrounding punctuation
    ("▁no." → "no"; "." → ""). hscr.py's --same-word and demo/negatives.py's classes use it."""
    return (piece or "").lstrip(_MARKS).strip(_PUNCT)


# ---------------------------------------------------------------------------------------------
# JSON and JSON lines


class DataError(ValueError):
    """A data or output file that cannot be read as it should; the message names the file (and
    the line or byte). `run_main` reports it as one line, like a UserError."""


class BadLine:
    """Stands in for a JSON line that did not parse; `message` says why."""

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"BadLine({self.message!r})"


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; a byte that is not UTF-8 is an error naming the file and its offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_json_records(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(index, value) for each record of a JSON list or a JSON-lines file. In JSON lines the index
    is the 0-based line number and a line that does not parse becomes a BadLine, so that a long job
    can report it and go on. Lines are split on "\\n" only: JSON strings may hold a raw U+2028,
    which str.splitlines() would cut."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON list ({e})") from None
    lines = [(i, line) for i, line in enumerate(text.split("\n")) if line.strip()]
    if len(lines) > 1:
        # A pretty-printed JSON object is not JSON lines: say so once, not once per line.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if whole is not None:
            raise DataError(f"{path}: one JSON {type(whole).__name__}, not a list or JSON lines")
    out: list[tuple[int, object]] = []
    for i, line in lines:
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((i, BadLine(f"line {i + 1} is not valid JSON: {e}")))
    return out


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The objects of a JSON-lines file this project wrote (an output being resumed). A last line
    without its newline is what a kill mid-write leaves: with `repair` it is cut off the file,
    otherwise ignored. Any other bad line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    out = []
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e}); fix or remove the line") from None
    return out


# ---------------------------------------------------------------------------------------------
# Expected errors end a script with one line


class UserError(Exception):
    """An error the user can fix (a bad file, record, option or checkpoint): the scripts print its
    message as one line on stderr and exit with status 2. Set HSCR_DEBUG=1 (or pass --debug) to see
    the traceback. Anything else is a bug and keeps its traceback."""


def run_main(main, argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a UserError becomes one line on stderr and exit status 2."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HSCR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv) or 0
    except (UserError, DataError) as e:
        if debug:
            raise
        prog = Path(sys.argv[0]).name or "hscr"
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
