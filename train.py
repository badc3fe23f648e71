"""Stage 3 of HSCR: multi-level preference optimization of LoRA adapters on hscr.py's preference
data (docs/METHOD.md), and plain supervised training on LLaVA-format conversations (`--stage sft`).

The method, one function per equation of the paper (π_θ is the base model plus LoRA, model/lora.py;
π_ref the same weights with LoRA disabled; y_w the chosen response, y_l1 … y_lk the k negatives
of an entry, k ≤ --max-negatives, ranked most similar first):

    r(y)   = γ · ( log π_θ(y|i,x) − log π_ref(y|i,x) )          reward           γ = 0.1
    L_E    = − Σ_{j=1..k} log σ( r(y_w) − r(y_lj) )              explicit_loss    Eq. 5
    L_I    = − Σ_{j<j′}   log σ( r(y_lj) − r(y_lj′) )            implicit_loss    Eq. 6
    L_HSCR = L_E + L_I, averaged over the entries of a batch     multilevel_loss  Eq. 7

`preference_loss` picks the variant `--loss` names (hscr, explicit, implicit, dpo). log π(y|i,x)
sums the log-probabilities of the response tokens only (row_logprobs → hidden_logprob).

One step, per entry: the image is encoded once and its visual tokens are shared by the 1 + k
responses (one batched forward of 1 + k rows); the decoder returns hidden states only at the
positions that predict response tokens, and the vocabulary projection + log-softmax run in
chunks of rows that are recomputed in the backward pass, so no (rows × length × V) tensor
exists. Reference log-probs are computed once, with LoRA disabled, and cached beside the
preference file under a key of everything they depend on, by content (`reference_cache_key`).
The loop (`train`) is flat: AdamW, warmup + cosine, gradient accumulation, clipping, seeded
shuffling per epoch, held-out preference accuracy every N steps, metrics.jsonl, atomic
checkpoints and exact `--resume`.

Data: hscr.py's preference file (trained on the token ids it stored when the tokenizer is the
same, with EOS only after complete responses; images padded or resized as hscr.py did, from its
header), or LLaVA conversations for `--stage sft` (batches.py reads them; docs/FORMATS.md). Bad
records, and records whose image cannot be decoded (empty, corrupt, cut short, a decompression
bomb), are skipped before the first step and listed in out/bad_records.jsonl; the run goes on.

One run per --out: out/provenance.json holds a fingerprint of what made it (model, tokenizer,
data and every image by content, and the options that change results; `run_fingerprint`).
`--resume` continues only a run with the same fingerprint and otherwise stops naming what
changed; a new run into an --out holding one is refused unless `--overwrite` (which deletes what
train.py wrote there, and nothing else). Expected errors end with one line (exit status 2).

Command line:
    python train.py [demo] [options]     the embedded demo (demo/run.py): all of HSCR on the shipped
                                         small model and synthetic world, on a CPU
    python train.py ablation [options]   the demo's ablation over seeds
    python train.py train [options]      this trainer; an argument list holding --model, --data,
                                         --init-preset or --stage reaches it without `train`

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from harness import provenance
from batches import (Example, Rows, Tokens, collate, batch_pixels, preference_header, read_preferences, read_sft,
                     unusable_images)
from model.loading import DTYPES, resolve_dtype
from harness.cli import UserError, dataclass_parser, option, run_main
from harness.dist import Context, setup_context
from harness.files import atomic_write_text, read_jsonl
from data import BadRecord

from model import load_model
from model.llava import Llava, LlavaConfig, preset, token_logprobs
from model.loading import read_config, read_vision_config
from model.lora import apply_lora, export_merged, lora_disabled, lora_parameters
from model.tokenizer import IMAGE_TOKEN, load_tokenizer, tokenizer_file
from harness.rundir import (PATH_FIELDS, check_out, load_checkpoint, plot_metrics, report_skipped,
                    require_matplotlib, save_checkpoint, save_weights, start_run, write_run_start)

# ---------------------------------------------------------------------------------------------
# The method: the reward and the losses of Stage 3 (docs/METHOD.md), one function per equation.


def reward(policy_logp: torch.Tensor, ref_logp: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """r(y) = γ · ( log π_θ(y|i,x) − log π_ref(y|i,x) ), DPO's reward of a response."""
    return gamma * (policy_logp - ref_logp)


