"""The embedded demo end to end at reduced size: `python train.py demo` (demo/run.py) on the
shipped base model and a freshly built world writes every output it promises. Also checks that the shipped
checkpoint loads through load_model and answers fluently."""
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import demo.run as run
import train
from data import load_image, preprocess_image, read_records
from demo.world import build_world
from model import load_model
from model.tokenizer import build_prompt, decode, load_tokenizer, tokenize_prompt
from test_train import HEADER, preference_records, workspace  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "assets" / "base"


def test_shipped_base_model_answers_fluently(tmp_path):
    """Greedy answers of the shipped model to test questions are well-formed words of the world:
    every open answer is non-empty text that decodes without byte pieces or unknown tokens, and
    every closed answer is "yes" or "no"."""
    size = sum(f.stat().st_size for f in BASE.iterdir())
    assert size <= 20 * 2**20, f"assets/base is {size / 2**20:.1f} MiB"
    model = load_model(BASE)
    tok = load_tokenizer(BASE)
    world = build_world(tmp_path / "world", n_sft=10, n_align=10, n_val=10, n_test=24)
    records, bad = read_records(world["test"])
    assert not bad
    c = model.config
    for r in records:
        ids = torch.tensor([tokenize_prompt(tok, build_prompt(r.question), image_token_id=c.image_token_id,
                                            num_image_tokens=c.num_image_tokens)])
        pixels = preprocess_image(load_image(world["root"] / r.image), size=c.vision.image_size)[None]
        out = model.generate(ids, pixels, max_new_tokens=32)[0].tolist()
        assert c.text.eos_token_id in out, f"{r.question!r}: no EOS within 32 tokens"
        text = decode(tok, out)
        assert text and "<0x" not in text and "<unk>" not in text
        if r.answer_type == "CLOSED":
            assert text.lower() in ("yes", "no"), (r.question, text)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """One reduced demo run (40 entries, 2 steps, 40 questions), shared by the tests below; those
    that rerun it work on a copy."""
    root = tmp_path_factory.mktemp("demo")
    cfg = run.DemoConfig(out=str(root / "run"), world=str(root / "world"), align=40, test=40, steps=2,
                         similarity="lexical")
    return cfg, run.demo(cfg)


@pytest.mark.slow
def test_demo_at_reduced_size(reduced):
    cfg, results = reduced
    out = Path(cfg.out)
    prefs = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert prefs[0]["_header"] and len(prefs) - 1 + len((out / "prefs.rejects.jsonl").read_text().splitlines()) == 40
    assert prefs[0]["options"]["score_negatives"]  # report.html shows p_rejected
    assert all(len(r["p_rejected"]) == len(r["negatives"]) for r in prefs[1:])
    assert json.loads((out / "prefs.summary.json").read_text())["entries_written"] == len(prefs) - 1
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) == 2
    for name in ("base", "hscr"):
        summary = json.loads((out / f"eval-{name}" / "summary.json").read_text())
        assert set(summary["benchmarks"]["test"]["modes"]) == {"full", "no_image", "blank_image"}
        assert summary["benchmarks"]["test"]["modes"]["full"]["n_questions"] == 40
        assert (out / f"eval-{name}" / "report.md").is_file()
    table = (out / "table.md").read_text()
    assert all(f"| {label} |" in table for label in run.DEMO_ROWS)
    assert set(results) == {"base", "hscr"}
    timings = json.loads((out / "timings.json").read_text())
    assert set(run.STAGES) | {"total"} <= set(timings) and timings["reused"] == []
    assert timings["total"] >= sum(timings[s] for s in run.STAGES) - 0.005 * len(run.STAGES)  # each rounded
    page = (out / "report.html").read_text(encoding="utf-8")
    assert all(f'id="{s}"' in page for s in ("results", "preferences", "training", "answers"))
    assert page.count('class="entry"') == 8 and "data:image/png;base64," in page


