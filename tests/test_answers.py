"""harness/evalfiles.py: eval.py's answer files (read_answer_file beside harness.files.read_jsonl)."""
import json

import pytest

from harness import evalfiles as A
from harness.files import DataError, read_jsonl


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
    (tmp_path / "mid.jsonl").write_text('{"question_id": 1, "text": "a"}\n{oops\n{"question_id": 2, "text": "b"}\n')
    with pytest.raises(DataError, match=r"mid.jsonl:2: not a JSON line"):
        read_jsonl(tmp_path / "mid.jsonl")
