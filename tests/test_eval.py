"""Tests for eval.py: LLaVA-Med's VQA scoring, the real benchmark file, and the evaluation run
(resume and provenance, unreadable images, missing ground truth, errors a user can fix).

Every expected value below is derived by hand from the rules in docs/FORMATS.md ("VQA metrics")
and LLaVA-Med's eval_metrics code; the derivation is the reason string.
"""
import json
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

import eval as E
from data import load_pixels, read_records
from harness import evalfiles as A
from harness.evalfiles import read_benchmarks
from harness.files import DataError, read_jsonl
from harness.cli import UserError, run_main
from harness.provenance import ProvenanceError

# The real VQA-RAD test file, copied unchanged into the repository (tests/data/README.md).
RAD = Path(__file__).resolve().parent / "data" / "VQA_RAD_test_llavamed_format.jsonl"


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    """Runs fingerprint their inputs; the digest cache goes to the test's folder, not ~/.cache."""
    monkeypatch.setenv("HSCR_CACHE", str(tmp_path / "digest-cache"))


# ---------------------------------------------------------------------------------------------
# normalize_word: (input, expected, reason)
# ---------------------------------------------------------------------------------------------
NORMALIZE = [
    ("Yes", "yes", "lowercased first"),
    ("left-sided", "left sided", "'-' touches no space anywhere: replaced by a space"),
    ("left - sided", "left sided", "'-' next to a space: deleted, the double space collapses"),
    ("x-ray - chest", "xray chest", "the space rule is per string: ' - ' deletes the dash inside x-ray too"),
    ("x-ray, chest", "x ray chest", "', ' deletes the comma; the dash touches no space: space"),
    ("T2 (weighted)", "t2 weighted", "' (' deletes '('; ')' touches no space: becomes a space"),
    ("1,000", "1000", "digit,digit: every punctuation character is deleted"),
    ("1,000 red-cells", "1000 redcells", "digit,digit anywhere also deletes the dash in red-cells"),
    ("3.5 cm.", "3.5 cm", "a period before a digit stays, the final one goes"),
    ("e.g.", "eg", "periods not followed by a digit are deleted, not spaced"),
    ("x" + "." * 40, "x" + "." * 8, "at most 32 periods deleted per call (re.UNICODE passed as count)"),
    ("None", "0", "'none' maps to 0 like 'zero'"),
    ("ten", "10", "number words up to ten"),
    ("eleven", "eleven", "no mapping beyond ten"),
    ("one.", "1", "the period goes before the number map, so 'one.' becomes 1"),
    ("the left lung", "left lung", "article 'the' dropped"),
    ("an apple a day", "apple day", "articles 'an' and 'a' dropped"),
    ("a-the", "", "the dash becomes a space, leaving two articles: nothing remains"),
    ("isnt", "isn't", "contraction restored"),
    ("Im", "im", "the table's capitalised keys never match lowercased words"),
    ("yes/no", "yes no", "'/' inside a word becomes a space"),
    ("  multiple   spaces ", "multiple spaces", "joined with single spaces"),
]


@pytest.mark.parametrize("text,expected,reason", NORMALIZE, ids=[r for _, _, r in NORMALIZE])
def test_normalize_word(text, expected, reason):
    assert E.normalize_word(text) == expected, reason


# ---------------------------------------------------------------------------------------------
# score_answer: (pred, gt, answer_type, key, expected, reason)
# ---------------------------------------------------------------------------------------------
SCORES = [
    # open questions: recall is the paper's open score
    ("left lung", "the left lung", "OPEN", "recall", 1.0, "the article in gt is dropped"),
    ("The Left Lung.", "left lung", "OPEN", "precision", 1.0, "case, article and final period removed"),
    ("the right lung", "left lung", "OPEN", "recall", 0.5, "tp=1 (lung), fn=1 (left): 1/2"),
    ("the right lung", "left lung", "OPEN", "f1", 0.5, "p = r = 1/2 (fp=1 right)"),
    ("lung", "left lung", "OPEN", "recall", 0.5, "tp=1, fn=1"),
    ("lung lung lung", "left lung", "OPEN", "recall", 0.75,
     "tp counts the prediction's 3 lungs: 3/(3+1) — repeating a word raises recall"),
    ("lung lung lung", "left lung", "OPEN", "f1", 2 * 0.75 / 1.75, "p=3/3, r=3/4"),
    ("left left lung", "left lung", "OPEN", "exact", 2 / 3,
     "LLaVA-Med's exact match: 2 gt word types found / 3 predicted words"),
    ("", "lung", "OPEN", "recall", 0.0, "empty prediction: zeros"),
    ("", "lung", "OPEN", "exact", 0.0, "empty prediction: exact 0, not a division by zero"),
    ("lung", "the", "OPEN", "f1", 0.0, "reference normalises to nothing: zeros"),
    ("none", "0", "OPEN", "recall", 1.0, "'none' is normalised to 0"),
    ("nothing", "none", "OPEN", "recall", 0.0, "'nothing' is not a number word"),
    ("2 lesions", "two", "OPEN", "f1", 2 / 3, "two -> 2; p=1/2, r=1, f1=2/3"),
    ("about 1,500 cells", "1500", "OPEN", "precision", 1 / 3,
     "digit,digit deletes the comma: 'about 1500 cells', 1 of 3 words"),
    ("x-ray - chest", "x-ray", "OPEN", "recall", 0.0,
     "pred becomes 'xray chest' (space rule), gt 'x ray': no shared word"),
    ("x-ray", "x ray", "OPEN", "recall", 1.0, "the dash inside a word becomes a space"),
    ("lung" + "." * 40, "lung", "OPEN", "recall", 1.0,
     "32 periods go in score_answer's pass, the last 8 in calculate_f1score's second pass"),
    ("lung tissue", "lung", "OPEN", "hit", 1.0, "open 'hit' is gt in pred (batch script's open accuracy)"),
    # closed questions: accuracy is the substring test on normalised strings
    ("Yes, there is a nodule.", "yes", "CLOSED", "hit", 1.0, "yes in 'yes there is nodule'"),
    ("There is a nodule.", "no", "CLOSED", "hit", 1.0, "'no' is a substring of 'nodule': a hit"),
    ("I cannot tell", "no", "CLOSED", "hit", 1.0, "'no' is a substring of 'cannot': a hit"),
    ("Yes", "No", "CLOSED", "hit", 0.0, "'no' not in 'yes'"),
    ("YES", "yes", "CLOSED", "hit", 1.0, "case folded"),
    ("", "yes", "CLOSED", "hit", 0.0, "empty prediction misses"),
    ("yes and no", "no", "CLOSED", "hit", 1.0, "a hedge holding both words hits either answer"),
    ("The left side of the image", "the left side", "CLOSED", "hit", 1.0,
     "'left side' in 'left side of image' (articles gone on both sides)"),
    ("it isnt", "isn't", "CLOSED", "hit", 1.0, "contraction restored in pred: \"it isn't\""),
    ("left", "left", "CLOSED", "hit", 1.0, "lenient: no yes/no needed"),
    ("yes", "1", "CLOSED", "hit", 0.0, "'1' not in 'yes'"),
    ("one", "1", "CLOSED", "hit", 1.0, "'one' -> '1'"),
]


@pytest.mark.parametrize("pred,gt,kind,key,expected,reason", SCORES, ids=[s[-1] for s in SCORES])
def test_score_answer(pred, gt, kind, key, expected, reason):
    assert E.score_answer(pred, gt, kind)[key] == pytest.approx(expected, abs=1e-12), reason


# ---------------------------------------------------------------------------------------------
# The strict closed rule: closed_answer (what a prediction answers) and strict_hit
# ---------------------------------------------------------------------------------------------
ANSWERS = [  # (raw prediction, closed_answer, reason)
    ("Yes.", "yes", "'yes' is always an answer word"),
    ("no, there is not", "no", "a comma follows 'no': it ends its clause, an answer"),
    ("yes and no", "hedge", "'no' ends the text: answer words of both polarities"),
    ("I am not sure", None, "'not' is not 'no': no answer word"),
    ("Yes, but no effusion", "yes", "'no' followed by a word is a determiner: the one answer is yes"),
    ("nodule", None, "whole words only: 'nodule' is not a 'no'"),
    ("yes no", "hedge", "the hedge baseline: 'no' ends the text"),
    ("Yes/No", "hedge", "'/' is punctuation: 'no' ends the text anyway"),
    ("no or yes", "hedge", "'no' before the conjunction 'or' is an answer"),
    ("No. Effusion is absent.", "no", "read on the raw text: the period after 'no' ends its clause "
     "(normalisation would delete it and make 'no effusion')"),
    ("There is no evidence of effusion", None, "a determiner, wherever it stands: no answer"),
    ("NO", "no", "case folded"),
    ("", None, "empty prediction"),
]