def _outputs(out: Path) -> dict[str, bytes]:
    return {p: (out / p).read_bytes() for p in ("prefs.jsonl", "train/adapter/adapter_model.safetensors",
                                                 "eval-base/test/answers.jsonl", "eval-hscr/test/answers.jsonl")}


@pytest.mark.slow
def test_rerun_reuses_what_matches_and_stops_on_a_change(reduced, tmp_path, capsys):
    """A rerun with the same options reuses every stage's output. With another learning rate it
    stops before touching anything, naming the change; with --overwrite it trains again and
    evaluates the new adapter again, and keeps the preference data and the base's answers; train.py's
    own record (train/provenance.json) holds the new fingerprint and the adapter it finished with.
    An adapter changed outside the demo is not reused; a training interrupted before its end is
    trained again, to the same adapter."""
    cfg, _ = reduced
    out = tmp_path / "run"
    shutil.copytree(cfg.out, out)
    cfg = dataclasses.replace(cfg, out=str(out))
    before = _outputs(out)
    capsys.readouterr()

    run.demo(cfg)
    assert _outputs(out) == before
    assert json.loads((out / "timings.json").read_text())["reused"] == ["train"]
    console = capsys.readouterr()
    assert all(f"[{i}/6]" in console.out for i in range(1, 7)) and "Timings" in console.out
    assert '"resolved"' not in console.out + console.err  # eval.py's options go to its config.json

    argv = ["demo", "--out", str(out), "--world", cfg.world, "--align", "40", "--test", "40", "--steps", "2",
            "--similarity", "lexical", "--lr", str(2 * cfg.lr)]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert f"option lr: {json.dumps(cfg.lr)} in the file, {json.dumps(2 * cfg.lr)} now" in err
    assert "--overwrite" in err and str(out / "train") in err
    assert _outputs(out) == before

    assert run.main(argv + ["--overwrite"]) == 0
    after = _outputs(out)
    assert after["prefs.jsonl"] == before["prefs.jsonl"]
    assert after["eval-base/test/answers.jsonl"] == before["eval-base/test/answers.jsonl"]
    assert after["train/adapter/adapter_model.safetensors"] != before["train/adapter/adapter_model.safetensors"]
    record = json.loads((out / "train" / "provenance.json").read_text())
    assert record["fingerprint"]["lr"] == 2 * cfg.lr and record["finished"]["step"] == 2
    assert record["finished"]["outputs"]["adapter"]["files"]["adapter_model.safetensors"] == hashlib.sha256(
        after["train/adapter/adapter_model.safetensors"]).hexdigest()
    assert not (out / "train-provenance.json").exists()
    evaluated = json.loads((out / "eval-hscr" / "provenance.json").read_text())["fingerprint"]["adapter"]
    assert evaluated["files"]["adapter_model.safetensors"] == hashlib.sha256(
        after["train/adapter/adapter_model.safetensors"]).hexdigest()
    console = capsys.readouterr().out
    assert f"--overwrite: {out / 'train'} was made from other inputs (option lr" in console
    assert f"--overwrite: {out / 'eval-hscr'} was made from other inputs (adapter" in console

    # An adapter written again behind the demo's back (here: its config) is not reused either.
    config = out / "train" / "adapter" / "adapter_config.json"
    written = config.read_text()
    config.write_text(written + "\n")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "adapter config (adapter_config.json) changed since train.py wrote it" in err and "--overwrite" in err

    # Interrupted (no adapter, no checkpoint, no end in the record): trained again, to the same adapter.
    config.write_text(written)
    for name in ("adapter", "checkpoints"):
        shutil.rmtree(out / "train" / name)
    record = json.loads((out / "train" / "provenance.json").read_text())
    del record["finished"]
    (out / "train" / "provenance.json").write_text(json.dumps(record))
    assert run.main(argv) == 0
    assert _outputs(out) == after
    assert json.loads((out / "timings.json").read_text())["reused"] == []
    assert "finished" in json.loads((out / "train" / "provenance.json").read_text())


