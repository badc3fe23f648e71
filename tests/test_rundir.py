"""harness/rundir.py: start_run (what a run directory's record allows to resume)."""
from __future__ import annotations

import pytest

from harness import cli, provenance, rundir


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