@pytest.mark.parametrize("pred,expected,reason", ANSWERS, ids=[a[-1] for a in ANSWERS])
def test_closed_answer(pred, expected, reason):
    assert E.closed_answer(pred) == expected, reason


STRICT = [  # (pred, gt, strict, lenient, reason)
    ("Yes.", "yes", 1.0, 1.0, "the answer yes equals gt"),
    ("no, there is not", "No", 1.0, 1.0, "the answer no equals gt (case folded)"),
    ("yes and no", "no", 0.0, 1.0, "a hedge is wrong whatever gt is; lenient: 'no' is a substring"),
    ("yes and no", "yes", 0.0, 1.0, "a hedge is wrong whatever gt is; lenient: 'yes' is a substring"),
    ("I am not sure", "no", 0.0, 1.0, "no answer: wrong; lenient: 'no' is a substring of 'not'"),
    ("Yes, but no effusion", "yes", 1.0, 1.0, "first answer word wins: 'no effusion' is a determiner"),
    ("Yes, but no effusion", "no", 0.0, 1.0, "answers yes; lenient: 'no' is a substring"),
    ("nodule", "no", 0.0, 1.0, "no answer; lenient: 'no' is a substring of 'nodule'"),
    ("yes no", "yes", 0.0, 1.0, "the hedge baseline scores nothing"),
    ("left", "left", 1.0, 1.0, "other closed answers: whole-word match"),
    ("the cleft", "left", 0.0, 1.0, "'left' is inside 'cleft', not a word of it"),
    ("The left side of the image", "the left side", 1.0, 1.0, "several words, articles dropped on both sides"),
    ("one lesion", "One", 1.0, 1.0, "'one' -> '1' on both sides"),
    ("yes", "left", 0.0, 0.0, "'left' absent"),
]


@pytest.mark.parametrize("pred,gt,strict,lenient,reason", STRICT, ids=[s[-1] for s in STRICT])
def test_strict_and_lenient_closed_hit(pred, gt, strict, lenient, reason):
    scores = E.score_answer(pred, gt, "CLOSED")
    assert (scores["strict"], scores["hit"]) == (strict, lenient), reason
    assert E.strict_hit(pred, gt) == bool(strict), reason


def test_hedge_statistic_is_word_level():
    """The hedge *rate* counts both words after normalisation, broader than closed_answer's hedge."""
    assert E.hedges("Yes, but no effusion") and E.hedges("yes/no") and E.hedges("YES - NO")
    assert not E.hedges("yes, a nodule") and not E.hedges("no") and not E.hedges("yes-yes")


def test_score_answer_keys_and_errors():
    assert set(E.score_answer("a", "b", "CLOSED")) == {"hit", "strict", "exact"}
    assert set(E.score_answer("a", "b", "OPEN")) == {"recall", "precision", "f1", "exact", "hit"}
    with pytest.raises(ValueError, match="OPEN"):
        E.score_answer("yes", "yes", "yes/no")
    with pytest.raises(TypeError):
        E.score_answer("2", 2, "OPEN")


# ---------------------------------------------------------------------------------------------
# score_file
# ---------------------------------------------------------------------------------------------
def _q(qid, answer, kind):
    return SimpleNamespace(id=str(qid), answer=answer, answer_type=kind)


def test_score_file_by_hand():
    questions = [_q(1, "left lung", "OPEN"), _q(2, "lung", "OPEN"), _q(3, "no", "CLOSED"),
                 _q(4, "no", "CLOSED"), _q(5, "yes", "CLOSED"), _q(6, "right", "OPEN"),
                 _q(7, None, None)]
    answers = [{"question_id": 1, "text": "lung"},            # recall 1/2, precision 1
               {"question_id": 2, "text": "the lung"},        # recall 1
               {"question_id": 3, "text": "Yes, a nodule."},   # hit ('no' in nodule); says yes
               {"question_id": 4, "text": "No, the eyes are normal."},  # hit; says no ("eyes" is no yes)
               {"question_id": 5, "text": "left"},             # miss
               {"question_id": 99, "text": "?"}]              # not a question of the file
    s = E.score_file(answers, questions)
    assert s["open"]["n"] == 2 and s["open"]["recall"] == pytest.approx(75.0)
    assert s["open"]["precision"] == pytest.approx(100.0)
    assert s["closed"]["n"] == 3 and s["closed"]["accuracy"] == pytest.approx(200 / 3)
    # strict: q3 answers yes (gt no), q4 answers no (hit), q5 answers nothing: 1 of 3
    assert s["closed"]["accuracy_strict"] == pytest.approx(100 / 3)
    assert s["closed"]["hedge_rate"] == 0.0  # no prediction holds both words
    assert s["closed"]["n_yes_no"] == 3 and s["closed"]["no_answer_rate"] == pytest.approx(100 / 3)  # q5
    # two gt-"no" questions, one answered "yes" (q3)
    assert s["closed"]["n_gt_no"] == 2 and s["closed"]["hallucination_rate"] == pytest.approx(50.0)
    # overall: mean of (0.5, 1, 1, 1, 0) per question; mean_of_types: (75 + 66.67) / 2
    assert s["overall"]["score"] == pytest.approx(70.0)
    assert s["overall"]["mean_of_types"] == pytest.approx((75 + 200 / 3) / 2)
    assert s["missing"] == ["6"] and s["unknown"] == ["99"] and s["unscorable"] == ["7"]
    assert s["n_questions"] == 7 and s["n_answered"] == 5


def test_score_file_rejects_duplicate_answers():
    with pytest.raises(ValueError, match="more than once"):
        E.score_file([{"question_id": 1, "text": "a"}, {"question_id": "1", "text": "b"}],
                     [_q(1, "a", "OPEN")])


def test_score_file_empty_type_is_none():
    s = E.score_file([{"question_id": 1, "text": "yes"}], [_q(1, "yes", "CLOSED")])
    assert s["open"]["recall"] is None and s["overall"]["mean_of_types"] is None
    assert s["closed"]["accuracy"] == 100.0 and s["closed"]["hallucination_rate"] is None


# ---------------------------------------------------------------------------------------------
# The real benchmark files: the constant baselines, counted independently
# ---------------------------------------------------------------------------------------------
def _benchmark(path):
    records, bad = read_records(path)
    assert bad == []
    return records


def _constant(questions, text):
    return [{"question_id": q.id, "text": text} for q in questions]


def test_vqa_rad_counts_and_constant_baselines():
    """The real VQA-RAD test file read through data.read_records (`gpt4_answer` as ground truth).

    Expected values computed once, independently of eval.py, with plain substring tests on the
    lowercased ground truths of the closed questions:
        rows = [json.loads(line) for line in open("VQA_RAD_test_llavamed_format.jsonl")]
        closed = [r["gpt4_answer"].lower() for r in rows if r["answer_type"] == "CLOSED"]
        for pred in ("yes", "no", "yes no"): print(sum(g in pred for g in closed), len(closed))
    → 451 rows, 272 closed, 179 open; "yes" 118/272, "no" 133/272, "yes no" 251/272. The 21
    other closed answers ("mri", "abnormal", "left", "one", ...) are substrings of none of the
    three, also after normalisation ("one" → "1"). 133/272 = 48.9 % and 251/272 = 92.3 %: the
    figures LLaVA-Med-style evaluations report for VQA-RAD.
    Strict: "yes" and "no" answer exactly their own questions (118 + 133 = 251, the yes/no share),
    the hedge "yes no" none of them.
    """
    rad = _benchmark(RAD)
    assert len(rad) == 451
    b = E.baselines(rad)
    yes, no, hedge = b["always yes"]["closed"], b["always no"]["closed"], b['hedge "yes no"']["closed"]
    assert (yes["n"], b["always yes"]["open"]["n"], yes["n_yes_no"]) == (272, 179, 251)
    assert yes["accuracy"] == pytest.approx(100 * 118 / 272)
    assert no["accuracy"] == pytest.approx(100 * 133 / 272)
    assert hedge["accuracy"] == pytest.approx(100 * 251 / 272)
    assert hedge["accuracy_strict"] == 0.0 and hedge["hedge_rate"] == 100.0
    assert yes["accuracy_strict"] + no["accuracy_strict"] == pytest.approx(100 * 251 / 272)
    assert yes["accuracy_strict"] == pytest.approx(100 * 118 / 272)
    assert yes["hallucination_rate"] == 100.0 and no["hallucination_rate"] == 0.0
    assert yes["no_answer_rate"] == no["no_answer_rate"] == hedge["no_answer_rate"] == 0.0


