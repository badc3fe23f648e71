"""Data (docs/FORMATS.md): LLaVA-Med image preprocessing, image checks, readers of the instruction and VQA
files (`read_records`) and of hscr.py's preference files (`read_preferences`). A malformed record becomes a
`BadRecord` and reading goes on; a file unreadable as a whole raises an error naming it."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.files import BadLine, DataError, read_json_records
from model.tokenizer import IMAGE_TOKEN, TEMPLATES, build_prompt, tokenize_prompt, tokenize_response

# OpenAI CLIP normalisation constants (CLIPImageProcessor's defaults, LLaVA-Med's processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-Med's pad colours: tuple(int(m * 255)) for colour images, int(255 * mean(m)) for "L".
PAD_RGB = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
PAD_GRAY = int(255 * sum(CLIP_MEAN) / len(CLIP_MEAN))  # 114
# Modes whose pixels are one gray level (alpha dropped, as convert("RGB") drops it too):
# they are padded with gray 114, like LLaVA-Med's "L" images.
_GRAY_MODES = {"1", "L", "LA", "La"}
# High-bit-depth modes: PIL's conversion to 8 bits clips at 255 (it does not scale), which
# would turn most 16-bit scans white, and LLaVA-Med cannot pad them at all. Refused.
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def preprocess_image(pil_image: Image.Image, size: int = 336, aspect: str = "pad") -> torch.Tensor:
    """LLaVA-Med v1.5 (docs/FORMATS.md "Image preprocessing"): PIL image -> (3, size, size) float32. aspect
    "pad" (LLaVA-Med's) first pads it to a centred square of the CLIP mean colour, "resize" does not."""
    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(pil_image).__name__}")
    problems = []
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append(f"size must be a positive int, got {size!r}")
    if aspect not in ("pad", "resize"):
        problems.append(f"aspect must be 'pad' or 'resize', got {aspect!r}")
    if pil_image.mode in _HIGH_DEPTH_MODES:
        problems.append(f"image mode {pil_image.mode!r} has more than 8 bits per pixel and PIL's "
                        "conversion to RGB clips it at 255; convert it to 'L' or 'RGB' with an explicit "
                        "intensity window")
    if problems:
        raise ValueError("preprocess_image: " + "; ".join(problems))
    fill = (PAD_GRAY,) * 3 if pil_image.mode in _GRAY_MODES else PAD_RGB
    image = pil_image.convert("RGB")  # returns a copy even when already RGB
    width, height = image.size
    if aspect == "pad" and width != height:  # LLaVA's expand2square, the paste centred
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))  # half the padding before the image
        image = canvas
    # reducing_gap stays None, as in transformers' resize: one exact bicubic pass.
    image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    # Same dtype path as transformers: rescale in float64, cast, then normalise in float32.
    pixels = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    pixels = (pixels - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


# Images on disk
def resolve_image(image_root: str | os.PathLike, rel_path: str) -> Path:
    """image_root / rel_path, refusing absolute paths, ".." climbing above the root, and a path whose
    symlinks lead out of the root (resolved: the root itself may be a link); a missing file is the caller's."""
    if not isinstance(rel_path, str) or not rel_path:
        raise ValueError(f"image path must be a non-empty string, got {rel_path!r}")
    if "\x00" in rel_path:
        raise ValueError(f"image path {rel_path!r} contains a NUL character")
    if os.path.isabs(rel_path):
        raise ValueError(f"image path {rel_path!r} is absolute; it must be relative to the root")
    normalised = os.path.normpath(rel_path)
    if normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
        raise ValueError(f"image path {rel_path!r} escapes the image root {str(image_root)!r}")
    path = Path(image_root) / normalised
    if path.exists() and not path.resolve().is_relative_to(Path(image_root).resolve()):
        raise ValueError(f"image outside --image-root: {rel_path!r} links to {path.resolve()}")
    return path


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, so that missing, corrupt or truncated files fail here with
    their name. No EXIF rotation, as LLaVA-Med; pillow's decompression-bomb guard as configured."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: Image.open only reads the header
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {str(path)!r}") from None
    except Image.DecompressionBombError as error:
        message = f"image {str(path)!r} refused by pillow's decompression-bomb guard: {error}"
        raise ValueError(message) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
    return image


def load_pixels(path: str | os.PathLike, size: int, aspect: str = "pad") -> torch.Tensor:
    return preprocess_image(load_image(path), size=size, aspect=aspect)


def image_problem(path: Path) -> str | None:
    """Why an existing image file cannot be used (None: it looks fine), from the header and pillow's verify(),
    which checks a PNG's checksums without decoding. A JPEG cut short passes, and fails when decoded."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.DecompressionBombError as error:
        return f"refused by pillow's decompression-bomb guard: {error}"
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # what pillow raises for bad bytes
        return f"not a readable image ({type(error).__name__}: {error})"
    return None


def unusable_images(paths: Iterable[Path], image_size: int, aspect: str) -> dict[Path, str]:
    """{image file: why it cannot be trained on}: `image_problem`, then a full decode for what it misses."""
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
    """(B_img, 3, S, S) for the examples that have an image, in order (checked by `unusable_images`)."""
    pixels = []
    for ex in (ex for ex in examples if ex.image is not None):
        try:
            pixels.append(load_pixels(ex.image, image_size, aspect))
        except (ValueError, OSError) as e:
            raise DataError(f"{ex.file} record {ex.index} (id {ex.id}): {e}; the image was readable when the "
                            "run started, so it changed since: restore it and rerun with --resume") from None
    return torch.stack(pixels) if pixels else None


# Records: LLaVA-Med instruction JSON, VQA test.json, question JSONL
@dataclass
class Record:
    """One question and its reference answer (None: the file gives none); docs/FORMATS.md "Data files".
    question: the first human turn without "<image>", stripped; answer_type: "OPEN" | "CLOSED" | None;
    conversations: as in the file (question JSONL: question, answer if any); facts: for eval.fact_scores."""
    id: str
    image: str | None
    question: str
    answer: str | None
    answer_type: str | None
    conversations: list[dict] = field(default_factory=list)
    facts: dict | None = None


@dataclass
class BadRecord:
    """A record that could not be read: where it is and why."""
    file: str
    index: int  # position in the JSON list, or 0-based line number in a JSONL file
    id: str | None
    reason: str


# Answer types, case-insensitive: LLaVA-Med's, then PathVQA's (yes/no closed; other, number open).
_ANSWER_TYPES = {"open": "OPEN", "closed": "CLOSED", "yes/no": "CLOSED", "other": "OPEN", "number": "OPEN"}


def read_records(path: str | os.PathLike, *,
                 answers_path: str | os.PathLike | None = None) -> tuple[list[Record], list[BadRecord]]:
    """(records, bad records) of a LLaVA-Med instruction JSON, VQA test.json or question JSONL (FORMATS.md
    "Data files"); with `answers_path` every answer comes from there (missing or different: a bad record)."""
    answers, bad = ({}, []) if answers_path is None else _read(answers_path, _answer)
    records, more = _read(path, lambda rid, item: _with_answer(_record(rid, item), answers, answers_path))
    return list(records.values()), bad + more


def _read(path: str | os.PathLike, parse: Callable[[str, dict], object]) -> tuple[dict, list[BadRecord]]:
    """({id: parse(id, record)}, bad records) of a data file, in file order; a repeated id is a bad record."""
    try:
        items = read_json_records(path)
    except OSError as error:
        raise ValueError(f"cannot read data file {str(path)!r}: {error}") from error
    found, bad = {}, []
    for index, item in items:
        # The id: "question_id", else "id", whichever is a string or an integer (JSON's ints, not bools).
        ids = [item.get(key) for key in ("question_id", "id")] if isinstance(item, dict) else []
        record_id = next((str(v) for v in ids if isinstance(v, str) or type(v) is int), None)
        try:
            if isinstance(item, BadLine):
                raise ValueError(item.message)
            if not isinstance(item, dict):
                raise ValueError(f"record is a JSON {type(item).__name__}, not an object")
            if record_id is None:
                raise ValueError("no usable id ('question_id' or 'id', a string or an integer)")
            value = parse(record_id, item)
            if record_id in found:
                raise ValueError(f"duplicate id {record_id!r}")
            found[record_id] = value
        except ValueError as error:
            bad.append(BadRecord(str(path), index, record_id, str(error)))
    return found, bad


def _record(record_id: str, item: dict) -> Record:
    image = item.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise ValueError(f"'image' must be a non-empty string, got {image!r}")
    answer_type = _answer_type(item)
    turns, text = _turns(item), item.get("text")  # question JSONL: the question `text`, answers inline
    if turns is None and not isinstance(text, str):
        raise ValueError("neither 'conversations' nor 'text'" if "text" not in item else
                         f"'text' must be a string, got {type(text).__name__}")
    question = (text if turns is None else turns[0]["value"]).replace("<image>", "").strip()
    if not question:
        raise ValueError("empty question")
    if turns is None:
        turns = [{"from": "human", "value": text}]
        if (answer := _inline_answer(item, ("gpt4_answer", "answer"))) is not None:
            turns.append({"from": "gpt", "value": answer})
    facts = item.get("facts")
    if facts is not None and not isinstance(facts, dict):
        raise ValueError(f"'facts' must be an object, got {type(facts).__name__}")
    answer = turns[1]["value"] if len(turns) > 1 else None
    return Record(record_id, image, question, answer, answer_type, turns, facts)


def _turns(item: dict) -> list[dict] | None:
    """Copies of the record's LLaVA turns (None: none), checked to alternate human, gpt, … as LLaVA does."""
    conversations = item.get("conversations", item.get("conversatons"))
    if conversations is None:
        return None
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list")
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict):
            raise ValueError(f"conversation turn {i} is not an object")
        if turn.get("from") != expected:
            raise ValueError(f"conversation turn {i} is from {turn.get('from')!r}, expected {expected!r}")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"conversation turn {i} has no string 'value'")
    return [{"from": turn["from"], "value": turn["value"]} for turn in conversations]


