"""harness/rundir.py: start_run (what a run directory's record allows to resume), the reference
log-prob cache key, the matplotlib check before training, resume only from this run's checkpoints,
train.py's inputs refused as one line naming the option before anything slow."""
from __future__ import annotations

import json
import pickle
import shutil
import sys

import pytest
import torch

import train
from harness import cli, provenance, rundir
from harness.dist import Context
from harness.files import DataError
from model.loading import CheckpointError
from model.tokenizer import load_tokenizer
from test_train import config, png_bytes, workspace  # noqa: F401 (fixture)


def test_start_run_resumes_only_what_its_record_allows(tmp_path):
    """harness.rundir.start_run, as eval.py (resume when --out holds answers) and train.py
    (--resume) call it: a fresh start deletes what the record lists and records one session and what it
    writes; a resume needs the record and the same fingerprint, and adds a session and what it writes;
    no record, no resume."""
    out = tmp_path / "run"
    kw = dict(made_by="x.py", holds="answers", restart="rerun with --overwrite")
    now = provenance.fingerprint(max_new_tokens=4)
    rundir.start_run(out, now, resume=False, session={"n": 1}, writes=["answers"], **kw)
    (out / "answers").write_text("a\n")
    rundir.start_run(out, now, resume=True, session={"n": 2}, writes=["config.json"], **kw)
    assert (out / "answers").read_text() == "a\n"  # a resume deletes nothing
    record = provenance.load(out / "provenance.json")
    assert record["made_by"] == "x.py" and [s["n"] for s in record["sessions"]] == [1, 2]
    assert all(set(s) == {"started", "n"} for s in record["sessions"])
    assert record["wrote"] == ["answers", "config.json"]
    with pytest.raises(provenance.ProvenanceError, match="option max_new_tokens: 4 in the file, 5 now.*--overwrite"):
        rundir.start_run(out, provenance.fingerprint(max_new_tokens=5), resume=True, session={}, writes=[],
                         **kw)
    rundir.start_run(out, now, resume=False, session={"n": 3}, writes=["answers"], **kw)  # --overwrite
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json"]
    record = provenance.load(out / "provenance.json")
    assert [s["n"] for s in record["sessions"]] == [3] and record["wrote"] == ["answers"]
    (out / "provenance.json").unlink()
    with pytest.raises(cli.UserError, match=f"^{out} holds answers but no provenance.json, so what made them "
                       "cannot be checked; rerun with --overwrite, or choose another --out$"):
        rundir.start_run(out, now, resume=True, session={}, writes=[], **kw)


def test_a_run_deletes_or_replaces_only_what_its_record_lists(tmp_path):
    """Ownership is the record's: a run starts, resumes or starts again in a folder only when every entry
    there is listed in its provenance.json as written by the run (with the record itself, and what a kill
    left of an atomic write); anything else, a user's config.json, provenance.json or model/ folder
    included, is refused naming a few of them, and nothing is deleted or replaced."""
    out = tmp_path / "run"
    kw = dict(made_by="x.py", holds="answers", restart="rerun with --overwrite", session={})
    now = provenance.fingerprint(max_new_tokens=4)
    (out / "model").mkdir(parents=True)
    (out / "config.json").write_text("mine")
    for resume in (False, True):
        with pytest.raises(cli.UserError, match=f"^{out} holds what no provenance.json there lists as "
                           "written by a run of this project: config.json, model; move them, or choose "
                           "another --out$"):
            rundir.start_run(out, now, resume=resume, writes=["config.json"], **kw)
    (out / "provenance.json").write_text('{"format": "theirs"}')
    with pytest.raises(DataError, match="provenance.json: not a provenance record of format .*move it"):
        rundir.start_run(out, now, resume=False, writes=["config.json"], **kw)
    assert (out / "config.json").read_text() == "mine" and (out / "model").is_dir()
    assert (out / "provenance.json").read_text() == '{"format": "theirs"}'

    shutil.rmtree(out)
    rundir.start_run(out, now, resume=False, writes=["adapter", "config.json"], **kw)
    (out / "adapter").mkdir()
    (out / ".config.json.tmp123").write_text("cut short by a kill")
    for name in ("model", "notes.txt", "a.safetensors", "b.safetensors"):
        (out / name).write_text("mine")
    for resume in (False, True):
        with pytest.raises(cli.UserError, match=r"project: a.safetensors, b.safetensors, model, and 1 more; "):
            rundir.start_run(out, now, resume=resume, writes=["adapter"], **kw)
    for name in ("model", "notes.txt", "a.safetensors", "b.safetensors"):
        (out / name).unlink()
    rundir.start_run(out, now, resume=False, writes=["adapter"], **kw)  # starting again: its own, all of them
    assert [p.name for p in out.iterdir()] == ["provenance.json"]


