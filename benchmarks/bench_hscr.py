"""HSCR data generation (hscr.py stages 1-2): the batched pipeline vs a naive one, and the cost of
carrying the dropped branch along.

1. Entries/s of the pipeline as hscr.py runs it (batches of entries, both branches stacked in one
   forward, the candidates of all entries of a batch decoded together, each prompt prefilled once
   for its candidates, finished rows leaving the batch) vs a naive one (one entry at a time, each
   branch its own forward), same model, same entries, same options. Target ≥ 1.5×.
   The naive pipeline is run twice: with the candidates of its entry decoded together, and with
   every candidate decoded alone (`decode_rows=1`). A third variant is the batched pipeline with
   every continuation row prefilled whole and kept to the end (before the shared prefill): the
   number of records whose output differs from the batched one is reported (expected 0).
2. The continuation decoding of one batch's candidates alone (model/rows.py, greedy_continuations):
   per-row prefill, shared prompt prefill, shared prefill + finished rows dropped; same tokens?
3. Two-branch vs one-branch, same lengths: (a) teacher-forced scoring of B responses through
   both branches (2B stacked rows) vs the full branch only (B rows); (b) greedy decoding of both
   branches (2B rows, one KV cache) vs plain greedy decoding of B rows for the same number of
   tokens. Target ≤ 1.2× on GPU, where a decode step reads the weights once for all rows.

Random weights (our `Llava`, no checkpoint needed) and a word-level tokenizer over the whole
vocabulary; --similarity lexical. CPU (default): a small model with 256 image tokens (224 px,
patch 14). GPU (`--device cuda`): the LLaVA-Med v1.5 shape (CLIP ViT-L/14-336, Mistral-7B), bf16.
Random weights never emit EOS; `--model DIR --data FILE --image-root DIR` runs on a real
checkpoint and data set instead (e.g. the demo's assets/base on the world's align split).

    python benchmarks/bench_hscr.py [--device cuda] [--entries 16] [--batch-size 8] [--max-new-tokens 8]
    python benchmarks/bench_hscr.py --model assets/base --data .cache/world/align.json \
        --image-root .cache/world --entries 128 --batch-size 64 --max-new-tokens 32 --skip-naive

Writes bench_hscr.json (every figure) and bench_hscr.summary (the lines benchmarks/gpu_check.sh
prints at the end) under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hscr  # noqa: E402
from harness.prefs import select_entries  # noqa: E402
from model.rows import cut_generated, teacher_forced_logits  # noqa: E402
from model.llava import left_pad  # noqa: E402
from data import Record  # noqa: E402
from model.llava import Llava, LlavaConfig, TextConfig, VisionConfig, preset  # noqa: E402


def build_model(device: str, dtype: torch.dtype, big: bool) -> Llava:
    if big:  # LLaVA-Med v1.5
        # llava-hf's layout of it: a real <image> token 32000, vocabulary padded to 32064
        config = preset("llava-med-v1.5-mistral-7b", image_token_id=32000, text=TextConfig(vocab_size=32064))
    else:
        config = LlavaConfig(
            vision=VisionConfig(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
                                n_layers=4, n_heads=4),
            text=TextConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, n_layers=4, n_heads=8,
                            n_kv_heads=4, rope_theta=1e6, max_seq_len=2048),
            image_token_id=32000 - 1,
        )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = Llava(config)
            for m in model.modules():  # RMSNorm and LayerNorm weights are ones by default: keep them
                if isinstance(m, torch.nn.Embedding):
                    torch.nn.init.normal_(m.weight, std=0.02)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_tokenizer(vocab_size: int, image_token_id: int):
    """Word level: id i is the word "w{i}", except <unk>, <s>, </s> and <image> at their ids
    (the template's "[INST]" words are unknown: <unk>, which is fine for timing)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    special = {0: "<unk>", 1: "<s>", 2: "</s>", image_token_id: "<image>"}
    vocab = {special.get(i, f"w{i}"): i for i in range(max(vocab_size, image_token_id + 1))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in special.values()])
    return tok