def explicit_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                  rejected_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5, explicit: L_E = − Σ_{j=1..k} log σ( r(y_w) − r(y_lj) ), preferred vs each negative.

    reward_chosen (B,), reward_rejected (B, K), rejected_mask (B, K) bool: absent negatives
    contribute no pair. Returns the sum per entry (B,).
    """
    pairs = -F.logsigmoid(reward_chosen[:, None] - reward_rejected)      # (B, K)
    return pairs.where(rejected_mask, 0.0).sum(1)


def implicit_loss(reward_rejected: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6, implicit: L_I = − Σ_{j<j′} log σ( r(y_lj) − r(y_lj′) ), the more similar negative
    preferred (negatives are ranked best first: pairs (1,2), (1,3), (2,3) when k = 3).

    reward_rejected (B, K), rejected_mask (B, K) bool. Returns the sum per entry (B,).
    """
    K = reward_rejected.shape[1]
    diff = reward_rejected[:, :, None] - reward_rejected[:, None, :]     # (B, K, K): r_j − r_j′
    upper = torch.ones(K, K, dtype=torch.bool, device=diff.device).triu(1)  # j < j′
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
# log π(y|i,x) of every row of a batch, straight from the decoder's hidden states.


def row_logprobs(model, base, rows: Rows, pixels: torch.Tensor | None, chunk_rows: int,
                 train_vision: bool = False) -> torch.Tensor:
    """log π(y|i,x) of every row (R,): each image encoded once, and each example's shared prefix
    (image, prompt, common answer start) run once for all its rows (batches.Rows).

    `model` is what runs the decoder (the DDP wrapper when distributed), `base` the Llava inside.
    The vision tower and projector are frozen (no graph kept) unless `train_vision` (--full).
    """
    features = None
    if pixels is not None:
        with contextlib.nullcontext() if train_vision else torch.no_grad():
            images = base.encode_images(pixels.to(base.device, base.dtype))   # (B_img, N, D)
        features = images[rows.seq_image[rows.seq_image >= 0]]              # (S_img, N, D)
    hidden = model(rows.input_ids, attention_mask=rows.visible, position_ids=rows.position_ids,
                   image_features=features, return_hidden=True)               # (S, T, D)
    hidden = hidden[rows.seq[:, None], rows.positions]                        # (R, P, D)
    return hidden_logprob(hidden, base.lm_head.weight, rows.labels, rows.label_mask, chunk_rows)


