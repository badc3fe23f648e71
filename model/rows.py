"""Many rows through the model at once, each giving what it gives alone up to floating-point
rounding (tests/test_rows.py checks the continuations against generate calls and the packed rows
against rows run alone, tests/test_hscr.py the teacher-forced logits through score_two_branches
against unpadded forwards, tests/test_train.py the packed log-probabilities' values and gradients):

    teacher_forced_logits   responses teacher-forced after their prompts (with their images),
                            left-padded into one batch; logits only at the positions that
                            predict a response token (hscr.py's two branches and p_chosen /
                            p_rejected, harness/stats.py's external negatives)
    greedy_continuations    greedy tails of many rows that share prompts (hscr.py's graded
                            negatives and --score-on greedy): one KV cache per call, each prompt
                            prefilled once, finished rows leaving the batch
    collate / Rows          the rows of each example (data.Example: a prompt with y_w, then with
                            each y_lj) packed into one sequence, their shared prefix once, for one
                            forward pass (train.py's log π, demo/base.py's SFT)

Shape letters: R rows, T padded row length, L longest response, V vocabulary, N image tokens of a
row, D model width; in `Rows`, S packed sequences (one per example) and P a row's target tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .llava import left_pad, token_logprobs

if TYPE_CHECKING:  # annotations only: model/ does not import data.py
    from data import Example


def flat_features(features: Sequence[torch.Tensor], model) -> torch.Tensor:
    """The image features of several rows, (N_r, D) each, as one (ΣN_r, D): what forward() and
    generate() write into the rows' image placeholders, row by row."""
    D = model.config.text.hidden_size
    return torch.cat([f.reshape(-1, D) for f in features]) if features else torch.zeros(0, D)  # (M, D)


@torch.no_grad()
def teacher_forced_logits(model, prompts: list[list[int]], features: list[torch.Tensor],
                          responses: list[list[int]], pad_id: int,
                          prompt_positions: list[list[int] | None] | None = None):
    """Logits that predict each response token, teacher-forced: (R, L, V) float32, targets (R, L)
    (0 where padded) and valid (R, L), L = the longest response (hscr.py's scores and p_chosen,
    harness/stats.py's external negatives).

    Row r is prompt_r + response_r[:-1], left-padded to T, so every row ends at T − 1 and response
    token t of row r is predicted at position T − L_r + t: only those positions reach the lm_head.
    features[r] (N_r, D) fills the N_r image placeholders of prompt r. prompt_positions[r], when
    given, are the position ids of prompt r's tokens (the response continues from the last + 1);
    None: 0, 1, 2, … (the model's default).
    """
    device = model.device
    ids, mask = left_pad([p + r[:-1] for p, r in zip(prompts, responses)], pad_id, device)  # (R, T)
    position_ids = None
    if prompt_positions is not None and any(pp is not None for pp in prompt_positions):
        rows = []
        for p, r, pp in zip(prompts, responses, prompt_positions):
            pp = list(range(len(p))) if pp is None else list(pp)
            start = pp[-1] + 1 if pp else 0
            rows.append(pp + list(range(start, start + len(r) - 1)))
        position_ids, _ = left_pad(rows, 0, device)  # (R, T); padding reads position 0, as by default
    T = ids.shape[1]
    lengths = torch.tensor([len(r) for r in responses], device=device)  # (R,)
    L = int(lengths.max())
    t = torch.arange(L, device=device)
    valid = t[None, :] < lengths[:, None]  # (R, L)
    positions = torch.where(valid, T - lengths[:, None] + t[None, :], T - 1)  # (R, L); padding reads T−1
    targets = torch.zeros(len(responses), L, dtype=torch.long)
    for i, r in enumerate(responses):
        targets[i, : len(r)] = torch.tensor(r)
    feats = flat_features(features, model).to(device=device, dtype=model.dtype)
    logits = model(ids, attention_mask=mask, image_features=feats, logits_positions=positions,
                   position_ids=position_ids)  # (R, L, V)
    return logits, targets.to(device), valid


