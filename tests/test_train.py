"""train.py: the losses (Eq. 1, 5–7) against values derived by hand and DPO's Eq. 1 written on its
own; end to end on a tiny random Llava: the efficient forward against a plain one, a few
steps raise the margin, bad records and unusable images are skipped, --export-merged computes
what base + adapter computes, --resume continues exactly (past a torn metrics line) and only what
the same inputs made, an existing run is never mixed with a new one, DDP on 2 CPU processes
(gloo) equals one process with the same global batch. (SFT and --init-preset models are
demo/base.py's: tests/test_demo_base.py; the preference reader, hscr.py's stored token ids
included, is data.py's: tests/test_data.py.)"""
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import eval as E
import tiny
import train
from harness import provenance, rundir
from harness.cli import UserError, run_main
from data import Tokens, image_problem, load_pixels, read_preferences
from harness.provenance import ProvenanceError
from oracles import dpo_loss, sequence_logprob
from syncs import host_syncs
from model import load_model
from model.lora import apply_lora, load_adapter, lora_disabled, lora_modules

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The losses: the Stage-3 losses against values derived by hand and `--loss dpo` against DPO's
# Eq. 1 written on its own (tests/oracles.py), and the oracle sequence_logprob against autograd of
# the plain formula in float64.
#
# The batch used throughout (γ = 0.1, so a log-prob difference of 10·ln 3 is a reward of ln 3):
#
#     entry 1, K = 3:  r(y_w) = ln 3,  r(y_l1) = 0,  r(y_l2) = 0,  r(y_l3) = −ln 3
#     entry 2, K = 1:  r(y_w) = 0,     r(y_l1) = 0,  y_l2 and y_l3 absent (NaN, masked)
#
# With −log σ(ln a) = ln((1 + a)/a):  −log σ(0) = ln 2,  −log σ(ln 3) = ln(4/3),
# −log σ(ln 9) = ln(10/9).
#
#     explicit, entry 1: pairs ln 3, ln 3, ln 9     → 2·ln(4/3) + ln(10/9)
#     explicit, entry 2: pair 0                     → ln 2
#     implicit, entry 1: (1,2) 0, (1,3) ln 3, (2,3) ln 3 → ln 2 + 2·ln(4/3)
#     implicit, entry 2: no pair                    → 0
#     dpo (y_l1 only):   ln(4/3) and ln 2
#
# Means over the two entries:
#     hscr     = (4·ln(4/3) + ln(10/9) + 2·ln 2) / 2 = ln(10240/729) / 2
#     explicit = (2·ln(4/3) + ln(10/9) + ln 2) / 2   = ln(320/81) / 2
#     implicit = (ln 2 + 2·ln(4/3)) / 2              = ln(32/9) / 2
#     dpo      = (ln(4/3) + ln 2) / 2                = ln(8/3) / 2
#
# Gradients, from ∂/∂z [−log σ(z)] = −σ(−z) and ∂r/∂log π_θ = γ, divided by B = 2:
#     dpo,  ∂L/∂log π_θ(y_w):  entry 1 −σ(−ln 3)·0.05 = −0.0125, entry 2 −σ(0)·0.05 = −0.025
#     hscr, ∂L/∂log π_θ(y_l1) of entry 1: explicit +1/4, implicit (1,2) −1/2, (1,3) −1/4
#           → −1/2 · 0.05 = −0.025;  of y_l3: +1/10 + 1/4 + 1/4 = 3/5 → +0.03

LN3 = math.log(3.0)
EXPECTED = {"hscr": math.log(10240 / 729) / 2, "explicit": math.log(320 / 81) / 2,
            "implicit": math.log(32 / 9) / 2, "dpo": math.log(8 / 3) / 2}


def loss_batch():
    """The two entries described above, as log-probs with arbitrary reference values."""
    nan = float("nan")
    ref_chosen = torch.tensor([-12.0, -30.0], dtype=torch.float64)
    ref_rejected = torch.tensor([[-20.0, -25.0, -18.0], [-40.0, nan, nan]], dtype=torch.float64)
    r_chosen = torch.tensor([LN3, 0.0], dtype=torch.float64)
    r_rejected = torch.tensor([[0.0, 0.0, -LN3], [0.0, nan, nan]], dtype=torch.float64)
    policy_chosen = (ref_chosen + 10 * r_chosen).requires_grad_()
    policy_rejected = (ref_rejected + 10 * r_rejected).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_loss_values_by_hand(kind):
    pc, pr, rc, rr, mask = loss_batch()
    loss, metrics = train.preference_loss(kind, pc, pr, rc, rr, mask, gamma=0.1)
    assert loss.item() == pytest.approx(EXPECTED[kind], abs=1e-12)
    assert metrics["loss"] == pytest.approx(EXPECTED[kind], abs=1e-12)
    # Absent negatives hold NaN: neither the value nor any gradient may see them.
    pc_grad, pr_grad = torch.autograd.grad(loss, (pc, pr), allow_unused=True, materialize_grads=True)
    assert torch.isfinite(pc_grad).all() and torch.isfinite(pr_grad).all()
    assert (pr_grad[1, 1:] == 0).all()


