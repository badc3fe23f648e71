"""train.py's inputs and their batches: preference records (hscr.py's output) become rows of token
ids with a mask of the tokens trained on (`Example`); the rows of a micro-batch are packed into
tensors for one forward pass (`collate`) and their log-probs split back per entry (`split_rows`).
`read_inputs` reads what a run needs before the (slow) model load: tokenizer, model config,
examples, held-out examples, and the images, each checked once.

Preference file (docs/FORMATS.md): a header line {"_header": true, "options", "provenance"}, then
JSON lines {"id", "image", "question", "prompt" (optional), "chosen", "chosen_ids",
"chosen_complete", "negatives": [{"text", "similarity", "ids", "complete"}, …] ranked best first};
"rejected" (a string or a list of strings) is read when "negatives" is absent. The responses are
trained on the token ids hscr.py stored when the header's tokenizer digest is the one of the
tokenizer used here, else re-tokenized from their texts (`read_preferences` says which, once); a
response stored as incomplete (cut at hscr.py's --max-new-tokens) gets no EOS.

A bad record becomes a BadRecord (file, index, id, reason) and reading goes on. Images are looked
at after reading (`unusable_images`: header, checksums and a full decode, each file once), so that
a corrupt, empty, truncated or oversized image skips its record before training starts instead of
stopping it at some step. `cfg` is train.py's TrainConfig and `ctx` its Context
(harness/dist.py); this module never imports train.py. demo/base.py reads LLaVA conversations
into the same Examples (`read_sft`) for the demo's base model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from data import BadRecord, image_problem, load_pixels, resolve_image
from harness import provenance
from harness.cli import UserError
from harness.files import BadLine, DataError, read_json_records
from harness.rundir import report_skipped
from model.llava import LlavaConfig
from model.loading import read_config, read_vision_config
from model.tokenizer import (IMAGE_TOKEN, TEMPLATES, build_prompt, load_tokenizer, tokenize_prompt,
                             tokenize_response, tokenizer_file)



@dataclass
class Example:
    """One training entry: its image and the token rows of its responses.

    Preference: rows[0] = prompt + y_w, rows[1:] = prompt + y_lj (best first). SFT (demo/base.py):
    one row, the whole conversation. `targets[r][t]` is True where token t of row r is trained on.
    `file` and `index` say where the record is (for bad_records.jsonl).
    """
    id: str
    image: Path | None
    rows: list[list[int]]
    targets: list[list[bool]]
    file: str = ""
    index: int = -1


@dataclass
class Response:
    """A response of a preference record: its text, and the token ids hscr.py generated or scored
    for it (without EOS; None when the record has none). complete=False: the response was cut
    before its EOS (at hscr.py's --max-new-tokens), so training appends none."""
    text: str
    ids: list[int] | None = None
    complete: bool = True


def _stored_ids(value: object, key: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{key} must be a list of token ids")
    return value


def _complete(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _preference_fields(item: object, num_negatives: int):
    """(id, image, question, prompt or None, chosen Response, negative Responses) of a preference
    record, or ValueError(reason)."""
    if isinstance(item, BadLine):
        raise ValueError(item.message)
    if not isinstance(item, dict):
        raise ValueError(f"a record must be an object, not {type(item).__name__}")
    missing = [k for k in ("id", "question", "chosen") if k not in item]
    if "negatives" not in item and "rejected" not in item:
        missing.append("negatives")
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(item["id"], (str, int)):
        raise ValueError(f"id must be a string, got {item['id']!r}")
    for key in ("question", "chosen"):
        if not isinstance(item[key], str) or not item[key].strip():
            raise ValueError(f"{key} must be a non-empty string")
    prompt = item.get("prompt")  # hscr.py stores the prompt text it scored with
    if prompt is not None and (not isinstance(prompt, str)
                               or prompt.count(IMAGE_TOKEN) != (item.get("image") is not None)):
        raise ValueError(f"prompt must be a string with one {IMAGE_TOKEN} if the record has an image, else none")
    image = item.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"image must be a path string or null, got {image!r}")
    raw = item["negatives"] if "negatives" in item else item["rejected"]
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list):
        raise ValueError("negatives must be a list")
    negatives = []
    for j, n in enumerate(raw[:num_negatives]):
        n = n if isinstance(n, dict) else {"text": n}
        if not isinstance(n.get("text"), str) or not n["text"].strip():
            raise ValueError("every negative must be a non-empty string or an object with a non-empty 'text'")
        negatives.append(Response(n["text"], _stored_ids(n.get("ids"), f"negatives[{j}].ids"),
                                  _complete(n.get("complete", True), f"negatives[{j}].complete")))
    chosen = Response(item["chosen"], _stored_ids(item.get("chosen_ids"), "chosen_ids"),
                      _complete(item.get("chosen_complete", True), "chosen_complete"))
    return str(item["id"]), image, item["question"], prompt, chosen, negatives


def image_file(image: str | None, image_root: Path) -> Path | None:
    """The file of a record's image path (None: no image); a missing file is the record's error."""
    if image is None:
        return None
    path = resolve_image(image_root, image)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    return path


class Tokens:
    """The prompt / response tokenization of train.py and demo/base.py's SFT (model/tokenizer.py)."""

    def __init__(self, tokenizer, config):
        self.tokenizer, self.text = tokenizer, config.text
        self.image_token_id, self.num_image_tokens = config.image_token_id, config.num_image_tokens
        self.image_size = config.vision.image_size

    def prompt(self, question: str, with_image: bool, first: bool = True, text: str | None = None) -> list[int]:
        """Ids of the prompt `text`, or of the template around `question` (the image first)."""
        if text is None:
            text = build_prompt(question) if with_image else \
                TEMPLATES["mistral_instruct"].format(user=question.replace(IMAGE_TOKEN, "").strip())
        return tokenize_prompt(self.tokenizer, text, image_token_id=self.image_token_id,
                               num_image_tokens=self.num_image_tokens,
                               bos_token_id=self.text.bos_token_id if first else None)

    def response(self, text: str, limit: int | None = None, complete: bool = True) -> list[int]:
        """Ids of a response, then EOS unless it is incomplete (cut before its end); at most `limit`."""
        ids = tokenize_response(self.tokenizer, text.strip(),
                                eos_token_id=self.text.eos_token_id if complete else None)
        return ids[:limit] if limit else ids

    def stored(self, ids: list[int], limit: int | None = None, complete: bool = True) -> list[int]:
        """Stored response ids (as hscr.py wrote them, without EOS), then EOS unless incomplete."""
        bad = sorted({i for i in ids if not 0 <= i < self.text.vocab_size or i == self.image_token_id})
        if bad:
            raise ValueError(f"stored token ids {bad[:5]} are not text tokens of this model "
                             f"(vocabulary {self.text.vocab_size}, image token {self.image_token_id})")
        ids = ids + [self.text.eos_token_id] if complete else list(ids)
        return ids[:limit] if limit else ids


def preference_header(path: Path) -> dict | None:
    """The header line hscr.py writes first in a preference file ({"_header": true, "options",
    "provenance"}), or None when the file has none (or its first line does not parse: reading
    the records reports that)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        item = json.loads(first.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return item if isinstance(item, dict) and item.get("_header") else None


def stored_ids_usable(header: dict | None, tokenizer_sha256: str | None) -> tuple[bool, str]:
    """Whether the token ids stored in a preference file are those this tokenizer gives: the
    header's provenance must name a tokenizer with the same digest. Returns (usable, why not)."""
    made = (header or {}).get("provenance")
    made = made.get("tokenizer") if isinstance(made, dict) else None
    if not isinstance(made, dict) or not isinstance(made.get("sha256"), str):
        return False, "its header records no tokenizer digest (written by an older hscr.py or another program)"
    if tokenizer_sha256 is None:
        return False, "the tokenizer used here has no digest to compare"
    if made["sha256"] != tokenizer_sha256:
        return False, (f"it was made with another tokenizer ({made.get('path')}, sha256 {made['sha256'][:12]}…; "
                       f"here sha256 {tokenizer_sha256[:12]}…)")
    return True, ""


def read_preferences(path: Path, image_root: Path, tokens: Tokens, cfg,
                     tokenizer_sha256: str | None = None, say: Callable[[str], None] | None = None):
    """Preference records → (examples, bad records). A bad record is reported, not fatal.

    Responses are the ids stored in the record when `stored_ids_usable` (the file's tokenizer has
    the digest `tokenizer_sha256`), else their texts tokenized again; `say` (e.g. print) is told
    once per file which, and why."""
    examples, bad, seen = [], [], set()
    use_ids, why = stored_ids_usable(None, tokenizer_sha256)
    counts = {"stored": 0, "unused": 0, "none": 0}
    for index, item in read_json_records(path):
        if isinstance(item, dict) and item.get("_header"):
            use_ids, why = stored_ids_usable(item, tokenizer_sha256)
            continue
        record_id = str(item.get("id")) if isinstance(item, dict) and "id" in item else None
        try:
            rid, image, question, prompt_text, chosen, negatives = _preference_fields(item, cfg.negatives)
            if rid in seen:
                raise ValueError(f"duplicate id {rid!r}")
            if len(negatives) < min(cfg.min_negatives, cfg.negatives):
                raise ValueError(f"{len(negatives)} negatives, fewer than --min-negatives {cfg.min_negatives}")
            image_path = image_file(image, image_root)
            prompt = tokens.prompt(question, image is not None, text=prompt_text)
            answers = [chosen] + negatives
            has_ids = all(r.ids is not None for r in answers)
            if has_ids and use_ids:
                responses = [tokens.stored(r.ids, cfg.max_response_tokens, r.complete) for r in answers]
            else:
                responses = [tokens.response(r.text, cfg.max_response_tokens, r.complete) for r in answers]
            if not all(responses):
                raise ValueError("a response has no tokens")
            rows = [prompt + r for r in responses]
            if max(map(len, rows)) > cfg.max_length:
                raise ValueError(f"{max(map(len, rows))} tokens, more than --max-length {cfg.max_length}")
        except ValueError as e:
            bad.append(BadRecord(str(path), index, record_id, str(e)))
            continue
        counts["stored" if has_ids and use_ids else "unused" if has_ids else "none"] += 1
        seen.add(rid)
        targets = [[False] * len(prompt) + [True] * len(r) for r in responses]
        examples.append(Example(rid, image_path, rows, targets, str(path), index))
    if say:
        if counts["stored"]:
            say(f"{path}: {counts['stored']} records trained on the token ids stored with them (same tokenizer)")
        if counts["unused"]:
            say(f"{path}: stored token ids not used, {counts['unused']} records re-tokenized from their texts: {why}")
        if counts["none"]:
            say(f"{path}: {counts['none']} records have no stored token ids (written by an older hscr.py or "
                "another program): re-tokenized from their texts")
    return examples, bad


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


def unusable_images(paths: Iterable[Path], image_size: int, aspect: str) -> dict[Path, str]:
    """image file → why it cannot be trained on, for the `paths` that cannot: empty, not an image,
    a bad checksum, cut short, refused by pillow's decompression-bomb guard, or a mode that
    preprocessing refuses. data.image_problem looks at the header and checksums cheaply; a full
    decode and preprocessing then catch what it cannot see (a JPEG cut short)."""
    out = {}
    for path in paths:
        try:
            why = image_problem(path)
            if why is None:
                load_pixels(path, image_size, aspect)
        # Any failure to read a file counts as bad input: pillow raises many kinds for bad bytes.
        except Exception as e:  # noqa: BLE001
            why = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        if why is not None:
            out[path] = why
    return out


def batch_pixels(examples: list[Example], image_size: int, aspect: str = "pad") -> torch.Tensor | None:
    """(B_img, 3, S, S) for the examples that have an image, in order. Every image was checked
    when the run started (`unusable_images`); one that fails now changed during the run."""
    pixels = []
    for ex in examples:
        if ex.image is None:
            continue
        try:
            pixels.append(load_pixels(ex.image, image_size, aspect))
        except (ValueError, OSError) as e:
            raise DataError(f"{ex.file} record {ex.index} (id {ex.id}): {e}; the image was readable when the run "
                            "started, so it changed since: restore it and rerun with --resume") from None
    return torch.stack(pixels) if pixels else None


def split_rows(logp: torch.Tensor, examples: list[Example], K: int):
    """Row log-probs (R,) → chosen (B,), rejected (B, K) padded with 0, mask (B, K)."""
    B = len(examples)
    chosen = logp.new_zeros(B)
    rejected = logp.new_zeros(B, K)
    mask = torch.zeros(B, K, dtype=torch.bool, device=logp.device)
    r = 0
    for b, ex in enumerate(examples):
        n = len(ex.rows) - 1
        chosen[b] = logp[r]
        rejected[b, :n] = logp[r + 1:r + 1 + n]
        mask[b, :n] = True
        r += 1 + n
    return chosen, rejected, mask


def loss_inputs(policy_logp: torch.Tensor, ref_logp: torch.Tensor, examples: list[Example], K: int):
    """Row log-probs (R,) under π_θ and π_ref → the inputs of train.preference_loss: policy chosen
    (B,) and rejected (B, K), reference chosen (B,) and rejected (B, K), mask (B, K)."""
    policy, reference = split_rows(policy_logp, examples, K), split_rows(ref_logp, examples, K)
    return policy[0], policy[1], reference[0], reference[1], policy[2]


# ---------------------------------------------------------------------------------------------
# A run's inputs, read before the (slow) model load


@dataclass
class Inputs:
    """What `read_inputs` found."""
    tokenizer_path: Path
    config: LlavaConfig            # the model's, read without its weights
    image_root: Path
    image_aspect: str              # --image-aspect as resolved
    examples: list[Example]        # training entries
    held_out: list[Example]        # --eval-data, or --eval-fraction of --data
    bad: list[BadRecord]           # every skipped record, with why
    images: list[str]              # every image file looked at, relative to image_root


def read_inputs(cfg, ctx) -> Inputs:
    """train.py's inputs: the tokenizer, the model's config, the preference records of --data and
    --eval-data and their images. Refuses (one line) a --batch-size the processes cannot share,
    and data with fewer usable entries than one batch."""
    tokenizer_path = tokenizer_file(cfg.tokenizer or cfg.model)
    tokenizer = read_tokenizer(tokenizer_path)
    config = model_config(cfg.model, cfg.vision_tower)
    tokens = Tokens(tokenizer, config)
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.data).parent
    aspect, source = resolve_image_aspect(cfg.image_aspect, Path(cfg.data))
    say = (lambda line: print(line, file=sys.stderr)) if ctx.rank == 0 else None
    if say:
        say(f"images: {'padded' if aspect == 'pad' else 'resized'} to a square (--image-aspect {aspect}, {source})")
    sha256 = provenance.file_digest(tokenizer_path)
    examples, held_out, bad, images = read_examples(
        lambda path: read_preferences(path, image_root, tokens, cfg, sha256, say), cfg, image_root, aspect,
        config.vision.image_size, ctx)
    per_step = cfg.micro_batch * ctx.world
    if cfg.batch_size % per_step:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch × processes = {per_step}")
    if len(examples) < cfg.batch_size:
        if ctx.rank == 0:
            report_skipped(bad)
        raise UserError(f"{cfg.data}: {len(examples)} training entries ({len(bad)} records skipped"
                        f"{', listed above' if bad else ''}): fewer than one batch of --batch-size {cfg.batch_size}")
    return Inputs(tokenizer_path, config, image_root, aspect, examples, held_out, bad, images)


