"""What only the demo's from-scratch base model needs: the synthetic world on disk, a vision tower
pretrained on the world's scene labels (the demo's stand-in for CLIP's pretraining), and the
instruction tuning (SFT) of the whole model on LLaVA conversations.

The shipped base (assets/base) is regenerated with (README.md gives the full sequence):

    python -m demo.base world --root .cache/world
    python -m demo.tokenizer assets/base/tokenizer.json --vocab-size 576 --json …
    python -m demo.base vision --init-preset tiny --tokenizer assets/base/tokenizer.json \\
        --data .cache/world/sft.json --out runs/base-vision --batch-size 64 --lr 1e-3 --max-steps 400
    python -m demo.base sft --model runs/base-vision/model --data .cache/world/sft.json …

`vision` trains the tower of a new `--init-preset` model (or of `--model`) with a throw-away head
(`vision_loss`); `sft` trains every parameter of such a model on the answers of LLaVA-format
conversations (`finetune`). Each saves the whole model to OUT/model, with its tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import BadRecord, Example, Tokens, batch_pixels, image_file, load_pixels, read_records
from demo.world import MODALITIES, build_world
from harness.cli import UserError, add_dataclass_options, option, run_main
from harness.dist import dist_env, setup_context
from harness.files import BadLine, DataError, atomic_write_text, read_json_records
from harness.rundir import model_config, read_examples, read_tokenizer, write_run_start
from model import load_model, save_model
from model.llava import Llava, LlavaConfig, preset
from model.loading import DTYPES, resolve_dtype
from model.rows import collate
from model.tokenizer import IMAGE_TOKEN, tokenizer_file
from train import logprobs_by_id, lr_lambda, row_logprobs

# ---------------------------------------------------------------------------------------------
# Scene labels and the loss that reads them off the tower's output tokens

MODALITY_LABELS = MODALITIES  # ("xray", "mri", "ct"): the modality's class index


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


# ---------------------------------------------------------------------------------------------
# Vision pretraining


def pretrain_vision(base: Llava, cfg: VisionConfig, out: Path) -> dict:
    """Train the vision tower (with a throw-away head) to read the world's scene labels off the
    pixels, then save the whole model to out/model for `python -m demo.base sft --model`.

    Why: LLaVA-Med starts from a pretrained CLIP tower. A tower trained from scratch only through
    the language loss learns the modality (a global look) within a few hundred steps but not the
    small findings: the decoder ignores visual tokens that carry nothing yet, so almost no gradient
    reaches the tower. A few hundred steps of direct supervision break that circle.
    """
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.data).parent
    examples, bad = [], []
    for index, item in read_json_records(cfg.data):
        try:
            if isinstance(item, BadLine):
                raise ValueError(item.message)
            if not isinstance(item, dict):
                raise ValueError(f"a record must be an object, not {type(item).__name__}")
            image = image_file(item.get("image"), image_root)
            if image is None:
                raise ValueError("no image")
            examples.append((image, scene_labels(item)))
        except ValueError as e:
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
                cache[i] = load_pixels(examples[i][0], size)
        pixels = torch.stack([cache[i] for i in picks]).to(base.device)
        labels = torch.stack([examples[i][1] for i in picks]).to(base.device)
        loss = vision_loss(head, tower(pixels.to(base.dtype)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics.append({"step": step + 1, "loss": loss.item()})
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    save_base(base, cfg.tokenizer or cfg.model, out)
    print(f"vision tower pretrained for {steps} steps (last loss {metrics[-1]['loss']:.3f}) → {out / 'model'}")
    return metrics[-1]


def run_vision(cfg: VisionConfig) -> dict:
    """Build (`--init-preset`) or load (`--model`) the model, then pretrain_vision; one process."""
    ctx = setup_context(cfg.device, autocast=False)
    torch.manual_seed(cfg.seed)  # the new model's initialisation
    dtype = resolve_dtype(cfg.dtype, ctx.device)
    if cfg.init_preset:
        base = new_model(cfg.init_preset, cfg.tokenizer, dtype, ctx.device)
    else:
        base = load_model(cfg.model, dtype=dtype, device=ctx.device)
    return pretrain_vision(base, cfg, Path(cfg.out))


# ---------------------------------------------------------------------------------------------
# Instruction tuning (SFT) of the whole model on LLaVA conversations


def read_sft(path: Path, image_root: Path, tokens: Tokens, cfg) -> tuple[list[Example], list[BadRecord]]:
    """LLaVA-format conversations → (examples, bad records): one row per conversation, turn by
    turn (BOS once, the image in the first prompt), the answers as targets."""
    try:
        records, bad = read_records(path)
    except DataError:
        raise
    except ValueError as e:  # the file as a whole cannot be read; its name is in the message
        raise DataError(str(e)) from None
    # Where each record is in the file (read_records returns the good ones only), for bad_records.
    skipped = {b.index for b in bad}
    positions = [i for i, _ in read_json_records(path) if i not in skipped]
    examples = []
    for index, record in zip(positions, records):
        try:
            turns = record.conversations
            if len(turns) < 2 or len(turns) % 2 or any(t.get("from") != ("human", "gpt")[i % 2]
                                                       for i, t in enumerate(turns)):
                raise ValueError("conversations must alternate human, gpt, … and end with gpt")
            image_path = image_file(record.image, image_root)
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
        examples.append(Example(record.id, image_path, [ids], [target], str(path), index))
    return examples, bad


def finetune(cfg: SFTConfig) -> dict:
    """Train every parameter (vision tower, projector, decoder) of a new `--init-preset` model or
    of `--model` on the answers of LLaVA conversations: loss = − Σ log π(answer tokens) / their
    number, per global batch. AdamW with linear warmup + cosine (train.lr_lambda), gradient
    accumulation, clipping, seeded shuffling per epoch, one process. Writes OUT/config.json,
    bad_records.jsonl, metrics.jsonl (eval_loss: the same loss on the held-out conversations) and
    model/ with its tokenizer. Returns the last step's metrics."""
    if dist_env()[1] > 1:  # before joining a process group: every process would train and write OUT alone
        raise UserError("python -m demo.base sft runs in one process: run it without torchrun (WORLD_SIZE > 1)")
    ctx = setup_context(cfg.device)
    out = Path(cfg.out)
    dtype = resolve_dtype(cfg.dtype, ctx.device)
    tokenizer_path = tokenizer_file(cfg.tokenizer or cfg.model)
    tokenizer = read_tokenizer(tokenizer_path)
    config = preset_config(cfg.init_preset, tokenizer) if cfg.init_preset else model_config(cfg.model)
    ctx.pad_id = config.text.pad_token_id or 0
    tokens = Tokens(tokenizer, config)
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.data).parent
    examples, held_out, bad, _ = read_examples(lambda path: read_sft(path, image_root, tokens, cfg), cfg,
                                               image_root, cfg.image_aspect, config.vision.image_size, ctx)
    if cfg.batch_size % cfg.micro_batch or len(examples) < cfg.batch_size:
        raise UserError(f"{cfg.data}: {len(examples)} training conversations ({len(bad)} records skipped): need at "
                        f"least one --batch-size {cfg.batch_size}, a multiple of --micro-batch {cfg.micro_batch}")
    write_run_start(out, cfg, bad, f"{len(examples)} training conversations, {len(held_out)} held out")

    torch.manual_seed(cfg.seed)  # a new model's initialisation
    if cfg.init_preset:
        base = Llava(config).to(device=ctx.device, dtype=dtype)
    else:
        base = load_model(cfg.model, dtype=dtype, device=ctx.device)
    params = list(base.parameters())
    for p in params:
        p.requires_grad_(True)
    steps_per_epoch = len(examples) // cfg.batch_size  # the last partial batch of each epoch is dropped
    total, accum = steps_per_epoch * cfg.epochs, cfg.batch_size // cfg.micro_batch
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_lambda, warmup=int(cfg.warmup_ratio * total), total=total, min_ratio=cfg.min_lr_ratio))
    torch.manual_seed(cfg.seed + 1)  # dropout, where the model has any
    base.train()
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    metrics = []
    for step in tqdm(range(end), desc="sft", dynamic_ncols=True):
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batch = [examples[i] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]
        loss_sum, n_sum = 0.0, 0
        for micro in range(accum):
            micro_batch = batch[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch]
            rows = collate(micro_batch, ctx.pad_id).to(ctx.device)
            pixels = batch_pixels(micro_batch, config.vision.image_size, cfg.image_aspect)
            with ctx.autocast():
                logp = row_logprobs(base, base, rows, pixels, cfg.logit_chunk, train_vision=True)  # (rows,)
            n = rows.label_mask.sum()
            loss = -logp.sum() / n
            (loss / accum).backward()
            loss_sum, n_sum = loss_sum + loss.item() * n.item(), n_sum + n.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        record = {"step": step + 1, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                  "loss": loss_sum / n_sum, "tokens": n_sum}
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == end):
            logp = logprobs_by_id(base, held_out, cfg, ctx)
            base.train()
            record["eval_loss"] = -sum(sum(logp[ex.id]) for ex in held_out) / sum(sum(map(sum, ex.targets))
                                                                                  for ex in held_out)
        metrics.append(record)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    save_base(base, tokenizer_path, out)
    print(f"instruction-tuned for {end} steps (last loss {metrics[-1]['loss']:.3f}) → {out / 'model'}")
    return metrics[-1]