def test_vqa_rad_nodule_answers_pass_lenient_fail_strict():
    """ "There is a nodule." to every question: lenient finds "no" inside "nodule" (133/272, the
    same as "always no"); strict reads no answer at all."""
    rad = _benchmark(RAD)
    c = E.score_file(_constant(rad, "There is a nodule."), rad)["closed"]
    assert c["accuracy"] == pytest.approx(100 * 133 / 272) and c["accuracy_strict"] == 0.0
    assert c["no_answer_rate"] == 100.0 and c["hedge_rate"] == 0.0


def test_majority_answers_by_hand():
    """Grouped by normalised question text; ties go to the answer met first in file order;
    leave-one-out leaves the question's own answer out ("" when it is alone)."""
    rows = [("1", "What organ?", "liver"), ("2", "what organ", "Liver."), ("3", "What organ?", "lung"),
            ("4", "Where?", "left"), ("5", "Where?", "right"), ("6", "Which plane?", "axial")]
    records = [SimpleNamespace(id=i, question=q, answer=a, answer_type="OPEN") for i, q, a in rows]
    records.append(SimpleNamespace(id="7", question="What organ?", answer="yes", answer_type="CLOSED"))
    assert E.majority_answers(records) == {"1": "liver", "2": "liver", "3": "liver",
                                           "4": "left", "5": "left", "6": "axial"}
    # 1, 2: the others are liver + lung, a tie won by liver (first); 3: liver twice;
    # 4: only "right" remains; 5: only "left"; 6: alone
    assert E.majority_answers(records, leave_one_out=True) == {"1": "liver", "2": "liver", "3": "liver",
                                                               "4": "right", "5": "left", "6": ""}


def test_baselines_cli(capsys):
    E.main(["baselines", "--questions", str(RAD)])
    out = capsys.readouterr().out
    assert "451 questions: 272 closed (251 with answer yes/no, 133 of them no), 179 open" in out
    header = "| baseline | open recall | closed acc | closed strict | hedge rate | no answer |"
    assert header in out
    hedge = f"| hedge \"yes no\" | 0.00 | {100 * 251 / 272:.2f} | 0.00 | 100.00 | 0.00 |"
    assert hedge in out
    assert f"| always no | 0.00 | {100 * 133 / 272:.2f} | {100 * 133 / 272:.2f} |" in out
    assert "| majority per question text | " in out and "| majority, leave-one-out | " in out
    E.main(["baselines", "--questions", str(RAD), "--json"])
    b = json.loads(capsys.readouterr().out)
    assert set(b) == {"always yes", "always no", 'hedge "yes no"', "majority per question text",
                      "majority, leave-one-out"}
    assert b["always yes"]["closed"]["accuracy"] == pytest.approx(100 * 118 / 272)
    assert b["majority, leave-one-out"]["closed"]["n"] == 0  # the majority rows answer open questions only
    assert b["majority, leave-one-out"]["open"]["n"] == 179


# ---------------------------------------------------------------------------------------------
# The evaluation run, on a tiny random model of our own (no transformers needed)
# ---------------------------------------------------------------------------------------------
QUESTIONS = [  # (id, image, question, answer, type)
    (11, "a.png", "Is there a nodule?", "no", "CLOSED"),
    (12, "b.png", "Which lung is affected?", "left lung", "OPEN"),
    (13, "c.png", "Is this an MRI? Please choose from the following two options: [yes, no]", "yes", "CLOSED"),
    (14, "a.png", "How many lesions?", "two", "OPEN"),
    (15, "b.png", "What organ is shown?", "liver", "OPEN"),
]


def _tiny_tokenizer():
    """Character-level tokenizer: <unk>=0, <s>=1, </s>=2, then the printable ASCII characters."""
    import string

    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable:
        if c not in "\r\x0b\x0c":
            vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Fuse()
    return tok


def _tiny_config():
    from model import LlavaConfig, TextConfig, VisionConfig

    return LlavaConfig(
        vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, n_layers=3, n_heads=4),
        text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                        rope_theta=1e4, max_seq_len=256),
        image_token_id=-200)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint directory (with tokenizer.json), images, and the question file
    in three layouts, the JSONL one with a malformed line at index 2."""
    import torch
    from PIL import Image

    from model import Llava, save_model

    root = tmp_path_factory.mktemp("tiny_eval")
    torch.manual_seed(0)
    model = Llava(_tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("class_embedding"):  # created with torch.empty: load-only
                p.normal_()
        # stronger visual tokens, so that the image visibly moves the logits
        model.multi_modal_projector.linear_2.weight.mul_(20.0)
    ckpt = save_model(model, root / "ckpt")
    _tiny_tokenizer().save(str(ckpt / "tokenizer.json"))
    images = root / "images"
    images.mkdir()
    for name, colour in (("a.png", (250, 10, 10)), ("b.png", (10, 250, 10)), ("c.png", (10, 10, 250))):
        Image.new("RGB", (40, 28), colour).save(images / name)  # not square: exercises the padding
    jsonl = [json.dumps({"question_id": i, "image": im, "text": q + "\n<image>", "gpt4_answer": a,
                         "answer_type": t}) for i, im, q, a, t in QUESTIONS]
    jsonl.insert(2, '{"question_id": 99, "image": "a.png"')  # truncated: a bad record at index 2
    (root / "questions.jsonl").write_text("\n".join(jsonl) + "\n")
    test_json = [{"id": i, "image": im, "answer_type": t,
                  ("conversatons" if i == 12 else "conversations"):
                      [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
                 for i, im, q, a, t in QUESTIONS]
    (root / "test.json").write_text(json.dumps(test_json))
    (root / "questions_only.jsonl").write_text("".join(
        json.dumps({"question_id": i, "image": im, "text": q + "\n<image>", "answer_type": t}) + "\n"
        for i, im, q, _, t in QUESTIONS))
    (root / "answers.jsonl").write_text("".join(
        json.dumps({"question_id": i, "answer": a}) + "\n" for i, _, _, a, _ in QUESTIONS))
    return SimpleNamespace(root=root, ckpt=ckpt, images=images, model=model, tokenizer=_tiny_tokenizer())


def _pixels(tiny, records):
    """The records' images as generate_answers loads them for build_batch in full mode."""
    return [load_pixels(tiny.images / r.image, tiny.model.config.vision.image_size) for r in records]


def test_no_image_mode_drops_every_visual_token(tiny):
    """no_image: the prompt ids are the full prompt's with the image positions removed, and no
    pixels; blank_image: the same ids as full, one mean-colour image for every row."""
    import torch

    records = read_benchmarks([f"q={tiny.root / 'test.json'}"])["q"][0]
    cfg = tiny.model.config
    kw = dict(tokenizer=tiny.tokenizer, config=cfg, pixels=_pixels(tiny, records[:2]))
    full, none, blank = (E.build_batch(records[:2], m, **kw) for m in E.MODES)
    n_img = cfg.num_image_tokens
    assert ((full.input_ids == cfg.image_token_id).sum(1) == n_img).all()
    assert (none.input_ids == cfg.image_token_id).sum() == 0 and none.pixel_values is None
    for i in range(2):
        f_ids = full.input_ids[i][full.attention_mask[i].bool()].tolist()
        n_ids = none.input_ids[i][none.attention_mask[i].bool()].tolist()
        assert n_ids == [t for t in f_ids if t != cfg.image_token_id]
    assert torch.equal(blank.input_ids, full.input_ids)
    assert torch.equal(blank.pixel_values[0], blank.pixel_values[1])
    # the mean colour truncated to integers normalises to within (1/255) / std_min ≈ 0.0146 of 0
    assert blank.pixel_values.abs().max() < 0.0146


