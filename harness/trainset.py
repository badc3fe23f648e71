"""train.py's inputs, read before the (slow) model load (`read_inputs`): tokenizer, model config, the records
of --data and --eval-data, their images checked once, the held-out split (demo/base.py's SFT data too).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data import BadRecord, Example, Tokens, preference_header, read_preferences, unusable_images
from harness import provenance
from harness.cli import UserError
from harness.rundir import report_skipped
from model.llava import LlavaConfig
from model.loading import read_config
from model.tokenizer import load_tokenizer, tokenizer_file


@dataclass
class Inputs:
    tokenizer_digest: dict         # provenance.tokenizer's, for the fingerprint
    config: LlavaConfig            # the model's, read without its weights
    image_root: Path
    image_aspect: str              # --image-aspect as resolved
    examples: list[Example]        # training entries
    held_out: list[Example]        # --eval-data, or --eval-fraction of --data
    bad: list[BadRecord]           # every skipped record, with why
    images: list[str]              # every image file looked at, relative to image_root


def read_inputs(cfg, ctx) -> Inputs:
    """train.py's inputs; refuses a --batch-size the processes cannot share and fewer entries than a batch."""
    tokenizer = read_tokenizer(tokenizer_file(cfg.tokenizer or cfg.model))
    config = model_config(cfg.model, cfg.vision_tower)
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.data).parent
    aspect, source = resolve_image_aspect(cfg.image_aspect, Path(cfg.data))
    say = (lambda line: print(line, file=sys.stderr)) if ctx.rank == 0 else None
    if say:
        say(f"images: {'padded' if aspect == 'pad' else 'resized'} to a square (--image-aspect {aspect}, {source})")
    digest = provenance.tokenizer(tokenizer)
    tokens = Tokens(tokenizer, config)
    examples, held_out, bad, images = read_examples(
        lambda path: read_preferences(path, image_root, tokens, cfg, digest["sha256"], say), cfg, image_root,
        aspect, config.vision.image_size, ctx)
    per_step = cfg.micro_batch * ctx.world
    if cfg.batch_size % per_step:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch × processes = {per_step}")
    if len(examples) < cfg.batch_size:
        if ctx.rank == 0:
            report_skipped(bad)
        raise UserError(f"{cfg.data}: {len(examples)} training entries ({len(bad)} records skipped"
                        f"{', listed above' if bad else ''}): fewer than one batch of --batch-size {cfg.batch_size}")
    return Inputs(digest, config, image_root, aspect, examples, held_out, bad, images)


def made_by(cfg):
    """cfg with what made --data, from its header, for what is not given: without --model, the model and
    vision tower; without --image-root, the images' root. HSCR is on-policy: another model or tower (by
    content) is refused unless --allow-other-model; a header that records none is not checked."""
    check_paths("file", data=cfg.data)
    made = (preference_header(Path(cfg.data)) or {}).get("provenance")
    images = made.get("images") if isinstance(made, dict) else None
    if cfg.image_root is None and isinstance(images, dict) and images.get("root"):
        cfg = replace(cfg, image_root=images["root"])
    cfg = model_of(cfg, made, f"--data {cfg.data}")
    if not cfg.allow_other_model:
        tower = provenance.Dir(cfg.vision_tower) if cfg.vision_tower else None
        now = provenance.fingerprint(model=provenance.Dir(cfg.model), **{"vision tower": tower})
        provenance.check_model(made, now, f"--data {cfg.data}", "HSCR trains the model that made its "
                               "preferences: train that one (the default without --model), or pass "
                               "--allow-other-model to train off-policy (e.g. DPO on another model's data)")
    return cfg


def model_of(cfg, made: dict | None, what: str | None):
    """cfg with the model and vision tower that `made` (of `what`, "--data F") records, when no --model."""
    if cfg.model is not None:
        return cfg
    paths = provenance.model_paths(made)
    if paths is None:
        raise UserError("--model is required" + (f": {what} does not record its model" if what else ""))
    if not all(Path(p).is_dir() for p in paths if p is not None):
        raise UserError(f"{what} was made by {' with vision tower '.join(p for p in paths if p)}, not a "
                        "directory here: pass --model (and --vision-tower)")
    return replace(cfg, model=paths[0], vision_tower=paths[1])


def read_examples(read: Callable[[Path], tuple[list[Example], list[BadRecord]]], cfg, image_root: Path,
                  aspect: str, image_size: int, ctx):
    """(training examples, held-out examples, skipped records, image files relative to `image_root`) of
    cfg.data and cfg.eval_data, each read by `read(path)`. Images are checked once each, the processes sharing
    them, so that all keep the same examples. Without --eval-data a seeded --eval-fraction is held out."""
    check_paths("file", data=cfg.data, eval_data=cfg.eval_data)
    examples, bad = read(Path(cfg.data))
    held_out, bad_eval = read(Path(cfg.eval_data)) if cfg.eval_data else ([], [])
    images = sorted({ex.image for ex in examples + held_out if ex.image is not None})
    names = {path: path.relative_to(image_root).as_posix() for path in images}
    mine = unusable_images(images[ctx.rank::ctx.world], image_size, aspect)
    unusable = ctx.gather_dicts({path: f"image {names[path]}: {why}" for path, why in mine.items()})
    dropped = [BadRecord(ex.file, ex.index, ex.id, unusable[ex.image]) for ex in examples + held_out
               if ex.image in unusable]
    examples, held_out = ([ex for ex in part if ex.image not in unusable] for part in (examples, held_out))
    if not cfg.eval_data:  # a seeded random --eval-fraction of the entries
        generator = torch.Generator().manual_seed(cfg.seed + 12345)
        order = torch.randperm(len(examples), generator=generator).tolist()
        held = set(order[:int(round(cfg.eval_fraction * len(examples)))])
        held_out = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    return examples, held_out, bad + bad_eval + dropped, list(names.values())


def check_paths(kind: str, **paths: str | None) -> None:
    """A UserError for the first option given (model="ckpt": --model ckpt) that names no `kind` of path."""
    for key, path in paths.items():
        if path is not None and not (Path(path).is_dir() if kind == "directory" else Path(path).is_file()):
            why = f"not a {kind}" if Path(path).exists() else f"{kind} not found"
            raise UserError(f"--{key.replace('_', '-')} {path}: {why}")


def model_config(model: str, vision_tower: str | None = None) -> LlavaConfig:
    """The config of the checkpoint `model` (and of a separate `vision_tower`), without its weights."""
    check_paths("directory", model=model, vision_tower=vision_tower)
    return read_config(model, vision_tower)


def read_tokenizer(path: str | os.PathLike):
    """model.tokenizer.load_tokenizer, with a file it cannot read reported as one line."""
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {path}: {e}") from None


def resolve_image_aspect(given: str | None, prefs: Path) -> tuple[str, str]:
    """(--image-aspect, where it comes from): as given, else the preference file header's, else pad."""
    options = (preference_header(prefs) or {}).get("options")
    made = options.get("image_aspect") if isinstance(options, dict) else None
    made = made if made in ("pad", "resize") else None
    if given is not None:
        note = "as given" if made in (None, given) else f"as given; the preference data was made with {made}"
        return given, note
    if made is not None:
        return made, f"as hscr.py made {prefs.name}"
    return "pad", f"the default; {prefs.name} does not record one"