def _inline_answer(item: dict, keys: tuple[str, ...]) -> str | None:
    """The answer under the first of `keys` that the record has (None: it has none of them)."""
    for key in (k for k in keys if k in item):
        value = item[key]
        if isinstance(value, str):
            return value
        # Numeric answers (PathVQA "number" questions) may be stored as JSON numbers.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)
        raise ValueError(f"{key!r} must be a string or a number, got {value!r}")
    return None


def _answer_type(item: dict) -> str | None:
    value = item.get("answer_type")
    normalised = _ANSWER_TYPES.get(value.lower()) if isinstance(value, str) else None
    if value is not None and normalised is None:
        raise ValueError(f"unknown answer_type {value!r} (expected one of {sorted(_ANSWER_TYPES)})")
    return normalised


def _answer(record_id: str, item: dict) -> tuple[str, str | None]:
    """(answer, answer_type) of a record of an answers file."""
    answer = _inline_answer(item, ("answer", "gpt4_answer", "text"))
    if answer is None:
        turns = _turns(item) or []
        if len(turns) < 2:
            raise ValueError("no answer ('answer', 'gpt4_answer', 'text' or a gpt turn)")
        answer = turns[1]["value"]
    return answer, _answer_type(item)


def _with_answer(record: Record, answers: dict[str, tuple[str, str | None]], answers_path) -> Record:
    if answers_path is None:
        return record
    where = repr(str(answers_path))
    if record.id not in answers:
        raise ValueError(f"no answer for id {record.id!r} in {where}")
    answer, answer_type = answers[record.id]
    if record.answer is not None and record.answer != answer:
        raise ValueError(f"answer {record.answer!r} differs from {answer!r} in {where}")
    if None not in (record.answer_type, answer_type) and record.answer_type != answer_type:
        raise ValueError(f"answer_type {record.answer_type} differs from {answer_type} in {where}")
    if record.answer is None:
        record.answer = answer
        record.conversations = record.conversations[:1] + [{"from": "gpt", "value": answer}]
    record.answer_type = record.answer_type or answer_type
    return record


