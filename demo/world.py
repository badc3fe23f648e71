"""The synthetic Med-VQA world of the embedded demo: scenes drawn from a seed, rendered to
grayscale scans, and written as LLaVA-Med instruction and VQA files.

A small, fully synthetic medical VQA world, generated from a seed with numpy + pillow, so that
the whole method can run (and be tested) with no download. Its files have the layouts that
data.py reads (docs/FORMATS.md):

  root/images/<id>.png   grayscale scans (mode "L", size x size, 64 px by default)
  root/sft.json          LLaVA-Med instruction format, with a language prior (below)
  root/align.json        the same format and prior: the entries HSCR builds preferences from
  root/val.json          LLaVA-Med VQA test.json format, balanced: for choosing settings
  root/test.json         the same, balanced, never used for tuning
  root/world.json        seed, sizes, version: written last, so its presence marks a whole build

Every record is single-turn: "<image>\\n<question>" -> answer, "image": "images/<id>.png"
(relative to root, the readers' default image root), plus "kind" (the question kind) and
"scene" (the facts drawn in the pixels): readers ignore both; tests and error analysis use them.
The describe/report questions of val and test also carry "facts" (`scene_facts`: the facts
their reference answer states, with every value of each slot and its phrases), which eval.py's
description metric reads (facts contradicted / correct) without knowing this world.

Question kinds. SFT, val and test share one mix of VQA kinds (half closed). The alignment split
is instruction-like, as LLaVA-Med's instruction data (ALIGN_KINDS): 90 % reports ("This is a
chest X-ray. There are two small nodules in the left lung.") and descriptions (the second
sentence alone), each stating several facts (modality, organ, presence, count, side, size) in
sentence forms SFT already holds, so each answer has several modality-coupled tokens to corrupt;
10 % stays VQA. Versions 3 and 4 changed only the alignment split (3: 70 % reports and
descriptions; 4: 90 %, so that most entries give the implicit loss two or more negatives): SFT,
val and test questions and answers are those of version 2 (sft.json byte for byte), so the
shipped base stays valid.

Scenes. Three modalities with distinct anatomy: chest X-ray (bright body, two dark lung fields,
spine, heart, ribs), brain MRI (bright skull ring, gray brain, dark ventricles) and abdominal
CT (round body, liver, spleen, kidneys, spine, dark bowel gas). A scene has 0-3 findings --
nodules (X-ray), lesions (MRI), masses (CT) -- drawn as bright discs, all on one side and of
one size. "left" and "right" always mean the image's left and right halves (not the
radiological patient side). Anatomy is jittered (shift, scale), intensities are jittered
(gain, offset), and low-frequency texture and pixel noise are added; findings are the
brightest structures, but faint vessels, ribs and gas make the picture less trivial.

Language prior. Answers are always true to the pixels; the prior comes from how scenes are
drawn. A closed (yes/no) entry first draws its answer (yes with probability p_yes), then a
scene that makes it true, every other attribute from the split's skewed distributions. So in
SFT and align "yes" answers 80 % of closed questions, findings lie on the left about 74 % of
the time (75 % drawn; a "no" to "...in the left lung?" may put them on the right), about
56 % of scenes with findings have one, 68 % small ones: a model trained there can score well
by guessing, which is the misalignment HSCR targets. val and test draw everything uniformly,
with exactly half of the closed answers "yes" (an odd count has one more "no").
"""
from __future__ import annotations

import json
import math
import re
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data import read_records

WORLD_VERSION = "synthetic-medvqa-4"
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
# The alignment split is instruction-like, as LLaVA-Med's instruction data: mostly reports and
# descriptions, each stating several facts of the scene (modality, organ, presence, count, side,
# size), hence several modality-coupled tokens per answer for HSCR to corrupt; 10 % stays VQA, in
# the shares above (a one-word answer has one coupled position, hence at most one negative). The SFT, val and test splits keep the shares above (SFT byte-identical to
# world version 2, so that the shipped base stays the model of its own SFT data).
_VQA = {**CLOSED_KINDS, **OPEN_KINDS}
_VQA_ONLY = {k: v for k, v in _VQA.items() if k not in ("describe", "report")}
ALIGN_KINDS = {**{k: 0.1 * v / sum(_VQA_ONLY.values()) for k, v in _VQA_ONLY.items()},
               "describe": 0.3, "report": 0.6}
SPLIT_KINDS = {"sft": _VQA, "align": ALIGN_KINDS, "val": _VQA, "test": _VQA}
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


# Fact slots of a description (eval.py's description metric): slot → value → the phrases that
# state it (matched as whole words, any case). A value of a slot is stated when one of its
# phrases occurs; two values of one slot never share a phrase.
FACT_PHRASES = {
    "modality": {"X-ray": ["X-ray"], "MRI": ["MRI"], "CT": ["CT"]},
    "organ": {"chest": ["chest", "lung"], "brain": ["brain", "hemisphere"],
              "abdomen": ["abdomen", "abdominal"]},
    "finding": {"nodule": ["nodule", "nodules"], "lesion": ["lesion", "lesions"],
                "mass": ["mass", "masses"]},
    "count": {"none": ["no abnormality"], "one": ["one"], "two": ["two"], "three": ["three"]},
    "side": {"left": ["left"], "right": ["right"]},
    "size": {"small": ["small"], "large": ["large"]},
}


def _states(text: str, phrases: list[str]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text, re.IGNORECASE)
               for p in phrases)