def test_blind_modes_change_the_logits(tiny):
    """The tiny model's answer depends on the image: two different images give different
    next-token logits, and the no_image and blank_image inputs differ from the full one."""
    import torch

    records = read_benchmarks([f"q={tiny.root / 'test.json'}"])["q"][0]
    # rows 0 and 3 ask about image a, row 1 about b: same question text for 0 vs a copy on b
    same_q_other_image = SimpleNamespace(**{**vars(records[0]), "image": "b.png"})
    pair = [records[0], same_q_other_image]
    kw = dict(tokenizer=tiny.tokenizer, config=tiny.model.config, pixels=_pixels(tiny, pair))
    last = {}
    with torch.no_grad():
        for m in E.MODES:
            b = E.build_batch(pair, m, **kw)
            last[m] = tiny.model(b.input_ids, b.pixel_values, b.attention_mask)[:, -1]  # (2, V)
    assert (last["full"][0] - last["full"][1]).abs().max() > 1e-2  # the image matters
    assert (last["full"][0] - last["no_image"][0]).abs().max() > 1e-2
    assert (last["full"][0] - last["blank_image"][0]).abs().max() > 1e-2
    # without an image the two rows are the same question: identical logits
    torch.testing.assert_close(last["no_image"][0], last["no_image"][1])
    torch.testing.assert_close(last["blank_image"][0], last["blank_image"][1])


class _Interrupt(Exception):
    pass


class _StopAfter:
    """Wraps the model; generate() raises after `n` calls, as an interrupted run."""

    def __init__(self, model, n):
        self.model, self.n = model, n

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        if self.n == 0:
            raise _Interrupt
        self.n -= 1
        return self.model.generate(*args, **kwargs)


def _generate(tiny, model, run_dir, batch_size, rank=0, world=1):
    records = read_benchmarks([f"q={tiny.root / 'test.json'}"])["q"][0]
    n = E.generate_answers(model, tiny.tokenizer, records, run_dir=run_dir, name="q", mode="full",
                           image_root=str(tiny.images), model_id="tiny", batch_size=batch_size,
                           max_new_tokens=6, rank=rank, world=world)
    return records, n


def test_resume_gives_the_same_answer_file(tiny, tmp_path):
    records, n = _generate(tiny, tiny.model, tmp_path / "once", batch_size=2)
    assert n == 5
    once = A.merge_answers(tmp_path / "once", "q", "full", records).read_text()

    with pytest.raises(_Interrupt):  # two batches (4 answers) written, then interrupted
        _generate(tiny, _StopAfter(tiny.model, 2), tmp_path / "resumed", batch_size=2)
    shard = A.answers_path(tmp_path / "resumed", "q", "full", 0)
    assert len(shard.read_text().splitlines()) == 4
    with open(shard, "a") as f:  # and a torn last line, as a kill during a write leaves
        f.write('{"question_id": 15, "te')
    _, n = _generate(tiny, tiny.model, tmp_path / "resumed", batch_size=2)
    assert n == 1  # only the unanswered question
    assert A.merge_answers(tmp_path / "resumed", "q", "full", records).read_text() == once
    _, n = _generate(tiny, tiny.model, tmp_path / "resumed", batch_size=2)
    assert n == 0  # a finished run answers nothing more

    rows = [json.loads(line) for line in once.splitlines()]
    assert [r["question_id"] for r in rows] == [11, 12, 13, 14, 15]  # ints, as in the question file
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["prompt"] == "Is there a nodule?"


def test_batched_and_sharded_runs_equal_batch_one(tiny, tmp_path):
    """Left padding must not change greedy answers; two shards merged equal one run."""
    records, _ = _generate(tiny, tiny.model, tmp_path / "b1", batch_size=1)
    one = A.merge_answers(tmp_path / "b1", "q", "full", records).read_text()
    _generate(tiny, tiny.model, tmp_path / "b5", batch_size=5)
    assert A.merge_answers(tmp_path / "b5", "q", "full", records).read_text() == one
    for rank in (1, 0):
        _generate(tiny, tiny.model, tmp_path / "w2", batch_size=3, rank=rank, world=2)
    assert len(A.shards(tmp_path / "w2", "q", "full")) == 2
    assert A.merge_answers(tmp_path / "w2", "q", "full", records).read_text() == one
    assert A.shards(tmp_path / "w2", "q", "full") == []


def test_cli_run_blind_report_and_compare(tiny, tmp_path, capsys):
    run_a = tmp_path / "a"
    args = ["--model", str(tiny.ckpt), "--benchmark", f"rad={tiny.root / 'questions.jsonl'}",
            "--image-root", str(tiny.images), "--out", str(run_a), "--batch-size", "3",
            "--max-new-tokens", "4", "--blind"]
    E.main(args)
    summary = json.loads((run_a / "summary.json").read_text())
    rad = summary["benchmarks"]["rad"]
    assert set(rad["modes"]) == set(E.MODES)
    assert [b["index"] for b in rad["bad_records"]] == [2]  # reported, and the rest scored:
    assert rad["modes"]["full"]["open"]["n"] == 3 and rad["modes"]["full"]["closed"]["n"] == 2
    records = read_benchmarks([f"r={tiny.root / 'questions.jsonl'}"])
    records = records["r"][0]
    for mode in E.MODES:
        rows = read_jsonl(A.answers_path(run_a, "rad", mode))
        # scores recomputed from the answer file equal the summary's
        assert E.score_file(rows, records) == rad["modes"][mode]
        assert all(r["metadata"]["mode"] == mode for r in rows)
    gain = rad["visual_gain"]["no_image"]["open recall"]
    full_r, blind_r = rad["modes"]["full"]["open"]["recall"], rad["modes"]["no_image"]["open"]["recall"]
    assert gain == pytest.approx(full_r - blind_r)
    report = (run_a / "report.md").read_text()
    assert "### rad" in report and "visual gain (full − no image)" in report
    assert json.loads((run_a / "config.json").read_text())["batch_size"] == 3

    # a second run (with --limit) compared with the first
    run_b = tmp_path / "b"
    E.main(["--model", str(tiny.ckpt), "--benchmark", f"rad={tiny.root / 'questions.jsonl'}",
            "--image-root", f"rad={tiny.images}", "--out", str(run_b), "--max-new-tokens", "4", "--limit", "2"])
    capsys.readouterr()
    E.main(["compare", str(run_a), str(run_b)])
    out = capsys.readouterr().out
    assert "| full | open recall |" in out and "| no image | closed acc |" in out
    b_rad = json.loads((run_b / "summary.json").read_text())["benchmarks"]["rad"]
    fa, fb = rad["modes"]["full"]["closed"]["accuracy"], b_rad["modes"]["full"]["closed"]["accuracy"]
    assert f"| full | closed acc | {fa:.2f} | {fb:.2f} | {fb - fa:+.2f} |" in out
    assert "| no image | closed acc | " + f"{rad['modes']['no_image']['closed']['accuracy']:.2f} | – | – |" in out