# Preference files (hscr.py's output) → train.py's examples
@dataclass
class Example:
    """One training entry: its image and the token rows of its responses. Preference: rows[0] =
    prompt + y_w, rows[1:] = prompt + y_lj (best first); SFT (demo/base.py): one row, the whole
    conversation. `targets[r][t]`: token t of row r is trained on. `file`, `index`: where it is."""
    id: str
    image: Path | None
    rows: list[list[int]]
    targets: list[list[bool]]
    file: str = ""
    index: int = -1


def _response(text: str, ids: object, complete: object, where: str) -> tuple[str, list[int] | None, bool]:
    """(text, stored ids without EOS or None, complete: False if cut before EOS) of a response, checked."""
    if ids is not None and (not isinstance(ids, list) or not all(type(i) is int for i in ids)):  # no bools
        raise ValueError(f"{where}ids must be a list of token ids")
    if not isinstance(complete, bool):
        raise ValueError(f"{where}complete must be true or false, got {complete!r}")
    return text, ids, complete


def _preference_fields(item: object, num_negatives: int):
    """(id, image, question, prompt or None, chosen, negatives) of a preference record, or ValueError."""
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
    prompt, image = item.get("prompt"), item.get("image")  # hscr.py stores the prompt text it scored with
    if prompt is not None and (not isinstance(prompt, str)
                               or prompt.count(IMAGE_TOKEN) != (image is not None)):
        raise ValueError(f"prompt must be a string with one {IMAGE_TOKEN} if the record has an image, else none")
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
        negatives.append(_response(n["text"], n.get("ids"), n.get("complete", True), f"negatives[{j}]."))
    chosen = _response(item["chosen"], item.get("chosen_ids"), item.get("chosen_complete", True), "chosen_")
    return str(item["id"]), image, item["question"], prompt, chosen, negatives


