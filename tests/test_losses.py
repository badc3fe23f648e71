"""The Stage-3 losses of train.py against values derived by hand and `--loss dpo` against DPO's
Eq. 1 written on its own (tests/oracles.py), and the oracle sequence_logprob against autograd of
the plain formula in float64.

The batch used throughout (γ = 0.1, so a log-prob difference of 10·ln 3 is a reward of ln 3):

    entry 1, K = 3:  r(y_w) = ln 3,  r(y_l1) = 0,  r(y_l2) = 0,  r(y_l3) = −ln 3
    entry 2, K = 1:  r(y_w) = 0,     r(y_l1) = 0,  y_l2 and y_l3 absent (NaN, masked)

With −log σ(ln a) = ln((1 + a)/a):  −log σ(0) = ln 2,  −log σ(ln 3) = ln(4/3),
−log σ(ln 9) = ln(10/9).

    explicit, entry 1: pairs ln 3, ln 3, ln 9     → 2·ln(4/3) + ln(10/9)
    explicit, entry 2: pair 0                     → ln 2
    implicit, entry 1: (1,2) 0, (1,3) ln 3, (2,3) ln 3 → ln 2 + 2·ln(4/3)
    implicit, entry 2: no pair                    → 0
    dpo (y_l1 only):   ln(4/3) and ln 2

Means over the two entries:
    hscr     = (4·ln(4/3) + ln(10/9) + 2·ln 2) / 2 = ln(10240/729) / 2
    explicit = (2·ln(4/3) + ln(10/9) + ln 2) / 2   = ln(320/81) / 2
    implicit = (ln 2 + 2·ln(4/3)) / 2              = ln(32/9) / 2
    dpo      = (ln(4/3) + ln 2) / 2                = ln(8/3) / 2

Gradients, from ∂/∂z [−log σ(z)] = −σ(−z) and ∂r/∂log π_θ = γ, divided by B = 2:
    dpo,  ∂L/∂log π_θ(y_w):  entry 1 −σ(−ln 3)·0.05 = −0.0125, entry 2 −σ(0)·0.05 = −0.025
    hscr, ∂L/∂log π_θ(y_l1) of entry 1: explicit +1/4, implicit (1,2) −1/2, (1,3) −1/4
          → −1/2 · 0.05 = −0.025;  of y_l3: +1/10 + 1/4 + 1/4 = 3/5 → +0.03
"""
import math

import pytest
import torch

from oracles import dpo_loss, sequence_logprob
from train import explicit_loss, implicit_loss, multilevel_loss, preference_loss, reward

LN3 = math.log(3.0)
EXPECTED = {"hscr": math.log(10240 / 729) / 2, "explicit": math.log(320 / 81) / 2,
            "implicit": math.log(32 / 9) / 2, "dpo": math.log(8 / 3) / 2}


def batch():
    """The two entries of the module docstring, as log-probs with arbitrary reference values."""
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
    pc, pr, rc, rr, mask = batch()
    loss, metrics = preference_loss(kind, pc, pr, rc, rr, mask, gamma=0.1)
    assert loss.item() == pytest.approx(EXPECTED[kind], abs=1e-12)
    assert metrics["loss"] == pytest.approx(EXPECTED[kind], abs=1e-12)
    # Absent negatives hold NaN: neither the value nor any gradient may see them.
    pc_grad, pr_grad = torch.autograd.grad(loss, (pc, pr), allow_unused=True, materialize_grads=True)
    assert torch.isfinite(pc_grad).all() and torch.isfinite(pr_grad).all()
    assert (pr_grad[1, 1:] == 0).all()


def test_gradients_by_hand():
    pc, pr, rc, rr, mask = batch()
    loss, _ = preference_loss("dpo", pc, pr, rc, rr, mask)
    pc_grad, pr_grad = torch.autograd.grad(loss, (pc, pr))
    torch.testing.assert_close(pc_grad, torch.tensor([-0.0125, -0.025], dtype=torch.float64))
    torch.testing.assert_close(pr_grad[:, 0], torch.tensor([0.0125, 0.025], dtype=torch.float64))
    assert (pr_grad[:, 1:] == 0).all()  # dpo uses y_l1 only

    pc, pr, rc, rr, mask = batch()
    loss, _ = preference_loss("hscr", pc, pr, rc, rr, mask)
    (pr_grad,) = torch.autograd.grad(loss, (pr,))
    assert pr_grad[0, 0].item() == pytest.approx(-0.025, abs=1e-12)
    assert pr_grad[0, 2].item() == pytest.approx(0.03, abs=1e-12)


def test_per_equation_functions():
    pc, pr, rc, rr, mask = batch()
    # Eq. 1 per entry, on y_l1 (the oracle of `--loss dpo`).
    torch.testing.assert_close(dpo_loss(pc, pr[:, 0], rc, rr[:, 0]).detach(),
                               torch.tensor([math.log(4 / 3), math.log(2)], dtype=torch.float64))
    r_w = reward(pc, rc).detach()
    r_l = reward(pr.detach().nan_to_num(0.0), rr.nan_to_num(0.0))
    torch.testing.assert_close(r_w, torch.tensor([LN3, 0.0], dtype=torch.float64))
    # Eq. 5 and Eq. 6 per entry (sums over pairs).
    torch.testing.assert_close(explicit_loss(r_w, r_l, mask),
                               torch.tensor([2 * math.log(4 / 3) + math.log(10 / 9), math.log(2)],
                                            dtype=torch.float64))
    torch.testing.assert_close(implicit_loss(r_l, mask),
                               torch.tensor([math.log(2) + 2 * math.log(4 / 3), 0.0], dtype=torch.float64))


def test_dpo_variant_is_eq_1():
    """preference_loss("dpo", …) (the explicit level on y_l1 only) is DPO's Eq. 1 averaged over the
    entries, in value and in gradient, whatever the other negatives hold."""
    pc, pr, rc, rr, mask = batch()
    ours, _ = preference_loss("dpo", pc, pr, rc, rr, mask)
    oracle = dpo_loss(pc, pr[:, 0], rc, rr[:, 0]).mean()
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (pc, pr)), torch.autograd.grad(oracle, (pc, pr))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_metrics_by_hand():
    pc, pr, rc, rr, mask = batch()
    _, m = multilevel_loss(pc, pr, rc, rr, mask)
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
        multilevel_loss(pc, pr, rc, rr, mask, explicit=False, implicit=False)


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