def scene_facts(scene: Scene, answer: str) -> dict[str, dict]:
    """The facts of `scene` that `answer` (its reference answer) states, in the record field
    "facts" of describe/report questions: slot → {"value": the scene's value, "phrases": every
    value of the slot → its phrases}. eval.py reads this field without knowing the world."""
    text = _TEXT[scene.modality]
    truth = {"modality": text.name, "organ": text.organ, "count": _COUNT_WORDS[scene.count]}
    if scene.count:
        truth.update(finding=text.finding, side=scene.side, size=scene.size)
    return {slot: {"value": value, "phrases": FACT_PHRASES[slot]}
            for slot, value in truth.items() if _states(answer, FACT_PHRASES[slot][value])}


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
    names = list(SPLIT_KINDS[split])
    shares = np.array(list(SPLIT_KINDS[split].values()))
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
        if prior.vqa_format and kind in ("describe", "report"):
            record["facts"] = scene_facts(scene, answer)
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
              "kinds": SPLIT_KINDS}
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


# --------------------------------------------------------------------------------------------
# External negatives: the dispreferred answers an outside system writes (the paper's GPT-4o pairs)

# The facts a wrong answer may change, as attributes of the scene: "presence" adds findings to an
# empty scene or removes them all; a modality brings its organ and finding words along.
EXTERNAL_FACTS = ("modality", "presence", "count", "side", "size")
_SINGLE_FACT = {"modality": ("modality",), "organ": ("modality",), "side": ("side",), "location": ("side",),
                "size": ("size",)}


def _other(value, choices, rng: np.random.Generator):
    rest = [c for c in choices if c != value]
    return rest[int(rng.integers(len(rest)))]


def external_negative(kind: str, scene: Scene, answer: str,
                      rng: np.random.Generator) -> tuple[str, list[str]]:
    """(a fluent wrong answer, the facts it changes): what a strong text model asked for a plausible
    wrong answer would write from the reference, in the world's phrasing. A yes/no answer is
    flipped; any other is the world's answer for the scene with one to three of the facts the
    answer states (EXTERNAL_FACTS) changed to values the scene contradicts."""
    if kind in CLOSED_KINDS:
        return ("no" if answer == "yes" else "yes"), ["yes/no"]
    found = scene.count > 0
    if kind in _SINGLE_FACT:
        facts = list(_SINGLE_FACT[kind])
    elif kind == "count":
        facts = [_other(None, ("presence", "count") if found else ("presence",), rng)]
    else:  # describe, report: modality is stated in reports, and by the organ of a finding
        able = ["presence"] + ["count", "side", "size"] * found + ["modality"] * (found or kind == "report")
        facts, want = [], int(rng.integers(1, 4))
        for fact in (able[i] for i in rng.permutation(len(able))):
            gone = "presence" in facts and found  # the findings are removed: nothing else to change
            if len(facts) < want and not gone and not (fact == "presence" and found and facts):
                facts.append(fact)
    wrong = vars(scene).copy()
    for fact in facts:
        if fact == "presence":
            wrong.update(count=0, side=None, size=None) if found else wrong.update(
                count=int(rng.integers(1, 4)), side=_other(None, ("left", "right"), rng),
                size=_other(None, ("small", "large"), rng))
        else:
            choices = {"modality": MODALITIES, "count": (1, 2, 3), "side": ("left", "right"),
                       "size": ("small", "large")}[fact]
            wrong[fact] = _other(wrong[fact], choices, rng)
    return _question_answer(kind, Scene(**wrong), None, rng)[1], facts


def write_external_negatives(prefs: str | os.PathLike, align: str | os.PathLike, out: str | os.PathLike,
                             seed: int, overwrite: bool = False) -> Path:
    """A preference file (docs/FORMATS.md) with the entries of `prefs` (hscr.py's output on `align`),
    each with one external negative (`external_negative`, drawn from (seed, the entry's index)) in
    place of the self-made ones; texts only, which train.py tokenizes. The header records what made
    it. A file already at `out` is kept when it holds the same, else replaced only with `overwrite`."""
    from harness import provenance
    from harness.cli import UserError
    from harness.files import read_jsonl

    lines = read_jsonl(prefs)
    if not lines or not lines[0].get("_header"):
        raise UserError(f"{prefs}: not an hscr.py output (no header line)")
    entries = {r["id"]: r for r in json.loads(Path(align).read_text(encoding="utf-8"))}
    options = {"prefs": str(prefs), "align": str(align), "seed": seed, "world_version": WORLD_VERSION,
               "image_aspect": lines[0]["options"].get("image_aspect")}
    made = provenance.fingerprint(**{"preference data": provenance.File(prefs),
                                     "align": provenance.File(align), "seed": seed, "writer": WORLD_VERSION})
    rows = [{"_header": True, "writer": "demo.world.write_external_negatives", "options": options,
             "provenance": made}]
    for r in lines[1:]:
        if r["id"] not in entries:
            raise UserError(f"{prefs}: entry {r['id']} is not in {align}")
        entry = entries[r["id"]]
        text, facts = external_negative(entry["kind"], Scene(**entry["scene"]), r["chosen"],
                                        np.random.default_rng([seed, r["index"]]))
        kept = ("id", "index", "image", "question", "prompt", "answer_type", "chosen")
        rows.append({**{k: r[k] for k in kept}, "negatives": [{"text": text, "facts": facts}],
                     "rejected": text})
    text, out = "".join(json.dumps(row) + "\n" for row in rows), Path(out)
    held = out.read_text(encoding="utf-8") if out.is_file() else None
    if held is not None and held != text and not overwrite:
        raise UserError(f"{out} holds other external negatives than {prefs} gives now; "
                        "--overwrite writes it again")
    if held != text:
        _write_atomic(out, text)
    return out
