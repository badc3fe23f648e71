"""model/rows.py: greedy_continuations against rows generated one at a time (on tests/test_hscr.py's
tiny checkpoint and entries), and collate's packed rows against rows run alone."""
from __future__ import annotations

from pathlib import Path

import torch

import hscr
import tiny
from data import Example
from model import load_model
from model.rows import collate, cut_generated
from test_hscr import EOS, _entries, _opts, ckpt, dataset, model, tokenizer  # noqa: F401 (fixtures)
from test_model import hf_models, rel_err  # noqa: F401 (fixture)


def test_greedy_continuations_batched_equal_single_rows(model, tokenizer, ckpt, dataset, tmp_path, monkeypatch):
    """Rows of several entries and prefixes of different lengths in one generate call (and in calls
    of 2 rows) give what each row gives alone: with the shared prompt prefill, and on the plain
    way that a sliding window shorter than the rows forces (then each reference row runs under
    the same window)."""
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl"))
    entries = _entries(pipe, dataset, {"e0", "e1"})
    feats = list(model.encode_images(torch.stack([e.pixels for e in entries])))
    prompts = [entries[0].prompt_ids, entries[1].prompt_ids, entries[0].prompt_ids]
    features = [feats[0], feats[1], feats[0]]
    prefixes = [entries[0].response[:3], [], entries[0].response[:1] + [50]]
    shared = type(model).generate_shared
    calls = []
    monkeypatch.setattr(type(model), "generate_shared", lambda *a, **k: (calls.append(1), shared(*a, **k))[1])
    for window in (None, len(prompts[0]) + 2):  # the rows span the prompt + prefix + 5 new tokens
        monkeypatch.setattr(model.config.text, "sliding_window", window)
        alone = []
        for p, f, x in zip(prompts, features, prefixes):
            new = model.generate(torch.tensor([p + x]), image_features=f, max_new_tokens=5, eos_token_id=EOS)
            alone.append(cut_generated(new[0].tolist(), EOS, tiny.IMAGE_TOKEN))
        for rows in (64, 2):
            calls.clear()
            got = hscr.greedy_continuations(model, prompts, features, prefixes, max_new_tokens=5, pad_id=pipe.pad,
                                            rows_per_call=rows)
            assert got == alone, (window, rows)
            # the same rows given as entries (prompt, features) and the entry of each row
            got = hscr.greedy_continuations(model, prompts[:2], features[:2], prefixes, owners=[0, 1, 0],
                                            max_new_tokens=5, pad_id=pipe.pad, rows_per_call=rows)
            assert got == alone, (window, rows)
            assert bool(calls) == (window is None), (window, rows)  # the shared prefill, or the plain way


def test_shared_prefill_runs_each_prompt_once(model, tokenizer, ckpt, dataset, tmp_path, monkeypatch):
    """A call prefills each entry's prompt once: the image features reach the model once per
    entry, not once per candidate row."""
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl"))
    entries = _entries(pipe, dataset, {"e0", "e1"})
    feats = list(model.encode_images(torch.stack([e.pixels for e in entries])))
    seen = []
    real = type(model).embed

    def embed(self, ids, *args, **kwargs):
        seen.append(int((ids == tiny.IMAGE_TOKEN).sum()))
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "embed", embed)
    prefixes = [[30], [30, 31], [32], [33, 34, 35], [36]]
    hscr.greedy_continuations(model, [e.prompt_ids for e in entries], feats, prefixes, owners=[0, 0, 1, 1, 0],
                              max_new_tokens=3, pad_id=pipe.pad)
    assert seen == [2 * 16]  # one prefill of the two prompts, 16 image tokens each


def test_packed_rows_equal_rows_alone(hf_models, tmp_path):
    """Rows packed after their shared prefix (model.rows.collate: a (B, T, T) mask and each row's own
    positions) give, at every target, the logits of a forward pass over the row alone; here with
    a sliding window (6) shorter than the rows, rows that part inside the answer, a row that is
    the others' prefix plus one token, and an example of a single row."""
    model = load_model(tiny.save_layout(hf_models[("mistral-window", "default")], tmp_path, "llava-hf"))
    ids, mask, pixels = tiny.batch_inputs()
    prompts = [ids[e][mask[e].bool()].tolist() for e in range(2)]
    answers = [[[30, 31, 32, 33, 34], [30, 31, 40, 41], [30]], [[50, 51, 52]]]
    examples = []
    for e, (prompt, rows) in enumerate(zip(prompts, answers)):
        rows = [prompt + a for a in rows]
        targets = [[False] * len(prompt) + [True] * (len(r) - len(prompt)) for r in rows]
        examples.append(Example(f"e{e}", Path(f"img{e}.png"), rows, targets))
    packed = collate(examples, pad_id=0)
    n0 = len(prompts[0]) + 1  # example 0 shares its prompt and the answers' first token
    assert packed.input_ids.shape == (2, n0 + 4 + 3 + 0)
    assert packed.position_ids[0].tolist() == list(range(n0 + 4)) + list(range(n0, n0 + 3))
    with torch.no_grad():
        logits = model(packed.input_ids, pixels, packed.visible, position_ids=packed.position_ids)  # (S, T, V)
        r = 0
        for e, ex in enumerate(examples):
            for row, target in zip(ex.rows, ex.targets):
                alone = model(torch.tensor([row]), pixels[e:e + 1])[0]  # (T_row, V)
                t = torch.tensor([i for i, on in enumerate(target) if on])
                n = len(t)
                assert packed.seq[r] == e and packed.label_mask[r].sum() == n
                assert packed.labels[r, :n].tolist() == [row[i] for i in t]
                assert rel_err(logits[e, packed.positions[r, :n]], alone[t - 1]) <= 1e-5
                r += 1
    assert r == len(packed.seq) == 4
