"""Stage 3 of HSCR: multi-level preference optimization of LoRA adapters (model/lora.py) on hscr.py's
preference data (docs/METHOD.md, Stage 3). π_ref is π_θ with LoRA disabled [ours]; y_w is an entry's
chosen response, y_l1 … y_lk its k ≤ --num-negatives negatives, most similar first. [paper] marks the
paper's rule, [ours] a decision of this implementation:

    r(y)   = γ · ( log π_θ(y|i,x) − log π_ref(y|i,x) )   reward           γ = 0.1 [paper]
    L_E    = − Σ_{j=1..k} log σ( r(y_w) − r(y_lj) )       explicit_loss    Eq. 5 [paper]
    L_I    = − Σ_{j<j′}   log σ( r(y_lj) − r(y_lj′) )     implicit_loss    Eq. 6 [paper]
    L_HSCR = L_E + L_I                                    multilevel_loss  Eq. 7 [paper], averaged
                                                                           over a batch's entries [ours]
    --loss hscr | explicit | implicit | dpo               preference_loss  dpo: DPO's Eq. 1 [paper],
                                                                           L_E on y_l1 alone [ours]

log π(y|i,x) sums the response tokens' log-probabilities (row_logprobs); log π_ref is computed once and
cached beside the preference file [ours]. `python train.py train [options]` (or any --model / --data) runs
the trainer (docs/METHOD.md, docs/FORMATS.md), plain `python train.py [demo|ablation]` the demo on a CPU.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import Example, batch_pixels, loss_inputs
from harness import rundir
from harness.cli import UserError, dataclass_parser, option, run_main
from harness.dist import Context, setup_context
from model import load_model
from model.llava import enable_gradient_checkpointing, token_logprobs
from model.loading import DTYPES, resolve_dtype
from model.lora import DEFAULT_TARGETS, apply_lora, lora_disabled, lora_parameters
from model.rows import Rows, collate


# The method: the reward and the losses of Stage 3, one function per equation.
def reward(policy_logp: Tensor, ref_logp: Tensor, gamma: float = 0.1) -> Tensor:
    """r(y) = γ · ( log π_θ(y|i,x) − log π_ref(y|i,x) ), DPO's reward of a response."""
    return gamma * (policy_logp - ref_logp)


def explicit_loss(reward_chosen: Tensor, reward_rejected: Tensor, rejected_mask: Tensor) -> Tensor:
    """Eq. 5, explicit: L_E = − Σ_{j=1..k} log σ( r(y_w) − r(y_lj) ), preferred vs each negative.
    reward_chosen (B,), reward_rejected (B, K), rejected_mask (B, K) bool (absent: no pair) → (B,)."""
    pairs = -F.logsigmoid(reward_chosen[:, None] - reward_rejected)      # (B, K)
    return pairs.where(rejected_mask, 0.0).sum(1)


def implicit_loss(reward_rejected: Tensor, rejected_mask: Tensor) -> Tensor:
    """Eq. 6, implicit: L_I = − Σ_{j<j′} log σ( r(y_lj) − r(y_lj′) ), the more similar negative
    preferred. reward_rejected (B, K) ranked best first, rejected_mask (B, K) bool → (B,)."""
    K = reward_rejected.shape[1]
    diff = reward_rejected[:, :, None] - reward_rejected[:, None, :]     # (B, K, K): r_j − r_j′
    upper = torch.ones(K, K, dtype=torch.bool, device=diff.device).triu(1)  # j < j′
    pair_mask = rejected_mask[:, :, None] & rejected_mask[:, None, :] & upper
    return (-F.logsigmoid(diff)).where(pair_mask, 0.0).sum((1, 2))


