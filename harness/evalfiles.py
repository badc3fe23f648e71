"""eval.py's files (docs/FORMATS.md "Evaluation files"): question files and images, answer files (a shard
per rank, merged in question order) and tables. Refusals: one line naming the file. Never imports eval.py."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from data import image_problem, read_records, resolve_image
from harness.cli import UserError, few
from harness.files import BadLine, DataError, merge_jsonl, read_json_records, read_text, remove


# Inputs
def parse_named(values: Sequence[str], flag: str, *, names: Sequence[str] | None = None,
                allow_global: bool = False) -> dict[str, str]:
    """NAME=PATH values → {name: path}, NAME among `names`, else a plain name (a folder of --out).
    allow_global: a value naming no benchmark is the path for all (→ every name: its path or None)."""
    out, problems = {}, []
    for value in values:
        name, sep, path = value.partition("=")
        named = bool(sep and name and path)
        if named and names is None and not re.fullmatch(r"[\w-]+", name):
            problems.append(f"{flag} {value!r}: NAME must be a plain name (letters, digits, _ and -)")
        elif named and (names is None or name in names):
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
    return {n: out.get(n, out.get("*")) for n in names} if allow_global else out


def read_questions(path: str, ground_truth: str | None = None) -> tuple[list[Any], list[Any]]:
    """data.read_records, refusing a missing file; one that is not JSON (lines) is a DataError naming it."""
    for what, f in (("question file", path), ("ground-truth file", ground_truth)):
        if f is not None and not Path(f).is_file():
            raise UserError(f"{f}: {what} not found")
    try:
        return read_records(path, answers_path=ground_truth)
    except ValueError as error:  # for a file it cannot read as a whole (a DataError keeps its message)
        raise DataError(str(error)) from error


def read_benchmarks(benchmark: Sequence[str], ground_truth: Sequence[str] = ()) -> dict[str, tuple]:
    """name → (records, bad records) of each --benchmark NAME=PATH, with its --ground-truth NAME=PATH."""
    paths = parse_named(benchmark, "--benchmark")
    gts = parse_named(ground_truth, "--ground-truth", names=list(paths))
    return {name: read_questions(path, gts.get(name)) for name, path in paths.items()}


def check_images(records: Sequence[Any], image_root: str | None, name: str, source: str, rank: int = 0,
                 world: int = 1) -> dict[str, str]:
    """One error for missing images (the real benchmark files ship without them); else question id → why its
    image cannot be used (`data.image_problem`), for this process's share records[rank::world]."""
    where = f"benchmark {name!r} ({source})"
    if not records:
        raise UserError(f"{where}: no question to evaluate (its malformed records are listed above)")
    if image_root is None:
        raise UserError(f"{where}: no --image-root for it (NAME=DIR or one DIR for all)")
    unusable, absent, looked = [], {}, {}  # image path as written → its file, or → why it cannot be used
    for i, r in enumerate(records):
        try:
            if r.image is None:
                raise ValueError("no image in the record")
            path = resolve_image(image_root, r.image)
        except ValueError as error:
            unusable.append(f"{r.id}: {error}")
            continue
        if r.image in absent or not path.is_file():
            absent[r.image] = path
        elif i % world == rank and r.image not in looked:
            looked[r.image] = image_problem(path)
    problems = []
    if absent:
        n_images = len({r.image for r in records if r.image is not None})
        problems.append(f"{len(absent)} of {n_images} images not found under {image_root} (needed by "
                        f"{sum(r.image in absent for r in records)} of {len(records)} questions): "
                        + few(absent, n=10))
    if unusable:
        problems.append(f"{len(unusable)} questions without a usable image path: " + few(unusable, "; ", 10))
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    return {r.id: f"image {r.image}: {looked[r.image]}" for r in records[rank::world] if looked[r.image]}


# Answer files
def answers_path(run_dir: Path, name: str, mode: str, rank: int | str | None = None) -> Path:
    """{run}/{benchmark}/answers[-mode][.rank{r}].jsonl (mode `full` is LLaVA-Med's answer file)."""
    stem = "answers" if mode == "full" else f"answers-{mode}"
    return run_dir / name / (f"{stem}.jsonl" if rank is None else f"{stem}.rank{rank}.jsonl")