def test_a_refused_rerun_leaves_demo_config_as_it_was(tmp_path, monkeypatch):
    """demo_config.json describes the outputs beside it: a rerun that a stage refuses (here hscr.py,
    made from other options) leaves the file of the run that made them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "demo_config.json").write_text("the options that made the outputs\n")

    def refuse(options):
        raise run.provenance.ProvenanceError(options.out, ["option seed: 0 in the file, 1 now"],
                                             "--overwrite")

    monkeypatch.setattr(run, "demo_world", lambda root: {"align": tmp_path, "root": tmp_path})
    monkeypatch.setattr(run.hscr, "run", refuse)
    with pytest.raises(run.provenance.ProvenanceError):
        run.demo(run.DemoConfig(out=str(out), seed=1))
    assert (out / "demo_config.json").read_text() == "the options that made the outputs\n"


def test_interrupted_training_stage_says_so(workspace, tmp_path, monkeypatch, capsys):
    """A demo killed in its training stage leaves train/ with its record but no end in it. A rerun with other
    options says that the training was interrupted and how to continue it (not only that other inputs
    made it); with the same options it continues it. The stage folder is train.py's: a file no run wrote
    there stops the demo, naming it. (hscr.py is stubbed; training is stopped as its model loads.)"""
    root, ckpt, prefs = workspace
    data = tmp_path / "prefs.jsonl"
    data.write_text(HEADER + "".join(json.dumps(r) + "\n" for r in preference_records(40)))
    monkeypatch.setattr(run, "demo_world", lambda world: {"root": root, "align": data, "test": data})
    monkeypatch.setattr(run.hscr, "run", lambda options: None)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_model", killed)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--base", str(ckpt), "--prefs", str(data), "--steps", "2"]
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    assert "finished" not in json.loads((out / "train" / "provenance.json").read_text())
    capsys.readouterr()
    assert run.main(argv + ["--lr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'train'}: a training interrupted before its end, from other inputs or options than this run " \
           "(option lr: 0.0005 in the file, 0.001 now): to continue it, rerun the demo with those of the " \
           "interrupted run; or pass --overwrite to train again with these" in err
    with pytest.raises(KeyboardInterrupt):  # the same options: continued, up to loading the model
        run.main(argv)
    (out / "train" / "notes.txt").write_text("mine")
    assert run.main(argv) == 2
    assert "lists as written by a run of this project: notes.txt" in capsys.readouterr().err


def test_demo_world_leaves_out_sft_unless_a_whole_world_is_there(tmp_path, monkeypatch):
    """demo_world builds no SFT split (only the base's training reads it), which is safe because
    each split is drawn from (seed, split) alone: a small world with and without SFT entries has
    byte-equal align, val and test files and images. A world built whole is reused as it is."""
    sizes = dict(n_align=3, n_val=2, n_test=3, size=16)
    a, b = build_world(tmp_path / "a", n_sft=4, **sizes), build_world(tmp_path / "b", n_sft=0, **sizes)
    for split in ("align", "val", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        for r in json.loads(a[split].read_text()):
            assert (a["root"] / r["image"]).read_bytes() == (b["root"] / r["image"]).read_bytes()

    calls = []
    monkeypatch.setattr(run, "build_world", lambda root, **kw: calls.append((Path(root).name, kw)))
    run.demo_world(tmp_path / "new")
    run.demo_world(tmp_path / "a")  # world.json says 4 SFT entries: a whole world
    assert calls == [("new", {"seed": 0, "n_sft": 0}), ("a", {"seed": 0})]


def _fake_results(closed: float, closed_blind: float) -> dict:
    """eval.py's per-benchmark results holding just what the ablation table reads."""
    def mode(c):
        return {"closed": {"accuracy": c, "accuracy_strict": c - 1, "hallucination_rate": 100 - c},
                "open": {"recall": c / 2}, "description": {"facts_contradicted": 100 - c, "facts_correct": c}}
    return {"modes": {"full": mode(closed), "no_image": mode(closed_blind), "blank_image": mode(closed_blind)},
            "visual_gain": {"no_image": {"closed acc": closed - closed_blind, "open recall": 1.0}}}


def test_ablation_table_means_and_base_reuse(tmp_path, monkeypatch):
    """The ablation runs every variant for every seed, evaluates the base once (later runs get its
    results), and writes mean ± sample std. With "hscr" scoring 60 and 64 closed accuracy over two
    seeds: mean 62, std sqrt(((60-62)² + (64-62)²) / 1) = 2.83; visual gain (blind 50) 10 and 14:
    12 ± 2.83. The base (50) is the same for every seed: 50 ± 0."""
    calls = []

    def fake_demo(cfg, base_results=None):
        calls.append((cfg.loss, cfg.seed, base_results is not None))
        closed = {"dpo": 55.0, "hscr": 60.0}[cfg.loss] + 4 * cfg.seed
        return {"base": base_results or _fake_results(50.0, 50.0), "hscr": _fake_results(closed, 50.0)}

    monkeypatch.setattr(run, "demo", fake_demo)
    monkeypatch.setattr(run, "ABLATION", {"dpo (1 negative)": {"loss": "dpo"}, "hscr": {}})
    table = run.ablation(run.DemoConfig(out=str(tmp_path)), seeds=[0, 1])
    assert calls == [("dpo", 0, False), ("hscr", 0, True), ("dpo", 1, True), ("hscr", 1, True)]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["hscr"][0] == "62.00 ± 2.83" and rows["hscr"][4] == "12.00 ± 2.83"
    assert rows["base"][0] == "50.00 ± 0.00" and rows["dpo (1 negative)"][0] == "57.00 ± 2.83"
    assert (tmp_path / "ablation.md").read_text().endswith(table + "\n")


def test_external_negatives_are_written_scored_and_trained_on(tmp_path, monkeypatch):
    """--negatives external: after hscr.py, the world writes PREFS.external.jsonl from the self-made
    file (the run's seed and --overwrite passed on), `hscr.py stats --external` scores it under the base
    into sampling.json (with every self-made negative's p_rejected, for report.html), and train.py
    trains on it. The ablation's variant is DPO on it."""
    out, prefs = tmp_path / "run", tmp_path / "prefs-seed3.jsonl"
    dest = tmp_path / "prefs-seed3.external.jsonl"
    rows = ({"_header": True}, {"id": "a", "p_rejected": [0.5, 0.25]})
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = {}

    def external(*args):
        calls["external"] = args
        return dest

    def train(cfg):
        calls["train"] = cfg.data
        raise KeyboardInterrupt  # stop here

    stats = {"p_chosen": 0.9, "p_rejected": 0.375, "p_external": 0.2}
    monkeypatch.setattr(run, "demo_world", lambda root: {"align": tmp_path / "align.json", "root": tmp_path})
    monkeypatch.setattr(run.hscr, "run", lambda options: {})
    monkeypatch.setattr(run, "write_external_negatives", external)
    monkeypatch.setattr(run.hscr, "main", lambda argv: calls.setdefault("stats", argv) and
                        {**stats, "p_external_each": [0.2]})
    monkeypatch.setattr(run.train, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run.demo(run.DemoConfig(out=str(out), prefs=str(prefs), seed=3, negatives="external"))
    assert calls["external"] == (prefs, tmp_path / "align.json", dest, 3, False)
    assert calls["stats"] == ["stats", str(prefs), "--external", str(dest), "--model", str(BASE),
                              "--device", "cpu", "--batch-size", "128"]
    assert calls["train"] == str(dest)
    assert json.loads((out / "sampling.json").read_text()) == {
        **stats, "each": {"self-made": [0.5, 0.25], "external": [0.2]}}
    assert run.ABLATION["dpo, external negatives"] == {"loss": "dpo", "negatives": "external"}
