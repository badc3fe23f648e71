"""Data: LLaVA-Med image preprocessing and readers for the instruction and VQA files.

Image preprocessing (LLaVA-Med v1.5, `image_aspect_ratio = "pad"`), in pillow + numpy:

1. expand2square: paste the image onto a square canvas of side max(w, h) filled with the
   CLIP mean colour x255, truncated: (122, 116, 104); grayscale images get the mean of the
   three means x255, truncated: 114. The paste is centred (upstream LLaVA); LLaVA-Med instead
   offsets it by centre or centre+1 at random, offered as `pad_offset="llava-med-random"`.
2. RGB; resize to size x size with PIL bicubic (torch's bicubic interpolate gives other values).
3. What CLIPImageProcessor does next: centre crop (a no-op on a square), x 1/255 in float64
   then cast to float32, (x - mean) / std in float32, HWC -> CHW.

These are the exact operations of transformers' PIL backend (`CLIPImageProcessorPil`; in
transformers 5.x `CLIPImageProcessor` is the torchvision backend, whose resize differs, and
falls back to the PIL one when torchvision is absent), so the result is bit-identical to it.

Readers turn the three file layouts of FORMATS.md into `Record`s:
- LLaVA-Med instruction JSON: a list of {"id", "image", "conversations" (or the misspelt
  "conversatons"), ...};
- LLaVA-Med VQA `test.json`: the same with "answer_type";
- question JSONL: one {"question_id", "image", "text", "answer_type", "gpt4_answer" | "answer"}
  per line, or answers in a separate file keyed by question_id.
A malformed record becomes a `BadRecord` (file, index, id, reason) and reading goes on; a file
that cannot be read or parsed as a whole raises.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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

_PAD_OFFSETS = ("center", "llava-med-random")
# LLaVA-Med draws its offsets from Python's global `random`, seeded 0 once per run; this
# generator plays that role when the caller passes none.
_LLAVA_MED_RNG = random.Random(0)


def preprocess_image(
    pil_image: Image.Image,
    size: int = 336,
    aspect: str = "pad",
    *,
    pad_offset: str = "center",
    rng: random.Random | None = None,
) -> torch.Tensor:
    """LLaVA-Med v1.5 image preprocessing: PIL image -> (3, size, size) float32 tensor.

    aspect:     "pad" (LLaVA-Med) pads to a square with the CLIP mean colour, then resizes;
                "resize" resizes straight to size x size, distorting the aspect ratio (no
                padding and no crop; CLIPImageProcessor alone would crop the long side).
    pad_offset: "center" pastes at ((side - w) // 2, (side - h) // 2) (upstream LLaVA);
                "llava-med-random" reproduces LLaVA-Med's offset along the padded axis,
                randint(d // 2, d // 2 + 1) with d = side - short edge, drawn from `rng`
                (default: a module-level random.Random(0), as LLaVA-Med seeds `random` with 0).
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
    if pad_offset not in _PAD_OFFSETS:
        problems.append(f"pad_offset must be one of {_PAD_OFFSETS}, got {pad_offset!r}")
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
        image = _expand_to_square(image, fill, pad_offset, rng or _LLAVA_MED_RNG)
    # reducing_gap stays None, as in transformers' resize: one exact bicubic pass.
    image = image.resize((size, size), resample=Image.Resampling.BICUBIC)

    pixels = np.asarray(image)  # (H, W, 3) uint8
    # Same dtype path as transformers: rescale in float64, cast, then normalise in float32.
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    pixels = (pixels - mean) / std  # (H, W, 3) float32
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


def _expand_to_square(
    image: Image.Image, fill: tuple[int, int, int], pad_offset: str, rng: random.Random
) -> Image.Image:
    """Paste an RGB image onto a square canvas of colour `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    gap = side - min(width, height)  # padding along the short axis
    if pad_offset == "center":
        start = gap // 2
    else:
        # LLaVA-Med: random.randint is inclusive, so centre or centre+1; always fits, since
        # gap // 2 + 1 <= gap for gap >= 1.
        start = rng.randint(gap // 2, gap // 2 + 1)
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
    """

    id: str
    image: str | None
    question: str
    answer: str | None
    answer_type: str | None
    conversations: list[dict] = field(default_factory=list)


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
        if isinstance(item, _Malformed):
            bad.append(BadRecord(str(path), index, None, str(item)))
            continue
        record_id = _raw_id(item)
        try:
            record = _parse_record(item)
            if answers_path is not None:
                _attach_answer(record, answers, answers_path)
            if record.id in seen:
                raise _Malformed(f"duplicate id {record.id!r}")
        except _Malformed as error:
            bad.append(BadRecord(str(path), index, record_id, str(error)))
            continue
        seen.add(record.id)
        records.append(record)
    return records, bad


def _read_items(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(index, parsed JSON value) for each record of a JSON-list or JSONL file; a JSONL line
    that does not parse is returned as a _Malformed in its place."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read data file {str(path)!r}: {error}") from error
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"data file {str(path)!r} is not valid JSON: {error}") from error
        return list(enumerate(items))
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines cuts.
    lines = [(i, line) for i, line in enumerate(text.split("\n")) if line.strip()]
    if len(lines) > 1:
        # A pretty-printed JSON object is not JSON lines: say so once, not once per line.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if whole is not None:
            kind = type(whole).__name__
            raise ValueError(f"data file {str(path)!r} is one JSON {kind}, not a list or JSON lines")
    out: list[tuple[int, object]] = []
    for i, line in lines:
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as error:
            out.append((i, _Malformed(f"line is not valid JSON: {error}")))
    return out


def _raw_id(item: object) -> str | None:
    """The record's id as a string, if it has a usable one (for error reports)."""
    if not isinstance(item, dict):
        return None
    for key in ("question_id", "id"):
        value = item.get(key)
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
    return None


def _parse_record(item: object) -> Record:
    if not isinstance(item, dict):
        raise _Malformed(f"record is a JSON {type(item).__name__}, not an object")
    record_id = _raw_id(item)
    if record_id is None:
        raise _Malformed("no usable id ('question_id' or 'id', a string or an integer)")
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
    return Record(record_id, image, question, answer, answer_type, turns)


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
        record_id = _raw_id(item) if not isinstance(item, _Malformed) else None
        try:
            if isinstance(item, _Malformed):
                raise item
            if not isinstance(item, dict):
                raise _Malformed(f"record is a JSON {type(item).__name__}, not an object")
            if record_id is None:
                raise _Malformed("no usable id ('question_id' or 'id', a string or an integer)")
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
            bad.append(BadRecord(str(path), index, record_id, str(error)))
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


# ============================================================================================
# Synthetic Med-VQA world
#
# A small, fully synthetic medical VQA world, generated from a seed with numpy + pillow, so that
# the whole method can run (and be tested) with no download. It follows the layouts above:
#
#   root/images/<id>.png   grayscale scans (mode "L", size x size, 64 px by default)
#   root/sft.json          LLaVA-Med instruction format, with a language prior (below)
#   root/align.json        the same format and prior: the entries HSCR builds preferences from
#   root/val.json          LLaVA-Med VQA test.json format, balanced: for choosing settings
#   root/test.json         the same, balanced, never used for tuning
#   root/world.json        seed, sizes, version: written last, so its presence marks a whole build
#
# Every record is single-turn: "<image>\n<question>" -> answer, "image": "images/<id>.png"
# (relative to root, the readers' default image root), plus "kind" (the question kind) and
# "scene" (the facts drawn in the pixels): readers ignore both; tests and error analysis use them.
#
# Scenes. Three modalities with distinct anatomy: chest X-ray (bright body, two dark lung fields,
# spine, heart, ribs), brain MRI (bright skull ring, gray brain, dark ventricles) and abdominal
# CT (round body, liver, spleen, kidneys, spine, dark bowel gas). A scene has 0-3 findings --
# nodules (X-ray), lesions (MRI), masses (CT) -- drawn as bright discs, all on one side and of
# one size. "left" and "right" always mean the image's left and right halves (not the
# radiological patient side). Anatomy is jittered (shift, scale), intensities are jittered
# (gain, offset), and low-frequency texture and pixel noise are added; findings are the
# brightest structures, but faint vessels, ribs and gas make the picture less trivial.
#
# Language prior. Answers are always true to the pixels; the prior comes from how scenes are
# drawn. A closed (yes/no) entry first draws its answer (yes with probability p_yes), then a
# scene that makes it true, every other attribute from the split's skewed distributions. So in
# SFT and align "yes" answers 80 % of closed questions, findings lie on the left about 74 % of
# the time (75 % drawn; a "no" to "...in the left lung?" may put them on the right), about
# 56 % of scenes with findings have one, 68 % small ones: a model trained there can score well
# by guessing, which is the misalignment HSCR targets. val and test draw everything uniformly,
# with exactly half of the closed answers "yes" (an odd count has one more "no").


# Imports used by this section only.
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

WORLD_VERSION = "synthetic-medvqa-2"
WORLD_SPLITS = ("sft", "align", "val", "test")
MODALITIES = ("xray", "mri", "ct")
_COUNT_WORDS = ("none", "one", "two", "three")


@dataclass(frozen=True)
class Scene:
    """What one scan shows. side and size are None when count == 0."""

    modality: str  # "xray" | "mri" | "ct"
    count: int  # number of findings, 0-3
    side: str | None  # "left" | "right": the image's half holding every finding
    size: str | None  # "small" | "large": the size of every finding


@dataclass(frozen=True)
class SplitPrior:
    """How a split draws its entries: answer and attribute distributions, question kinds."""

    p_yes: float  # closed questions answered "yes" (balanced splits: exactly half, shuffled)
    p_present: float  # a scene has findings, when the question leaves it open
    p_left: float  # findings (and the side a question asks about) on the image's left
    count_weights: tuple[float, float, float]  # relative weights of 1, 2, 3 findings
    p_small: float  # findings are small
    balanced: bool  # exact 50/50 yes/no over the split's closed questions
    vqa_format: bool  # test.json layout with answer_type (else instruction layout)


# Change these to retune the world: world.json records them (and the question kinds), so a
# cached world drawn with other values is rebuilt. A change to the drawing code instead
# needs a new WORLD_VERSION.
_SKEWED = dict(p_yes=0.8, p_present=0.75, p_left=0.75, count_weights=(0.6, 0.28, 0.12),
               p_small=0.7, balanced=False)
_BALANCED = dict(p_yes=0.5, p_present=0.5, p_left=0.5, count_weights=(1.0, 1.0, 1.0),
                 p_small=0.5, balanced=True)
SPLIT_PRIORS = {
    "sft": SplitPrior(**_SKEWED, vqa_format=False),
    "align": SplitPrior(**_SKEWED, vqa_format=False),  # same prior as SFT: the model's own data
    "val": SplitPrior(**_BALANCED, vqa_format=True),
    "test": SplitPrior(**_BALANCED, vqa_format=True),
}

# Question kinds and their shares (the same in every split): half closed yes/no, half open.
# Kinds marked in _NEEDS_FINDING presuppose a finding ("Which side is the nodule on?").
CLOSED_KINDS = {"presence": 0.12, "normal": 0.04, "side_presence": 0.14, "multiple": 0.08,
                "size_closed": 0.05, "modality_closed": 0.04, "organ_closed": 0.03}
OPEN_KINDS = {"modality": 0.04, "organ": 0.03, "side": 0.07, "location": 0.06, "count": 0.08,
              "size": 0.05, "describe": 0.12, "report": 0.05}
_NEEDS_FINDING = {"size_closed", "side", "location", "size"}
_YES_NO_SUFFIX = " Please choose from the following two options: [yes, no]"
_P_SUFFIX = 0.25  # share of closed questions carrying the two-option suffix


@dataclass(frozen=True)
class _ModalityText:
    name: str  # short answer to "what modality"
    article_name: str  # "an X-ray"
    long_name: str  # "chest X-ray", for reports
    organ: str
    finding: str
    findings: str  # plural
    region: str  # "{side} lung": where a finding is, as a short answer
    where: str  # "in the {side} lung": the same inside a sentence


_TEXT = {
    "xray": _ModalityText("X-ray", "an X-ray", "chest X-ray", "chest", "nodule", "nodules",
                          "{side} lung", "in the {side} lung"),
    "mri": _ModalityText("MRI", "an MRI", "brain MRI", "brain", "lesion", "lesions",
                         "{side} hemisphere", "in the {side} hemisphere"),
    "ct": _ModalityText("CT", "a CT scan", "abdominal CT scan", "abdomen", "mass", "masses",
                        "{side} side of the abdomen", "on the {side} side of the abdomen"),
}

# Question templates. Fields: {f} finding, {fs} plural, {the_f} "the nodule(s)", {is} "is" /
# "are" (agreeing with the count), {where}, {side}, {asked} (the modality, organ or size a
# closed question names).
_TEMPLATES = {
    "presence": ["Is there a {f} in this image?", "Is there any {f}?", "Are there any {fs}?",
                 "Is a {f} present?"],
    "normal": ["Is this scan normal?", "Is this image normal?", "Does this image look normal?"],
    "side_presence": ["Is there a {f} {where}?", "Is a {f} present {where}?",
                      "Does the {side} side show a {f}?"],
    "multiple": ["Is there more than one {f}?", "Are there multiple {fs}?",
                 "Are there several {fs}?"],
    "size_closed": ["{Is} {the_f} {asked}?", "Does this image show {a_size} {f}?"],
    "modality_closed": ["Is this {asked}?", "Is this image {asked}?"],
    "organ_closed": ["Is this an image of the {asked}?", "Does this image show the {asked}?"],
    "modality": ["What imaging modality is this?", "What kind of scan is this?",
                 "What modality was used to take this image?"],
    "organ": ["What part of the body is shown?", "Which body region is imaged?",
              "What part of the body is this?"],
    "side": ["Which side {is} {the_f} on?", "On which side {is} {the_f}?",
             "Which side of the image shows {the_f}?"],
    "location": ["Where {is} {the_f}?", "Where {is} {the_f} located?",
                 "In which part of the image {is} {the_f}?"],
    "count": ["How many {fs} are there?", "How many {fs} can be seen?",
              "How many {fs} are visible?"],
    "size": ["What is the size of {the_f}?", "How big {is} {the_f}?",
             "{Is} {the_f} small or large?"],
    "describe": ["Describe the findings.", "What are the findings?", "What abnormality is seen?",
                 "What do you see in this image?"],
    "report": ["Describe the image.", "Write a short report for this image.",
               "Give a brief report of this scan."],
}


def findings_sentence(scene: Scene) -> str:
    """The canonical description: "There are two small nodules in the right lung." or
    "No abnormality is seen."."""
    text = _TEXT[scene.modality]
    if scene.count == 0:
        return "No abnormality is seen."
    where = text.where.format(side=scene.side)
    if scene.count == 1:
        return f"There is one {scene.size} {text.finding} {where}."
    return f"There are {_COUNT_WORDS[scene.count]} {scene.size} {text.findings} {where}."


def _question_answer(kind: str, scene: Scene, asked: str | None,
                     rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of one kind about a scene; `asked` is the side, size, modality or
    organ a closed question names. The answer is computed from the scene, never chosen."""
    text = _TEXT[scene.modality]
    plural = scene.count > 1
    fields = {
        "f": text.finding, "fs": text.findings, "side": asked or "",
        "the_f": f"the {text.findings if plural else text.finding}",
        "is": "are" if plural else "is", "Is": "Are" if plural else "Is",
        "where": text.where.format(side=asked) if kind == "side_presence" else "",
        "asked": asked or "", "a_size": f"a {asked}" if asked else "",
    }
    if kind == "modality_closed":
        fields["asked"] = _TEXT[asked].article_name
    templates = _TEMPLATES[kind]
    question = templates[int(rng.integers(len(templates)))].format(**fields)

    yes_no = {
        "presence": scene.count > 0,
        "normal": scene.count == 0,
        "side_presence": scene.count > 0 and scene.side == asked,
        "multiple": scene.count > 1,
        "size_closed": scene.size == asked,
        "modality_closed": scene.modality == asked,
        "organ_closed": text.organ == asked,
    }
    if kind in CLOSED_KINDS:
        if rng.random() < _P_SUFFIX:
            question += _YES_NO_SUFFIX
        return question, "yes" if yes_no[kind] else "no"
    answers = {
        "modality": text.name,
        "organ": text.organ,
        "side": scene.side,
        "location": text.region.format(side=scene.side) if scene.side else None,
        "count": _COUNT_WORDS[scene.count],
        "size": scene.size,
        "describe": findings_sentence(scene),
        "report": f"This is {'an' if text.long_name[0] in 'aeiou' else 'a'} {text.long_name}. "
                  + findings_sentence(scene),
    }
    return question, answers[kind]


# --------------------------------------------------------------------------------------------
# Drawing scenes


def _draw_scene(kind: str, target: bool | None, prior: SplitPrior,
                rng: np.random.Generator) -> tuple[Scene, str | None]:
    """A scene (and the thing a closed question names) such that a closed question of `kind`
    has answer `target`; every attribute the answer leaves open comes from the split's prior."""
    def side() -> str:
        return "left" if rng.random() < prior.p_left else "right"

    def other(value: str, choices) -> str:
        rest = [c for c in choices if c != value]
        return rest[int(rng.integers(len(rest)))]

    weights = np.array(prior.count_weights, dtype=np.float64)
    some = -1  # a count meaning "findings present, how many drawn from the prior"
    count = None  # None: present or not, drawn from the prior
    modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    where, size, asked = None, None, None
    if kind in ("presence", "normal"):
        count = 0 if target == (kind == "normal") else some
    elif kind == "side_presence":
        asked = side()
        if target:
            count, where = some, asked
        elif rng.random() < 0.5:  # "no": either nothing, or findings on the other side
            count = 0
        else:
            count, where = some, other(asked, ("left", "right"))
    elif kind == "multiple":
        if target:
            count = 2 + int(rng.choice(2, p=weights[1:] / weights[1:].sum()))
        else:
            count = int(rng.integers(2))  # none or one, evenly
    elif kind == "size_closed":
        asked = "small" if rng.random() < 0.5 else "large"
        count, size = some, asked if target else other(asked, ("small", "large"))
    elif kind == "modality_closed":
        asked = modality if target else other(modality, MODALITIES)
    elif kind == "organ_closed":
        organ = _TEXT[modality].organ
        asked = organ if target else other(organ, [t.organ for t in _TEXT.values()])
    elif kind in _NEEDS_FINDING:
        count = some
    if count is None:
        count = some if rng.random() < prior.p_present else 0
    if count == some:
        count = 1 + int(rng.choice(3, p=weights / weights.sum()))
    if count == 0:
        return Scene(modality, 0, None, None), asked
    where = where or side()
    size = size or ("small" if rng.random() < prior.p_small else "large")
    return Scene(modality, count, where, size), asked


# --------------------------------------------------------------------------------------------
# Rendering: shapes in normalised coordinates (x, y in [-1, 1], x to the right, y down), soft
# edges one pixel wide so that the pictures look the same at any size.

# Findings are blended towards this gray level; anatomy stays <= ~205. Version 1 used 235 and a
# small radius of 0.06 (2 px): a ViT of a few million parameters trained from scratch for a few
# hundred steps then learns the modality but never the findings, so the default's base could not
# look at them at all.
_FINDING_VALUE = 255.0
_RADIUS = {"small": 0.08, "large": 0.12}  # finding radius, normalised (2.6 and 4 px at 64 px)


class _Canvas:
    """A float32 image with paint operations in jittered anatomy coordinates."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.px = 2.0 / size  # one pixel in normalised units
        self.coords = (np.arange(size, dtype=np.float32) + 0.5) * self.px - 1.0  # pixel centres
        self.shift = [float(v) for v in rng.uniform(-0.05, 0.05, size=2)]  # Python floats: the
        self.scale = float(rng.uniform(0.92, 1.06))  # per-shape scalar maths stays cheap
        self.pixels = np.zeros((size, size), dtype=np.float32)

    def to_image(self, cx: float, cy: float) -> tuple[float, float]:
        return self.shift[0] + self.scale * cx, self.shift[1] + self.scale * cy

    def mask(self, cx: float, cy: float, rx: float,
             ry: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """Soft ellipse mask in [0, 1] (centre and radii in anatomy coordinates), computed on the
        bounding box only (most shapes are small): (rows, cols) slices and the (h, w) mask."""
        cx, cy = self.to_image(cx, cy)
        rx, ry = rx * self.scale, ry * self.scale
        sharpness = min(rx, ry) / self.px
        reach = 1.0 + 0.5 / sharpness  # the soft edge reaches d = 1 + half a pixel
        box = []
        for centre, radius in ((cy, ry), (cx, rx)):
            lo = math.floor((centre - radius * reach + 1.0) / self.px - 0.5)
            hi = math.ceil((centre + radius * reach + 1.0) / self.px - 0.5) + 1
            box.append(slice(min(max(lo, 0), self.size), min(max(hi, 0), self.size)))
        y = (self.coords[box[0], None] - cy) * (1.0 / ry)  # (h, 1)
        x = (self.coords[None, box[1]] - cx) * (1.0 / rx)  # (1, w)
        m = np.sqrt(x * x + y * y)  # (h, w): elliptic distance d, 1 on the outline
        m *= -sharpness
        m += sharpness + 0.5  # (1 - d) * sharpness + 0.5: a ramp one pixel wide
        return (box[0], box[1]), m.clip(0.0, 1.0, out=m)

    def full_mask(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """The same mask on the whole canvas, (S, S)."""
        box, m = self.mask(cx, cy, rx, ry)
        out = np.zeros_like(self.pixels)
        out[box] = m
        return out

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: float,
                alpha: float = 1.0) -> None:
        """Blend an ellipse towards gray level `value` (alpha: how far)."""
        box, m = self.mask(cx, cy, rx, ry)
        self.pixels[box] += (alpha * m) * (value - self.pixels[box])

    def paint(self, mask: np.ndarray, value: float, alpha: float = 1.0) -> None:
        """Blend a full-canvas mask towards gray level `value`."""
        self.pixels += (alpha * mask) * (value - self.pixels)


def _inside(cx, cy, ellipse, margin: float) -> bool:
    ex, ey, rx, ry = ellipse
    return ((cx - ex) / (rx - margin)) ** 2 + ((cy - ey) / (ry - margin)) ** 2 < 1.0


# Anatomy per modality, in anatomy coordinates: (cx, cy, rx, ry) ellipses.
_LUNGS = {"left": (-0.38, -0.05, 0.29, 0.62), "right": (0.38, -0.05, 0.29, 0.62)}
_HEART = (0.1, 0.28, 0.22, 0.28)
_BRAIN = (0.0, 0.0, 0.66, 0.8)
_VENTRICLES = {"left": (-0.11, -0.05, 0.08, 0.22), "right": (0.11, -0.05, 0.08, 0.22)}
_ABDOMEN = (0.0, 0.0, 0.88, 0.68)
_SPINE_CT = (0.0, 0.42, 0.14, 0.13)


def _finding_fits(modality: str, side: str, cx: float, cy: float, r: float) -> bool:
    """Whether a finding of radius r at (cx, cy) lies wholly in its side's organ region."""
    if modality == "xray":
        heart = (_HEART[0], _HEART[1], _HEART[2] + r, _HEART[3] + r)
        return _inside(cx, cy, _LUNGS[side], 0.6 * r) and not _inside(cx, cy, heart, 0.0)
    if modality == "mri":
        return abs(cx) > 0.22 + r and _inside(cx, cy, _BRAIN, r + 0.04)
    spine = (_SPINE_CT[0], _SPINE_CT[1], _SPINE_CT[2] + r, _SPINE_CT[3] + r)
    return (abs(cx) > 0.12 + r and _inside(cx, cy, _ABDOMEN, r + 0.12)
            and not _inside(cx, cy, spine, 0.0))


def _place_findings(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, r) of each finding, on the scene's side, apart from each other by 2 px or more
    so that they can be counted."""
    sign = -1.0 if scene.side == "left" else 1.0
    placed: list[tuple[float, float, float]] = []
    tries = 0
    while len(placed) < scene.count:
        tries += 1
        if tries % 200 == 0:  # stuck (earlier findings leave no room): start over
            placed = []
        if tries > 5000:  # cannot happen with the shapes above; fail loudly if they change
            raise RuntimeError(
                f"cannot place {scene.count} {scene.size} findings in {scene.modality}")
        r = _RADIUS[scene.size] * rng.uniform(0.85, 1.15)
        cx, cy = sign * rng.uniform(0.0, 0.9), rng.uniform(-0.8, 0.8)
        if not _finding_fits(scene.modality, scene.side, cx, cy, r):
            continue
        if all(np.hypot(cx - x, cy - y) > r + q + 0.07 for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed


def _texture(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Smooth random field of about unit amplitude, (S, S): cells x cells noise, upsampled."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    field_image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(field_image, dtype=np.float32)


def _draw_anatomy(c: _Canvas, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Paint the modality's anatomy; returns the body mask (where texture goes), (S, S)."""
    u = rng.uniform  # small intensity jitter per structure
    if modality == "xray":
        body = c.full_mask(0.0, 0.08, 0.9, 0.98)
        c.paint(body, u(140, 160))
        _, rib_y = c.to_image(0.0, 0.0)
        for lung in _LUNGS.values():
            m = c.full_mask(*lung)
            c.paint(m, u(35, 55))
            # ribs: faint bright bands across the lung field
            bands = np.sin((c.coords[:, None] - rib_y) * 16.0 + 3.0 * c.coords[None, :] ** 2
                           + u(0, 6.28)) > 0.55  # (S, S)
            c.paint(m * bands, u(70, 85), alpha=0.8)
            for _ in range(int(rng.integers(2, 5))):  # vessels: small dim dots
                vx = lung[0] + u(-0.6, 0.6) * lung[2]
                vy = lung[1] + u(-0.6, 0.6) * lung[3]
                c.ellipse(vx, vy, 0.035, 0.035, u(95, 120), alpha=0.8)
        c.ellipse(*_HEART, u(150, 170))
        c.ellipse(0.0, 0.1, 0.06, 0.9, u(180, 200))  # spine
    elif modality == "mri":
        body = c.full_mask(0.0, 0.0, 0.8, 0.94)
        c.paint(body, u(185, 205))  # skull
        c.ellipse(0.0, 0.0, 0.71, 0.85, u(15, 35))  # CSF rim
        brain = c.full_mask(*_BRAIN)
        c.paint(brain, u(110, 130))
        c.pixels += 12.0 * brain * _texture(rng, c.size, 10)  # gyri-like mottling
        for ventricle in _VENTRICLES.values():
            c.ellipse(*ventricle, u(30, 50))
        c.paint(c.full_mask(0.0, 0.0, 0.012, 0.8) * brain, u(50, 70), alpha=0.7)  # falx
    else:
        body = c.full_mask(*_ABDOMEN)
        c.paint(body, u(70, 90))  # fat
        c.ellipse(0.0, 0.0, 0.8, 0.6, u(105, 120))  # muscle and viscera
        c.ellipse(-0.38, -0.12, 0.36, 0.34, u(135, 150))  # liver (image left)
        c.ellipse(0.52, -0.08, 0.16, 0.2, u(130, 145))  # spleen
        for x in (-0.34, 0.34):
            c.ellipse(x, 0.26, 0.1, 0.14, u(145, 160))  # kidneys
        c.ellipse(0.06, 0.16, 0.06, 0.06, u(155, 170))  # aorta
        c.ellipse(*_SPINE_CT, u(190, 205))
        c.ellipse(0.0, 0.42, 0.06, 0.05, u(90, 110))  # spinal canal
        for _ in range(int(rng.integers(2, 6))):  # bowel gas: dark blobs anywhere central
            c.ellipse(u(-0.5, 0.5), u(-0.3, 0.15), u(0.03, 0.08), u(0.03, 0.08), u(5, 25))
    return body


def render_scene(scene: Scene, size: int, rng: np.random.Generator,
                 contrast: float = 1.0) -> np.ndarray:
    """Draw a scene: (size, size) uint8. contrast scales how far findings are blended from the
    tissue around them towards their bright value (1 = fully)."""
    c = _Canvas(size, rng)
    body = _draw_anatomy(c, scene.modality, rng)
    for cx, cy, r in _place_findings(scene, rng):
        squash = rng.uniform(0.8, 1.2)  # slightly oval
        c.ellipse(cx, cy, r * squash, r / squash, _FINDING_VALUE, alpha=contrast)
    c.pixels += 8.0 * body * _texture(rng, size)  # low-frequency density variation
    c.pixels = c.pixels * rng.uniform(0.92, 1.06) + rng.uniform(-6.0, 6.0)  # window jitter
    c.pixels += 5.0 * rng.standard_normal(c.pixels.shape, dtype=np.float32)
    return np.clip(np.rint(c.pixels), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Splits and files


def _split_entries(split: str, n: int, seed: int, size: int,
                   contrast: float) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield the n (record, pixels) of a split, deterministic for (seed, split)."""
    prior = SPLIT_PRIORS[split]
    rng = np.random.default_rng([seed, WORLD_SPLITS.index(split)])
    names = list(CLOSED_KINDS) + list(OPEN_KINDS)
    shares = np.array(list(CLOSED_KINDS.values()) + list(OPEN_KINDS.values()))
    kinds = [names[i] for i in rng.choice(len(names), size=n, p=shares / shares.sum())]
    closed = [i for i, kind in enumerate(kinds) if kind in CLOSED_KINDS]
    if prior.balanced:  # exactly half "yes" (the odd one out: "no"), in random order
        targets = [j < len(closed) // 2 for j in range(len(closed))]
        targets = [targets[j] for j in rng.permutation(len(closed))]
    else:
        targets = list(rng.random(len(closed)) < prior.p_yes)
    target_of = dict(zip(closed, targets))

    for i, kind in enumerate(kinds):
        entry_rng = np.random.default_rng([seed, WORLD_SPLITS.index(split), i])
        target = bool(target_of[i]) if i in target_of else None
        scene, asked = _draw_scene(kind, target, prior, entry_rng)
        question, answer = _question_answer(kind, scene, asked, entry_rng)
        if target is not None and answer != ("yes" if target else "no"):  # a bug, not data
            raise RuntimeError(f"{split} {i}: {kind} drew {scene} for the answer {target}")
        pixels = render_scene(scene, size, entry_rng, contrast)
        record_id = f"{split}-{i:05d}"
        record = {"id": record_id, "image": f"images/{record_id}.png"}
        if prior.vqa_format:
            record["answer_type"] = "CLOSED" if kind in CLOSED_KINDS else "OPEN"
        record["conversations"] = [{"from": "human", "value": f"<image>\n{question}"},
                                   {"from": "gpt", "value": answer}]
        record["kind"] = kind
        record["scene"] = vars(scene)
        yield record, pixels


def _world_params(seed, n_sft, n_align, n_val, n_test, size, contrast) -> dict:
    problems = []
    for name, value in (("seed", seed), ("n_sft", n_sft), ("n_align", n_align),
                        ("n_val", n_val), ("n_test", n_test), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{name} must be a non-negative int, got {value!r}")
    if isinstance(size, int) and not isinstance(size, bool) and not 16 <= size <= 1024:
        problems.append(f"size must be in 16..1024 pixels, got {size}")
    number = isinstance(contrast, (int, float)) and not isinstance(contrast, bool)
    if not number or not 0 < contrast <= 1:
        problems.append(f"contrast must be in (0, 1], got {contrast!r}")
    if problems:
        raise ValueError("build_world: " + "; ".join(problems))
    params = {"version": WORLD_VERSION, "seed": seed, "size": size, "contrast": float(contrast),
              "n": {"sft": n_sft, "align": n_align, "val": n_val, "test": n_test},
              "priors": {split: vars(prior) for split, prior in SPLIT_PRIORS.items()},
              "kinds": {**CLOSED_KINDS, **OPEN_KINDS}}
    return json.loads(json.dumps(params))  # as world.json will hold it (tuples become lists)


def _world_paths(root: Path) -> dict[str, Path]:
    paths = {"root": root, "images": root / "images", "world": root / "world.json"}
    paths.update({split: root / f"{split}.json" for split in WORLD_SPLITS})
    return paths


def _is_world_image(name: str) -> bool:
    """Names build_world writes in images/: "<split>-<digits>.png"."""
    stem, _, ext = name.rpartition(".")
    split, _, number = stem.rpartition("-")
    return ext == "png" and split in WORLD_SPLITS and number.isdigit()


def _save_png(pixels: np.ndarray, path: Path) -> None:
    # compress_level 1: these noisy scans barely compress, and the default level costs 3x more
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two builders never share one
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def build_world(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    n_sft: int = 6000,
    n_align: int = 2000,
    n_val: int = 300,
    n_test: int = 600,
    size: int = 64,
    contrast: float = 1.0,
    force: bool = False,
) -> dict[str, Path]:
    """Build the synthetic Med-VQA world under root, or reuse the one already there.

    n_*: entries per split (one image each); size: image side in pixels; contrast: how far
    findings are blended towards their bright value (lower makes them subtler); seed: all
    randomness (the same arguments give the same bytes).
    Reused when root/world.json records the same version, seed, sizes, image size and contrast
    and every split file is present with its images; otherwise (or with force) rebuilt:
    world.json is removed first and written last, so an interrupted build is redone next time.
    A rebuild deletes only the files build_world writes (split files, images/<split>-<n>.png).
    Returns the paths: "root", "images", "world", "sft", "align", "val", "test".
    """
    params = _world_params(seed, n_sft, n_align, n_val, n_test, size, contrast)
    root = Path(root)
    paths = _world_paths(root)
    if not force and _world_matches(paths, params):
        return paths

    root.mkdir(parents=True, exist_ok=True)
    paths["world"].unlink(missing_ok=True)  # from here on the folder holds no valid world
    paths["images"].mkdir(exist_ok=True)
    # Images of an earlier world that this one does not overwrite (it has fewer entries).
    keep = {f"{split}-{i:05d}.png" for split in WORLD_SPLITS for i in range(params["n"][split])}
    for entry in os.scandir(paths["images"]):
        if _is_world_image(entry.name) and entry.name not in keep:
            os.unlink(entry.path)
    counts = {}
    # PNG encoding and file writes release the GIL: a writer thread overlaps them with drawing.
    with ThreadPoolExecutor(max_workers=1) as writer:
        for split in WORLD_SPLITS:
            records, saved = [], []
            for record, pixels in _split_entries(split, params["n"][split], seed, size,
                                                 params["contrast"]):
                records.append(record)
                saved.append(writer.submit(_save_png, pixels, root / record["image"]))
            for future in saved:
                future.result()  # re-raises a failed write here
            _write_atomic(paths[split], json.dumps(records, indent=1) + "\n")
            counts[split] = _split_stats(records)
    world = {**params, "splits": {s: f"{s}.json" for s in WORLD_SPLITS}, "stats": counts}
    _write_atomic(paths["world"], json.dumps(world, indent=1) + "\n")
    return paths


def _world_matches(paths: dict[str, Path], params: dict) -> bool:
    try:
        world = json.loads(paths["world"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(world, dict) or {k: world.get(k) for k in params} != params:
        return False
    if not all(paths[split].is_file() for split in WORLD_SPLITS) or not paths["images"].is_dir():
        return False
    on_disk = sum(1 for e in os.scandir(paths["images"]) if _is_world_image(e.name))
    return on_disk == sum(params["n"].values())


def _split_stats(records: list[dict]) -> dict:
    """Answer statistics recorded in world.json (and checked by the tests)."""
    closed = [r["conversations"][1]["value"] for r in records if r["kind"] in CLOSED_KINDS]
    sides = [r["scene"]["side"] for r in records if r["scene"]["count"] > 0]
    return {"entries": len(records), "closed": len(closed), "closed_yes": closed.count("yes"),
            "with_findings": len(sides), "findings_left": sides.count("left")}


def world_texts(root: str | os.PathLike) -> list[str]:
    """Every question (without "<image>") and answer of the built world's four splits, in file
    order (repeats kept, as a tokenizer trainer wants frequencies)."""
    paths = _world_paths(Path(root))
    if not paths["world"].is_file():
        raise FileNotFoundError(
            f"no built world in {str(root)!r} (world.json missing): run build_world first")
    texts = []
    for split in WORLD_SPLITS:
        records, bad = read_records(paths[split])
        if bad:
            raise ValueError(f"{paths[split]} has {len(bad)} bad records, first: {bad[0].reason}")
        for record in records:
            texts.append(record.question)
            texts.append(record.answer)
    return texts
