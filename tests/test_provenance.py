"""Tests for harness/provenance.py: content digests, their cache, and what `differences` says changed.

Reference digests are hashlib.sha256 of the bytes written, computed here independently of the
module; "cache hit" and "recompute" are told apart by counting calls of the hashing function.
"""
import hashlib
import json
import os
import stat

import pytest

from harness import provenance as P
from harness.files import DataError
from harness.cli import UserError, run_main

BIG = P.CACHE_MIN_BYTES + 12345  # large enough to be cached


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own digest cache, never the user's."""
    monkeypatch.setenv("HSCR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hashed(monkeypatch):
    """The paths provenance actually hashed (read in full), in order."""
    calls = []
    real = P._sha256

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(P, "_sha256", counting)
    return calls


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path) -> str:
    return P.fingerprint(f=P.File(path))["f"]["sha256"]


def dir_digest(path) -> dict:
    return P.fingerprint(d=P.Dir(path))["d"]["files"]


def _checkpoint(root, weights=b"w" * BIG, config=b'{"hidden_size": 8}'):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "config.json").write_bytes(config)
    (root / "notes.txt").write_text("not part of the fingerprint")
    return root


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_bytes(b'{"question_id": 1}\n')
    assert file_digest(f) == _sha(b'{"question_id": 1}\n')
    f.write_bytes(b'{"question_id": 2}\n')
    assert file_digest(f) == _sha(b'{"question_id": 2}\n')


def test_cache_hit_recompute_on_mtime_and_content(tmp_path, hashed, cache_dir):
    """A large file is hashed once; a second look with the same size and mtime is a cache hit.
    A new mtime alone forces a re-hash that finds the same digest; new content (same size, new
    mtime) gives the new digest."""
    f = tmp_path / "model.safetensors"
    data = bytes(range(256)) * (BIG // 256)
    f.write_bytes(data)
    assert file_digest(f) == _sha(data) and hashed == ["model.safetensors"]
    assert file_digest(f) == _sha(data) and len(hashed) == 1  # cache hit
    entry = json.loads((cache_dir / "fingerprints.json").read_text())[str(f.resolve())]
    st = f.stat()
    assert entry == {"size": len(data), "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                     "inode": st.st_ino, "sha256": _sha(data)}

    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, content unchanged
    assert file_digest(f) == _sha(data) and len(hashed) == 2  # recomputed, same digest
    assert file_digest(f) == _sha(data) and len(hashed) == 2  # and cached again

    changed = b"\xff" + data[1:]  # same size, other first byte
    f.write_bytes(changed)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert file_digest(f) == _sha(changed) != _sha(data) and len(hashed) == 3


def test_rewrite_with_the_mtime_restored_is_not_a_cache_hit(tmp_path, hashed):
    """Same size, mtime put back (cp -p, rsync -t, tar): in place (the ctime moves) or replaced by a
    rename (a new inode), the new bytes are hashed, never the old digest reused."""
    f = tmp_path / "model.safetensors"
    data = b"a" * BIG
    f.write_bytes(data)
    st = f.stat()
    assert file_digest(f) == _sha(data)
    in_place, renamed = b"b" * BIG, b"c" * BIG
    f.write_bytes(in_place)
    while f.stat().st_ctime_ns == st.st_ctime_ns:  # a coarse clock: wait until the ctime shows the write
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and file_digest(f) == _sha(in_place) and len(hashed) == 2
    tmp = tmp_path / ".model.safetensors.tmp"
    tmp.write_bytes(renamed)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, f)  # what rsync does; its new inode may even have the old ctime
    assert file_digest(f) == _sha(renamed) and len(hashed) == 3


def test_small_files_are_hashed_every_time_and_not_cached(tmp_path, hashed, cache_dir):
    f = tmp_path / "a.png"
    f.write_bytes(b"png")
    file_digest(f)
    file_digest(f)
    assert hashed == ["a.png", "a.png"] and not (cache_dir / "fingerprints.json").exists()


def test_cache_is_never_written_inside_a_read_only_checkpoint(tmp_path, monkeypatch, hashed):
    """With no $HSCR_CACHE the cache goes to ~/.cache/hscr, and the checkpoint directory (made
    read-only, as a shared one may be) is left exactly as it was, however often it is hashed."""
    monkeypatch.delenv("HSCR_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ckpt = _checkpoint(tmp_path / "ckpt")
    before = sorted(p.name for p in ckpt.iterdir())
    ckpt.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        first = dir_digest(ckpt)
        second = dir_digest(ckpt)
    finally:
        ckpt.chmod(stat.S_IRWXU)
    assert first == second == {"model.safetensors": _sha(b"w" * BIG), "config.json": _sha(b'{"hidden_size": 8}')}
    assert sorted(p.name for p in ckpt.iterdir()) == before
    cache = json.loads((tmp_path / "home" / ".cache" / "hscr" / "fingerprints.json").read_text())
    assert list(cache) == [str((ckpt / "model.safetensors").resolve())]
    assert hashed.count("model.safetensors") == 1  # the second look was a cache hit


def test_unwritable_or_torn_cache_still_gives_right_digests(tmp_path, monkeypatch, capsys):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * BIG)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("HSCR_CACHE", str(blocker))
    assert file_digest(f) == _sha(b"x" * BIG)
    assert "cannot write the digest cache" in capsys.readouterr().err
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "fingerprints.json").write_text('{"/x": {"size": 1, "mt')  # a kill mid-write elsewhere
    monkeypatch.setenv("HSCR_CACHE", str(torn))
    assert file_digest(f) == _sha(b"x" * BIG)
    assert str(f.resolve()) in json.loads((torn / "fingerprints.json").read_text())


