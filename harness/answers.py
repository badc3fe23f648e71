"""eval.py's answer files (docs/FORMATS.md "Evaluation files"): LLaVA-Med's answer-file JSONL, written per
rank, appended to and flushed per batch (harness.files.JsonlFile: a torn last line is ignored, its question
answered again), and merged in question order. It never imports eval.py.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.cli import UserError
from harness.files import BadLine, DataError, JsonlFile, merge_jsonl, read_json_records

PROVENANCE = "provenance.json"


def answers_path(run_dir: Path, name: str, mode: str, rank: int | None = None) -> Path:
    """{run}/{benchmark}/answers[-mode][.rank{r}].jsonl (mode `full` is LLaVA-Med's answer file)."""
    stem = "answers" if mode == "full" else f"answers-{mode}"
    return run_dir / name / (f"{stem}.jsonl" if rank is None else f"{stem}.rank{rank}.jsonl")


def answer_row(record, text: str, model_id: str, mode: str) -> dict[str, Any]:
    """One answer-file line: question_id keeps the question file's integer when it was one; answer_id is a
    content hash, not LLaVA-Med's random shortuuid, so that a resumed run writes the same file."""
    qid: int | str = int(record.id) if record.id.isdigit() and str(int(record.id)) == record.id else record.id
    answer_id = hashlib.sha1(f"{model_id}\n{mode}\n{record.id}\n{text}".encode()).hexdigest()[:22]
    return {"question_id": qid, "prompt": record.question, "text": text, "answer_id": answer_id,
            "model_id": model_id, "metadata": {"mode": mode}}


def question_id(row: dict[str, Any]) -> str:
    """An answer row's key: its question id as a string, as Record ids are."""
    return str(row["question_id"])


def read_answer_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an answer file from anywhere (LLaVA-Med's scripts, an edited copy): JSON lines or a JSON list
    of objects with "question_id" and "text"; a bad line or row is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: answer file not found")
    rows = []
    for i, row in read_json_records(path):
        if isinstance(row, BadLine):
            raise DataError(f"{path}: {row.message}")
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{path}: record {i + 1} is not an answer (an object with question_id and a text string)")
        rows.append(row)
    return rows


def shards(run_dir: Path, name: str, mode: str) -> list[Path]:
    """Every rank's shard of one answer file, whatever the world size that wrote them."""
    pattern = answers_path(run_dir, name, mode, 0).name.replace(".rank0.", ".rank*.")
    return sorted((run_dir / name).glob(pattern))


def answered_ids(run_dir: Path, name: str, mode: str) -> set[str]:
    """Ids answered by an earlier run: the merged file and every shard, whatever the world size that wrote
    them. Read only: another rank may be appending to its shard (a half line is not counted)."""
    files = [answers_path(run_dir, name, mode)] + shards(run_dir, name, mode)
    return set().union(*(JsonlFile(f, key=question_id).ids for f in files))


def merge_answers(run_dir: Path, name: str, mode: str, records: Sequence[Any]) -> Path:
    """Fold the shards into the answer file, in the order of `records` (rows of other questions, e.g. from a
    run without --limit, follow), then delete the shards. Atomic: an interrupted merge leaves them."""
    final, parts = answers_path(run_dir, name, mode), shards(run_dir, name, mode)
    position = {r.id: i for i, r in enumerate(records)}
    merge_jsonl(final, [final] + parts, key=question_id,
                order=lambda row: position.get(question_id(row), len(position)))
    for f in parts:
        f.unlink()
    return final

