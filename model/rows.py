"""Many rows through the model at once, each giving what it gives alone up to float rounding (tests check):
`teacher_forced_logits` and `greedy_continuations` for hscr.py, `collate` into `Rows` for train.py's
log π (docs/METHOD.md, "How the log-probabilities are computed").

Shape letters: R rows, T padded row length, L longest response, V vocabulary, N image tokens of a
row, D model width; in `Rows`, S packed sequences (one per example) and P a row's target tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .llava import left_pad, token_logprobs

if TYPE_CHECKING:  # annotations only: model/ does not import data.py
    from data import Example


def flat_features(features: Sequence[torch.Tensor], model) -> torch.Tensor:
    """The image features of several rows, (N_r, D) each, as one (ΣN_r, D) in the model's device and dtype."""
    D = model.config.text.hidden_size
    return torch.cat([f.reshape(-1, D) for f in features]).to(device=model.device, dtype=model.dtype)


@torch.no_grad()
def teacher_forced_logits(model, prompts: list[list[int]], features: list[torch.Tensor],
                          responses: list[list[int]], pad_id: int,
                          prompt_positions: list[list[int] | None] | None = None):
    """Logits that predict each response token, teacher-forced: (R, L, V) float32, targets (R, L) (0 where
    padded) and valid (R, L). features[r] (N_r, D) fills prompt r's image placeholders; prompt_positions[r]
    the position ids of prompt r's tokens (the response continues from the last + 1; None: 0, 1, 2, …)."""
    device = model.device
    # Row r is prompt_r + response_r[:-1], left-padded to T: response token t of row r is predicted at
    # position T − L_r + t, and only those positions reach the lm_head.
    ids, mask = left_pad([p + r[:-1] for p, r in zip(prompts, responses)], pad_id, device)  # (R, T)
    position_ids = []  # with no prompt_positions, the values that forward() would default to
    for p, r, pp in zip(prompts, responses, prompt_positions or [None] * len(prompts)):
        pp = list(range(len(p)) if pp is None else pp)
        start = pp[-1] + 1 if pp else 0
        position_ids.append(pp + list(range(start, start + len(r) - 1)))
    position_ids, _ = left_pad(position_ids, 0, device)  # (R, T); padding reads position 0, as by default
    T = ids.shape[1]
    lengths = torch.tensor([len(r) for r in responses], device=device)  # (R,)
    L = int(lengths.max())
    t = torch.arange(L, device=device)
    valid = t[None, :] < lengths[:, None]  # (R, L)
    positions = torch.where(valid, T - lengths[:, None] + t[None, :], T - 1)  # (R, L); padding reads T−1
    targets = torch.tensor([r + [0] * (L - len(r)) for r in responses], dtype=torch.long)  # (R, L)
    logits = model(ids, attention_mask=mask, image_features=flat_features(features, model),
                   logits_positions=positions, position_ids=position_ids)  # (R, L, V)
    return logits, targets.to(device), valid


def mean_token_probability(logits, targets, valid) -> torch.Tensor:
    """Per-token mean probability of each row's response (HSCR's "sampling probability"), (R,)."""
    return (token_logprobs(logits, targets).exp() * valid).sum(-1) / valid.sum(-1)


