"""Stage 3 of HSCR: multi-level preference optimization of LoRA adapters (METHOD.md), the
plain supervised stage (`--stage sft`) on LLaVA-format conversations, and, for the embedded
default's from-scratch base only, vision-tower pretraining on the synthetic world's scene labels
(`--stage vision`). With no arguments, or `demo`, it runs the embedded default; `ablation` runs
its ablation over seeds.

The losses are written out below, one function per equation of the paper:

    r(y) = γ · ( log π_θ(y|i,x) − log π_ref(y|i,x) )                 reward, γ = 0.1
    L_DPO = − log σ( r(y_w) − r(y_l) )                                 Eq. 1
    L_E   = − Σ_{j=1..k} log σ( r(y_w) − r(y_lj) )                     Eq. 5, explicit
    L_I   = − Σ_{j<m}    log σ( r(y_lj) − r(y_lm) )                    Eq. 6, implicit
    L_HSCR = L_E + L_I, averaged over the entries of a batch           Eq. 7

π_θ is the base model plus LoRA (model/lora.py), π_ref the same weights with LoRA disabled.
log π(y|i,x) sums the log-probabilities of the response tokens only.

One step, per entry: the image is encoded once and its visual tokens are shared by the 1 + K
responses (one batched forward of 1 + K rows); the decoder returns hidden states only at the
positions that predict response tokens, and the vocabulary projection + log-softmax run in
chunks of rows that are recomputed in the backward pass, so no (rows × length × V) tensor
exists. Reference log-probs are computed once, with LoRA disabled, and cached beside the
preference file. The loop is flat: AdamW, warmup + cosine, gradient accumulation, clipping,
seeded shuffling per epoch, held-out preference accuracy every N steps, metrics.jsonl,
atomic checkpoints and exact `--resume`.

Preference file (written by hscr.py): a header line {"_header": true, …} (skipped), then JSON
lines {"id", "image", "question", "prompt" (optional), "chosen", "negatives": [{"text",
"similarity"}, …] ranked best first}; "rejected" (a string or a list of strings) is read when
"negatives" is absent. Bad records are reported (out/bad_records.jsonl) and skipped.

Examples:
    python train.py --model ckpt/llava-med-v1.5-mistral-7b --data prefs.jsonl --image-root images \\
        --out runs/hscr
    python train.py --stage sft --model ckpt/base --data llava_med_instruct.json --image-root images
    # 8 GPUs (paper: global batch 16 = 2 per GPU × 8); the same command with --nproc_per_node 1 and
    # the same --batch-size gives the same run with gradient accumulation.
    torchrun --standalone --nproc_per_node 8 train.py --model ckpt/llava-med-v1.5-mistral-7b \\
        --data prefs.jsonl --image-root images --batch-size 16 --micro-batch 2 --out runs/hscr
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import BadRecord, load_image, preprocess_image, read_records, resolve_image
from model import load_model, save_model
from model.llava import Llava, preset
from model.lora import (apply_lora, export_merged, load_adapter, lora_disabled, lora_parameters,
                        save_adapter)
from model.tokenizer import (IMAGE_TOKEN, TEMPLATES, build_prompt, load_tokenizer, tokenize_prompt,
                             tokenize_response)

# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities


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


# ---------------------------------------------------------------------------------------------
# The losses of METHOD.md Stage 3, one function per equation.


def reward(policy_logp: torch.Tensor, ref_logp: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """r(y) = γ · ( log π_θ(y|i,x) − log π_ref(y|i,x) ), the implicit reward of DPO."""
    return gamma * (policy_logp - ref_logp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """Eq. 1, DPO: L = − log σ( γ log π_θ(y_w)/π_ref(y_w) − γ log π_θ(y_l)/π_ref(y_l) ).

    All inputs (B,); returns the loss per entry (B,).
    """
    return -F.logsigmoid(reward(policy_chosen, ref_chosen, gamma) - reward(policy_rejected, ref_rejected, gamma))


def explicit_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                  rejected_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5, explicit: L_E = − Σ_{j=1..k} log σ( r(y_w) − r(y_lj) ), preferred vs each negative.

    reward_chosen (B,), reward_rejected (B, K), rejected_mask (B, K) bool: absent negatives
    contribute no pair. Returns the sum per entry (B,).
    """
    pairs = -F.logsigmoid(reward_chosen[:, None] - reward_rejected)      # (B, K)
    return pairs.where(rejected_mask, 0.0).sum(1)


def implicit_loss(reward_rejected: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6, implicit: L_I = − Σ_{j<m} log σ( r(y_lj) − r(y_lm) ), the more similar negative
    preferred (negatives are ranked best first: pairs (1,2), (1,3), (2,3) when k = 3).

    reward_rejected (B, K), rejected_mask (B, K) bool. Returns the sum per entry (B,).
    """
    K = reward_rejected.shape[1]
    diff = reward_rejected[:, :, None] - reward_rejected[:, None, :]     # (B, K, K): r_j − r_m
    upper = torch.ones(K, K, dtype=torch.bool, device=diff.device).triu(1)  # j < m
    pair_mask = rejected_mask[:, :, None] & rejected_mask[:, None, :] & upper
    return (-F.logsigmoid(diff)).where(pair_mask, 0.0).sum((1, 2))


def multilevel_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, rejected_mask: torch.Tensor, gamma: float = 0.1,
                    explicit: bool = True, implicit: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7: L_HSCR = L_E + L_I, averaged over the entries of the batch.

    Log-probs: chosen (B,), rejected (B, K) ranked best first, rejected_mask (B, K) bool.
    An entry without any pair of a level adds 0 to that level but still counts in the mean
    (so the loss of a global batch is the mean of equal-sized shards, as DDP needs).
    Metrics: loss per level, mean rewards, margins r(y_w) − r(y_lj) and pair accuracies over
    the pairs present.
    """
    if not (explicit or implicit):
        raise ValueError("multilevel_loss needs explicit or implicit (or both)")
    mask = rejected_mask.bool()
    r_w = reward(policy_chosen, ref_chosen, gamma)                      # (B,)
    # Absent negatives may hold anything (padding, NaN): zero them before any arithmetic, so
    # that neither the loss nor its gradient can see them.
    r_l = reward(policy_rejected.where(mask, 0.0), ref_rejected.where(mask, 0.0), gamma)  # (B, K)
    l_e, l_i = explicit_loss(r_w, r_l, mask), implicit_loss(r_l, mask)  # (B,), (B,)
    per_entry = torch.zeros_like(r_w)
    if explicit:
        per_entry = per_entry + l_e
    if implicit:
        per_entry = per_entry + l_i
    loss = per_entry.mean()

    with torch.no_grad():
        K = mask.shape[1]
        margins = (r_w[:, None] - r_l)[mask]                            # (pairs,)
        upper = torch.ones(K, K, dtype=torch.bool, device=mask.device).triu(1)
        pair_mask = mask[:, :, None] & mask[:, None, :] & upper
        implicit_diff = (r_l[:, :, None] - r_l[:, None, :])[pair_mask]
        metrics = {"loss": loss.item(), "loss_explicit": l_e.mean().item(), "loss_implicit": l_i.mean().item(),
                   "reward_chosen": r_w.mean().item()}
        if margins.numel():
            metrics.update(reward_rejected=r_l[mask].mean().item(), margin=margins.mean().item(),
                           accuracy_explicit=(margins > 0).float().mean().item())
        for j in range(K):  # mean reward of the j-th ranked negative, where present
            if mask[:, j].any():
                metrics[f"reward_rejected_{j + 1}"] = r_l[:, j][mask[:, j]].mean().item()
        if implicit_diff.numel():
            metrics["accuracy_implicit"] = (implicit_diff > 0).float().mean().item()
    return loss, metrics


# `--loss`: which levels each variant uses; `dpo` is the explicit level with y_l1 only.
LOSSES = {"hscr": (True, True), "explicit": (True, False), "implicit": (False, True), "dpo": (True, False)}


def preference_loss(kind: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask,
                    gamma: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss that `--loss kind` selects, on the same inputs as multilevel_loss."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose from {sorted(LOSSES)}")
    if kind == "dpo":
        policy_rejected, ref_rejected, rejected_mask = policy_rejected[:, :1], ref_rejected[:, :1], rejected_mask[:, :1]
    explicit, implicit = LOSSES[kind]
    return multilevel_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask,
                           gamma=gamma, explicit=explicit, implicit=implicit)


