"""data.py: image preprocessing against transformers' CLIP processor, the readers (records and
preference files), image paths.

The preprocessing reference is transformers' PIL-backend CLIPImageProcessor configured as
LLaVA-Med's (shortest edge 336, centre crop 336, CLIP mean/std, bicubic). transformers 5.x
names it CLIPImageProcessorPil; plain CLIPImageProcessor is the torchvision backend, whose
tensor resize is not PIL's and is not what LLaVA-Med ran.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    CLIP_MEAN,
    CLIP_STD,
    BadRecord,
    Record,
    Tokens,
    load_image,
    preprocess_image,
    read_preferences,
    read_records,
    resolve_image,
)
from harness import provenance, rundir
from model.tokenizer import canonical_form
from test_train import WORDS, config, hscr_file, word_tokenizer, workspace  # noqa: F401 (fixture)

# --------------------------------------------------------------------------------------------
# Image preprocessing


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessorPil

    def make(size=336, square_resize=False):
        resize = {"height": size, "width": size} if square_resize else {"shortest_edge": size}
        return CLIPImageProcessorPil(size=resize, crop_size={"height": size, "width": size})

    return make


def _reference(processor, image):
    return processor(image, return_tensors="np")["pixel_values"][0]  # (3, S, S) float32


def _random_image(mode, width, height, seed=0):
    """A noise image in `mode` (noise makes any resize or offset error visible)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "L":
        return Image.fromarray(pixels[..., 0])
    if mode == "RGBA":
        return Image.fromarray(pixels)
    rgb = Image.fromarray(pixels[..., :3])
    return rgb.quantize(colors=64) if mode == "P" else rgb


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("side", [17, 255, 337, 500])
def test_preprocess_matches_clip_processor_on_square_images(clip_processor, mode, side):
    image = _random_image(mode, side, side, seed=side)
    assert image.mode == mode
    ours = preprocess_image(image)
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    diff = np.abs(ours.numpy() - _reference(clip_processor(), image)).max()
    assert diff <= 1e-6


def test_preprocess_other_size(clip_processor):
    image = _random_image("RGB", 101, 101)
    ours = preprocess_image(image, size=224)
    assert ours.shape == (3, 224, 224)
    assert np.abs(ours.numpy() - _reference(clip_processor(224), image)).max() <= 1e-6