def cut_generated(ids: list[int], eos_id: int, image_token_id: int) -> list[int]:
    """Generated ids up to and including the first EOS; an image placeholder id ends the text before it."""
    # (The image id is a real token in llava-hf vocabularies, but it cannot be fed back as text.)
    ids = ids[:ids.index(image_token_id)] if image_token_id in ids else ids
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], features: list[torch.Tensor],
                         prefixes: list[list[int]], *, owners: list[int] | None = None, max_new_tokens: int,
                         pad_id: int, rows_per_call: int = 64) -> list[list[int]]:
    """Greedy continuation (docs/METHOD.md step 6) of each row r, prompts[o] + prefixes[r] with the full image
    features[o] (N, D), o = owners[r] (default r), until EOS or `max_new_tokens`, cut by `cut_generated`."""
    if not prefixes:
        return []
    cfg, device = model.config, model.device
    owners = list(range(len(prefixes))) if owners is None else list(owners)
    # Each call prefills its owners' prompts once and copies their cache into their rows (generate_shared),
    # unless a prompt ends in an image placeholder or the rows could span more than the sliding window.
    span = max(len(prompts[o]) for o in owners) + max(map(len, prefixes)) + max_new_tokens
    share_prompt = all(len(prompts[o]) and prompts[o][-1] != cfg.image_token_id for o in owners) \
        and (cfg.text.sliding_window is None or span <= cfg.text.sliding_window)
    # Rows sorted by length, `rows_per_call` per call sharing one static KV cache (finished rows leave
    # it): an owner's rows have nearly equal lengths, so they mostly land in one call and share its prefill.
    order = sorted(range(len(prefixes)), key=lambda r: len(prompts[owners[r]]) + len(prefixes[r]))
    tails: list[list[int]] = [[] for _ in prefixes]
    gen = dict(max_new_tokens=max_new_tokens, eos_token_id=cfg.text.eos_token_id, pad_token_id=pad_id)
    for start in range(0, len(order), rows_per_call):
        rows = order[start: start + rows_per_call]
        if share_prompt:
            shared = list(dict.fromkeys(owners[r] for r in rows))  # this call's owners, first seen first
            which = torch.tensor([shared.index(owners[r]) for r in rows], device=device)  # (rows,)
            pids, pmask = left_pad([prompts[o][:-1] for o in shared], pad_id, device)  # (E, Tp)
            sids, smask = left_pad([prompts[owners[r]][-1:] + prefixes[r] for r in rows], pad_id, device)
            feats = flat_features([features[o] for o in shared], model)
            new = model.generate_shared(pids, pmask, which, sids, smask, image_features=feats, **gen)
        else:
            ids, mask = left_pad([prompts[owners[r]] + prefixes[r] for r in rows], pad_id, device)
            feats = flat_features([features[owners[r]] for r in rows], model)
            new = model.generate(ids, attention_mask=mask, image_features=feats, **gen)
        for r, row in zip(rows, new.tolist()):
            tails[r] = cut_generated(row, cfg.text.eos_token_id, cfg.image_token_id)
    return tails


@dataclass
class Rows:
    """A micro-batch packed for one forward pass, one sequence per example: the prefix that the example's
    rows (the prompt with y_w, then with each y_lj) share once, then the rest of each row; a token sees the
    prefix and its own row's earlier tokens only, at its position in the row alone (docs/METHOD.md)."""
    input_ids: torch.Tensor     # (S, T) one packed sequence per example, right-padded
    position_ids: torch.Tensor  # (S, T) each token's position in its own row
    visible: torch.Tensor       # (S, T, T) bool: query t sees key u
    seq: torch.Tensor           # (R,) the sequence that holds row r
    positions: torch.Tensor     # (R, P) where in seq[r] the hidden state predicting each target is
    labels: torch.Tensor        # (R, P) the target tokens
    label_mask: torch.Tensor    # (R, P) bool
    seq_image: torch.Tensor     # (S,) index into the batch's images, −1 for none

    def to(self, device) -> Rows:
        return Rows(*(t.to(device) for t in vars(self).values()))


def collate(examples: list[Example], pad_id: int) -> Rows:
    seqs, segments, pos_ids, at, labels, seq_of = [], [], [], [], [], []
    for s, ex in enumerate(examples):
        # n: the length of the prefix that all rows share (the first column where they differ)
        n = next((i for i, col in enumerate(zip(*ex.rows)) if len(set(col)) > 1), min(map(len, ex.rows)))
        ids, segment, positions = list(ex.rows[0][:n]), [0] * n, list(range(n))
        for r, (row, target) in enumerate(zip(ex.rows, ex.targets)):
            start = len(ids) - n  # packed index of row index i ≥ n is start + i
            ids += row[n:]
            segment += [r + 1] * (len(row) - n)
            positions += range(n, len(row))
            # The hidden state at row index t − 1 predicts token t.
            at.append([(t - 1) if t - 1 < n else start + t - 1 for t, on in enumerate(target) if on])
            labels.append([row[t] for t, on in enumerate(target) if on])
            seq_of.append(s)
        seqs.append(ids)
        segments.append(segment)
        pos_ids.append(positions)
    T, P = max(map(len, seqs)), max(map(len, at))

    def pad(lists, value, width):  # (len(lists), width), right-padded with `value`
        return torch.tensor([x + [value] * (width - len(x)) for x in lists], dtype=torch.long)
    segment = pad(segments, -1, T)  # −1: padding, 0: the shared prefix, r + 1: row r
    key, query = segment[:, None, :], segment[:, :, None]
    visible = torch.ones(T, T, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))  # causal
    visible |= torch.eye(T, dtype=torch.bool)  # padding sees itself (finite, never read)
    label_mask = torch.arange(P) < torch.tensor([len(a) for a in at])[:, None]  # (R, P)
    has_image = torch.tensor([ex.image is not None for ex in examples])  # (S,)
    return Rows(pad(seqs, pad_id, T), pad(pos_ids, 0, T), visible, torch.tensor(seq_of), pad(at, 0, P),
                pad(labels, 0, P), label_mask, torch.where(has_image, has_image.cumsum(0) - 1, -1))
