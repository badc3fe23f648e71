"""harness/ (the CLI builder, JSON readers, run_main) and the small helpers beside the model (dtype names, left padding)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from harness import cli, files, provenance, rundir
from model.llava import left_pad
from model.loading import resolve_dtype
from harness.cli import option


@dataclass
class _Cfg:
    name: str = option(help="a required name", required=True)
    ratio: float | None = option(None, "an optional float")
    steps: int | None = option(None, "an optional int")
    size: int = option(3, "an int with a default")
    flag: bool = option(True, "a switch")
    files: list[str] = option(help="repeatable", default_factory=list)


def test_parser_types_and_defaults():
    p = cli.dataclass_parser(_Cfg)
    args = vars(p.parse_args(["--name", "x", "--ratio", "0.5", "--steps", "7", "--no-flag",
                              "--files", "a", "--files", "b"]))
    cfg = _Cfg(**args)
    # `float | None` parses as float (a string here was the bug the helper replaces).
    assert cfg.ratio == 0.5 and isinstance(cfg.ratio, float)
    assert cfg.steps == 7 and cfg.size == 3 and cfg.flag is False and cfg.files == ["a", "b"]
    assert _Cfg(**vars(p.parse_args(["--name", "x"]))).ratio is None
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required


def test_help_shows_each_default_once():
    text = cli.dataclass_parser(_Cfg).format_help()
    assert text.count("(default: 3)") == 1
    assert "(default: None)" not in text


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[], [1]], pad_id=9)
    assert ids.tolist() == [[9], [1]] and mask.tolist() == [[0], [1]]


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cuda", gpu_default="float16") is torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")


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
    """The file is read from its end a block (64 KiB) at a time: a newline in an earlier block, a
    file without any, an intact file and a missing one."""
    p = tmp_path / "out.jsonl"
    for data in (b"", b"a\n", b"\n", b"a\nb", b"x" * 70000 + b"\n" + b"y" * 140000, b"z" * 140000):
        p.write_bytes(data)
        files.repair_torn_line(p)
        assert p.read_bytes() == data[: data.rfind(b"\n") + 1]
    files.repair_torn_line(tmp_path / "missing.jsonl")
    assert not (tmp_path / "missing.jsonl").exists()


def test_run_main_one_line_for_expected_errors(capsys):
    def main(argv):
        raise cli.UserError("data.json: record 3 has no image")

    assert cli.run_main(main, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("error: data.json: record 3 has no image")
    with pytest.raises(cli.UserError):
        cli.run_main(main, ["--debug"])

    def buggy(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):  # unexpected errors keep their traceback
        cli.run_main(buggy, [])


def test_start_run_resumes_only_what_its_record_allows(tmp_path):
    """harness.rundir.start_run, as eval.py (resume when --out holds answers) and train.py
    (--resume) call it: a fresh start clears the script's outputs and records one session; a
    resume needs the record and the same fingerprint, and adds a session; no record, no resume."""
    out, cleared = tmp_path / "run", []
    kw = dict(clear=cleared.append, made_by="x.py", holds="answers", restart="rerun with --overwrite")
    now = provenance.fingerprint(max_new_tokens=4)
    rundir.start_run(out, now, resume=False, session={"n": 1}, **kw)
    assert cleared == [out]
    rundir.start_run(out, now, resume=True, session={"n": 2}, **kw)
    assert cleared == [out]  # a resume clears nothing
    record = provenance.load(out / "provenance.json")
    assert record["made_by"] == "x.py" and [s["n"] for s in record["sessions"]] == [1, 2]
    assert all(set(s) == {"started", "n"} for s in record["sessions"])
    with pytest.raises(provenance.ProvenanceError, match="option max_new_tokens: 4 in the file, 5 now.*--overwrite"):
        rundir.start_run(out, provenance.fingerprint(max_new_tokens=5), resume=True, session={}, **kw)
    (out / "provenance.json").unlink()
    with pytest.raises(cli.UserError, match=f"^{out} holds answers but no provenance.json, so what made them "
                       "cannot be checked; rerun with --overwrite, or choose another --out$"):
        rundir.start_run(out, now, resume=True, session={}, **kw)
    assert cleared == [out] and not (out / "provenance.json").exists()
    rundir.start_run(out, now, resume=False, session={"n": 3}, **kw)  # what --overwrite does
    assert [s["n"] for s in provenance.load(out / "provenance.json")["sessions"]] == [3]