def test_cli_errors_are_listed(tiny, tmp_path):
    os_images = tmp_path / "imgs"  # only a.png: questions 12, 13, 15 have no image
    os_images.mkdir()
    (os_images / "a.png").write_bytes((tiny.images / "a.png").read_bytes())
    with pytest.raises(UserError, match=r"benchmark 'q' \(.*test.json\): 2 of 3 images not found under "
                       r".*imgs \(needed by 3 of 5 questions\): b.png, c.png$"):
        E.main(["--model", str(tiny.ckpt), "--benchmark", f"q={tiny.root / 'test.json'}",
                "--image-root", f"q={os_images}", "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="batch-size must be >= 1"):
        E.main(["--model", str(tiny.ckpt), "--benchmark", f"q={tiny.root / 'test.json'}",
                "--out", str(tmp_path / "r"), "--batch-size", "0"])
    with pytest.raises(UserError, match="NAME=PATH"):
        E.main(["--model", str(tiny.ckpt), "--benchmark", str(tiny.root / "test.json"), "--out", "x"])
    with pytest.raises(UserError, match="nothing.jsonl: question file not found"):
        E.main(["--model", str(tiny.ckpt), "--benchmark", f"q={tmp_path / 'nothing.jsonl'}", "--out", "x"])
    with pytest.raises(UserError, match="--adapter .*no-adapter: directory not found"):
        E.main(["--model", str(tiny.ckpt), "--benchmark", f"q={tiny.root / 'test.json'}", "--image-root",
                str(tiny.images), "--adapter", str(tmp_path / "no-adapter"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()  # every one of them stopped before writing anything


def test_expected_errors_end_with_one_line(tiny, tmp_path, capsys):
    """Through harness.cli.run_main (what `python eval.py` runs): status 2 and one line on stderr,
    no traceback; a file that is not UTF-8 is named with the offset of its first bad byte."""
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question_id": 1, "image": "a.png", "text": "caf\xe9?", "answer_type": "OPEN"}\n')
    args = ["--model", str(tiny.ckpt), "--benchmark", f"q={bad}", "--image-root", str(tiny.images),
            "--out", str(tmp_path / "r")]
    # 0xe9 (Latin-1 "é") follows the 49 ASCII bytes of '{"question_id": 1, "image": "a.png", "text": "caf'
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text \(byte 0xe9 at offset 49\)"):
        E.main(args)
    assert run_main(E.main, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offset 49" in err and "Traceback" not in err
    assert run_main(E.main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "summary.json not found" in capsys.readouterr().err


def test_adapter_is_applied_on_the_fly(tiny, tmp_path):
    """--adapter: the PEFT-format adapter is loaded onto the base model (unmerged); the result
    computes what the model that saved it computes, and differs from the base."""
    import torch

    from model import load_model
    from model.lora import apply_lora, lora_modules, save_adapter

    source = load_model(tiny.ckpt)
    apply_lora(source, rank=2, alpha=4.0, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(source).values():
            m.lora_B.weight.normal_(std=0.5)  # B = 0 would leave the model unchanged
    save_adapter(source, tmp_path / "adapter")
    cfg = E.EvalConfig(model=str(tiny.ckpt), benchmark=[], out="-", adapter=str(tmp_path / "adapter"))
    model = E.load_for_eval(cfg, "cpu")
    assert lora_modules(model)  # the adapter sits in LoRA layers beside the unchanged base weights
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), source(ids))
        assert (model(ids) - tiny.model(ids)).abs().max() > 1e-2


def test_non_finite_weights_refused_unless_no_check_finite(tiny, tmp_path):
    """Issue #24 item 1: eval.py answered nothing from NaN weights and scored 0. The load now stops,
    naming the tensor; --no-check-finite (check_finite=False) loads them all the same."""
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(tiny.ckpt, tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    weights["language_model.model.norm.weight"][3] = float("inf")
    save_file(weights, ckpt / "model.safetensors")
    cfg = E.EvalConfig(model=str(ckpt), benchmark=[], out="-")
    with pytest.raises(UserError, match=r"1 of \d+ tensors hold NaN or Inf .*model\.norm\.weight"):
        E.load_for_eval(cfg, "cpu")
    argv = ["--model", str(ckpt), "--benchmark", "x=y", "--out", "-", "--no-check-finite"]
    cfg = E.EvalConfig(**vars(E.build_parser().parse_args(argv)))
    assert E.load_for_eval(cfg, "cpu").language_model.norm.weight[3].isinf()


def test_an_adapter_runs_on_the_model_it_was_trained_on(tiny, tmp_path, monkeypatch, capsys):
    """train.py's adapter records the model it was trained on (its provenance.json): without --model,
    eval.py evaluates that model; another model (by content) stops before the model loads, in one line
    naming both, unless --allow-other-model. An adapter without the record (PEFT's) needs --model and
    is applied to it unchecked."""
    from safetensors.torch import load_file, save_file

    from harness import provenance
    from model import load_model
    from model.lora import apply_lora, save_adapter

    source = load_model(tiny.ckpt)
    apply_lora(source, rank=2, alpha=4.0, dropout=0.0)
    adapter = save_adapter(source, tmp_path / "adapter")
    made = provenance.fingerprint(model=provenance.Dir(tiny.ckpt), **{"vision tower": None})
    provenance.save(adapter / "provenance.json", made, made_by="train.py")
    other = tmp_path / "other"
    shutil.copytree(tiny.ckpt, other)
    weights = other / "model.safetensors"
    save_file({k: v + 1 for k, v in load_file(weights).items()}, weights)

    class Loaded(Exception):
        pass

    loaded = []

    def load(cfg, device):
        loaded.append(cfg.model)
        raise Loaded

    monkeypatch.setattr(E, "load_for_eval", load)
    args = ["--adapter", str(adapter), "--benchmark", f"q={tiny.root / 'test.json'}", "--image-root",
            str(tiny.images), "--out", str(tmp_path / "run")]
    with pytest.raises(Loaded):
        E.main(args)
    assert loaded == [str(tiny.ckpt.resolve())]
    capsys.readouterr()
    assert run_main(E.main, args + ["--model", str(other)]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and "--allow-other-model" in err[0], err
    assert f"--adapter {adapter} comes from another model: {tiny.ckpt.resolve()}, not {other.resolve()} (" \
        "model weights (model.safetensors) changed)" in err[0]
    with pytest.raises(Loaded):
        E.main(args + ["--model", str(other), "--allow-other-model"])
    (adapter / "provenance.json").unlink()  # PEFT's adapter
    with pytest.raises(UserError, match=f"^--model is required: --adapter {adapter} does not record its "):
        E.main(args)
    with pytest.raises(Loaded):
        E.main(args + ["--model", str(other)])
    assert loaded == [str(tiny.ckpt.resolve()), str(other), str(other)]


def test_pathvqa_answer_types_are_scored(tmp_path):
    """PathVQA's answer types: yes/no is closed, other and number are open."""
    rows = [{"question_id": 1, "image": "x.png", "text": "Is it benign?", "answer": "yes", "answer_type": "yes/no"},
            {"question_id": 2, "image": "x.png", "text": "What is it?", "answer": "the colon", "answer_type": "other"},
            {"question_id": 3, "image": "x.png", "text": "How many?", "answer": 3, "answer_type": "number"}]
    path = tmp_path / "pvqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, bad = read_benchmarks([f"p={path}"])["p"]
    assert bad == [] and [r.answer_type for r in records] == ["CLOSED", "OPEN", "OPEN"]
    s = E.score_file([{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "colon"},
                      {"question_id": 3, "text": "three nuclei"}], records)
    # closed: 1/1; open recalls: colon vs "colon" 1, "3 nuclei" vs "3" 1 (number word mapped)
    assert s["closed"]["accuracy"] == 100.0 and s["open"]["recall"] == 100.0
    assert s["open"]["precision"] == pytest.approx(75.0)  # (1 + 1/2) / 2


def test_score_cli_on_a_real_benchmark(tmp_path, capsys):
    """`eval.py score` reads the real VQA-RAD file through data.read_records (all 451 questions,
    none malformed) and scores an "always no" answer file in LLaVA-Med's own answer-file layout:
    133/272 = 48.9 % closed, lenient and strict alike (see test_vqa_rad_counts_and_constant_baselines)."""
    ids = [json.loads(line)["question_id"] for line in RAD.read_text().splitlines() if line.strip()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "prompt": "?", "text": "No", "answer_id": "x",
                                           "model_id": "llava-med", "metadata": {}}) + "\n" for i in ids))
    E.main(["score", "--answers", str(answers), "--questions", str(RAD), "--json"])
    captured = capsys.readouterr()
    s = json.loads(captured.out)
    assert "bad record" not in captured.err
    assert (s["n_questions"], s["open"]["n"], s["closed"]["n"], s["missing"]) == (451, 179, 272, [])
    assert s["closed"]["accuracy"] == s["closed"]["accuracy_strict"] == pytest.approx(100 * 133 / 272)
    assert s["closed"]["hallucination_rate"] == 0.0  # never says yes

    E.main(["score", "--answers", str(answers), "--questions", str(RAD)])  # the table
    out = capsys.readouterr().out
    assert "451 questions: 272 closed (251 with answer yes/no, 133 of them no), 179 open" in out
    assert "answered 451, 0 missing" in out
    assert f"| answers.jsonl | 0.00 | {100 * 133 / 272:.2f} | {100 * 133 / 272:.2f} | 0.00 | 0.00 |" in out


def test_real_benchmark_without_images_fails_before_the_model(tmp_path):
    """The real file without its images: one error naming the file, how many images are missing
    for how many questions, and the first ten, raised before the model is loaded (the model
    directory does not even exist)."""
    used = [json.loads(line)["image"] for line in RAD.read_text().splitlines()]
    names = list(dict.fromkeys(used))
    images = tmp_path / "images"
    images.mkdir()
    for name in names[:2]:  # two present: the count excludes them
        (images / name).write_bytes(b"")
    n = len(names) - 2
    listed = ", ".join(names[2:12])
    with pytest.raises(UserError) as error:
        E.main(["--model", str(tmp_path / "no-model"), "--benchmark", f"vqa_rad={RAD}",
                "--image-root", str(images), "--out", str(tmp_path / "run")])
    message = str(error.value)
    assert message.startswith(f"benchmark 'vqa_rad' ({RAD}): {n} of {len(names)} images not found under {images}")
    assert f": {listed}, and {n - 10} more" in message
    assert f"(needed by {sum(u not in names[:2] for u in used)} of 451 questions)" in message
    assert not (tmp_path / "run").exists()


def test_score_empty_ground_truth_is_unscorable():
    """An empty closed ground truth is a substring of every answer, so LLaVA-Med's rule would count
    "banana" right; a reference that normalises to nothing ("the") is the same. Both are listed as
    unscorable and left out of every figure: closed n = 1 (q1 only), accuracy 0/1."""
    questions = [_q(1, "yes", "CLOSED"), _q(2, "", "CLOSED"), _q(3, "the", "OPEN"), _q(4, "  ", "CLOSED")]
    s = E.score_file([{"question_id": i, "text": "banana"} for i in (1, 2, 3, 4)], questions)
    assert s["unscorable"] == ["2", "3", "4"] and s["n_answered"] == 1
    assert (s["closed"]["n"], s["closed"]["accuracy"], s["open"]["n"]) == (1, 0.0, 0)
    assert E.majority_answers([_q(1, "", "OPEN")] + [SimpleNamespace(id="2", question="q", answer="", answer_type="OPEN")]) == {}


# ---------------------------------------------------------------------------------------------
# Resume and provenance
# ---------------------------------------------------------------------------------------------
def _cli(tiny, out, *extra, questions="questions.jsonl", model=None, images=None):
    """eval.py's command line on the tiny model (4 new tokens, the module's question file)."""
    E.main(["--model", str(model or tiny.ckpt), "--benchmark", f"rad={tiny.root / questions}",
            "--image-root", str(images or tiny.images), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "2", *extra])
    return json.loads((Path(out) / "summary.json").read_text())["benchmarks"]["rad"]


def _answers(run_dir, mode="full"):
    return A.answers_path(Path(run_dir), "rad", mode).read_text()


def _adapter(tiny, path):
    """A LoRA adapter with B != 0, so that it changes the answers' logits."""
    import torch

    from model import load_model
    from model.lora import apply_lora, lora_modules, save_adapter

    source = load_model(tiny.ckpt)
    apply_lora(source, rank=2, alpha=4.0, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(source).values():
            m.lora_B.weight.normal_(std=0.5)
    return save_adapter(source, path)


def test_rerun_with_same_inputs_resumes(tiny, tmp_path):
    """The same command again answers nothing new and gives the same file; --batch-size and
    --limit may change on resume (they are not in the fingerprint), and each session is listed."""
    run = tmp_path / "run"
    _cli(tiny, run, "--limit", "2")
    first = _answers(run)
    assert len(first.splitlines()) == 2
    _cli(tiny, run)  # extended to all 5 questions: the first two are kept, three answered
    _cli(tiny, run, "--batch-size", "5")
    whole = _answers(run)
    assert whole.splitlines()[:2] == first.splitlines()
    _cli(tiny, tmp_path / "fresh")
    assert whole == _answers(tmp_path / "fresh")  # and the same as one uninterrupted run
    record = json.loads((run / "provenance.json").read_text())
    assert [(x["limit"], x["batch_size"]) for x in record["sessions"]] == [(2, 2), (None, 2), (None, 5)]
    assert {"model", "adapter", "tokenizer", "questions rad", "images rad", "max_new_tokens", "dtype",
            "template"} <= set(record["fingerprint"])


def test_changed_model_or_adapter_stops_naming_it(tiny, tmp_path):
    """eval.py --out E, then eval.py --adapter A --out E used to exit 0 with the base model's
    answers under a report naming A. Now it stops before the model is loaded, naming the change;
    so does a checkpoint rewritten in place, while a copy of the same checkpoint resumes."""
    import torch

    from model import save_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    run = tmp_path / "run"
    _cli(tiny, run, model=ckpt)
    before = _answers(run)
    adapter = _adapter(tiny, tmp_path / "adapter")
    with pytest.raises(ProvenanceError, match=f"adapter: none in the file, {adapter} now.*--overwrite"):
        _cli(tiny, run, "--adapter", str(adapter), model=ckpt)
    with pytest.raises(ProvenanceError, match="option max_new_tokens: 4 in the file, 5 now"):
        _cli(tiny, run, "--max-new-tokens", "5", model=ckpt)
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    _cli(tiny, run, model=copy)  # content, not paths: the same checkpoint elsewhere resumes

    other = tiny.model.__class__(tiny.model.config).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(std=0.02)
    save_model(other, ckpt)  # rewritten in place: same path, other weights
    with pytest.raises(ProvenanceError, match=r"model weights \(model.safetensors\) changed"):
        _cli(tiny, run, model=ckpt)
    assert _answers(run) == before  # nothing was touched


def test_overwrite_starts_again(tiny, tmp_path):
    """--overwrite deletes the old answers and scores: the run then equals a fresh run with the
    adapter, and differs from the base model's answers it replaced. A file the run's record does not
    list (a user's) is never deleted: refused while it is there."""
    adapter = _adapter(tiny, tmp_path / "adapter")
    run = tmp_path / "run"
    _cli(tiny, run, "--blind")
    base = _answers(run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"^{run} holds what no provenance.json there lists .*: notes.txt; "):
        _cli(tiny, run, "--adapter", str(adapter), "--overwrite")
    (run / "notes.txt").unlink()
    summary = _cli(tiny, run, "--adapter", str(adapter), "--overwrite")
    _cli(tiny, tmp_path / "fresh", "--adapter", str(adapter))
    assert _answers(run) == _answers(tmp_path / "fresh") != base
    assert set(summary["modes"]) == {"full"}  # the blind answers went with the rest
    assert not A.answers_path(run, "rad", "no_image").exists()
    record = json.loads((run / "provenance.json").read_text())
    assert len(record["sessions"]) == 1 and record["fingerprint"]["adapter"]["path"] == str(adapter.resolve())
    # The default model_id tells the aligned answers from the base model's: the adapter's name is added.
    assert {r["model_id"] for r in read_jsonl(A.answers_path(run, "rad", "full"))} == {"ckpt+adapter"}
    assert json.loads(base.splitlines()[0])["model_id"] == "ckpt"


def test_run_without_provenance_is_not_resumed(tiny, tmp_path):
    """Answers from an eval.py that kept no provenance.json cannot be checked, nor said to be its run's:
    stop, naming them, with or without --overwrite; a user's config.json is never replaced."""
    run = tmp_path / "run"
    _cli(tiny, run)
    (run / "provenance.json").unlink()
    for again in ((), ("--overwrite",)):
        with pytest.raises(UserError, match="lists .*: config.json, rad, report.md, and 1 more"):
            _cli(tiny, run, *again)
    shutil.rmtree(run)
    (run / "config.json").parent.mkdir()
    (run / "config.json").write_text("mine")
    with pytest.raises(UserError, match="no provenance.json there lists .*: config.json; move them"):
        _cli(tiny, run)
    assert (run / "config.json").read_text() == "mine"


def test_torn_answer_file_is_repaired_and_resumed(tiny, tmp_path):
    """A kill mid-write leaves the last line of answers.jsonl without its end: the rerun ignores
    it, answers that question again and rewrites the file, equal to the uninterrupted one."""
    run = tmp_path / "run"
    _cli(tiny, run)
    whole = _answers(run)
    lines = whole.splitlines(keepends=True)
    A.answers_path(run, "rad", "full").write_text("".join(lines[:-1]) + lines[-1][:25])
    _cli(tiny, run)
    assert _answers(run) == whole
    assert len(json.loads((run / "provenance.json").read_text())["sessions"]) == 2


def test_limit_needs_only_the_images_of_its_questions(tiny, tmp_path):
    """--limit chooses the questions first, and only their images are checked and fingerprinted (a
    12-question run used to need every image of the file). A later session may choose more, whose
    images it then needs; an image that an earlier session answered from is still checked."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes((tiny.images / "a.png").read_bytes())  # question 11's; b.png, c.png absent
    run = tmp_path / "run"
    _cli(tiny, run, "--limit", "1", images=images)
    fingerprint = json.loads((run / "provenance.json").read_text())["fingerprint"]
    assert [json.loads(line)["question_id"] for line in _answers(run).splitlines()] == [11]
    assert fingerprint["images rad"]["n"] == 1 and fingerprint["questions rad"]["n"] == 5
    with pytest.raises(UserError, match=r"2 of 3 images not found .*\(needed by 3 of 5 questions\)"):
        _cli(tiny, run, images=images)  # more questions: their images are needed
    for name in ("b.png", "c.png"):
        (images / name).write_bytes((tiny.images / name).read_bytes())
    _cli(tiny, run, images=images)  # resumed with every question
    _cli(tiny, tmp_path / "fresh")
    assert _answers(run) == _answers(tmp_path / "fresh")
    assert json.loads((run / "provenance.json").read_text())["fingerprint"]["images rad"]["n"] == 3
    (images / "b.png").write_bytes((tiny.images / "c.png").read_bytes())  # question 12 was answered from it
    with pytest.raises(ProvenanceError, match="images rad changed"):
        _cli(tiny, run, "--limit", "1", images=images)


# ---------------------------------------------------------------------------------------------
# Images that exist but cannot be read; reference answers that are empty
# ---------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bad_images(folder):
    """name → bytes of images that exist but cannot be used, and why each fails."""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (28, 40, 3), dtype=np.uint8)
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(noise).save(png, "PNG")
    Image.fromarray(noise).save(jpeg, "JPEG")
    # A PNG header declaring 100000 x 100000 pixels (1e10 > 2 x pillow's 89.5M limit), no pixel data.
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IEND", b""))
    images = {
        "empty.png": b"",                                   # zero bytes
        "corrupt.png": b"this is not an image" * 10,        # no known header
        "cut.png": png.getvalue()[:len(png.getvalue()) // 2],  # verify() finds the chunk cut short
        "bomb.png": bomb,                                   # refused by Image.open itself
        "cut.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2],  # passes verify(), fails to decode
    }
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return images


def test_unreadable_images_are_skipped_and_reported(tiny, tmp_path, capsys):
    """Five questions whose image exists but cannot be used are skipped (four found up front by
    check_images, the cut JPEG when generation decodes it), listed with id and reason in
    summary.json and report.md, counted on stderr; the five good questions are answered in every
    mode and scored; a blind mode skips the same questions."""
    images = tmp_path / "images"
    shutil.copytree(tiny.images, images)
    bad = _bad_images(images)
    rows = [{"question_id": i, "image": im, "text": q + "\n<image>", "gpt4_answer": a, "answer_type": t}
            for i, im, q, a, t in QUESTIONS]
    rows += [{"question_id": 20 + k, "image": name, "text": "Is there a nodule?", "gpt4_answer": "no",
              "answer_type": "CLOSED"} for k, name in enumerate(bad)]
    (tiny.root / "with_bad_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rad = _cli(tiny, tmp_path / "run", "--blind", questions="with_bad_images.jsonl", images=images)

    reasons = {s["question_id"]: s["reason"] for s in rad["skipped"]}
    assert list(reasons) == ["20", "21", "22", "23", "24"]
    assert reasons["20"] == "image empty.png: empty file"
    assert "image corrupt.png: not a readable image (UnidentifiedImageError" in reasons["21"]
    assert "image cut.png: not a readable image" in reasons["22"]
    assert "image bomb.png: refused by pillow's decompression-bomb guard" in reasons["23"]
    assert "image cut.jpg: " in reasons["24"] and "truncated" in reasons["24"]
    for mode in E.MODES:
        rows_out = read_jsonl(A.answers_path(tmp_path / "run", "rad", mode))
        assert [r["question_id"] for r in rows_out] == [11, 12, 13, 14, 15], mode
        assert rad["modes"][mode]["n_questions"] == 5 and rad["modes"][mode]["missing"] == [], mode
    err = capsys.readouterr().err
    assert "rad: question 24 skipped: image cut.jpg" in err
    assert "rad: 5 questions skipped (unreadable image or too long), 0 unscorable" in err
    report = (tmp_path / "run" / "report.md").read_text()
    assert "10 questions read, 0 malformed records skipped, 5 questions skipped (unreadable image" in report
    assert "- 23: image bomb.png: refused by pillow's decompression-bomb guard" in report


def test_generation_skips_an_image_that_fails_to_load(tiny, tmp_path):
    """Without the up-front screen, generate_answers itself catches the load error per record:
    the question goes to `skipped`, the others of its batch are answered."""
    images = tmp_path / "images"
    shutil.copytree(tiny.images, images)
    (images / "b.png").write_bytes(b"")  # questions 12 and 15 use b.png
    records = read_benchmarks([f"q={tiny.root / 'test.json'}"])["q"][0]
    skipped = {}
    n = E.generate_answers(tiny.model, tiny.tokenizer, records, run_dir=tmp_path / "run", name="q", mode="full",
                           image_root=str(images), model_id="tiny", batch_size=5, max_new_tokens=3,
                           skipped=skipped)
    assert n == 3 and list(skipped) == ["12", "15"] and "b.png" in skipped["12"]
    rows = read_jsonl(A.answers_path(tmp_path / "run", "q", "full", 0))
    assert [r["question_id"] for r in rows] == [11, 13, 14]


def test_empty_ground_truth_is_listed_as_unscorable(tiny, tmp_path):
    """A question with an empty reference answer is answered but not scored: listed (count and
    id) in summary.json and report.md, and left out of the closed count (2 closed of 5 → 1)."""
    rows = [{"question_id": i, "image": im, "text": q + "\n<image>", "gpt4_answer": "" if i == 11 else a,
             "answer_type": t} for i, im, q, a, t in QUESTIONS]
    (tiny.root / "empty_gt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rad = _cli(tiny, tmp_path / "run", questions="empty_gt.jsonl")
    full = rad["modes"]["full"]
    assert full["unscorable"] == ["11"] and full["closed"]["n"] == 1 and full["open"]["n"] == 3
    assert len(read_jsonl(A.answers_path(tmp_path / "run", "rad", "full"))) == 5  # still answered
    report = (tmp_path / "run" / "report.md").read_text()
    assert "1 unscorable (no ground truth)" in report and "Unscorable, no ground truth to score against (1): 11" in report


# ---------------------------------------------------------------------------------------------
# The description metric: facts of the scene stated right or contradicted
# ---------------------------------------------------------------------------------------------
# A scene with two small nodules in the left lung of a chest X-ray, in the record field "facts".
FACTS = {
    "modality": {"value": "X-ray", "phrases": {"X-ray": ["X-ray"], "MRI": ["MRI"], "CT": ["CT"]}},
    "organ": {"value": "chest", "phrases": {"chest": ["chest", "lung"], "brain": ["brain", "hemisphere"]}},
    "count": {"value": "two", "phrases": {"none": ["no abnormality"], "one": ["one"], "two": ["two"]}},
    "side": {"value": "left", "phrases": {"left": ["left"], "right": ["right"]}},
    "size": {"value": "small", "phrases": {"small": ["small"], "large": ["large"]}},
}
FACT_CASES = [
    ("This is a chest X-ray. There are two small nodules in the left lung.", 5, 5, 0,
     "every slot's true value and nothing else: 5 facts, 5 stated, 5 correct"),
    ("This is a brain MRI. There is one large nodule in the right lung.", 1, 6, 5,
     "organ says brain and lung (one wrong, one right); modality, count, side, size wrong: "
     "correct 1 (organ), stated 6, contradicted 5"),
    ("There are two small nodules in the left and right lung.", 4, 5, 1,
     "no modality stated; side states left and right: correct 4, stated 5, contradicted 1"),
    ("No abnormality is seen.", 0, 1, 1, "only a count, 'none' (the phrase 'no abnormality'): contradicted"),
    ("yes", 0, 0, 0, "states nothing: no fact right, none contradicted"),
    ("An x-ray of the CHEST; two SMALL, left.", 5, 5, 0, "any case, punctuation around words"),
    ("This is a ray scan; someone's twofold leftover.", 0, 0, 0,
     "whole words only: 'ray' is not 'X-ray', 'one' is not in 'someone', 'two' not in 'twofold', 'left' not in "
     "'leftover'"),
]


@pytest.mark.parametrize("pred,correct,stated,contradicted,reason", FACT_CASES, ids=[c[4][:40] for c in FACT_CASES])
def test_fact_scores(pred, correct, stated, contradicted, reason):
    assert E.fact_scores(pred, FACTS) == {"facts": 5, "correct": correct, "stated": stated,
                                          "contradicted": contradicted}, reason


def test_score_file_description_section():
    """Questions 1-3 carry FACTS, 4 none, 5 facts but no answer (missing: left out). Sums over 1-3
    (FACT_CASES 0, 1, 2): facts 15, correct 5 + 1 + 4 = 10, stated 5 + 6 + 5 = 16, contradicted
    0 + 5 + 1 = 6. facts_correct = 10 / 15 = 66.67 %, facts_contradicted = 6 / 16 = 37.5 %."""
    qs = [SimpleNamespace(id=str(i), answer="There are two small nodules in the left lung.", answer_type="OPEN",
                          facts=FACTS) for i in (1, 2, 3, 5)]
    qs.insert(3, _q(4, "no", "CLOSED"))
    answers = [{"question_id": i, "text": FACT_CASES[i - 1][0]} for i in (1, 2, 3)]
    answers.append({"question_id": 4, "text": "no"})
    d = E.score_file(answers, qs)["description"]
    assert d["n"] == 3 and d["n_facts"] == 15 and d["n_stated"] == 16
    assert d["facts_correct"] == pytest.approx(200 / 3) and d["facts_contradicted"] == pytest.approx(37.5)
    # No question with facts: the figures are absent (None), not 0 %.
    empty = E.score_file([{"question_id": 1, "text": "yes"}], [_q(1, "yes", "CLOSED")])["description"]
    assert empty == {"n": 0, "n_facts": 0, "n_stated": 0, "facts_contradicted": None, "facts_correct": None}


def test_facts_are_read_and_bad_facts_are_named(tmp_path):
    """data.read_records passes "facts" through; a true value missing from the phrases is an
    error naming the question and slot; facts that are not an object make the record bad."""
    path = tmp_path / "q.json"
    rows = [{"id": "a", "image": "a.png", "answer_type": "OPEN", "facts": FACTS,
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]},
            {"id": "b", "image": "b.png", "answer_type": "OPEN", "facts": ["left"],
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]}]
    path.write_text(json.dumps(rows))
    records, bad = read_records(path)
    assert [r.id for r in records] == ["a"] and records[0].facts == FACTS
    assert len(bad) == 1 and bad[0].id == "b" and "'facts' must be an object" in bad[0].reason
    with pytest.raises(DataError, match=r"question q7: facts\['side'\]"):
        E.fact_scores("left", {"side": {"value": "middle", "phrases": {"left": ["left"]}}}, "q7")


# ---------------------------------------------------------------------------------------------
# The model's context: the default --max-new-tokens clamped, a question too long for it skipped
# ---------------------------------------------------------------------------------------------
def _context_run(tmp_path, capsys, ckpt, images, rows, *extra):
    """eval.py with the default --max-new-tokens (1024) on `rows`; → (summary entry, stderr, room the
    rule gives: the context less the longest prompt of at most half of it)."""
    from model import load_model
    from model.tokenizer import load_tokenizer

    questions = tmp_path / "long.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    E.main(["--model", str(ckpt), "--benchmark", f"rad={questions}", "--image-root", str(images),
            "--out", str(tmp_path / "run"), *extra])
    config, tokenizer = load_model(ckpt).config, load_tokenizer(ckpt / "tokenizer.json")
    lengths = [len(E.prompt_ids(r["text"], tokenizer, config, mode="full", template="mistral_instruct"))
               for r in rows]
    context = config.text.max_seq_len
    room = context - max(n for n in lengths if 2 * n <= context)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["benchmarks"]["rad"]
    return summary, capsys.readouterr().err, room


def test_default_max_new_tokens_is_clamped_and_long_questions_are_skipped(tiny, tmp_path, capsys):
    """The tiny model with a context of 128: 1024 new tokens are clamped, said once; an 1,800-word
    question and one whose prompt takes more than half the context are skipped and listed like a bad
    image (the second would leave room for fewer new tokens: it does not shorten every answer); the
    others are answered."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 128
    (ckpt / "config.json").write_text(json.dumps(config))
    rows = [{"question_id": i, "image": im, "text": q + "\n<image>", "gpt4_answer": a, "answer_type": t}
            for i, im, q, a, t in QUESTIONS if i in (11, 12, 15)]
    rows += [{"question_id": 30, "image": "a.png", "text": "Is there a nodule? " + "lesion " * 1800,
              "gpt4_answer": "no", "answer_type": "CLOSED"},
             {"question_id": 31, "image": "b.png", "text": "Describe it. " + "x" * 40, "gpt4_answer": "x",
              "answer_type": "OPEN"}]
    rad, err, room = _context_run(tmp_path, capsys, ckpt, tiny.images, rows)
    assert 0 < room < 128 - 50
    assert err.count(f"rad: max-new-tokens 1024 clamped to {room} (context 128)") == 1
    assert rad["max_new_tokens"] == room
    reasons = {s["question_id"]: s["reason"] for s in rad["skipped"]}
    assert list(reasons) == ["30", "31"]
    assert f"leaves fewer than {room} new tokens in the context of 128" in reasons["30"]
    assert "rad: question 30 skipped: prompt of " in err
    answered = read_jsonl(A.answers_path(tmp_path / "run", "rad", "full"))
    assert [r["question_id"] for r in answered] == [11, 12, 15]
    assert "- 30: prompt of " in (tmp_path / "run" / "report.md").read_text()


def test_shipped_base_answers_with_the_default_max_new_tokens(tmp_path, capsys):
    """assets/base (context 512) with the default 1024 new tokens: clamped, an 1,800-word question
    skipped, the other two answered."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (100, 120, 140)).save(images / "a.png")
    rows = [{"question_id": 1, "image": "a.png", "text": "Is there a nodule?", "gpt4_answer": "no",
             "answer_type": "CLOSED"},
            {"question_id": 2, "image": "a.png", "text": "Describe " + "lesion " * 1800, "gpt4_answer": "yes",
             "answer_type": "CLOSED"},
            {"question_id": 3, "image": "a.png", "text": "What organ is shown?", "gpt4_answer": "liver",
             "answer_type": "OPEN"}]
    base = Path(__file__).resolve().parents[1] / "assets" / "base"
    rad, err, room = _context_run(tmp_path, capsys, base, images, rows)
    assert err.count(f"rad: max-new-tokens 1024 clamped to {room} (context 512)") == 1
    assert [s["question_id"] for s in rad["skipped"]] == ["2"]
    assert [r["question_id"] for r in read_jsonl(A.answers_path(tmp_path / "run", "rad", "full"))] == [1, 3]


@pytest.mark.parametrize("root", [None, "images"])
def test_a_benchmark_without_one_usable_question_is_one_line(tmp_path, root):
    """Every record malformed: a one-line error naming the benchmark, with or without --image-root
    (without one, the fingerprint of its images used to fail with a TypeError)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"bad": 1}\nnot json\n')
    (tmp_path / "images").mkdir()
    argv = ["--model", str(tmp_path / "no-model"), "--benchmark", f"rad={questions}", "--out", str(tmp_path / "r")]
    argv += ["--image-root", str(tmp_path / root)] if root else []
    with pytest.raises(UserError, match=rf"benchmark 'rad' \({questions}\): no question to evaluate"):
        E.main(argv)
    assert not (tmp_path / "r").exists()