# ---------------------------------------------------------------------------------------------
# The model: a new one of a preset, sized to the tokenizer, and the saved whole


def preset_config(preset_name: str, tokenizer) -> LlavaConfig:
    """A preset (model/llava.py PRESETS) with the tokenizer's vocabulary size and <image> id."""
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        raise UserError(f"--init-preset: the tokenizer has no {IMAGE_TOKEN} token")
    config = preset(preset_name, image_token_id=image_id)
    config.text = dataclasses.replace(config.text, vocab_size=tokenizer.get_vocab_size())
    return config


def new_model(preset_name: str, tokenizer_path, dtype: torch.dtype, device) -> Llava:
    """A randomly initialised model of preset `preset_name` (`--init-preset`), sized to the
    tokenizer's vocabulary with its `<image>` token as the image placeholder."""
    return Llava(preset_config(preset_name, read_tokenizer(tokenizer_path))).to(device=device, dtype=dtype)


def save_base(base: Llava, tokenizer: str | Path, out: Path) -> None:
    """The whole model as a checkpoint load_model reads (OUT/model), with the tokenizer that sized it."""
    save_model(base, out / "model")
    read_tokenizer(tokenizer).save(str(out / "model" / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# Options and command line


@dataclass
class VisionConfig:
    data: str | None = option(None, "the world's records with their `scene` labels (e.g. .cache/world/sft.json)")
    out: str = option("runs/base-vision", "output directory: config.json, metrics.jsonl, model/")
    image_root: str | None = option(None, "directory the records' image paths are relative to "
                                    "(default: the data file's directory)")
    init_preset: str | None = option(None, "build a randomly initialised model of this preset (model/llava.py "
                                     "PRESETS; vocab size and image token from --tokenizer) instead of loading "
                                     "--model", choices=("tiny",))
    model: str | None = option(None, "checkpoint directory whose vision tower is trained further")
    tokenizer: str | None = option(None, "tokenizer.json / tokenizer.model / directory (default: --model)")
    batch_size: int = option(16, "images per step")
    lr: float = option(2e-5, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    epochs: int = option(2, "passes over the records, when --max-steps is not given")
    max_steps: int | None = option(None, "optimizer steps (default: --epochs passes)")
    seed: int = option(0, "seed of the model's initialisation and of the images drawn per step")
    device: str = option("auto", "cpu, cuda, cuda:N (auto: cuda if present)")
    dtype: str = option("auto", "weights (auto: bf16 on GPU, fp32 on CPU)", choices=("auto", *DTYPES))

    def __post_init__(self):
        required_options(self)
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")


@dataclass
class SFTConfig:
    data: str | None = option(None, "LLaVA-format conversations (JSON list or JSON lines; docs/FORMATS.md)")
    out: str = option("runs/base-sft", "output directory: config.json, metrics.jsonl, bad_records.jsonl, model/")
    image_root: str | None = option(None, "directory the records' image paths are relative to "
                                    "(default: the data file's directory)")
    image_aspect: str = option("pad", "pad: images padded to a square with the CLIP mean colour; resize: "
                               "stretched to a square", choices=("pad", "resize"))
    init_preset: str | None = option(None, "build a randomly initialised model of this preset (model/llava.py "
                                     "PRESETS; vocab size and image token from --tokenizer) instead of loading "
                                     "--model", choices=("tiny",))
    model: str | None = option(None, "checkpoint directory to train (e.g. the vision stage's OUT/model)")
    tokenizer: str | None = option(None, "tokenizer.json / tokenizer.model / directory (default: --model)")
    eval_data: str | None = option(None, "held-out conversations (default: --eval-fraction of --data)")
    eval_fraction: float = option(0.05, "share of --data held out when --eval-data is not given")
    epochs: int = option(2, "passes over the training conversations")
    batch_size: int = option(16, "conversations per optimizer step")
    micro_batch: int = option(2, "conversations per forward pass; accumulation fills the rest")
    lr: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "share of the steps with linear warmup")
    min_lr_ratio: float = option(0.0, "cosine decays to lr × this")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    seed: int = option(0, "seed of the model's initialisation, data order and held-out split")
    max_steps: int | None = option(None, "stop after this many optimizer steps (the schedule still spans all epochs)")
    max_response_tokens: int = option(512, "answers are cut to this many tokens (EOS included)")
    max_length: int = option(2048, "longer conversations are skipped (reported)")
    eval_every: int = option(0, "held-out loss every N steps (0: only at the end)")
    logit_chunk: int = option(256, "answer positions per chunk of the vocabulary projection")
    device: str = option("auto", "cpu, cuda, cuda:N (auto: cuda if present)")
    dtype: str = option("auto", "weights (auto: bf16 on GPU, fp32 on CPU)", choices=("auto", *DTYPES))

    def __post_init__(self):
        required_options(self)
        if min(self.batch_size, self.micro_batch, self.logit_chunk) < 1 or not 0 <= self.eval_fraction < 1:
            raise ValueError("--batch-size, --micro-batch and --logit-chunk must be >= 1, --eval-fraction in [0, 1)")


def required_options(cfg) -> None:
    """--data, and --model or (for a new model) --tokenizer, which fixes its vocabulary."""
    required = ("data", "tokenizer") if cfg.init_preset else ("model", "data")
    problems = [f"--{f} is required" for f in required if getattr(cfg, f) is None]
    if problems:
        raise ValueError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo.base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    world = commands.add_parser("world", help="build the synthetic world with the demo's sizes (reused if there)")
    world.add_argument("--root", default=".cache/world", help="directory (default: .cache/world)")
    for name, cls, run, what in (("vision", VisionConfig, pretrain_vision, "pretrain the vision tower on the world's "
                                  "scene labels"), ("sft", SFTConfig, finetune, "instruction-tune the whole model")):
        sub = commands.add_parser(name, help=what, description=run.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_dataclass_options(sub, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "world":
        paths = build_world(args["root"], seed=0)
        print(f"synthetic world in {paths['root']}")
        return 0
    try:
        cfg = (VisionConfig if command == "vision" else SFTConfig)(**args)
    except ValueError as e:
        parser.error(str(e))
    (run_vision if command == "vision" else finetune)(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