def multilevel_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask, gamma=0.1,
                    explicit=True, implicit=True) -> tuple[Tensor, dict[str, float]]:
    """Eq. 7: L_HSCR = L_E + L_I, averaged over the entries (one without a pair of a level still counts).
    Log-probs: chosen (B,), rejected (B, K) ranked best first, rejected_mask (B, K) bool. Metrics: loss
    per level, mean rewards, margins r(y_w) − r(y_lj) and pair accuracies over the pairs present."""
    if not (explicit or implicit):
        raise ValueError("multilevel_loss needs explicit or implicit (or both)")
    mask = rejected_mask.bool()
    r_w = reward(policy_chosen, ref_chosen, gamma)                      # (B,)
    # Absent negatives may hold anything (padding, NaN): zeroed first, seen by neither loss nor gradient.
    r_l = reward(policy_rejected.where(mask, 0.0), ref_rejected.where(mask, 0.0), gamma)  # (B, K)
    l_e, l_i = explicit_loss(r_w, r_l, mask), implicit_loss(r_l, mask)  # (B,), (B,)
    loss = sum([l for l, on in ((l_e, explicit), (l_i, implicit)) if on], torch.zeros_like(r_w)).mean()
    with torch.no_grad():
        K = mask.shape[1]
        margins = (r_w[:, None] - r_l)[mask]                            # (pairs,)
        pair_mask = mask[:, :, None] & mask[:, None, :] & mask.new_ones(K, K).triu(1)  # j < j′
        implicit_diff = (r_l[:, :, None] - r_l[:, None, :])[pair_mask]
        metrics = {"loss": loss, "loss_explicit": l_e.mean(), "loss_implicit": l_i.mean(),
                   "reward_chosen": r_w.mean()}
        if margins.numel():
            metrics.update(reward_rejected=r_l[mask].mean(), margin=margins.mean(),
                           accuracy_explicit=(margins > 0).float().mean())
        levels = [f"reward_rejected_{j + 1}" for j in range(K)]  # the j-th negative's (NaN where none)
        metrics.update({name: r_l[:, j][mask[:, j]].mean() for j, name in enumerate(levels)})
        if implicit_diff.numel():
            metrics["accuracy_implicit"] = (implicit_diff > 0).float().mean()
        # One host sync reads them all (in the widest dtype: the same floats), with the levels present.
        values = torch.stack([*metrics.values(), *mask.any(0)]).tolist()
        present = dict(zip(levels, values[len(metrics):]))
        metrics = {k: v for k, v in zip(metrics, values) if present.get(k, True)}
    return loss, metrics


# `--loss`: which levels each variant uses; `dpo` is the explicit level with y_l1 only.
LOSSES = {"hscr": (True, True), "explicit": (True, False), "implicit": (False, True), "dpo": (True, False)}


def preference_loss(kind: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask,
                    gamma: float = 0.1) -> tuple[Tensor, dict[str, float]]:
    """The loss that `--loss kind` selects (a choice of LOSSES), on the same inputs as multilevel_loss."""
    k = 1 if kind == "dpo" else None  # the negatives used: dpo's y_l1, else all
    return multilevel_loss(policy_chosen, policy_rejected[:, :k], ref_chosen, ref_rejected[:, :k],
                           rejected_mask[:, :k], gamma, *LOSSES[kind])


# log π(y|i,x) of every row of a batch, straight from the decoder's hidden states.
def row_logprobs(model, base, rows: Rows, pixels: Tensor | None, chunk_rows: int, train_vision=False):
    """log π(y|i,x) of every row (R,), each example's shared prefix run once (model/rows.py).
    `model` runs the decoder (the DDP wrapper when distributed), `base` is the Llava inside; the
    vision tower and projector are frozen (no graph kept) unless `train_vision` (demo/base.py)."""
    features = None
    if pixels is not None:
        with contextlib.nullcontext() if train_vision else torch.no_grad():
            images = base.encode_images(pixels.to(base.device, base.dtype))   # (B_img, N, D)
        features = images[rows.seq_image[rows.seq_image >= 0]]              # (S_img, N, D)
    hidden = model(rows.input_ids, attention_mask=rows.visible, position_ids=rows.position_ids,
                   image_features=features, return_hidden=True)               # (S, T, D)
    hidden = hidden[rows.seq[:, None], rows.positions]                        # (R, P, D)
    return hidden_logprob(hidden, base.lm_head.weight, rows.labels, rows.label_mask, chunk_rows)


