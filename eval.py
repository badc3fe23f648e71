"""Zero-shot medical VQA evaluation, scored as LLaVA-Med scores it and with a strict closed score beside.

    python eval.py --model DIR --benchmark vqa_rad=VQA_RAD_test.jsonl --image-root IMAGES --out runs/base
    python eval.py --adapter LORA_DIR --benchmark ... --out runs/hscr --blind  # on its own base model
    python eval.py compare runs/base runs/hscr
    python eval.py score --answers ANSWERS --questions QUESTIONS   # score an existing answer file
    python eval.py baselines --questions QUESTIONS   # always yes / always no / "yes no" / majority
    torchrun --nproc_per_node 4 eval.py ...         # shard the questions over 4 processes

1. Scoring: LLaVA-Med v1.0's `eval_metrics` and `run_eval_batch.py`, its quirks named, ours beside.
2. Generation (`generate_answers`): LLaVA-Med's prompt and answer files, batched greedy decoding, resumable,
   sharded. Details: docs/FORMATS.md "VQA metrics" and "Evaluation files".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from tqdm import tqdm

from data import PAD_RGB, load_pixels, preprocess_image, resolve_image
from harness import provenance
from harness.cli import UserError, dataclass_parser, option, run_main
from harness.dist import Context, barrier, init_process_group
from harness.evalfiles import (LEGEND, answer_row, answers_path, check_images, compare_runs, merge_answers,
                               parse_named, question_counts, question_id, read_answer_file, read_benchmarks,
                               read_questions, scores_table, shards, visual_gain, write_reports)
from harness.files import DataError, JsonlFile, read_jsonl, read_text
from harness.rundir import PROVENANCE, check_paths, model_of, read_tokenizer, start_run
from model import load_model
from model.llava import left_pad
from model.loading import DTYPES, resolve_dtype
from model.lora import load_adapter
from model.tokenizer import build_prompt, decode, tokenize_prompt

# Scoring: LLaVA-Med's normalize_word, split_sentence, calculate_f1score, calculate_exactmatch
# Characters handled by the space-dependent rule, in LLaVA-Med's order (which does not change the result).
PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
# Number words that LLaVA-Med maps to digits; only whole words, only up to ten.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# LLaVA-Med's contraction table (the VQA-v2 one), kept as it is: keys with capitals ("Im", "Ive", "Id've")
# never match (words are lowercased first), and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
# Upstream writes "(?!<=\d)(\.)(?!\d)": the first group is a look-*ahead* for the text "<=d",
# which can never start where a period is, so the pattern is just "a period not before a digit".
_STRAY_PERIOD = re.compile(r"\.(?!\d)")


def normalize_word(text: str) -> str:
    """LLaVA-Med's `normalize_word` on a lowercased string (the scripts lowercase before calling;
    doing it first changes nothing in steps 1 and 2). The steps: docs/FORMATS.md "Normalisation"."""
    text = text.lower()
    # 1. A PUNCT character is deleted everywhere if it stands next to a space anywhere in the *input* or the
    # input holds a digit,digit, else spaced: "x-ray" → "x ray", but "x-ray - chest" → "xray chest".
    digit_comma_digit, out = re.search(r"\d,\d", text) is not None, text
    for p in PUNCT:
        out = out.replace(p, "" if p + " " in text or " " + p in text or digit_comma_digit else " ")
    # 2. Periods not followed by a digit are deleted ("3.5" keeps its point), at most 32: upstream calls
    # period_strip.sub("", text, re.UNICODE), and Pattern.sub's third argument is `count` (re.UNICODE == 32).
    out = _STRAY_PERIOD.sub("", out, count=int(re.UNICODE))
    # 3. Number words → digits before the article test, contractions after it, as upstream; single
    # spaces. Commas cannot survive step 1, but the final comma removal is kept for parity.
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def calculate_f1score(pred: str, gt: str) -> tuple[float, float, float]:
    """LLaVA-Med's token F1 → (f1, precision, recall), normalised once more as upstream. The quirk: tp
    counts the *prediction*'s repeats ("lung lung lung" against "left lung": recall 3/4)."""
    # Upstream `split_sentence(text, 1)`: lowercase, whitespace split, {word: count}.
    p_words, g_words = (Counter(normalize_word(s).lower().split()) for s in (pred, gt))
    tp = sum(c for w, c in p_words.items() if w in g_words)
    fn = sum(c for w, c in g_words.items() if w not in p_words)
    if tp == 0:  # also when a side has no words
        return 0.0, 0.0, 0.0
    precision, recall = tp / sum(p_words.values()), tp / (tp + fn)  # tp + fp: every predicted word
    return 2 * precision * recall / (precision + recall), precision, recall


