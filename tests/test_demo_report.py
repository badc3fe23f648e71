"""demo/report.py: report.html from a small hand-made run directory (the files the demo's stages
write, with known scores), so that every figure on the page can be derived by hand. The demo's
end-to-end test (tests/test_demo_run.py) checks that a real run writes the page too."""
import base64
import io
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.cli import UserError
from demo import report
from model.tokenizer import load_tokenizer, tokenize_response

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "assets" / "base"
LONG = "There is one small nodule in the left lung."


def _png(path: Path, shade: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path)


def _jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_run(tmp_path: Path, candidates: bool = True) -> Path:
    """A run directory as demo/run.py leaves it, small: 2 preference entries, 3 training steps,
    3 test questions answered by both models.

    Entry a-0, y_w = LONG, tokenized by the shipped tokenizer into 9 pieces
    (▁There ▁is ▁one ▁small ▁nodule ▁in ▁the ▁left ▁lung.): s_t stored for positions 3 (2.0),
    4 (0.5), 7 (−1.0), replaced (`coupled`, by descending score as hscr.py writes it), and 0
    (0.25), left unreplaced. Entry a-1, y_w = "yes":
    position 0 (0.1), with two stored candidates when `candidates`."""
    world, run = tmp_path / "world", tmp_path / "run"
    tok = load_tokenizer(BASE)
    ids = tokenize_response(tok, LONG, eos_token_id=None)
    piece = tok.id_to_token
    for i in range(2):
        _png(world / "images" / f"a-{i}.png", 40 + 80 * i)
    for i in range(3):
        _png(world / "images" / f"t-{i}.png", 200 - 50 * i)
    header = {"_header": True, "options": {"model": str(BASE), "tokenizer": str(BASE), "image_root": str(world),
                                           "top_n": 10, "num_candidates": 2}}

    def coupled(pos, score, replacement):
        return {"position": pos, "token": piece(ids[pos]), "token_id": ids[pos], "score": score,
                "replacement": replacement, "replacement_id": tok.token_to_id(replacement)}

    long_entry = {
        "id": "a-0", "index": 0, "image": "images/a-0.png", "question": "What abnormality is seen?",
        "chosen": LONG, "chosen_ids": ids,
        "coupled": [coupled(3, 2.0, "▁large"), coupled(4, 0.5, "▁mass"), coupled(7, -1.0, "▁right")],
        "unreplaced": [{"position": 0, "token": piece(ids[0]), "token_id": ids[0], "score": 0.25}],
        "negatives": [{"text": "There is one large nodule in the left lung.", "similarity": 0.9, "m": 1},
                      {"text": "There is one large nodule in the right lung.", "similarity": 0.7, "m": 2,
                       "complete": False}],
        "p_chosen": 0.91, "p_rejected": [0.6, 0.3]}
    yes = {"position": 0, "token": "▁yes", "token_id": 325, "score": 0.1, "replacement": "▁no",
           "replacement_id": 321}
    if candidates:
        yes["candidates"] = [{"token": "▁no", "token_id": 321, "p_diff": 0.01},
                             {"token": "▁left", "token_id": 340, "p_diff": 0.25}]
    short_entry = {"id": "a-1", "index": 1, "image": "images/a-1.png", "question": "Is there a nodule?",
                   "chosen": "yes", "coupled": [yes], "unreplaced": [],
                   "negatives": [{"text": "no", "similarity": 0.0, "m": 1}], "p_chosen": 0.95, "p_rejected": [0.5]}
    _jsonl(run / "prefs.jsonl", [header, long_entry, short_entry])
    (run / "prefs.summary.json").write_text(json.dumps(
        {"entries_written": 2, "negatives": {"3": 0, "2": 1, "1": 1, "0": 0}, "skipped": {}}))
    _jsonl(run / "train" / "metrics.jsonl", [
        {"step": s, "loss": 2.0 / s, "margin": 0.1 * s, "accuracy_explicit": 0.3 * s, "reward_chosen": 0.01 * s,
         "reward_rejected_1": -0.05 * s, "lr": 1e-3} for s in (1, 2, 3)])
    questions = [("t-0", "Is there a nodule?", "yes", "CLOSED"), ("t-1", "Where is the mass?", "left lung", "OPEN"),
                 ("t-2", "Is this an MRI?", "no", "CLOSED")]
    (world / "test.json").write_text(json.dumps([
        {"id": q, "image": f"images/{q}.png", "answer_type": kind,
         "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]}
        for q, text, answer, kind in questions]))
    for name, answers in (("base", ["no", "left lung", "no"]), ("hscr", ["yes", "left lung", "no"])):
        d = run / f"eval-{name}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"benchmark": [f"test={world / 'test.json'}"],
                                                   "image_root": [str(world)]}))
        _jsonl(d / "test" / "answers.jsonl", [{"question_id": q, "text": a, "metadata": {"mode": "full"}}
                                              for (q, *_), a in zip(questions, answers)])
    (run / "table.md").write_text("| metric | base | HSCR | Δ |\n|---|---:|---:|---:|\n"
                                  "| closed accuracy | 50.00 | 100.00 | +50.00 |\n")
    (run / "timings.json").write_text(json.dumps({"world": 1.0, "hscr": 2.0, "total": 3.5, "reused": ["hscr"]}))
    (run / "demo_config.json").write_text(json.dumps({"prefs": None, "seed": 0}))
    return run