def test_dir_digest_errors_name_the_directory(tmp_path):
    with pytest.raises(UserError, match="nowhere: directory not found"):
        dir_digest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no \*\.safetensors"):
        dir_digest(tmp_path / "empty")


def test_differences_name_what_changed(tmp_path):
    """Each kind of change, in the words a user reads; moving a checkpoint is not a change."""
    ckpt = _checkpoint(tmp_path / "ckpt")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"a")
    (images / "b.png").write_bytes(b"b")

    def fp(**changes):
        parts = {"model": P.Dir(ckpt), "adapter": None, "tokenizer": P.File(tok),
                 "questions rad": P.Content([["1", "a.png", "Is it?"], ["2", "b.png", "Which?"]]),
                 "images rad": P.Files(images, ["a.png", "b.png"]), "max_new_tokens": 32, "dtype": "float32"}
        return P.fingerprint(**{**parts, **changes})

    stored = fp()
    assert P.differences(stored, fp()) == []

    moved = _checkpoint(tmp_path / "elsewhere" / "ckpt")  # same bytes, other path
    assert P.differences(stored, fp(model=P.Dir(moved))) == []

    (moved / "model.safetensors").write_bytes(b"v" * BIG)
    (moved / "config.json").write_text('{"hidden_size": 9}')
    assert P.differences(stored, fp(model=P.Dir(moved))) == [
        "model weights (model.safetensors) changed", "model config (config.json) changed"]

    (moved / "model-2.safetensors").write_bytes(b"shard")
    (moved / "model.safetensors").write_bytes(b"w" * BIG)
    (moved / "config.json").write_text('{"hidden_size": 8}')
    assert P.differences(stored, fp(model=P.Dir(moved))) == ["model: model-2.safetensors is new"]

    assert P.differences(stored, fp(adapter=P.Dir(adapter))) == [f"adapter: none in the file, {adapter} now"]
    assert P.differences(fp(adapter=P.Dir(adapter)), stored) == [f"adapter: {adapter} in the file, none now"]
    assert P.differences(stored, fp(max_new_tokens=64)) == ["option max_new_tokens: 32 in the file, 64 now"]
    assert P.differences(stored, fp(dtype="bfloat16")) == ["option dtype: float32 in the file, bfloat16 now"]
    assert P.differences(stored, fp(template="x")) == ["option template: not recorded in the file, x now"]

    (images / "b.png").write_bytes(b"B")
    assert P.differences(stored, fp()) == ["images rad changed (content of some of its 2 files)"]
    assert P.differences(stored, fp(**{"images rad": P.Files(images, ["a.png"])})) == [
        "images rad changed (2 files in the file, 1 now)"]
    assert P.differences(stored, fp(**{"questions rad": P.Content([["1", "a.png", "Is it?"]])}))[0] == \
        "questions rad changed (2 items in the file, 1 now)"
    tok.write_text('{"model": {}}')
    assert "tokenizer (tokenizer.json) changed" in P.differences(stored, fp())


def test_fingerprint_survives_the_record_file(tmp_path):
    """save → load gives the same fingerprint (no differences), atomically (no temporary left)."""
    f = tmp_path / "data.jsonl"
    f.write_text("{}\n")
    now = P.fingerprint(data=P.File(f), limit=None, names=["a", "b"])
    P.save(tmp_path / "out" / "provenance.json", now, sessions=[{"batch_size": 8}])
    record = P.load(tmp_path / "out" / "provenance.json")
    assert P.differences(record["fingerprint"], now) == [] and record["sessions"] == [{"batch_size": 8}]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["provenance.json"]
    assert P.load(tmp_path / "none.json") is None
    for text in ("{", '{"format": "hscr-provenance/1"}', '{"fingerprint": {}}', "[]"):  # a user's: refused
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match="^[^\n]*bad.json: not a provenance record of format "
                           "hscr-provenance/1, so not this project's to replace: move it, or choose "
                           "another --out$"):
            P.load(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="JSON scalar or list"):
        P.fingerprint(options={"a": 1})


def test_start_continues_refuses_reuses_or_clears(tmp_path, capsys):
    """provenance.start, the one decision of every output: a resume with another fingerprint is one
    line naming each change and how to start again; without a stored fingerprint it says so; the
    same fingerprint continues (or is reused) and clears nothing; not resuming clears."""
    stored, cleared = P.fingerprint(max_new_tokens=32), []
    kw = dict(clear=lambda: cleared.append(1), unknown="x holds answers but no record",
              restart="rerun with --overwrite")
    with pytest.raises(P.ProvenanceError) as error:
        P.start(tmp_path / "run", P.fingerprint(max_new_tokens=64), stored, resume=True, **kw)
    assert isinstance(error.value, UserError)
    assert error.value.changes == ["option max_new_tokens: 32 in the file, 64 now"]
    assert "--overwrite" in str(error.value) and str(tmp_path / "run") in str(error.value)
    with pytest.raises(UserError, match="^x holds answers but no record; rerun with --overwrite, or choose"):
        P.start("run", stored, None, resume=True, **kw)
    assert P.start("run", stored, stored, resume=True, **kw) is False
    assert P.start("run", stored, stored, resume=True, reuse=lambda: True, **kw) is True
    assert P.start("run", stored, None, resume=False, rank=1, **kw) is False and cleared == []
    assert P.start("run", stored, None, resume=False, **kw) is False and cleared == [1]

    def main(argv):
        P.start("runs/x", P.fingerprint(max_new_tokens=64), stored, resume=True, **kw)

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_new_tokens: 32 in the file, 64 now" in err and "--overwrite" in err