def read_examples(read: Callable[[Path], tuple[list[Example], list[BadRecord]]], cfg, image_root: Path,
                  aspect: str, image_size: int, ctx):
    """(training examples, held-out examples, skipped records, every image file looked at, relative
    to `image_root`) of cfg.data and cfg.eval_data, each read by `read(path)` → (examples, bad
    records). A bad record, or one whose image cannot be decoded and preprocessed, is skipped;
    images are checked once each, the processes sharing the files, so that every process keeps
    the same examples. Without --eval-data, a seeded --eval-fraction of cfg.data is held out."""
    examples, bad = read(Path(cfg.data))
    held_out, bad_eval = read(Path(cfg.eval_data)) if cfg.eval_data else ([], [])
    images = sorted({ex.image for ex in examples + held_out if ex.image is not None})
    mine = unusable_images(images[ctx.rank::ctx.world], image_size, aspect)
    unusable = ctx.gather_dicts({str(path): why for path, why in mine.items()})
    examples, bad_images = drop_unusable(examples, unusable, image_root)
    held_out, bad_eval_images = drop_unusable(held_out, unusable, image_root)
    if not cfg.eval_data:
        examples, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    names = [path.relative_to(image_root).as_posix() for path in images]
    return examples, held_out, bad + bad_eval + bad_images + bad_eval_images, names