def mean_token_probability(logits, targets, valid) -> torch.Tensor:
    """Per-token mean probability of each row's response (HSCR's "sampling probability"), (R,), from
    teacher_forced_logits' output. hscr.py records it for y_w (and with --score-negatives for the
    kept negatives), so that the paper's claim that self-generated negatives are likelier than
    external ones can be checked (`python hscr.py stats`)."""
    p = token_logprobs(logits, targets).exp() * valid
    return p.sum(-1) / valid.sum(-1)


def cut_generated(ids: list[int], eos_id: int, image_token_id: int) -> list[int]:
    """Generated ids up to and including the first EOS; an image placeholder id (a real token in
    llava-hf vocabularies) ends the text before it, since it cannot be fed back as text."""
    out = []
    for t in ids:
        if t == image_token_id:
            break
        out.append(t)
        if t == eos_id:
            break
    return out


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], features: list[torch.Tensor],
                         prefixes: list[list[int]], *, owners: list[int] | None = None, max_new_tokens: int,
                         pad_id: int, rows_per_call: int = 64) -> list[list[int]]:
    """Greedy continuation of each row r, prompts[o] + prefixes[r] with the full image features[o]
    (N, D), o = owners[r] (default: o = r), until EOS or `max_new_tokens` (docs/METHOD.md step 6,
    `decode`). Rows go through the model in calls of up to `rows_per_call` rows that share one
    static KV cache: the candidates of many entries decode together, grouped by length (less
    padding). Returned in the given order, each cut by `cut_generated`.

    Two savings, each giving the same tokens up to floating-point rounding (benchmarks/bench_hscr.py
    measures them against the plain way):
    - each call prefills the prompts of its owners once (all but their last token) and copies
      their KV cache into their rows (`Llava.generate_shared`), instead of prefilling every row
      whole: the prompt and image, most of a row, are not recomputed per candidate. Prompts ending
      in an image placeholder, or a model whose sliding window the rows could exceed, cannot share
      and take the plain way (`Llava.generate`, every row whole);
    - rows that reached EOS leave the call's batch (`Llava.generate` drops them: most tails are a
      few tokens long, the call runs until its longest one ends).
    """
    if not prefixes:
        return []
    cfg = model.config
    owners = list(range(len(prefixes))) if owners is None else list(owners)
    window = cfg.text.sliding_window
    # The shared cache spans the longest prompt + the longest prefix + the new tokens.
    span = max(len(prompts[o]) for o in owners) + max(map(len, prefixes)) + max_new_tokens
    share_prompt = all(len(prompts[o]) and prompts[o][-1] != cfg.image_token_id for o in owners) \
        and (window is None or span <= window)
    # An owner's rows have nearly equal lengths, so they mostly land in one call and share its prefill.
    order = sorted(range(len(prefixes)), key=lambda r: len(prompts[owners[r]]) + len(prefixes[r]))
    tails: list[list[int]] = [[] for _ in prefixes]
    gen = dict(max_new_tokens=max_new_tokens, eos_token_id=cfg.text.eos_token_id, pad_token_id=pad_id)
    for start in range(0, len(order), rows_per_call):
        rows = order[start: start + rows_per_call]
        if share_prompt:
            shared = list(dict.fromkeys(owners[r] for r in rows))  # this call's owners, first seen first
            slot = {o: i for i, o in enumerate(shared)}
            pids, pmask = left_pad([prompts[o][:-1] for o in shared], pad_id, model.device)  # (E, Tp)
            sids, smask = left_pad([prompts[owners[r]][-1:] + prefixes[r] for r in rows], pad_id, model.device)
            feats = flat_features([features[o] for o in shared], model).to(device=model.device, dtype=model.dtype)
            which = torch.tensor([slot[owners[r]] for r in rows], device=model.device)  # (rows,)
            new = model.generate_shared(pids, pmask, which, sids, smask, image_features=feats, **gen)
        else:
            ids, mask = left_pad([prompts[owners[r]] + prefixes[r] for r in rows], pad_id, model.device)
            feats = flat_features([features[owners[r]] for r in rows], model).to(device=model.device,
                                                                                 dtype=model.dtype)
            new = model.generate(ids, attention_mask=mask, image_features=feats, **gen)
        for r, row in zip(rows, new.tolist()):
            tails[r] = cut_generated(row, cfg.text.eos_token_id, cfg.image_token_id)
    return tails