def answer_row(record, text: str, model_id: str, mode: str) -> dict[str, Any]:
    """One answer-file line (docs/FORMATS.md); answer_id, a content hash, is the same on resume."""
    qid: int | str = int(record.id) if record.id.isdigit() and str(int(record.id)) == record.id else record.id
    answer_id = hashlib.sha1(f"{model_id}\n{mode}\n{record.id}\n{text}".encode()).hexdigest()[:22]
    return {"question_id": qid, "prompt": record.question, "text": text, "answer_id": answer_id,
            "model_id": model_id, "metadata": {"mode": mode}}


def question_id(row: dict[str, Any]) -> str:
    """An answer row's key: its question id as a string, as Record ids are."""
    return str(row["question_id"])


def read_answer_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an answer file from anywhere (LLaVA-Med's scripts, an edited copy); a bad row is an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: answer file not found")
    rows = read_json_records(path)
    for i, row in rows:
        if isinstance(row, BadLine):
            raise DataError(f"{path}: {row.message}")
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{path}: record {i + 1} is not an object with question_id and a text string")
    return [row for _, row in rows]


def shards(run_dir: Path, name: str, mode: str) -> list[Path]:
    """Every rank's shard of one answer file, whatever the world size that wrote them."""
    return sorted((run_dir / name).glob(answers_path(run_dir, name, mode, "*").name))


def merge_answers(run_dir: Path, name: str, mode: str, records: Sequence[Any]) -> Path:
    """Fold the shards into the answer file in `records` order (other rows follow), delete them; atomic."""
    final, parts = answers_path(run_dir, name, mode), shards(run_dir, name, mode)
    position = {r.id: i for i, r in enumerate(records)}
    merge_jsonl(final, [final] + parts, key=question_id,
                order=lambda row: position.get(question_id(row), len(position)))
    remove(parts)
    return final


# Tables: every one shows METRICS, (label, section, key, meaning) of eval.score_file's figures (None, shown
# "–": nothing to average), one column each, explained by LEGEND under it (readable in a terminal too).
METRICS = (
    ("open recall", "open", "recall", "LLaVA-Med's open score (mean token recall × 100)"),
    ("closed acc", "closed", "accuracy", "LLaVA-Med's lenient closed score, `gt in pred` on normalised "
     "strings (\"yes no\" hits every yes/no question)"),
    ("closed strict", "closed", "accuracy_strict", "a yes/no question needs the prediction's one yes/no "
     "answer to equal gt (hedges and non-answers are wrong); other closed answers must occur as whole words"),
    ("hedge rate", "closed", "hedge_rate", "% of closed predictions holding both \"yes\" and \"no\" as "
     "words"),
    ("no answer", "closed", "no_answer_rate",
     "% of yes/no questions whose prediction gives no yes/no answer"),
    ("overall", "overall", "score", "mean over questions of open recall and lenient closed hits"),
    ("halluc. rate", "closed", "hallucination_rate", "% of questions with answer \"no\" answered \"yes\""),
    ("facts contradicted", "description", "facts_contradicted", "over questions whose record lists the "
     "scene's facts (\"facts\"; no column without them), % of the slot values an answer states that are not "
     "the scene's (CHAIR-like)"),
    ("facts correct", "description", "facts_correct",
     "over the same questions, % of the scene's facts the answer states with the true value"))
LEGEND = "\n".join(f"- {label}: {meaning}" for label, _, _, meaning in METRICS)
# eval.py's modes, in the order tables show them ("full" first: the blind modes are compared with it).
MODE_LABELS = {"full": "full", "no_image": "no image", "blank_image": "blank image"}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _fmt(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def _shown(rows: Iterable[Mapping[str, Any]]) -> tuple:
    """METRICS without the description figures when no row scored a question with facts (always – then)."""
    return tuple(m for m in METRICS if m[1] != "description" or any(r["description"]["n"] for r in rows))


def visual_gain(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """full − blind per metric and blind mode run: positive where the image helps (negative: halluc. rate)."""
    return {mode: {label: _diff(modes[mode][s][k], modes["full"][s][k]) for label, s, k, _ in METRICS}
            for mode in MODE_LABELS if mode != "full" and mode in modes and "full" in modes}


def scores_table(rows: Mapping[str, Mapping[str, Any]], first: str = "answers",
                 gains: Mapping[str, Mapping[str, float | None]] | None = None) -> str:
    """Markdown: a row per score_file result, the METRICS as columns; then a signed row per `gains` entry."""
    metrics = _shown(rows.values())
    lines = [f"| {first} | " + " | ".join(label for label, *_ in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(scores[s][k]) for _, s, k, _ in metrics) + " |")
    for name, gain in (gains or {}).items():
        lines.append(f"| {name} | " + " | ".join(_fmt(gain[label], True) for label, *_ in metrics) + " |")
    return "\n".join(lines)


def benchmark_table(name: str, entry: Mapping[str, Any]) -> str:
    """Markdown: a row per mode and of visual gain per blind mode; the skipped and unscorable ids."""
    full, skipped = entry["modes"]["full"], entry["skipped"]
    unscorable = full["unscorable"]
    modes = {MODE_LABELS[mode]: scores for mode, scores in entry["modes"].items()}
    gains = {f"visual gain (full − {MODE_LABELS[mode]})": g for mode, g in entry["visual_gain"].items()}
    lines = [f"### {name}", "",
             f"{full['n_questions'] + len(skipped)} questions read, {len(entry['bad_records'])} malformed "
             f"records skipped, {len(skipped)} questions skipped (unreadable image or too long), "
             f"{len(unscorable)} unscorable (no ground truth); answered {full['open']['n']} open, "
             f"{full['closed']['n']} closed; {len(full['missing'])} missing", "",
             scores_table(modes, "mode", gains)]
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}, not scored):", ""]
        lines += [f"- {s['question_id']}: {s['reason']}" for s in skipped]
    if unscorable:
        lines += ["", f"Unscorable, no ground truth to score against ({len(unscorable)}): "
                  + few(unscorable, n=20)]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, config: Mapping[str, Any], results: Mapping[str, Any],
                  fingerprint: Mapping[str, Any] | None = None) -> None:
    """summary.json (options, fingerprint, every figure) and report.md (a table per benchmark)."""
    summary = {"config": dict(config), "provenance": fingerprint, "benchmarks": results}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    adapter = config.get("adapter")
    text = ["# Evaluation", "", f"model `{config['model']}`" + (f", adapter `{adapter}`" if adapter else ""),
            "", LEGEND, ""] + [benchmark_table(name, entry) for name, entry in results.items()]
    (run_dir / "report.md").write_text("\n".join(text), encoding="utf-8")