def _normalised(colour):
    """The CLIP-normalised value of an 8-bit colour, derived independently of data.py."""
    return (np.array(colour, np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)


@pytest.mark.parametrize(
    "mode, width, height, fill",
    [
        # wide: 20 rows of padding, 10 above and 10 below
        ("RGB", 40, 20, (122, 116, 104)),
        ("RGBA", 40, 20, (122, 116, 104)),
        # tall, odd gap 29: 14 columns left, 15 right (LLaVA's centring rounds down)
        ("L", 21, 50, (114, 114, 114)),
    ],
)
def test_padding_colour_and_centred_paste(clip_processor, mode, width, height, fill):
    """The pad colour is LLaVA-Med's: int(255 * CLIP mean) per channel = (122, 116, 104), and
    for "L" int(255 * mean of the means) = int(114.5) = 114."""
    image = _random_image(mode, width, height)
    ours = preprocess_image(image).numpy()  # (3, 336, 336)

    side, gap = max(width, height), abs(width - height)
    # Rows/columns wholly inside the padding, away from the bicubic support of the image
    # (2 source pixels = 2 * 336 / side output pixels).
    margin = (gap // 2 - 2) * 336 // side
    pad = ours[:, :margin, :] if width > height else ours[:, :, :margin]
    expected = _normalised(fill)[:, None, None]
    assert np.abs(pad - expected).max() <= 1e-6

    # The whole picture: the reference processor on a canvas padded by hand with numpy.
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    start = gap // 2
    if width > height:
        canvas[start : start + height] = pixels
    else:
        canvas[:, start : start + width] = pixels
    reference = _reference(clip_processor(), Image.fromarray(canvas))
    assert np.abs(ours - reference).max() <= 1e-6


def test_aspect_resize_is_a_plain_resize(clip_processor):
    image = _random_image("RGB", 40, 20)
    ours = preprocess_image(image, aspect="resize")
    reference = _reference(clip_processor(square_resize=True), image)
    assert np.abs(ours.numpy() - reference).max() <= 1e-6


def test_preprocess_refuses_bad_arguments_and_high_bit_depth():
    image16 = Image.fromarray(np.full((8, 8), 4000, np.uint16))
    assert image16.mode == "I;16"
    with pytest.raises(ValueError) as error:
        preprocess_image(image16, size=0, aspect="crop")
    message = str(error.value)  # one error listing every problem
    for part in ("size", "aspect", "I;16"):
        assert part in message
    with pytest.raises(TypeError):
        preprocess_image(np.zeros((8, 8, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# Image files


def test_resolve_image_stays_inside_root(tmp_path):
    assert resolve_image(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert resolve_image(tmp_path, "a/../b.png") == tmp_path / "b.png"
    for bad in ["/etc/passwd", "../x.png", "a/../../x.png", "..", ""]:
        with pytest.raises(ValueError) as error:
            resolve_image(tmp_path, bad)
        assert repr(bad) in str(error.value)


def test_resolve_image_refuses_links_that_leave_the_root(tmp_path):
    """The rule (docs/FORMATS.md "Data files"): an image whose resolved file lies outside the root, through a
    linked file or folder, is refused ("image outside --image-root", a bad record); links that stay inside,
    and a root that is itself a link, are followed; a missing file is left to the caller."""
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "sub" / "a.png").write_bytes(b"png")
    (elsewhere / "b.png").write_bytes(b"png")
    (root / "inside.png").symlink_to(root / "sub" / "a.png")
    (root / "out.png").symlink_to(elsewhere / "b.png")
    (root / "far").symlink_to(elsewhere)
    (tmp_path / "link").symlink_to(root)
    assert resolve_image(root, "inside.png") == root / "inside.png"
    assert resolve_image(tmp_path / "link", "sub/a.png") == tmp_path / "link" / "sub" / "a.png"
    assert resolve_image(root, "missing.png") == root / "missing.png"
    for bad in ("out.png", "far/b.png"):
        with pytest.raises(ValueError, match=f"^image outside --image-root: '{bad}' links to "):
            resolve_image(root, bad)


def test_load_image_errors_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    _random_image("RGB", 64, 64).save(good)
    assert np.array_equal(np.asarray(load_image(good)), np.asarray(_random_image("RGB", 64, 64)))

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="garbage.jpg"):
        load_image(garbage)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    # Pillow's default limit (1024^3 / 4 / 3 pixels); importing data must not disable it.
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3
    path = tmp_path / "bomb.png"
    Image.new("L", (20, 20)).save(path)
    # 400 pixels > 2 x 100: pillow refuses; load_image must let that through, naming the file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="bomb.png.*decompression-bomb"):
        load_image(path)


# --------------------------------------------------------------------------------------------
# Readers



def _write(path, content):
    """A JSON list (indented, as LLaVA-Med ships them) or, for a list of lines, JSON lines."""
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def _turns(*values):
    """LLaVA turns alternating human, gpt, human, ..."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def test_instruction_json_with_misspelt_conversations(tmp_path):
    dialogue = _turns("<image>\nWhat is shown?", "A chest X-ray.", "Any effusion?", "No.")
    rows = [
        {"id": "PMC1_F1", "image": "PMC1_F1.jpg", "domain": {"chest_xray": True}, "conversations": dialogue},
        {"id": "PMC2_F3", "image": "PMC2_F3.jpg", "conversatons": _turns(" Describe the stain. <image>", "H&E.")},
    ]
    records, bad = read_records(_write(tmp_path / "instruct.json", rows))
    assert bad == []
    assert records[0] == Record("PMC1_F1", "PMC1_F1.jpg", "What is shown?", "A chest X-ray.", None, dialogue)
    assert (records[1].id, records[1].question, records[1].answer) == ("PMC2_F3", "Describe the stain.", "H&E.")


def test_vqa_test_json(tmp_path):
    closed = "<image>\nIs there a fracture? Please choose from the following two options: [yes, no]"
    rows = [
        {"id": 7, "image": "synpic1.jpg", "answer_type": "CLOSED", "conversations": _turns(closed, "no")},
        {"id": "8", "image": "synpic2.jpg", "answer_type": "open", "conversations": _turns("Organ?\n<image>", "liver")},
    ]
    records, bad = read_records(_write(tmp_path / "test.json", rows))
    assert bad == []
    assert [(r.id, r.answer, r.answer_type) for r in records] == [("7", "no", "CLOSED"), ("8", "liver", "OPEN")]
    assert records[0].question == closed.replace("<image>\n", "")


def test_question_jsonl_answers_inline_and_pathvqa_types(tmp_path):
    rows = [
        {"question_id": 0, "image": "a.png", "text": "what is this?\n<image>", "answer_type": "other", "answer": "a cell"},
        {"question_id": 1, "image": "b.png", "text": "is it benign?\n<image>", "answer_type": "YES/NO", "gpt4_answer": "yes"},
        {"question_id": 2, "image": "c.png", "text": "how many nuclei?", "answer_type": "number", "answer": 3},
        # A raw U+2028 inside a string must not split the line.
        {"question_id": "q3", "image": "d.png", "text": "no answer\u2028here"},
    ]
    records, bad = read_records(_jsonl(tmp_path / "q.jsonl", rows))
    assert bad == []
    assert [(r.id, r.question, r.answer, r.answer_type) for r in records] == [
        ("0", "what is this?", "a cell", "OPEN"),
        ("1", "is it benign?", "yes", "CLOSED"),
        ("2", "how many nuclei?", "3", "OPEN"),
        ("q3", "no answer\u2028here", None, None),
    ]
    assert records[1].conversations == _turns("is it benign?\n<image>", "yes")


def test_question_jsonl_with_answers_file(tmp_path):
    questions = _jsonl(
        tmp_path / "q.jsonl",
        [{"question_id": i, "image": f"{i}.png", "text": f"q{i}?\n<image>", "answer_type": "OPEN"} for i in range(4)],
    )
    answers = _jsonl(
        tmp_path / "answers.jsonl",
        [
            {"question_id": 0, "answer": "zero"},
            {"question_id": 1, "text": "one"},  # LLaVA answer-file form
            {"question_id": 2, "answer": "two", "answer_type": "CLOSED"},  # conflicts with the question
            {"question_id": 0, "answer": "again"},  # duplicate
        ],  # and no answer for question 3
    )
    records, bad = read_records(questions, answers_path=answers)
    assert [(r.id, r.answer) for r in records] == [("0", "zero"), ("1", "one")]
    assert records[0].conversations == _turns("q0?\n<image>", "zero")
    assert [(b.file, b.index, b.id) for b in bad] == [
        (str(answers), 3, "0"),
        (str(questions), 2, "2"),
        (str(questions), 3, "3"),
    ]
    for b, word in zip(bad, ["duplicate", "differs", "no answer"]):
        assert word in b.reason


def test_malformed_records_are_reported_and_the_rest_read(tmp_path):
    qa = _turns("Q?", "A")
    rows = [
        {"id": "ok", "image": "x.jpg", "conversations": qa},
        "not an object",
        {"image": "x.jpg", "conversations": qa},  # no id
        {"id": "swap", "conversations": [qa[1], qa[0]]},  # gpt speaks first
        {"id": "empty", "conversations": _turns(" <image> ")},
        {"id": "kind", "answer_type": "maybe", "conversations": qa},
        {"id": "neither", "image": "x.jpg"},
        {"id": "ok", "conversations": qa},  # duplicate id
        {"id": "ok2", "image": "y.jpg", "conversations": qa},
    ]
    path = _write(tmp_path / "mixed.json", rows)
    records, bad = read_records(path)
    assert [r.id for r in records] == ["ok", "ok2"]
    assert all(isinstance(b, BadRecord) and b.file == str(path) for b in bad)
    assert [(b.index, b.id) for b in bad] == [
        (1, None), (2, None), (3, "swap"), (4, "empty"), (5, "kind"), (6, "neither"), (7, "ok"),
    ]
    words = ["not an object", "id", "turn 0", "empty question", "maybe", "neither", "duplicate"]
    for b, word in zip(bad, words):
        assert word in b.reason

    # JSONL: a line that is not JSON is a bad record at its line number; the rest are read.
    lines = ['{"question_id": 1, "text": "a?"}', '{"question_id": 2, "text": ', "", '{"question_id": 3, "text": "c?"}']
    jsonl = _write(tmp_path / "q.jsonl", "\n".join(lines) + "\n")
    records, bad = read_records(jsonl)
    assert [r.id for r in records] == ["1", "3"]
    assert [(b.file, b.index, b.id) for b in bad] == [(str(jsonl), 1, None)]


def test_unreadable_file_raises_naming_it(tmp_path):
    broken = _write(tmp_path / "broken.json", '[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json"):
        read_records(broken)
    whole_object = _write(tmp_path / "object.json", {"id": 1, "text": "q"})  # indented: many lines
    with pytest.raises(ValueError, match="object.json"):
        read_records(whole_object)
    with pytest.raises(ValueError, match="absent.json"):
        read_records(tmp_path / "absent.json")


# Question counts of the real files (tests/data/README.md): (total, closed, open).
BENCHMARKS = {
    "VQA_RAD_test_llavamed_format.jsonl": (451, 272, 179),
    "SLAKE_test_llavamed_format.jsonl": (1061, 416, 645),
    "pvqa_test_llavamed_format.jsonl": (6719, 3362, 3357),
}
BENCHMARK_DIR = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_real_benchmark_files(name):
    records, bad = read_records(BENCHMARK_DIR / name)
    assert bad == []
    total, closed, open_ = BENCHMARKS[name]
    assert len(records) == total
    assert sum(r.answer_type == "CLOSED" for r in records) == closed
    assert sum(r.answer_type == "OPEN" for r in records) == open_
    for r in records:
        assert isinstance(r.id, str) and r.answer and r.image and r.question
        assert "<image>" not in r.question


# --------------------------------------------------------------------------------------------
# Preference files: hscr.py's output as train.py reads it (read_preferences)


def responses(example) -> list[list[int]]:
    """The trained tokens of each row of an Example (its responses, EOS included when present)."""
    return [[i for i, on in zip(row, target) if on] for row, target in zip(example.rows, example.targets)]


def test_stored_ids_are_trained_on_when_the_tokenizer_is_the_same(workspace, tmp_path):
    """With the tokenizer hscr.py used (same digest), rows hold the stored ids, though they differ
    from what the texts give, and EOS only after complete responses; with another tokenizer
    digest the texts are tokenized again (EOS still only after complete ones), said once."""
    root, ckpt, prefs = workspace
    tok = word_tokenizer()
    ids = {w: tok.token_to_id(w) for w in WORDS}
    sha = provenance.fingerprint(t=provenance.Content(canonical_form(tok)))["t"]["sha256"]
    record = {"id": "a", "image": "img0.png", "question": "which side of the lung ?",
              "chosen": "the lesion is in the left lung", "chosen_ids": [ids["a"], ids["mass"]],
              "chosen_complete": True,
              "negatives": [{"text": "the lesion is in the right lung", "ids": [ids["right"]], "complete": False},
                            {"text": "the lesion is in the upper lung", "ids": [ids["upper"]], "complete": True}]}
    plain = {k: v for k, v in record.items() if k != "chosen_ids"} | {"id": "b"}  # no ids: re-tokenized
    cfg = config(workspace, tmp_path / "unused")
    tokens = Tokens(tok, rundir.model_config(cfg.model))
    text_ids = [tok.encode(t).ids for t in ("the lesion is in the left lung", "the lesion is in the right lung",
                                            "the lesion is in the upper lung")]
    eos = 2
    data = tmp_path / "prefs.jsonl"
    hscr_file(data, [record, plain], sha)
    said = []
    examples, bad = read_preferences(data, root, tokens, cfg, sha, said.append)
    assert not bad
    assert responses(examples[0]) == [[ids["a"], ids["mass"], eos], [ids["right"]], [ids["upper"], eos]]
    assert responses(examples[1]) == [text_ids[0] + [eos], text_ids[1], text_ids[2] + [eos]]
    assert len(said) == 2 and "1 records trained on the token ids stored" in said[0]
    assert "1 records have no stored token ids" in said[1]

    hscr_file(data, [record], "0" * 64)  # made with another tokenizer
    said = []
    examples, _ = read_preferences(data, root, tokens, cfg, sha, said.append)
    assert responses(examples[0]) == [text_ids[0] + [eos], text_ids[1], text_ids[2] + [eos]]
    assert len(said) == 1 and "re-tokenized from their texts" in said[0] and "another tokenizer" in said[0]
