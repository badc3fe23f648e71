"""Data: LLaVA-Med image preprocessing and readers of the real instruction and VQA files.

Image preprocessing (LLaVA-Med v1.5, `image_aspect_ratio = "pad"`), in pillow + numpy:

1. expand2square: paste the image onto a square canvas of side max(w, h) filled with the
   CLIP mean colour x255, truncated: (122, 116, 104); grayscale images get the mean of the
   three means x255, truncated: 114. The paste is centred (upstream LLaVA); LLaVA-Med instead
   offsets it by centre or centre+1 at random (random.randint), which is not reproduced.
2. RGB; resize to size x size with PIL bicubic (torch's bicubic interpolate gives other values).
3. What CLIPImageProcessor does next: centre crop (a no-op on a square), x 1/255 in float64
   then cast to float32, (x - mean) / std in float32, HWC -> CHW.

These are the exact operations of transformers' PIL backend (`CLIPImageProcessorPil`; in
transformers 5.x `CLIPImageProcessor` is the torchvision backend, whose resize differs, and
falls back to the PIL one when torchvision is absent), so the result is bit-identical to it.

Readers turn the three file layouts of docs/FORMATS.md into `Record`s:
- LLaVA-Med instruction JSON: a list of {"id", "image", "conversations" (or the misspelt
  "conversatons"), ...};
- LLaVA-Med VQA `test.json`: the same with "answer_type";
- question JSONL: one {"question_id", "image", "text", "answer_type", "gpt4_answer" | "answer"}
  per line, or answers in a separate file keyed by question_id.
A malformed record becomes a `BadRecord` (file, index, id, reason) and reading goes on; a file
that cannot be read or parsed as a whole raises an error naming it.

The synthetic world of the embedded demo, which writes files in these layouts, is demo/world.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.files import BadLine, read_json_records

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
    """LLaVA-Med v1.5 image preprocessing: PIL image -> (3, size, size) float32 tensor.

    aspect:     "pad" (LLaVA-Med) pads to a square with the CLIP mean colour, pasting the image
                at ((side - w) // 2, (side - h) // 2), then resizes;
                "resize" resizes straight to size x size, distorting the aspect ratio (no
                padding and no crop; CLIPImageProcessor alone would crop the long side).
    Modes: "1", "L", "LA" are padded with gray 114 (alpha dropped); high-bit-depth "I", "I;16*"
    and "F" are refused (convert them to 8 bits yourself, choosing the window); every other
    mode ("RGB", "RGBA", "P", "PA", "CMYK", ...) goes through PIL's convert("RGB") -- alpha
    dropped, palette applied, exactly as CLIPImageProcessor converts -- and is padded with
    (122, 116, 104). Padding after the RGB conversion equals LLaVA-Med's padding in the
    image's own mode for "L", "RGB" and "RGBA"; for "P" LLaVA-Med's canvas has a one-colour
    palette that garbles the pasted indices, which is not reproduced.
    """
    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(pil_image).__name__}")
    problems = []
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append(f"size must be a positive int, got {size!r}")
    if aspect not in ("pad", "resize"):
        problems.append(f"aspect must be 'pad' or 'resize', got {aspect!r}")
    if pil_image.mode in _HIGH_DEPTH_MODES:
        problems.append(
            f"image mode {pil_image.mode!r} has more than 8 bits per pixel and PIL's conversion "
            "to RGB clips it at 255; convert it to 'L' or 'RGB' with an explicit intensity window"
        )
    if problems:
        raise ValueError("preprocess_image: " + "; ".join(problems))

    fill = (PAD_GRAY,) * 3 if pil_image.mode in _GRAY_MODES else PAD_RGB
    image = pil_image.convert("RGB")  # returns a copy even when already RGB
    if aspect == "pad":
        image = _expand_to_square(image, fill)
    # reducing_gap stays None, as in transformers' resize: one exact bicubic pass.
    image = image.resize((size, size), resample=Image.Resampling.BICUBIC)

    pixels = np.asarray(image)  # (H, W, 3) uint8
    # Same dtype path as transformers: rescale in float64, cast, then normalise in float32.
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    pixels = (pixels - mean) / std  # (H, W, 3) float32
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


def _expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Paste an RGB image, centred, onto a square canvas of colour `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    start = (side - min(width, height)) // 2  # half the padding along the short axis
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, (0, start) if width > height else (start, 0))
    return canvas


# --------------------------------------------------------------------------------------------
# Images on disk


def resolve_image(image_root: str | os.PathLike, rel_path: str) -> Path:
    """image_root / rel_path, refusing paths that would leave the root.

    The check is lexical: absolute paths and paths whose ".." components climb above the root
    are refused. Symlinks inside the root are followed as the user set them up (image folders
    are often links to other disks); only the data file's paths are untrusted.
    """
    if not isinstance(rel_path, str) or not rel_path:
        raise ValueError(f"image path must be a non-empty string, got {rel_path!r}")
    if "\x00" in rel_path:
        raise ValueError(f"image path {rel_path!r} contains a NUL character")
    if os.path.isabs(rel_path):
        raise ValueError(f"image path {rel_path!r} is absolute; it must be relative to the root")
    normalised = os.path.normpath(rel_path)
    if normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
        raise ValueError(f"image path {rel_path!r} escapes the image root {str(image_root)!r}")
    return Path(image_root) / normalised


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, so that missing, corrupt or truncated files fail here
    with their name. No EXIF rotation, as LLaVA-Med. Pillow's decompression-bomb guard stays
    as configured (by default: a warning above Image.MAX_IMAGE_PIXELS, an error above twice it).
    """
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
    """The image at `path` as the model's input, (3, size, size): load_image, then
    preprocess_image. Raises ValueError or OSError naming the file."""
    return preprocess_image(load_image(path), size=size, aspect=aspect)


def image_problem(path: Path) -> str | None:
    """Why an existing image file cannot be used, from a cheap look (None: it looks fine).

    Reads the header (size, mode) and lets pillow's verify() walk the file: for PNG that checks
    every chunk's checksum and finds truncation, without decoding pixels. A JPEG cut short passes
    this and fails when decoded, which load_image catches when the image is used."""
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


# --------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One question (and its reference answer, when known).

    question: the first human turn with "<image>" removed and stripped.
    answer: the first gpt turn, or the JSONL answer; None when the file gives none.
    answer_type: "OPEN" | "CLOSED" | None (instruction data has none).
    conversations: [{"from": "human" | "gpt", "value": str}, ...] as in the file (values
    untouched); for question JSONL: the raw question text, then the answer if known.
    facts: the record's optional "facts" object, passed through unread (eval.py's description
    metric, `eval.fact_scores`: slot → {"value", "phrases"}); None when absent.
    """

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
_ANSWER_TYPES = {
    "open": "OPEN", "closed": "CLOSED", "yes/no": "CLOSED", "other": "OPEN", "number": "OPEN"
}


class _Malformed(Exception):
    """Internal: why a record is bad (becomes a BadRecord)."""


def read_records(
    path: str | os.PathLike, *, answers_path: str | os.PathLike | None = None
) -> tuple[list[Record], list[BadRecord]]:
    """Read a LLaVA-Med instruction JSON, VQA test.json or question JSONL file.

    The layout is recognised from the content: a file starting with "[" is a JSON list, any
    other is JSON lines. Each object is a conversation record if it has "conversations" (or
    "conversatons") and a question record if it has "text". With `answers_path` (a JSON list
    or JSONL of {"question_id" | "id", "answer" | "gpt4_answer" | "text" (LLaVA answer-file
    form) | "conversations", optional "answer_type"}), every record's answer comes from that
    file: a question missing there, or whose inline answer differs, is bad.
    Returns (records, bad records) in file order; duplicate ids are reported as bad.
    """
    items = _read_items(path)
    answers, bad = ({}, []) if answers_path is None else _read_answers(answers_path)
    records: list[Record] = []
    seen: set[str] = set()
    for index, item in items:
        try:
            record = _parse_record(item)
            if answers_path is not None:
                _attach_answer(record, answers, answers_path)
            if record.id in seen:
                raise _Malformed(f"duplicate id {record.id!r}")
        except _Malformed as error:
            bad.append(BadRecord(str(path), index, _raw_id(item), str(error)))
            continue
        seen.add(record.id)
        records.append(record)
    return records, bad


def _read_items(path: str | os.PathLike) -> list[tuple[int, object]]:
    """harness.files.read_json_records, with a file that cannot be opened reported by name."""
    try:
        return read_json_records(path)
    except OSError as error:
        raise ValueError(f"cannot read data file {str(path)!r}: {error}") from error


def _raw_id(item: object) -> str | None:
    """The record's id as a string, if it has a usable one (for error reports)."""
    if not isinstance(item, dict):
        return None
    for key in ("question_id", "id"):
        value = item.get(key)
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
    return None