def test_gradients_by_hand():
    pc, pr, rc, rr, mask = loss_batch()
    loss, _ = train.preference_loss("dpo", pc, pr, rc, rr, mask)
    pc_grad, pr_grad = torch.autograd.grad(loss, (pc, pr))
    torch.testing.assert_close(pc_grad, torch.tensor([-0.0125, -0.025], dtype=torch.float64))
    torch.testing.assert_close(pr_grad[:, 0], torch.tensor([0.0125, 0.025], dtype=torch.float64))
    assert (pr_grad[:, 1:] == 0).all()  # dpo uses y_l1 only

    pc, pr, rc, rr, mask = loss_batch()
    loss, _ = train.preference_loss("hscr", pc, pr, rc, rr, mask)
    (pr_grad,) = torch.autograd.grad(loss, (pr,))
    assert pr_grad[0, 0].item() == pytest.approx(-0.025, abs=1e-12)
    assert pr_grad[0, 2].item() == pytest.approx(0.03, abs=1e-12)


def test_per_equation_functions():
    pc, pr, rc, rr, mask = loss_batch()
    # Eq. 1 per entry, on y_l1 (the oracle of `--loss dpo`).
    torch.testing.assert_close(dpo_loss(pc, pr[:, 0], rc, rr[:, 0]).detach(),
                               torch.tensor([math.log(4 / 3), math.log(2)], dtype=torch.float64))
    r_w = train.reward(pc, rc).detach()
    r_l = train.reward(pr.detach().nan_to_num(0.0), rr.nan_to_num(0.0))
    torch.testing.assert_close(r_w, torch.tensor([LN3, 0.0], dtype=torch.float64))
    # Eq. 5 and Eq. 6 per entry (sums over pairs).
    torch.testing.assert_close(train.explicit_loss(r_w, r_l, mask),
                               torch.tensor([2 * math.log(4 / 3) + math.log(10 / 9), math.log(2)],
                                            dtype=torch.float64))
    torch.testing.assert_close(train.implicit_loss(r_l, mask),
                               torch.tensor([math.log(2) + 2 * math.log(4 / 3), 0.0], dtype=torch.float64))


def test_dpo_variant_is_eq_1():
    """train.preference_loss("dpo", …) (the explicit level on y_l1 only) is DPO's Eq. 1 averaged over the
    entries, in value and in gradient, whatever the other negatives hold."""
    pc, pr, rc, rr, mask = loss_batch()
    ours, _ = train.preference_loss("dpo", pc, pr, rc, rr, mask)
    oracle = dpo_loss(pc, pr[:, 0], rc, rr[:, 0]).mean()
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (pc, pr)), torch.autograd.grad(oracle, (pc, pr))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_metrics_by_hand():
    pc, pr, rc, rr, mask = loss_batch()
    _, m = train.multilevel_loss(pc, pr, rc, rr, mask)
    # Explicit pairs: margins ln 3, ln 3, ln 9 (entry 1) and 0 (entry 2, not > 0).
    assert m["margin"] == pytest.approx((4 * LN3) / 4)
    assert m["accuracy_explicit"] == pytest.approx(3 / 4)
    # Implicit pairs of entry 1: 0 (not > 0), ln 3, ln 3.
    assert m["accuracy_implicit"] == pytest.approx(2 / 3)
    assert m["reward_chosen"] == pytest.approx(LN3 / 2)
    assert m["reward_rejected"] == pytest.approx(-LN3 / 4)
    assert m["reward_rejected_1"] == pytest.approx(0.0)
    assert m["reward_rejected_3"] == pytest.approx(-LN3)
    assert m["loss_explicit"] == pytest.approx(EXPECTED["explicit"])
    assert m["loss_implicit"] == pytest.approx(EXPECTED["implicit"])
    with pytest.raises(ValueError):
        train.multilevel_loss(pc, pr, rc, rr, mask, explicit=False, implicit=False)


def naive_sequence_logprob(logits, labels, mask):
    logp = torch.log_softmax(logits.double(), dim=-1)                      # (B, T, V)
    token = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)    # (B, T)
    return (token * mask).sum(1)