def hidden_logprob(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, chunk_rows=256) -> Tensor:
    """log π(y|i,x) per row, Σ_t log softmax(hidden[t] @ weightᵀ)[labels[t]] over the masked t, weight the
    lm_head's (tests/oracles.py: the same from logits). hidden (R, P, D) at the positions that predict
    `labels` (R, P); mask (R, P) bool → (R,) fp32. Projected `chunk_rows` positions at a time, each chunk
    checkpointed when gradients are on: peak memory is one chunk of fp32 logits and its gradient."""
    R, P, D = hidden.shape
    rows = mask.reshape(R * P).nonzero().squeeze(1)                 # (M,) masked positions
    h = hidden.reshape(R * P, D)[rows]                               # (M, D)
    targets = labels.reshape(R * P)[rows]                            # (M,)
    track = torch.is_grad_enabled() and h.requires_grad
    parts = []
    for s in range(0, rows.numel(), chunk_rows):
        args = (h[s:s + chunk_rows], weight, targets[s:s + chunk_rows])
        parts.append(checkpoint(_chunk_logp, *args, use_reentrant=False) if track else _chunk_logp(*args))
    token_logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return torch.zeros(R, dtype=torch.float32, device=hidden.device).index_add(0, rows // P, token_logp)


def _chunk_logp(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return token_logprobs(F.linear(h, weight).float(), targets)     # (C, V) logits → (C,)


def train(cfg: TrainConfig) -> dict:
    """One run of Stage 3 as `cfg` describes it; returns the last step's metrics (with the final
    eval's), or {"step", "reused": True} when --resume finds the run finished (rundir.start_training)."""
    ctx = setup_context(cfg.device, cfg.autocast)
    out, cfg = Path(cfg.out), rundir.made_by(cfg)  # by default the model and images that made --data
    rundir.check_out(out, cfg)  # before anything slow: never mix two runs in one --out
    if cfg.plot:
        rundir.require_matplotlib()
    dtype = resolve_dtype(cfg.dtype, ctx.device)
    # Data, read before the (slow) model load; what made the run is checked against --out's.
    data = rundir.read_inputs(cfg, ctx)
    cfg = replace(cfg, image_aspect=data.image_aspect)
    ctx.pad_id = data.config.text.pad_token_id or 0
    examples, held_out, bad = data.examples, data.held_out, data.bad
    accum = cfg.batch_size // (cfg.micro_batch * ctx.world)  # micro-batches per process and step
    steps_per_epoch = len(examples) // cfg.batch_size  # the last partial batch of each epoch is dropped
    total = steps_per_epoch * cfg.epochs
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    now = rundir.run_fingerprint(cfg, data.tokenizer_digest, data.image_root, data.images, dtype, ctx)
    if rundir.start_training(out, now, end, cfg, ctx):  # --resume of this very run, finished: nothing to do
        return {"step": end, "reused": True}
    if ctx.rank == 0:
        rundir.write_run_start(out, cfg, bad, f"{len(examples)} training entries, {len(held_out)} held out")

    torch.manual_seed(cfg.seed)  # LoRA init: identical on every process
    base = load_model(cfg.model, vision_tower=cfg.vision_tower, dtype=dtype, device=ctx.device,
                      check_finite=cfg.check_finite)
    apply_lora(base, cfg.targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    with lora_disabled(base):  # log π_ref: computed once, cached beside --data
        key = rundir.reference_cache_key(now, cfg.negatives)
        ref = rundir.cached_logprobs(Path(cfg.data), key, examples + held_out,
                                     lambda todo: logprobs_by_id(base, todo, cfg, ctx), ctx)
    params = list(lora_parameters(base))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_lambda, warmup=int(cfg.warmup_ratio * total), total=total, min_ratio=cfg.min_lr_ratio))
    start = rundir.load_checkpoint(out, base, optimizer, scheduler, ctx) if cfg.resume else 0
    if start == 0:
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # dropout: its own stream per process
    metrics_path = rundir.start_metrics(out, start, cfg, ctx)

    model = ctx.distributed(base)  # DDP under torchrun, else `base` itself
    base.train()
    progress = tqdm(range(start, end), initial=start, total=end, desc="train", dynamic_ncols=True,
                    disable=ctx.rank > 0)
    last = {}
    for step in progress:
        t0 = time.time()
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch = [examples[i] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size].tolist()]
        mine = batch[ctx.rank::ctx.world]  # this process's share of the global batch
        parts = []
        for micro in range(accum):
            micro_batch = mine[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch]
            with ctx.no_sync(model, micro < accum - 1):  # DDP all-reduces gradients on the last only
                loss, part = batch_loss(model, base, micro_batch, ref, cfg, ctx)
                (loss / accum).backward()
            parts.append(part)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # Metrics of the global batch: every micro-batch of every process (the mask travels as 0/1).
        tensors = [ctx.gather_tensors(torch.cat([p[i] for p in parts]).float()) for i in range(5)]
        _, metrics = preference_loss(cfg.loss, *tensors[:4], tensors[4].bool(), gamma=cfg.gamma)
        last = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm.item(), **metrics,
                "seconds": round(time.time() - t0, 3)}
        if not math.isfinite(last["loss"] + last["grad_norm"]):  # read above: no wait of its own
            raise UserError(f"step {step + 1}: loss {last['loss']}, gradient norm {last['grad_norm']}; "
                            f"stopped, nothing of it saved: {out} keeps the last good checkpoint, if any")
        done = step + 1 == end
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
            policy = logprobs_by_id(base, held_out, cfg, ctx)  # held-out metrics, processes sharing the work
            base.train()
            both = [torch.tensor([v for ex in held_out for v in d[ex.id]]) for d in (policy, ref)]
            _, held = preference_loss(cfg.loss, *loss_inputs(*both, held_out, cfg.negatives), gamma=cfg.gamma)
            last.update({f"eval_{k}": v for k, v in held.items()})
        if ctx.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            shown = ("loss", "margin", "accuracy_explicit")
            progress.set_postfix({k: f"{last[k]:.4g}" for k in shown if k in last})
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            rundir.save_checkpoint(out, step + 1, base, optimizer, scheduler, cfg, ctx)
    rundir.write_outputs(base, out, cfg, end, ctx)
    return last