def compare_runs(run_a: str | Path, run_b: str | Path) -> str:
    """Two runs side by side: every figure of both summaries, and B − A."""
    summaries = []
    for run in (run_a, run_b):
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise UserError(f"{path} not found: is {run} an eval.py run directory?")
        try:
            summaries.append(json.loads(read_text(path))["benchmarks"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not an eval.py summary ({e})") from None
    a, b = summaries
    lines = [f"A = {run_a}", f"B = {run_b}", ""]
    for name in {**a, **b}:
        lines += [f"### {name}", "", "| mode | metric | A | B | B − A |", "|---|---|---:|---:|---:|"]
        modes_a, modes_b = (x[name]["modes"] if name in x else {} for x in (a, b))
        for mode in [m for m in MODE_LABELS if m in modes_a or m in modes_b]:
            for label, s, k, _ in _shown([*modes_a.values(), *modes_b.values()]):
                fa, fb = (modes[mode][s][k] if mode in modes else None for modes in (modes_a, modes_b))
                lines.append(f"| {MODE_LABELS[mode]} | {label} | {_fmt(fa)} | {_fmt(fb)} "
                             f"| {_fmt(_diff(fa, fb), True)} |")
        lines.append("")
    return "\n".join(lines)


def question_counts(scores: Mapping[str, Any]) -> str:
    """One line: how many questions a score_file result covers, by type."""
    c = scores["closed"]
    return (f"{scores['n_questions']} questions: {c['n']} closed ({c['n_yes_no']} with answer yes/no, "
            f"{c['n_gt_no']} of them no), {scores['open']['n']} open")
