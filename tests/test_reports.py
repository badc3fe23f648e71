"""harness/evalfiles.py: the tables of eval.py's reports, `compare`, `score` and `baselines`."""
import json
from types import SimpleNamespace

import eval as E
from harness.evalfiles import benchmark_table, compare_runs, scores_table, visual_gain, write_reports

FACTS = {"side": {"value": "left", "phrases": {"left": ["left"], "right": ["right"]}}}


def _entry(with_facts: bool) -> dict:
    """A benchmark's summary entry (full and no-image modes) of two questions, with facts or none."""
    questions = [SimpleNamespace(id="1", answer="no", answer_type="CLOSED", facts=None),
                 SimpleNamespace(id="2", answer="left lung", answer_type="OPEN",
                                 facts=FACTS if with_facts else None)]
    modes = {mode: E.score_file([{"question_id": "1", "text": "no"}, {"question_id": "2", "text": text}], questions)
             for mode, text in (("full", "the left lung"), ("no_image", "the right lung"))}
    return {"bad_records": [], "skipped": [], "modes": modes, "visual_gain": visual_gain(modes)}


def test_facts_columns_only_for_a_benchmark_with_facts(tmp_path):
    """VQA-RAD has no facts: its table, visual-gain rows, `score` table and `compare` leave the facts
    columns out (they would always read –); the demo's test split has them: they stay, with figures."""
    for with_facts in (False, True):
        table = benchmark_table("b", _entry(with_facts)).splitlines()
        header = next(line for line in table if line.startswith("| mode |"))
        gain = next(line for line in table if line.startswith("| visual gain"))
        assert ("facts contradicted" in header) == ("facts correct" in header) == with_facts
        assert header.count("|") == gain.count("|")  # one cell per column
        assert gain.endswith("| -100.00 | +100.00 |") == with_facts  # no image says right: contradicted
        rows = {"answers": _entry(with_facts)["modes"]["full"]}
        assert ("facts" in scores_table(rows)) == with_facts
        for run in ("a", "b"):
            (tmp_path / run).mkdir(exist_ok=True)
            write_reports(tmp_path / run, {"model": "m"}, {"rad": _entry(with_facts)})
        compared = compare_runs(tmp_path / "a", tmp_path / "b")
        assert ("| full | facts correct | 100.00 | 100.00 | +0.00 |" in compared) == with_facts
        assert ("facts contradicted" in compared) == with_facts
