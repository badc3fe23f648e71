"""Files the scripts read and write: UTF-8 text, JSON / JSON-lines records (a wrong file: DataError, naming
it and the line or byte), atomic replacement, deletion, appended outputs (torn line repaired), rank merges.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data or output file that cannot be read as it should; the message names the file (line, byte)."""


@dataclass
class BadLine:
    """Stands in for a JSON line that did not parse; `message` says why."""
    message: str


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; a byte that is not UTF-8 is an error naming the file and its offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_json_records(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(index, value) for each record of a JSON list or a JSON-lines file (index: the 0-based line, a line
    that does not parse a BadLine). Split on "\\n" only: splitlines() would cut a JSON string's U+2028."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON list ({e})") from None
    lines = [(i, line) for i, line in enumerate(text.split("\n")) if line.strip()]
    if len(lines) > 1:  # a pretty-printed JSON object is not JSON lines: say so once, not once per line
        with contextlib.suppress(json.JSONDecodeError):
            raise DataError(f"{path}: one JSON {type(json.loads(text)).__name__}, not a list or JSON lines")
    out: list[tuple[int, object]] = []
    for i, line in lines:
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((i, BadLine(f"line {i + 1} is not valid JSON: {e}")))
    return out


def repair_torn_line(path: str | os.PathLike) -> None:
    """Cut off a last line without its newline (what a kill mid-write leaves); a missing file stays so."""
    if os.path.exists(path):
        with open(path, "r+b") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file this project wrote, [] if there is none; a torn last line is
    ignored (JsonlFile.write cuts it off), any other bad line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    try:
        text = data[:data.rfind(b"\n") + 1].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    out = []
    for n, line in [(n, line) for n, line in enumerate(text.split("\n")[:-1], 1) if line.strip()]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e}); fix or remove the line") from None
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def remove(paths: Iterable[Path]) -> None:
    """Delete these files and directories, those present: what a script wrote, when it starts again."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class JsonlFile:
    """An append-only JSON-lines output that a rerun resumes. Made, it only reads `first` (its first row or
    None) and `ids` (the non-None `key` of each row), a torn last line ignored; the first `write` cuts it."""

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], Hashable]):
        self.path, self.key, self.repaired = Path(path), key, False
        rows = read_jsonl(self.path)
        self.first = rows[0] if rows else None
        self.ids = {k for k in map(key, rows) if k is not None}

    def write(self, rows: Iterable[dict]) -> None:
        """Append a batch and flush (a kill loses at most the batch in flight); none: make the file."""
        rows = list(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.repaired:  # this process appends whole lines from here on
            repair_torn_line(self.path)
            self.repaired = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        self.ids.update(k for k in map(self.key, rows) if k is not None)


def merge_jsonl(out: Path, parts: Sequence[Path], *, key: Callable[[dict], Hashable],
                order: Callable[[dict], object], head: Sequence[dict] = ()) -> None:
    """`out` replaced in one step by `head`, then the rows of `parts` (rank files; `out` may be one)
    sorted by `order`: each key once (its first row), none without one (headers)."""
    rows: dict = {}
    for r in (r for p in parts for r in read_jsonl(p)):
        if (k := key(r)) is not None:
            rows.setdefault(k, r)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in [*head, *sorted(rows.values(), key=order)]))
