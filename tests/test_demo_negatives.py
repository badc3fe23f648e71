"""demo/negatives.py: the classes of swaps and the statistics of a preference file, on hand-made
records (the expected counts are worked out next to each record)."""
import json

import pytest

from demo import negatives


@pytest.mark.parametrize("original, replacement, expected", [
    ("▁left", "▁right", "same-slot"),
    ("▁two", "▁three", "same-slot"),
    ("▁yes", "▁no", "same-slot"),
    ("▁yes", "▁No", "same-slot"),  # any case for the replacement: the negative answers no
    ("▁X-ray", "▁MRI", "same-slot"),
    ("▁lung", "▁hemisphere", "same-slot"),
    ("▁abdomen", "▁chest.", "same-slot"),  # punctuation glued to the piece
    ("▁small", "▁large", "same-slot"),
    ("▁nodule", "▁masses", "same-slot"),
    ("▁is", "▁are", "grammar"),
    ("▁There", "▁No", "grammar"),
    ("▁No", "▁There", "grammar"),  # "No" opening a sentence is a function word ...
    ("▁No", "▁yes", "junk"),  # ... so it is not the answer "no"
    ("▁no", "▁No", "same-word"),
    ("▁abdomen", "▁abdomen.", "same-word"),
    ("▁left", "▁small", "junk"),  # another slot
    ("▁yes", "▁abdomen", "junk"),
    ("▁the", "▁right", "junk"),  # a function word outside the table
    ("▁left", "abdom", "junk"),  # a word piece of another slot
    ("▁chest", "▁abdom", "same-slot"),  # the tokenizer's first piece of "abdominal": an organ
    ("▁left", None, "junk"),
])
def test_classify(original, replacement, expected):
    assert negatives.classify(original, replacement) == expected


def _coupled(*pairs):
    return [{"position": i, "token": a, "replacement": b} for i, (a, b) in enumerate(pairs)]


def _write(path, records, rejects=(), options=None):
    """An hscr.py output: a header with every option (hscr.py's defaults unless given), then records."""
    import dataclasses

    import hscr

    options = options or {**dataclasses.asdict(hscr.Options()), "candidates": "both", "drop_positions": "renumber"}
    header = {"_header": True, "options": options}
    path.write_text("".join(json.dumps(x) + "\n" for x in [header, *records]))
    negatives.rejects_path(path).write_text("".join(json.dumps(x) + "\n" for x in rejects))


def test_summarize_counts(tmp_path):
    """Record A: swaps left→right (same-slot), the→abdomen (junk); negatives m = 1 (left→right
    only: clean) and m = 2 (with the junk: not clean). Record B: yes→No (same-slot) with one
    position unreplaced; negative m = 1: clean. Record C: is→are (grammar), There→No (grammar), no
    negatives kept. A reject with 0 negatives found and a bad-record reject (no count).
    Replaced: 5 = same-slot 2, grammar 2, junk 1. Content positions (the original in SLOTS):
    left, yes → both same-slot. Negatives per entry: 0 → 2 (C and the reject), 1 → 1 (B), 2 → 1 (A).
    Clean: 2 of 3 kept negatives."""
    path = tmp_path / "prefs.jsonl"
    _write(path, [
        {"coupled": _coupled(("▁left", "▁right"), ("▁the", "▁abdomen")), "negatives": [{"m": 1}, {"m": 2}]},
        {"coupled": _coupled(("▁yes", "▁No")), "unreplaced": [{"position": 1}], "negatives": [{"m": 1}]},
        {"coupled": _coupled(("▁is", "▁are"), ("▁There", "▁No")), "negatives": []},
    ], rejects=[{"id": "x", "category": "too few negatives", "negatives_found": 0},
                {"id": None, "category": "bad record"}])
    s = negatives.summarize(path)
    assert s.rule == "both c=10 α=0.1" and s.entries == 4
    assert s.replaced == {"same-slot": 2, "grammar": 2, "junk": 1}
    assert s.content == {"same-slot": 2} and s.share(s.content, "same-slot") == 100.0
    assert s.share(s.replaced, "junk") == 20.0
    assert s.unreplaced == 1 and s.negatives == {0: 2, 1: 1, 2: 1} and (s.kept, s.clean) == (3, 2)
    assert s.pairs[("left", "right")] == 1
    table = negatives.table([s])
    row = "| prefs.jsonl | both c=10 α=0.1 | 4 | 5 | 40.0 | 40.0 | 0.0 | 20.0 | 100.0 | 1 | 66.7 | 2 | 1 | 1 | 0 |"
    assert row in table


def test_rule_names_and_cli(tmp_path, capsys):
    """A run's name gives its rule and c, and what differs from the defaults (α, positions, ρ,
    coupling); the CLI prints one row per file; a file without a header is refused by name."""
    import dataclasses

    import hscr

    defaults = dataclasses.asdict(hscr.Options())
    one = tmp_path / "one.jsonl"
    _write(one, [{"coupled": _coupled(("▁left", "▁right")), "negatives": [{"m": 1}]}],
           options={**defaults, "num_candidates": 1, "drop_positions": "renumber"})
    new = tmp_path / "new.jsonl"
    _write(new, [], options=defaults)
    other = tmp_path / "other.jsonl"
    _write(other, [], options={**defaults, "candidates": "dropped-plausible", "alpha": 0.01, "drop_ratio": 0.9,
                               "coupling": "logprob", "drop_positions": "renumber"})
    summaries = negatives.main([str(one), str(new), str(other), "--pairs", "3"])
    out = capsys.readouterr().out
    assert [s.rule for s in summaries] == ["dropped-topk c=1", "dropped-topk c=10 positions=keep",
                                           "dropped-plausible c=10 α=0.01 ρ=0.9 coupling=logprob"]
    assert "| one.jsonl | dropped-topk c=1 | 1 | 1 | 100.0 |" in out and "left→right 1 (same-slot)" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(SystemExit, match="bad.jsonl: not an hscr.py output"):
        negatives.main([str(bad)])


def test_compare_runs_hscr_once_per_rule(tmp_path, monkeypatch, capsys):
    """compare builds one hscr.py command per chosen rule (common options, the rule's options, then
    --hscr-args) and summarizes the outputs it names."""
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        _write(tmp_path / out.split("/")[-1], [{"coupled": _coupled(("▁yes", "▁no")), "negatives": [{"m": 1}]}])

    monkeypatch.setattr(negatives.subprocess, "run", fake_run)
    summaries = negatives.main(["compare", "--out", str(tmp_path), "--rules", "dropped-topk-c1,both-c10-a0.1",
                                "--limit", "7", "--hscr-args", "--drop-positions keep"])
    assert len(calls) == 2 and len(summaries) == 2
    first = calls[0]
    assert first[first.index("--limit") + 1] == "7" and first[first.index("--min-negatives") + 1] == "0"
    assert first[-6:] == ["--candidates", "dropped-topk", "--num-candidates", "1", "--drop-positions", "keep"]
    assert "both-c10-a0.1.jsonl" in calls[1][calls[1].index("--out") + 1]
    with pytest.raises(SystemExit, match="unknown rule"):
        negatives.main(["compare", "--out", str(tmp_path), "--rules", "nope"])
