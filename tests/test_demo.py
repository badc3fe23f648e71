"""The embedded demo end to end at reduced size: `python train.py demo` (demo/run.py) on the
shipped base model and a freshly built world writes every output it promises. Also checks that the shipped
checkpoint loads through load_model and answers fluently."""
import json
from pathlib import Path

import torch

import demo.run as run
from data import load_image, preprocess_image, read_records
from demo.world import build_world
from model import load_model
from model.tokenizer import build_prompt, decode, load_tokenizer, tokenize_prompt

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


def test_demo_at_reduced_size(tmp_path):
    out = tmp_path / "run"
    results = run.demo(run.DemoConfig(out=str(out), world=str(tmp_path / "world"), align=40, test=40, steps=2,
                                      similarity="lexical"))
    prefs = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert prefs[0]["_header"] and len(prefs) - 1 + len((out / "prefs.rejects.jsonl").read_text().splitlines()) == 40
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