def test_token_shade_by_hand():
    """Opacity 0.75 · min(1, |s| / scale), warm for s ≥ 0, cool below: with scale 2.0,
    s = 2.0 → 0.75, s = −1.0 → 0.375 (cool), s = 0.5 → 0.1875, s = 4.0 → capped at 0.75,
    s = 0 → 0 (warm, invisible); scale 0 (no score on the page) → 0."""
    assert report.token_shade(2.0, 2.0) == (report.POSITIVE, 0.75)
    assert report.token_shade(-1.0, 2.0) == (report.NEGATIVE, 0.375)
    assert report.token_shade(0.5, 2.0) == (report.POSITIVE, 0.1875)
    assert report.token_shade(4.0, 2.0) == (report.POSITIVE, 0.75)
    assert report.token_shade(0.0, 2.0) == (report.POSITIVE, 0.0)
    assert report.token_shade(1.0, 0.0)[1] == 0.0


def test_sample_entries_favours_several_coupled_positions():
    """8 of 50 one-token entries and 10 longer ones (5 × 2, 3 × 3, 2 × 10 positions): 8 // 4 = 2
    short ones, then 6 long ones spread evenly over the 10 sorted by size, indices
    round(i · 9 / 5) = 0, 2, 4, 5, 7, 9 → sizes 2, 2, 2, 3, 3, 10. With only 3 long entries the
    short ones fill in (5 + 3)."""
    sizes = [1] * 50 + [2] * 5 + [3] * 3 + [10] * 2
    records = [{"index": i, "coupled": [{}] * k} for i, k in enumerate(sizes)]
    assert [len(r["coupled"]) for r in report.sample_entries(records, 8)] == [1, 1, 2, 2, 2, 3, 3, 10]
    records = [{"index": i, "coupled": [{}] * k} for i, k in enumerate([1] * 50 + [3] * 3)]
    assert [len(r["coupled"]) for r in report.sample_entries(records, 8)] == [1] * 5 + [3] * 3


def test_word_diff_marks_words_not_in_the_reference():
    assert report.word_diff("There is one large nodule", "There is one small nodule") == \
        "There is one <mark>large</mark> nodule"
    assert report.word_diff("a <b>", "a") == "a <mark>&lt;b&gt;</mark>"