def _record_id(item: object) -> str:
    """The id of a record that is a JSON object with a usable id; else why it is malformed."""
    if isinstance(item, BadLine):
        raise _Malformed(item.message)
    if not isinstance(item, dict):
        raise _Malformed(f"record is a JSON {type(item).__name__}, not an object")
    record_id = _raw_id(item)
    if record_id is None:
        raise _Malformed("no usable id ('question_id' or 'id', a string or an integer)")
    return record_id


def _parse_record(item: object) -> Record:
    record_id = _record_id(item)
    image = item.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise _Malformed(f"'image' must be a non-empty string, got {image!r}")
    answer_type = _answer_type(item)

    conversations = item.get("conversations", item.get("conversatons"))
    if conversations is not None:
        turns = _check_conversations(conversations)
        question = _clean_question(turns[0]["value"])
        answer = turns[1]["value"] if len(turns) > 1 else None
    elif "text" in item:
        text = item["text"]
        if not isinstance(text, str):
            raise _Malformed(f"'text' must be a string, got {type(text).__name__}")
        question = _clean_question(text)
        answer = None
        for key in ("gpt4_answer", "answer"):
            if key in item:
                answer = _answer_text(item[key], key)
                break
        turns = [{"from": "human", "value": text}]
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
    else:
        raise _Malformed("neither 'conversations' nor 'text'")
    facts = item.get("facts")
    if facts is not None and not isinstance(facts, dict):
        raise _Malformed(f"'facts' must be an object, got {type(facts).__name__}")
    return Record(record_id, image, question, answer, answer_type, turns, facts)


