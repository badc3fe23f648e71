"""Zero-shot medical VQA evaluation, scored as LLaVA-Med scores it and with a strict closed score beside.

    python eval.py --model DIR --benchmark vqa_rad=VQA_RAD_test.jsonl --image-root IMAGES --out runs/base
    python eval.py --model DIR --adapter LORA_DIR --benchmark ... --out runs/hscr --blind
    python eval.py compare runs/base runs/hscr
    python eval.py score --answers ANSWERS --questions QUESTIONS   # score an existing answer file
    python eval.py baselines --questions QUESTIONS   # always yes / always no / "yes no" / majority
    torchrun --nproc_per_node 4 eval.py ...         # shard the questions over 4 processes

The question files may be the real benchmark files of ../shared/benchmarks/ as they are
(`gpt4_answer` is the ground truth); they ship without images, and a run whose image root lacks
some says which, before the model is loaded.

Three parts:

1. Scoring (LLaVA-Med v1.0 `llava/eval/eval_metrics` and `run_eval_batch.py`, facts in
   ../shared/FORMATS.md "VQA metrics"). The paper's numbers are open-question *recall* and
   closed-question *accuracy* computed by those scripts, quirks included, so that our scores
   equal LLaVA-Med's on the same answer file:
     - `normalize_word` punctuation rule is decided per string, not per occurrence;
     - only the first 32 stray periods are deleted (upstream passes `re.UNICODE` == 32 as the
       `count` argument of `re.sub`);
     - `calculate_f1score` normalises its (already normalised) inputs a second time and counts
       true positives with the *prediction's* word count, so repeating a right word raises recall;
     - closed accuracy is the substring test `gt in pred`, so "no" is found in "nodule", and an
       answer holding both "yes" and "no" hits every yes/no question (92.3 % on VQA-RAD closed,
       100 % on PathVQA).
   Beside it, ours: the strict closed accuracy (`strict_hit`: one yes/no answer, read by
   `closed_answer`, must equal the ground truth; a hedge or a non-answer is wrong), the hedge rate
   and the no-answer rate; the hallucination rate uses the same reading of the answer. The
   reference baselines (`baselines`) show what the language prior alone scores on a file.
   Where we knowingly differ from the scripts (none of it changes a lenient score of a complete file):
     - answers are matched to questions by id; a question without an answer is reported as
       missing and left out (the scripts zip the two files and assert equal id lists);
     - answer_id is a content hash (LLaVA-Med: a random shortuuid) and metadata holds the mode.
2. Generation: LLaVA-Med's prompt (`[INST] <image>\\n{question} [/INST]`), batched greedy
   decoding with left padding, answers in LLaVA-Med's answer-file JSONL, flushed per batch,
   resumable, sharded under torchrun (rank r answers questions r, r+world, ...; rank 0 merges).
3. "Does the model look?" (`--blind`): the same questions answered with every visual token
   dropped (`no_image`) and with a mean-colour image (`blank_image`); reported next to the
   full run as visual gain (full − blind) and hallucination rate.

Run directory:
    config.json                      resolved options
    {benchmark}/answers.jsonl        LLaVA-Med answer file (mode `full`)
    {benchmark}/answers-no_image.jsonl, answers-blank_image.jsonl   with --blind
    {benchmark}/answers*.rank{r}.jsonl   per-rank shards while running (merged, then removed)
    summary.json, report.md          scores
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from data import PAD_RGB, load_image, preprocess_image, read_records, resolve_image
from model import load_model
from model.lora import load_adapter
from model.tokenizer import build_prompt, decode, load_tokenizer, tokenize_prompt

# ---------------------------------------------------------------------------------------------
# Scoring: LLaVA-Med's normalize_word, split_sentence, calculate_f1score, calculate_exactmatch
# ---------------------------------------------------------------------------------------------

# Characters handled by the space-dependent rule, in LLaVA-Med's order (the order does not
# change the result: each character is replaced independently, and the tests read the input).
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
# Number words that LLaVA-Med maps to digits; only whole words, only up to ten.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# LLaVA-Med's contraction table (the VQA-v2 one). Keys with capitals ("Im", "Ive", "Id've")
# can never match because words are lowercased first; they are kept so the table is the same,
# and "somebody'd" maps to "somebodyd" upstream: kept too.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# A digit, a comma, a digit anywhere in the string switches the punctuation rule to "delete".
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Upstream writes "(?!<=\d)(\.)(?!\d)": the first group is a look-*ahead* for the text "<=d",
# which can never start where a period is, so the pattern is just "a period not before a digit".
_STRAY_PERIOD = re.compile(r"\.(?!\d)")
# Upstream calls period_strip.sub("", text, re.UNICODE); the third positional argument of
# Pattern.sub is `count`, and re.UNICODE == 32, so at most 32 periods go per call.
_MAX_PERIODS_PER_CALL = int(re.UNICODE)


def strip_punctuation(text: str) -> str:
    """Delete or space out each character of PUNCT, deciding per character for the whole string.

    A character is deleted everywhere if it stands next to a space anywhere in the *input*
    ("p " or " p"), or if the input contains a digit,digit pattern; otherwise every occurrence
    becomes a space. So "x-ray" → "x ray", "x - ray" → "x  ray", and in
    "x-ray - chest" the dash is deleted inside "x-ray" too → "xray  chest".
    """
    digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCT:
        if p + " " in text or " " + p in text or digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return out


def strip_periods(text: str) -> str:
    """Delete periods not followed by a digit ("3.5" keeps its point), at most 32 of them."""
    return _STRAY_PERIOD.sub("", text, count=_MAX_PERIODS_PER_CALL)


def normalize_words(text: str) -> str:
    """Word-level rules: number words → digits, drop articles, restore contractions, single spaces.

    The number map is applied before the article test and contractions after it, as upstream;
    commas cannot survive strip_punctuation, but the final comma removal is kept for parity.
    """
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def normalize_word(text: str) -> str:
    """LLaVA-Med's `normalize_word` on a lowercased string (the scripts lowercase before calling).

    Lowercasing first changes nothing in the punctuation and period steps, and the word step
    lowercases again, so this equals upstream `normalize_word(text.lower())`.
    """
    return normalize_words(strip_periods(strip_punctuation(text.lower())))


def word_counts(text: str) -> dict[str, int]:
    """Upstream `split_sentence(text, 1)`: lowercase, whitespace split, {word: count}."""
    counts: dict[str, int] = {}
    for w in text.lower().split():
        counts[w] = counts.get(w, 0) + 1
    return counts


def calculate_f1score(pred: str, gt: str) -> tuple[float, float, float]:
    """LLaVA-Med's token F1 → (f1, precision, recall); callers pass normalised strings.

    Both strings are normalised once more (upstream does; it only matters past 32 periods).
    Over the union of word types: tp += *prediction* count of shared words (the quirk: "lung
    lung lung" against "left lung" gives tp = 3, fn = 1, recall 3/4), fp += prediction count of
    words only predicted, fn += reference count of words only in the reference.
    Zeros if either side has no words or tp == 0.
    """
    p_words, g_words = word_counts(normalize_word(pred)), word_counts(normalize_word(gt))
    if not p_words or not g_words:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in p_words.items() if w in g_words)
    fp = sum(c for w, c in p_words.items() if w not in g_words)
    fn = sum(c for w, c in g_words.items() if w not in p_words)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def calculate_exactmatch(pred: str, gt: str) -> float:
    """LLaVA-Med's "exact match score": reference word *types* found in the prediction divided
    by the prediction's word count (with repeats); 0 for an empty prediction.

    Not an exact match in the usual sense ("left lung" vs "left lung" → 1, but "left left
    lung" → 2/3): it is what the LLaVA-Med tables call exact match, so it is what we report.
    Inputs are normalised again, as upstream.
    """
    p_words, g_words = word_counts(normalize_word(pred)), word_counts(normalize_word(gt))
    total = sum(p_words.values())
    return sum(1 for w in g_words if w in p_words) / total if total else 0.0


def closed_hit(pred: str, gt: str) -> bool:
    """LLaVA-Med's closed-question hit on normalised strings: `gt in pred` as a *substring*
    (`run_eval_batch.py`), so "no" is found in "nodule" and "cannot", and "yes no" hits every
    yes/no question. Kept because papers report it; `strict_hit` is the score that means it.
    (The single-dataset `run_eval.py` also requires a "yes" or "no" substring: no better.)
    """
    return gt in pred


# ---------------------------------------------------------------------------------------------
# Strict closed scoring: ours, not LLaVA-Med's, reported beside the lenient score
# ---------------------------------------------------------------------------------------------

# Words after which a "no" has ended its clause ("no or yes", "no but ...").
CONJUNCTIONS = ("and", "or", "but")
# Words and single punctuation characters of the raw text, in order ("no," → "no", ",").
_TOKENS = re.compile(r"\w+|[^\w\s]")


def answer_words(pred: str) -> list[str]:
    """The yes/no *answer words* of a raw prediction, in order.

    An answer word is a whole word "yes", or a whole word "no" that ends its clause: followed by
    the end of the text, a punctuation character, or a conjunction (and / or / but). A "no"
    followed by another word is a determiner ("no effusion", "no evidence of ..."), not an
    answer. Decided on the lowercased *raw* text, because LLaVA-Med's normalisation deletes the
    punctuation this rule reads: "No. Effusion is absent" → "no effusion is absent" would turn
    the answer into a determiner.
    """
    tokens = _TOKENS.findall(pred.lower())
    words = []
    for i, t in enumerate(tokens):
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        if t == "yes" or (t == "no" and (after is None or not after[0].isalnum() or after in CONJUNCTIONS)):
            words.append(t)
    return words


def closed_answer(pred: str) -> str | None:
    """What a raw prediction answers to a yes/no question: "yes", "no", "hedge" or None.

    The answer is the first answer word (`answer_words`); if answer words of both polarities
    occur it is a hedge, and with none there is no answer. Hedges and non-answers are wrong
    under `strict_hit`.

    Why this rule. Two plain rules each fail one case. "The first whole word yes/no wins" reads
    "Yes, but no effusion" right (yes) but lets the hedge "yes no" score on every yes-question;
    "both words present = wrong" stops the hedge but fails "Yes, but no effusion". What tells the
    two apart is the role of "no": in "no effusion" it is a determiner, in "yes and no" / "yes no"
    an answer. So:
        "Yes."                  → yes      "no, there is not"  → no (a comma ends the clause)
        "yes and no", "yes no"  → hedge    "Yes, but no effusion" → yes ("no" + word: determiner)
        "I am not sure"         → None     "nodule"            → None (whole words only)
    Deliberately strict where unclear: "No evidence of effusion" answers nothing (determiner,
    wherever it stands), and "There is no effusion" too; the no-answer rate shows how often that
    happens. Not a rule of LLaVA-Med's.
    """
    words = answer_words(pred)
    if not words:
        return None
    return "hedge" if len(set(words)) > 1 else words[0]


def strict_hit(pred: str, gt: str) -> bool:
    """Closed-question hit that hedging cannot earn; raw strings in.

    Ground truth "yes" / "no" (after normalize_word): the prediction's `closed_answer` must equal
    it. Any other closed answer ("left", "mri", "1"): the normalised ground truth must occur in
    the normalised prediction as whole words ("left" in "left lung", not in "cleft").
    """
    g = normalize_word(gt)
    if g in ("yes", "no"):
        return closed_answer(pred) == g
    return bool(g) and f" {g} " in f" {normalize_word(pred)} "


def hedges(pred: str) -> bool:
    """The hedge *rate* statistic: both "yes" and "no" as words of the normalised prediction.

    Broader than `closed_answer`'s hedge ("Yes, but no effusion" counts here): a plain
    word-level count of how often a model says both words at all, needing no reading of roles.
    """
    return {"yes", "no"} <= set(normalize_word(pred).split())


def score_answer(pred: str, gt: str, answer_type: str) -> dict[str, float]:
    """Score one answer as LLaVA-Med does (both strings lowercased and normalised first).

    CLOSED → {"hit", "strict", "exact"}: hit is LLaVA-Med's `closed_hit` (1.0 / 0.0), strict is
    our `strict_hit`.
    OPEN → {"recall", "precision", "f1", "exact", "hit"}: recall is the paper's open score;
    hit is `gt in pred` (the batch script's "open accuracy"; an empty reference always hits).
    """
    if not isinstance(pred, str) or not isinstance(gt, str):
        raise TypeError(f"pred and gt must be str, got {type(pred).__name__} and {type(gt).__name__}")
    p, g = normalize_word(pred), normalize_word(gt)
    if answer_type == "CLOSED":
        return {"hit": float(closed_hit(p, g)), "strict": float(strict_hit(pred, gt)),
                "exact": calculate_exactmatch(p, g)}
    if answer_type == "OPEN":
        f1, precision, recall = calculate_f1score(p, g)
        return {"recall": recall, "precision": precision, "f1": f1,
                "exact": calculate_exactmatch(p, g), "hit": float(g in p)}
    raise ValueError(f"answer_type must be 'OPEN' or 'CLOSED', got {answer_type!r}")


def _mean100(values: Sequence[float]) -> float | None:
    """Mean × 100, or None when there is nothing to average (an absent type is not 0 %)."""
    return 100.0 * sum(values) / len(values) if values else None


def score_file(answers: Iterable[Mapping[str, Any]], questions: Iterable[Any]) -> dict[str, Any]:
    """Score answer-file rows against questions; every figure is a percentage (× 100).

    answers: dicts with "question_id" and "text" (LLaVA-Med answer-file rows).
    questions: objects with `.id`, `.answer`, `.answer_type` (data.Record). Ids are compared
    as strings (answer files keep the question file's ints).

    Returns
      open:    n, recall (the paper's open score), precision, f1, exact, hit
      closed:  n, accuracy (lenient `closed_hit`, the paper's), accuracy_strict (`strict_hit`),
               hedge_rate (share of closed predictions with both "yes" and "no" as words, `hedges`),
               n_yes_no (closed questions whose answer is yes or no),
               no_answer_rate (share of those whose prediction has no answer word, `closed_answer`),
               n_gt_no, hallucination_rate (share of gt-"no" questions answered "yes" by
               `closed_answer`; a hedge is not counted as a yes)
      overall: n, score (mean over questions of open recall / closed hit),
               mean_of_types ((open recall + closed accuracy) / 2)
      n_questions, n_answered, missing (question ids without an answer: excluded, not 0),
      unknown (answer ids not among the questions), unscorable (questions without answer or type)
    A question answered twice is an error: merge shards before scoring.
    """
    texts: dict[str, str] = {}
    duplicates = []
    for row in answers:
        qid = str(row["question_id"])
        if qid in texts:
            duplicates.append(qid)
        texts[qid] = row["text"]
    if duplicates:
        raise ValueError(f"answers hold question ids more than once: {sorted(set(duplicates))[:20]}")

    open_s: dict[str, list[float]] = {k: [] for k in ("recall", "precision", "f1", "exact", "hit")}
    hits, hits_strict, hedged, no_answer, gt_no_says_yes = [], [], [], [], []
    missing, unscorable, seen = [], [], set()
    for q in questions:
        qid = str(q.id)
        seen.add(qid)
        if q.answer is None or q.answer_type not in ("OPEN", "CLOSED"):
            unscorable.append(qid)
        elif qid not in texts:
            missing.append(qid)
        elif q.answer_type == "OPEN":
            for k, v in score_answer(texts[qid], q.answer, "OPEN").items():
                open_s[k].append(v)
        else:
            pred, g = texts[qid], normalize_word(q.answer)
            hits.append(float(closed_hit(normalize_word(pred), g)))
            hits_strict.append(float(strict_hit(pred, q.answer)))
            hedged.append(float(hedges(pred)))
            if g in ("yes", "no"):
                no_answer.append(float(closed_answer(pred) is None))
            if g == "no":
                gt_no_says_yes.append(float(closed_answer(pred) == "yes"))
    open_recall, closed_acc = _mean100(open_s["recall"]), _mean100(hits)
    both = [open_recall, closed_acc]
    return {
        "open": {"n": len(open_s["recall"]), **{k: _mean100(v) for k, v in open_s.items()}},
        "closed": {"n": len(hits), "accuracy": closed_acc, "accuracy_strict": _mean100(hits_strict),
                   "hedge_rate": _mean100(hedged), "n_yes_no": len(no_answer),
                   "no_answer_rate": _mean100(no_answer), "n_gt_no": len(gt_no_says_yes),
                   "hallucination_rate": _mean100(gt_no_says_yes)},
        "overall": {"n": len(hits) + len(open_s["recall"]),
                    "score": _mean100(open_s["recall"] + hits),
                    "mean_of_types": None if None in both else sum(both) / 2},
        "n_questions": len(seen),
        "n_answered": len(seen) - len(missing) - len(unscorable),
        "missing": missing,
        "unknown": [qid for qid in texts if qid not in seen],
        "unscorable": unscorable,
    }


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

MODES = ("full", "no_image", "blank_image")


@dataclass
class EvalConfig:
    """Options of an evaluation run (the argparse flags are built from these fields)."""

    model: str = field(metadata={"help": "checkpoint directory (config.json + safetensors)"})
    benchmark: list[str] = field(metadata={"help": "NAME=PATH of a test.json or question JSONL; repeat"})
    out: str = field(metadata={"help": "run directory (answers, summary.json, report.md)"})
    image_root: list[str] = field(default_factory=list, metadata={
        "help": "NAME=DIR for one benchmark, or DIR for all; repeat"})
    ground_truth: list[str] = field(default_factory=list, metadata={
        "help": "NAME=PATH of answers kept apart from the questions; repeat"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT-format LoRA adapter directory"})
    vision_tower: str | None = field(default=None, metadata={
        "help": "CLIP directory replacing (or supplying) the checkpoint's vision tower"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: --model)"})
    template: str = field(default="mistral_instruct", metadata={"help": "prompt template"})
    batch_size: int = field(default=8, metadata={"help": "questions per generate() call"})
    max_new_tokens: int = field(default=1024, metadata={"help": "LLaVA-Med used 1024"})
    blind: bool = field(default=False, metadata={
        "help": "also answer with no visual tokens and with a mean-colour image"})
    limit: int | None = field(default=None, metadata={"help": "first N questions of each benchmark"})
    dtype: str = field(default="auto", metadata={
        "help": "float32 | float16 | bfloat16; auto = float16 on GPU (LLaVA-Med's), float32 on CPU"})
    device: str = field(default="auto", metadata={"help": "auto = cuda:LOCAL_RANK if available, else cpu"})
    model_id: str | None = field(default=None, metadata={
        "help": "model_id written in the answer files (default: the model directory's name)"})


def build_parser() -> argparse.ArgumentParser:
    """argparse over EvalConfig: list fields repeat, bool fields are switches."""
    parser = argparse.ArgumentParser(
        prog="eval.py", description="Zero-shot VQA evaluation scored as LLaVA-Med scores it. "
        "Also: `eval.py compare RUN_A RUN_B`, `eval.py score --answers FILE --questions FILE`, "
        "`eval.py baselines --questions FILE`.")
    for f in dataclasses.fields(EvalConfig):
        flag, kw = "--" + f.name.replace("_", "-"), {"help": f.metadata["help"]}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", **kw)
        elif f.type == "list[str]":
            parser.add_argument(flag, action="append", required=required, default=None if required else [], **kw)
        else:
            kind = int if f.type in ("int", "int | None") else str
            parser.add_argument(flag, type=kind, required=required,
                                default=None if required else f.default, **kw)
    return parser


def parse_named(values: Sequence[str], flag: str, *, names: Sequence[str] | None = None,
                allow_global: bool = False) -> dict[str, str]:
    """NAME=PATH values → {name: path}, NAME limited to `names` when given. With allow_global a
    value that names no benchmark is a path for all of them (key "*")."""
    out, problems = {}, []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name and path and (names is None or name in names):
            if name in out:
                problems.append(f"{flag} {name!r} given twice")
            out[name] = path
        elif allow_global:
            out["*"] = value
        else:
            problems.append(f"{flag} {value!r} is not NAME=PATH" + (f" with NAME in {list(names)}" if names else ""))
    if problems:
        raise ValueError("; ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------
# Batches: prompts, images, the three modes
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, left-padded
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    pixel_values: torch.Tensor | None  # (B, 3, S, S) float, None in no_image mode


def prompt_ids(question: str, tokenizer, config, *, mode: str, template: str) -> list[int]:
    """LLaVA-Med's prompt for one question: `[INST] <image>\\n{question} [/INST]`, tokenised
    chunk-wise around the image. In `no_image` mode the same text gets zero image positions:
    every visual token is dropped, the "▁" pieces around the image stay."""
    prompt = build_prompt(question, template)
    if mode != "no_image":
        return tokenize_prompt(tokenizer, prompt, image_token_id=config.image_token_id,
                               num_image_tokens=config.num_image_tokens, bos_token_id=config.text.bos_token_id)
    # tokenize_prompt wants at least one image position: mark it with an id no tokenizer
    # produces (-1; chunked tokenization never looks it up) and take it out again.
    ids = tokenize_prompt(tokenizer, prompt, image_token_id=-1, num_image_tokens=1,
                          bos_token_id=config.text.bos_token_id)
    return [i for i in ids if i != -1]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """(B, T) ids and mask with every row right-aligned, as generate() expects."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def blank_image(size: int):
    """The mean-colour image (CLIP mean × 255, what LLaVA pads with), preprocessed: ~0 after
    normalisation, so the model sees an image that shows nothing."""
    return preprocess_image(Image.new("RGB", (size, size), PAD_RGB), size=size)


def build_batch(records: Sequence[Any], mode: str, *, tokenizer, config, image_root: str | None,
                template: str = "mistral_instruct") -> Batch:
    """Model inputs for a list of data.Record in one of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows = [prompt_ids(r.question, tokenizer, config, mode=mode, template=template) for r in records]
    pad = config.text.pad_token_id if config.text.pad_token_id is not None else config.text.eos_token_id
    ids, mask = left_pad(rows, pad)
    size = config.vision.image_size
    if mode == "no_image":
        pixels = None
    elif mode == "blank_image":
        pixels = blank_image(size)[None].expand(len(records), -1, -1, -1)  # (B, 3, S, S)
    else:
        pixels = torch.stack([preprocess_image(load_image(resolve_image(image_root, r.image)), size=size)
                              for r in records])  # (B, 3, S, S)
    return Batch(ids, mask, pixels)


def check_images(records: Sequence[Any], image_root: str | None, name: str, source: str | None = None,
                 show: int = 10) -> None:
    """Fail before the model is loaded when images are missing, with one error that names the
    benchmark (and its question file), says how many image files are absent for how many
    questions, and lists the first `show` of them. The real benchmark files ship without images."""
    if not records:
        return
    where = f"benchmark {name!r}" + (f" ({source})" if source else "")
    if image_root is None:
        raise ValueError(f"{where}: no --image-root for it (NAME=DIR or one DIR for all)")
    unusable, absent, n_questions = [], {}, 0  # absent: image path as written → its file
    for r in records:
        if r.image is None:
            unusable.append(f"{r.id}: no image in the record")
            continue
        try:
            path = resolve_image(image_root, r.image)
        except ValueError as error:
            unusable.append(f"{r.id}: {error}")
            continue
        if r.image in absent or not path.is_file():
            absent[r.image] = path
            n_questions += 1
    problems = []
    if absent:
        n_images = len({r.image for r in records if r.image is not None})
        listed = list(absent)[:show]
        problems.append(f"{len(absent)} of {n_images} images not found under {image_root} (needed by "
                        f"{n_questions} of {len(records)} questions): {', '.join(listed)}"
                        + (f", … ({len(absent) - show} more)" if len(absent) > show else ""))
    if unusable:
        problems.append(f"{len(unusable)} questions without a usable image path: " + "; ".join(unusable[:show])
                        + (" …" if len(unusable) > show else ""))
    if problems:
        raise FileNotFoundError(f"{where}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Answer files: LLaVA-Med's JSONL, resumable, one shard per rank
# ---------------------------------------------------------------------------------------------

def answers_path(run_dir: Path, name: str, mode: str, rank: int | None = None) -> Path:
    """{run}/{benchmark}/answers[-mode][.rank{r}].jsonl (mode `full` is LLaVA-Med's answer file)."""
    stem = "answers" if mode == "full" else f"answers-{mode}"
    return run_dir / name / (f"{stem}.jsonl" if rank is None else f"{stem}.rank{rank}.jsonl")


def answer_id(model_id: str, mode: str, question_id: str, text: str) -> str:
    """A content hash in place of LLaVA-Med's random shortuuid, so that a resumed run writes
    the same file as an uninterrupted one."""
    return hashlib.sha1(f"{model_id}\n{mode}\n{question_id}\n{text}".encode()).hexdigest()[:22]


def answer_row(record, text: str, model_id: str, mode: str) -> dict[str, Any]:
    """One answer-file line. question_id keeps the question file's integer when it was one
    (Record ids are strings); prompt is the question without <image>, as LLaVA-Med writes it."""
    qid: int | str = int(record.id) if record.id.isdigit() and str(int(record.id)) == record.id else record.id
    return {"question_id": qid, "prompt": record.question, "text": text,
            "answer_id": answer_id(model_id, mode, record.id, text), "model_id": model_id,
            "metadata": {"mode": mode}}


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Rows of an answer file. A last line cut short by an interrupted write is ignored (and
    answered again); any other unreadable line is an error."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows, problems = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i < len(lines) - 1:
                problems.append(f"line {i + 1}: {error}")
    if problems:
        raise ValueError(f"{path}: unreadable answer lines: {'; '.join(problems[:5])}")
    return rows


def _shards(run_dir: Path, name: str, mode: str) -> list[Path]:
    pattern = answers_path(run_dir, name, mode, 0).name.replace(".rank0.", ".rank*.")
    return sorted((run_dir / name).glob(pattern))


def answered_ids(run_dir: Path, name: str, mode: str) -> set[str]:
    """Ids answered by an earlier (interrupted) run: the merged file and every shard, so that a
    rerun with another world size still skips them."""
    files = [answers_path(run_dir, name, mode)] + _shards(run_dir, name, mode)
    return {str(row["question_id"]) for f in files for row in read_answers(f)}


def merge_answers(run_dir: Path, name: str, mode: str, records: Sequence[Any]) -> Path:
    """Fold the shards into the answer file, in question-file order (rows of questions outside
    `records`, e.g. from a run without --limit, follow), then delete the shards."""
    final, shards = answers_path(run_dir, name, mode), _shards(run_dir, name, mode)
    by_id: dict[str, dict] = {}
    for f in [final] + shards:
        for row in read_answers(f):
            by_id.setdefault(str(row["question_id"]), row)
    order = [r.id for r in records if r.id in by_id]
    listed = set(order)
    order += [qid for qid in by_id if qid not in listed]
    tmp = final.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(by_id[qid]) + "\n" for qid in order), encoding="utf-8")
    os.replace(tmp, final)  # atomic: an interrupted merge leaves the old file and the shards
    for f in shards:
        f.unlink()
    return final


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, records: Sequence[Any], *, run_dir: Path, name: str, mode: str,
                     image_root: str | None, model_id: str, batch_size: int, max_new_tokens: int,
                     template: str = "mistral_instruct", rank: int = 0, world: int = 1) -> int:
    """Answer this rank's share of `records` (every world-th, starting at rank) that no earlier
    run answered; append to the rank's shard, flushed per batch. Returns how many were answered."""
    done = answered_ids(run_dir, name, mode)
    todo = [r for i, r in enumerate(records) if i % world == rank and r.id not in done]
    shard = answers_path(run_dir, name, mode, rank)
    shard.parent.mkdir(parents=True, exist_ok=True)
    # Rewrite the shard without a torn last line before appending to it.
    if shard.is_file():
        shard.write_text("".join(json.dumps(r) + "\n" for r in read_answers(shard)), encoding="utf-8")
    eos = model.config.text.eos_token_id
    with open(shard, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc=f"{name} {mode}", unit="q", disable=rank != 0 or not todo) as bar:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            batch = build_batch(chunk, mode, tokenizer=tokenizer, config=model.config,
                                image_root=image_root, template=template)
            pixels = None if batch.pixel_values is None else batch.pixel_values.to(model.device, model.dtype)
            with torch.inference_mode():
                new = model.generate(batch.input_ids.to(model.device), pixels,
                                     batch.attention_mask.to(model.device), max_new_tokens=max_new_tokens,
                                     temperature=0.0, eos_token_id=eos)  # (B, T_new)
            for record, ids in zip(chunk, new.tolist()):
                text = decode(tokenizer, ids, eos_token_id=eos)
                f.write(json.dumps(answer_row(record, text, model_id, mode)) + "\n")
            f.flush()
            bar.update(len(chunk))
    return len(todo)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

# (label, section, key) of the figures shown in reports and comparisons.
METRICS = (("open recall", "open", "recall"), ("closed acc", "closed", "accuracy"),
           ("closed strict", "closed", "accuracy_strict"), ("hedge rate", "closed", "hedge_rate"),
           ("no answer", "closed", "no_answer_rate"), ("overall", "overall", "score"),
           ("halluc. rate", "closed", "hallucination_rate"))
# What the labels mean, under every table (a markdown list, readable in a terminal too).
LEGEND = "\n".join((
    "- open recall: LLaVA-Med's open score (mean token recall × 100)",
    "- closed acc: LLaVA-Med's lenient closed score, `gt in pred` on normalised strings (\"yes no\" hits "
    "every yes/no question)",
    "- closed strict: a yes/no question needs the prediction's one yes/no answer to equal gt (hedges and "
    "non-answers are wrong); other closed answers must occur as whole words",
    "- hedge rate: % of closed predictions holding both \"yes\" and \"no\" as words",
    "- no answer: % of yes/no questions whose prediction gives no yes/no answer",
    "- overall: mean over questions of open recall and lenient closed hits",
    "- halluc. rate: % of questions with answer \"no\" answered \"yes\""))
MODE_LABELS = {"full": "full", "no_image": "no image", "blank_image": "blank image"}


def _fig(scores: Mapping[str, Any], section: str, key: str) -> float | None:
    return scores[section].get(key)  # None (shown "–") for figures older summaries lack


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _fmt(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def visual_gain(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """full − blind for every metric and every blind mode that was run (positive: the image helps;
    for the hallucination rate, negative: the image lowers it)."""
    return {mode: {label: _diff(_fig(modes[mode], s, k), _fig(modes["full"], s, k)) for label, s, k in METRICS}
            for mode in MODES[1:] if mode in modes and "full" in modes}


def benchmark_table(name: str, entry: Mapping[str, Any]) -> str:
    """Markdown: one row per mode, then one row of visual gain per blind mode."""
    full = entry["modes"]["full"]
    lines = [f"### {name}", "",
             f"{full['n_questions']} questions read, {len(entry['bad_records'])} malformed records skipped; "
             f"answered {full['open']['n']} open, {full['closed']['n']} closed; {len(full['missing'])} missing", "",
             "| mode | " + " | ".join(label for label, _, _ in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for mode, scores in entry["modes"].items():
        lines.append(f"| {MODE_LABELS[mode]} | " + " | ".join(_fmt(_fig(scores, s, k)) for _, s, k in METRICS) + " |")
    for mode, gains in entry["visual_gain"].items():
        lines.append(f"| visual gain (full − {MODE_LABELS[mode]}) | "
                     + " | ".join(_fmt(gains[label], signed=True) for label, _, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path, cfg: EvalConfig, results: Mapping[str, Any]) -> None:
    """summary.json (config + every figure) and report.md (a table per benchmark)."""
    (run_dir / "summary.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "benchmarks": results}, indent=2), encoding="utf-8")
    text = ["# Evaluation", "", f"model `{cfg.model}`" + (f", adapter `{cfg.adapter}`" if cfg.adapter else ""),
            "", LEGEND, ""]
    text += [benchmark_table(name, entry) for name, entry in results.items()]
    (run_dir / "report.md").write_text("\n".join(text), encoding="utf-8")


def compare_runs(run_a: str | Path, run_b: str | Path) -> str:
    """Two runs side by side: every figure of both summaries, and B − A."""
    summaries = []
    for run in (run_a, run_b):
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} an eval.py run directory?")
        summaries.append(json.loads(path.read_text(encoding="utf-8"))["benchmarks"])
    a, b = summaries
    lines = [f"A = {run_a}", f"B = {run_b}", ""]
    for name in list(a) + [n for n in b if n not in a]:
        lines += [f"### {name}", "", "| mode | metric | A | B | B − A |", "|---|---|---:|---:|---:|"]
        modes = [m for m in MODES if m in a.get(name, {}).get("modes", {}) or m in b.get(name, {}).get("modes", {})]
        for mode in modes:
            for label, s, k in METRICS:
                fa, fb = (_fig(x[name]["modes"][mode], s, k) if mode in x.get(name, {}).get("modes", {}) else None
                          for x in (a, b))
                lines.append(f"| {MODE_LABELS[mode]} | {label} | {_fmt(fa)} | {_fmt(fb)} "
                             f"| {_fmt(_diff(fa, fb), True)} |")
        lines.append("")
    return "\n".join(lines)


def scores_table(rows: Mapping[str, Mapping[str, Any]], first: str = "answers") -> str:
    """Markdown: one row per score_file result, the METRICS as columns (lenient and strict side by side)."""
    lines = [f"| {first} | " + " | ".join(label for label, _, _ in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(_fig(scores, s, k)) for _, s, k in METRICS) + " |")
    return "\n".join(lines)


def _counts(scores: Mapping[str, Any]) -> str:
    c = scores["closed"]
    return (f"{scores['n_questions']} questions: {c['n']} closed ({c['n_yes_no']} with answer yes/no, "
            f"{c['n_gt_no']} of them no), {scores['open']['n']} open")


# ---------------------------------------------------------------------------------------------
# Reference baselines: what answering without looking (without a model at all) scores
# ---------------------------------------------------------------------------------------------

# name → the one string answered to every question, closed and open alike.
CONSTANT_BASELINES = {"always yes": "yes", "always no": "no", "hedge \"yes no\"": "yes no"}
MAJORITY_BASELINES = {"majority per question text": False, "majority, leave-one-out": True}
BASELINES_HELP = (
    "Reference baselines that need no model, scored like a model's answers. The constant ones answer the "
    "same string to every question, open questions included: \"yes\", \"no\", and the hedge \"yes no\". "
    "The majority ones answer only the open questions (closed columns show –): each gets the most common "
    "normalised ground truth among the open questions of the same file with the same normalised question "
    "text (ties: the answer met first in file order). That prior is computed on the test file itself, so "
    "it is oracle-ish: a question text that occurs once gets its own answer. The leave-one-out row leaves "
    "the question's own answer out of the count (an empty answer when no other question shares the text), "
    "which is the part of the score the question text alone predicts.")


def majority_answers(records: Sequence[Any], *, leave_one_out: bool = False) -> dict[str, str]:
    """Open question id → the most common normalised answer among the open `records` whose
    normalised question text is the same. Ties go to the answer met first in file order; with
    leave_one_out the question's own answer is not counted ("" when it is alone)."""
    groups: dict[str, list[Any]] = {}
    for r in records:
        if r.answer_type == "OPEN" and r.answer is not None:
            groups.setdefault(normalize_word(r.question), []).append(r)
    out = {}
    for group in groups.values():
        counts: dict[str, int] = {}  # insertion order = file order, which max() keeps for ties
        for r in group:
            a = normalize_word(r.answer)
            counts[a] = counts.get(a, 0) + 1
        for r in group:
            own = normalize_word(r.answer)
            pool = {a: c - (leave_one_out and a == own) for a, c in counts.items()}
            out[r.id] = max(pool, key=pool.get) if max(pool.values()) > 0 else ""
    return out


def baselines(records: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """name → score_file result of every reference baseline (see BASELINES_HELP) on `records`."""
    answers = {name: [{"question_id": r.id, "text": text} for r in records]
               for name, text in CONSTANT_BASELINES.items()}
    for name, leave_one_out in MAJORITY_BASELINES.items():
        answers[name] = [{"question_id": qid, "text": text}
                         for qid, text in majority_answers(records, leave_one_out=leave_one_out).items()]
    return {name: score_file(rows, records) for name, rows in answers.items()}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; joins a gloo group when world > 1
    (gloo: the group only carries barriers, and works with or without GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        if not dist.is_initialized():
            # Ranks wait for each other at the merge; a benchmark can take hours on one rank.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def load_benchmarks(cfg: EvalConfig) -> dict[str, tuple[list[Any], list[Any]]]:
    """name → (records, bad records), through data.read_records, cut to --limit."""
    paths = parse_named(cfg.benchmark, "--benchmark")
    gts = parse_named(cfg.ground_truth, "--ground-truth", names=list(paths))
    out = {}
    for name, path in paths.items():
        records, bad = read_records(path, answers_path=gts.get(name))
        out[name] = (records[:cfg.limit] if cfg.limit is not None else records, bad)
    return out


def load_for_eval(cfg: EvalConfig, device: str):
    """Model (with the LoRA adapter applied, unmerged) and tokenizer."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if cfg.dtype not in dtype and cfg.dtype != "auto":
        raise ValueError(f"--dtype must be auto or one of {list(dtype)}, got {cfg.dtype!r}")
    torch_dtype = dtype.get(cfg.dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    model = load_model(cfg.model, vision_tower=cfg.vision_tower, dtype=torch_dtype, device=device)
    if cfg.adapter is not None:
        load_adapter(model, cfg.adapter, dropout=0.0)
        model.to(device)
    return model.eval(), load_tokenizer(cfg.tokenizer or cfg.model)


def run(cfg: EvalConfig) -> dict[str, Any] | None:
    """Generate (resuming), merge, score and report. Returns the results on rank 0."""
    problems = [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in
                (("batch_size", cfg.batch_size), ("max_new_tokens", cfg.max_new_tokens), ("limit", cfg.limit))
                if v is not None and v < 1]
    if problems:
        raise ValueError("; ".join(problems))
    rank, world, local = _distributed()
    device = cfg.device if cfg.device != "auto" else (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.out)
    benchmarks = load_benchmarks(cfg)
    roots = parse_named(cfg.image_root, "--image-root", names=list(benchmarks), allow_global=True)
    sources = parse_named(cfg.benchmark, "--benchmark")
    modes = MODES if cfg.blind else MODES[:1]
    for name, (records, bad) in benchmarks.items():
        for b in bad if rank == 0 else []:
            print(f"{name}: bad record {b.file}[{b.index}] id={b.id}: {b.reason}", file=sys.stderr)
        # Before the (slow) model load: the images of every question still to answer with one.
        done = answered_ids(run_dir, name, "full")
        check_images([r for r in records if r.id not in done], roots.get(name, roots.get("*")), name,
                     source=sources[name])
    model, tokenizer = load_for_eval(cfg, device)
    model_id = cfg.model_id or Path(cfg.model).resolve().name
    if rank == 0:  # the options as given, and what "auto" and the defaults resolved to
        resolved = {**dataclasses.asdict(cfg), "resolved": {
            "device": device, "dtype": str(model.dtype).removeprefix("torch."), "world_size": world,
            "model_id": model_id, "num_image_tokens": model.config.num_image_tokens}}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2), encoding="utf-8")
        print(json.dumps(resolved, indent=2), file=sys.stderr)
    for name, (records, _) in benchmarks.items():
        for mode in modes:
            generate_answers(model, tokenizer, records, run_dir=run_dir, name=name, mode=mode,
                             image_root=roots.get(name, roots.get("*")), model_id=model_id,
                             batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                             template=cfg.template, rank=rank, world=world)
            _barrier(world)
            if rank == 0:
                merge_answers(run_dir, name, mode, records)
    if rank != 0:
        return None
    results = {}
    for name, (records, bad) in benchmarks.items():
        ids = {r.id for r in records}
        scored = {mode: score_file([row for row in read_answers(answers_path(run_dir, name, mode))
                                    if str(row["question_id"]) in ids], records) for mode in modes}
        results[name] = {"bad_records": [dataclasses.asdict(b) for b in bad], "modes": scored,
                         "visual_gain": visual_gain(scored)}
    write_reports(run_dir, cfg, results)
    return results


def _read_questions(path: str, ground_truth: str | None) -> list[Any]:
    records, bad = read_records(path, answers_path=ground_truth)
    for b in bad:
        print(f"bad record {b.file}[{b.index}] id={b.id}: {b.reason}", file=sys.stderr)
    return records


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="eval.py compare", description="two runs side by side, with B − A")
        p.add_argument("run_a")
        p.add_argument("run_b")
        args = p.parse_args(argv[1:])
        print(compare_runs(args.run_a, args.run_b))
    elif argv[:1] == ["score"]:
        p = argparse.ArgumentParser(prog="eval.py score", description="Score an existing answer file (ours or "
                                    "one written by LLaVA-Med's scripts) without a model: LLaVA-Med's lenient "
                                    "figures and the strict ones side by side.")
        p.add_argument("--answers", required=True, help="answer-file JSONL (question_id and text per line)")
        p.add_argument("--questions", required=True, help="test.json or question JSONL, e.g. "
                       "../shared/benchmarks/VQA_RAD_test_llavamed_format.jsonl")
        p.add_argument("--ground-truth", help="answers kept apart from the questions")
        p.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
        args = p.parse_args(argv[1:])
        records = _read_questions(args.questions, args.ground_truth)
        s = score_file(read_answers(Path(args.answers)), records)
        if args.json:
            print(json.dumps(s, indent=2))
            return
        print(f"{args.answers} on {args.questions}\n{_counts(s)}; answered {s['n_answered']}, "
              f"{len(s['missing'])} missing (left out), {len(s['unknown'])} answers to unknown ids\n")
        print(scores_table({Path(args.answers).name: s}) + "\n\n" + LEGEND)
    elif argv[:1] == ["baselines"]:
        p = argparse.ArgumentParser(prog="eval.py baselines", description=BASELINES_HELP)
        p.add_argument("--questions", required=True, help="test.json or question JSONL with answers")
        p.add_argument("--ground-truth", help="answers kept apart from the questions")
        p.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
        args = p.parse_args(argv[1:])
        records = _read_questions(args.questions, args.ground_truth)
        results = baselines(records)
        if args.json:
            print(json.dumps({name: {k: s[k] for k in ("open", "closed", "overall")} for name, s in results.items()},
                             indent=2))
            return
        print(f"{args.questions}\n{_counts(results['always yes'])}\n")
        print(scores_table(results, "baseline") + "\n\n" + LEGEND)
    else:
        cfg = EvalConfig(**vars(build_parser().parse_args(argv)))
        results = run(cfg)
        if results is not None:
            print((Path(cfg.out) / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
