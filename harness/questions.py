"""eval.py's inputs: benchmarks named on the command line (NAME=PATH), their question files and their
images. Every refusal is a UserError or DataError: one line, naming the file. It never imports eval.py.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data import image_problem, read_records, resolve_image
from harness.cli import UserError
from harness.files import DataError, read_text


def parse_named(values: Sequence[str], flag: str, *, names: Sequence[str] | None = None,
                allow_global: bool = False) -> dict[str, str]:
    """NAME=PATH values → {name: path}, NAME limited to `names` when given, else a plain name (a folder
    of eval.py's --out). With allow_global a value that names no benchmark is a path for all (key "*")."""
    out, problems = {}, []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name and path and names is None and not re.fullmatch(r"[\w-]+", name):
            problems.append(f"{flag} {value!r}: NAME must be a plain name (letters, digits, _ and -)")
        elif sep and name and path and (names is None or name in names):
            if name in out:
                problems.append(f"{flag} {name!r} given twice")
            out[name] = path
        elif allow_global:
            out["*"] = value
        else:
            with_names = f" with NAME in {list(names)}" if names else ""
            problems.append(f"{flag} {value!r} is not NAME=PATH{with_names}")
    if problems:
        raise UserError("; ".join(problems))
    return out


def read_questions(path: str, ground_truth: str | None = None) -> tuple[list[Any], list[Any]]:
    """data.read_records, with the errors a user can act on: a file not found, bytes that are not
    UTF-8 (the file and byte offset), a file that is not JSON or JSON lines."""
    for what, f in (("question file", path), ("ground-truth file", ground_truth)):
        if f is not None and not Path(f).is_file():
            raise UserError(f"{f}: {what} not found")
        if f is not None:
            read_text(f)  # a DataError naming the byte offset, which read_records would not give
    try:
        return read_records(path, answers_path=ground_truth)
    except ValueError as error:  # read_records raises it for a file it cannot read as a whole
        raise DataError(str(error)) from error


def read_benchmarks(benchmark: Sequence[str], ground_truth: Sequence[str] = ()) -> dict[str, tuple]:
    """name → (records, bad records) of each --benchmark NAME=PATH, with its --ground-truth NAME=PATH."""
    paths = parse_named(benchmark, "--benchmark")
    gts = parse_named(ground_truth, "--ground-truth", names=list(paths))
    return {name: read_questions(path, gts.get(name)) for name, path in paths.items()}


def check_images(records: Sequence[Any], image_root: str | None, name: str, source: str, rank: int = 0,
                 world: int = 1) -> dict[str, str]:
    """One error naming the benchmark, how many images of `records` are missing and the first of them (the
    real benchmark files ship without images); else question id → why its image cannot be used
    (`data.image_problem`, each file looked at once), for this process's share, records[rank::world]."""
    if not records:
        return {}
    where = f"benchmark {name!r} ({source})"
    if image_root is None:
        raise UserError(f"{where}: no --image-root for it (NAME=DIR or one DIR for all)")
    unusable, absent, looked = [], {}, {}  # image path as written → its file, or → why it cannot be used
    for i, r in enumerate(records):
        if r.image is None:
            unusable.append(f"{r.id}: no image in the record")
            continue
        try:
            path = resolve_image(image_root, r.image)
        except ValueError as error:
            unusable.append(f"{r.id}: {error}")
            continue
        if r.image in absent or not path.is_file():
            absent[r.image] = path
        elif i % world == rank and r.image not in looked:
            looked[r.image] = image_problem(path)
    problems, show = [], 10
    if absent:
        n_images = len({r.image for r in records if r.image is not None})
        problems.append(f"{len(absent)} of {n_images} images not found under {image_root} (needed by "
                        f"{sum(r.image in absent for r in records)} of {len(records)} questions): "
                        f"{', '.join(list(absent)[:show])}"
                        + (f", … ({len(absent) - show} more)" if len(absent) > show else ""))
    if unusable:
        problems.append(f"{len(unusable)} questions without a usable image path: " + "; ".join(unusable[:show])
                        + (" …" if len(unusable) > show else ""))
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    return {r.id: f"image {r.image}: {looked[r.image]}" for r in records[rank::world] if looked[r.image]}
