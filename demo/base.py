"""What only the demo's from-scratch base model needs: the synthetic world on disk, and a vision
tower pretrained on the world's scene labels (the demo's stand-in for CLIP's pretraining).

The shipped base (assets/base) is regenerated with (README.md gives the full sequence):

    python -m demo.base world --root .cache/world
    python -m demo.tokenizer assets/base/tokenizer.json --vocab-size 576 --json …
    python -m demo.base vision --init-preset tiny --tokenizer assets/base/tokenizer.json \\
        --data .cache/world/sft.json --out runs/base-vision --batch-size 64 --lr 1e-3 --max-steps 400
    python train.py --stage sft --model runs/base-vision/model --full …

`vision` trains the tower of a new `--init-preset` model (or of `--model`) with a throw-away head
(`vision_loss`) and saves the whole model to OUT/model, with its tokenizer, for the SFT stage.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from batches import image_file
from model.loading import DTYPES, resolve_dtype
from harness.files import BadLine, read_json_records
from harness.cli import add_dataclass_options, option
from data import BadRecord, load_pixels
from demo.world import MODALITIES, build_world
from model import load_model, save_model
from model.llava import Llava
from model.tokenizer import load_tokenizer
from train import atomic_write_text, new_model, setup_context, write_run_start

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
    pixels, then save the whole model to out/model for `train.py --stage sft --model`.

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
    # The whole model is the output, with the tokenizer that sized it: a checkpoint load_model reads.
    save_model(base, out / "model")
    load_tokenizer(cfg.tokenizer or cfg.model).save(str(out / "model" / "tokenizer.json"))
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
        # The tokenizer fixes the vocabulary of a new model.
        required = ("data", "tokenizer") if self.init_preset else ("model", "data")
        problems = [f"--{f.replace('_', '-')} is required" for f in required if getattr(self, f) is None]
        if self.batch_size < 1:
            problems.append("--batch-size must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo.base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    world = commands.add_parser("world", help="build the synthetic world with the demo's sizes (reused if there)")
    world.add_argument("--root", default=".cache/world", help="directory (default: .cache/world)")
    vision = commands.add_parser("vision", help="pretrain the vision tower on the world's scene labels",
                                 description=pretrain_vision.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(vision, VisionConfig)
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
        cfg = VisionConfig(**args)
    except ValueError as e:
        parser.error(str(e))
    run_vision(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