# ---------------------------------------------------------------------------------------------
# The rows of an example packed after their shared prefix: one forward pass per example


@dataclass
class Rows:
    """A micro-batch packed for one forward pass: one sequence per example.

    The rows of an example (the prompt with y_w, then with each y_lj) share a prefix: the image's
    visual tokens, the prompt, and the answers' first tokens up to where they part. The sequence
    holds that prefix once, then the rest of each row, one after the other; `visible` lets a
    token see the prefix and the earlier tokens of its own row only, and `position_ids` count
    as in the row alone, so every row's log-probs are those of a forward pass over the row by
    itself (up to float rounding). The prefix, about 80 % of a row on the demo, is computed once
    per example instead of once per row.
    """
    input_ids: torch.Tensor     # (S, T) one packed sequence per example, right-padded
    position_ids: torch.Tensor  # (S, T) each token's position in its own row
    visible: torch.Tensor       # (S, T, T) bool: query t sees key u
    seq: torch.Tensor           # (R,) the sequence that holds row r
    positions: torch.Tensor     # (R, P) where in seq[r] the hidden state predicting each target is
    labels: torch.Tensor        # (R, P) the target tokens
    label_mask: torch.Tensor    # (R, P) bool
    seq_image: torch.Tensor     # (S,) index into the batch's images, −1 for none

    def to(self, device) -> Rows:
        return Rows(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def shared_prefix(rows: list[list[int]]) -> int:
    """Length of the longest prefix common to all `rows`."""
    n = min(map(len, rows))
    for r in rows[1:]:
        n = next((i for i in range(n) if r[i] != rows[0][i]), n)
    return n


def collate(examples: list[Example], pad_id: int) -> Rows:
    seqs, segments, pos_ids, where, seq_of, seq_image = [], [], [], [], [], []
    n_images = 0
    for s, ex in enumerate(examples):
        n = shared_prefix(ex.rows)
        ids, segment, positions = list(ex.rows[0][:n]), [0] * n, list(range(n))
        for r, (row, target) in enumerate(zip(ex.rows, ex.targets)):
            start = len(ids) - n  # packed index of row index i ≥ n is start + i
            ids += row[n:]
            segment += [r + 1] * (len(row) - n)
            positions += range(n, len(row))
            # The hidden state at row index t − 1 predicts token t.
            where.append([((t - 1) if t - 1 < n else start + t - 1, row[t]) for t, on in enumerate(target) if on])
            seq_of.append(s)
        seqs.append(ids)
        segments.append(segment)
        pos_ids.append(positions)
        seq_image.append(n_images if ex.image is not None else -1)
        n_images += ex.image is not None
    S, T = len(seqs), max(map(len, seqs))
    R, P = len(where), max(map(len, where))
    input_ids = torch.full((S, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(S, T, dtype=torch.long)
    segment = torch.full((S, T), -1, dtype=torch.long)  # −1: padding, 0: the shared prefix, r + 1: row r
    for s, (ids, seg, pos) in enumerate(zip(seqs, segments, pos_ids)):
        input_ids[s, :len(ids)] = torch.tensor(ids)
        segment[s, :len(ids)] = torch.tensor(seg)
        position_ids[s, :len(ids)] = torch.tensor(pos)
    key, query = segment[:, None, :], segment[:, :, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = causal & (key >= 0) & ((key == 0) | (key == query))
    visible |= torch.eye(T, dtype=torch.bool)  # padding sees itself (finite, never read)
    positions = torch.zeros(R, P, dtype=torch.long)
    labels = torch.zeros(R, P, dtype=torch.long)
    label_mask = torch.zeros(R, P, dtype=torch.bool)
    for r, pairs in enumerate(where):
        if pairs:
            positions[r, :len(pairs)] = torch.tensor([p for p, _ in pairs])
            labels[r, :len(pairs)] = torch.tensor([y for _, y in pairs])
            label_mask[r, :len(pairs)] = True
    return Rows(input_ids, position_ids, visible, torch.tensor(seq_of), positions, labels, label_mask,
                torch.tensor(seq_image))
