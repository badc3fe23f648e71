"""demo/world.py, the synthetic Med-VQA world: deterministic, readable, facts in the pixels, priors.

The references are the pixels themselves: trivial statistics that know nothing of the
generator (brightest blob, thresholded blobs, nearest centroid) must recover the facts the
records state, far above chance. The priors are checked on the written files with
tolerances of about 3 binomial standard deviations.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo.world as world_module
from data import load_image, read_records, resolve_image
import eval as E
from harness.cli import UserError
from demo.world import CLOSED_KINDS, MODALITIES, Scene, build_world, findings_sentence, scene_facts, world_texts

SMALL = dict(n_sft=12, n_align=6, n_val=6, n_test=10, size=32)
# One shared world, big enough for the statistics (about 2 s to build).
SIZES = dict(n_sft=800, n_align=200, n_val=100, n_test=400)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = build_world(root, seed=0, **SIZES)
    raw = {split: json.loads(paths[split].read_text()) for split in world_module.WORLD_SPLITS}
    return root, paths, raw


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _pixels(root: Path, record: dict) -> np.ndarray:
    with Image.open(root / record["image"]) as image:
        return np.asarray(image, dtype=np.float32)


def _smooth(a: np.ndarray) -> np.ndarray:
    """3 x 3 box mean (edges replicated): damps the pixel noise."""
    p = np.pad(a, 1, mode="edge")
    return sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)) / 9


def _blobs(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a boolean mask."""
    seen = np.zeros_like(mask)
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x], stack, n = True, [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            n += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(n)
    return sizes


# --------------------------------------------------------------------------------------------
# Determinism, files, reuse


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_world(tmp_path / "a", seed=3, **SMALL)
    b = build_world(tmp_path / "b", seed=3, **SMALL)
    c = build_world(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b, files_c = _files(a["root"]), _files(b["root"]), _files(c["root"])
    n_images = sum(v for k, v in SMALL.items() if k != "size")
    assert len(files_a) == n_images + 5  # the images, 4 splits, world.json
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    differ = [name for name in files_a if files_a[name] != files_c[name]]
    assert "test.json" in differ and "sft.json" in differ
    assert sum(name.startswith("images/") for name in differ) >= 0.9 * n_images


def test_files_parse_with_the_readers(world):
    root, paths, raw = world
    for split, n in (("sft", SIZES["n_sft"]), ("align", SIZES["n_align"]),
                     ("val", SIZES["n_val"]), ("test", SIZES["n_test"])):
        records, bad = read_records(paths[split])
        assert bad == [] and len(records) == n
        assert [r.id for r in records] == [f"{split}-{i:05d}" for i in range(n)]
        for record, item in zip(records, raw[split]):
            assert item["conversations"][0]["value"].startswith("<image>\n")
            assert "<image>" not in record.question and record.question and record.answer
            assert record.image == f"images/{record.id}.png"
            if split in ("val", "test"):
                assert record.answer_type == ("CLOSED" if item["kind"] in CLOSED_KINDS else "OPEN")
            else:  # instruction format: no answer_type
                assert record.answer_type is None and "answer_type" not in item
            if item["kind"] in CLOSED_KINDS:
                assert record.answer in ("yes", "no")
        if split == "test":
            types = [r.answer_type for r in records]
            assert 0.35 < types.count("CLOSED") / n < 0.65
    # Images: the readers' loader, mode L, the requested size, default image root = root.
    image = load_image(resolve_image(root, raw["test"][0]["image"]))
    assert image.mode == "L" and image.size == (64, 64)
    world_json = json.loads(paths["world"].read_text())
    assert world_json["version"] == world_module.WORLD_VERSION and world_json["seed"] == 0
    assert world_json["n"] == {"sft": 800, "align": 200, "val": 100, "test": 400}


def test_answers_are_the_scene(world):
    """Every answer is the one the scene dictates (checked with independent rules here)."""
    _, _, raw = world
    organs = {"xray": "chest", "mri": "brain", "ct": "abdomen"}
    names = {"xray": "x-ray", "mri": "mri", "ct": "ct"}
    seen_kinds = set()
    for item in raw["sft"] + raw["test"]:
        s, kind = item["scene"], item["kind"]
        question = item["conversations"][0]["value"].lower()
        answer = item["conversations"][1]["value"]
        seen_kinds.add(kind)
        assert (s["side"] is None) == (s["size"] is None) == (s["count"] == 0)
        expected = {
            "presence": "yes" if s["count"] else "no",
            "normal": "no" if s["count"] else "yes",
            "multiple": "yes" if s["count"] > 1 else "no",
            "modality": names[s["modality"]].upper().replace("X-RAY", "X-ray"),
            "organ": organs[s["modality"]],
            "side": s["side"],
            "size": s["size"],
            "count": ["none", "one", "two", "three"][s["count"]],
            "describe": findings_sentence(Scene(**s)),
        }
        if kind in expected:
            assert answer == expected[kind], item
        elif kind == "side_presence":
            asked = "left" if "left" in question else "right"
            assert answer == ("yes" if s["side"] == asked else "no"), item
        elif kind == "modality_closed":
            asked = next(m for m, n in names.items() if f" {n}" in question)
            assert answer == ("yes" if asked == s["modality"] else "no"), item
        elif kind == "location":
            assert answer.startswith(s["side"] + " ")
        elif kind == "report":
            assert answer.endswith(" " + findings_sentence(Scene(**s)))
    assert seen_kinds == set(world_module.CLOSED_KINDS) | set(world_module.OPEN_KINDS)
    for item in raw["align"]:  # the alignment split's reports and descriptions too
        scene = Scene(**item["scene"])
        if item["kind"] == "describe":
            assert item["conversations"][1]["value"] == findings_sentence(scene)
        elif item["kind"] == "report":
            assert item["conversations"][1]["value"].endswith(" " + findings_sentence(scene))
    # Descriptions are sentences of several words, the material coupled tokens come from.
    two = findings_sentence(Scene("xray", 2, "right", "small"))
    assert two == "There are two small nodules in the right lung."
    assert findings_sentence(Scene("ct", 0, None, None)) == "No abnormality is seen."


def test_reuse_rebuild_and_interrupted_build(tmp_path, monkeypatch):
    root = tmp_path / "w"
    build_world(root, **SMALL)
    before = _files(root)
    real_entries = world_module._split_entries

    def no_drawing(*args, **kwargs):
        raise AssertionError("the world should have been reused")

    monkeypatch.setattr(world_module, "_split_entries", no_drawing)
    build_world(root, **SMALL)  # same arguments: nothing drawn
    with pytest.raises(AssertionError, match="reused"):
        build_world(root, **SMALL, force=True)
    for changed in ({"seed": 1}, {"size": 48}, {"n_test": 11}, {"contrast": 0.5}):
        with pytest.raises(AssertionError, match="reused"):
            build_world(root, **{**SMALL, **changed})
    monkeypatch.setattr(world_module, "_split_entries", real_entries)

    # Interrupted: a write fails halfway; world.json is gone, so the next call rebuilds.
    calls = []

    def failing_save(pixels, path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        real_save(pixels, path)

    real_save = world_module._save_png
    monkeypatch.setattr(world_module, "_save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_world(root, **{**SMALL, "seed": 7})
    assert not (root / "world.json").exists()
    monkeypatch.setattr(world_module, "_save_png", real_save)
    build_world(root, **SMALL)
    assert _files(root) == before

    # A smaller world leaves no stale images; a missing image is noticed and redrawn.
    small = {**SMALL, "n_sft": 3, "size": 48}
    build_world(root, **small)
    images = sorted(p.name for p in (root / "images").iterdir())
    assert len(images) == 3 + 6 + 6 + 10 and "sft-00011.png" not in images
    with Image.open(root / "images" / "sft-00000.png") as image:
        assert image.size == (48, 48)
    (root / "images" / "val-00002.png").unlink()
    build_world(root, **small)
    assert (root / "images" / "val-00002.png").exists()


def test_bad_arguments_are_listed_together(tmp_path):
    with pytest.raises(ValueError) as error:
        build_world(tmp_path, seed=-1, n_sft=2.5, size=8, contrast=0)
    message = str(error.value)
    assert all(s in message for s in ("seed", "n_sft", "size", "contrast"))
    assert not (tmp_path / "world.json").exists()


def test_world_texts(world, tmp_path):
    root, _, raw = world
    texts = world_texts(root)
    assert len(texts) == 2 * sum(SIZES.values())
    assert texts[0] == raw["sft"][0]["conversations"][0]["value"].removeprefix("<image>\n")
    assert texts[1] == raw["sft"][0]["conversations"][1]["value"]
    assert not any("<image>" in t for t in texts)
    words = {w.strip(".,?:[]").lower() for t in texts for w in t.split()}
    assert 60 < len(words) < 300  # a small vocabulary
    with pytest.raises(FileNotFoundError, match="build_world"):
        world_texts(tmp_path)


# --------------------------------------------------------------------------------------------
# Facts in the pixels


def test_side_and_presence_are_in_the_pixels(world):
    """The brightest smoothed pixel gives the side; its value, with a threshold fitted on the
    first half of the test split, gives presence on the second half."""
    root, _, raw = world
    records = raw["test"]
    peaks, sides = [], []
    for item in records:
        s = _smooth(_pixels(root, item))
        y, x = np.unravel_index(np.argmax(s), s.shape)
        peaks.append(s.max())
        sides.append("left" if x < s.shape[1] / 2 else "right")
    present = np.array([item["scene"]["count"] > 0 for item in records])
    side_ok = [side == item["scene"]["side"]
               for side, item in zip(sides, records) if item["scene"]["count"]]
    assert np.mean(side_ok) > 0.9  # chance: 0.5

    peaks, half = np.array(peaks), len(records) // 2
    candidates = np.unique(peaks[:half])
    fit = [np.mean((peaks[:half] > t) == present[:half]) for t in candidates]
    threshold = candidates[int(np.argmax(fit))]
    assert np.mean((peaks[half:] > threshold) == present[half:]) > 0.85  # chance: 0.5


def test_count_size_and_modality_are_in_the_pixels(world):
    """Blobs above 90 % of the brightest smoothed value count the findings; the area of the
    largest one tells small from large; a nearest-centroid classifier on 8 x 8 thumbnails
    (centroids from the first half) tells the modality."""
    root, _, raw = world
    records = raw["test"]
    count_ok, size_ok, thumbs = [], [], []
    for item in records:
        a = _pixels(root, item)
        thumbs.append(np.asarray(Image.fromarray(a.astype(np.uint8)).resize((8, 8), Image.BILINEAR),
                                 dtype=np.float32).ravel())
        scene = item["scene"]
        if scene["count"]:
            s = _smooth(a)
            blobs = _blobs(s > 0.9 * s.max())
            count_ok.append(len(blobs) == scene["count"])
            size_ok.append((max(blobs) > 12) == (scene["size"] == "large"))
    assert np.mean(count_ok) > 0.75  # chance: 1/3
    assert np.mean(size_ok) > 0.75  # chance: 1/2

    thumbs, mods, half = np.stack(thumbs), np.array([r["scene"]["modality"] for r in records]), 200
    centroids = np.stack([thumbs[:half][mods[:half] == m].mean(0) for m in MODALITIES])
    guess = np.array(MODALITIES)[((thumbs[half:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    assert np.mean(guess == mods[half:]) > 0.95  # chance: 1/3


# --------------------------------------------------------------------------------------------
# Priors


def test_sft_carries_the_prior_and_test_is_balanced(world):
    """SFT + align (1,000 entries) against their prior: yes 0.8, left 0.75, one finding 0.6 of
    those with findings, small 0.7. Some kinds pull a little away from it (a "no" to "Is there
    a nodule in the left lung?" may put the findings on the right; "Is there more than one?"
    draws its counts evenly), so the means over many entries are about 0.80, 0.74, 0.56, 0.68;
    the tolerances add 4 binomial standard deviations. val and test: exactly half "yes", and
    side, one-of-three count and size at chance within 4 standard deviations."""
    _, paths, raw = world

    def rates(items):
        closed = [i["conversations"][1]["value"] for i in items if i["kind"] in CLOSED_KINDS]
        found = [i["scene"] for i in items if i["scene"]["count"]]
        side_answers = [i["conversations"][1]["value"] for i in items if i["kind"] == "side"]
        return {"yes": (closed.count("yes"), len(closed)),
                "left": (sum(s["side"] == "left" for s in found), len(found)),
                "one": (sum(s["count"] == 1 for s in found), len(found)),
                "small": (sum(s["size"] == "small" for s in found), len(found)),
                "left answers": (side_answers.count("left"), len(side_answers))}

    def near(hits_n, p, slack):
        hits, n = hits_n
        return abs(hits / n - p) < slack + 4 * (p * (1 - p) / n) ** 0.5

    skewed = rates(raw["sft"] + raw["align"])
    assert near(skewed["yes"], 0.8, 0.0) and near(skewed["left"], 0.75, 0.015), skewed
    assert near(skewed["one"], 0.6, 0.04) and near(skewed["small"], 0.7, 0.02), skewed
    assert near(skewed["left answers"], 0.75, 0.0), skewed

    for split in ("val", "test"):
        fair = rates(raw[split])
        yes, n_closed = fair["yes"]
        assert yes == n_closed // 2, fair  # exactly half (an odd count has one more "no")
        assert near(fair["left"], 0.5, 0) and near(fair["small"], 0.5, 0), fair
        assert near(fair["one"], 1 / 3, 0), fair
    # world.json records the same: "always yes" is right 80 % of the time on SFT, 50 % on test.
    stats = json.loads(paths["world"].read_text())["stats"]
    assert stats["test"]["closed_yes"] == rates(raw["test"])["yes"][0]
    assert stats["sft"]["closed_yes"] / stats["sft"]["closed"] > 0.7


# --------------------------------------------------------------------------------------------
# The alignment split (instruction-like) and the facts of descriptions


def test_align_is_mostly_descriptions_and_sft_does_not_depend_on_it(tmp_path, world, monkeypatch):
    """ALIGN_KINDS: 90 % reports (60 %) and descriptions (30 %), 10 % VQA. Over 200 align entries
    the report + describe share lies within 4 binomial std (4·sqrt(0.9·0.1/200) = 0.085) of 0.9.
    The SFT split is drawn from its own generator and kind shares: building a world with other
    align shares leaves sft.json byte for byte the same (the shipped base stays valid)."""
    _, _, raw = world
    kinds = [item["kind"] for item in raw["align"]]
    assert sum(world_module.ALIGN_KINDS.values()) == pytest.approx(1.0)
    assert abs((kinds.count("report") + kinds.count("describe")) / len(kinds) - 0.9) < 0.085
    assert set(kinds) - {"report", "describe"}, "some VQA stays"
    a = build_world(tmp_path / "a", seed=0, **SMALL)
    monkeypatch.setitem(world_module.SPLIT_KINDS, "align", {"count": 0.5, "side": 0.5})
    b = build_world(tmp_path / "b", seed=0, **SMALL)
    assert a["sft"].read_bytes() == b["sft"].read_bytes()
    assert a["align"].read_bytes() != b["align"].read_bytes()


def test_scene_facts_by_hand():
    """The facts a reference answer states, slot by slot. A report of two small nodules in the
    left lung states all six slots; a description has no modality; a normal report states
    modality, organ and the count "none" (no side, size or finding: there is none)."""
    two = Scene("xray", 2, "left", "small")
    report = "This is a chest X-ray. " + findings_sentence(two)
    values = lambda facts: {slot: fact["value"] for slot, fact in facts.items()}
    assert values(scene_facts(two, report)) == {"modality": "X-ray", "organ": "chest", "count": "two",
                                                "finding": "nodule", "side": "left", "size": "small"}
    assert values(scene_facts(two, findings_sentence(two))) == {
        "organ": "chest", "count": "two", "finding": "nodule", "side": "left", "size": "small"}
    normal = Scene("ct", 0, None, None)
    assert values(scene_facts(normal, "This is an abdominal CT scan. No abnormality is seen.")) == {
        "modality": "CT", "organ": "abdomen", "count": "none"}
    assert scene_facts(two, report)["side"]["phrases"] == {"left": ["left"], "right": ["right"]}


def test_val_and_test_descriptions_carry_their_facts(world):
    """Only describe/report questions of val and test carry "facts"; scored with eval.py's
    description metric, each reference answer states every fact right and contradicts none, and
    the values are the scene's (checked against the scene here)."""
    _, paths, raw = world
    names = {"xray": "X-ray", "mri": "MRI", "ct": "CT"}
    for split in ("sft", "align", "val", "test"):
        records, _ = read_records(paths[split])
        for record, item in zip(records, raw[split]):
            described = split in ("val", "test") and item["kind"] in ("describe", "report")
            assert ("facts" in item) == described and (record.facts is not None) == described
            if not described:
                continue
            s = item["scene"]
            scores = E.fact_scores(record.answer, record.facts)
            assert scores["correct"] == scores["facts"] == scores["stated"] >= 1 and scores["contradicted"] == 0
            assert record.facts["count"]["value"] == ["none", "one", "two", "three"][s["count"]]
            if "modality" in record.facts:
                assert record.facts["modality"]["value"] == names[s["modality"]]
            if s["count"]:
                assert record.facts["side"]["value"] == s["side"] and record.facts["size"]["value"] == s["size"]


# The scene attributes a world answer states, read from its words alone (not the generator's code).
_MODALITY_WORDS = {"x-ray": "xray", "chest": "xray", "lung": "xray", "nodule": "xray", "nodules": "xray",
                   "mri": "mri", "brain": "mri", "hemisphere": "mri", "lesion": "mri", "lesions": "mri",
                   "ct": "ct", "abdominal": "ct", "abdomen": "ct", "mass": "ct", "masses": "ct"}


def _stated(text: str) -> dict:
    words = re.findall(r"[\w-]+", text.lower())
    modality = {_MODALITY_WORDS[w] for w in words if w in _MODALITY_WORDS}
    assert len(modality) <= 1, f"{text!r} mixes modalities"
    counts = [["none", "one", "two", "three"].index(w) for w in words if w in ("none", "one", "two", "three")]
    counts += [0] * ("no abnormality" in text.lower())
    stated = {"modality": modality.pop() if modality else None, "count": counts[0] if counts else None,
              "side": next((w for w in words if w in ("left", "right")), None),
              "size": next((w for w in words if w in ("small", "large")), None)}
    return {k: v for k, v in stated.items() if v is not None}


def _external(tmp_path, raw, seed=0, overwrite=False, out="prefs.external.jsonl"):
    """An hscr.py-like output over every align entry, then its external negatives."""
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"_header": True, "options": {"image_aspect": "pad"}}] + [
        {"id": r["id"], "index": i, "image": r["image"], "question": r["conversations"][0]["value"],
         "prompt": None, "answer_type": None, "chosen": r["conversations"][1]["value"]}
        for i, r in enumerate(raw["align"])]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return world_module.write_external_negatives(prefs, tmp_path / "align.json", tmp_path / out, seed,
                                                 overwrite)


def test_external_negatives_change_one_to_three_facts_the_scene_contradicts(world, tmp_path):
    """Each of the 200 align entries gets one external negative: a yes/no answer flipped; any other
    answer is one the world writes for some scene of that question kind (fluent, in its phrasing),
    other than the reference, whose attributes that differ from the reference's scene are 1 to 3
    facts (findings added or removed count once, as presence) and are the facts the record names.
    Every fact kind and every number of facts occurs; a write is deterministic for its seed."""
    _, paths, raw = world
    (tmp_path / "align.json").write_bytes(paths["align"].read_bytes())
    out = _external(tmp_path, raw)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["_header"] and lines[0]["options"]["seed"] == 0 and len(lines) == 1 + len(raw["align"])
    scenes = [Scene(m, 0, None, None) for m in MODALITIES] + [
        Scene(m, c, side, size) for m in MODALITIES for c in (1, 2, 3) for side in ("left", "right")
        for size in ("small", "large")]
    said = {kind: {world_module._question_answer(kind, s, None, np.random.default_rng(0))[1] for s in scenes}
            for kind in world_module.OPEN_KINDS}
    seen, sizes = set(), set()
    for item, r in zip(raw["align"], lines[1:]):
        (negative,) = r["negatives"]
        assert r["id"] == item["id"] and r["rejected"] == negative["text"] != r["chosen"]
        kind, truth = item["kind"], item["scene"]
        if kind in CLOSED_KINDS:
            assert {negative["text"], r["chosen"]} == {"yes", "no"} and negative["facts"] == ["yes/no"]
            continue
        assert negative["text"] in said[kind], negative["text"]
        changed = {k for k, v in _stated(negative["text"]).items() if v != truth[k]}
        if "count" in changed and 0 in (truth["count"], _stated(negative["text"])["count"]):
            changed = changed - {"count", "side", "size"} | {"presence"}
        assert 1 <= len(changed) <= 3 and changed == set(negative["facts"]), (r["chosen"], negative)
        seen |= changed
        sizes.add(len(changed))
    assert seen == set(world_module.EXTERNAL_FACTS) and sizes == {1, 2, 3}
    assert _external(tmp_path, raw, out="again.jsonl").read_bytes() == out.read_bytes()
    assert _external(tmp_path, raw, seed=1, out="other.jsonl").read_bytes() != out.read_bytes()


def test_external_negatives_keep_another_file_unless_overwrite(world, tmp_path):
    """A file at the output that holds something else is refused, naming it, and replaced with overwrite."""
    _, paths, raw = world
    (tmp_path / "align.json").write_bytes(paths["align"].read_bytes())
    (tmp_path / "prefs.external.jsonl").write_text("mine\n")
    with pytest.raises(UserError, match="prefs.external.jsonl holds other external negatives"):
        _external(tmp_path, raw)
    assert (tmp_path / "prefs.external.jsonl").read_text() == "mine\n"
    assert _external(tmp_path, raw, overwrite=True).read_text().startswith('{"_header": true')