def image_file(image: str | None, image_root: Path) -> Path | None:
    """The file of a record's image path (None: no image); a missing file is the record's error."""
    path = resolve_image(image_root, image) if image is not None else None
    if path is not None and not path.is_file():
        raise ValueError(f"image not found: {path}")
    return path


class Tokens:
    """The prompt / response tokenization of train.py and demo/base.py's SFT (model/tokenizer.py)."""

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

    def response(self, text: str, limit: int | None = None, complete: bool = True) -> list[int]:
        """Ids of a response, then EOS unless it is incomplete (cut before its end); at most `limit`."""
        ids = tokenize_response(self.tokenizer, text.strip(),
                                eos_token_id=self.text.eos_token_id if complete else None)
        return ids[:limit] if limit else ids

    def stored(self, ids: list[int], limit: int | None = None, complete: bool = True) -> list[int]:
        """Stored response ids (as hscr.py wrote them, without EOS), then EOS unless incomplete."""
        if bad := sorted({i for i in ids if not 0 <= i < self.text.vocab_size or i == self.image_token_id}):
            raise ValueError(f"stored token ids {bad[:5]} are not text tokens of this model "
                             f"(vocabulary {self.text.vocab_size}, image token {self.image_token_id})")
        ids = ids + [self.text.eos_token_id] if complete else list(ids)
        return ids[:limit] if limit else ids