def hidden_logprob(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor, chunk_rows: int = 256) -> torch.Tensor:
    """log π(y|i,x) per row from the decoder's hidden states: Σ over the masked positions t of
    log softmax(hidden[t] @ lm_head_weightᵀ)[labels[t]] (tests/oracles.py: the same from logits).

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
    return token_logprobs(F.linear(h, weight).float(), targets)     # (C, V) logits → (C,)


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


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict:
    """Run the stage described by `cfg`; returns the last step's and the final eval's metrics."""
    ctx = setup_context(cfg.device, cfg.autocast)
    out = Path(cfg.out)
    check_out(out, cfg)  # before anything slow: never mix two runs in one --out
    if cfg.plot:
        require_matplotlib()
    dtype = resolve_dtype(cfg.dtype, ctx.device)

    # Data, read before the (slow) model load: bad records and unusable images are reported and
    # skipped, and what made the run is checked against --out's provenance.json.
    tokenizer_path = tokenizer_file(cfg.tokenizer or cfg.model)
    tokenizer = read_tokenizer(tokenizer_path)
    config = model_config(cfg, tokenizer)
    ctx.pad_id = config.text.pad_token_id or 0
    tokens = Tokens(tokenizer, config)
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.data).parent
    aspect, source = resolve_image_aspect(cfg.image_aspect, Path(cfg.data) if cfg.stage == "preference" else None)
    cfg = dataclasses.replace(cfg, image_aspect=aspect)
    if ctx.rank == 0:
        print(f"images: {'padded' if aspect == 'pad' else 'resized'} to a square (--image-aspect {aspect}, "
              f"{source})", file=sys.stderr)
    examples, held_out, bad, images = read_data(cfg, tokens, tokenizer_path, image_root, ctx)
    per_step = cfg.micro_batch * ctx.world
    if cfg.batch_size % per_step:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch × processes = {per_step}")
    accum = cfg.batch_size // per_step
    steps_per_epoch = len(examples) // cfg.batch_size  # the last partial batch of each epoch is dropped
    if steps_per_epoch == 0:
        if ctx.rank == 0:
            report_skipped(bad)
        raise UserError(f"{cfg.data}: {len(examples)} training entries ({len(bad)} records skipped"
                        f"{', listed above' if bad else ''}): fewer than one batch of --batch-size {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs

    now = run_fingerprint(cfg, tokenizer_path, image_root, images, dtype, ctx)
    start_run(out, now, cfg, ctx)
    if ctx.rank == 0:
        write_run_start(out, cfg, bad)
        print(f"{len(examples)} training entries, {len(held_out)} held out, {len(bad)} skipped"
              + (f" (listed in {out / 'bad_records.jsonl'})" if bad else ""))

    torch.manual_seed(cfg.seed)  # LoRA init (and a --init-preset model): identical on every process
    if cfg.init_preset:
        base = new_model(cfg.init_preset, tokenizer_path, dtype, ctx.device)
    else:
        base = load_model(cfg.model, vision_tower=cfg.vision_tower, dtype=dtype, device=ctx.device)
    if not cfg.full:
        apply_lora(base, cfg.targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)

    ref = reference_logprobs(base, examples + held_out, cfg, reference_cache_key(now, cfg), ctx) \
        if cfg.stage == "preference" else {}

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
    if ctx.rank == 0:  # drop what an interrupted run logged after its last checkpoint (and a torn last line)
        kept = [m for m in (read_jsonl(metrics_path, repair=True) if cfg.resume else []) if m.get("step", 0) <= start]
        atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

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
        if cfg.plot:
            plot_metrics(metrics_path, out / "metrics.png")
            print(f"wrote {out / 'metrics.png'}")
        if cfg.export_merged and not cfg.full:
            export_merged(base, out / "merged", source=cfg.model)
            print(f"wrote {out / 'merged'} (LoRA merged, in the input's key layout)")
        print(f"wrote {weights}" + ("" if cfg.full else " (PEFT format)"))
    ctx.barrier()
    return last


def read_data(cfg: TrainConfig, tokens: Tokens, tokenizer_path: Path, image_root: Path, ctx: Context):
    """(training examples, held-out examples, skipped records, every image file looked at, relative
    to `image_root`). A bad record, or one whose image cannot be decoded and preprocessed, is
    skipped; images are checked once each, the processes sharing the files, so that every
    process keeps the same examples."""
    say = (lambda line: print(line, file=sys.stderr)) if ctx.rank == 0 else None
    tokenizer_sha256 = provenance.file_digest(tokenizer_path)

    def read(path: Path):
        if cfg.stage == "sft":
            return read_sft(path, image_root, tokens, cfg)
        return read_preferences(path, image_root, tokens, cfg, tokenizer_sha256, say)

    examples, bad = read(Path(cfg.data))
    held_out, bad_eval = read(Path(cfg.eval_data)) if cfg.eval_data else ([], [])
    images = sorted({ex.image for ex in examples + held_out if ex.image is not None})
    mine = unusable_images(images[ctx.rank::ctx.world], tokens.image_size, cfg.image_aspect)
    unusable = ctx.gather_dicts({str(path): why for path, why in mine.items()})
    examples, bad_images = drop_unusable(examples, unusable, image_root)
    held_out, bad_eval_images = drop_unusable(held_out, unusable, image_root)
    if not cfg.eval_data:
        examples, held_out = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    names = [path.relative_to(image_root).as_posix() for path in images]
    return examples, held_out, bad + bad_eval + bad_images + bad_eval_images, names


def drop_unusable(examples: list[Example], unusable: dict[str, str], image_root: Path):
    """(examples whose image is usable, a BadRecord for each of the others)."""
    kept, bad = [], []
    for ex in examples:
        why = unusable.get(str(ex.image)) if ex.image is not None else None
        if why is None:
            kept.append(ex)
        else:
            name = ex.image.relative_to(image_root).as_posix()
            bad.append(BadRecord(ex.file, ex.index, ex.id, f"image {name}: {why}"))
    return kept, bad


def batch_loss(model, base, batch: list[Example], ref: dict, cfg: TrainConfig, ctx: Context):
    """The micro-batch's loss and the detached log-probs for the step's metrics."""
    rows = collate(batch, ctx.pad_id).to(ctx.device)
    pixels = batch_pixels(batch, base.config.vision.image_size, cfg.image_aspect)
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
            pixels = batch_pixels(batch, base.config.vision.image_size, cfg.image_aspect)
            logp = row_logprobs(base, base, collate(batch, ctx.pad_id).to(ctx.device), pixels,
                                cfg.logit_chunk).tolist()
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


def new_model(preset_name: str, tokenizer_path: str | os.PathLike, dtype: torch.dtype, device) -> Llava:
    """A randomly initialised model of preset `preset_name` (`--init-preset`), sized to the
    tokenizer's vocabulary with its `<image>` token as the image placeholder."""
    return Llava(preset_config(preset_name, read_tokenizer(tokenizer_path))).to(device=device, dtype=dtype)


