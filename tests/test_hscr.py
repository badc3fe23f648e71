"""hscr.py: stages 1 and 2 of docs/METHOD.md.

The selection logic is pinned on hand-built logits over a tiny vocabulary (values derived in the
docstrings); the model-facing parts are checked against plain unbatched forwards / generate of a
tiny random checkpoint (tests/tiny.py); the CLI is run end to end on a small data set of pillow
images, including bad records, resume after a simulated kill and a 2-process gloo run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hscr
import tiny
from harness import prefs
from harness.cli import UserError
from model.rows import cut_generated
from model.tokenizer import canonical_form, load_tokenizer
from data import Record
from syncs import host_syncs

REPO = Path(__file__).resolve().parent.parent
EOS = 2
WORDS = ["[", "INST", "]", "[/", "?", ".", "what", "is", "shown", "in", "the", "image", "where", "lesion", "a",
         "there", "left", "right", "lung", "no", "yes", "mass", "normal", "chest", "xray", "of", "brain", "ct",
         "scan", "shows", "an", "opacity", "upper", "lobe", "kidney", "organ", "this"]


# ----------------------------------------------------------------------------------------------
# Hand-built logits


def test_coupling_scores_and_top_positions():
    """V = 3, one response y = [0, 1, 2(EOS)] padded to L = 4, a second y = [1, 1, 0, 2].
    full[t, y_t] − drop[t, y_t] by construction: row 0 → 1.0, 3.0, 9.0 (EOS), pad;
    row 1 → 2.0, 2.0, −1.0, 5.0 (EOS). Top-2: row 0 → positions 1, 0 (the EOS score 9 is never
    taken, nor padding); row 1 → 0, 1 (a tie: the earlier position first), then 2 with n = 3."""
    targets = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    shift = torch.tensor([[1.0, 3.0, 9.0, 50.0], [2.0, 2.0, -1.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    drop = torch.randn(2, 4, 3, generator=g)
    full = drop.clone()
    full.scatter_add_(-1, targets[..., None], shift[..., None])  # full[t, y_t] = drop[t, y_t] + shift_t
    s = hscr.coupling_scores(full, drop, targets, valid, "logit")
    assert torch.allclose(s[valid], shift[valid]) and s[0, 3] == -math.inf
    assert hscr.select_coupled_positions(s, targets, valid, n=2, eos_id=EOS) == [[1, 0], [0, 1]]
    assert hscr.select_coupled_positions(s, targets, valid, n=10, eos_id=EOS) == [[1, 0], [0, 1, 2]]
    # --coupled positive: position 2 of row 1 (s_t = −1) is never coupled; a zero shift neither.
    assert hscr.select_coupled_positions(s, targets, valid, n=10, eos_id=EOS, positive=True) == [[1, 0], [0, 1]]
    zero = s.clone()
    zero[1, 0] = 0.0
    assert hscr.select_coupled_positions(zero, targets, valid, n=10, eos_id=EOS, positive=True) == [[1, 0], [1]]
    # logprob: the shift of log-softmax, computed here in float64.
    lp = hscr.coupling_scores(full, drop, targets, valid, "logprob")
    ref = (full.double().log_softmax(-1) - drop.double().log_softmax(-1)).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(lp[valid].double(), ref[valid], atol=1e-6)


def test_hallucinated_replacement_is_argmin_p_diff_among_drop_top_c():
    """One position, V = 6, y_t = 1, c = 3 candidates, β = 0.9.
    drop = [0, 3, 2.5, 1, 0.5, −1]: descending 1, 2, 3, 4, 0, 5; without y_t the top-3 is C = [2, 3, 4].
    full = [0, 4, 2, −1, 1, 0]: z = 1.9·full − 0.9·drop at C = 3.8 − 2.25 = 1.55, −1.9 − 0.9 = −2.8,
    1.9 − 0.45 = 1.45; the least P_diff is at id 3, the middle candidate (neither the blind branch's
    favourite nor its least likely). With id 2 banned: C = [3, 4, 0] and the argmin is still 3.
    A second position whose y_t (= 5) is outside the top-c: C = its plain top-3.
    Five candidates with id 2 banned need 5 of the V − 2 = 4 ids left: an error."""
    drop = torch.tensor([[0.0, 3.0, 2.5, 1.0, 0.5, -1.0], [0.0, 3.0, 2.5, 1.0, 0.5, -1.0]])
    full = torch.tensor([[0.0, 4.0, 2.0, -1.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([1, 5])
    repl, cands, p_diff = hscr.hallucinated_replacements(full, drop, targets, c=3, beta=0.9)
    assert cands.tolist() == [[2, 3, 4], [1, 2, 3]]
    z = 1.9 * full.double() - 0.9 * drop.double()
    assert torch.allclose(p_diff.double(), z.softmax(-1).gather(-1, cands), atol=1e-7)
    # row 2: z at [1, 2, 3] = −2.7, −2.25, −0.9 → argmin is id 1
    assert repl.tolist() == [3, 1]
    repl, cands, _ = hscr.hallucinated_replacements(full, drop, targets, c=3, beta=0.9, banned=(2,))
    assert cands.tolist() == [[3, 4, 0], [1, 3, 4]] and repl.tolist() == [3, 1]
    with pytest.raises(ValueError, match="5 candidates"):
        hscr.hallucinated_replacements(full, drop, targets, c=5, beta=0.9, banned=(2,))


# Candidate rules on one hand-built position pair (V = 8, y_t = 1, β = 0.9, α = 0.1, so the
# plausibility cut is at max − ln 10 = max − 2.3026):
#   full = [2.0, 3.0, 2.5, 0.0, 1.2, −1.0, 0.9, −3.0]  plausible: {0, 1, 2, 4, 6} (≥ 0.697)
#   drop = [1.0, 2.0, 0.0, 2.5, 1.5, 3.0, −2.0, 0.5]  plausible: {0, 1, 3, 4, 5} (≥ 0.697)
#   z = 1.9·full − 0.9·drop = [2.9, 3.9, 4.75, −2.25, 0.93, −4.6, 3.51, −6.15]
# drop order 5, 3, 1, 4, 0, 7, 2, 6; full order 1, 2, 0, 4, 6, 3, 5, 7. A second row has a confident
# full branch, full = 5 at y_t = 1 and 0 elsewhere (plausible: {1} only), and the same drop.
CAND_FULL = torch.tensor([[2.0, 3.0, 2.5, 0.0, 1.2, -1.0, 0.9, -3.0], [0, 5, 0, 0, 0, 0, 0, 0]])
CAND_DROP = torch.tensor([[1.0, 2.0, 0.0, 2.5, 1.5, 3.0, -2.0, 0.5]] * 2)
CAND_TARGETS = torch.tensor([1, 1])


@pytest.mark.parametrize("rule, candidates, replacement", [
    # the drop top-5 without y_t; least z: id 7 (−6.15), a token neither branch believes
    ("dropped-topk", [[5, 3, 4, 0, 7], [5, 3, 4, 0, 7]], [7, 5]),
    # full-plausible without y_t in full order (4 of them); least z: id 4 (0.93). Row 2: none
    ("plausible", [[2, 0, 4, 6, -1], [-1] * 5], [4, -1]),
    # the drop top-5 ∩ full-plausible = {4, 0} in drop order; least z: id 4. Row 2: none
    ("both", [[4, 0, -1, -1, -1], [-1] * 5], [4, -1]),
    # drop-plausible without y_t in drop order; least z: id 5 (−4.6); row 2's z: 5 → −2.7 least
    ("dropped-plausible", [[5, 3, 4, 0, -1], [5, 3, 4, 0, -1]], [5, 5]),
])
def test_candidate_rules_hand_values(rule, candidates, replacement):
    repl, cands, p_diff = hscr.hallucinated_replacements(CAND_FULL, CAND_DROP, CAND_TARGETS, c=5, beta=0.9,
                                                         rule=rule, alpha=0.1)
    assert cands.tolist() == candidates and repl.tolist() == replacement
    z = 1.9 * CAND_FULL.double() - 0.9 * CAND_DROP.double()
    real = cands >= 0
    assert torch.allclose(p_diff[real].double(), z.softmax(-1).gather(-1, cands.clamp(min=0))[real], atol=1e-7)
    assert (p_diff[~real] == math.inf).all()


def test_same_word_candidates_excluded():
    """CAND_* with y_t = 1 and ids 5 and 1 made one word (class 99): dropped-plausible's set
    [5, 3, 4, 0] (the hand values above) loses id 5, so the argmin of z over {3, 4, 0}
    (z = −2.25, 0.93, 2.9) is id 3 instead of id 5."""
    cls = torch.arange(8)
    cls[[1, 5]] = 99
    repl, cands, _ = hscr.hallucinated_replacements(CAND_FULL, CAND_DROP, CAND_TARGETS, c=5, beta=0.9,
                                                    rule="dropped-plausible", alpha=0.1, word_class=cls)
    assert cands.tolist() == [[3, 4, 0, -1, -1]] * 2 and repl.tolist() == [3, 3]


def test_cut_token_never_wins():
    """The trap: VCD's α cut gives a cut token P_diff = 0, so an argmin over cut P_diff values
    among the dropped top-5 (ids 5, 3, 4, 0, 7) would pick id 5, which the full branch
    cuts (3 of the 5 are cut). `both` must pick among the plausible ones, {4, 0}: id 4.
    With id 4 banned only id 0 is left. With α = 1 only the full argmax (y_t itself) is plausible:
    nothing is left, whatever the other tokens' P_diff."""
    from kernels import contrast_softmax

    ids = torch.tensor([[5, 3, 4, 0, 7]])
    cut = contrast_softmax(CAND_FULL[:1], CAND_DROP[:1], 0.9, index=ids)
    cut = cut * hscr.plausible(CAND_FULL[:1], 0.1).gather(-1, ids)  # P_diff zeroed outside the cut
    assert cut[0, 0] == 0 and cut[0].argmin() == 0  # what a naive argmin would choose: id 5
    repl, _, _ = hscr.hallucinated_replacements(CAND_FULL[:1], CAND_DROP[:1], CAND_TARGETS[:1], c=5, rule="both")
    assert repl.tolist() == [4]
    repl, _, _ = hscr.hallucinated_replacements(CAND_FULL[:1], CAND_DROP[:1], CAND_TARGETS[:1], c=5, rule="both",
                                                banned=(4,))
    assert repl.tolist() == [0]
    for rule in ("plausible", "both"):
        repl, cands, _ = hscr.hallucinated_replacements(CAND_FULL[:1], CAND_DROP[:1], CAND_TARGETS[:1], c=5,
                                                        rule=rule, alpha=1.0)
        assert repl.tolist() == [-1] and (cands == -1).all()
    # Every rule, at random logits: the winner is never a cut token, y_t or a banned id.
    g = torch.Generator().manual_seed(0)
    full, drop = 2 * torch.randn(200, 50, generator=g), 2 * torch.randn(200, 50, generator=g)
    targets = torch.randint(0, 50, (200,), generator=g)
    for rule in ("plausible", "both", "dropped-plausible"):
        repl, _, _ = hscr.hallucinated_replacements(full, drop, targets, c=10, rule=rule, alpha=0.1, banned=(0, 1))
        source = drop if rule == "dropped-plausible" else full
        ok = repl >= 0
        assert ok.any() and not (repl[ok] == targets[ok]).any() and not torch.isin(repl[ok], torch.tensor([0, 1])).any()
        assert hscr.plausible(source[ok], 0.1).gather(-1, repl[ok, None]).all()