def batch_loss(model, base, batch: list[Example], ref: dict, cfg: TrainConfig, ctx: Context):
    """The micro-batch's loss and the detached log-probs for the step's metrics (benchmarks/plan.py too)."""
    rows = collate(batch, ctx.pad_id).to(ctx.device)
    pixels = batch_pixels(batch, base.config.vision.image_size, cfg.image_aspect)
    with ctx.autocast():
        logp = row_logprobs(model, base, rows, pixels, cfg.logit_chunk)  # (R,)
    ref_logp = torch.tensor([v for ex in batch for v in ref[ex.id]], device=ctx.device)  # (R,)
    inputs = loss_inputs(logp, ref_logp, batch, cfg.negatives)
    loss, _ = preference_loss(cfg.loss, *inputs, gamma=cfg.gamma)
    return loss, [t.detach() for t in inputs]


@torch.no_grad()
def logprobs_by_id(base, examples: list[Example], cfg: TrainConfig, ctx: Context) -> dict[str, list[float]]:
    """{entry id: [log π(y_w), log π(y_l1), …]} under `base` as it is (LoRA on: π_θ; inside lora_disabled:
    π_ref), in eval mode; each process computes its share, in micro-batches, and every process gets all."""
    mine = examples[ctx.rank::ctx.world]
    base.eval()
    out = {}
    with ctx.autocast():
        for s in range(0, len(mine), cfg.micro_batch):
            batch = mine[s:s + cfg.micro_batch]
            logp = row_logprobs(base, base, collate(batch, ctx.pad_id).to(ctx.device),
                                batch_pixels(batch, base.config.vision.image_size, cfg.image_aspect),
                                cfg.logit_chunk).tolist()                      # rows of the batch
            for ex in batch:
                out[ex.id], logp = logp[:len(ex.rows)], logp[len(ex.rows):]
    return ctx.gather_dicts(out)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# Configuration: one dataclass, from which the command line is built; the command line.
