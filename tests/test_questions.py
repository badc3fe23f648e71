"""harness/questions.py: eval.py's question files, read in each layout (on tests/test_eval.py's
tiny question files)."""
from harness.questions import read_benchmarks
from test_eval import QUESTIONS, tiny  # noqa: F401 (fixture)


def _fields(records):
    return [(r.id, r.image, r.question, r.answer, r.answer_type) for r in records]


def test_formats_read_into_the_same_questions(tiny):
    """test.json (with the `conversatons` misspelling), question JSONL with inline answers, and
    question JSONL with answers in another file give the same questions; the malformed line is
    reported with its file and index."""
    b = read_benchmarks([f"json={tiny.root / 'test.json'}", f"jsonl={tiny.root / 'questions.jsonl'}",
                         f"split={tiny.root / 'questions_only.jsonl'}"], [f"split={tiny.root / 'answers.jsonl'}"])
    expected = [(str(i), im, q, a, t) for i, im, q, a, t in QUESTIONS]
    for name in ("json", "jsonl", "split"):
        assert _fields(b[name][0]) == expected, name
    assert b["json"][1] == [] and b["split"][1] == []
    (bad,) = b["jsonl"][1]
    assert bad.file == str(tiny.root / "questions.jsonl") and bad.index == 2
