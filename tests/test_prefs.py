"""harness/prefs.py: hscr.py's plumbing. The seeded sample of entries that --limit takes; a resumable
JSON-lines output with a fingerprint header, its rejects and summary, rank files merged in index order.
hscr.py's end-to-end runs (tests/test_hscr.py) check the same on real records: kill and resume byte for
byte, torchrun's merge, --overwrite."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import prefs
from harness.cli import UserError
from harness.prefs import Output, Reject
from harness.provenance import ProvenanceError

FINGERPRINT = {"data": {"kind": "content", "n": 6, "sha256": "ab"}, "batch_size": 2}
HEADER = prefs.header_record({"batch_size": 2}, FINGERPRINT)
IDS = [f"e{i}" for i in range(6)]


def _compute(calls: list):
    """A job: entry k → a record {"id", "index", "negatives": k % 3 of them}; e3 is rejected."""
    def compute(batch):
        calls.append([IDS[k] for k in batch])
        return [Reject(k, IDS[k], "odd", "e3 is odd") if IDS[k] == "e3"
                else {"id": IDS[k], "index": k, "negatives": [k] * (k % 3)} for k in batch]
    return compute


def _run(out: Path, header=HEADER, calls=None, **kw) -> dict:
    calls = [] if calls is None else calls
    return Output(out, header, **kw).run_batches(IDS, 2, _compute(calls))


def test_run_writes_header_records_rejects_and_summary(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    summary = _run(out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == HEADER and [r["id"] for r in lines[1:]] == ["e0", "e1", "e2", "e4", "e5"]
    assert json.loads(prefs.sidecar(out, "rejects").read_text()) == {
        "index": 3, "id": "e3", "category": "odd", "reason": "e3 is odd"}
    assert summary["entries_written"] == 5 and summary["skipped"] == {"odd": 1}
    assert summary["negatives"] == {"3": 0, "2": 2, "1": 2, "0": 1}  # e0 e1 e2 e4 e5: 0 1 2 1 2
    assert json.loads(prefs.sidecar(out, "summary").read_text()) == summary
    assert (f"hscr: 5 entries in {out} (by number of negatives 3: 0, 2: 2, 1: 2, 0: 1); skipped 1 (odd: 1)"
            in capsys.readouterr().out)


def test_resume_computes_a_batch_with_a_missing_record_whole(tmp_path):
    """Killed after e0, e1, e2 and half of e4's line: the batch [e2, e3] is done (e3 rejected),
    [e4, e5] is computed again whole and only its records are written; the file equals an
    uninterrupted run's."""
    full, out = tmp_path / "full.jsonl", tmp_path / "o.jsonl"
    _run(full)
    lines = full.read_text().split("\n")
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:7])
    prefs.sidecar(out, "rejects").write_text(prefs.sidecar(full, "rejects").read_text())
    calls = []
    summary = _run(out, calls=calls)
    assert calls == [["e4", "e5"]] and summary["processed_this_run"] == 2
    assert out.read_text() == full.read_text()


def test_refusals_change_nothing(tmp_path):
    """Another fingerprint, a header without one, a file without header, rejects without their
    output: each is one line naming the file, and nothing is modified (not even the torn line)."""
    out = tmp_path / "o.jsonl"
    _run(out)
    with open(out, "a") as f:
        f.write('{"id": "e9", "ind')  # a kill mid-write
    before = out.read_bytes()
    other = prefs.header_record({"batch_size": 3}, {**FINGERPRINT, "batch_size": 3})
    with pytest.raises(ProvenanceError, match="option batch_size: 2 in the file, 3 now.*--overwrite"):
        Output(out, other)
    assert out.read_bytes() == before
    lines = out.read_text().split("\n")
    no_fingerprint = json.dumps({prefs.HEADER_KEY: True, "options": {}})
    out.write_text("\n".join([no_fingerprint] + lines[1:]))
    before = out.read_bytes()
    with pytest.raises(UserError, match=r"not an hscr\.py output \(its header holds no fingerprint\).*--overwrite"):
        Output(out, HEADER)
    assert out.read_bytes() == before
    out.write_text("\n".join(lines[1:]))
    with pytest.raises(UserError, match="does not start with an hscr.py header"):
        Output(out, HEADER)
    out.unlink()
    with pytest.raises(UserError, match="holds rejects but .* is gone"):
        Output(out, HEADER)
    for err in (ProvenanceError, UserError):
        assert issubclass(err, UserError)  # one line on stderr from the command line