@dataclass
class TrainConfig:
    model: str | None = option(None, "checkpoint directory (default: the model that made --data)")
    data: str | None = option(None, "preference JSONL from hscr.py")
    out: str = option("runs/train", "output directory: config.json, metrics.jsonl, adapter/, checkpoints/")
    image_root: str | None = option(None, "root of the image paths (default: hscr.py's, else --data's dir)")
    image_aspect: str | None = option(None, "pad to a square with CLIP's mean colour (LLaVA-Med), or stretch "
                                      "(default: hscr.py's choice, else pad)", choices=("pad", "resize"))
    vision_tower: str | None = option(None, "separate CLIP directory (default without --model: --data's)")
    allow_other_model: bool = option(False, "train although another model made --data (off-policy, e.g. DPO)")
    check_finite: bool = option(True, "refuse weights holding NaN or Inf as they load")
    tokenizer: str | None = option(None, "tokenizer.json / tokenizer.model / directory (default: --model)")
    eval_data: str | None = option(None, "held-out file (default: --eval-fraction of --data)")
    eval_fraction: float = option(0.05, "share of --data held out for evaluation when --eval-data is not given")
    # Loss (docs/METHOD.md, Stage 3)
    loss: str = option("hscr", "hscr = explicit + implicit (Eq. 7); dpo = explicit on y_l1", choices=tuple(LOSSES))
    gamma: float = option(0.1, "γ of the reward r(y) = γ·(log π_θ − log π_ref)")
    num_negatives: int = option(3, "k: negatives per entry used, the first (most similar) ones of the record")
    min_negatives: int = option(1, "entries with fewer negatives are skipped (reported)")
    # LoRA
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: float = option(32.0, "LoRA α (scale α/r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option(",".join(DEFAULT_TARGETS), "comma-separated linear layer names of the language model")
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
    dtype: str = option("auto", "base model weights (auto: bf16 on GPU, fp32 on CPU)", choices=("auto", *DTYPES))
    autocast: bool = option(True, "bf16 autocast on GPU")
    gradient_checkpointing: bool = option(False, "recompute decoder layers in the backward pass")
    logit_chunk: int = option(256, "response positions per chunk of the vocabulary projection")
    # Bookkeeping
    eval_every: int = option(50, "evaluate held-out preference accuracy every N steps (0: only at the end)")
    save_every: int = option(100, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept on disk")
    resume: bool = option(False, "continue the run in --out from its last checkpoint; kept if finished (same inputs)")
    overwrite: bool = option(False, "delete the run in --out (what train.py wrote there) and start again")
    export_merged: bool = option(False, "also write the base model with LoRA merged, in the input's layout")
    plot: bool = option(True, "write metrics.png at the end (needs matplotlib)")

    def __post_init__(self):
        problems = ["--data is required"] if self.data is None else []
        if self.num_negatives < 1 or not 0 <= self.min_negatives <= self.num_negatives:
            problems.append("need 0 <= --min-negatives <= --num-negatives and --num-negatives >= 1")
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
        return 1 if self.loss == "dpo" else self.num_negatives  # negatives forwarded: DPO uses y_l1 only


def build_parser():
    return dataclass_parser(TrainConfig, prog="python train.py train", description=__doc__)


def wants_trainer(argv: list[str]) -> bool:
    """`train …`, or the trainer's own --model or --data without it (the README's commands)."""
    return argv[:1] == ["train"] or any(a.split("=", 1)[0] in ("--model", "--data") for a in argv)


def main(argv: list[str] | None = None) -> int:
    """The trainer (`wants_trainer`), or the demo (demo/run.py, imported only to run it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not wants_trainer(argv):
        from demo.run import main as demo_main
        return demo_main(argv)
    parser, argv = build_parser(), argv[1:] if argv[:1] == ["train"] else argv
    if any(a.split("=", 1)[0] in ("--stage", "--init-preset", "--full") for a in argv):  # now demo/base.py's
        parser.error("SFT, --full and --init-preset build the demo's base model: python -m demo.base --help")
    try:
        cfg = TrainConfig(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