def _check_conversations(conversations: object) -> list[dict]:
    """Validate LLaVA turns: a non-empty list alternating human, gpt, human, ... (what LLaVA's
    training code asserts), each {"from", "value": str}. Returns copies holding those two keys."""
    if not isinstance(conversations, list) or not conversations:
        raise _Malformed("conversations must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict):
            raise _Malformed(f"conversation turn {i} is not an object")
        if turn.get("from") != expected:
            got = turn.get("from")
            raise _Malformed(f"conversation turn {i} is from {got!r}, expected {expected!r}")
        if not isinstance(turn.get("value"), str):
            raise _Malformed(f"conversation turn {i} has no string 'value'")
        turns.append({"from": turn["from"], "value": turn["value"]})
    return turns


def _clean_question(text: str) -> str:
    question = text.replace("<image>", "").strip()
    if not question:
        raise _Malformed("empty question")
    return question


def _answer_text(value: object, key: str) -> str:
    # Numeric answers (PathVQA "number" questions) may be stored as JSON numbers.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise _Malformed(f"{key!r} must be a string or a number, got {value!r}")


def _answer_type(item: dict) -> str | None:
    if "answer_type" not in item or item["answer_type"] is None:
        return None
    value = item["answer_type"]
    normalised = _ANSWER_TYPES.get(value.lower()) if isinstance(value, str) else None
    if normalised is None:
        raise _Malformed(f"unknown answer_type {value!r} (expected one of {sorted(_ANSWER_TYPES)})")
    return normalised


_Answers = dict[str, tuple[str, "str | None"]]  # id -> (answer, answer_type)


def _read_answers(path: str | os.PathLike) -> tuple[_Answers, list[BadRecord]]:
    """id -> (answer, answer_type) from an answers file, and its bad records."""
    answers: _Answers = {}
    bad: list[BadRecord] = []
    for index, item in _read_items(path):
        try:
            record_id = _record_id(item)
            if record_id in answers:
                raise _Malformed(f"duplicate id {record_id!r}")
            for key in ("answer", "gpt4_answer", "text"):
                if key in item:
                    answer = _answer_text(item[key], key)
                    break
            else:
                conversations = item.get("conversations", item.get("conversatons"))
                turns = _check_conversations(conversations) if conversations is not None else []
                if len(turns) < 2:
                    raise _Malformed("no answer ('answer', 'gpt4_answer', 'text' or a gpt turn)")
                answer = turns[1]["value"]
            answers[record_id] = (answer, _answer_type(item))
        except _Malformed as error:
            bad.append(BadRecord(str(path), index, _raw_id(item), str(error)))
    return answers, bad


def _attach_answer(record: Record, answers: _Answers, answers_path: str | os.PathLike) -> None:
    where = repr(str(answers_path))
    if record.id not in answers:
        raise _Malformed(f"no answer for id {record.id!r} in {where}")
    answer, answer_type = answers[record.id]
    if record.answer is not None and record.answer != answer:
        raise _Malformed(f"answer {record.answer!r} differs from {answer!r} in {where}")
    if None not in (record.answer_type, answer_type) and record.answer_type != answer_type:
        raise _Malformed(f"answer_type {record.answer_type} differs from {answer_type} in {where}")
    if record.answer is None:
        record.answer = answer
        record.conversations = record.conversations[:1] + [{"from": "gpt", "value": answer}]
    record.answer_type = record.answer_type or answer_type