def preference_header(path: Path) -> dict | None:
    """The header line hscr.py writes first in a preference file, or None (a bad one: reading reports it)."""
    try:
        with open(path, "rb") as f:
            item = json.loads(f.readline().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return item if isinstance(item, dict) and item.get("_header") else None


def stored_ids_usable(header: dict | None, tokenizer_sha256: str | None) -> tuple[bool, str]:
    """(usable, why not): are a preference file's stored token ids this tokenizer's? Its header must name
    a tokenizer of the same digest (of what it does, whichever file holds it: tokenizer.canonical_form)."""
    made = (header or {}).get("provenance")
    made = made.get("tokenizer") if isinstance(made, dict) else None
    if not isinstance(made, dict) or not isinstance(made.get("sha256"), str):
        return False, "its header records no tokenizer digest (written by an older hscr.py or another program)"
    if tokenizer_sha256 is None:
        return False, "the tokenizer used here has no digest to compare"
    if made["sha256"] != tokenizer_sha256:
        return False, (f"it was made with another tokenizer (sha256 {made['sha256'][:12]}…; "
                       f"here sha256 {tokenizer_sha256[:12]}…)")
    return True, ""


def read_preferences(path: Path, image_root: Path, tokens: Tokens, cfg, tokenizer_sha256: str | None = None,
                     say: Callable[[str], None] | None = None):
    """(examples, bad records) of a preference file (`cfg`: train.py's TrainConfig). Responses are the ids
    stored in the record when `stored_ids_usable`, else their texts tokenized again; `say` is told which."""
    examples, bad, seen = [], [], set()
    use_ids, why = stored_ids_usable(None, tokenizer_sha256)
    notes = {"stored": "{n} records trained on the token ids stored with them (same tokenizer)",
             "unused": "stored token ids not used, {n} records re-tokenized from their texts: {why}",
             "none": "{n} records have no stored token ids (written by an older hscr.py or another program): "
                     "re-tokenized from their texts"}
    counts = dict.fromkeys(notes, 0)
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
            answers, limit = [chosen] + negatives, cfg.max_response_tokens
            kind = ("stored" if use_ids else "unused") if all(a[1] is not None for a in answers) else "none"
            responses = [tokens.stored(ids, limit, complete) if kind == "stored" else
                         tokens.response(text, limit, complete) for text, ids, complete in answers]
            if not all(responses):
                raise ValueError("a response has no tokens")
            rows = [prompt + r for r in responses]
            if max(map(len, rows)) > cfg.max_length:
                raise ValueError(f"{max(map(len, rows))} tokens, more than --max-length {cfg.max_length}")
        except ValueError as e:
            bad.append(BadRecord(str(path), index, record_id, str(e)))
            continue
        counts[kind] += 1
        seen.add(rid)
        targets = [[False] * len(prompt) + [True] * len(r) for r in responses]
        examples.append(Example(rid, image_path, rows, targets, str(path), index))
    for kind, n in counts.items():
        if say and n:
            say(f"{path}: " + notes[kind].format(n=n, why=why))
    return examples, bad


# And back: an example's row log-probs, per entry, as the loss takes them (train.py, Stage 3)
def loss_inputs(policy_logp: torch.Tensor, ref_logp: torch.Tensor, examples: list[Example], K: int):
    """Row log-probs (R,) under π_θ and π_ref → the inputs of train.preference_loss: policy chosen
    (B,) and rejected (B, K), reference chosen (B,) and rejected (B, K), padded with 0; mask (B, K)."""
    n = torch.tensor([len(ex.rows) - 1 for ex in examples], dtype=torch.long, device=policy_logp.device)
    chosen = torch.cumsum(n + 1, 0) - (n + 1)  # (B,) the row of each entry's y_w, its n y_lj after it
    k = torch.arange(K, device=n.device)
    mask = k < n[:, None]  # (B, K)
    rejected = (chosen[:, None] + 1 + k).clamp(max=len(policy_logp) - 1)  # (B, K); padding (zeroed) clamped
    out = [t for logp in (policy_logp, ref_logp) for t in (logp[chosen], logp[rejected].where(mask, 0.0))]
    return (*out, mask)
