"""harness/evalfiles.py: eval.py's question files (in each layout, on tests/test_eval.py's tiny question
files), its answer files (read_answer_file beside harness.files.read_jsonl) and the tables of its reports,
`compare`, `score` and `baselines`."""
import json
import shutil
from types import SimpleNamespace

import pytest

import eval as E
from harness import evalfiles as A
from harness.cli import UserError
from harness.evalfiles import (benchmark_table, check_images, compare_runs, read_benchmarks, scores_table,
                               visual_gain, write_reports)
from harness.files import DataError, read_jsonl
from test_eval import QUESTIONS, tiny  # noqa: F401 (fixture)


# Question files and images
def _fields(records):
    return [(r.id, r.image, r.question, r.answer, r.answer_type) for r in records]


def test_formats_read_into_the_same_questions(tiny):
    """test.json (with the `conversatons` misspelling), question JSONL with inline answers, and
    question JSONL with answers in another file give the same questions; the malformed line is
    reported with its file and index."""
    b = read_benchmarks([f"json={tiny.root / 'test.json'}", f"jsonl={tiny.root / 'questions.jsonl'}",
                         f"split={tiny.root / 'questions_only.jsonl'}"],
                        [f"split={tiny.root / 'answers.jsonl'}"])
    expected = [(str(i), im, q, a, t) for i, im, q, a, t in QUESTIONS]
    for name in ("json", "jsonl", "split"):
        assert _fields(b[name][0]) == expected, name
    assert b["json"][1] == [] and b["split"][1] == []
    (bad,) = b["jsonl"][1]
    assert bad.file == str(tiny.root / "questions.jsonl") and bad.index == 2


def test_check_images_opens_the_images_of_its_share_only(tiny, tmp_path):
    """Missing images stop every process alike; an image that exists but cannot be used is found by the
    process that answers its question (records rank, rank + world, …), which skips it."""
    images = tmp_path / "images"
    shutil.copytree(tiny.images, images)
    (images / "b.png").write_bytes(b"")  # questions 12 and 15, at positions 1 and 4
    records = read_benchmarks([f"q={tiny.root / 'test.json'}"])["q"][0]
    empty = "image b.png: empty file"
    assert check_images(records, str(images), "q", "test.json") == {"12": empty, "15": empty}
    assert check_images(records, str(images), "q", "test.json", rank=0, world=2) == {"15": empty}
    assert check_images(records, str(images), "q", "test.json", rank=1, world=2) == {"12": empty}
    (images / "c.png").unlink()
    missing = r"1 of 3 images not found .*\(needed by 1 of 5 questions\): c.png$"
    for rank in (0, 1):
        with pytest.raises(UserError, match=missing):
            check_images(records, str(images), "q", "test.json", rank=rank, world=2)


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".", "..", "/tmp/x"])
def test_benchmark_name_is_a_plain_name(tiny, tmp_path, name):
    """A benchmark's name is a folder of eval.py's --out: one that is not a plain name (a path
    that would put the answers outside --out) is refused before anything is written."""
    args = ["--model", str(tiny.ckpt), "--benchmark", f"{name}={tiny.root / 'test.json'}",
            "--image-root", str(tiny.images), "--out", str(tmp_path / "run" / "out")]
    with pytest.raises(UserError, match=f"--benchmark '{name}=.*': NAME must be a plain name"):
        E.main(args)
    assert not (tmp_path / "run").exists()


# Answer files
def test_answer_files_split_on_newlines_only(tmp_path):
    """A raw U+2028 inside an answer (json.dumps(..., ensure_ascii=False) writes it as is) stays in
    its line; str.splitlines() would cut the line there and lose both halves."""
    path = tmp_path / "answers.jsonl"
    rows = [{"question_id": 1, "text": "left\u2028lung"}, {"question_id": 2, "text": "no"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path) == rows == A.read_answer_file(path)
    path.write_text(path.read_text(encoding="utf-8") + '{"question_id": 3, "te', encoding="utf-8")
    assert read_jsonl(path) == rows  # a torn last line: ignored (answered again)
    with pytest.raises(DataError, match=r"answers.jsonl: line 3 is not valid JSON"):
        A.read_answer_file(path)  # in a file from elsewhere, it is an error naming the line
    (tmp_path / "mid.jsonl").write_text('{"question_id": 1, "text": "a"}\n{oops\n'
                                        '{"question_id": 2, "text": "b"}\n')
    with pytest.raises(DataError, match=r"mid.jsonl:2: not a JSON line"):
        read_jsonl(tmp_path / "mid.jsonl")


# Tables
FACTS = {"side": {"value": "left", "phrases": {"left": ["left"], "right": ["right"]}}}


def _entry(with_facts: bool) -> dict:
    """A benchmark's summary entry (full and no-image modes) of two questions, with facts or none."""
    questions = [SimpleNamespace(id="1", answer="no", answer_type="CLOSED", facts=None),
                 SimpleNamespace(id="2", answer="left lung", answer_type="OPEN",
                                 facts=FACTS if with_facts else None)]
    modes = {mode: E.score_file([{"question_id": "1", "text": "no"}, {"question_id": "2", "text": text}],
                                questions)
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