def test_graded_negatives_replace_exactly_m_positions_decode_and_splice():
    """y_w = [10, 11, 12, 13, 14, EOS], coupled positions by score [3, 1, 4] → tokens [30, 31, 32].
    splice keeps the tail of y_w; decode stops after the last replaced position (max of the first m)."""
    y = [10, 11, 12, 13, 14, EOS]
    splice = hscr.graded_negatives(y, [3, 1, 4], [30, 31, 32], "splice")
    assert splice == [[10, 11, 12, 30, 14, EOS], [10, 31, 12, 30, 14, EOS], [10, 31, 12, 30, 32, EOS]]
    for m, cand in enumerate(splice, 1):
        assert sum(a != b for a, b in zip(cand, y)) == m
    decode = hscr.graded_negatives(y, [3, 1, 4], [30, 31, 32], "decode")
    assert decode == [[10, 11, 12, 30], [10, 31, 12, 30], [10, 31, 12, 30, 32]]
    assert hscr.graded_negatives(y, [], [], "decode") == []
    # generated tails end at EOS (kept) or before an image placeholder (not text)
    assert cut_generated([5, 6, EOS, 0, 0], EOS, 120) == [5, 6, EOS]
    assert cut_generated([5, 120, 7, EOS], EOS, 120) == [5]
    assert cut_generated([5, 6], EOS, 120) == [5, 6]


def test_dedupe_drops_copies_of_chosen_duplicates_and_empty():
    assert hscr.dedupe_candidates(["a b", "y", "a b", "", "c", "y"], "y") == [0, 4]


@pytest.mark.parametrize("sims, expected", [
    ([0.95, 0.9, 0.8, 0.7, 0.5], [0, 2, 3]),  # 0.95 → 0.8 (step 0.15) → 0.7 (step 0.1, within rounding)
    ([0.3, 0.2, 0.1], [0, 1, 2]),  # 0.3 − 0.2 = 0.0999… in floating point: counts as 0.1
    ([0.5, 0.9, 0.9, 0.85, 0.1], [1, 0, 4]),  # sorted 0.9 (index 1 before its tie 2), 0.5, 0.1
    ([0.9, 0.85, 0.81], [0]),  # too few with the gap: one is kept
    ([0.2, 0.9, 0.6, 0.4, 0.3, 0.0], [1, 2, 3]),  # at most k = 3
    ([], []),
])
def test_rerank_gap_rule(sims, expected):
    assert hscr.rerank(sims, k=3, gap=0.1) == expected


def test_rerank_k_and_gap_options():
    assert hscr.rerank([0.9, 0.8, 0.7, 0.6], k=2, gap=0.0) == [0, 1]
    assert hscr.rerank([0.9, 0.8, 0.7, 0.6], k=3, gap=0.25) == [0, 3]


def test_entry_generator_is_stable_and_keyed_by_seed_and_id():
    a = hscr.drop_mask(576, 0.7, hscr.entry_generator(0, "entry-1"))
    assert int(a.sum()) == 403  # round(0.7 · 576)
    assert torch.equal(a, hscr.drop_mask(576, 0.7, hscr.entry_generator(0, "entry-1")))
    assert not torch.equal(a, hscr.drop_mask(576, 0.7, hscr.entry_generator(0, "entry-2")))
    assert not torch.equal(a, hscr.drop_mask(576, 0.7, hscr.entry_generator(1, "entry-1")))
    # crc32, not the per-process salted hash(): the same stream in another interpreter
    code = "import hscr; print(hscr.drop_mask(576, 0.7, hscr.entry_generator(0, 'entry-1')).nonzero()[:, 0].tolist())"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(other.stdout) == a.nonzero()[:, 0].tolist()


def test_options_errors_list_every_problem():
    """One UserError (one line on stderr from the command line) lists every problem."""
    from harness.cli import UserError

    with pytest.raises(UserError) as e:
        hscr.parse_options(["--model", "m", "--data", "d", "--image-root", "r", "--out", "o", "--drop-ratio", "1.5",
                            "--top-n", "0", "--num-candidates", "0", "--min-negatives", "4"])
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in ("--drop-ratio", "--top-n", "--num-candidates", "--min-negatives"))


