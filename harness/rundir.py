"""A run's plumbing (docs/FORMATS.md "Training outputs", "Run directory"): `start_run`, eval.py's and
train.py's start or resume under provenance.json's fingerprint; train.py's checkpoints, exact resume, reuse
of a finished run, metrics, reference log-prob cache, and its inputs, read before the (slow) model load
(`read_inputs`; demo/base.py's SFT data too). `cfg`, `ctx`: train.py's TrainConfig and Context.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from harness import provenance
from harness.cli import UserError, few
from harness.dist import barrier
from harness.files import atomic_write_text, read_jsonl, remove
from data import BadRecord, Example, Tokens, preference_header, read_preferences, unusable_images
from model.llava import LlavaConfig
from model.loading import CheckpointError, read_config
from model.lora import export_merged, load_adapter, save_adapter
from model.tokenizer import load_tokenizer, tokenizer_file

PROVENANCE = "provenance.json"
# Those that hold training results: a directory with any of them holds a run.
TRAINED = ("checkpoints", "metrics.jsonl", "adapter", "merged")
# Options that name inputs or the output: the fingerprint holds the inputs' content instead.
PATH_FIELDS = ("model", "data", "out", "image_root", "vision_tower", "tokenizer", "eval_data")
# Options that may change between a run and its --resume (how to start, how long, what to log and keep,
# where to run, memory knobs that compute the same values); every other one is in the fingerprint.
RESUMABLE_FIELDS = ("resume", "overwrite", "max_steps", "eval_every", "save_every", "keep_checkpoints",
                    "export_merged", "plot", "device", "gradient_checkpointing", "logit_chunk",
                    "check_finite", "allow_other_model")


def owned(out: Path) -> tuple[dict | None, list[str]]:
    """The record of the run in `out` (None: none) and `out`'s entries, refused unless each is its run's:
    listed in "wrote", the record itself, or what a kill left of their atomic writes."""
    record = provenance.load(out / PROVENANCE)
    listed = {PROVENANCE, *record.get("wrote", ())} if record else set()
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in entries if n not in listed and re.sub(r"^\.(.+)\.tmp\d+$", r"\1", n) not in listed]
    if foreign:
        raise UserError(f"{out} holds what no {PROVENANCE} there lists as written by a run of this project: "
                        f"{few(foreign)}; move them, or choose another --out")
    return record, entries


def check_out(out: Path, cfg) -> None:
    """Refuse, before anything slow, what would mix two runs in one --out or touch what no run wrote there."""
    mine = owned(out)[1]
    found = [name for name in TRAINED if (out / name).is_dir() and any((out / name).iterdir())
             or (out / name).is_file() and (out / name).stat().st_size]
    if cfg.resume:
        if not (out / "checkpoints" / "latest").is_file() and not (out / PROVENANCE).is_file():
            raise UserError(f"--resume: {out} has no checkpoint to continue from (checkpoints/latest); " + (
                "rerun with --overwrite to start again" if found else "run without --resume to start"))
        return
    if found and not cfg.overwrite:
        raise UserError(f"{out} holds a training run ({', '.join(found)}): pass --resume to continue it, or "
                        "--overwrite to delete it and start again, or choose another --out")
    doomed = [(out / name).resolve() for name in mine]  # deleted on start: none may hold an input of the run
    for flag in (f for f in PATH_FIELDS if f != "out" and getattr(cfg, f) is not None):
        path = Path(getattr(cfg, flag)).resolve()
        hit = next((d for d in doomed if path == d or d in path.parents), None)
        if hit is not None:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)} is inside {hit}, which "
                            f"starting a run in {out} deletes: choose another --out")


def start_run(out: Path, now: Mapping[str, Any], *, resume: bool, writes: Sequence[str], made_by: str,
              session: Mapping[str, Any], holds: str, restart: str, rank: int = 0, world: int = 1,
              finished: Mapping[str, Any] | None = None, outputs: Sequence[str] = (),
              changes: Sequence[str] = (), compare: Mapping[str, Any] | None = None) -> bool:
    """Start or resume the run in `out` (provenance.start), recording `made_by`, each `session` and the
    top-level names it `writes`; starting again deletes what the record lists, nothing else. True: reused,
    as it `finished` (e.g. {"step": 40}) with its `outputs` unchanged. `compare`: what the stored
    fingerprint must equal, when not `now` (eval.py: earlier sessions' images)."""
    record, mine = owned(out)

    def reused() -> bool:
        done = record.get("finished") if finished is not None else None
        if not isinstance(done, dict) or any(done.get(k) != v for k, v in finished.items()):
            return False
        written = done.get("outputs") or {}
        if not all(name in written and (out / name).is_dir() for name in outputs):
            return False  # missing: the resumed run writes it
        digests = provenance.fingerprint(**{name: provenance.Dir(out / name) for name in outputs})
        changed = provenance.differences({name: written[name] for name in outputs}, digests)
        if changed:
            raise provenance.ProvenanceError(out, [f"{c} since {made_by} wrote it" for c in changed], restart)
        return True

    unknown = f"{out} holds {holds} but no {PROVENANCE}, so what made them cannot be checked"
    if provenance.start(out, compare or now, record and record["fingerprint"], resume=resume,
                        clear=lambda: remove(out / name for name in mine), unknown=unknown, restart=restart,
                        changes=changes, reuse=reused, rank=rank, world=world):
        return True
    if rank == 0:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        kept = record if resume and record else {}
        provenance.save(out / PROVENANCE, now, made_by=made_by,
                        wrote=sorted({*kept.get("wrote", ()), *writes}),
                        sessions=[*kept.get("sessions", []), {"started": started, **session}])
    barrier(world)
    return False


def run_fingerprint(cfg, tokenizer, image_root: Path, images: list[str], dtype: torch.dtype, ctx) -> dict:
    """What the trained weights depend on, by content (docs/FORMATS.md "Training outputs")."""
    inputs = {"model": provenance.Dir(cfg.model),
              "vision tower": provenance.Dir(cfg.vision_tower) if cfg.vision_tower else None,
              "tokenizer": tokenizer, "data": provenance.File(cfg.data),
              "eval data": provenance.File(cfg.eval_data) if cfg.eval_data else None,
              "images": provenance.Files(image_root, images)}
    # dtype and autocast are options too: the fingerprint holds them as resolved instead.
    leave_out = PATH_FIELDS + RESUMABLE_FIELDS + ("dtype", "autocast")
    return provenance.run_fingerprint(inputs, cfg, leave_out, dtype=str(dtype).removeprefix("torch."),
                                      autocast=ctx.amp, world_size=ctx.world)


def start_training(out: Path, now: Mapping[str, Any], end: int, cfg, ctx) -> bool:
    """train.py's start_run, not past the last step `end`; True: --out holds this run finished at `end`."""
    latest = out / "checkpoints" / "latest"  # names step-NNNNNN
    trained = latest.read_text().strip().removeprefix("step-") if cfg.resume and latest.is_file() else ""
    trained = int(trained) if trained.isdigit() else 0
    outputs = ("adapter", "merged") if cfg.export_merged else ("adapter",)  # their digests: write_outputs
    writes = ("config.json", "bad_records.jsonl", "metrics.jsonl", "checkpoints", *outputs,
              *("metrics.png",) * cfg.plot)
    reused = start_run(out, now, resume=cfg.resume, writes=writes, made_by="train.py", holds="checkpoints",
                       rank=ctx.rank, world=ctx.world,
                       session={"resume": cfg.resume, "max_steps": cfg.max_steps, "device": str(ctx.device),
                                "world_size": ctx.world},
                       restart="rerun with --overwrite to start again (this deletes its checkpoints and "
                               "metrics)", finished={"step": end}, outputs=outputs,
                       changes=[f"steps: {trained} trained, {end} now"] if trained > end else [])
    if reused and ctx.rank == 0:
        print(f"reused: {out / 'adapter'} was trained from the same inputs and options ({out / PROVENANCE})")
    return reused


def write_run_start(out: Path, cfg, bad: list[BadRecord], counts: str | None = None) -> None:
    """out/config.json and out/bad_records.jsonl (reported on stderr, `counts` printed with their number)."""
    out.mkdir(parents=True, exist_ok=True)
    report_skipped(bad)
    if counts is not None:
        print(f"{counts}, {len(bad)} skipped" + (f" (listed in {out / 'bad_records.jsonl'})" if bad else ""))
    atomic_write_text(out / "bad_records.jsonl", "".join(json.dumps(asdict(b)) + "\n" for b in bad))
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")


def report_skipped(bad: list[BadRecord]) -> None:
    for b in bad:
        print(f"skipped {b.file} record {b.index} (id {b.id}): {b.reason}", file=sys.stderr)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg, ctx) -> None:
    """checkpoints/step-NNNNNN/{adapter/, trainer.pt} written under a temporary name, renamed, then `latest`
    replaced atomically; the last `keep_checkpoints` kept. trainer.pt holds the step and run fingerprint."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None}
    rngs = list(ctx.gather_dicts({ctx.rank: rng}).values())  # dropout draws differ per rank: every rank's
    if ctx.rank == 0:
        run = provenance.load(out / PROVENANCE)["fingerprint"]
        root, name = out / "checkpoints", f"step-{step:06d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp / "adapter", base_model_path=cfg.model)
        provenance.save(tmp / "adapter" / PROVENANCE, run, made_by="train.py")  # its model: eval.py checks
        torch.save({"step": step, "run": run, "optimizer": optimizer.state_dict(), "rng": rngs,
                    "scheduler": scheduler.state_dict(), "config": asdict(cfg)}, tmp / "trainer.pt")
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        atomic_write_text(root / "latest", name + "\n")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    barrier(ctx.world)


def load_checkpoint(out: Path, model, optimizer, scheduler, ctx) -> int:
    """Restore adapter, optimizer, scheduler and RNG states; the step to continue from (0: no checkpoint).
    Only from a checkpoint of this run: in its checkpoints/, with its fingerprint and the step of its name."""
    root, restart = out / "checkpoints", "rerun with --overwrite to start again"
    if not (root / "latest").is_file():
        return 0
    name = (root / "latest").read_text().strip()
    ckpt, pt = root / name, root / name / "trainer.pt"
    if not re.fullmatch(r"step-\d{6,}", name):
        raise CheckpointError(f"{root / 'latest'} names {name!r}, not a step-NNNNNN of {root}; {restart}")
    if not pt.is_file():
        raise CheckpointError(f"{root / 'latest'} names {name}, which is missing or incomplete; {restart}")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # not torch's message: it advises weights_only=False, unsafe here
        raise CheckpointError(f"{pt} holds more than tensors and plain values: train.py did not write it; "
                              f"{restart}") from None
    except (RuntimeError, EOFError):
        raise CheckpointError(f"{pt} cannot be read (cut short?); {restart}") from None
    run, step = state.get("run") if isinstance(state, dict) else None, int(name.removeprefix("step-"))
    stored = provenance.load(out / PROVENANCE)["fingerprint"]  # it holds world_size: one RNG state per rank
    foreign = provenance.differences(run, stored) if isinstance(run, dict) else ["it records no run"]
    if foreign or state["step"] != step:
        why = "; ".join(foreign) if foreign else f"it holds step {state['step']}, its name says {step}"
        raise CheckpointError(f"{pt} is not a checkpoint of this run ({why}); {restart}")
    try:
        load_adapter(model, ckpt / "adapter")
    except (ValueError, OSError) as e:  # load_adapter names the file
        raise CheckpointError(f"--resume from {ckpt}: {e}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ctx.rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    return state["step"]


def start_metrics(out: Path, start: int, cfg, ctx) -> Path:
    """out/metrics.jsonl as of step `start` (on --resume without what was logged after the checkpoint)."""
    path = out / "metrics.jsonl"
    if ctx.rank == 0:
        kept = [m for m in (read_jsonl(path) if cfg.resume else []) if m.get("step", 0) <= start]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))
    return path


def write_outputs(model, out: Path, cfg, step: int, ctx) -> None:
    """Rank 0 writes adapter/, metrics.png, merged/ (as asked), then records in provenance.json that the
    run finished at `step`, with each weight directory's digest (start_run's reuse checks them)."""
    if ctx.rank == 0:
        adapter, record = save_adapter(model, out / "adapter", cfg.model), provenance.load(out / PROVENANCE)
        provenance.save(adapter / PROVENANCE, record["fingerprint"], made_by="train.py")
        written = {"adapter": provenance.Dir(adapter)}
        if cfg.plot:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png")
            print(f"wrote {out / 'metrics.png'}")
        if cfg.export_merged:
            merged = export_merged(model, out / "merged", source=cfg.model)
            tokenizer = tokenizer_file(cfg.tokenizer or cfg.model)  # what training read
            shutil.copyfile(tokenizer, merged / f"tokenizer{tokenizer.suffix}")
            for name in ("tokenizer_config.json", "special_tokens_map.json"):  # transformers' files, if any
                if (tokenizer.parent / name).is_file():
                    shutil.copyfile(tokenizer.parent / name, merged / name)
            print(f"wrote {merged} (LoRA merged, in the input's key layout and dtypes, with the tokenizer)")
            written["merged"] = provenance.Dir(merged)
        info = {k: v for k, v in record.items() if k not in ("format", "fingerprint", "finished")}
        provenance.save(out / PROVENANCE, record["fingerprint"], **info,
                        finished={"step": step, "outputs": provenance.fingerprint(**written)})
        print(f"wrote {adapter} (PEFT format)")
    barrier(ctx.world)


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend; train.py calls this before training when --plot is on."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install -r requirements.txt) or --no-plot") from None
    return plt


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    """metrics.png from metrics.jsonl: one panel per logged figure, against the step."""
    plt = require_matplotlib()
    records = read_jsonl(metrics_path)
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


def reference_cache_key(now: dict, negatives: int) -> dict:
    """What the cached reference log-probs depend on: parts of the run's fingerprint `now`, without paths.
    Never the adapter: they are cached beside the preference file, runs that differ otherwise share them."""
    key = {"negatives": negatives}
    for name in ("model", "vision tower", "tokenizer", "data", "eval data", "images", "image_aspect", "dtype",
                 "autocast", "max_response_tokens", "max_length"):
        part = now.get(name)  # an input's content without its path, or an option's value
        key[name] = part if not isinstance(part, dict) else {k: v for k, v in part.items()
                                                             if k not in ("path", "root")}
    return key


def cached_logprobs(data: Path, key: dict, examples: list, compute, ctx) -> dict[str, list[float]]:
    """{entry id: log-probs} of `examples`: cached under `key`, or `compute(missing examples)` on every
    process and the cache rewritten by rank 0 (one that cannot be read or written is only a cache)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(data).with_suffix(f".reflogp-{digest}.json")  # prefs.reflogp-<8 hex digits of key>.json
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = None
    ok = isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("logp"), dict)
    cached = stored["logp"] if ok else {}
    todo = [ex for ex in examples if ex.id not in cached]
    if todo:
        cached.update(compute(todo))
        if ctx.rank == 0:
            try:
                atomic_write_text(path, json.dumps({"key": key, "logp": cached}))
            except OSError as e:
                print(f"cannot cache reference log-probs in {path}: {e}", file=sys.stderr)
    return cached


# train.py's inputs: tokenizer, model config, --data and --eval-data records, their images, held-out split.
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
    tokenizer = read_tokenizer(cfg.tokenizer or cfg.model)
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
    """cfg completed from --data's header: without --model its model and vision tower, without --image-root
    its images' root. HSCR is on-policy: another model (by content) is refused unless --allow-other-model."""
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
    """(training, held-out examples, skipped records, image files under `image_root`) of --data and
    --eval-data, read by `read(path)`; each image checked once, by one process: all keep the same examples."""
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