def test_train_out_holding_a_users_folder_is_refused(workspace, tmp_path):
    """train.py --out P where P holds the user's model/ folder: refused before anything is read, with or
    without --overwrite, naming it; nothing deleted. A run's own outputs are listed in its record (a LoRA
    run: no merged/, no metrics.png without --plot), and --overwrite deletes those."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_text("weights")
    for overwrite in (False, True):
        with pytest.raises(cli.UserError, match=f"^{out} holds what no provenance.json there .*: model; "):
            train.train(config(workspace, out, epochs=1, overwrite=overwrite))
    assert (out / "model" / "model.safetensors").read_text() == "weights"
    shutil.rmtree(out / "model")
    train.train(config(workspace, out, epochs=1))
    wrote = ["adapter", "bad_records.jsonl", "checkpoints", "config.json", "metrics.jsonl"]
    assert provenance.load(out / "provenance.json")["wrote"] == wrote
    train.train(config(workspace, out, epochs=1, overwrite=True, lr=1e-3))
    assert sorted(p.name for p in out.iterdir()) == sorted(wrote + ["provenance.json"])


def test_reference_cache_key_follows_image_content(workspace, tmp_path):
    """The reference log-prob cache key changes with an image's content (not with where the
    images are), so a rewritten image gets its log-probs computed again."""
    root, ckpt, _ = workspace
    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        (images / f"img{k}.png").write_bytes((root / f"img{k}.png").read_bytes())
    cfg = config(workspace, tmp_path / "unused")
    names = [f"img{k}.png" for k in range(3)]

    def key(image_root):
        tokenizer = provenance.tokenizer(load_tokenizer(ckpt))
        now = rundir.run_fingerprint(cfg, tokenizer, image_root, names, torch.float32, Context())
        return rundir.reference_cache_key(now, cfg.negatives)

    before = key(images)
    assert key(root) == before  # the same images elsewhere
    (images / "img1.png").write_bytes(png_bytes(seed=7))
    after = key(images)
    assert after != before and after["images"] != before["images"]


def test_plot_without_matplotlib_is_an_error_before_training(monkeypatch):
    """matplotlib is a listed requirement: --plot without it stops with one clear error (naming
    --no-plot) before anything is trained, instead of skipping the plot at the end."""
    from harness import rundir
    from harness.cli import UserError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(UserError, match="--plot needs matplotlib.*--no-plot"):
        rundir.require_matplotlib()


def test_resume_only_from_a_checkpoint_of_this_run(workspace, tmp_path):
    """checkpoints/latest may name only a step-NNNNNN of this run's checkpoints/, whose trainer.pt
    records this run's fingerprint and the step of its name: another run's checkpoint, named by a
    path or copied in under an expected name, is refused naming why, and so is a trainer.pt cut
    short or holding a pickle payload (without torch's advice to pass weights_only=False)."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    train.train(config(workspace, mine, epochs=1, save_every=1, max_steps=2))  # "interrupted" after step 2
    train.train(config(workspace, other, epochs=1, save_every=1, lr=1e-3))
    ckpts = mine / "checkpoints"
    shutil.copytree(ckpts / "step-000002", tmp_path / "good")

    def refused(match):
        with pytest.raises(CheckpointError, match=match) as e:
            train.train(config(workspace, mine, epochs=1, save_every=1, resume=True))
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)

    (ckpts / "latest").write_text("../../other/checkpoints/step-000003\n")
    refused(r"latest names '\.\./\.\./other/checkpoints/step-000003', not a step-NNNNNN of .*--overwrite")
    (ckpts / "latest").write_text("step-000002\n")
    shutil.rmtree(ckpts / "step-000002")
    shutil.copytree(other / "checkpoints" / "step-000002", ckpts / "step-000002")
    refused(r"step-000002/trainer.pt is not a checkpoint of this run "
            r"\(option lr: 0.001 in the file, 0.005 now\)")
    shutil.rmtree(ckpts / "step-000002")
    shutil.copytree(ckpts / "step-000001", ckpts / "step-000002")
    refused(r"step-000002/trainer.pt is not a checkpoint of this run \(it holds step 1, its name says 2\)")
    pt = ckpts / "step-000002" / "trainer.pt"
    torch.save({"step": 2}, pt)  # written before checkpoints recorded their run
    refused(r"trainer.pt is not a checkpoint of this run \(it records no run\)")
    pt.write_bytes((tmp_path / "good" / "trainer.pt").read_bytes()[:1000])
    refused(r"trainer.pt cannot be read \(cut short\?\); rerun with --overwrite")
    pt.write_bytes(pickle.dumps(Payload()))
    refused(r"trainer.pt holds more than tensors and plain values: train.py did not write it")

    shutil.rmtree(ckpts / "step-000002")
    shutil.copytree(tmp_path / "good", ckpts / "step-000002")
    train.train(config(workspace, mine, epochs=1, save_every=1, resume=True))  # its own: continues
    lines = (mine / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("flag,what", [("--data", "missing"), ("--data", "folder"),
                                       ("--eval-data", "missing"), ("--eval-data", "folder")])
def test_data_that_is_no_file_is_one_line(workspace, tmp_path, capsys, flag, what):
    """A --data or --eval-data that is missing or a folder: exit status 2 and one line naming the
    option and the path, not a FileNotFoundError or IsADirectoryError traceback."""
    root, ckpt, prefs = workspace
    path = tmp_path / "nope.jsonl" if what == "missing" else tmp_path
    given = {"--data": str(prefs), flag: str(path)}
    argv = ["--model", str(ckpt), *[a for kv in given.items() for a in kv], "--out", str(tmp_path / "run")]
    assert cli.run_main(train.main, argv) == 2
    err = capsys.readouterr().err
    why = "file not found" if what == "missing" else "not a file"
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"error: {flag} {path}: {why}")


class Payload:
    """Unpickled, it would call print: what a malicious trainer.pt would do with os.system."""

    def __reduce__(self):
        return print, ("unpickled",)
