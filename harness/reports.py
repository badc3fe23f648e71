"""eval.py's tables: report.md and summary.json of a run, `eval.py compare`, `score` and `baselines`. Every
table shows METRICS, one column each, explained by LEGEND under it; the figures are eval.score_file's
(None, shown "–": nothing to average). It never imports eval.py.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.cli import UserError
from harness.files import DataError, read_text

# (label, section, key) of the figures shown in reports and comparisons.
METRICS = (("open recall", "open", "recall"), ("closed acc", "closed", "accuracy"),
           ("closed strict", "closed", "accuracy_strict"), ("hedge rate", "closed", "hedge_rate"),
           ("no answer", "closed", "no_answer_rate"), ("overall", "overall", "score"),
           ("halluc. rate", "closed", "hallucination_rate"),
           ("facts contradicted", "description", "facts_contradicted"),
           ("facts correct", "description", "facts_correct"))
# What the labels mean, under every table (a markdown list, readable in a terminal too).
LEGEND = "\n".join((
    "- open recall: LLaVA-Med's open score (mean token recall × 100)",
    "- closed acc: LLaVA-Med's lenient closed score, `gt in pred` on normalised strings (\"yes no\" hits "
    "every yes/no question)",
    "- closed strict: a yes/no question needs the prediction's one yes/no answer to equal gt (hedges and "
    "non-answers are wrong); other closed answers must occur as whole words",
    "- hedge rate: % of closed predictions holding both \"yes\" and \"no\" as words",
    "- no answer: % of yes/no questions whose prediction gives no yes/no answer",
    "- overall: mean over questions of open recall and lenient closed hits",
    "- halluc. rate: % of questions with answer \"no\" answered \"yes\"",
    "- facts contradicted: over questions whose record lists the scene's facts (\"facts\"; no column without "
    "them), % of the slot values an answer states that are not the scene's (CHAIR-like)",
    "- facts correct: over the same questions, % of the scene's facts the answer states with the true value"))
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
    """full − blind for every metric and every blind mode that was run (positive: the image helps;
    for the hallucination rate, negative: the image lowers it)."""
    return {mode: {label: _diff(modes[mode][s][k], modes["full"][s][k]) for label, s, k in METRICS}
            for mode in MODE_LABELS if mode != "full" and mode in modes and "full" in modes}


def benchmark_table(name: str, entry: Mapping[str, Any]) -> str:
    """Markdown: one row per mode, then one row of visual gain per blind mode; then the questions
    skipped (unreadable image or too long for the context) and unscorable (no ground truth), by id."""
    full, skipped = entry["modes"]["full"], entry["skipped"]
    unscorable, show = full["unscorable"], 20
    lines = [f"### {name}", "",
             f"{full['n_questions'] + len(skipped)} questions read, {len(entry['bad_records'])} malformed records "
             f"skipped, {len(skipped)} questions skipped (unreadable image or too long), {len(unscorable)} "
             f"unscorable (no ground truth); answered {full['open']['n']} open, {full['closed']['n']} "
             f"closed; {len(full['missing'])} missing", "",
             scores_table({MODE_LABELS[mode]: scores for mode, scores in entry["modes"].items()}, "mode")]
    for mode, gains in entry["visual_gain"].items():
        lines.append(f"| visual gain (full − {MODE_LABELS[mode]}) | " + " | ".join(
            _fmt(gains[label], signed=True) for label, _, _ in _shown(entry["modes"].values())) + " |")
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}, not scored):", ""]
        lines += [f"- {s['question_id']}: {s['reason']}" for s in skipped]
    if unscorable:
        more = f", … ({len(unscorable) - show} more)" if len(unscorable) > show else ""
        lines += ["", f"Unscorable, no ground truth to score against ({len(unscorable)}): "
                  + ", ".join(unscorable[:show]) + more]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, config: Mapping[str, Any], results: Mapping[str, Any],
                  fingerprint: Mapping[str, Any] | None = None) -> None:
    """summary.json (the options `config`, the provenance fingerprint, every figure) and report.md
    (a table per benchmark) in `run_dir`."""
    (run_dir / "summary.json").write_text(json.dumps(
        {"config": dict(config), "provenance": fingerprint, "benchmarks": results}, indent=2), encoding="utf-8")
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
    for name in list(a) + [n for n in b if n not in a]:
        lines += [f"### {name}", "", "| mode | metric | A | B | B − A |", "|---|---|---:|---:|---:|"]
        modes_a, modes_b = (x[name]["modes"] if name in x else {} for x in (a, b))
        for mode in [m for m in MODE_LABELS if m in modes_a or m in modes_b]:
            for label, s, k in _shown([*modes_a.values(), *modes_b.values()]):
                fa, fb = (modes[mode][s][k] if mode in modes else None for modes in (modes_a, modes_b))
                lines.append(f"| {MODE_LABELS[mode]} | {label} | {_fmt(fa)} | {_fmt(fb)} "
                             f"| {_fmt(_diff(fa, fb), True)} |")
        lines.append("")
    return "\n".join(lines)


def scores_table(rows: Mapping[str, Mapping[str, Any]], first: str = "answers") -> str:
    """Markdown: one row per score_file result (or mode), the METRICS as columns (lenient and strict side by side)."""
    metrics = _shown(rows.values())
    lines = [f"| {first} | " + " | ".join(label for label, _, _ in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(scores[s][k]) for _, s, k in metrics) + " |")
    return "\n".join(lines)


def question_counts(scores: Mapping[str, Any]) -> str:
    """One line: how many questions a score_file result covers, by type."""
    c = scores["closed"]
    return (f"{scores['n_questions']} questions: {c['n']} closed ({c['n_yes_no']} with answer yes/no, "
            f"{c['n_gt_no']} of them no), {scores['open']['n']} open")