def test_candidate_and_position_options():
    from harness.cli import UserError

    required = ["--model", "m", "--data", "d", "--image-root", "r", "--out", "o"]
    opts = hscr.parse_options(required)
    assert (opts.candidates, opts.alpha, opts.drop_positions) == ("dropped-topk", 0.1, "keep")
    opts = hscr.parse_options(required + ["--candidates", "both", "--alpha", "0.25", "--drop-positions", "renumber"])
    assert (opts.candidates, opts.alpha, opts.drop_positions) == ("both", 0.25, "renumber")
    for bad in (["--alpha", "0"], ["--alpha", "1.5"]):
        with pytest.raises(UserError, match="--alpha must be in"):
            hscr.parse_options(required + bad)
    with pytest.raises(SystemExit):
        hscr.parse_options(required + ["--candidates", "topk"])
    with pytest.raises(ValueError, match="unknown candidate rule"):
        hscr.candidate_sets(CAND_FULL, CAND_DROP, CAND_TARGETS, 3, "topk")


def test_options_parse_types_and_help_shows_each_default_once(capsys):
    """`int | None` (--limit) parses as int, like the plain ints; the old --top-k is gone; --help
    prints a default once for each option that has one and none for those without."""
    required = ["--model", "m", "--data", "d", "--image-root", "r", "--out", "o"]
    opts = hscr.parse_options(required + ["--limit", "5", "--num-candidates", "4", "--min-gap", "0.25"])
    assert (opts.limit, opts.num_candidates, opts.min_gap) == (5, 4, 0.25) and isinstance(opts.limit, int)
    assert hscr.parse_options(required).limit is None
    with pytest.raises(SystemExit):
        hscr.parse_options(required + ["--top-k", "4"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        hscr.parse_options(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert help_text.count("(default: 10)") == 2  # --top-n and --num-candidates
    assert "(default: None)" not in help_text
    # Per option: "(default: …)" once where the field has a default; --tokenizer and
    # --sentence-model (default None) say in their own words what they fall back to, once.
    from harness.cli import dataclass_parser

    defaults = {f.name: f.default for f in dataclasses.fields(hscr.Options)}
    for action in dataclass_parser(hscr.Options)._actions[1:]:  # [0] is --help
        expected = 1 if defaults[action.dest] is not None or action.dest in ("tokenizer", "sentence_model") else 0
        assert action.help.count("(default:") == expected, action.dest


# ----------------------------------------------------------------------------------------------
# The tiny model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random llava-hf checkpoint (image token 120, 16 image tokens, 28 px) with a word-level
    tokenizer covering all 128 ids, so every generated id decodes to one word."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    path = tiny.save_layout(tiny.hf_tiny_llava(), tmp_path_factory.mktemp("ckpt"), "llava-hf-legacy")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    for i in range(len(vocab), 128):
        vocab["<image>" if i == tiny.IMAGE_TOKEN else f"w{i}"] = i
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "<image>")])
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    from model import load_model

    return load_model(ckpt)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(ckpt)


