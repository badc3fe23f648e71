"""`python hscr.py stats prefs.jsonl [--model DIR]`: what a preference file holds, and the paper's
claim that self-generated negatives are likelier under the model than external ones (docs/METHOD.md,
"Evaluation"). External negatives, with --model: each entry's borrowed answer (the chosen answer
of the next entry, cyclically, that differs), teacher-forced as hscr.py scores y_w.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from data import Record
from harness import outputs
from harness.cli import UserError
from harness.files import read_jsonl
from harness.prefs import Entry, prepare
from model import load_model
from model.loading import resolve_dtype
from model.rows import mean_token_probability, teacher_forced_logits
from model.tokenizer import load_tokenizer


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def main(argv) -> dict:
    """Counts, similarity per rank, mean per-token probability of chosen vs rejected vs external."""
    p = argparse.ArgumentParser(prog="python hscr.py stats", description=main.__doc__.split("\n")[0])
    p.add_argument("prefs", help="output of hscr.py")
    p.add_argument("--model", help="checkpoint directory: also score external negatives")
    p.add_argument("--image-root", help="default: the run's --image-root (from the header)")
    p.add_argument("--tokenizer", help="default: the run's tokenizer")
    p.add_argument("--vision-tower", help="CLIP directory, as for the run")
    p.add_argument("--limit", type=int, help="score external negatives on the first N entries only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    path = Path(args.prefs)
    lines = read_jsonl(path)
    if not lines or not lines[0].get(outputs.HEADER_KEY):
        raise UserError(f"{path}: not an hscr.py output (no header line)")
    options, records = lines[0]["options"], lines[1:]
    depth = max((len(r["negatives"]) for r in records), default=0)
    scored = [r["p_rejected"] for r in records if "p_rejected" in r]
    result = {
        "entries": len(records),
        "negatives": outputs.negatives_histogram(records, read_jsonl(outputs.sidecar(path, "rejects"))),
        "similarity_by_rank": [_mean(r["negatives"][j]["similarity"] for r in records
                                     if len(r["negatives"]) > j) for j in range(depth)],
        "p_chosen": _mean(r["p_chosen"] for r in records),
        "p_rejected": _mean(x for ps in scored for x in ps),
        "p_rejected_by_rank": ([_mean(ps[j] for ps in scored if len(ps) > j) for j in range(depth)]
                               if scored else None),
    }
    if args.model:
        result["p_external"] = external_probability(args, options, records)
    print(f"{path}: {result['entries']} entries; by number of negatives "
          + ", ".join(f"{k}: {v}" for k, v in result["negatives"].items()))
    by_rank = result["similarity_by_rank"]
    print("  mean similarity by rank: " + ", ".join(f"{j + 1}: {s:.4f}" for j, s in enumerate(by_rank)))
    for key in ("p_chosen", "p_rejected", "p_external"):
        if result.get(key) is not None:
            print(f"  mean per-token probability, {key[2:]}: {result[key]:.4f}")
    if records and not scored:
        print("  no p_rejected in the file: rerun hscr.py with --score-negatives (with another --out, or "
              "--overwrite) to compare the negatives' probability with chosen and external answers")
    print(json.dumps(result))
    return result


def external_probability(args, options: dict, records: list[dict]) -> float | None:
    """Mean per-token probability of each entry's borrowed negative under --model, prepared as
    hscr.py prepares y_w (an entry it rejects is left out); `options`: the run's, from the header."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, vision_tower=args.vision_tower or options["vision_tower"],
                       dtype=resolve_dtype("auto", device), device=device)
    tokenizer = load_tokenizer(args.tokenizer or options["tokenizer"])
    opts = SimpleNamespace(**{**options, "image_root": args.image_root or options["image_root"],
                              "score_on": "reference", "continuation": "splice"})  # the borrowed answer
    c = model.config
    pad = c.text.pad_token_id if c.text.pad_token_id not in (None, c.image_token_id) else c.text.eos_token_id
    chosen = [r["chosen"] for r in records]
    entries = []
    for i, r in enumerate(records[: args.limit] if args.limit else records):
        other = next((chosen[(i + d) % len(chosen)] for d in range(1, len(chosen))
                      if chosen[(i + d) % len(chosen)] != r["chosen"]), None)
        if other is not None:
            entries.append(prepare(r["index"], Record(r["id"], r["image"], r["question"], other, None), opts,
                                   tokenizer, c))
    entries = [e for e in entries if isinstance(e, Entry)]
    probs = []
    for start in range(0, len(entries), args.batch_size):
        batch = entries[start: start + args.batch_size]
        pixels = torch.stack([e.pixels for e in batch]).to(device=model.device, dtype=model.dtype)
        features = list(model.encode_images(pixels))
        logits, t, v = teacher_forced_logits(model, [e.prompt_ids for e in batch], features,
                                             [e.response for e in batch], pad)
        probs += mean_token_probability(logits, t, v).tolist()
    return _mean(probs)