def preset_config(preset_name: str, tokenizer) -> LlavaConfig:
    """The config of `new_model`: the preset, with the tokenizer's vocabulary size and <image> id."""
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        raise UserError(f"--init-preset: the tokenizer has no {IMAGE_TOKEN} token")
    config = preset(preset_name, image_token_id=image_id)
    config.text = dataclasses.replace(config.text, vocab_size=tokenizer.get_vocab_size())
    return config


def model_config(cfg: TrainConfig, tokenizer) -> LlavaConfig:
    """The model's config without its weights (the data is read before the slow weight load)."""
    if cfg.init_preset:
        return preset_config(cfg.init_preset, tokenizer)
    for flag, path in (("--model", cfg.model), ("--vision-tower", cfg.vision_tower)):
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: " + ("not a directory" if Path(path).exists() else "directory not found"))
    vision = read_vision_config(Path(cfg.vision_tower)) if cfg.vision_tower else None
    return read_config(Path(cfg.model), vision)


def read_tokenizer(path: str | os.PathLike):
    """model.tokenizer.load_tokenizer, with a file it cannot read reported as one line."""
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {path}: {e}") from None


def resolve_image_aspect(given: str | None, prefs: Path | None) -> tuple[str, str]:
    """(--image-aspect, where it comes from): as given, else what hscr.py used for the preference
    file (its header's image_aspect), else pad (LLaVA-Med's)."""
    header = preference_header(prefs) if prefs is not None else None
    made = None
    if header:
        for where in ("options", "provenance"):
            if isinstance(header.get(where), dict) and header[where].get("image_aspect") in ("pad", "resize"):
                made = header[where]["image_aspect"]
                break
    if given is not None:
        note = "as given" if made in (None, given) else f"as given; the preference data was made with {made}"
        return given, note
    if made is not None:
        return made, f"as hscr.py made {prefs.name}"
    return "pad", "the default" + (f"; {prefs.name} does not record one" if prefs is not None else "")


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass. The layer's forward is wrapped in
    place (not the module), so parameter names and checkpoints are unchanged."""
    for layer in model.language_model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ---------------------------------------------------------------------------------------------
# Reference log-probs, computed once with LoRA disabled and cached beside the preference file.


# The fingerprint's inputs that reference log-probs depend on (all but the adapter-free options).
REFERENCE_INPUTS = ("model", "vision tower", "tokenizer", "data", "eval data", "images")


def reference_cache_key(now: dict, cfg: TrainConfig) -> dict:
    """What the cached reference log-probs depend on, by content (from the run's fingerprint
    `now`; paths left out, so moving the data or the images keeps the cache): the weights, the
    tokenizer, the data, every image, and the options that shape the rows or the arithmetic.
    Any change gives another key, hence another cache file."""
    def content(part):
        return {k: v for k, v in part.items() if k not in ("path", "root")} if isinstance(part, dict) else part
    key = {name: content(now.get(name)) for name in REFERENCE_INPUTS}
    key.update({name: now.get(name) for name in ("image_aspect", "dtype", "autocast", "max_response_tokens",
                                                "max_length")})
    key["negatives"] = cfg.negatives
    # A --init-preset model is random: its weights are the preset, the tokenizer and the seed.
    key["init"] = [cfg.init_preset, cfg.seed] if cfg.init_preset else None
    return key


def reference_cache_path(cfg: TrainConfig, key: dict) -> Path:
    """prefs.jsonl → prefs.reflogp-<8 hex digits of the key>.json, beside the preference file, so
    that runs with other settings (another model, --loss dpo, …) keep their own caches."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.data).with_suffix(f".reflogp-{digest}.json")