def make_entries(n: int, image_dir: Path, seed: int = 0) -> list[Record]:
    """Records with random images and answers of 12..40 words (ragged, as real answers are)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        w, h = rng.integers(200, 400, 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / f"{i}.png")
        answer = " ".join(f"w{j}" for j in rng.integers(10, 30000, rng.integers(12, 41)))
        question = " ".join(f"w{j}" for j in rng.integers(10, 30000, rng.integers(6, 16)))
        records.append(Record(f"entry{i}", f"{i}.png", question, answer, None))
    return records


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The slower equivalents hscr.py no longer carries, built here from its step functions and the model


def two_forwards(model, full_prompts, drop_prompts, full_features, drop_features, responses, pad_id,
                 drop_positions=None):
    """hscr.score_two_branches with each branch its own forward (the naive baseline)."""
    full, targets, valid = teacher_forced_logits(model, full_prompts, full_features, responses, pad_id)
    drop, _, _ = teacher_forced_logits(model, drop_prompts, drop_features, responses, pad_id, drop_positions)
    return full, drop, targets, valid


@torch.no_grad()
def per_row_continuations(model, prompts, features, prefixes, *, owners=None, max_new_tokens, pad_id,
                          rows_per_call=64):
    """greedy_continuations the plain way: `model.generate` on calls of rows each prefilled
    whole (prompt, image and prefix), finished rows kept to the end of the call."""
    c = model.config
    owners = list(range(len(prefixes))) if owners is None else list(owners)
    order = sorted(range(len(prefixes)), key=lambda r: len(prompts[owners[r]]) + len(prefixes[r]))
    tails = [[] for _ in prefixes]
    for start in range(0, len(order), rows_per_call):
        rows = order[start: start + rows_per_call]
        ids, mask = left_pad([prompts[owners[r]] + prefixes[r] for r in rows], pad_id, model.device)
        feats = torch.cat([features[owners[r]].reshape(-1, c.text.hidden_size) for r in rows])
        with keep_finished(model):
            new = model.generate(ids, attention_mask=mask,
                                 image_features=feats.to(device=model.device, dtype=model.dtype),
                                 max_new_tokens=max_new_tokens, eos_token_id=c.text.eos_token_id,
                                 pad_token_id=pad_id)
        for r, row in zip(rows, new.tolist()):
            tails[r] = cut_generated(row, c.text.eos_token_id, c.image_token_id)
    return tails


def keep_finished(model):
    """The model's generation with finished rows kept in the batch to the end of a call (it drops
    them through `_keep_rows`, here made to keep every row)."""
    return unittest.mock.patch.object(model, "_keep_rows", lambda live, *state: list(state))


class KeepFinished:
    """The model, with finished rows kept in a shared-prefill call's batch to its end: run through
    greedy_continuations, the shared prefill alone."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate_shared(self, *args, **kwargs):
        with keep_finished(self._model):
            return self._model.generate_shared(*args, **kwargs)