def calculate_exactmatch(pred: str, gt: str) -> float:
    """LLaVA-Med's "exact match score": reference word *types* found in the prediction ÷ the prediction's
    word count with repeats (0 for an empty prediction): "left left lung" against "left lung" → 2/3."""
    p_words, g_words = (Counter(normalize_word(s).lower().split()) for s in (pred, gt))
    total = sum(p_words.values())
    return sum(1 for w in g_words if w in p_words) / total if total else 0.0


# Strict closed scoring: ours, not LLaVA-Med's, reported beside the lenient score
# Words after which a "no" has ended its clause ("no or yes", "no but ...").
CONJUNCTIONS = ("and", "or", "but")


def closed_answer(pred: str) -> str | None:
    """What a raw prediction answers to a yes/no question: its first *answer word* ("yes", or a "no" that
    ends its clause), "hedge" if both occur, else None; read on the lowercased raw text, as normalisation
    deletes punctuation. Ours; the rule and why: docs/FORMATS.md "The strict closed score".
        "no, there is not" → no    "yes no" → hedge    "Yes, but no effusion" → yes    "nodule" → None
    """
    tokens = re.findall(r"\w+|[^\w\s]", pred.lower())  # words and single punctuation marks: "no," → "no", ","
    words = [t for t, after in zip(tokens, tokens[1:] + [None]) if t == "yes"
             or (t == "no" and (after is None or not after[0].isalnum() or after in CONJUNCTIONS))]
    return None if not words else "hedge" if len(set(words)) > 1 else words[0]


def strict_hit(pred: str, gt: str) -> bool:
    """Closed-question hit that hedging cannot earn, raw strings in: a yes/no gt must equal `closed_answer`,
    another ("left") must occur in the normalised prediction as whole words (not in "cleft")."""
    g = normalize_word(gt)
    if g in ("yes", "no"):
        return closed_answer(pred) == g
    return bool(g) and f" {g} " in f" {normalize_word(pred)} "


def hedges(pred: str) -> bool:
    """The hedge *rate*'s test: "yes" and "no" both words of the normalised prediction (broader than
    `closed_answer`'s hedge: "Yes, but no effusion" counts here)."""
    return {"yes", "no"} <= set(normalize_word(pred).split())


def score_answer(pred: str, gt: str, answer_type: str) -> dict[str, float]:
    """Score one answer as LLaVA-Med does (both normalised first): "hit", `gt in pred` as a *substring* (the
    closed score papers report: "no" is in "nodule", "yes no" hits every yes/no question; the open accuracy),
    "exact"; CLOSED adds "strict" (our `strict_hit`), OPEN "recall" (the open score), "precision", "f1"."""
    if not isinstance(pred, str) or not isinstance(gt, str):
        raise TypeError(f"pred and gt must be str, got {type(pred).__name__} and {type(gt).__name__}")
    if answer_type not in ("OPEN", "CLOSED"):
        raise ValueError(f"answer_type must be 'OPEN' or 'CLOSED', got {answer_type!r}")
    p, g = normalize_word(pred), normalize_word(gt)
    scores = {"hit": float(g in p), "exact": calculate_exactmatch(p, g)}
    if answer_type == "CLOSED":
        return scores | {"strict": float(strict_hit(pred, gt))}
    f1, precision, recall = calculate_f1score(p, g)
    return scores | {"recall": recall, "precision": precision, "f1": f1}