@pytest.mark.parametrize("chunk_rows", [1, 3, 512])
def test_sequence_logprob_matches_autograd(chunk_rows):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[2] = False                     # a sequence with no response token: log-prob 0
    labels[~mask] = -100                # never read outside the mask
    upstream = torch.randn(B, generator=g, dtype=torch.float64)

    ours = sequence_logprob(logits, labels, mask, chunk_rows=chunk_rows)
    (ours_grad,) = torch.autograd.grad(ours, logits, upstream)
    ref = naive_sequence_logprob(logits, labels, mask)
    (ref_grad,) = torch.autograd.grad(ref, logits, upstream)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert ours[2] == 0 and (ours_grad[2] == 0).all()


def test_sequence_logprob_by_hand_and_low_precision():
    # Uniform logits: each of n response tokens has log-prob −ln V.
    logits = torch.zeros(2, 5, 8)
    labels = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(sequence_logprob(logits, labels, mask),
                               torch.tensor([-3 * math.log(8), -4 * math.log(8)]))
    # bf16 logits: fp32 result from the upcast values, gradient in bf16.
    g = torch.Generator().manual_seed(1)
    lowp = torch.randn(2, 5, 8, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 8, (2, 5), generator=g)
    out = sequence_logprob(lowp, labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_sequence_logprob(lowp.detach(), labels, mask))
    out.sum().backward()
    assert lowp.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        sequence_logprob(logits, labels[:, :4], mask)


# ---------------------------------------------------------------------------------------------
# train.py end to end on a tiny random Llava

WORDS = ("[ INST ] [/ what is shown in the image ? which side lesion mass left right upper lower lobe lung "
         "liver kidney brain normal there a no yes of fracture effusion").split()


def word_tokenizer() -> Tokenizer:
    """Word-level tokenizer over WORDS (ids 3…, far below the tiny model's image token 120)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


HEADER = json.dumps({"_header": True, "options": {}}) + "\n"  # hscr.py's first line


def preference_records(n: int) -> list[dict]:
    organs = ["lung", "liver", "kidney", "brain"]
    sides = ["left", "right", "upper", "lower"]
    out = []
    for i in range(n):
        organ, side = organs[i % 4], sides[i % 4]  # learnable: the side follows from the organ
        wrong = [s for s in sides if s != side]
        out.append({"id": f"e{i}", "image": f"img{i % 3}.png", "question": f"which side of the {organ} ?",
                    # hscr.py also stores the prompt text; train.py builds it when absent.
                    **({"prompt": f"[INST] <image>\nwhich side of the {organ} ? [/INST]"} if i % 2 else {}),
                    "chosen": f"the lesion is in the {side} {organ}",
                    "negatives": [{"text": f"the lesion is in the {w} {organ}", "similarity": 0.9 - 0.2 * j}
                                  for j, w in enumerate(wrong[: 1 + i % 3])]})  # K = 1, 2, 3
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ckpt = tiny.save_layout(tiny.hf_tiny_llava("llama", seed=0), root / "ckpt", "llava-hf")
    word_tokenizer().save(str(ckpt / "tokenizer.json"))
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{k}.png")
    prefs = root / "prefs.jsonl"
    prefs.write_text(HEADER + "".join(json.dumps(r) + "\n" for r in preference_records(12)))
    return root, ckpt, prefs


def config(workspace, out, **kw) -> train.TrainConfig:
    root, ckpt, prefs = workspace
    base = dict(model=str(ckpt), data=str(prefs), out=str(out), batch_size=4, micro_batch=4, epochs=2,
                lr=5e-3, lora_rank=4, lora_alpha=8, eval_fraction=0.0, eval_every=0, save_every=0, plot=False,
                warmup_ratio=0.0)
    return train.TrainConfig(**{**base, **kw})


def test_efficient_forward_matches_plain(workspace):
    """row_logprobs (image encoded once, hidden states at response positions, chunked
    projection) equals a plain forward per response with full logits, in value and gradient."""
    root, ckpt, prefs = workspace
    model = load_model(ckpt)
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    tokens = Tokens(word_tokenizer(), model.config)
    cfg = config(workspace, root / "unused")
    examples, bad = read_preferences(prefs, root, tokens, cfg)
    assert not bad
    batch = examples[:2]  # K = 1 and K = 2
    rows = train.collate(batch, pad_id=0)
    pixels = train.batch_pixels(batch, model.config.vision.image_size)
    ours = train.row_logprobs(model, model, rows, pixels, chunk_rows=5)
    ours_grad = torch.autograd.grad(ours.sum(), model.language_model.layers[0].self_attn.q_proj.lora_B.weight)[0]

    plain = []
    for b, ex in enumerate(batch):
        for ids, target in zip(ex.rows, ex.targets):
            logits = model(torch.tensor([ids]), pixels[b:b + 1])[0]               # (T, V)
            t = torch.tensor([i for i, on in enumerate(target) if on])
            plain.append(torch.log_softmax(logits[t - 1], -1).gather(1, torch.tensor(ids)[t, None]).sum())
    plain = torch.stack(plain)
    plain_grad = torch.autograd.grad(plain.sum(), model.language_model.layers[0].self_attn.q_proj.lora_B.weight)[0]
    assert ours.shape == (sum(len(ex.rows) for ex in batch),)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_training_step_syncs_do_not_grow(workspace):
    """One training step's host syncs (tests/syncs.py: forward, loss, backward, the step's metrics
    read once) are as many for 3 entries as for 9, K = 3 levels in both. Before: 44 and 44, 28 of them
    the metrics' (batch_loss's and the step's: .item() ×7, per level .any() and .item())."""
    root, ckpt, prefs = workspace
    model = load_model(ckpt)
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    cfg = config(workspace, root / "unused", image_aspect="pad")
    examples, _ = read_preferences(prefs, root, Tokens(word_tokenizer(), model.config), cfg)
    ref = {ex.id: [0.0] * len(ex.rows) for ex in examples}
    ctx = train.Context()

    def step(batch):
        loss, parts = train.batch_loss(model, model, batch, ref, cfg, ctx)
        loss.backward()
        return train.preference_loss(cfg.loss, *parts[:4], parts[4].bool(), gamma=cfg.gamma)[1]

    counts = [host_syncs(lambda: step(examples[:n])) for n in (3, 9)]
    assert [n for n, _ in counts] == [16, 16] and "reward_rejected_3" in counts[1][1]