# ---------------------------------------------------------------------------------------------
# Sequence log-probs straight from the decoder's hidden states (what the training step uses).


def hidden_logprob(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor, chunk_rows: int = 256) -> torch.Tensor:
    """sequence_logprob(hidden @ lm_head_weightᵀ, labels, mask) from the decoder's hidden states.

    hidden (R, P, D) at the positions that predict `labels` (R, P); mask (R, P) bool. Only
    masked rows are projected, `chunk_rows` at a time; with gradients on, each chunk is
    checkpointed, so its (chunk_rows, V) logits are recomputed in the backward pass instead
    of being kept. Peak memory: one chunk of fp32 logits and its gradient. Returns (R,) fp32.
    """
    R, P, D = hidden.shape
    rows = mask.reshape(R * P).nonzero().squeeze(1)                 # (M,) masked positions
    h = hidden.reshape(R * P, D)[rows]                               # (M, D)
    targets = labels.reshape(R * P)[rows]                            # (M,)
    track = torch.is_grad_enabled() and h.requires_grad
    parts = []
    for s in range(0, rows.numel(), chunk_rows):
        args = (h[s:s + chunk_rows], lm_head_weight, targets[s:s + chunk_rows])
        parts.append(checkpoint(_chunk_logprob, *args, use_reentrant=False) if track else _chunk_logprob(*args))
    token_logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return torch.zeros(R, dtype=torch.float32, device=hidden.device).index_add(0, rows // P, token_logp)


def _chunk_logprob(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()                             # (C, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass; the command line is built from its fields.


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    model: str | None = _opt(None, "checkpoint directory (LLaVA-Med, llava-hf or our own)")
    data: str | None = _opt(None, "preference JSONL from hscr.py, or LLaVA instruction JSON with --stage sft")
    out: str = _opt("runs/train", "output directory: config.json, metrics.jsonl, adapter/, checkpoints/")
    stage: str = _opt("preference", "preference: HSCR / DPO on preference data; sft: next-token training "
                      "on answers; vision: pretrain a from-scratch vision tower on the synthetic world's scene "
                      "labels (the embedded default's base only)", choices=("preference", "sft", "vision"))
    image_root: str | None = _opt(None, "directory the records' image paths are relative to "
                                  "(default: the data file's directory)")
    vision_tower: str | None = _opt(None, "separate CLIP directory for the vision tower")
    init_preset: str | None = _opt(None, "build a randomly initialised model of this preset (model/llava.py "
                                   "PRESETS; vocab size and image token from --tokenizer) instead of loading "
                                   "--model; implies --full", choices=("tiny",))
    full: bool = _opt(False, "train every parameter (vision tower, projector, decoder) instead of LoRA; "
                      "saves the whole model to out/model/")
    tokenizer: str | None = _opt(None, "tokenizer.json / tokenizer.model / directory (default: --model)")
    eval_data: str | None = _opt(None, "held-out file (default: --eval-fraction of --data)")
    eval_fraction: float = _opt(0.05, "share of --data held out for evaluation when --eval-data is not given")
    # Loss (METHOD.md Stage 3)
    loss: str = _opt("hscr", "hscr = explicit + implicit (Eq. 7); dpo = explicit with y_l1 only",
                     choices=tuple(LOSSES))
    gamma: float = _opt(0.1, "γ of the reward r(y) = γ·(log π_θ − log π_ref)")
    max_negatives: int = _opt(3, "negatives per entry used (the first, most similar ones)")
    min_negatives: int = _opt(1, "entries with fewer negatives are skipped (reported)")
    # LoRA
    lora_rank: int = _opt(16, "LoRA rank r")
    lora_alpha: float = _opt(32.0, "LoRA α (scale α/r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "comma-separated linear layer names of the language model")
    # Optimisation
    epochs: int = _opt(2, "passes over the training data (paper: 2)")
    batch_size: int = _opt(16, "entries per optimizer step, over all processes (paper: 16)")
    micro_batch: int = _opt(2, "entries per forward pass and process; accumulation fills the rest")
    lr: float = _opt(2e-5, "peak learning rate (the paper reports 5e-7, which barely moves LoRA)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (paper: none)")
    warmup_ratio: float = _opt(0.1, "share of the steps with linear warmup")
    min_lr_ratio: float = _opt(0.0, "cosine decays to lr × this")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0: off)")
    seed: int = _opt(0, "seed of data order, held-out split, LoRA init and dropout")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (the schedule still spans all epochs)")
    # Sequences
    max_response_tokens: int = _opt(512, "responses are cut to this many tokens (EOS included)")
    max_length: int = _opt(2048, "longer sequences are skipped (reported)")
    # Efficiency
    device: str = _opt("auto", "cpu, cuda, cuda:N (auto: the local GPU under torchrun, else cuda if present)")
    dtype: str = _opt("auto", "weights of the base model (auto: bf16 on GPU, fp32 on CPU)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    autocast: bool = _opt(True, "bf16 autocast on GPU")
    gradient_checkpointing: bool = _opt(False, "recompute decoder layers in the backward pass")
    logit_chunk: int = _opt(256, "response positions per chunk of the vocabulary projection")
    # Bookkeeping
    eval_every: int = _opt(50, "evaluate held-out preference accuracy every N steps (0: only at the end)")
    save_every: int = _opt(100, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk")
    resume: bool = _opt(False, "continue from the latest checkpoint in --out")
    export_merged: bool = _opt(False, "also write the base model with LoRA merged, in the input's layout")
    plot: bool = _opt(True, "write metrics.png at the end (needs matplotlib)")

    def __post_init__(self):
        if self.init_preset:
            self.full = True
            required = ("data", "tokenizer")  # the tokenizer fixes the vocabulary of a new model
        else:
            required = ("model", "data")
        problems = [f"--{f.replace('_', '-')} is required" for f in required if getattr(self, f) is None]
        if self.max_negatives < 1 or not 0 <= self.min_negatives <= self.max_negatives:
            problems.append("need 0 <= --min-negatives <= --max-negatives and --max-negatives >= 1")
        if min(self.batch_size, self.micro_batch, self.keep_checkpoints, self.logit_chunk) < 1:
            problems.append("--batch-size, --micro-batch, --keep-checkpoints and --logit-chunk must be >= 1")
        if not 0 <= self.eval_fraction < 1:
            problems.append("--eval-fraction must be in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def negatives(self) -> int:
        """Negatives per entry that are forwarded: DPO uses y_l1 only."""
        return 1 if self.loss == "dpo" else self.max_negatives


# Fields that may change between a run and its --resume (everything else must match).
RESUMABLE_FIELDS = {"resume", "max_steps", "eval_every", "save_every", "keep_checkpoints", "export_merged",
                    "plot", "device"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        if str(f.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else ""))
    return parser


# ---------------------------------------------------------------------------------------------
# Data: preference entries and SFT examples become rows of token ids with a target mask.


@dataclass
class Example:
    """One training entry: its image and the token rows of its responses.

    Preference: rows[0] = prompt + y_w, rows[1:] = prompt + y_lj (best first). SFT: one row,
    the whole conversation. `targets[r][t]` is True where token t of row r is trained on.
    """
    id: str
    image: Path | None
    rows: list[list[int]]
    targets: list[list[bool]]


def read_json_records(path: Path) -> list[tuple[int, object]]:
    """(index, value) per record of a JSON list or JSONL file; a JSONL line that does not parse
    is returned as its error message."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
    out = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((i, f"not valid JSON: {e}"))
    return out


def _preference_fields(item: object, max_negatives: int):
    """(id, image, question, prompt or None, chosen, negatives) of a preference record, or
    ValueError(reason)."""
    if not isinstance(item, dict):
        raise ValueError(item if isinstance(item, str) else f"a record must be an object, not {type(item).__name__}")
    missing = [k for k in ("id", "question", "chosen") if k not in item]
    if "negatives" not in item and "rejected" not in item:
        missing.append("negatives")
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(item["id"], (str, int)):
        raise ValueError(f"id must be a string, got {item['id']!r}")
    for key in ("question", "chosen"):
        if not isinstance(item[key], str) or not item[key].strip():
            raise ValueError(f"{key} must be a non-empty string")
    prompt = item.get("prompt")  # hscr.py stores the prompt text it scored with
    if prompt is not None and (not isinstance(prompt, str)
                               or prompt.count(IMAGE_TOKEN) != (item.get("image") is not None)):
        raise ValueError(f"prompt must be a string with one {IMAGE_TOKEN} if the record has an image, else none")
    image = item.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"image must be a path string or null, got {image!r}")
    raw = item["negatives"] if "negatives" in item else item["rejected"]
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list):
        raise ValueError("negatives must be a list")
    texts = [n.get("text") if isinstance(n, dict) else n for n in raw]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("every negative must be a non-empty string or an object with a non-empty 'text'")
    return str(item["id"]), image, item["question"], prompt, item["chosen"], texts[:max_negatives]


def _image_path(image: str | None, image_root: Path) -> Path | None:
    if image is None:
        return None
    path = resolve_image(image_root, image)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    return path


class Tokens:
    """The prompt / response tokenization shared by both stages (model/tokenizer.py)."""

    def __init__(self, tokenizer, config):
        self.tokenizer, self.text = tokenizer, config.text
        self.image_token_id, self.num_image_tokens = config.image_token_id, config.num_image_tokens

    def prompt(self, question: str, with_image: bool, first: bool = True, text: str | None = None) -> list[int]:
        """Ids of the prompt `text`, or of the template around `question` (the image first)."""
        if text is None:
            text = build_prompt(question) if with_image else \
                TEMPLATES["mistral_instruct"].format(user=question.replace(IMAGE_TOKEN, "").strip())
        return tokenize_prompt(self.tokenizer, text, image_token_id=self.image_token_id,
                               num_image_tokens=self.num_image_tokens,
                               bos_token_id=self.text.bos_token_id if first else None)

    def response(self, text: str, limit: int | None = None) -> list[int]:
        ids = tokenize_response(self.tokenizer, text.strip(), eos_token_id=self.text.eos_token_id)
        return ids[:limit] if limit else ids


def read_preferences(path: Path, image_root: Path, tokens: Tokens, cfg: TrainConfig):
    """Preference records → (examples, bad records). A bad record is reported, not fatal."""
    examples, bad, seen = [], [], set()
    for index, item in read_json_records(path):
        if isinstance(item, dict) and item.get("_header"):
            continue  # hscr.py's first line: the options it ran with
        record_id = str(item.get("id")) if isinstance(item, dict) and "id" in item else None
        try:
            rid, image, question, prompt_text, chosen, negatives = _preference_fields(item, cfg.negatives)
            if rid in seen:
                raise ValueError(f"duplicate id {rid!r}")
            if len(negatives) < min(cfg.min_negatives, cfg.negatives):
                raise ValueError(f"{len(negatives)} negatives, fewer than --min-negatives {cfg.min_negatives}")
            image_path = _image_path(image, image_root)
            prompt = tokens.prompt(question, image is not None, text=prompt_text)
            responses = [tokens.response(t, cfg.max_response_tokens) for t in [chosen] + negatives]
            rows = [prompt + r for r in responses]
            if max(map(len, rows)) > cfg.max_length:
                raise ValueError(f"{max(map(len, rows))} tokens, more than --max-length {cfg.max_length}")
        except ValueError as e:
            bad.append(BadRecord(str(path), index, record_id, str(e)))
            continue
        seen.add(rid)
        targets = [[False] * len(prompt) + [True] * len(r) for r in responses]
        examples.append(Example(rid, image_path, rows, targets))
    return examples, bad


def read_sft(path: Path, image_root: Path, tokens: Tokens, cfg: TrainConfig):
    """LLaVA-format conversations → (examples, bad records); answers are the targets."""
    records, bad = read_records(path)
    examples = []
    for index, record in enumerate(records):
        try:
            turns = record.conversations
            if len(turns) < 2 or len(turns) % 2 or any(t.get("from") != ("human", "gpt")[i % 2]
                                                       for i, t in enumerate(turns)):
                raise ValueError("conversations must alternate human, gpt, … and end with gpt")
            image_path = _image_path(record.image, image_root)
            ids, target = [], []
            for i in range(0, len(turns), 2):
                prompt = tokens.prompt(turns[i]["value"], image_path is not None and i == 0, first=i == 0)
                answer = tokens.response(turns[i + 1]["value"], cfg.max_response_tokens)
                ids += prompt + answer
                target += [False] * len(prompt) + [True] * len(answer)
            if len(ids) > cfg.max_length:
                raise ValueError(f"{len(ids)} tokens, more than --max-length {cfg.max_length}")
        except ValueError as e:
            bad.append(BadRecord(str(path), index, record.id, str(e)))
            continue
        examples.append(Example(record.id, image_path, [ids], [target]))
    return examples, bad


@dataclass
class Rows:
    """A padded batch of rows; the decoder is asked for hidden states at `positions` only."""
    input_ids: torch.Tensor       # (R, T) right-padded
    attention_mask: torch.Tensor  # (R, T) 1 on real tokens
    positions: torch.Tensor       # (R, P) position t − 1 for each target token t
    labels: torch.Tensor          # (R, P) the target tokens
    label_mask: torch.Tensor      # (R, P) bool
    row_image: torch.Tensor       # (R,) index into the batch's images, −1 for none

    def to(self, device) -> Rows:
        return Rows(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(examples: list[Example], pad_id: int) -> Rows:
    rows, targets, row_image = [], [], []
    n_images = 0
    for ex in examples:
        rows += ex.rows
        targets += ex.targets
        row_image += [n_images if ex.image is not None else -1] * len(ex.rows)
        n_images += ex.image is not None
    R, T = len(rows), max(map(len, rows))
    where = [[t for t, on in enumerate(tg) if on] for tg in targets]
    P = max(map(len, where))
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(R, T, dtype=torch.long)
    positions = torch.zeros(R, P, dtype=torch.long)
    labels = torch.zeros(R, P, dtype=torch.long)
    label_mask = torch.zeros(R, P, dtype=torch.bool)
    for r, (ids, ts) in enumerate(zip(rows, where)):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        if ts:
            ts = torch.tensor(ts)
            positions[r, :len(ts)] = ts - 1   # the logits at t − 1 predict token t
            labels[r, :len(ts)] = input_ids[r, ts]
            label_mask[r, :len(ts)] = True
    return Rows(input_ids, attention_mask, positions, labels, label_mask, torch.tensor(row_image))


def load_pixels(examples: list[Example], image_size: int) -> torch.Tensor | None:
    """(B_img, 3, S, S) for the examples that have an image, in order."""
    pixels = [preprocess_image(load_image(ex.image), size=image_size) for ex in examples if ex.image is not None]
    return torch.stack(pixels) if pixels else None


# ---------------------------------------------------------------------------------------------
# The forward pass


def row_logprobs(model, base, rows: Rows, pixels: torch.Tensor | None, chunk_rows: int,
                 train_vision: bool = False) -> torch.Tensor:
    """log π(y|i,x) of every row (R,): each image encoded once and shared by all its rows.

    `model` is what runs the decoder (the DDP wrapper when distributed), `base` the Llava inside.
    The vision tower and projector are frozen (no graph kept) unless `train_vision` (--full).
    """
    features = None
    if pixels is not None:
        with contextlib.nullcontext() if train_vision else torch.no_grad():
            images = base.encode_images(pixels.to(base.device, base.dtype))   # (B_img, N, D)
        features = images[rows.row_image[rows.row_image >= 0]]              # (R_img, N, D)
    hidden = model(rows.input_ids, attention_mask=rows.attention_mask, image_features=features,
                   logits_positions=rows.positions, return_hidden=True)      # (R, P, D)
    return hidden_logprob(hidden, base.lm_head.weight, rows.labels, rows.label_mask, chunk_rows)


def split_rows(logp: torch.Tensor, examples: list[Example], K: int):
    """Row log-probs (R,) → chosen (B,), rejected (B, K) padded with 0, mask (B, K)."""
    B = len(examples)
    chosen = logp.new_zeros(B)
    rejected = logp.new_zeros(B, K)
    mask = torch.zeros(B, K, dtype=torch.bool, device=logp.device)
    r = 0
    for b, ex in enumerate(examples):
        n = len(ex.rows) - 1
        chosen[b] = logp[r]
        rejected[b, :n] = logp[r + 1:r + 1 + n]
        mask[b, :n] = True
        r += 1 + n
    return chosen, rejected, mask


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass. The layer's forward is wrapped in
    place (not the module), so parameter names and checkpoints are unchanged."""
    for layer in model.language_model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ---------------------------------------------------------------------------------------------
# Reference log-probs, computed once with LoRA disabled and cached beside the preference file.


def reference_cache_key(cfg: TrainConfig, dtype: torch.dtype, autocast: bool) -> dict:
    """What the cached values depend on; any change recomputes them."""
    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    model = Path(cfg.model)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.glob("*.safetensors"))
    tok = Path(cfg.tokenizer or cfg.model)
    tok_files = [tok] if tok.is_file() else sorted(tok.glob("tokenizer.*"))
    return {"data": sha(Path(cfg.data)), "eval_data": sha(Path(cfg.eval_data)) if cfg.eval_data else None,
            "model": str(model.resolve()), "config": sha(model / "config.json"), "weights": weights,
            "vision_tower": str(Path(cfg.vision_tower).resolve()) if cfg.vision_tower else None,
            "tokenizer": [sha(p) for p in tok_files], "dtype": str(dtype), "autocast": autocast,
            "negatives": cfg.negatives, "max_response_tokens": cfg.max_response_tokens,
            "max_length": cfg.max_length}


def reference_cache_path(cfg: TrainConfig, key: dict) -> Path:
    """prefs.jsonl → prefs.reflogp-<8 hex digits of the key>.json, beside the preference file, so
    that runs with other settings (another model, --loss dpo, …) keep their own caches."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.data).with_suffix(f".reflogp-{digest}.json")


def reference_logprobs(base, examples: list[Example], cfg: TrainConfig, dtype, ctx) -> dict[str, list[float]]:
    """{entry id: [log π_ref(y_w), log π_ref(y_l1), …]}: read from the cache file, the missing
    ones computed with LoRA disabled (processes sharing the work) and the file rewritten."""
    key = reference_cache_key(cfg, dtype, ctx.amp)
    path = reference_cache_path(cfg, key)
    cached = {}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            cached = stored["logp"]
    todo = [ex for ex in examples if ex.id not in cached]
    if todo:
        mine = todo[ctx.rank::ctx.world]
        computed = {}
        base.eval()
        with torch.no_grad(), lora_disabled(base), ctx.autocast():
            for s in range(0, len(mine), cfg.micro_batch):
                batch = mine[s:s + cfg.micro_batch]
                logp = row_logprobs(base, base, collate(batch, ctx.pad_id).to(ctx.device),
                                    load_pixels(batch, base.config.vision.image_size), cfg.logit_chunk).tolist()
                for ex in batch:
                    computed[ex.id], logp = logp[:len(ex.rows)], logp[len(ex.rows):]
        cached.update(ctx.gather_dicts(computed))
        if ctx.rank == 0:
            try:
                atomic_write_text(path, json.dumps({"key": key, "logp": cached}))
            except OSError as e:  # a read-only data directory: the run goes on without a cache
                print(f"cannot cache reference log-probs in {path}: {e}", file=sys.stderr)
    return cached


# ---------------------------------------------------------------------------------------------
# Processes, devices, files


@dataclass
class Context:
    """Where this process runs: rank / world size under torchrun, device, autocast, pad id."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    amp: bool = False
    pad_id: int = 0

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def gather_dicts(self, d: dict) -> dict:
        if self.world == 1:
            return d
        parts = [None] * self.world
        dist.all_gather_object(parts, d)
        return {k: v for part in parts for k, v in part.items()}

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_context(cfg: TrainConfig) -> Context:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, device, amp=cfg.autocast and device.type == "cuda")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_start(out: Path, cfg: TrainConfig, bad: list[BadRecord]) -> None:
    """out/config.json and out/bad_records.jsonl; each skipped record is also reported on stderr."""
    out.mkdir(parents=True, exist_ok=True)
    for b in bad:
        print(f"skipped {b.file} record {b.index} (id {b.id}): {b.reason}", file=sys.stderr)
    atomic_write_text(out / "bad_records.jsonl", "".join(json.dumps(dataclasses.asdict(b)) + "\n" for b in bad))
    atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, ctx: Context) -> None:
    """checkpoints/step-NNNNNN/{adapter/, trainer.pt}: written under a temporary name, renamed,
    then `checkpoints/latest` is replaced atomically; only `keep_checkpoints` are kept."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None}
    rngs = [rng]
    if ctx.world > 1:  # dropout draws differ per rank: keep every rank's state
        rngs = [None] * ctx.world
        dist.all_gather_object(rngs, rng)
    if ctx.rank == 0:
        root = out / "checkpoints"
        name = f"step-{step:06d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(model, tmp, cfg)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rngs, "config": dataclasses.asdict(cfg)}, tmp / "trainer.pt")
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        atomic_write_text(root / "latest", name + "\n")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    ctx.barrier()


def save_weights(model, out: Path, cfg: TrainConfig) -> Path:
    """The trained weights: the PEFT adapter (out/adapter), or with --full the whole model as a
    loadable checkpoint directory with its tokenizer (out/model)."""
    if not cfg.full:
        return save_adapter(model, out / "adapter", base_model_path=cfg.model) or out / "adapter"
    save_model(model, out / "model")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    tokenizer.save(str(out / "model" / "tokenizer.json"))
    return out / "model"


def load_checkpoint(out: Path, model, optimizer, scheduler, cfg: TrainConfig, ctx: Context) -> int:
    """Restore adapter, optimizer, scheduler and RNG states; returns the step to continue from."""
    root = out / "checkpoints"
    if not (root / "latest").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {root}")
    ckpt = root / (root / "latest").read_text().strip()
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    now = dataclasses.asdict(cfg)
    changed = sorted(f"{k}: {v!r} → {now.get(k)!r}" for k, v in state["config"].items()
                     if k not in RESUMABLE_FIELDS and now.get(k) != v)
    if changed:
        raise ValueError(f"--resume from {ckpt}: the run's settings changed ({'; '.join(changed)})")
    if len(state["rng"]) != ctx.world:
        raise ValueError(f"--resume from {ckpt}: saved by {len(state['rng'])} processes, now {ctx.world}")
    if cfg.full:
        model.load_state_dict(load_model(ckpt / "model", dtype=model.dtype, device=model.device).state_dict())
    else:
        load_adapter(model, ckpt / "adapter")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ctx.rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    return state["step"]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def split_held_out(examples: list[Example], fraction: float, seed: int):
    """A seeded random `fraction` of the entries for evaluation, the rest for training."""
    n_eval = int(round(fraction * len(examples)))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# ---------------------------------------------------------------------------------------------
# Losses of a batch, and evaluation


def batch_loss(model, base, batch: list[Example], ref: dict, cfg: TrainConfig, ctx: Context):
    """The micro-batch's loss and the detached log-probs for the step's metrics."""
    rows = collate(batch, ctx.pad_id).to(ctx.device)
    pixels = load_pixels(batch, base.config.vision.image_size)
    with ctx.autocast():
        logp = row_logprobs(model, base, rows, pixels, cfg.logit_chunk, cfg.full)  # (R,)
    if cfg.stage == "sft":
        n_tokens = rows.label_mask.sum()
        loss = -logp.sum() / n_tokens
        return loss, {"loss": loss.item(), "tokens": n_tokens.item()}
    K = cfg.negatives
    policy = split_rows(logp, batch, K)
    reference = split_rows(torch.tensor([v for ex in batch for v in ref[ex.id]], device=ctx.device), batch, K)
    loss, _ = preference_loss(cfg.loss, policy[0], policy[1], reference[0], reference[1], policy[2], cfg.gamma)
    return loss, (policy[0].detach(), policy[1].detach(), reference[0], reference[1], policy[2])


def step_metrics(parts: list, cfg: TrainConfig, ctx: Context) -> dict[str, float]:
    """Metrics of the whole global batch (all micro-batches of all processes)."""
    if cfg.stage == "sft":
        totals = torch.tensor([sum(p["loss"] * p["tokens"] for p in parts), sum(p["tokens"] for p in parts)],
                              dtype=torch.float64, device=ctx.device)
        if ctx.world > 1:
            dist.all_reduce(totals)
        return {"loss": (totals[0] / totals[1]).item(), "tokens": int(totals[1].item())}
    tensors = [torch.cat([p[i] for p in parts]).float() for i in range(5)]    # the mask as 0/1
    if ctx.world > 1:
        gathered = []
        for t in tensors:  # every process holds the same number of entries per step
            out = [torch.empty_like(t) for _ in range(ctx.world)]
            dist.all_gather(out, t)
            gathered.append(torch.cat(out))
        tensors = gathered
    tensors[4] = tensors[4].bool()
    _, metrics = preference_loss(cfg.loss, *tensors, gamma=cfg.gamma)
    return metrics


@torch.no_grad()
def evaluate(model, base, examples: list[Example], ref: dict, cfg: TrainConfig, ctx: Context) -> dict[str, float]:
    """Held-out metrics (eval_loss, eval_accuracy_explicit, …), processes sharing the work."""
    mine = examples[ctx.rank::ctx.world]
    base.eval()
    parts = {}
    for s in range(0, len(mine), cfg.micro_batch):
        batch = mine[s:s + cfg.micro_batch]
        with ctx.autocast():
            logp = row_logprobs(base, base, collate(batch, ctx.pad_id).to(ctx.device),
                                load_pixels(batch, base.config.vision.image_size), cfg.logit_chunk).tolist()
        for ex in batch:
            parts[ex.id], logp = logp[:len(ex.rows)], logp[len(ex.rows):]
    parts = ctx.gather_dicts(parts)
    base.train()
    if not parts:
        return {}
    ordered = examples
    if cfg.stage == "sft":
        n = sum(sum(map(sum, ex.targets)) for ex in ordered)
        return {"eval_loss": -sum(sum(parts[ex.id]) for ex in ordered) / n}
    K = cfg.negatives
    policy = split_rows(torch.tensor([v for ex in ordered for v in parts[ex.id]]), ordered, K)
    reference = split_rows(torch.tensor([v for ex in ordered for v in ref[ex.id]]), ordered, K)
    _, metrics = preference_loss(cfg.loss, policy[0], policy[1], reference[0], reference[1], policy[2], cfg.gamma)
    return {f"eval_{k}": v for k, v in metrics.items()}


def plot_metrics(metrics_path: Path, out_png: Path) -> bool:
    """metrics.png from metrics.jsonl when matplotlib is installed (an optional dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = [k for k in ("loss", "margin", "accuracy_explicit", "accuracy_implicit", "eval_accuracy_explicit",
                        "eval_margin", "eval_loss", "lr") if any(k in r for r in records)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if key.startswith("eval_") else None)
        ax.set_ylabel(key, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# The loop


def new_model(cfg: TrainConfig, dtype: torch.dtype, device) -> Llava:
    """A randomly initialised model of preset `--init-preset`, sized to the tokenizer's vocabulary
    with its `<image>` token as the image placeholder."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        raise ValueError(f"--init-preset: tokenizer {cfg.tokenizer} has no {IMAGE_TOKEN} token")
    config = preset(cfg.init_preset, image_token_id=image_id)
    config.text = dataclasses.replace(config.text, vocab_size=tokenizer.get_vocab_size())
    return Llava(config).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Vision pretraining (--stage vision): the embedded default's stand-in for CLIP's pretraining

MODALITY_LABELS = ("xray", "mri", "ct")


def scene_labels(record: dict) -> torch.Tensor:
    """The synthetic world's `scene` of a record as 5 numbers: present, left, small, count, modality."""
    scene = record.get("scene") if isinstance(record, dict) else None
    if not isinstance(scene, dict):
        raise ValueError("no 'scene' object (vision pretraining needs the synthetic world's records)")
    try:
        count, side, size = int(scene["count"]), scene["side"], scene["size"]
        return torch.tensor([float(count > 0), float(side == "left"), float(size == "small"), float(count),
                             float(MODALITY_LABELS.index(scene["modality"]))])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad 'scene' {scene!r}: {e!r}") from None


def vision_loss(head: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scene attributes from per-token scores of the tower's output tokens (B, N, D).

    A finding is local, so presence is the max over tokens of one score; side and size are token
    averages counted on images with findings; count (0-3) and modality are token-averaged logits.
    """
    o = head(tokens)  # (B, N, 10)
    present = labels[:, 0]
    per_image = lambda x, y: (F.binary_cross_entropy_with_logits(x, y, reduction="none") * present).mean()
    return (F.binary_cross_entropy_with_logits(o[..., 0].amax(1), present)
            + per_image(o[..., 1].mean(1), labels[:, 1]) + per_image(o[..., 2].mean(1), labels[:, 2])
            + F.cross_entropy(o[..., 3:7].mean(1), labels[:, 3].long())
            + F.cross_entropy(o[..., 7:10].mean(1), labels[:, 4].long()))


def pretrain_vision(base: Llava, cfg: TrainConfig, out: Path) -> dict:
    """--stage vision: train the vision tower (with a throw-away head) to read the world's scene
    labels off the pixels, then save the whole model to out/model for `--stage sft --model`.

    Why: LLaVA-Med starts from a pretrained CLIP tower. A tower trained from scratch only through
    the language loss learns the modality (a global look) within a few hundred steps but not the
    small findings: the decoder ignores visual tokens that carry nothing yet, so almost no gradient
    reaches the tower. A few hundred steps of direct supervision break that circle.
    """
    records = [item for _, item in read_json_records(Path(cfg.data))]
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.data).parent
    examples, bad = [], []
    for index, item in enumerate(records):
        try:
            image = _image_path(item.get("image"), image_root)
            if image is None:
                raise ValueError("no image")
            examples.append((image, scene_labels(item)))
        except (ValueError, AttributeError) as e:
            bad.append(BadRecord(cfg.data, index, str(item.get("id")) if isinstance(item, dict) else None, str(e)))
    write_run_start(out, cfg, bad)
    if len(examples) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(examples)} usable records, fewer than one batch of {cfg.batch_size}")
    tower, D = base.vision_tower, base.config.vision.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.Linear(D, 10)).to(base.device)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.max_steps or cfg.epochs * (len(examples) // cfg.batch_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = base.config.vision.image_size
    metrics, cache = [], {}  # cache: example index → preprocessed pixels (400 steps × 64 ≈ 4 reads each)
    for step in tqdm(range(steps), desc="vision", dynamic_ncols=True):
        picks = torch.randint(len(examples), (cfg.batch_size,), generator=generator).tolist()
        for i in picks:
            if i not in cache:
                cache[i] = preprocess_image(load_image(examples[i][0]), size=size)
        pixels = torch.stack([cache[i] for i in picks]).to(base.device)
        labels = torch.stack([examples[i][1] for i in picks]).to(base.device)
        loss = vision_loss(head, tower(pixels.to(base.dtype)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics.append({"step": step + 1, "loss": loss.item()})
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    path = save_weights(base, out, dataclasses.replace(cfg, full=True))  # the whole model is the output
    print(f"vision tower pretrained for {steps} steps (last loss {metrics[-1]['loss']:.3f}) → {path}")
    return metrics[-1]


def train(cfg: TrainConfig) -> dict:
    """Run the stage described by `cfg`; returns the last step's and the final eval's metrics."""
    ctx = setup_context(cfg)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)  # LoRA init: identical on every process
    dtype = {"auto": torch.bfloat16 if ctx.device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    if cfg.init_preset:
        base = new_model(cfg, dtype, ctx.device)
    else:
        base = load_model(cfg.model, vision_tower=cfg.vision_tower, dtype=dtype, device=ctx.device)
    ctx.pad_id = base.config.text.pad_token_id or 0
    if cfg.stage == "vision":
        return pretrain_vision(base, cfg, out)
    if not cfg.full:
        apply_lora(base, cfg.targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)

    # Data: bad records are reported and skipped.
    tokens = Tokens(load_tokenizer(cfg.tokenizer or cfg.model), base.config)
    read = read_sft if cfg.stage == "sft" else read_preferences
    data_path = Path(cfg.data)
    image_root = Path(cfg.image_root) if cfg.image_root else data_path.parent
    examples, bad = read(data_path, image_root, tokens, cfg)
    if cfg.eval_data:
        held_out, bad_eval = read(Path(cfg.eval_data), image_root, tokens, cfg)
        bad += bad_eval
    else:
        examples, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    if ctx.rank == 0:
        write_run_start(out, cfg, bad)
        print(f"{len(examples)} training entries, {len(held_out)} held out, {len(bad)} skipped")
    per_step = cfg.micro_batch * ctx.world
    if cfg.batch_size % per_step:
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch × processes = {per_step}")
    accum = cfg.batch_size // per_step
    steps_per_epoch = len(examples) // cfg.batch_size  # the last partial batch of each epoch is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} training entries: fewer than one batch of --batch-size {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs

    ref = reference_logprobs(base, examples + held_out, cfg, dtype, ctx) if cfg.stage == "preference" else {}

    params = list(base.parameters()) if cfg.full else list(lora_parameters(base))
    if cfg.full:
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup, total=total, min_ratio=cfg.min_lr_ratio))
    start = load_checkpoint(out, base, optimizer, scheduler, cfg, ctx) if cfg.resume else 0
    if not cfg.resume:
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # dropout: its own stream per process
    metrics_path = out / "metrics.jsonl"
    if ctx.rank == 0:  # drop what an interrupted run logged after its last checkpoint
        kept = [line for line in (metrics_path.read_text().splitlines() if cfg.resume and metrics_path.exists()
                                  else []) if json.loads(line)["step"] <= start]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))

    model = base
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            base, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    base.train()
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    progress = range(start, end)
    if ctx.rank == 0:
        progress = tqdm(progress, initial=start, total=end, desc=cfg.stage, dynamic_ncols=True)
    last = {}
    for step in progress:
        t0 = time.time()
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batch = [examples[i] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]
        mine = batch[ctx.rank::ctx.world]  # this process's share of the global batch
        parts = []
        for micro in range(accum):
            micro_batch = mine[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch]
            # DDP all-reduces gradients only on the last micro-step.
            sync = model.no_sync() if ctx.world > 1 and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss, part = batch_loss(model, base, micro_batch, ref, cfg, ctx)
                (loss / accum).backward()
            parts.append(part)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        last = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm.item(),
                **step_metrics(parts, cfg, ctx), "seconds": round(time.time() - t0, 3)}
        done = step + 1 == end
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
            last.update(evaluate(model, base, held_out, ref, cfg, ctx))
        if ctx.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            progress.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "margin", "accuracy_explicit") if k in last})
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            save_checkpoint(out, step + 1, base, optimizer, scheduler, cfg, ctx)

    if ctx.rank == 0:
        weights = save_weights(base, out, cfg)
        if cfg.plot and plot_metrics(metrics_path, out / "metrics.png"):
            print(f"wrote {out / 'metrics.png'}")
        if cfg.export_merged and not cfg.full:
            export_merged(base, out / "merged", source=cfg.model)
            print(f"wrote {out / 'merged'} (LoRA merged, in the input's key layout)")
        print(f"wrote {weights}" + ("" if cfg.full else " (PEFT format)"))
    ctx.barrier()
    return last


# ---------------------------------------------------------------------------------------------
# Command line


def config_from_args(argv: list[str]) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


# ---------------------------------------------------------------------------------------------
# The embedded default: `python train.py` with no arguments runs all of HSCR on the shipped
# small Med-VLM (assets/base) and the synthetic world (data.build_world), on a CPU.

ROOT = Path(__file__).resolve().parent


@dataclass
class DemoConfig:
    out: str = _opt("runs/default", "where every output of the run goes")
    world: str = _opt(".cache/world", "synthetic world directory (built on first use)")
    base: str = _opt(str(ROOT / "assets" / "base"), "the base model (config.json, model.safetensors, tokenizer.json)")
    align: int | None = _opt(None, "alignment entries used (default: the whole 2,000-entry split)")
    test: int | None = _opt(None, "test questions evaluated (default: all)")
    split: str = _opt("test", "split evaluated: test, or val when choosing settings", choices=("test", "val"))
    steps: int | None = _opt(None, "stop training after this many steps (default: 2 epochs)")
    loss: str = _opt("hscr", "preference loss", choices=tuple(LOSSES))
    mask_strategy: str = _opt("token", "visual dropout of hscr.py (token, latent, patch, pixel)",
                              choices=("token", "latent", "patch", "pixel"))
    lr: float = _opt(5e-4, "LoRA learning rate (chosen on the world's validation split)")
    gamma: float = _opt(1.0, "γ of the reward γ·(log π_θ − log π_ref) (METHOD.md: 0.1; 1.0 chosen on the "
                        "validation split: with 0.1 the small model drifts far from π_ref)")
    epochs: int = _opt(2, "passes over the preference data (paper: 2)")
    seed: int = _opt(0, "seed of the world sample, the negatives' dropout and training")
    similarity: str = _opt("auto", "minilm when its weights are installed, else lexical",
                           choices=("auto", "minilm", "lexical"))
    top_k: int = _opt(1, "hscr.py --top-k: candidate replacements per coupled position (METHOD.md: 10; 1 chosen "
                      "on the validation split: with 10 the argmin picks tokens no branch believes)")
    prefs: str | None = _opt(None, "preference file to write or reuse (default: OUT/prefs.jsonl)")


def _strict_gain(r: dict, mode: str) -> float:
    """Closed visual gain on the strict score: full − `mode` (a blind mode)."""
    return r["modes"]["full"]["closed"]["accuracy_strict"] - r["modes"][mode]["closed"]["accuracy_strict"]


# The rows of the default's table: label → figure of one eval.py result (× 100). Blind scores are
# strict: without its image the small base rambles ("yes is no is no …"), which LLaVA-Med's
# substring rule scores as a hit on both "yes" and "no" questions.
DEMO_ROWS = {
    "closed accuracy (LLaVA-Med, lenient)": lambda r: r["modes"]["full"]["closed"]["accuracy"],
    "closed accuracy, strict": lambda r: r["modes"]["full"]["closed"]["accuracy_strict"],
    "open recall": lambda r: r["modes"]["full"]["open"]["recall"],
    "hallucination rate": lambda r: r["modes"]["full"]["closed"]["hallucination_rate"],
    "closed strict, no image": lambda r: r["modes"]["no_image"]["closed"]["accuracy_strict"],
    "closed strict, blank image": lambda r: r["modes"]["blank_image"]["closed"]["accuracy_strict"],
    "open recall, no image": lambda r: r["modes"]["no_image"]["open"]["recall"],
    "visual gain, closed strict (full − no image)": lambda r: _strict_gain(r, "no_image"),
    "visual gain, closed strict (full − blank image)": lambda r: _strict_gain(r, "blank_image"),
    "visual gain, open (full − no image)": lambda r: r["visual_gain"]["no_image"]["open recall"],
}


def demo_table(base: dict, aligned: dict) -> str:
    """The before/after table of the default run (figures × 100, from eval.py's results)."""
    lines = ["| metric | base | HSCR | Δ |", "|---|---:|---:|---:|"]
    for label, figure in DEMO_ROWS.items():
        a, b = figure(base), figure(aligned)
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines)


def demo(cfg: DemoConfig, base_results: dict | None = None) -> dict:
    """World → hscr.py preference data from the base model → LoRA with the multi-level loss →
    eval.py on the test split, base and aligned, with and without the image → the table.
    base_results: the base model's eval results from an earlier run with the same test split
    (greedy decoding makes them the same), to skip evaluating it again."""
    import eval as evaluation
    import hscr
    from data import build_world
    from model.sentence import default_minilm_path

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.base)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (base / f).is_file()]
    if missing:
        raise SystemExit(f"the base model in {base} lacks {', '.join(missing)}; README.md gives the commands "
                         "that regenerate it")
    (out / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    print(f"[1/5] synthetic world in {cfg.world}")
    world = build_world(cfg.world, seed=0)

    similarity = cfg.similarity
    if similarity == "auto":
        similarity = "minilm" if default_minilm_path() else "lexical"
    prefs = Path(cfg.prefs) if cfg.prefs else out / "prefs.jsonl"
    print(f"[2/5] hscr.py: self-generated negatives from the base model → {prefs}")
    hscr.run(hscr.Options(model=str(base), data=str(world["align"]), image_root=str(world["root"]), out=str(prefs),
                          limit=cfg.align, seed=cfg.seed, similarity=similarity, mask_strategy=cfg.mask_strategy,
                          top_k=cfg.top_k,
                          batch_size=128, max_new_tokens=32, device="cpu"))

    print(f"[3/5] train.py: LoRA with the {cfg.loss} loss → {out / 'train'}")
    train(TrainConfig(model=str(base), data=str(prefs), image_root=str(world["root"]), out=str(out / "train"),
                      loss=cfg.loss, gamma=cfg.gamma, epochs=cfg.epochs, batch_size=16, micro_batch=16, lr=cfg.lr,
                      seed=cfg.seed, max_steps=cfg.steps, eval_fraction=0.05, eval_every=0, save_every=0, lora_dropout=0.0,
                      max_response_tokens=64, device="cpu"))

    results = {} if base_results is None else {"base": base_results}
    for name, adapter in (("base", None), ("hscr", str(out / "train" / "adapter"))):
        if name in results:
            print("[4/5] eval.py: base model results reused")
            continue
        print(f"[{4 if name == 'base' else 5}/5] eval.py: {name} model on the {cfg.split} split, with and without the image")
        results[name] = evaluation.run(evaluation.EvalConfig(
            model=str(base), adapter=adapter, benchmark=[f"{cfg.split}={world[cfg.split]}"], image_root=[str(world["root"])],
            out=str(out / f"eval-{name}"), blind=True, batch_size=128, max_new_tokens=32, limit=cfg.test,
            device="cpu", dtype="float32"))[cfg.split]
    table = demo_table(results["base"], results["hscr"])
    (out / "table.md").write_text(table + "\n")
    print(f"\nBefore / after HSCR on the world's balanced {cfg.split} split ({out / 'table.md'}):\n\n{table}\n")
    print(f"Outputs in {out}/: prefs.jsonl (+ .summary.json, .rejects.jsonl), train/ (adapter/, metrics.jsonl), "
          f"eval-base/ and eval-hscr/ (answers, report.md, summary.json), table.md — {time.time() - t0:.0f} s")
    return results


# The ablation of issue 7 / the paper's tables: variant name → DemoConfig overrides.
ABLATION = {"dpo (1 negative)": {"loss": "dpo"}, "explicit only": {"loss": "explicit"},
            "implicit only": {"loss": "implicit"}, "hscr": {}, "hscr, pixel masking": {"mask_strategy": "pixel"}}
ABLATION_METRICS = {label: DEMO_ROWS[key] for label, key in (
    ("closed acc", "closed accuracy (LLaVA-Med, lenient)"), ("closed strict", "closed accuracy, strict"),
    ("open recall", "open recall"), ("halluc. rate", "hallucination rate"),
    ("visual gain, closed strict", "visual gain, closed strict (full − no image)"),
    ("visual gain, open", "visual gain, open (full − no image)"))}


def ablation(cfg: DemoConfig, seeds: list[int]) -> str:
    """Every ABLATION variant (and the base) over `seeds`: mean ± std of each metric, as markdown.
    Preference files are shared by the variants that generate the same negatives."""
    import statistics

    root = Path(cfg.out)
    runs: dict[str, list[dict]] = {"base": []}
    for seed in seeds:
        for name, overrides in ABLATION.items():
            mask = overrides.get("mask_strategy", cfg.mask_strategy)
            slug = name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
            res = demo(dataclasses.replace(cfg, **overrides, seed=seed, out=str(root / f"{slug}-seed{seed}"),
                                           prefs=str(root / f"prefs-{mask}-seed{seed}.jsonl")),
                       base_results=runs["base"][0] if runs["base"] else None)
            runs.setdefault(name, []).append(res["hscr"])
            runs["base"] = runs["base"] or [res["base"]]
    runs["base"] = runs["base"] * len(seeds)  # greedy decoding: the base scores the same every seed

    def cell(results, metric):
        values = [metric(r) for r in results]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    lines = ["| variant | " + " | ".join(ABLATION_METRICS) + " |", "|---|" + "---:|" * len(ABLATION_METRICS)]
    for name, results in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(results, m) for m in ABLATION_METRICS.values()) + " |")
    table = "\n".join(lines)
    (root / "ablation.md").write_text(f"seeds {seeds}; {json.dumps(dataclasses.asdict(cfg))}\n\n{table}\n")
    return table


def _demo_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(DemoConfig):
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            choices=f.metadata.get("choices"), help=f.metadata["help"] + f" (default: {f.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "demo":
        parser = _demo_parser("python train.py [demo]", "The embedded default: all of HSCR on the shipped small "
                              "Med-VLM and synthetic world, on a CPU. For your own model and data see "
                              "`python train.py --help`.")
        demo(DemoConfig(**vars(parser.parse_args(argv[1:]))))
        return 0
    if argv[0] == "ablation":
        parser = _demo_parser("python train.py ablation", "The embedded default's ablation: base, DPO, explicit "
                              "only, implicit only, HSCR, HSCR with pixel masking, over several seeds.")
        parser.set_defaults(out="runs/ablation")
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        args = vars(parser.parse_args(argv[1:]))
        seeds = args.pop("seeds")
        print(ablation(DemoConfig(**args), seeds))
        return 0
    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        build_parser().error(str(e))
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