# The description metric: facts of a scene stated right or contradicted (ours)
def fact_scores(pred: str, facts: Mapping[str, Any], qid: str = "?") -> dict[str, int]:
    """The description metric of one answer (docs/FORMATS.md): {"facts": slots, "correct": true values stated,
    "stated": values `pred` states, "contradicted": stated, not true}; facts: slot → {"value", "phrases"}."""
    counts = Counter(facts=0, correct=0, stated=0, contradicted=0)
    for slot, fact in facts.items():
        values = fact.get("phrases") if isinstance(fact, dict) else None
        if not isinstance(values, dict) or fact.get("value") not in values:
            raise DataError(f"question {qid}: facts[{slot!r}] must be {{'value': v, 'phrases': {{v: [...], "
                            f"...}}}} with v among the phrases' keys, got {fact!r}")
        # A phrase is stated as whole words, any case; a hyphen joins words: no "ray" in "X-ray".
        stated = [v for v, phrases in values.items()
                  if any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", pred, re.I) for p in phrases)]
        counts.update(facts=1, correct=int(fact["value"] in stated), stated=len(stated),
                      contradicted=sum(v != fact["value"] for v in stated))
    return dict(counts)


# A whole answer file scored, and what answering without a model scores
def _ratio100(a: int, b: int) -> float | None:
    return 100.0 * a / b if b else None  # None: nothing to average (an absent type is not 0 %)


def _mean100(values: Sequence[float]) -> float | None:
    return _ratio100(sum(values), len(values))


def score_file(answers: Iterable[Mapping[str, Any]], questions: Iterable[Any]) -> dict[str, Any]:
    """Score answer-file rows against data.Records (`.facts` optional), ids as strings: percentages by section
    (None: nothing to average; docs/FORMATS.md "VQA metrics"), the ids `missing` (left out, not 0), `unknown`
    (no such question) and `unscorable` (no type or usable ground truth). Answering twice is an error."""
    rows = [(str(row["question_id"]), row["text"]) for row in answers]
    texts, duplicates = dict(rows), [qid for qid, n in Counter(qid for qid, _ in rows).items() if n > 1]
    if duplicates:
        raise DataError(f"answers hold question ids more than once: {sorted(duplicates)[:20]}")
    open_s: dict[str, list[float]] = {k: [] for k in ("recall", "precision", "f1", "exact", "hit")}
    hits, hits_strict, hedged, no_answer, gt_no_says_yes = [], [], [], [], []
    missing, unscorable, seen = [], [], set()
    described = Counter()  # "n" questions with facts; fact_scores' counts summed
    for q in questions:
        qid = str(q.id)
        seen.add(qid)
        facts = getattr(q, "facts", None)
        if facts and qid in texts:
            described.update(fact_scores(texts[qid], facts, qid), n=1)
        if q.answer is None or q.answer_type not in ("OPEN", "CLOSED") or not normalize_word(q.answer):
            unscorable.append(qid)
        elif qid not in texts:
            missing.append(qid)
        elif q.answer_type == "OPEN":
            for k, v in score_answer(texts[qid], q.answer, "OPEN").items():
                open_s[k].append(v)
        else:
            pred, g = texts[qid], normalize_word(q.answer)
            hits.append(float(g in normalize_word(pred)))  # score_answer's "hit"
            hits_strict.append(float(strict_hit(pred, q.answer)))
            hedged.append(float(hedges(pred)))
            if g in ("yes", "no"):
                no_answer.append(float(closed_answer(pred) is None))
            if g == "no":
                gt_no_says_yes.append(float(closed_answer(pred) == "yes"))
    both = [_mean100(open_s["recall"]), _mean100(hits)]  # for "mean_of_types"
    return {
        "open": {"n": len(open_s["recall"]), **{k: _mean100(v) for k, v in open_s.items()}},
        "closed": {"n": len(hits), "accuracy": _mean100(hits), "accuracy_strict": _mean100(hits_strict),
                   "hedge_rate": _mean100(hedged), "n_yes_no": len(no_answer),
                   "no_answer_rate": _mean100(no_answer), "n_gt_no": len(gt_no_says_yes),
                   "hallucination_rate": _mean100(gt_no_says_yes)},
        "overall": {"n": len(hits) + len(open_s["recall"]), "score": _mean100(open_s["recall"] + hits),
                    "mean_of_types": None if None in both else sum(both) / 2},
        "description": {"n": described["n"], "n_facts": described["facts"], "n_stated": described["stated"],
                        "facts_contradicted": _ratio100(described["contradicted"], described["stated"]),
                        "facts_correct": _ratio100(described["correct"], described["facts"])},
        "n_questions": len(seen), "n_answered": len(seen) - len(missing) - len(unscorable),
        "missing": missing, "unknown": [qid for qid in texts if qid not in seen], "unscorable": unscorable,
    }


BASELINES_HELP = (
    "Baselines that need no model, scored like a model's answers: \"yes\", \"no\" or \"yes no\" to every "
    "question; and, to open questions only, the most common normalised ground truth of the open questions "
    "with the same normalised text (ties: first in file; oracle-ish: a text met once gets its own answer), "
    "or leave-one-out, without the question's own (\"\" if none shares its text): what the text predicts.")


def majority_answers(records: Sequence[Any], *, leave_one_out: bool = False) -> dict[str, str]:
    """Open question id → its majority answer (BASELINES_HELP), with leave_one_out or not."""
    groups: dict[str, list[Any]] = {}
    for r in records:
        if r.answer_type == "OPEN" and r.answer is not None and normalize_word(r.answer):
            groups.setdefault(normalize_word(r.question), []).append(r)
    out = {}
    for group in groups.values():
        counts = Counter(normalize_word(r.answer) for r in group)  # file order, which max() keeps for ties
        for r in group:
            own = normalize_word(r.answer)
            pool = {a: c - (leave_one_out and a == own) for a, c in counts.items()}
            out[r.id] = max(pool, key=pool.get) if max(pool.values()) > 0 else ""
    return out


def baselines(records: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """name → score_file result of every baseline of BASELINES_HELP on `records`."""
    constant = {"always yes": "yes", "always no": "no", "hedge \"yes no\"": "yes no"}  # → every question
    answers = {n: [(r.id, t) for r in records] for n, t in constant.items()}
    answers |= {n: majority_answers(records, leave_one_out=l).items()
                for n, l in (("majority per question text", False), ("majority, leave-one-out", True))}
    return {n: score_file([{"question_id": q, "text": t} for q, t in rows], records)
            for n, rows in answers.items()}


# Generation over a benchmark: prompts, images, the three modes, resumable answer files
MODES = ("full", "no_image", "blank_image")


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) long, left-padded
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    pixel_values: torch.Tensor | None  # (B, 3, S, S) float, None in no_image mode


def prompt_ids(question: str, tokenizer, config, *, mode: str, template: str) -> list[int]:
    """LLaVA-Med's prompt for one question, tokenised chunk-wise around the image (docs/FORMATS.md "Prompt");
    in `no_image` mode with zero image positions (the "▁" pieces around the image stay)."""
    # tokenize_prompt wants at least one image position: in no_image mode it gets an id no tokenizer
    # produces (-1; chunked tokenization never looks it up), taken out again.
    blind = mode == "no_image"
    ids = tokenize_prompt(tokenizer, build_prompt(question, template), bos_token_id=config.text.bos_token_id,
                          image_token_id=-1 if blind else config.image_token_id,
                          num_image_tokens=1 if blind else config.num_image_tokens)
    return [i for i in ids if i != -1] if blind else ids


def build_batch(records: Sequence[Any], mode: str, *, tokenizer, config, template: str = "mistral_instruct",
                pixels: Sequence[torch.Tensor] = ()) -> Batch:
    """Model inputs for a list of data.Record in one of MODES; `pixels`: their images in full mode."""
    rows = [prompt_ids(r.question, tokenizer, config, mode=mode, template=template) for r in records]
    pad = config.text.pad_token_id if config.text.pad_token_id is not None else config.text.eos_token_id
    if mode == "blank_image":  # LLaVA's pad colour: ~0 once normalised, an image that shows nothing
        size = config.vision.image_size
        blank = preprocess_image(Image.new("RGB", (size, size), PAD_RGB), size=size)
        images = blank[None].expand(len(records), -1, -1, -1)  # (B, 3, S, S)
    else:
        images = torch.stack(list(pixels)) if mode == "full" else None  # (B, 3, S, S); None in no_image
    return Batch(*left_pad(rows, pad), images)


def answer_room(records: Sequence[Any], tokenizer, config, template: str,
                max_new_tokens: int) -> tuple[int, dict[str, str]]:
    """max_new_tokens clamped to what the context leaves after the longest prompt of `records` that takes at
    most half of it, and question id → why for longer ones (ours; docs/FORMATS.md "Run directory")."""
    context = config.text.max_seq_len
    lengths = {r.id: len(prompt_ids(r.question, tokenizer, config, mode="full", template=template))
               for r in records}
    room = min(max_new_tokens, context - max([n for n in lengths.values() if 2 * n <= context], default=0))
    return room, {qid: f"prompt of {n} tokens leaves fewer than {room} new tokens in the context of {context}"
                  for qid, n in lengths.items() if n + room > context}


def generate_answers(model, tokenizer, records: Sequence[Any], *, run_dir: Path, name: str, mode: str,
                     image_root: str | None, model_id: str, batch_size: int, max_new_tokens: int,
                     template: str = "mistral_instruct", rank: int = 0, world: int = 1,
                     skipped: dict[str, str] | None = None) -> int:
    """Answer this rank's share of `records` (records[rank::world]) that no earlier run answered, appending to
    its shard per batch; returns how many. skipped: id → why not to answer; an image failing here adds one."""
    skipped = {} if skipped is None else skipped
    # Answered by an earlier run: the merged file and every shard, whatever the world size that wrote them.
    # Read only: another rank may be appending to its shard (a half line is not counted).
    done = set().union(*(JsonlFile(f, key=question_id).ids
                         for f in [answers_path(run_dir, name, mode), *shards(run_dir, name, mode)]))
    # Shard first, filter after: every rank must agree on who owns question i.
    todo = [r for r in records[rank::world] if r.id not in done and r.id not in skipped]
    eos, size = model.config.text.eos_token_id, model.config.vision.image_size
    n, shard = 0, JsonlFile(answers_path(run_dir, name, mode, rank), key=question_id)
    with tqdm(total=len(todo), desc=f"{name} {mode}", unit="q", disable=rank != 0 or not todo) as bar:
        for s in range(0, len(todo), batch_size):
            chunk, pixels = [], []  # the questions whose image loads (all but in full mode), their images
            for r in todo[s:s + batch_size]:
                try:
                    if mode == "full":
                        pixels.append(load_pixels(resolve_image(image_root, r.image), size))
                    chunk.append(r)
                except (ValueError, OSError) as error:  # data.load_image names the file in both
                    skipped[r.id] = f"image {r.image}: {error}"
                    print(f"{name}: question {r.id} skipped: {skipped[r.id]}", file=sys.stderr)
            if chunk:
                input_ids, mask, images = build_batch(chunk, mode, tokenizer=tokenizer, config=model.config,
                                                      template=template, pixels=pixels)
                images = None if images is None else images.to(model.device, model.dtype)
                with torch.inference_mode():
                    new = model.generate(input_ids.to(model.device), images, mask.to(model.device),
                                         max_new_tokens=max_new_tokens, eos_token_id=eos)  # (B, T_new)
                shard.write(answer_row(record, decode(tokenizer, ids, eos_token_id=eos), model_id, mode)
                            for record, ids in zip(chunk, new.tolist()))
                n += len(chunk)
            bar.update(min(batch_size, len(todo) - s))
    return n


@dataclasses.dataclass
class EvalConfig:
    """Options of an evaluation run (the command line is built from these fields)."""
    benchmark: list[str] = option(help="NAME=PATH of a test.json or question JSONL")
    out: str = option(help="run directory (answers, provenance.json, summary.json, report.md)")
    model: str | None = option(None, "checkpoint directory (default: the model --adapter was trained on)")
    image_root: list[str] = option(default_factory=list, help="NAME=DIR for one benchmark, or DIR for all")
    ground_truth: list[str] = option(default_factory=list, help="NAME=PATH: answers apart from questions")
    adapter: str | None = option(None, "PEFT-format LoRA adapter directory")
    allow_other_model: bool = option(False, "apply --adapter although it was trained on another model")
    vision_tower: str | None = option(None, "CLIP directory replacing or supplying the checkpoint's tower")
    check_finite: bool = option(True, "refuse weights holding NaN or Inf as they load")
    tokenizer: str | None = option(None, "tokenizer directory or file (default: --model)")
    template: str = option("mistral_instruct", "prompt template")
    batch_size: int = option(8, "questions per generate() call (may change on resume)")
    max_new_tokens: int = option(1024, "LLaVA-Med used 1024; clamped to what the model's context leaves")
    blind: bool = option(False, "also answer with no visual tokens and with a mean-colour image")
    limit: int | None = option(None, "first N questions of each benchmark")
    dtype: str = option("auto", "auto: float16 on GPU (LLaVA-Med's), else float32", choices=("auto", *DTYPES))
    device: str = option("auto", "auto = cuda:LOCAL_RANK if available, else cpu (may change on resume)")
    model_id: str | None = option(None, "model_id in the answer files (default: model[+adapter] dir names)")
    overwrite: bool = option(False, "delete the run's answers and scores and start again")


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(EvalConfig, prog="eval.py", description=(
        "Zero-shot VQA evaluation scored as LLaVA-Med scores it. Also:\n  eval.py compare RUN_A RUN_B\n"
        "  eval.py score --answers FILE --questions FILE\n  eval.py baselines --questions FILE"))


# The run
def load_for_eval(cfg: EvalConfig, device: str):
    """The model, with the LoRA adapter applied (unmerged); an unreadable adapter: a UserError."""
    model = load_model(cfg.model, vision_tower=cfg.vision_tower, device=device, check_finite=cfg.check_finite,
                       dtype=resolve_dtype(cfg.dtype, device, gpu_default="float16"))
    if cfg.adapter is not None:
        try:
            load_adapter(model, cfg.adapter, dropout=0.0)
        except (ValueError, OSError) as error:  # load_adapter names the adapter file in its messages
            raise UserError(f"--adapter {cfg.adapter}: {error}") from error
        model.to(device)
    return model.eval()


def run_fingerprint(cfg: EvalConfig, benchmarks: Mapping[str, tuple], roots: Mapping[str, str],
                    dtype: torch.dtype, limits: Sequence[int | None], tokenizer) -> dict[str, Any]:
    """What the answers depend on (docs/FORMATS.md "Run directory"): every question of each benchmark file,
    and the images of the first max(`limits`) questions (all if a limit is None): the sessions' questions."""
    n = None if None in limits else max(limits)
    inputs: dict[str, Any] = {
        "model": provenance.Dir(cfg.model), "adapter": provenance.Dir(cfg.adapter) if cfg.adapter else None,
        "vision tower": provenance.Dir(cfg.vision_tower) if cfg.vision_tower else None,
        "tokenizer": tokenizer}
    for name, (records, _) in benchmarks.items():
        inputs[f"questions {name}"] = provenance.Content([[r.id, r.image, r.question] for r in records])
        images = sorted({r.image for r in records[:n] if r.image is not None})
        inputs[f"images {name}"] = provenance.Files(roots[name], images)
    # What data.preprocess_image does (not an option yet): fingerprinted, so that a later option or
    # default does not mix answers to differently prepared images in one run.
    pad = "LLaVA-Med pad: square with the CLIP mean colour, centred; bicubic resize"
    return provenance.run_fingerprint(inputs, None, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                                      dtype=str(dtype).removeprefix("torch."), image_preprocessing=pad,
                                      decoding="greedy")


def run(cfg: EvalConfig) -> dict[str, Any] | None:
    """Generate (resuming), merge, score and report. Returns the results on rank 0."""
    problems = [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in
                (("batch_size", cfg.batch_size), ("max_new_tokens", cfg.max_new_tokens), ("limit", cfg.limit))
                if v is not None and v < 1]  # --dtype: argparse's choices, or resolve_dtype, refuse a bad one
    if problems:
        raise UserError("; ".join(problems))
    rank, world, local = init_process_group()  # gloo: only barriers, with or without GPUs
    device = cfg.device if cfg.device != "auto" else (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device, gpu_default="float16")
    run_dir = Path(cfg.out)
    every = read_benchmarks(cfg.benchmark, cfg.ground_truth)
    roots = parse_named(cfg.image_root, "--image-root", names=list(every), allow_global=True)
    sources = parse_named(cfg.benchmark, "--benchmark")
    benchmarks, screened = {}, {}  # --limit chooses the questions first: only their images are looked at
    for name, (records, bad) in every.items():
        for b in bad if rank == 0 else []:
            print(f"{name}: bad record {b.file}[{b.index}] id={b.id}: {b.reason}", file=sys.stderr)
        benchmarks[name] = (records[:cfg.limit], bad)
        # Before the (slow) model load; each process opens the images of its own share of the questions.
        screened[name] = check_images(records[:cfg.limit], roots[name], name, sources[name], rank, world)
        for qid, why in screened[name].items():
            print(f"{name}: question {qid} skipped: {why}", file=sys.stderr)
    check_paths("directory", model=cfg.model, adapter=cfg.adapter, vision_tower=cfg.vision_tower)
    made = (provenance.load(Path(cfg.adapter) / PROVENANCE) or {}).get("fingerprint") if cfg.adapter else None
    cfg = model_of(cfg, made, cfg.adapter and f"--adapter {cfg.adapter}")  # default: the adapter's model
    model_id = cfg.model_id or "+".join(Path(p).resolve().name for p in (cfg.model, cfg.adapter) if p)
    # The images any session's --limit chose are fingerprinted; checked against earlier choices, it may grow.
    started = (run_dir / "summary.json").exists() or any(run_dir.glob("*/answers*.jsonl"))  # shards too
    resume = not cfg.overwrite and started
    record = provenance.load(run_dir / PROVENANCE) if resume else None
    earlier = [s["limit"] for s in record["sessions"]] if record else []
    tokenizer = read_tokenizer(cfg.tokenizer or cfg.model)
    words = provenance.tokenizer(tokenizer)  # what it does
    now = run_fingerprint(cfg, every, roots, dtype, earlier + [cfg.limit], words)
    before = run_fingerprint(cfg, every, roots, dtype, earlier, words) if earlier else None
    if not cfg.allow_other_model:
        provenance.check_model(made, now, f"--adapter {cfg.adapter}", "evaluate it on that model (the "
                               "default without --model), or pass --allow-other-model to apply it anyway")
    start_run(run_dir, now, resume=resume, writes=[*every, "config.json", "summary.json", "report.md"],
              session={"batch_size": cfg.batch_size, "device": device, "world_size": world,
                       "limit": cfg.limit, "blind": cfg.blind, "model_id": model_id},
              holds="answers", restart="rerun with --overwrite to start again (this deletes its answers)",
              rank=rank, world=world, compare=before, made_by="eval.py")
    model = load_for_eval(cfg, device)
    if rank == 0:  # the options as given, and what "auto" and the defaults resolved to
        auto = {"device": device, "dtype": str(model.dtype).removeprefix("torch."), "world_size": world,
                "model_id": model_id, "num_image_tokens": model.config.num_image_tokens}
        options = json.dumps({**dataclasses.asdict(cfg), "resolved": auto}, indent=2)
        (run_dir / "config.json").write_text(options, encoding="utf-8")
        print(f"eval.py: {device}, {auto['dtype']}; options in {run_dir}/config.json", file=sys.stderr)
    modes = MODES if cfg.blind else MODES[:1]
    skipped_by, rooms = {}, {}  # benchmark → question id → why: screened, too long, each rank's failures
    for name, (records, _) in benchmarks.items():
        mine = dict(screened[name])
        rooms[name], too_long = answer_room(every[name][0], tokenizer, model.config, cfg.template,
                                            cfg.max_new_tokens)
        if rank == 0 and rooms[name] < cfg.max_new_tokens:
            print(f"{name}: max-new-tokens {cfg.max_new_tokens} clamped to {rooms[name]} "
                  f"(context {model.config.text.max_seq_len})", file=sys.stderr)
        for qid in [r.id for r in records if r.id in too_long and r.id not in mine]:
            mine[qid] = too_long[qid]
            if rank == 0:
                print(f"{name}: question {qid} skipped: {mine[qid]}", file=sys.stderr)
        for mode in modes:
            generate_answers(model, tokenizer, records, run_dir=run_dir, name=name, mode=mode,
                             image_root=roots[name], model_id=model_id, batch_size=cfg.batch_size,
                             max_new_tokens=rooms[name], template=cfg.template, rank=rank, world=world,
                             skipped=mine)
            barrier(world)
            if rank == 0:
                merge_answers(run_dir, name, mode, records)
        skipped_by[name] = Context(rank, world).gather_dicts(mine)
    if rank != 0:
        return None
    results = {}
    for name, (records, bad) in benchmarks.items():
        skipped = skipped_by[name]
        kept = {r.id: r for r in records if r.id not in skipped}
        scored = {mode: score_file([row for row in read_jsonl(answers_path(run_dir, name, mode))
                                    if question_id(row) in kept], kept.values()) for mode in modes}
        results[name] = {"bad_records": [dataclasses.asdict(b) for b in bad],
                         "skipped": [{"question_id": r.id, "image": r.image, "reason": skipped[r.id]}
                                     for r in records if r.id in skipped],
                         "max_new_tokens": rooms[name], "modes": scored, "visual_gain": visual_gain(scored)}
        unscorable = scored["full"]["unscorable"]
        if skipped or unscorable:
            print(f"{name}: {len(skipped)} questions skipped (unreadable image or too long), "
                  f"{len(unscorable)} unscorable (no ground truth); listed in {run_dir / 'summary.json'} and "
                  "report.md", file=sys.stderr)
    write_reports(run_dir, dataclasses.asdict(cfg), results, now)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="eval.py compare", description="two runs side by side, with B − A")
        p.add_argument("runs", nargs=2, metavar="RUN", help="run directories A and B")
        print(compare_runs(*p.parse_args(argv[1:]).runs))
    elif argv[:1] in (["score"], ["baselines"]):
        score = argv[0] == "score"
        p = argparse.ArgumentParser(prog=f"eval.py {argv[0]}", description=BASELINES_HELP if not score else
                                    "Score an answer file, ours or LLaVA-Med's: lenient and strict figures.")
        if score:
            p.add_argument("--answers", required=True, help="answer-file JSONL (question_id, text)")
        p.add_argument("--questions", required=True, help="test.json or question JSONL, with the answers")
        p.add_argument("--ground-truth", help="answers kept apart from the questions")
        p.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
        args = p.parse_args(argv[1:])
        records, bad = read_questions(args.questions, args.ground_truth)
        for b in bad:
            print(f"bad record {b.file}[{b.index}] id={b.id}: {b.reason}", file=sys.stderr)
        if score:
            s = score_file(read_answer_file(args.answers), records)
            print(json.dumps(s, indent=2) if args.json else
                  f"{args.answers} on {args.questions}\n{question_counts(s)}; answered {s['n_answered']}, "
                  f"{len(s['missing'])} missing (left out), {len(s['unscorable'])} unscorable (no ground "
                  f"truth), {len(s['unknown'])} answers to unknown ids\n\n"
                  f"{scores_table({Path(args.answers).name: s})}\n\n{LEGEND}")
        else:
            results = baselines(records)
            figures = {name: {k: s[k] for k in ("open", "closed", "overall")} for name, s in results.items()}
            print(json.dumps(figures, indent=2) if args.json else
                  f"{args.questions}\n{question_counts(results['always yes'])}\n\n"
                  f"{scores_table(results, 'baseline')}\n\n{LEGEND}")
    else:
        cfg = EvalConfig(**vars(build_parser().parse_args(argv)))
        if run(cfg) is not None:
            print(read_text(Path(cfg.out) / "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