GOOD = [
    ("what is shown in the image ?", "there is a lesion in the left lung ."),
    ("where is the mass ?", "the mass is in the right upper lobe ."),
    ("is this a normal chest xray ?", "no"),
    ("what organ is shown ?", "the kidney"),
    ("what does the ct scan show ?", "an opacity in the left lung"),
    ("is there a lesion ?", "yes there is a lesion of the brain ."),
    ("what is shown ?", "a chest xray"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Seven good entries and six bad ones (no image field, missing file, corrupt file, empty answer,
    empty question, a record that is not an object)."""
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i, (q, a) in enumerate(GOOD):
        size = (40, 30) if i % 2 else (28, 28)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"{i}.png")
        items.append({"id": f"e{i}", "image": f"{i}.png",
                      "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (images / "corrupt.png").write_bytes(b"not a png")
    conv = [{"from": "human", "value": "what is shown ?"}, {"from": "gpt", "value": "yes"}]
    items[2:2] = [{"id": "noimage", "conversations": conv},
                  {"id": "missing", "image": "nope.png", "conversations": conv},
                  {"id": "corrupt", "image": "corrupt.png", "conversations": conv}]
    items += [{"id": "empty", "image": "0.png", "conversations": [conv[0], {"from": "gpt", "value": "  "}]},
              {"id": "noq", "image": "0.png", "conversations": [{"from": "human", "value": "<image>"}, conv[1]]},
              42]
    data = root / "instruct.json"
    data.write_text(json.dumps(items))
    return data, images


def _entries(pipe: hscr.HSCR, dataset, ids):
    from data import read_records

    records, _ = read_records(dataset[0])
    return [pipe.prepare(i, r) for i, r in enumerate(records) if r.id in ids]


def _opts(ckpt, dataset, out, **kw) -> hscr.Options:
    base = dict(model=str(ckpt), data=str(dataset[0]), image_root=str(dataset[1]), out=str(out),
                similarity="lexical", max_new_tokens=4, batch_size=3)
    return hscr.Options(**{**base, **kw}).resolved()


@pytest.mark.parametrize("strategy", ["token", "latent", "patch", "pixel"])
def test_visual_token_dropout_strategies(model, strategy):
    """round(0.7 · 16) = 11 of 16 tokens dropped (token/latent), 11 of 16 7×7 patches or
    round(0.7 · 784) = 549 of 784 pixels blanked to 0 (the CLIP mean after normalisation)."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    gens = lambda: [hscr.entry_generator(0, "a"), hscr.entry_generator(0, "b")]  # noqa: E731
    full_ref = model.encode_images(pixels)
    if strategy in ("token", "latent"):
        full, dropped = hscr.visual_token_dropout(model, pixels, gens(), strategy=strategy, mode="remove")
        assert torch.allclose(full, full_ref)
        for b, name in enumerate("ab"):
            keep = ~hscr.drop_mask(16, 0.7, hscr.entry_generator(0, name))
            assert dropped[b].shape == (5, 64)
            # removal keeps the kept tokens in order; latent+remove equals token+remove
            assert torch.allclose(dropped[b], full_ref[b][keep], atol=1e-6)
        _, zeroed = hscr.visual_token_dropout(model, pixels, gens(), strategy=strategy, mode="zero")
        proj = model.multi_modal_projector
        zero_row = torch.zeros(64) if strategy == "token" else proj(torch.zeros(1, 32))[0]
        for b, name in enumerate("ab"):
            drop = hscr.drop_mask(16, 0.7, hscr.entry_generator(0, name))
            assert zeroed[b].shape == (16, 64)
            assert torch.allclose(zeroed[b][drop], zero_row.expand(11, -1), atol=1e-6)
            assert torch.allclose(zeroed[b][~drop], full_ref[b][~drop], atol=1e-6)
        # an entry's draw does not depend on its batch
        _, alone = hscr.visual_token_dropout(model, pixels[1:], gens()[1:], strategy=strategy)
        assert torch.allclose(alone[0], dropped[1], atol=1e-6)
        return
    seen = []
    real = model.encode_images
    model.encode_images = lambda p: (seen.append(p.clone()), real(p))[1]
    try:
        full, dropped = hscr.visual_token_dropout(model, pixels, gens(), strategy=strategy)
    finally:
        del model.encode_images
    blanked = seen[1]
    assert torch.allclose(full, full_ref) and len(dropped) == 2 and dropped[0].shape == (16, 64)
    assert torch.allclose(torch.stack(dropped), real(blanked), atol=1e-6)
    hole = (blanked == 0).all(1)  # (B, H, W): all channels at the mean colour
    assert torch.equal(blanked[~hole[:, None].expand_as(blanked)], pixels[~hole[:, None].expand_as(pixels)])
    if strategy == "patch":
        per_patch = hole.view(2, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(2, 16, 49)
        assert (per_patch.all(-1) | ~per_patch.any(-1)).all()  # whole patches only
        assert per_patch.all(-1).sum(-1).tolist() == [11, 11]
    else:
        assert hole.sum((1, 2)).tolist() == [549, 549]


def test_two_branch_scoring_matches_unpadded_forwards(model, tokenizer, ckpt, dataset, tmp_path):
    """Stacked (both branches, 2B left-padded rows, logits only at response positions) equals, row
    by row, the full-sequence logits of an unpadded single-row forward at the positions predicting
    each response token."""
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl"))
    entries = _entries(pipe, dataset, {"e0", "e2", "e3"})
    pixels = torch.stack([e.pixels for e in entries])
    full, dropped = hscr.visual_token_dropout(model, pixels, [hscr.entry_generator(0, e.record.id) for e in entries])
    fp = [e.prompt_ids for e in entries]
    dp = [hscr.with_image_tokens(p, tiny.IMAGE_TOKEN, 5) for p in fp]
    ys = [e.response for e in entries]
    lf, ld, targets, valid = hscr.score_two_branches(model, fp, dp, list(full), dropped, ys, pipe.pad)
    assert lf.shape == (3, max(map(len, ys)), 128) and valid.sum(1).tolist() == [len(y) for y in ys]
    for b, y in enumerate(ys):
        for prompt, feats, got in ((fp[b], full[b], lf[b]), (dp[b], dropped[b], ld[b])):
            ids = torch.tensor([prompt + y])
            ref = model(ids, image_features=feats)[0, len(prompt) - 1: len(prompt) - 1 + len(y)]  # (L_b, V)
            assert torch.allclose(got[: len(y)], ref, atol=1e-5)
        assert targets[b, : len(y)].tolist() == y


def test_keep_positions_hand_values():
    """Prompt [BOS, 5, I, I, I, I, 7, 8] (N = 4 at positions 2-5), kept tokens 0 and 2: the dropped
    prompt [BOS, 5, I, I, 7, 8] keeps positions 0, 1, then 2 + 0 and 2 + 2, then 6, 7."""
    I = tiny.IMAGE_TOKEN
    prompt = [1, 5, I, I, I, I, 7, 8]
    assert hscr.with_image_tokens(prompt, I, 2) == [1, 5, I, I, 7, 8]
    assert hscr.keep_positions(prompt, I, [0, 2]) == [0, 1, 2, 4, 6, 7]
    assert hscr.keep_positions(prompt, I, [0, 1, 2, 3]) == list(range(8))


def test_drop_positions_keep_in_the_stacked_batch(model, tokenizer, ckpt, dataset, tmp_path):
    """--drop-positions keep: in the stacked two-branch batch, each dropped row's logits equal an
    unpadded single-row forward given the full-branch position ids (gaps where tokens were
    removed), and differ from the renumbered ones; the full rows are unchanged. Keeping all
    16 tokens gives the full branch exactly."""
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl"))
    entries = _entries(pipe, dataset, {"e0", "e2", "e3"})
    pixels = torch.stack([e.pixels for e in entries])
    gens = [hscr.entry_generator(0, e.record.id) for e in entries]
    full, dropped, kept = hscr.visual_token_dropout(model, pixels, gens, return_kept=True)
    for e, k in zip(entries, kept):
        assert k.tolist() == (~hscr.drop_mask(16, 0.7, hscr.entry_generator(0, e.record.id))).nonzero()[:, 0].tolist()
    fp = [e.prompt_ids for e in entries]
    dp = [hscr.with_image_tokens(p, tiny.IMAGE_TOKEN, 5) for p in fp]
    pos = [hscr.keep_positions(p, tiny.IMAGE_TOKEN, k.tolist()) for p, k in zip(fp, kept)]
    ys = [e.response for e in entries]
    lf, ld, _, _ = hscr.score_two_branches(model, fp, dp, list(full), dropped, ys, pipe.pad, drop_positions=pos)
    rf, rd, _, _ = hscr.score_two_branches(model, fp, dp, list(full), dropped, ys, pipe.pad)
    assert torch.allclose(lf, rf, atol=1e-5)
    for b, y in enumerate(ys):
        ids = torch.tensor([dp[b] + y])
        positions = torch.tensor([pos[b] + list(range(pos[b][-1] + 1, pos[b][-1] + 1 + len(y)))])
        ref = model(ids, image_features=dropped[b], position_ids=positions)[0, len(dp[b]) - 1: len(dp[b]) - 1 + len(y)]
        assert torch.allclose(ld[b, : len(y)], ref, atol=1e-5)
        assert not torch.allclose(rd[b, : len(y)], ref, atol=1e-3)  # the renumbered branch is another input
    every = [hscr.keep_positions(p, tiny.IMAGE_TOKEN, range(16)) for p in fp]
    af, ad, _, _ = hscr.score_two_branches(model, fp, fp, list(full), list(full), ys, pipe.pad, drop_positions=every)
    assert torch.allclose(ad, af, atol=1e-5)


def test_process_every_strategy_and_greedy_scoring(model, tokenizer, ckpt, dataset, tmp_path):
    """Each mask strategy / drop mode and --score-on greedy run through a batch and give records with
    coupled positions, ranked negatives and probabilities in (0, 1)."""
    for kw in (dict(mask_strategy="latent", drop_mode="zero"), dict(mask_strategy="patch", coupling="logprob"),
               dict(mask_strategy="pixel", continuation="splice"), dict(score_on="greedy", drop_ratio=1.0)):
        pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl", score_negatives=True, **kw))
        out = pipe.process(_entries(pipe, dataset, {"e0", "e4"}))
        for r in out:
            assert isinstance(r, dict) and 1 <= len(r["negatives"]) <= 3 and r["coupled"], kw
            assert 0 < r["p_chosen"] < 1 and all(0 < p < 1 for p in r["p_rejected"])
        if kw.get("score_on") == "greedy":
            # the chosen answer is the model's own greedy answer, as generate gives it
            e = _entries(pipe, dataset, {"e0"})[0]
            feats = model.encode_images(e.pixels[None])
            new = model.generate(torch.tensor([e.prompt_ids]), image_features=feats, max_new_tokens=4)
            assert out[0]["chosen"] == tokenizer.decode(cut_generated(new[0].tolist(), EOS, 120)).strip()


def test_process_plausible_alpha_one_replaces_with_the_full_argmax(model, tokenizer, ckpt, dataset, tmp_path):
    """--candidates plausible with α = 1: the only plausible token is the full branch's argmax, so
    each coupled position gets it as replacement, unless it is y_t itself or a special token; then
    the position is left unreplaced (recorded under "unreplaced", with fewer graded candidates).
    The full-branch logits come from an unpadded single-row forward of prompt + y_w."""
    opts = _opts(ckpt, dataset, tmp_path / "o.jsonl", candidates="plausible", alpha=1.0, continuation="splice",
                 min_negatives=0)
    pipe = hscr.HSCR(model, tokenizer, opts)
    entries = _entries(pipe, dataset, {f"e{i}" for i in range(len(GOOD))})
    out = pipe.process(entries)
    n_unreplaced = 0
    for e, r in zip(entries, out):
        ids = torch.tensor([e.prompt_ids + e.response])
        logits = model(ids, image_features=model.encode_images(e.pixels[None]))[0, len(e.prompt_ids) - 1:]
        best = logits.argmax(-1).tolist()  # (L,): the full argmax predicting each response token
        for c in r["coupled"]:
            assert c["replacement_id"] == best[c["position"]] != c["token_id"]
            assert [k["token_id"] for k in c["candidates"]] == [c["replacement_id"]]  # C_t = {full argmax}
        for u in r["unreplaced"]:
            assert best[u["position"]] in (u["token_id"], *pipe.banned)
        n_unreplaced += len(r["unreplaced"])
        assert len(r["coupled"]) + len(r["unreplaced"]) == min(10, len(r["chosen"].split()))
        assert max((n["m"] for n in r["negatives"]), default=0) <= len(r["coupled"])
    assert n_unreplaced > 0 and sum(len(r["coupled"]) for r in out) > 0  # both cases occur


def test_process_same_word_exclude(model, tokenizer, ckpt, dataset, tmp_path):
    """--same-word exclude reaches the candidate sets: the tiny tokenizer has no two spellings of a
    word, so the test pairs ids as one "word" (2i and 2i + 1, by setting the pipeline's classes):
    with exclusion no stored candidate is the coupled token's partner; without it (the same
    classes ignored) some are, so the check can fail. Sets stay non-empty (dropped-topk, c = 10)."""
    partners = {}
    for mode in ("exclude", "allow"):
        opts = _opts(ckpt, dataset, tmp_path / f"{mode}.jsonl", same_word=mode, continuation="splice",
                     min_negatives=0)
        pipe = hscr.HSCR(model, tokenizer, opts)
        assert (pipe.word_class is not None) == (mode == "exclude")
        if mode == "exclude":
            pipe.word_class = torch.arange(model.config.text.vocab_size) // 2
        out = pipe.process(_entries(pipe, dataset, {f"e{i}" for i in range(len(GOOD))}))
        cands = [(c["token_id"], k["token_id"]) for r in out for c in r["coupled"] for k in c["candidates"]]
        assert cands and all(c["candidates"] for r in out for c in r["coupled"])
        partners[mode] = sum(t // 2 == k // 2 for t, k in cands)
    assert partners == {"exclude": 0, "allow": partners["allow"]} and partners["allow"] > 0


def test_process_coupled_positive(model, tokenizer, ckpt, dataset, tmp_path):
    """--coupled positive reaches step 4: every coupled position of the records (replaced or not) has
    s_t > 0; with any, the same entries hold positions with s_t ≤ 0, so the check can fail."""
    scores = {}
    for mode in ("any", "positive"):
        opts = _opts(ckpt, dataset, tmp_path / f"{mode}.jsonl", coupled=mode, continuation="splice", min_negatives=0)
        pipe = hscr.HSCR(model, tokenizer, opts)
        out = pipe.process(_entries(pipe, dataset, {f"e{i}" for i in range(len(GOOD))}))
        scores[mode] = [c["score"] for r in out for c in r["coupled"] + r["unreplaced"]]
    assert min(scores["any"]) <= 0 < min(scores["positive"])


def test_process_syncs_do_not_grow(model, tokenizer, ckpt, dataset, tmp_path):
    """One batch's host syncs (tests/syncs.py) are as many for 1 entry as for 4, short answers or long
    ones: the same 6 (splice; decode adds the continuation's, at most one per new token). Before: 9,
    12, 18 (a nonzero and a boolean index per entry in visual_token_dropout, a nonzero per entry in
    select_coupled_positions)."""
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl", continuation="splice"))
    entries = _entries(pipe, dataset, {f"e{i}" for i in range(len(GOOD))})
    longer = [dataclasses.replace(e, response=e.response[:-1] * 3 + e.response[-1:]) for e in entries]
    counts = [host_syncs(lambda: pipe.process(es[:n]))[0] for es in (entries, longer) for n in (1, 4)]
    assert counts == [6, 6, 6, 6]


# ----------------------------------------------------------------------------------------------
# The CLI: output, rejects, determinism, resume, sharding, stats


def _cli(ckpt, dataset, out, *extra) -> list[str]:
    """The command line of the CLI tests; --score-negatives, so that resume and merge carry p_rejected too."""
    return ["--model", str(ckpt), "--data", str(dataset[0]), "--image-root", str(dataset[1]), "--out", str(out),
            "--similarity", "lexical", "--max-new-tokens", "4", "--batch-size", "2", "--score-negatives", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(ckpt, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "prefs.jsonl"
    hscr.main(_cli(ckpt, dataset, out))
    return out


def test_cli_output_records_rejects_and_summary(reference_run, model, tokenizer, dataset):
    lines = _lines(reference_run)
    header, records = lines[0], lines[1:]
    assert header["_header"] and header["options"]["top_n"] == 10 and header["options"]["continuation"] == "decode"
    assert [r["id"] for r in records] == [f"e{i}" for i in range(len(GOOD))]
    for r in records:
        chosen = r["chosen"].split()
        assert r["rejected"] == r["negatives"][0]["text"] and len(r["p_rejected"]) == len(r["negatives"])
        sims = [n["similarity"] for n in r["negatives"]]
        assert all(a - b >= 0.1 - 1e-9 for a, b in zip(sims, sims[1:]))
        scores = [c["score"] for c in r["coupled"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == min(10, len(chosen))  # no EOS position
        assert r["unreplaced"] == []  # dropped-topk always has c candidates
        assert all(c["token"] == chosen[c["position"]] for c in r["coupled"])
        # never a special token as the hallucinated word (<unk> 0, BOS, EOS, <image> 120)
        assert all(c["replacement_id"] not in (0, 1, 2, tiny.IMAGE_TOKEN) for c in r["coupled"])
        for c in r["coupled"]:
            # C_t as stored: c = 10 distinct tokens of the dropped branch, never y_t; the replacement
            # is the one with the lowest P_diff (ties: the first); P_diff is a share of one softmax row.
            ids, p_diff = [k["token_id"] for k in c["candidates"]], [k["p_diff"] for k in c["candidates"]]
            assert len(set(ids)) == len(ids) == 10 and c["token_id"] not in ids
            assert ids[p_diff.index(min(p_diff))] == c["replacement_id"]
            assert all(0 <= d <= 1 for d in p_diff) and sum(p_diff) <= 1 + 1e-5
        for neg in r["negatives"]:
            # decode: y_w with the top-m replacements up to the last of them, then the model's tail
            top = r["coupled"][: neg["m"]]
            prefix = list(chosen)
            for c in top:
                prefix[c["position"]] = c["replacement"]
            last = max(c["position"] for c in top)
            assert neg["text"].split()[: last + 1] == prefix[: last + 1]
            assert neg["text"] != r["chosen"]
    # p_chosen against an unpadded full-image forward of prompt + chosen
    r = records[1]
    e = hscr.HSCR(model, tokenizer, hscr.Options(**header["options"])).prepare(r["index"], Record(
        r["id"], r["image"], r["question"], r["chosen"], None))
    ids = e.prompt_ids + e.response
    logits = model(torch.tensor([ids]), image_features=model.encode_images(e.pixels[None]))[0]
    probs = logits[len(e.prompt_ids) - 1: -1].softmax(-1).gather(-1, torch.tensor(e.response)[:, None])
    assert r["p_chosen"] == pytest.approx(probs.mean().item(), abs=1e-5)

    rejects = {(x["id"], x["category"]) for x in _lines(prefs.sidecar(reference_run, "rejects"))}
    assert rejects == {("noimage", "no image"), ("missing", "missing image"), ("corrupt", "unreadable image"),
                       ("empty", "empty answer"), ("noq", "bad record"), (None, "bad record")}
    summary = json.loads(prefs.sidecar(reference_run, "summary").read_text())
    n3 = sum(len(r["negatives"]) == 3 for r in records)
    assert summary["entries_written"] == len(GOOD) and summary["negatives"]["3"] == n3
    assert sum(summary["negatives"].values()) == len(GOOD) and summary["skipped_total"] == 6
    assert summary["processed_this_run"] == 11 and summary["entries_per_s"] > 0


def test_cli_splice_replaces_exactly_m_tokens(ckpt, dataset, tmp_path):
    out = tmp_path / "splice.jsonl"
    hscr.main(_cli(ckpt, dataset, out, "--continuation", "splice", "--limit", "6", "--min-gap", "0"))
    records = _lines(out)[1:]
    # --limit: the seeded sample of the parsed records, some of which are then rejected
    from data import read_records

    parsed, _ = read_records(dataset[0])
    sample = {parsed[i].id for i in prefs.select_entries(len(parsed), 6, 0)}
    seen = {r["id"] for r in records} | {x["id"] for x in _lines(prefs.sidecar(out, "rejects"))
                                         if x["category"] != "bad record"}
    assert seen == sample and len(records) >= 2
    for r in records:
        chosen = r["chosen"].split()
        for neg in r["negatives"]:
            words = neg["text"].split()
            changed = {i for i, (a, b) in enumerate(zip(words, chosen)) if a != b}
            top = r["coupled"][: neg["m"]]
            assert len(words) == len(chosen) and changed == {c["position"] for c in top}
            assert all(words[c["position"]] == c["replacement"] for c in top)


def test_cli_is_deterministic(reference_run, ckpt, dataset, tmp_path):
    out = tmp_path / "again.jsonl"
    hscr.main(_cli(ckpt, dataset, out))
    strip = lambda p: [{k: v for k, v in x.items() if k != "options"} for x in _lines(p)]  # noqa: E731
    assert strip(out) == strip(reference_run)
    assert _lines(prefs.sidecar(out, "rejects")) == _lines(prefs.sidecar(reference_run, "rejects"))


def test_cli_resume_refuses_a_corrupt_line(reference_run, ckpt, dataset, tmp_path):
    """A bad line inside an output being resumed (not a last, half-written one) is an error that
    names the file and the line (harness.files.DataError, one line on stderr from the command line)."""
    from harness.files import DataError

    out = tmp_path / "prefs.jsonl"
    lines = reference_run.read_text().split("\n")
    out.write_text("\n".join([lines[0], lines[1], "{not json", *lines[2:]]))
    with pytest.raises(DataError, match=re.escape(f"{out}:3: not a JSON line")):
        hscr.main(_cli(ckpt, dataset, out))


def test_cli_resume_after_kill(reference_run, ckpt, dataset, tmp_path, monkeypatch):
    """Killed during the third batch (two batches flushed, a half-written line), then rerun: the
    result equals the uninterrupted run, with no duplicate ids; other options are refused."""
    from harness.provenance import ProvenanceError

    out = tmp_path / "prefs.jsonl"
    real, calls = hscr.HSCR.process, []

    def dying(self, entries):
        calls.append(len(entries))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, entries)

    monkeypatch.setattr(hscr.HSCR, "process", dying)
    with pytest.raises(KeyboardInterrupt):
        hscr.main(_cli(ckpt, dataset, out))
    monkeypatch.setattr(hscr.HSCR, "process", real)
    with open(out, "a") as f:
        f.write('{"id": "e9", "ind')  # a kill mid-write
    assert len(_lines_done(out)) < len(GOOD)
    hscr.main(_cli(ckpt, dataset, out))
    assert out.read_text() == reference_run.read_text().replace(str(reference_run), str(out))
    assert _lines(prefs.sidecar(out, "rejects")) == _lines(prefs.sidecar(reference_run, "rejects"))
    with pytest.raises(ProvenanceError, match="option top_n: 10 in the file, 3 now"):
        hscr.main(_cli(ckpt, dataset, out, "--top-n", "3"))


def _killed_copy(reference_run: Path, out: Path, k: int, torn: bool) -> None:
    """`out` as a kill leaves it after the first k records of the reference run were written: the
    header, k records, with `torn` the first half of record k + 1 without its newline; the
    rejects written before (every one but the last batch's "empty")."""
    lines = reference_run.read_text().replace(str(reference_run), str(out)).split("\n")
    out.write_text("\n".join(lines[: k + 1]) + "\n" + (lines[k + 1][: len(lines[k + 1]) // 2] if torn else ""))
    rejects = [x for x in prefs.sidecar(reference_run, "rejects").read_text().split("\n") if x and '"empty"' not in x]
    prefs.sidecar(out, "rejects").write_text("\n".join(rejects) + "\n")


@pytest.mark.parametrize("k, torn, batches", [
    (6, False, [["e5", "e6"]]),  # e5 written, e6 lost: the batch [e5, e6] again, whole
    (6, True, [["e5", "e6"]]),
    (3, True, [["e3", "e4"], ["e5", "e6"]]),  # batch [e3, e4] lost entirely (e2 was alone in its batch)
])
def test_resume_is_exact_bit_for_bit(reference_run, ckpt, dataset, tmp_path, monkeypatch, k, torn, batches):
    """Batches of 2 over the 11 valid records: [e0 e1] [noimage missing] [corrupt e2] [e3 e4] [e5 e6]
    [empty]. Killed after k records (with or without a torn last line), a resumed run computes
    each batch holding a missing record whole, with the entries it had (the spy sees the batches),
    and writes only the missing records: the files equal the uninterrupted run's, byte for byte.
    Redoing e6 alone instead would change its floats in the last bits (batch size 1 vs 2 gives
    other p_chosen and scores on this model, measured)."""
    out = tmp_path / "prefs.jsonl"
    _killed_copy(reference_run, out, k, torn)
    real, seen = hscr.HSCR.process, []
    monkeypatch.setattr(hscr.HSCR, "process", lambda self, es: (seen.append([e.record.id for e in es]),
                                                               real(self, es))[1])
    summary = hscr.main(_cli(ckpt, dataset, out))
    assert seen == batches
    assert summary["processed_this_run"] == len(GOOD) - k + 1  # and the "empty" reject
    assert out.read_text() == reference_run.read_text().replace(str(reference_run), str(out))
    assert prefs.sidecar(out, "rejects").read_text() == prefs.sidecar(reference_run, "rejects").read_text()


def test_resume_refuses_options_that_change_floats(reference_run, ckpt, dataset, tmp_path):
    """--batch-size and --decode-rows change the floats (which rows share a padded forward), so a
    resume with another value stops, naming it, and leaves the file as it was. A file holding
    only its header (a run that failed in its first batch, e.g. out of memory) holds nothing
    computed: a run with another batch size starts it again."""
    from harness.provenance import ProvenanceError

    out = tmp_path / "prefs.jsonl"
    _killed_copy(reference_run, out, 3, torn=True)
    before = out.read_bytes()
    for flag, value, stored in (("--batch-size", "3", "2"), ("--decode-rows", "8", "64")):
        name = flag[2:].replace("-", "_")
        with pytest.raises(ProvenanceError, match=f"option {name}: {stored} in the file, {value} now.*--overwrite"):
            hscr.main(_cli(ckpt, dataset, out, flag, value))
        assert out.read_bytes() == before  # not even the torn line was cut
    lines = out.read_text().split("\n")
    out.write_text(lines[0] + "\n")
    prefs.sidecar(out, "rejects").write_text("".join(x + "\n" for x in prefs.sidecar(reference_run, "rejects")
                                                    .read_text().split("\n") if '"bad record"' in x))
    hscr.main(_cli(ckpt, dataset, out, "--batch-size", "3"))
    header = _lines(out)[0]
    assert header["options"]["batch_size"] == 3 and header["provenance"]["batch_size"] == 3
    assert len(_lines(out)) == 1 + len(GOOD) and len(_lines(prefs.sidecar(out, "rejects"))) == 6


def test_header_provenance_names_every_input_and_option(reference_run, ckpt, dataset):
    """The fingerprint: the checkpoint directory, what the tokenizer does (its canonical form; here
    the checkpoint's tokenizer.json's), the data file and the 8 images that exist (0-6.png and
    corrupt.png; nope.png is missing, its entry rejected), by sha256; every option but the paths,
    --overwrite and --check-finite (they change no number), and the number of ranks."""
    import hashlib

    p = _lines(reference_run)[0]["provenance"]
    sha = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    assert p["model"]["kind"] == "dir" and p["model"]["files"]["model.safetensors"] == sha(ckpt / "model.safetensors")
    form = json.dumps(canonical_form(load_tokenizer(ckpt)), sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")
    assert p["tokenizer"] == {"kind": "content", "n": None, "sha256": hashlib.sha256(form).hexdigest()}
    assert p["data"]["sha256"] == sha(dataset[0])
    assert p["images"]["kind"] == "files" and p["images"]["n"] == 8
    assert p["vision tower"] is None and p["answers"] is None and p["sentence encoder"] is None
    options = {f.name for f in dataclasses.fields(hscr.Options)} - set(prefs.PATH_OPTIONS)
    assert options - set(p) == {"overwrite", "check_finite"}
    assert p["world_size"] == 1 and p["batch_size"] == 2 and p["dtype"] == "float32"
    assert not {"out", "image_root", "vision_tower", "sentence_model"} & set(p)  # paths never count


def test_changed_weights_stop_the_resume_and_overwrite_starts_again(ckpt, dataset, tmp_path):
    """Weights rewritten in place under an existing output (same path, same options): the resume
    stops, naming the model's weight file, and leaves the output as it was. --overwrite deletes
    the output, its rejects, summary and stale rank files, and writes what a fresh run on the new
    weights writes."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from harness.provenance import ProvenanceError

    model_dir = tmp_path / "ckpt"
    shutil.copytree(ckpt, model_dir)
    out = tmp_path / "prefs.jsonl"
    args = lambda out, *extra: _cli(model_dir, dataset, out, "--limit", "5", *extra)  # noqa: E731
    hscr.main(args(out))
    first = out.read_bytes()
    weights = model_dir / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = next(k for k in tensors if "lm_head" in k)
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ProvenanceError, match=r"model weights \(model\.safetensors\) changed"):
        hscr.main(args(out))
    assert out.read_bytes() == first
    stale = [prefs.shard_path(out, 1, 2), prefs.sidecar(prefs.shard_path(out, 0, 3), "rejects")]
    for p in stale:
        p.write_text("{}\n")
    hscr.main(args(out, "--overwrite"))
    fresh = tmp_path / "fresh.jsonl"
    hscr.main(args(fresh))
    now, again = _lines(out), _lines(fresh)
    assert now[0]["provenance"] == again[0]["provenance"] and now[0]["options"]["overwrite"] is True
    assert now[1:] == again[1:] and now[1:] != [json.loads(x) for x in first.decode().splitlines()[1:]]
    assert not any(p.exists() for p in stale)


def test_a_failed_load_writes_nothing(ckpt, dataset, tmp_path, capsys):
    """A bad --model (missing, or with a truncated weight file), --tokenizer or --data ends with one
    line on stderr naming it, exit status 2, and no file: the corrected rerun then simply runs."""
    import shutil

    from harness.cli import run_main

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    bad_data = tmp_path / "bad.json"
    bad_data.write_text("[{")
    out = tmp_path / "prefs.jsonl"
    good = _cli(ckpt, dataset, out)
    for argv, named in ((_cli(tmp_path / "nope", dataset, out), "nope"), (_cli(broken, dataset, out), "broken"),
                        (good + ["--tokenizer", str(tmp_path / "none.json")], "none.json"),
                        (good[:2] + ["--data", str(bad_data)] + good[4:], "bad.json")):
        capsys.readouterr()
        assert run_main(lambda a: hscr.main(a) and 0, argv) == 2
        err = capsys.readouterr().err.strip().split("\n")
        assert len(err) == 1 and ": error: " in err[0] and named in err[0], err
        assert not out.exists() and not prefs.sidecar(out, "rejects").exists()
    hscr.main(good)
    assert len(_lines(out)) == 1 + len(GOOD)


def test_non_finite_weights_are_refused_or_give_rejects(ckpt, dataset, tmp_path):
    """Issue #24 item 1: one NaN in a q_proj weight gave records with p_chosen NaN and negatives of
    "\\u0000", counted as good entries. The load refuses it, naming the tensor; let through with
    --no-check-finite, every entry is a reject "non-finite probability", never a record."""
    import shutil

    from safetensors.torch import load_file, save_file

    from model import CheckpointError

    poisoned = shutil.copytree(ckpt, tmp_path / "ckpt")
    weights = load_file(poisoned / "model.safetensors")
    weights["language_model.model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, poisoned / "model.safetensors")
    out = tmp_path / "prefs.jsonl"
    with pytest.raises(CheckpointError, match=r"1 of \d+ tensors hold NaN or Inf .*q_proj\.weight \(model\."):
        hscr.main(_cli(poisoned, dataset, out, "--limit", "3"))
    summary = hscr.main(_cli(poisoned, dataset, out, "--limit", "3", "--no-check-finite"))
    rejects = [r for r in _lines(prefs.sidecar(out, "rejects")) if r["category"] == "non-finite probability"]
    assert len(_lines(out)) == 1 and summary["entries_written"] == 0 and rejects
    assert all(r["reason"].startswith("p_chosen nan, p_rejected ") for r in rejects)


def test_a_wrong_image_root_stops_before_the_model_loads(ckpt, dataset, tmp_path, monkeypatch, capsys):
    """An --image-root that holds none of the selected entries' images (a wrong folder) stops in one line
    naming it and where the first image was looked for, before the model loads, and writes nothing."""
    from harness.cli import run_main

    monkeypatch.setattr(prefs, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out, root = tmp_path / "prefs.jsonl", tmp_path / "elsewhere"
    root.mkdir()
    argv = _cli(ckpt, dataset, out)
    argv[argv.index("--image-root") + 1] = str(root)
    assert run_main(lambda a: hscr.main(a) and 0, argv) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and f"--image-root {root}: none of the images that 10 selected entries name is " \
        f"there (e.g. {root / '0.png'})" in err[0], err
    assert not out.exists() and not prefs.sidecar(out, "rejects").exists()


def test_a_duplicate_id_does_not_mark_its_entry_done(ckpt, dataset, tmp_path):
    """A data file with e0, e1 and a second e1 (a bad record: duplicate id). The bad record's
    reject carries the id e1, which must not count as the entry e1 done: killed after e0, the
    resumed run still writes e1."""
    items = json.loads(dataset[0].read_text())
    e0, e1 = (next(x for x in items if isinstance(x, dict) and x.get("id") == i) for i in ("e0", "e1"))
    data = tmp_path / "dup.json"
    data.write_text(json.dumps([e0, e1, e1]))
    out = tmp_path / "prefs.jsonl"
    argv = _cli(ckpt, (data, dataset[1]), out, "--batch-size", "1")
    hscr.main(argv)
    assert [r["id"] for r in _lines(out)[1:]] == ["e0", "e1"]
    complete = out.read_text()
    out.write_text("".join(x + "\n" for x in complete.split("\n")[:2]))  # header and e0
    hscr.main(argv)
    assert out.read_text() == complete


def test_stored_ids_are_the_ids_scored_and_generated(model, tokenizer, ckpt, dataset, tmp_path, monkeypatch):
    """Each kept negative stores the ids its continuation produced and p_rejected scored, without
    the final EOS: `ids` + [EOS] if `complete` is exactly the row teacher-forced for p_rejected
    and prefix + tail of greedy_continuations. To see both cases, every other tail the model
    gives is cut after its first token and ended with EOS (as if the model had stopped); the
    others run to the --max-new-tokens = 4 limit without EOS, or stop before an image placeholder
    (cut_generated): complete = false. chosen_ids + [EOS] is y_w as scored; splice negatives are
    y_w with replacements and its EOS: complete."""
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl", score_negatives=True))
    entries = _entries(pipe, dataset, {"e0", "e1", "e4"})
    real_continue, real_score = hscr.greedy_continuations, hscr.teacher_forced_logits
    rows, scored = [], []

    def continuations(*args, owners, **kwargs):
        tails = real_continue(*args, owners=owners, **kwargs)
        tails = [t[:1] + [EOS] if r % 2 and EOS not in t else t for r, t in enumerate(tails)]
        rows.extend(zip(owners, args[3], tails))
        return tails

    def score(model, prompts, features, responses, *args, **kwargs):
        scored.append(responses)
        return real_score(model, prompts, features, responses, *args, **kwargs)

    monkeypatch.setattr(hscr, "greedy_continuations", continuations)
    monkeypatch.setattr(hscr, "teacher_forced_logits", score)
    out = pipe.process(entries)
    negatives = [(b, n) for b, r in enumerate(out) for n in r["negatives"]]
    assert [n["ids"] + [EOS] * n["complete"] for _, n in negatives] == scored[-1]  # p_rejected's rows
    for b, n in negatives:
        prefix, tail = [(p, t) for o, p, t in rows if o == b][n["m"] - 1]
        assert n["ids"] + [EOS] * n["complete"] == prefix + tail
        assert n["complete"] == (tail[-1:] == [EOS])
        if not n["complete"]:
            assert len(tail) == 4 or len(tail) < 4 and EOS not in tail  # the limit, or a placeholder
        assert n["text"] == tokenizer.decode(n["ids"]).strip()
    assert {n["complete"] for _, n in negatives} == {True, False}
    for e, r in zip(entries, out):
        assert r["chosen_ids"] + [EOS] == e.response and r["chosen_complete"] is True
    monkeypatch.undo()
    splice = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl", continuation="splice"))
    for e, r in zip(entries, splice.process(entries)):
        for n in r["negatives"]:
            expected = list(e.response[:-1])
            for c in r["coupled"][: n["m"]]:
                expected[c["position"]] = c["replacement_id"]
            assert n["complete"] is True and n["ids"] == expected


def test_bad_images_become_rejects_naming_the_file(model, tokenizer, ckpt, dataset, tmp_path, monkeypatch):
    """An empty file, a truncated PNG and a decompression bomb (more than twice pillow's pixel
    limit, lowered here to 100: a 28×28 image has 784) are each an "unreadable image" reject
    naming the file, not an error that stops the run."""
    good = (dataset[1] / "0.png").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "bomb.png").write_bytes(good)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    pipe = hscr.HSCR(model, tokenizer, _opts(ckpt, dataset, tmp_path / "o.jsonl", image_root=str(tmp_path)))
    for i, name in enumerate(("empty.png", "cut.png", "bomb.png")):
        r = pipe.prepare(i, Record(f"x{i}", name, "what is shown ?", "yes", None))
        assert isinstance(r, hscr.Reject) and r.category == "unreadable image" and name in r.reason, r
    assert "decompression-bomb" in pipe.prepare(2, Record("x2", "bomb.png", "what ?", "yes", None)).reason


def _lines_done(path: Path) -> list[str]:
    return [x for x in path.read_text().split("\n")[1:] if x.endswith("}")]


@pytest.mark.slow
def test_torchrun_two_ranks_merge_to_the_single_process_result(reference_run, ckpt, dataset, tmp_path):
    out = tmp_path / "prefs.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "hscr.py", *_cli(ckpt, dataset, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, single = _lines(out), _lines(reference_run)
    assert merged[0]["options"] == {**single[0]["options"], "out": str(out)}
    assert [r["id"] for r in merged[1:]] == [r["id"] for r in single[1:]]
    for a, b in zip(merged[1:], single[1:]):
        # rank batches hold other entries: same texts, floats equal up to padding round-off
        assert _texts(a) == _texts(b)
        assert a["p_chosen"] == pytest.approx(b["p_chosen"], rel=1e-4)
        assert a["p_rejected"] == pytest.approx(b["p_rejected"], rel=1e-4)
    key = lambda x: (str(x["id"]), x["category"])  # noqa: E731
    assert sorted(map(key, _lines(prefs.sidecar(out, "rejects")))) == sorted(
        map(key, _lines(prefs.sidecar(reference_run, "rejects"))))
    for r in range(2):
        assert prefs.shard_path(out, r, 2).exists()
    assert json.loads(prefs.sidecar(out, "summary").read_text())["entries_written"] == len(GOOD)


def test_merge_refuses_rank_files_made_differently(reference_run, tmp_path):
    """Rank files whose fingerprints differ (here rank 1 ran with another batch size) are not
    merged: the error names the difference, and no merged file is written."""
    from harness.cli import UserError

    out = tmp_path / "prefs.jsonl"
    lines = _lines(reference_run)
    for rank, batch_size in ((0, 2), (1, 3)):
        header = {**lines[0], "provenance": {**lines[0]["provenance"], "world_size": 2, "batch_size": batch_size}}
        rows = [header] + lines[1 + rank:: 2]
        prefs.shard_path(out, rank, 2).write_text("".join(json.dumps(x) + "\n" for x in rows))
    with pytest.raises(UserError, match="rank 1 ran with other inputs or options than rank 0: option batch_size: 2"):
        prefs.merge_shards(out, 2)
    assert not out.exists()


def _texts(r: dict) -> dict:
    return {"chosen": r["chosen"], "negatives": [(n["text"], n["m"]) for n in r["negatives"]],
            "coupled": [(c["position"], c["replacement_id"]) for c in r["coupled"]]}


def test_stats(reference_run, ckpt, capsys):
    result = hscr.main(["stats", str(reference_run), "--model", str(ckpt), "--limit", "4"])
    records = _lines(reference_run)[1:]
    assert result["entries"] == len(GOOD)
    assert result["p_chosen"] == pytest.approx(sum(r["p_chosen"] for r in records) / len(records))
    first = [r["negatives"][0]["similarity"] for r in records]
    assert result["similarity_by_rank"][0] == pytest.approx(sum(first) / len(first))
    assert 0 < result["p_external"] < 1
    rejected = [p for r in records for p in r["p_rejected"]]
    assert result["p_rejected"] == pytest.approx(sum(rejected) / len(rejected))
    out = capsys.readouterr().out
    assert "per-token probability" in out and "--score-negatives" not in out


def test_score_negatives_adds_p_rejected_only(reference_run, ckpt, dataset, tmp_path, capsys):
    """Without --score-negatives the records lack p_rejected and are otherwise the reference
    run's (which had it); `stats` then says how to get it."""
    out = tmp_path / "prefs.jsonl"
    hscr.main([a for a in _cli(ckpt, dataset, out) if a != "--score-negatives"])
    without, reference = _lines(out), _lines(reference_run)
    assert without[0]["options"]["score_negatives"] is False and without[0]["provenance"]["score_negatives"] is False
    assert all("p_rejected" not in r for r in without[1:])
    assert without[1:] == [{k: v for k, v in r.items() if k != "p_rejected"} for r in reference[1:]]
    capsys.readouterr()
    result = hscr.main(["stats", str(out)])
    assert result["p_rejected"] is None and result["p_chosen"] == pytest.approx(
        sum(r["p_chosen"] for r in without[1:]) / len(GOOD))
    assert "no p_rejected in the file: rerun hscr.py with --score-negatives" in capsys.readouterr().out


def test_stats_scores_a_file_of_external_negatives(reference_run, ckpt, tmp_path, capsys):
    """--external: each entry's negatives in that file, matched by id, scored as hscr.py scores y_w. Here an
    entry's external negative is its own chosen answer, so its probability is the record's p_chosen (up to
    the batch's padding); the last entry is not in the file, a bad record is named and skipped."""
    records = _lines(reference_run)[1:]
    external = tmp_path / "external.jsonl"
    rows = [{"_header": True}] + [{"id": r["id"], "question": r["question"], "chosen": r["chosen"],
                                   "negatives": [{"text": r["chosen"]}]} for r in records[:-1]]
    rows.append({"id": "x"})
    external.write_text("".join(json.dumps(x) + "\n" for x in rows))
    result = hscr.main(["stats", str(reference_run), "--model", str(ckpt), "--external", str(external)])
    assert result["p_external_each"] == pytest.approx([r["p_chosen"] for r in records[:-1]], abs=1e-5)
    n = len(records) - 1
    assert result["p_external"] == pytest.approx(sum(r["p_chosen"] for r in records[:-1]) / n, abs=1e-5)
    out = capsys.readouterr()
    assert f"{external}: record {n + 1} skipped: missing field(s) ['question', 'chosen', 'negatives']" \
        in out.err
    assert "p_external_each" not in out.out  # the console's JSON line holds the means
    stats = ["stats", str(reference_run), "--external"]
    assert hscr.run_main(lambda argv: hscr.main(argv) and 0, stats + [str(external)]) == 2
    missing = [str(tmp_path / "none"), "--model", str(ckpt)]
    assert hscr.run_main(lambda argv: hscr.main(argv) and 0, stats + missing) == 2
    err = capsys.readouterr().err
    assert f"--external {external}: needs --model" in err
    assert f"--external {tmp_path / 'none'}: file not found" in err


def test_max_new_tokens_without_room_is_one_line_before_the_model_loads(ckpt, dataset, tmp_path, monkeypatch):
    """A --max-new-tokens that leaves no prompt room in max_seq_len would reject every entry as "too long":
    refused in one line, before the model loads and before anything is written."""
    out = tmp_path / "prefs.jsonl"
    max_len = prefs.read_config(ckpt).text.max_seq_len
    monkeypatch.setattr(prefs, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    argv = [a if a != "4" else str(max_len) for a in _cli(ckpt, dataset, out)]  # the continuation's length
    with pytest.raises(UserError, match=rf"--max-new-tokens {max_len}: .* max_seq_len {max_len}; lower it"):
        hscr.main(argv)
    assert not out.exists()