def reference_logprobs(base, examples: list[Example], cfg: TrainConfig, key: dict, ctx) -> dict[str, list[float]]:
    """{entry id: [log π_ref(y_w), log π_ref(y_l1), …]}: read from the cache file of `key`, the
    missing ones computed with LoRA disabled (processes sharing the work) and the file rewritten."""
    path = reference_cache_path(cfg, key)
    cached = {}
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("logp"), dict):
            cached = stored["logp"]
    except (OSError, ValueError):  # absent, unreadable or torn: it is only a cache, computed again
        pass
    todo = [ex for ex in examples if ex.id not in cached]
    if todo:
        mine = todo[ctx.rank::ctx.world]
        computed = {}
        base.eval()
        with torch.no_grad(), lora_disabled(base), ctx.autocast():
            for s in range(0, len(mine), cfg.micro_batch):
                batch = mine[s:s + cfg.micro_batch]
                logp = row_logprobs(base, base, collate(batch, ctx.pad_id).to(ctx.device),
                                    batch_pixels(batch, base.config.vision.image_size, cfg.image_aspect),
                                    cfg.logit_chunk).tolist()
                for ex in batch:
                    computed[ex.id], logp = logp[:len(ex.rows)], logp[len(ex.rows):]
        cached.update(ctx.gather_dicts(computed))
        if ctx.rank == 0:
            try:
                atomic_write_text(path, json.dumps({"key": key, "logp": cached}))
            except OSError as e:  # a read-only data directory: the run goes on without a cache
                print(f"cannot cache reference log-probs in {path}: {e}", file=sys.stderr)
    return cached


def run_fingerprint(cfg: TrainConfig, tokenizer_path: Path, image_root: Path, image_names: list[str],
                    dtype: torch.dtype, ctx: Context) -> dict:
    """What the trained weights depend on, by content (harness/provenance.py): the base model (or the
    preset it is built from), vision tower, tokenizer file, data and eval data files, the images
    read (every image file of the records that reached the image check, usable or not), and every
    option that changes results, with dtype, autocast and the image aspect as resolved and the
    number of processes (dropout draws one stream per process). Paths and the options of
    RESUMABLE_FIELDS are left out."""
    parts = {
        "model": provenance.Dir(cfg.model) if not cfg.init_preset else None,
        "vision tower": provenance.Dir(cfg.vision_tower) if cfg.vision_tower and not cfg.init_preset else None,
        "tokenizer": provenance.File(tokenizer_path),
        "data": provenance.File(cfg.data),
        "eval data": provenance.File(cfg.eval_data) if cfg.eval_data else None,
        "images": provenance.Files(image_root, image_names),
    }
    options = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in PATH_FIELDS and k not in RESUMABLE_FIELDS}
    options.update(dtype=str(dtype).removeprefix("torch."), autocast=ctx.amp, world_size=ctx.world)
    return provenance.fingerprint(**parts, **options)


# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass; the command line is built from its fields.


