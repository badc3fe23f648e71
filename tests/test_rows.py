"""model/rows.py: greedy_continuations against rows generated one at a time (on tests/test_hscr.py's
tiny checkpoint and entries)."""
from __future__ import annotations

import torch

import hscr
import tiny
from model.rows import cut_generated
from test_hscr import EOS, _entries, _opts, ckpt, dataset, model, tokenizer  # noqa: F401 (fixtures)


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