def test_hidden_logprob_matches_sequence_logprob():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) < 0.7
    ours = train.hidden_logprob(hidden, weight, labels, mask, chunk_rows=2)
    ref = sequence_logprob(hidden @ weight.T, labels, mask)
    torch.testing.assert_close(ours.double(), ref.double())
    g1, = torch.autograd.grad(ours.sum(), hidden)
    g2, = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(g1, g2)


def test_steps_raise_margin_and_bad_records_are_skipped(workspace, tmp_path):
    root, ckpt, prefs = workspace
    data = tmp_path / "prefs.jsonl"
    good = preference_records(12)
    bad = [{"id": "no-chosen", "image": "img0.png", "question": "what is shown ?", "negatives": ["a"]},
           {"id": "no-image", "image": "missing.png", "question": "what ?", "chosen": "a", "negatives": ["b"]},
           {"id": "escape", "image": "../img0.png", "question": "what ?", "chosen": "a", "negatives": ["b"]},
           {"id": "no-negatives", "image": "img0.png", "question": "what ?", "chosen": "a", "negatives": []}]
    data.write_text(HEADER + "".join(json.dumps(r) + "\n" for r in good[:5] + bad + good[5:]) + "{not json\n")
    for k in range(3):
        (tmp_path / f"img{k}.png").write_bytes((root / f"img{k}.png").read_bytes())
    out = tmp_path / "run"
    last = train.train(config(workspace, out, data=str(data), eval_data=str(data), epochs=4, lr=3e-3, lora_alpha=32,
                              export_merged=True))
    skipped = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    # Each bad record is skipped twice (train and eval read the same file) with its reason.
    reasons = {r["id"]: r["reason"] for r in skipped}
    assert set(reasons) == {"no-chosen", "no-image", "escape", "no-negatives", None}
    assert "chosen" in reasons["no-chosen"] and "not found" in reasons["no-image"]
    assert "escapes" in reasons["escape"] and "negatives" in reasons["no-negatives"]
    assert "JSON" in reasons[None]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    # B = 0 at the first step: policy = reference (up to the float effects of another padding),
    # every pair costs ln 2; entry e_i has K = 1 + i % 3 negatives, K explicit + K(K−1)/2 implicit
    # pairs, and the first batch is the first 4 of the epoch's seeded permutation.
    first = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:4].tolist()
    pairs = sum(1 + i % 3 + (1 + i % 3) * (i % 3) / 2 for i in first)
    assert metrics[0]["margin"] == pytest.approx(0, abs=1e-4)
    assert metrics[0]["loss"] == pytest.approx(pairs / 4 * math.log(2), abs=1e-4)
    # Held-out (here: the same entries) before training every pair costs ln 2: K = 1, 2, 3 give
    # 1, 3, 6 pairs, a mean of 10/3 per entry. Twelve steps lower it and open a margin.
    assert last["eval_loss"] < 10 / 3 * math.log(2) - 0.05
    assert last["eval_margin"] > 0.02 and last["eval_accuracy_explicit"] > 0.6
    # The reference log-probs were cached beside the data file and are what π_ref gives.
    (cache_file,) = tmp_path.glob("prefs.reflogp-*.json")
    cache = json.loads(cache_file.read_text())["logp"]
    assert set(cache) == {r["id"] for r in good}
    # The adapter was saved in PEFT's format and disabling it gives the reference again.
    model = load_model(ckpt)
    load_adapter(model, out / "adapter")
    tokens = Tokens(word_tokenizer(), model.config)
    examples, _ = read_preferences(data, tmp_path, tokens, config(workspace, out))
    ex = examples[0]
    with torch.no_grad(), lora_disabled(model):
        ref = train.row_logprobs(model, model, train.collate([ex], 0), train.batch_pixels([ex], 28), 64)
    torch.testing.assert_close(ref, torch.tensor(cache[ex.id]), rtol=1e-5, atol=1e-4)
    # --export-merged: the input's keys and config; it computes what base + adapter computes.
    assert sorted(load_file(out / "merged" / "model.safetensors")) == sorted(load_file(ckpt / "model.safetensors"))
    ids, mask, pixels = tiny.batch_inputs()
    torch.testing.assert_close(load_model(out / "merged")(ids, pixels, mask), model.eval()(ids, pixels, mask),
                               rtol=1e-4, atol=1e-4)
    # ... with the tokenizer training read: eval.py runs on it as it runs on a base checkpoint.
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"img{i}.png", "text": "which side ?",
                                             "gpt4_answer": "left", "answer_type": "OPEN"}) + "\n"
                                 for i in range(2)))
    E.main(["--model", str(out / "merged"), "--benchmark", f"q={questions}", "--image-root", str(tmp_path),
            "--out", str(tmp_path / "eval"), "--max-new-tokens", "2"])
    assert len((tmp_path / "eval" / "q" / "answers.jsonl").read_text().splitlines()) == 2