def test_header_only_starts_again_and_overwrite_clears(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps(prefs.header_record({}, {"other": 1})) + "\n")
    _run(out)  # nothing computed in it: started again with this job's header
    assert json.loads(out.read_text().split("\n")[0]) == HEADER
    stale = [prefs.shard_path(out, 1, 2), prefs.sidecar(prefs.shard_path(out, 0, 3), "rejects"),
             tmp_path / "other.rank0-of-2.jsonl"]
    for p in stale:
        p.write_text("{}\n")
    other = prefs.header_record({"batch_size": 3}, {**FINGERPRINT, "batch_size": 3})
    calls = []
    Output(out, other, overwrite=True).run_batches(IDS, 3, _compute(calls))
    assert calls == [IDS[:3], IDS[3:]] and json.loads(out.read_text().split("\n")[0]) == other
    assert [p.exists() for p in stale] == [False, False, True]  # another output's rank file stays


def test_merge_orders_by_index_and_refuses_other_fingerprints(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    single = tmp_path / "single.jsonl"
    _run(single)
    records = [json.loads(x) for x in single.read_text().splitlines()[1:]]
    for rank in range(2):
        p = prefs.shard_path(out, rank, 2)
        p.write_text("".join(json.dumps(x) + "\n" for x in [HEADER] + records[rank::2]))
    prefs.sidecar(prefs.shard_path(out, 1, 2), "rejects").write_text(
        prefs.sidecar(single, "rejects").read_text())
    summary = prefs.merge_main(["--out", str(out), "--world-size", "2"])
    assert out.read_text() == single.read_text() and summary["entries_written"] == 5
    assert prefs.sidecar(out, "rejects").read_text() == prefs.sidecar(single, "rejects").read_text()
    out.unlink()
    other = prefs.header_record({}, {**FINGERPRINT, "batch_size": 3})
    prefs.shard_path(out, 1, 2).write_text(json.dumps(other) + "\n")
    with pytest.raises(UserError, match="rank 1 ran with other inputs or options than rank 0: option batch_size"):
        prefs.merge_shards(out, 2)
    prefs.shard_path(out, 1, 2).write_text(json.dumps({prefs.HEADER_KEY: True}) + "\n")
    with pytest.raises(UserError, match="rank1-of-2.jsonl does not start with an hscr.py header holding a fingerprint"):
        prefs.merge_shards(out, 2)
    prefs.shard_path(out, 1, 2).unlink()
    with pytest.raises(UserError, match="missing rank files"):
        prefs.merge_shards(out, 2)
    assert not out.exists()


def test_negatives_histogram():
    records = [{"negatives": [1, 2, 3]}, {"negatives": [1]}, {"negatives": [1]}]
    rejects = [{"negatives_found": 0}, {"category": "missing image"}, {"negatives_found": 4}]
    assert prefs.negatives_histogram(records, rejects) == {"4": 1, "3": 1, "2": 0, "1": 2, "0": 1}


def test_select_entries_seeded_sample():
    assert prefs.select_entries(5, None, 0) == [0, 1, 2, 3, 4] and prefs.select_entries(5, 9, 0) == [0, 1, 2, 3, 4]
    s = prefs.select_entries(100, 10, 0)
    assert s == sorted(s) and len(set(s)) == 10 and s == prefs.select_entries(100, 10, 0)
    assert s != prefs.select_entries(100, 10, 1)