@contextlib.contextmanager
def replaced(**steps):
    """hscr's step functions replaced (HSCR.process calls them by their module names) while a
    variant runs."""
    saved = {name: getattr(hscr, name) for name in steps}
    for name, fn in steps.items():
        setattr(hscr, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(hscr, name, fn)


# ---------------------------------------------------------------------------------------------


def time_pipelines(variants: dict, records: list[Record], chunk: int, device: str):
    """Seconds each pipeline variant takes to turn `records` into preference records (image loading
    included), and the outputs. variants: name → (HSCR, entries per batch, the step functions it
    replaces). The variants take turns chunk by chunk, so that a change of machine load between
    them hits all of them alike."""
    totals = dict.fromkeys(variants, 0.0)
    outputs = {name: [] for name in variants}
    for pipe, _, steps in variants.values():
        with replaced(**steps):
            pipe.process([pipe.prepare(0, records[0])])  # warm-up (allocator, kernels)
    for start in range(0, len(records), chunk):
        part = list(enumerate(records[start:start + chunk], start))
        for name, (pipe, batch_size, steps) in variants.items():
            sync(device)
            t0 = time.perf_counter()
            with replaced(**steps):
                for s in range(0, len(part), batch_size):
                    out = pipe.process([pipe.prepare(i, r) for i, r in part[s:s + batch_size]])
                    assert all(isinstance(r, dict) or r.category == "too few negatives" for r in out), out
                    outputs[name] += out
            sync(device)
            totals[name] += time.perf_counter() - t0
    return totals, outputs


def continuation_costs(pipe, records: list[Record], batch: int, device: str) -> tuple[dict, int, bool]:
    """The continuation decoding of the first batch's candidates alone, three ways (the pipeline's
    own call, captured): seconds of each (best of 3, taking turns), the number of rows, and
    whether all three give the same tokens."""
    captured = []
    real = hscr.greedy_continuations
    with replaced(greedy_continuations=lambda *a, **k: (captured.append((a, k)), real(*a, **k))[1]):
        pipe.process([pipe.prepare(i, r) for i, r in enumerate(records[:batch])])
    (model, *args), kw = captured[-1]
    ways = {"per-row prefill": lambda: per_row_continuations(model, *args, **kw),
            "shared prefill": lambda: real(KeepFinished(model), *args, **kw),
            "shared + drop finished": lambda: real(model, *args, **kw)}
    tails = {name: way() for name, way in ways.items()}
    same = all(t == tails["per-row prefill"] for t in tails.values())
    seconds = timed(ways, device, repeat=3)
    return seconds, len(args[2]), same


def timed(fns: dict, device: str, repeat: int = 5) -> dict[str, float]:
    """Best-of-`repeat` seconds of each function, the functions taking turns (see time_pipelines)."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def branch_costs(model, tokenizer, opts, records, batch: int, new_tokens: int, device: str) -> dict:
    """Two-branch vs one-branch teacher-forced scoring and greedy decoding, same lengths."""
    pipe = hscr.HSCR(model, tokenizer, opts, hscr.Similarity("lexical"))
    entries = [pipe.prepare(i, r) for i, r in enumerate(records[:batch])]
    pixels = torch.stack([e.pixels for e in entries]).to(device=model.device, dtype=model.dtype)
    gens = [hscr.entry_generator(0, e.record.id) for e in entries]
    with torch.no_grad():
        full, dropped = hscr.visual_token_dropout(model, pixels, gens)
    full = list(full)
    fp = [e.prompt_ids for e in entries]
    dp = [hscr.with_image_tokens(p, model.config.image_token_id, d.shape[0]) for p, d in zip(fp, dropped)]
    ys = [e.response for e in entries]

    def decode(prompts, feats):
        ids, mask = left_pad(prompts, pipe.pad, model.device)
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        # eos_token_id=-1: never stops early, so both runs decode exactly `new_tokens` steps
        return model.generate(ids, attention_mask=mask, image_features=flat, max_new_tokens=new_tokens,
                              eos_token_id=-1)

    return timed({
        "score_1": lambda: teacher_forced_logits(model, fp, full, ys, pipe.pad),
        "score_2": lambda: hscr.score_two_branches(model, fp, dp, full, dropped, ys, pipe.pad),
        "decode_1": lambda: decode(fp, full),
        "decode_2": lambda: decode(fp + dp, full + dropped),
    }, device)


def real_inputs(args):
    """The checkpoint, its tokenizer and a seeded sample of --entries records of --data."""
    from data import read_records
    from model import load_model
    from model.tokenizer import load_tokenizer

    model = load_model(args.model, dtype=torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
                       device=args.device).eval()
    records, _ = read_records(args.data)
    return model, load_tokenizer(args.model), [records[i] for i in select_entries(len(records), args.entries, 0)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="a checkpoint directory instead of random weights (needs --data, --image-root)")
    p.add_argument("--data", help="records for --model (a seeded sample of --entries of them)")
    p.add_argument("--image-root", help="the images of --data")
    p.add_argument("--entries", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8, help="continuation length limit")
    p.add_argument("--decode-tokens", type=int, default=32, help="steps of the two-branch decoding comparison")
    p.add_argument("--skip-naive", action="store_true", help="only the batched pipeline and the branch costs")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"),
                   help="folder for bench_hscr.json / .summary (default $OUT or benchmarks/out)")
    args = p.parse_args()
    big = args.device.startswith("cuda")
    dtype = torch.bfloat16 if big else torch.float32
    if args.model:
        if not (args.data and args.image_root):
            p.error("--model needs --data and --image-root")
        model, tokenizer, records = real_inputs(args)
        dtype = model.dtype
        what = f"{args.model} on {len(records)} entries of {args.data}"
    else:
        model = build_model(args.device, dtype, big)
        tokenizer = build_tokenizer(32000, model.config.image_token_id)
        what = "random weights: no EOS, every tail is full length"
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if big else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {args.device} ({name}), dtype {dtype}, {n_params / 1e6:.1f}M parameters, "
          f"{c.num_image_tokens} image tokens, vocab {c.text.vocab_size}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            records = make_entries(args.entries, Path(tmp))
        opts = hscr.Options(model=args.model or "-", data="-", image_root=args.image_root or tmp, out="-",
                            similarity="lexical", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            device=args.device, dtype=str(dtype).split(".")[-1])
        print(f"{len(records)} entries, top-n {opts.top_n}, num-candidates {opts.num_candidates}, "
              f"continuation decode ≤ {opts.max_new_tokens} tokens ({what})")
        sim = hscr.Similarity("lexical")
        pipe = hscr.HSCR(model, tokenizer, opts, sim)
        variants = {"batched": (pipe, args.batch_size, {}),
                    "per_row": (pipe, args.batch_size, {"greedy_continuations": per_row_continuations})}
        if not args.skip_naive:
            variants["naive"] = (pipe, 1, {"score_two_branches": two_forwards})
            alone = hscr.HSCR(model, tokenizer, dataclasses.replace(opts, decode_rows=1), sim)
            variants["naive_alone"] = (alone, 1, {"score_two_branches": two_forwards})
        seconds, outputs = time_pipelines(variants, records, args.batch_size, args.device)
        differ = sum(a != b for a, b in zip(outputs["batched"], outputs["per_row"]))
        cont, cont_rows, cont_same = continuation_costs(variants["batched"][0], records, args.batch_size, args.device)
        costs = branch_costs(model, tokenizer, opts, records, args.batch_size, args.decode_tokens, args.device)
    n, B = len(records), args.batch_size
    rate = {k: n / v for k, v in seconds.items()}
    base = cont["per-row prefill"]
    lines = [f"hscr pipeline on {name}, {str(dtype).split('.')[-1]}, {n_params / 1e6:.1f}M parameters, "
             f"{c.num_image_tokens} image tokens, {n} entries",
             f"  batched (batch {B}, branches stacked):             {rate['batched']:7.3f} entries/s",
             f"  batched, continuations prefilled row by row:      {rate['per_row']:7.3f} entries/s"
             f"   batched is {seconds['per_row'] / seconds['batched']:.2f}x; {differ} of {n} records differ",
             f"  continuation decoding of batch 1 ({cont_rows} rows): "
             + ", ".join(f"{k} {v * 1e3:.0f} ms ({base / v:.2f}x)" for k, v in cont.items())
             + f"; same tokens: {cont_same}"]
    checks = []
    if "naive" in rate:
        speedup = seconds["naive"] / seconds["batched"]
        lines += [f"  naive (1 entry at a time, branch forwards apart): {rate['naive']:7.3f} entries/s"
                  f"   batched is {speedup:.2f}x",
                  f"  naive + each candidate decoded alone:             {rate['naive_alone']:7.3f} entries/s"
                  f"   batched is {seconds['naive_alone'] / seconds['batched']:.2f}x"]
        checks.append(("batched >= 1.5x naive", speedup >= 1.5))
    score, dec = costs["score_2"] / costs["score_1"], costs["decode_2"] / costs["decode_1"]
    lines += [f"  teacher-forced scoring of {B} responses: full branch {costs['score_1'] * 1e3:.1f} ms, "
              f"both branches {costs['score_2'] * 1e3:.1f} ms = {score:.2f}x",
              f"  greedy decoding, {args.decode_tokens} tokens: {B} rows {costs['decode_1'] * 1e3:.1f} ms, "
              f"{2 * B} rows (both branches) {costs['decode_2'] * 1e3:.1f} ms = {dec:.2f}x"]
    if big:
        checks.append(("two-branch decoding <= 1.2x plain", dec <= 1.2))
    lines += [f"  target {what}: {'PASS' if ok else 'FAIL'}" for what, ok in checks]
    if not big:
        lines.append("  target two-branch decoding <= 1.2x: a GPU target, not checked on CPU")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": name, "dtype": str(dtype), "parameters": n_params, "image_tokens": c.num_image_tokens,
              "args": vars(args), "seconds": seconds, "entries_per_s": rate, "records_differing_per_row": differ,
              "continuation_s": cont, "continuation_rows": cont_rows, "continuation_same_tokens": cont_same,
              "branch_costs_s": costs, "targets": dict(checks)}
    (out / "bench_hscr.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "bench_hscr.summary").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
