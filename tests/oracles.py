"""Test oracles: independent ways of computing what the code under test computes.

`sequence_logprob` is log π(y|i,x) from full logits (B, T, V), with a hand-written backward that
keeps no fp32 copy of the logits. train.py computes the same quantity from hidden states instead
(train.hidden_logprob, chunked and checkpointed); tests check the two against each other and
this one against autograd of the plain formula in float64 (tests/test_train.py).

`dpo_loss` is DPO's loss (Eq. 1) written on its own; train.py's `--loss dpo` is the explicit
level on y_l1 only (`preference_loss("dpo", …)`), and tests/test_train.py checks the two agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SequenceLogprob(torch.autograd.Function):
    """Σ_t mask[t] · log softmax(logits[t])[labels[t]], computed in fp32 chunks of rows.

    Autograd of the plain formula would keep an fp32 copy of the (B, T, V) logits and a
    log-softmax of the same size for the backward pass. Here only the logits (in their own
    dtype) and one log-sum-exp per row are kept; the backward recomputes softmax per chunk:
        ∂/∂logits[t, v] = g · mask[t] · ( 1[v = labels[t]] − softmax(logits[t])[v] ).
    Rows outside the mask are never touched, so their labels may hold anything (e.g. -100).
    """

    @staticmethod
    def forward(ctx, logits, labels, mask, chunk_rows):
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)                          # (B·T, V)
        rows = mask.reshape(B * T).nonzero().squeeze(1)          # (R,) positions that count
        targets = labels.reshape(B * T)[rows]                    # (R,)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
        token_logp = torch.empty_like(lse)
        for s in range(0, rows.numel(), chunk_rows):
            x = flat[rows[s:s + chunk_rows]].float()             # (C, V)
            lse[s:s + chunk_rows] = torch.logsumexp(x, dim=-1)
            token_logp[s:s + chunk_rows] = x.gather(1, targets[s:s + chunk_rows, None]).squeeze(1)
        token_logp -= lse
        # Sum per sequence: row r belongs to sequence rows[r] // T.
        out = torch.zeros(B, dtype=torch.float32, device=logits.device)
        out.index_add_(0, rows // T, token_logp)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, targets, lse = ctx.saved_tensors
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)
        grad = torch.zeros_like(flat)                            # (B·T, V) in the logits' dtype
        g = grad_out.float()[rows // T]                          # (R,) upstream grad per row
        for s in range(0, rows.numel(), ctx.chunk_rows):
            idx = rows[s:s + ctx.chunk_rows]
            p = torch.exp(flat[idx].float() - lse[s:s + ctx.chunk_rows, None])   # (C, V) softmax
            gc = g[s:s + ctx.chunk_rows, None]
            chunk = -gc * p
            chunk.scatter_add_(1, targets[s:s + ctx.chunk_rows, None], gc)
            grad[idx] = chunk.to(grad.dtype)
        return grad.view(B, T, V), None, None, None


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     chunk_rows: int = 512) -> torch.Tensor:
    """log π(y | i, x) = Σ_t log softmax(logits[t])[y_t] over response tokens only.

    logits (B, T, V) at the positions that predict `labels` (already shifted: logits[:, t]
    scores labels[:, t]); labels (B, T) long; mask (B, T) bool, True on response tokens.
    Returns (B,) fp32. Memory: the logits plus one (chunk_rows, V) fp32 block.
    """
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"mask {tuple(mask.shape)}")
    return _SequenceLogprob.apply(logits, labels, mask.bool(), chunk_rows)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """Eq. 1, DPO: L = − log σ( γ log π_θ(y_w)/π_ref(y_w) − γ log π_θ(y_l)/π_ref(y_l) ).

    All inputs (B,); returns the loss per entry (B,).
    """
    margin = gamma * (policy_chosen - ref_chosen) - gamma * (policy_rejected - ref_rejected)
    return -F.logsigmoid(margin)
