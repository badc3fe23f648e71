"""harness/files.py: the JSON readers (records, JSON lines, torn last lines), JsonlFile and merge_jsonl."""
from __future__ import annotations

import pytest

from harness import files


def test_read_json_records_keeps_u2028_and_reports_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    # A raw U+2028 inside a JSON string is legal JSON; splitlines() would cut the line there.
    p.write_text('{"a": "x\u2028y"}\n\n{bad\n{"b": 2}\n', encoding="utf-8")
    rows = files.read_json_records(p)
    assert rows[0] == (0, {"a": "x\u2028y"})
    assert rows[1][0] == 2 and isinstance(rows[1][1], files.BadLine) and "line 3" in rows[1][1].message
    assert rows[2] == (3, {"b": 2})
    q = tmp_path / "l.json"
    q.write_text('[{"a": 1}, {"b": 2}]')
    assert files.read_json_records(q) == [(0, {"a": 1}), (1, {"b": 2})]


def test_read_text_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"a": 1}\n\xff\n')
    with pytest.raises(files.DataError, match=r"bad\.jsonl.*0xff at offset 9"):
        files.read_json_records(p)


def test_read_jsonl_ignores_a_torn_last_line_and_repair_cuts_it(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert files.read_jsonl(p) == [{"a": 1}, {"b": 2}]
    assert p.read_bytes().endswith(b'{"c": ')  # reading leaves the file alone
    files.repair_torn_line(p)
    assert p.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    p.write_bytes(b'{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(files.DataError, match=r"out\.jsonl:2"):
        files.read_jsonl(p)


def test_jsonl_file_reads_then_appends_and_merge_orders(tmp_path):
    """JsonlFile: made, it only reads (the torn line stays); write() cuts it and appends a batch,
    and its ids follow. merge_jsonl: head, then each key once in `order`."""
    p = tmp_path / "rank0.jsonl"
    p.write_bytes(b'{"h": 1}\n{"id": "b", "i": 1}\n{"id": "c", "i"')
    f = files.JsonlFile(p, key=lambda r: r.get("id"))
    assert f.first == {"h": 1} and f.ids == {"b"} and p.read_bytes().endswith(b'"i"')
    f.write([{"id": "a", "i": 0}])
    assert p.read_bytes() == b'{"h": 1}\n{"id": "b", "i": 1}\n{"id": "a", "i": 0}\n' and f.ids == {"a", "b"}
    q = tmp_path / "rank1.jsonl"
    q.write_text('{"id": "c", "i": 2}\n{"id": "a", "i": 9}\n')
    files.merge_jsonl(tmp_path / "all.jsonl", [p, q], key=lambda r: r.get("id"), order=lambda r: r["i"],
                      head=[{"h": 1}])
    assert (tmp_path / "all.jsonl").read_text().splitlines() == [
        '{"h": 1}', '{"id": "a", "i": 0}', '{"id": "b", "i": 1}', '{"id": "c", "i": 2}']


def test_repair_torn_line_across_blocks(tmp_path):
    """A newline far from the end (more than 64 KiB before it), a file without any, an intact file
    and a missing one."""
    p = tmp_path / "out.jsonl"
    for data in (b"", b"a\n", b"\n", b"a\nb", b"x" * 70000 + b"\n" + b"y" * 140000, b"z" * 140000):
        p.write_bytes(data)
        files.repair_torn_line(p)
        assert p.read_bytes() == data[: data.rfind(b"\n") + 1]
    files.repair_torn_line(tmp_path / "missing.jsonl")
    assert not (tmp_path / "missing.jsonl").exists()