def drop_unusable(examples: list[Example], unusable: dict[str, str], image_root: Path):
    """(examples whose image is usable, a BadRecord for each of the others)."""
    kept, bad = [], []
    for ex in examples:
        why = unusable.get(str(ex.image)) if ex.image is not None else None
        if why is None:
            kept.append(ex)
        else:
            name = ex.image.relative_to(image_root).as_posix()
            bad.append(BadRecord(ex.file, ex.index, ex.id, f"image {name}: {why}"))
    return kept, bad


def split_held_out(examples: list[Example], fraction: float, seed: int):
    """A seeded random `fraction` of the entries for evaluation, the rest for training."""
    n_eval = int(round(fraction * len(examples)))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def model_config(model: str, vision_tower: str | None = None) -> LlavaConfig:
    """The config of the checkpoint `model` (and of a separate `vision_tower`), without its weights."""
    for flag, path in (("--model", model), ("--vision-tower", vision_tower)):
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: " + ("not a directory" if Path(path).exists() else "directory not found"))
    vision = read_vision_config(Path(vision_tower)) if vision_tower else None
    return read_config(Path(model), vision)


def read_tokenizer(path: str | os.PathLike):
    """model.tokenizer.load_tokenizer, with a file it cannot read reported as one line."""
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {path}: {e}") from None


def resolve_image_aspect(given: str | None, prefs: Path) -> tuple[str, str]:
    """(--image-aspect, where it comes from): as given, else what hscr.py used for the preference
    file (its header's image_aspect), else pad (LLaVA-Med's)."""
    header = preference_header(prefs)
    made = None
    if header:
        for where in ("options", "provenance"):
            if isinstance(header.get(where), dict) and header[where].get("image_aspect") in ("pad", "resize"):
                made = header[where]["image_aspect"]
                break
    if given is not None:
        note = "as given" if made in (None, given) else f"as given; the preference data was made with {made}"
        return given, note
    if made is not None:
        return made, f"as hscr.py made {prefs.name}"
    return "pad", f"the default; {prefs.name} does not record one"
