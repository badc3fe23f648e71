"""harness/evalfiles.py: eval.py's question files, read in each layout (on tests/test_eval.py's
tiny question files)."""
import pytest

import eval as E
from harness.cli import UserError
from harness.evalfiles import check_images, read_benchmarks
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


def test_check_images_opens_the_images_of_its_share_only(tiny, tmp_path):
    """Missing images stop every process alike; an image that exists but cannot be used is found by the
    process that answers its question (records rank, rank + world, …), which skips it."""
    import shutil

    import pytest

    from harness.cli import UserError

    images = tmp_path / "images"
    shutil.copytree(tiny.images, images)
    (images / "b.png").write_bytes(b"")  # questions 12 and 15, at positions 1 and 4
    records = read_benchmarks([f"q={tiny.root / 'test.json'}"])["q"][0]
    empty = "image b.png: empty file"
    assert check_images(records, str(images), "q", "test.json") == {"12": empty, "15": empty}
    assert check_images(records, str(images), "q", "test.json", rank=0, world=2) == {"15": empty}
    assert check_images(records, str(images), "q", "test.json", rank=1, world=2) == {"12": empty}
    (images / "c.png").unlink()
    for rank in (0, 1):
        with pytest.raises(UserError, match=r"1 of 3 images not found .*\(needed by 1 of 5 questions\): c.png$"):
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