def test_report_sections_images_and_shading(tmp_path):
    """The shading of a-0 follows its scores: the largest |s_t| of the page is 2.0, so (as in
    test_token_shade_by_hand) position 3 "▁small" gets warm 0.75, 7 "▁left" cool 0.375,
    4 "▁nodule" warm 0.1875, 0 "▁There" (unreplaced) warm 0.75 · 0.25 / 2 = 0.09375; a-1's "▁yes"
    (0.1) warm 0.0375. The other 5 tokens of a-0 have no score: no background. Ranks by score:
    small 1, nodule 2, There 3, left 4."""
    run = make_run(tmp_path)
    path = report.write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    for section in ("results", "preferences", "training", "answers"):
        assert f'id="{section}"' in page

    # Self-contained: no script, stylesheet link or address outside the page.
    assert not re.search(r"<script|<link|https?://|url\(", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 + 3 + 1  # alignment entries, test questions, training curves
    sizes = {Image.open(io.BytesIO(base64.b64decode(b))).size for b in images}
    assert (8, 8) in sizes and any(w > 500 for w, _ in sizes)  # the scans as they are; the curves

    spans = re.findall(r'<span class="tok coupled( unreplaced)?" data-score="([^"]+)" '
                       r'style="background:rgba\((\d+),(\d+),(\d+),([0-9.]+)\)" title="position (\d+)[^"]*">'
                       r"([^<]*)<sup>(\d+)</sup>", page)
    shaded = {(int(pos), text): (float(score), (int(r), int(g), int(b)), float(a), int(rank), bool(unrep))
              for unrep, score, r, g, b, a, pos, text, rank in spans}
    warm, cool = report.POSITIVE, report.NEGATIVE
    assert shaded == {
        (3, " small"): (2.0, warm, 0.75, 1, False),
        (4, " nodule"): (0.5, warm, 0.1875, 2, False),
        (0, " There"): (0.25, warm, 0.09375, 3, True),
        (7, " left"): (-1.0, cool, 0.375, 4, False),
        (0, " yes"): (0.1, warm, 0.0375, 1, False),
    }
    plain = re.findall(r'<span class="tok" title="position (\d+): not among the top n', page)
    assert sorted(map(int, plain)) == [1, 2, 5, 6, 8]

    # Candidate m replaces the m highest-scoring replaced positions: "▁left" (third) is in m ≥ 3,
    # "▁There" (unreplaced) in none.
    assert re.search(r"<td>4</td><td>7</td><td> left</td><td>-1.0000</td><td> right</td><td>3</td>", page)
    assert re.search(r"<td>3</td><td>0</td><td> There</td><td>0.2500</td><td>.*?none \(no candidate\).*?</td>"
                     r"<td>–</td>", page)
    # Candidates with P_diff, shown when stored (the winner in bold); the missing-field note is not.
    assert "<b> no (0.0100)</b>,  left (0.2500)" in page
    assert "would need <code>candidates" not in page
    # Negatives: what differs from y_w is marked; a cut continuation says so.
    assert "There is one <mark>large</mark> nodule in the left lung." in page
    assert "<mark>right</mark>" in page and "cut at max_new_tokens" in page
    # Answers: the changed one first, scored: t-0 ground truth yes, base "no" ✗, aligned "yes" ✓.
    rows = re.findall(r"<tr( class=\"changed\")?><td><img.*?</tr>", page, re.S)
    assert len(rows) == 3 and rows[0].startswith(' class="changed"')
    assert re.search(r'no <span class="bad">✗</span></td><td>yes <span class="ok">✓</span>', page)
    assert "recall 100%" in page
    # Results: the table and the timings.
    assert "<td>+50.00</td>" in page and "<td>2.0 s (reused)</td>" in page


def test_report_says_which_field_candidates_would_need(tmp_path):
    run = make_run(tmp_path, candidates=False)
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "would need <code>candidates: [{token, token_id, p_diff}]</code>" in page
    assert "only for the top n = 10 positions" in page


def test_missing_matplotlib_is_an_error(tmp_path, monkeypatch):
    """matplotlib is a listed requirement: without it the report stops and says so."""
    run = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(UserError, match="matplotlib.*requirements.txt"):
        report.write_report(run)
    assert not (run / "report.html").exists()
    assert any(line.split("=")[0].split(">")[0].strip() == "matplotlib"
               for line in (ROOT / "requirements.txt").read_text().splitlines())


def test_cli(tmp_path, capsys):
    run = make_run(tmp_path)
    assert report.main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_sampling_probability_histograms(tmp_path, monkeypatch):
    """With sampling.json (a run with --negatives external) the preference section draws the two
    histograms, self-made and external negatives on the same bins of width 0.05, each with its mean
    and the chosen answers' mean, and states the three means."""
    run = make_run(tmp_path)
    each = {"self-made": [0.6, 0.3, 0.5], "external": [0.2, 0.3]}
    (run / "sampling.json").write_text(json.dumps({"p_chosen": 0.93, "p_rejected": 0.4667, "p_external": 0.25,
                                                   "each": each}))
    drawn = []
    from matplotlib.axes import Axes
    monkeypatch.setattr(Axes, "hist", lambda ax, values, bins, **kw: drawn.append((values, bins)))
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "<h3>Sampling probability: self-made vs external negatives</h3>" in page
    assert "chosen 0.930, self-made negatives 0.467, external 0.250" in page
    assert re.search(r'alt="sampling probability" src="data:image/png;base64,', page)
    assert [values for values, _ in drawn] == [[0.6, 0.3, 0.5], [0.2, 0.3]]
    assert drawn[0][1] == drawn[1][1] == pytest.approx([i * 0.05 for i in range(21)])
