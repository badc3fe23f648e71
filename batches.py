"""The examples train.py trains on, and their batches: preference records (hscr.py's output) and
LLaVA-format conversations become rows of token ids with a mask of the tokens trained on
(`Example`); the rows of a micro-batch are padded into tensors for one forward pass (`collate`).

Preference file (docs/FORMATS.md): a header line {"_header": true, …} (skipped), then JSON lines
{"id", "image", "question", "prompt" (optional), "chosen", "negatives": [{"text", "similarity"},
…] ranked best first}; "rejected" (a string or a list of strings) is read when "negatives" is
absent. A bad record becomes a BadRecord (file, index, id, reason) and reading goes on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common import BadLine, read_json_records
from data import BadRecord, load_image, preprocess_image, read_records, resolve_image
from model.tokenizer import IMAGE_TOKEN, TEMPLATES, build_prompt, tokenize_prompt, tokenize_response

if TYPE_CHECKING:
    from train import TrainConfig


@dataclass
class Example:
    """One training entry: its image and the token rows of its responses.

    Preference: rows[0] = prompt + y_w, rows[1:] = prompt + y_lj (best first). SFT: one row,
    the whole conversation. `targets[r][t]` is True where token t of row r is trained on.
    """
    id: str
    image: Path | None
    rows: list[list[int]]
    targets: list[list[bool]]


def _preference_fields(item: object, max_negatives: int):
    """(id, image, question, prompt or None, chosen, negatives) of a preference record, or
    ValueError(reason)."""
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
    texts = [n.get("text") if isinstance(n, dict) else n for n in raw]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("every negative must be a non-empty string or an object with a non-empty 'text'")
    return str(item["id"]), image, item["question"], prompt, item["chosen"], texts[:max_negatives]


def image_file(image: str | None, image_root: Path) -> Path | None:
    """The file of a record's image path (None: no image); a missing file is the record's error."""
    if image is None:
        return None
    path = resolve_image(image_root, image)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    return path


class Tokens:
    """The prompt / response tokenization shared by both stages (model/tokenizer.py)."""

    def __init__(self, tokenizer, config):
        self.tokenizer, self.text = tokenizer, config.text
        self.image_token_id, self.num_image_tokens = config.image_token_id, config.num_image_tokens

    def prompt(self, question: str, with_image: bool, first: bool = True, text: str | None = None) -> list[int]:
        """Ids of the prompt `text`, or of the template around `question` (the image first)."""
        if text is None:
            text = build_prompt(question) if with_image else \
                TEMPLATES["mistral_instruct"].format(user=question.replace(IMAGE_TOKEN, "").strip())
        return tokenize_prompt(self.tokenizer, text, image_token_id=self.image_token_id,
                               num_image_tokens=self.num_image_tokens,
                               bos_token_id=self.text.bos_token_id if first else None)

    def response(self, text: str, limit: int | None = None) -> list[int]:
        ids = tokenize_response(self.tokenizer, text.strip(), eos_token_id=self.text.eos_token_id)
        return ids[:limit] if limit else ids


def read_preferences(path: Path, image_root: Path, tokens: Tokens, cfg: TrainConfig):
    """Preference records → (examples, bad records). A bad record is reported, not fatal."""
    examples, bad, seen = [], [], set()
    for index, item in read_json_records(path):
        if isinstance(item, dict) and item.get("_header"):
            continue  # hscr.py's first line: the options it ran with
        record_id = str(item.get("id")) if isinstance(item, dict) and "id" in item else None
        try:
            rid, image, question, prompt_text, chosen, negatives = _preference_fields(item, cfg.negatives)
            if rid in seen:
                raise ValueError(f"duplicate id {rid!r}")
            if len(negatives) < min(cfg.min_negatives, cfg.negatives):
                raise ValueError(f"{len(negatives)} negatives, fewer than --min-negatives {cfg.min_negatives}")
            image_path = image_file(image, image_root)
            prompt = tokens.prompt(question, image is not None, text=prompt_text)
            responses = [tokens.response(t, cfg.max_response_tokens) for t in [chosen] + negatives]
            rows = [prompt + r for r in responses]
            if max(map(len, rows)) > cfg.max_length:
                raise ValueError(f"{max(map(len, rows))} tokens, more than --max-length {cfg.max_length}")
        except ValueError as e:
            bad.append(BadRecord(str(path), index, record_id, str(e)))
            continue
        seen.add(rid)
        targets = [[False] * len(prompt) + [True] * len(r) for r in responses]
        examples.append(Example(rid, image_path, rows, targets))
    return examples, bad


def read_sft(path: Path, image_root: Path, tokens: Tokens, cfg: TrainConfig):
    """LLaVA-format conversations → (examples, bad records); answers are the targets."""
    records, bad = read_records(path)
    examples = []
    for index, record in enumerate(records):
        try:
            turns = record.conversations
            if len(turns) < 2 or len(turns) % 2 or any(t.get("from") != ("human", "gpt")[i % 2]
                                                       for i, t in enumerate(turns)):
                raise ValueError("conversations must alternate human, gpt, … and end with gpt")
            image_path = image_file(record.image, image_root)
            ids, target = [], []
            for i in range(0, len(turns), 2):
                prompt = tokens.prompt(turns[i]["value"], image_path is not None and i == 0, first=i == 0)
                answer = tokens.response(turns[i + 1]["value"], cfg.max_response_tokens)
                ids += prompt + answer
                target += [False] * len(prompt) + [True] * len(answer)
            if len(ids) > cfg.max_length:
                raise ValueError(f"{len(ids)} tokens, more than --max-length {cfg.max_length}")
        except ValueError as e:
            bad.append(BadRecord(str(path), index, record.id, str(e)))
            continue
        examples.append(Example(record.id, image_path, [ids], [target]))
    return examples, bad


@dataclass
class Rows:
    """A padded batch of rows; the decoder is asked for hidden states at `positions` only."""
    input_ids: torch.Tensor       # (R, T) right-padded
    attention_mask: torch.Tensor  # (R, T) 1 on real tokens
    positions: torch.Tensor       # (R, P) position t − 1 for each target token t
    labels: torch.Tensor          # (R, P) the target tokens
    label_mask: torch.Tensor      # (R, P) bool
    row_image: torch.Tensor       # (R,) index into the batch's images, −1 for none

    def to(self, device) -> Rows:
        return Rows(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(examples: list[Example], pad_id: int) -> Rows:
    rows, targets, row_image = [], [], []
    n_images = 0
    for ex in examples:
        rows += ex.rows
        targets += ex.targets
        row_image += [n_images if ex.image is not None else -1] * len(ex.rows)
        n_images += ex.image is not None
    R, T = len(rows), max(map(len, rows))
    where = [[t for t, on in enumerate(tg) if on] for tg in targets]
    P = max(map(len, where))
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(R, T, dtype=torch.long)
    positions = torch.zeros(R, P, dtype=torch.long)
    labels = torch.zeros(R, P, dtype=torch.long)
    label_mask = torch.zeros(R, P, dtype=torch.bool)
    for r, (ids, ts) in enumerate(zip(rows, where)):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        if ts:
            ts = torch.tensor(ts)
            positions[r, :len(ts)] = ts - 1   # the logits at t − 1 predict token t
            labels[r, :len(ts)] = input_ids[r, ts]
            label_mask[r, :len(ts)] = True
    return Rows(input_ids, attention_mask, positions, labels, label_mask, torch.tensor(row_image))


def load_pixels(examples: list[Example], image_size: int) -> torch.Tensor | None:
    """(B_img, 3, S, S) for the examples that have an image, in order."""
    pixels = [preprocess_image(load_image(ex.image), size=image_size) for ex in examples if ex.image is not None]
    return torch.stack(pixels) if pixels else None