def adapter_tensors(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_resume_continues_exactly(workspace, tmp_path):
    full = tmp_path / "full"
    # Micro-batch 2: two accumulation steps per optimizer step.
    train.train(config(workspace, full, save_every=2, micro_batch=2))
    part = tmp_path / "part"
    train.train(config(workspace, part, save_every=2, micro_batch=2, max_steps=3))  # "interrupted" after step 3
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-000003"
    with open(part / "metrics.jsonl", "a") as f:  # killed while writing step 4's line
        f.write('{"step": 4, "loss": 0.6')
    train.train(config(workspace, part, save_every=2, micro_batch=2, resume=True))
    a, b = adapter_tensors(full), adapter_tensors(part)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    with pytest.raises(ProvenanceError, match="option lr: 0.005 in the file, 0.001 now"):
        train.train(config(workspace, part, micro_batch=2, lr=1e-3, resume=True))


@pytest.mark.slow
def test_ddp_two_processes_match_one(workspace, tmp_path):
    """torchrun with 2 CPU processes (gloo), micro-batch 1 and so 2 accumulation steps each,
    equals 1 process with micro-batch 4 (same global batch of 4, no dropout): same adapter up to
    float summation order."""
    root, ckpt, prefs = workspace
    single = tmp_path / "single"
    train.train(config(workspace, single, lora_dropout=0.0, epochs=1))
    ddp = tmp_path / "ddp"
    args = ["--model", str(ckpt), "--data", str(prefs), "--out", str(ddp), "--batch-size", "4", "--micro-batch", "1",
            "--epochs", "1", "--lr", "5e-3", "--lora-rank", "4", "--lora-alpha", "8", "--eval-fraction", "0",
            "--eval-every", "0", "--save-every", "0", "--no-plot", "--warmup-ratio", "0", "--lora-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = adapter_tensors(single), adapter_tensors(ddp)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    m1 = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-4)


def test_cli_help(capsys):
    """`--help` is the manual of the embedded demo (what `python train.py` runs with no arguments)
    and says how to reach the trainer's; `train --help` is the trainer's manual."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--align" in out and "--loss" in out and "--lora-rank" not in out
    assert "python train.py train --help" in out
    for argv in (["train", "--help"], ["--model", "m", "--help"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and "--lora-rank" in out and "--align" not in out


@pytest.mark.parametrize("argv, trainer", [
    ([], False), (["demo", "--num-candidates", "1"], False), (["ablation"], False), (["--num-candidates", "1"], False),
    (["train"], True), (["--model", "ckpt", "--data", "prefs.jsonl"], True), (["--data=prefs.jsonl"], True),
    (["--stage", "sft", "--data", "d"], True)])
def test_cli_dispatch(argv, trainer):
    """The trainer gets `train …` and any argument list holding one of its own options (the
    README's `python train.py --model … --data …`); everything else runs the demo."""
    assert train.wants_trainer(argv) == trainer


def test_trainer_options_parse_as_typed(capsys):
    """Options built from TrainConfig: `int | None` parses as int, flags as booleans; a missing
    --data, and the options that moved to demo/base.py (SFT, --full, --init-preset), are reported
    in one line (exit status 2)."""
    cfg = train.TrainConfig(**vars(train.build_parser().parse_args(
        ["--model", "m", "--data", "d", "--max-steps", "7", "--lr", "1e-3", "--no-plot", "--dtype", "bfloat16",
         "--num-negatives", "2"])))
    assert (cfg.max_steps, cfg.lr, cfg.plot, cfg.dtype, cfg.negatives) == (7, 1e-3, False, "bfloat16", 2)
    for argv, message in ((["train", "--model", "m"], "--data is required"),
                          (["--stage", "sft", "--data", "d"], "python -m demo.base"),
                          (["train", "--model", "m", "--data", "d", "--full"], "python -m demo.base"),
                          (["--init-preset=tiny", "--data", "d"], "python -m demo.base")):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_takes_the_model_that_made_the_preferences(workspace, tmp_path, monkeypatch, capsys):
    """HSCR is on-policy. Without --model and --image-root, train.py trains the model and reads the images
    that the preference file's header records; the same weights elsewhere are the same model; another
    model (by content) stops before the model loads, in one line naming both, unless --allow-other-model
    (off-policy, e.g. DPO on another model's preferences). A file that records no model needs --model."""
    root, ckpt, prefs = workspace
    made = provenance.fingerprint(model=provenance.Dir(ckpt), **{"vision tower": None},
                                  images=provenance.Files(root, ["img0.png"]))
    data = tmp_path / "data" / "prefs.jsonl"  # not beside the images: their root comes from the header
    data.parent.mkdir()
    data.write_text(json.dumps({"_header": True, "options": {}, "provenance": made}) + "\n"
                    + "".join(json.dumps(r) + "\n" for r in preference_records(12)))
    copy, other = tmp_path / "copy", tmp_path / "other"
    shutil.copytree(ckpt, copy)
    tiny.save_layout(tiny.hf_tiny_llava("llama", seed=1), other, "llava-hf")
    shutil.copy(ckpt / "tokenizer.json", other)

    class Loaded(Exception):
        pass

    loaded = []

    def load(path, **kw):
        loaded.append(path)
        raise Loaded

    monkeypatch.setattr(train, "load_model", load)
    for model in (None, str(copy)):
        with pytest.raises(Loaded):
            train.train(config(workspace, tmp_path / f"run-{len(loaded)}", model=model, data=str(data)))
    assert loaded == [str(ckpt.resolve()), str(copy)]
    argv = ["--model", str(other), "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "4",
            "--micro-batch", "4", "--eval-fraction", "0"]
    capsys.readouterr()
    assert run_main(train.main, argv) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and "--allow-other-model" in err[0], err
    assert f"--data {data} comes from another model: {ckpt.resolve()}, not {other.resolve()}" in err[0]
    with pytest.raises(Loaded):
        train.main(argv + ["--allow-other-model"])
    with pytest.raises(UserError, match=f"^--model is required: --data {prefs} does not record its model$"):
        train.train(config(workspace, tmp_path / "run", model=None))


# ---------------------------------------------------------------------------------------------
# One run per --out, and what made it (issue #16); bad input never stops the job (issue #14)


def short(workspace, out, **kw) -> train.TrainConfig:
    """A one-epoch run of 3 steps (12 entries, batch 4)."""
    return config(workspace, out, epochs=1, **kw)


def test_existing_run_is_refused_and_overwrite_starts_clean(workspace, tmp_path, capsys):
    """A second run into an --out that holds one stops with one line naming the directory and
    both ways on (exit status 2 from the command line); --overwrite deletes what the run's record
    lists (a stray checkpoint of another run in its checkpoints/ included) and refuses while a user's
    file is there; --resume without a checkpoint is refused."""
    root, ckpt, prefs = workspace
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint to continue from"):
        train.train(short(workspace, out, resume=True))
    train.train(short(workspace, out))
    with pytest.raises(UserError, match=f"{out} holds a training run .*--resume.*--overwrite"):
        train.train(short(workspace, out))
    args = ["--model", str(ckpt), "--data", str(prefs), "--out", str(out), "--batch-size", "4", "--micro-batch", "4"]
    capsys.readouterr()
    assert run_main(train.main, args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "holds a training run" in err and "--overwrite" in err

    (out / "checkpoints" / "step-000099").mkdir()  # as if another run had gone further
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="lists as written by a run of this project: notes.txt; move them"):
        train.train(short(workspace, out, overwrite=True))
    (out / "notes.txt").unlink()
    train.train(short(workspace, out, overwrite=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    record = provenance.load(out / "provenance.json")
    assert record["made_by"] == "train.py" and len(record["sessions"]) == 1
    fp = record["fingerprint"]
    assert fp["images"]["n"] == 3 and fp["batch_size"] == 4 and fp["num_negatives"] == 3
    # Inputs by content, dtype and autocast as resolved, the number of processes; neither paths
    # (out, image_root, …) nor resumable options (max_steps, …).
    assert fp["data"]["kind"] == "file" and fp["model"]["kind"] == "dir"
    assert (fp["dtype"], fp["autocast"], fp["world_size"]) == ("float32", False, 1)
    left_out = {"out", "image_root", "eval_data", "max_steps", "save_every", "resume", "device",
                "check_finite"}
    assert not left_out & set(fp)


def test_resume_stops_when_the_model_changed(workspace, tmp_path):
    """--resume after the base model's weights changed stops and names the weights file; without
    provenance.json it stops too, and so does --overwrite: no record says the files are the run's."""
    root, ckpt, prefs = workspace
    model = tmp_path / "ckpt"
    model.mkdir()
    for f in ckpt.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    train.train(short(workspace, out, model=str(model), max_steps=1))
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ProvenanceError, match=r"model weights \(model.safetensors\) changed.*--overwrite"):
        train.train(short(workspace, out, model=str(model), resume=True))
    (out / "provenance.json").unlink()  # a user deleted the record: what made the run cannot be checked
    for again in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(UserError, match=f"^{out} holds what no provenance.json there .*: adapter, "):
            train.train(short(workspace, out, model=str(model), **again))


def test_resume_keeps_a_finished_run_unless_its_adapter_was_written_again(workspace, tmp_path, monkeypatch, capsys):
    """provenance.json records the end of a run: its last step and the digest of the adapter it
    wrote. --resume of a run finished at this run's last step loads nothing and writes nothing
    (the demo's reuse); an adapter written again since, or a last step below the one trained,
    stops it naming why. A missing adapter is written again from the last checkpoint, and a run
    interrupted before its first checkpoint starts again from step 0: the same adapter."""
    out = tmp_path / "run"
    train.train(short(workspace, out))
    weights = out / "adapter" / "adapter_model.safetensors"
    trained = weights.read_bytes()
    record = provenance.load(out / "provenance.json")
    assert record["finished"]["step"] == 3
    assert provenance.load(out / "adapter" / "provenance.json")["fingerprint"] == record["fingerprint"]
    assert record["finished"]["outputs"] == provenance.fingerprint(adapter=provenance.Dir(out / "adapter"))

    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        m.setattr(train, "load_model", lambda *a, **k: pytest.fail("a finished run is loaded again"))
        capsys.readouterr()
        assert train.train(short(workspace, out, resume=True)) == {"step": 3, "reused": True}
        assert f"reused: {out / 'adapter'}" in capsys.readouterr().out
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
        with pytest.raises(ProvenanceError, match=r"steps: 3 trained, 2 now.*--overwrite"):
            train.train(short(workspace, out, resume=True, max_steps=2))
        save_file({k: v + 1 for k, v in load_file(weights).items()}, weights)
        with pytest.raises(ProvenanceError, match=r"adapter weights \(adapter_model.safetensors\) changed since "
                                                  r"train.py wrote it.*--overwrite"):
            train.train(short(workspace, out, resume=True))

    shutil.rmtree(out / "adapter")  # killed before the adapter was written: from the checkpoint
    train.train(short(workspace, out, resume=True))
    assert weights.read_bytes() == trained and provenance.load(out / "provenance.json")["finished"]["step"] == 3
    for name in ("adapter", "checkpoints"):  # killed before the first checkpoint: from step 0
        shutil.rmtree(out / name)
    record = provenance.load(out / "provenance.json")
    provenance.save(out / "provenance.json", record["fingerprint"], made_by="train.py",
                    sessions=record["sessions"], wrote=record["wrote"])
    train.train(short(workspace, out, resume=True))
    assert weights.read_bytes() == trained
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint(workspace, tmp_path, monkeypatch):
    """Issue #24 item 1: NaN weights (one NaN in a q_proj weight) were trained on at every step and
    the adapter saved. The loader refuses them; let through (--no-check-finite), the run stops at
    step 1 naming it. A gradient gone NaN at step 2 stops the run there, before anything of the step
    is logged or saved: step 1's checkpoint stays the latest, and no adapter is written."""
    root, ckpt, prefs = workspace
    poisoned = shutil.copytree(ckpt, tmp_path / "ckpt")
    weights = load_file(poisoned / "model.safetensors")
    weights["model.language_model.layers.0.self_attn.q_proj.weight"][0, 0] = math.nan
    save_file(weights, poisoned / "model.safetensors")
    with pytest.raises(UserError, match=r"1 of \d+ tensors hold NaN or Inf .*layers\.0\.self_attn\.q_proj\."):
        train.train(short(workspace, tmp_path / "refused", model=str(poisoned)))
    with pytest.raises(UserError, match=r"^step 1: loss nan"):
        train.train(short(workspace, tmp_path / "nan", model=str(poisoned), check_finite=False))

    real, calls = train.batch_loss, []

    def nan_at_step_2(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(loss)
        return loss * (math.nan if len(calls) == 2 else 1.0), parts
    monkeypatch.setattr(train, "batch_loss", nan_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=rf"^step 2: loss [0-9.]+, gradient norm nan; stopped, .*{out} keeps "
                                        "the last good checkpoint"):
        train.train(short(workspace, out, save_every=1))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert not (out / "adapter").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def png_bytes(size=(20, 24), seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    image = Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_unusable_images_are_skipped_and_named(workspace, tmp_path, monkeypatch, capsys):
    """A corrupt, empty, truncated (PNG: checksum; JPEG: found only by decoding) or oversized
    image skips its record: it is in bad_records.jsonl with file, line, id and the image's
    problem, counted on the console, and the other 12 entries train (3 steps)."""
    root, ckpt, prefs = workspace
    for k in range(3):
        (tmp_path / f"img{k}.png").write_bytes((root / f"img{k}.png").read_bytes())
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "empty.png").write_bytes(b"")
    png = png_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize((64, 64)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 3 // 4])
    assert image_problem(tmp_path / "cut.jpg") is None  # the cheap look misses it: decoding finds it
    # pillow refuses images above 2 × MAX_IMAGE_PIXELS: 120² = 14400 > 2 × 5000 (the others: 480, 64² = 4096).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    (tmp_path / "bomb.png").write_bytes(png_bytes((120, 120)))
    bad_images = ["corrupt.png", "empty.png", "cut.png", "cut.jpg", "bomb.png"]
    bad = [{**r, "id": f"bad-{name}", "image": name} for r, name in zip(preference_records(5), bad_images)]
    records = preference_records(12)
    records = records[:4] + bad + records[4:]
    data = tmp_path / "prefs.jsonl"
    data.write_text(HEADER + "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    train.train(short(workspace, out, data=str(data)))
    skipped = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    assert [(s["id"], s["index"], s["file"]) for s in skipped] == \
        [(f"bad-{name}", 5 + i, str(data)) for i, name in enumerate(bad_images)]  # line 0 is the header
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert reasons["bad-empty.png"] == "image empty.png: empty file"
    assert "decompression-bomb" in reasons["bad-bomb.png"] and "truncated" in reasons["bad-cut.jpg"]
    assert all(r.startswith(f"image {name}: ") for name, r in zip(bad_images, reasons.values()))
    assert "12 training entries, 0 held out, 5 skipped" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_non_utf8_preference_file_names_the_byte(workspace, tmp_path, capsys):
    """A byte that is not UTF-8 ends the run with one line naming the file and its offset."""
    root, ckpt, prefs = workspace
    text = prefs.read_bytes()
    offset = text.index(b"lesion")
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(text[:offset] + b"\xff" + text[offset + 1:])
    assert run_main(train.main, ["--model", str(ckpt), "--data", str(data), "--image-root", str(root),
                                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert str(data) in errors[0] and f"byte 0xff at offset {offset}" in errors[0]


def hscr_file(path: Path, records: list[dict], tokenizer_sha256: str, **options) -> None:
    """A preference file as hscr.py writes it (docs/FORMATS.md): a header whose provenance names
    the tokenizer by the digest of what it does, and records holding their responses' token ids."""
    header = {"_header": True, "options": options,
              "provenance": {"tokenizer": {"kind": "content", "n": None, "sha256": tokenizer_sha256}}}
    path.write_text("".join(json.dumps(r) + "\n" for r in [header] + records))


def test_image_aspect_from_the_header_reaches_preprocessing(workspace, tmp_path, monkeypatch, capsys):
    """Preference data made with --image-aspect resize is trained on resized images (every
    preprocess_image call of the run gets aspect="resize") and the choice is said; an explicit
    --image-aspect wins; without a header the default is pad."""
    root, ckpt, prefs = workspace
    data = tmp_path / "prefs.jsonl"
    hscr_file(data, preference_records(12), "0" * 64, image_aspect="resize")
    for k in range(3):
        (tmp_path / f"img{k}.png").write_bytes((root / f"img{k}.png").read_bytes())
    aspects = []
    real = load_pixels
    monkeypatch.setattr("data.load_pixels", lambda path, size, aspect: aspects.append(aspect) or real(path, size, aspect))
    train.train(short(workspace, tmp_path / "run", data=str(data), max_steps=1))
    assert len(aspects) > 3 and set(aspects) == {"resize"}
    assert "--image-aspect resize, as hscr.py made prefs.jsonl" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_aspect"] == "resize"
    assert rundir.resolve_image_aspect("pad", data)[0] == "pad"
    assert rundir.resolve_image_aspect(None, prefs)[0] == "pad"