@dataclass
class TrainConfig:
    model: str | None = option(None, "checkpoint directory (LLaVA-Med, llava-hf or our own)")
    data: str | None = option(None, "preference JSONL from hscr.py, or LLaVA instruction JSON with --stage sft")
    out: str = option("runs/train", "output directory: config.json, metrics.jsonl, adapter/, checkpoints/")
    stage: str = option("preference", "preference: HSCR / DPO on preference data; sft: next-token training "
                        "on answers (the demo's vision pretraining: python -m demo.base vision)",
                        choices=("preference", "sft"))
    image_root: str | None = option(None, "directory the records' image paths are relative to "
                                    "(default: the data file's directory)")
    image_aspect: str | None = option(None, "pad: images padded to a square with the CLIP mean colour (LLaVA-Med); "
                                      "resize: stretched to a square (default: what hscr.py used, from the "
                                      "preference file's header, else pad)", choices=("pad", "resize"))
    vision_tower: str | None = option(None, "separate CLIP directory for the vision tower")
    init_preset: str | None = option(None, "build a randomly initialised model of this preset (model/llava.py "
                                     "PRESETS; vocab size and image token from --tokenizer) instead of loading "
                                     "--model; implies --full", choices=("tiny",))
    full: bool = option(False, "train every parameter (vision tower, projector, decoder) instead of LoRA; "
                        "saves the whole model to out/model/")
    tokenizer: str | None = option(None, "tokenizer.json / tokenizer.model / directory (default: --model)")
    eval_data: str | None = option(None, "held-out file (default: --eval-fraction of --data)")
    eval_fraction: float = option(0.05, "share of --data held out for evaluation when --eval-data is not given")
    # Loss (docs/METHOD.md, Stage 3)
    loss: str = option("hscr", "hscr = explicit + implicit (Eq. 7); dpo = explicit with y_l1 only",
                       choices=tuple(LOSSES))
    gamma: float = option(0.1, "γ of the reward r(y) = γ·(log π_θ − log π_ref)")
    max_negatives: int = option(3, "negatives per entry used (the first, most similar ones)")
    min_negatives: int = option(1, "entries with fewer negatives are skipped (reported)")
    # LoRA
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: float = option(32.0, "LoRA α (scale α/r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                               "comma-separated linear layer names of the language model")
    # Optimisation
    epochs: int = option(2, "passes over the training data (paper: 2)")
    batch_size: int = option(16, "entries per optimizer step, over all processes (paper: 16)")
    micro_batch: int = option(2, "entries per forward pass and process; accumulation fills the rest")
    lr: float = option(2e-5, "peak learning rate (the paper reports 5e-7, which barely moves LoRA)")
    weight_decay: float = option(0.0, "AdamW weight decay (paper: none)")
    warmup_ratio: float = option(0.1, "share of the steps with linear warmup")
    min_lr_ratio: float = option(0.0, "cosine decays to lr × this")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    seed: int = option(0, "seed of data order, held-out split, LoRA init and dropout")
    max_steps: int | None = option(None, "stop after this many optimizer steps (the schedule still spans all epochs)")
    # Sequences
    max_response_tokens: int = option(512, "responses are cut to this many tokens (EOS included)")
    max_length: int = option(2048, "longer sequences are skipped (reported)")
    # Efficiency
    device: str = option("auto", "cpu, cuda, cuda:N (auto: the local GPU under torchrun, else cuda if present)")
    dtype: str = option("auto", "weights of the base model (auto: bf16 on GPU, fp32 on CPU)",
                        choices=("auto", *DTYPES))
    autocast: bool = option(True, "bf16 autocast on GPU")
    gradient_checkpointing: bool = option(False, "recompute decoder layers in the backward pass")
    logit_chunk: int = option(256, "response positions per chunk of the vocabulary projection")
    # Bookkeeping
    eval_every: int = option(50, "evaluate held-out preference accuracy every N steps (0: only at the end)")
    save_every: int = option(100, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept on disk")
    resume: bool = option(False, "continue from the latest checkpoint in --out (its inputs and options must be "
                          "those that made it: out/provenance.json)")
    overwrite: bool = option(False, "delete the run in --out (what train.py wrote there) and start again")
    export_merged: bool = option(False, "also write the base model with LoRA merged, in the input's layout")
    plot: bool = option(True, "write metrics.png at the end (needs matplotlib)")

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
        if self.resume and self.overwrite:
            problems.append("--resume continues the run in --out, --overwrite deletes it: choose one")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def negatives(self) -> int:
        """Negatives per entry that are forwarded: DPO uses y_l1 only."""
        return 1 if self.loss == "dpo" else self.max_negatives


# Fields that may change between a run and its --resume: how to start, how long, what to log and
# keep, where to run, and memory knobs that compute the same values (gradient checkpointing, the
# chunk of the vocabulary projection). Every other option is in the fingerprint (run_fingerprint).
RESUMABLE_FIELDS = {"resume", "overwrite", "max_steps", "eval_every", "save_every", "keep_checkpoints",
                    "export_merged", "plot", "device", "gradient_checkpointing", "logit_chunk"}


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(TrainConfig, prog="python train.py train", description=__doc__)


def config_from_args(argv: list[str]) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


# ---------------------------------------------------------------------------------------------
# Command line: the trainer, or the embedded demo (demo/run.py, imported only to run it)

# Options that only the trainer has: an argument list holding one goes to the trainer.
TRAINER_FLAGS = ("--model", "--data", "--init-preset", "--stage")


def wants_trainer(argv: list[str]) -> bool:
    """`train …`, or the trainer's own options without the subcommand (the README's commands)."""
    return argv[:1] == ["train"] or any(a.split("=", 1)[0] in TRAINER_FLAGS for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not wants_trainer(argv):
        from demo.run import main as demo_main
        return demo_main(argv)
    if argv[:1] == ["train"]:
        argv = argv[1:]
    if "--stage=vision" in argv or any(a == "--stage" and b == "vision" for a, b in zip(argv, argv[1:])):
        build_parser().error("the demo's vision pretraining is `python -m demo.base vision` (same options)")
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
    sys.exit(run_main(main))
