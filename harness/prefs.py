"""hscr.py's plumbing (docs/FORMATS.md "The preference file"): inputs, entries and records; the output with
its rejects, summary and rank files, resumed bit for bit; `hscr.py merge` and `stats`. `opts` is hscr.py's
Options (resolved); this module never imports hscr.py."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import Record, _preference_fields, image_file, load_pixels, read_records, resolve_image
from harness import provenance
from harness.cli import UserError
from harness.dist import barrier, init_process_group
from harness.files import JsonlFile, merge_jsonl, read_json_records, read_jsonl, remove
from harness.rundir import read_tokenizer
from model import load_model
from model.loading import read_config, resolve_dtype
from model.rows import mean_token_probability, teacher_forced_logits
from model.tokenizer import build_prompt, decode, tokenize_prompt, tokenize_response

# Options naming inputs or the output: the fingerprint holds the inputs' content instead. Every other
# option but --overwrite and --check-finite is in it, batch_size and decode_rows too (they change floats).
PATH_OPTIONS = ("model", "data", "image_root", "out", "answers", "tokenizer", "vision_tower",
                "sentence_model")
HEADER_KEY = "_header"
BAD_RECORD = "bad record"  # the reject category of an input record that did not parse
RESTART = "rerun with --overwrite to start again (this deletes its records, rejects and summary)"


def run(opts, pipeline) -> dict:
    """Rank r runs entries r, r + W, …, rank 0 merges; nothing is written before every input has loaded."""
    rank, world, local_rank = init_process_group()  # gloo: it only synchronises the end of the run
    device = torch.device(f"cuda:{local_rank}" if opts.device == "cuda" and world > 1 else opts.device)
    try:
        records, bad = read_records(opts.data, answers_path=opts.answers)
    except ValueError as e:  # data.py names the file
        raise UserError(str(e)) from e
    tokenizer = read_tokenizer(opts.tokenizer)
    selected = select_entries(len(records), opts.limit, opts.seed)
    header = header_record(asdict(opts), run_fingerprint(opts, records, selected, world, tokenizer))
    c = read_config(opts.model, opts.vision_tower)  # before the (slow) load: is there room to generate?
    generated = opts.max_new_tokens * ((opts.score_on == "greedy") + (opts.continuation == "decode"))
    if generated + c.num_image_tokens >= c.text.max_seq_len:  # else every entry is rejected as too long
        raise UserError(f"--max-new-tokens {opts.max_new_tokens}: {generated} generated and "
                        f"{c.num_image_tokens} image tokens leave no room in max_seq_len "
                        f"{c.text.max_seq_len}; lower it")
    # CheckpointError is a UserError naming the checkpoint or tower file.
    model = load_model(opts.model, vision_tower=opts.vision_tower, dtype=resolve_dtype(opts.dtype, device),
                       device=device, check_finite=opts.check_finite)
    pipe = pipeline(model, tokenizer, opts)  # hscr.py's HSCR
    output = Output(Path(opts.out), header, rank=rank, world=world, overwrite=opts.overwrite)
    # The input's bad records, once across resumes; `position`: index in a JSON list or 0-based JSONL line.
    output.rejects.write({"index": None, "id": b.id, "category": BAD_RECORD, "reason": b.reason,
                          "file": b.file, "position": b.index}
                         for b in (bad if rank == 0 else []) if (b.file, b.index) not in output.rejects.ids)
    share = [(i, records[i]) for i in selected[rank::world]]

    def compute(batch: list[int]) -> list[dict | Reject]:  # one record or Reject per entry, in order
        prepared = [pipe.prepare(*share[k]) for k in batch]
        ready = [p for p in prepared if isinstance(p, Entry)]
        results = iter(pipe.process(ready) if ready else [])
        return [p if isinstance(p, Reject) else next(results) for p in prepared]

    return output.run_batches([r.id for _, r in share], opts.batch_size, compute)


def select_entries(n: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded uniform sample of `limit` of them, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def run_fingerprint(opts, records: list[Record], entries: list[int], world: int, tokenizer) -> dict:
    """What the records depend on, by content. The images: those of the selected entries that open (the others
    are rejected one by one); none: a UserError (--image-root)."""
    names, named = set(), [records[i].image for i in entries if records[i].image]
    for name in named:
        try:
            if os.access(image_file(name, opts.image_root), os.R_OK):
                names.add(name)
        except ValueError:  # outside the root, or no file
            pass
    if named and not names:
        raise UserError(f"--image-root {opts.image_root}: none of the images that {len(named)} selected "
                        f"entries name is there (e.g. {Path(opts.image_root) / named[0]})")
    encoder = None
    if opts.similarity == "minilm":  # every *.safetensors and *.json of it and of its module folders
        root = Path(opts.sentence_model)
        encoder = provenance.Files(root, sorted(str(p.relative_to(root)) for p in root.rglob("*")
                                                if p.suffix in (".json", ".safetensors") and p.is_file()))
    inputs = {"model": provenance.Dir(opts.model),
              "vision tower": provenance.Dir(opts.vision_tower) if opts.vision_tower else None,
              "tokenizer": provenance.tokenizer(tokenizer),
              "data": provenance.File(opts.data),
              "answers": provenance.File(opts.answers) if opts.answers else None,
              "images": provenance.Files(opts.image_root, sorted(names)), "sentence encoder": encoder}
    return provenance.run_fingerprint(inputs, opts, PATH_OPTIONS + ("overwrite", "check_finite"),
                                      world_size=world)


@dataclass
class Reject:
    """An entry the job skipped, with the reason: one line of the rejects file."""
    index: int | None
    id: str | None
    category: str
    reason: str
    image: str | None = None
    negatives_found: int | None = None  # "too few negatives"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("index", "id")}


@dataclass
class Entry:
    """A record ready for the model."""
    index: int  # position among the data file's valid records
    record: Record
    pixels: torch.Tensor  # (3, S, S)
    prompt: str
    prompt_ids: list[int]  # with N image placeholders
    response: list[int] | None  # y_w ids with EOS (None with --score-on greedy)


def prepare(index: int, record: Record, opts, tokenizer, config) -> Entry | Reject:
    """Load the image and tokenize; a problem with the record becomes a Reject. config: the model's."""
    t = config.text
    def reject(category, reason):
        return Reject(index, record.id, category, reason, record.image)
    answer = (record.answer or "").replace("<image>", "").strip()
    if opts.score_on == "reference" and not answer:
        return reject("empty answer", "no reference answer (use --score-on greedy for data without one)")
    if not record.image:
        return reject("no image", "the record names no image")
    try:
        path = resolve_image(opts.image_root, record.image)
    except ValueError as e:
        return reject("bad image path", str(e))
    try:
        pixels = load_pixels(path, config.vision.image_size, opts.image_aspect)
    except FileNotFoundError as e:
        return reject("missing image", str(e))
    except (ValueError, OSError) as e:
        return reject("unreadable image", str(e))
    prompt = build_prompt(record.question, opts.template)
    prompt_ids = tokenize_prompt(tokenizer, prompt, image_token_id=config.image_token_id,
                                 num_image_tokens=config.num_image_tokens, bos_token_id=t.bos_token_id)
    response = (tokenize_response(tokenizer, answer, eos_token_id=t.eos_token_id)
                if opts.score_on == "reference" else None)
    # The longest row ever built: prompt + response (or a greedy answer) + a continuation.
    longest = len(prompt_ids) + (len(response) if response else opts.max_new_tokens)
    longest += opts.max_new_tokens if opts.continuation == "decode" else 0
    if longest > t.max_seq_len:
        return reject("too long", f"{longest} tokens (prompt, response, continuation) exceed the "
                                  f"model's max_seq_len {t.max_seq_len}")
    return Entry(index, record, pixels, prompt, prompt_ids, response)


# A coupled position of y_w: its score s_t, its replacement (−1: none, C_t was empty) and the candidates C_t
# with their P_diff, in the rule's order.
Coupled = NamedTuple("Coupled", [("position", int), ("score", float), ("replacement", int),
                                 ("candidates", list[int]), ("p_diff", list[float])])


def coupled_positions(positions, scores, replacements, candidates, p_diff) -> list[list[Coupled]]:
    """Per entry, its coupled positions with steps 4 and 5's results (tensors over the batch's positions)."""
    values = zip(scores.tolist(), replacements.tolist(), candidates.tolist(), p_diff.tolist())
    return regroup([Coupled(p, *v) for p, v in zip((p for ps in positions for p in ps), values)], positions)


def regroup(flat: list, groups: list[list]) -> list[list]:
    """`flat` cut into consecutive pieces as long as the lists of `groups` (flattening undone)."""
    items = iter(flat)
    return [[next(items) for _ in g] for g in groups]


def replaced(coupled: list[Coupled]) -> tuple[list[int], list[int]]:
    """The positions of an entry's coupled tokens that got a replacement, and those: what step 6 grades."""
    kept = [c for c in coupled if c.replacement >= 0]
    return [c.position for c in kept], [c.replacement for c in kept]


def split_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    """(the ids without a final EOS, whether there was one): how a record stores a response."""
    complete = bool(ids) and ids[-1] == eos
    return list(ids[:-1] if complete else ids), complete


def preference_record(e: Entry, chosen_ids: list[int], coupled: list[Coupled], negatives: list[tuple],
                      p_chosen: float, p_rejected: list[float] | None, opts, tokenizer,
                      eos: int) -> dict | Reject:
    """The entry's output record (a Reject under --min-negatives, or when a probability is NaN or Inf:
    the model computes nothing sound); negatives: (text, similarity, m, ids)."""
    rec = e.record
    if not all(map(math.isfinite, [p_chosen, *(p_rejected or [])])):
        return Reject(e.index, rec.id, "non-finite probability", f"p_chosen {p_chosen}, p_rejected "
                      f"{p_rejected}: the model gives NaN or Inf (damaged weights?)", rec.image)
    if len(negatives) < opts.min_negatives:
        return Reject(e.index, rec.id, "too few negatives",
                      f"{len(negatives)} negatives, fewer than --min-negatives {opts.min_negatives}",
                      rec.image, negatives_found=len(negatives))
    piece = tokenizer.id_to_token
    # The reference as the data file gives it, not its round trip through the tokenizer.
    chosen = ((rec.answer or "").replace("<image>", "").strip() if opts.score_on == "reference"
              else decode(tokenizer, chosen_ids, eos_token_id=eos))
    ids, complete = split_eos(chosen_ids, eos)
    def token(c: Coupled) -> dict:  # y_t at a coupled position
        y = chosen_ids[c.position]
        return {"position": c.position, "token": piece(y), "token_id": y, "score": c.score}
    return {
        "id": rec.id, "index": e.index, "image": rec.image, "question": rec.question, "prompt": e.prompt,
        "answer_type": rec.answer_type, "chosen": chosen, "chosen_ids": ids, "chosen_complete": complete,
        "rejected": negatives[0][0] if negatives else None,
        "negatives": [{"text": text, "similarity": sim, "m": m, **dict(zip(("ids", "complete"),
                                                                           split_eos(n, eos)))}
                      for text, sim, m, n in negatives],
        "coupled": [{**token(c), "replacement": piece(c.replacement), "replacement_id": c.replacement,
                     "candidates": [{"token": piece(v), "token_id": v, "p_diff": d}
                                    for v, d in zip(c.candidates, c.p_diff) if v >= 0]}
                    for c in coupled if c.replacement >= 0],
        "unreplaced": [token(c) for c in coupled if c.replacement < 0],
        "p_chosen": p_chosen, **({"p_rejected": p_rejected} if p_rejected is not None else {}),
    }


# The output file: header, records and rejects, resume, rank files, merge and summary
def _result_id(r: dict | Reject) -> str | None:  # None: a header
    return r.id if isinstance(r, Reject) else r.get("id")


def _reject_key(r: dict):  # a rejected entry's id; an input's bad record: (file, position)
    return (r.get("file"), r.get("position")) if r.get("category") == BAD_RECORD else r.get("id")


def sidecar(out: Path, kind: str) -> Path:
    """prefs.jsonl → prefs.rejects.jsonl / prefs.summary.json."""
    suffix = {"rejects": ".rejects.jsonl", "summary": ".summary.json"}[kind]
    return Path(str(out).removesuffix(".jsonl") + suffix)


def shard_path(out: Path, rank: int, world: int) -> Path:
    """prefs.jsonl → prefs.rank0-of-2.jsonl."""
    return Path(f"{str(out).removesuffix('.jsonl')}.rank{rank}-of-{world}.jsonl")


def header_record(options: dict, fingerprint: dict) -> dict:
    """The first line of an output: the job's options as given, for people, and its fingerprint."""
    return {HEADER_KEY: True, "options": options, "provenance": fingerprint}


def written(out: Path, rank: int, world: int) -> list[Path]:
    """What --overwrite deletes: each rank its own rank files; rank 0 also the merged output, its rejects
    and summary, and the rank files of runs with another number of ranks."""
    mine = shard_path(out, rank, world) if world > 1 else out
    paths = [mine, sidecar(mine, "rejects"), sidecar(mine, "summary")]
    if rank == 0:
        paths += [out, sidecar(out, "rejects"), sidecar(out, "summary")]
        stem = out.name.removesuffix(".jsonl")
        pattern = re.compile(re.escape(stem) + r"\.rank\d+-of-(\d+)\.(jsonl|rejects\.jsonl|summary\.json)")
        paths += [p for p in out.parent.glob("*.rank*-of-*")
                  if (m := pattern.fullmatch(p.name)) and (world == 1 or int(m.group(1)) != world)]
    return paths


class Output:
    """One process's output and rejects: restarted with `overwrite` or nothing computed, else resumed."""

    def __init__(self, out: Path, header: dict, *, rank: int = 0, world: int = 1, overwrite: bool = False):
        self.out, self.rank, self.world = out, rank, world
        path = self.path = shard_path(out, rank, world) if world > 1 else out
        rejects = sidecar(path, "rejects")
        first, held = None, False
        if not overwrite:
            self.records, self.rejects = JsonlFile(path, _result_id), JsonlFile(rejects, _reject_key)
            first = self.records.first
            if first is not None and not first.get(HEADER_KEY):
                raise UserError(f"{path} does not start with an hscr.py header; choose another --out")
            computed = any(isinstance(k, str) for k in self.rejects.ids)  # rejected entries, not bad records
            held = bool(self.records.ids) or computed
        stored = first.get("provenance") if first is not None else None
        unknown = (f"{path}: not an hscr.py output (its header holds no fingerprint), so it cannot be "
                   "continued" if first is not None else f"{rejects} holds rejects but {path} is "
                   f"{'empty' if path.exists() else 'gone'}, so what made them cannot be checked")
        # Each process on its own (as rank 0 of 1): it reads and deletes only its own files.
        provenance.start(path, header["provenance"], stored if isinstance(stored, dict) else None,
                         resume=held, unknown=unknown, restart=RESTART,
                         clear=lambda: remove(written(out, rank, world) if overwrite else [path, rejects]))
        if not held:
            self.records, self.rejects = JsonlFile(path, _result_id), JsonlFile(rejects, _reject_key)
        # Both files exist from here on, a torn last line cut only now, once the output is accepted.
        self.records.write([header] if self.records.first is None else [])
        self.rejects.write([])

    def done(self, entry_id: str) -> bool:
        """Whether the entry has its record or reject (an input's bad records are no entries)."""
        return entry_id in self.records.ids or entry_id in self.rejects.ids

    def run_batches(self, ids: list[str], batch_size: int, compute) -> dict:
        """compute(positions) → one record or Reject each; batch b is always positions [b·B, (b+1)·B),
        computed whole when any result is missing, only those written. The summary (torchrun: merged)."""
        processed, t0 = 0, time.perf_counter()
        with tqdm(total=len(ids), initial=sum(map(self.done, ids)), unit="entry", position=self.rank,
                  desc=f"hscr rank {self.rank}" if self.world > 1 else "hscr", dynamic_ncols=True) as bar:
            for start in range(0, len(ids), batch_size):
                batch = list(range(start, min(start + batch_size, len(ids))))
                todo = {ids[i] for i in batch if not self.done(ids[i])}
                if not todo:
                    continue
                results = [r for r in compute(batch) if _result_id(r) in todo]
                self.records.write(r for r in results if not isinstance(r, Reject))
                self.rejects.write(r.to_json() for r in results if isinstance(r, Reject))
                processed += len(todo)
                bar.update(len(todo))
        summary = summarize(self.path, processed=processed, seconds=time.perf_counter() - t0,
                            show=self.world == 1)
        if self.world == 1:
            return summary
        barrier(self.world)
        if self.rank == 0:
            summary = merge_shards(self.out, self.world)
        barrier(self.world)
        dist.destroy_process_group()
        return summary


def merge_shards(out: Path, world: int) -> dict:
    """The rank files in one, in `index` order (a single-process run's), if their fingerprints agree."""
    parts = [shard_path(out, r, world) for r in range(world)]
    if missing := [str(p) for p in parts if not p.exists()]:
        raise UserError(f"cannot merge: missing rank files {', '.join(missing)}")
    headers = [JsonlFile(p, _result_id).first for p in parts]
    for r, (p, h) in enumerate(zip(parts, headers)):  # rank 0's header first, so the others compare to one
        if not h or not h.get(HEADER_KEY) or not isinstance(h.get("provenance"), dict):
            raise UserError(f"cannot merge: {p} does not start with an hscr.py header holding a fingerprint")
        if diff := provenance.differences(headers[0]["provenance"], h["provenance"]):
            raise UserError(f"cannot merge: rank {r} ran with other inputs or options than rank 0: "
                            f"{'; '.join(diff)}")
    merge_jsonl(out, parts, key=_result_id, order=lambda r: r["index"], head=headers[:1])
    merge_jsonl(sidecar(out, "rejects"), [sidecar(p, "rejects") for p in parts], key=_reject_key,
                order=lambda r: (r.get("index") is not None, r.get("index") or 0,  # bad records first
                                 r.get("file") or "", r.get("position") or 0))
    summaries = [json.loads(f.read_text()) for p in parts if (f := sidecar(p, "summary")).exists()]
    return summarize(out, processed=sum(s.get("processed_this_run", 0) for s in summaries),
                     seconds=max((s.get("seconds", 0.0) for s in summaries), default=0.0), show=True)


def merge_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="python hscr.py merge", description="merge a torchrun run's rank files")
    p.add_argument("--out", required=True, help="the run's --out")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks of the run")
    args = p.parse_args(argv)
    return merge_shards(Path(args.out), args.world_size)


def negatives_histogram(records: list[dict], rejects: list[dict]) -> dict[str, int]:
    """Entries by number of kept negatives, most first (3, 2, 1 and 0 always shown), too few included."""
    counts = Counter(len(r["negatives"]) for r in records)
    counts.update(r["negatives_found"] for r in rejects if r.get("negatives_found") is not None)
    return {str(n): counts.get(n, 0) for n in sorted(set(counts) | {0, 1, 2, 3}, reverse=True)}


def summarize(out: Path, *, processed: int, seconds: float, show: bool = False) -> dict:
    """Counts over the whole output, this run's rate; written to prefs.summary.json, `show`: printed."""
    records = [r for r in read_jsonl(out) if not r.get(HEADER_KEY)]
    rejects = read_jsonl(sidecar(out, "rejects"))
    skipped = Counter(r["category"] for r in rejects)
    summary = {"entries_written": len(records), "negatives": negatives_histogram(records, rejects),
               "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
               "processed_this_run": processed, "seconds": round(seconds, 3),
               "entries_per_s": round(processed / seconds, 4) if seconds > 0 else None}
    sidecar(out, "summary").write_text(json.dumps(summary, indent=2) + "\n")
    if show:
        negatives = ", ".join(f"{k}: {v}" for k, v in summary["negatives"].items())
        kinds = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
        rate = f"{summary['entries_per_s']} entries/s" if seconds > 0 else "nothing processed"
        print(f"hscr: {len(records)} entries in {out} (by number of negatives {negatives}); "
              f"skipped {summary['skipped_total']} ({kinds}); {rate}; summary in {sidecar(out, 'summary')}")
    return summary


# `python hscr.py stats`: what a preference file holds, and the paper's claim that self-generated
# negatives are likelier under the model than external ones (docs/METHOD.md, "Evaluation").
def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def stats_main(argv) -> dict:
    """Counts, similarity per rank, mean per-token probability of chosen vs rejected vs external."""
    p = argparse.ArgumentParser(prog="python hscr.py stats", description=stats_main.__doc__.split("\n")[0])
    p.add_argument("prefs", help="output of hscr.py")
    p.add_argument("--model", help="checkpoint directory: also score external negatives")
    p.add_argument("--external", help="preference file whose negatives (matched by id) --model scores as the "
                   "external ones (default: each entry's borrowed one, another entry's answer)")
    p.add_argument("--image-root", help="default: the run's --image-root (from the header)")
    p.add_argument("--tokenizer", help="default: the run's tokenizer")
    p.add_argument("--vision-tower", help="CLIP directory, as for the run")
    p.add_argument("--limit", type=int, help="score external negatives on the first N entries only")
    p.add_argument("--batch-size", type=int, default=8, help="entries per forward of --model (default: 8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="for --model; auto (the default): cuda when available")
    p.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse weights holding NaN or Inf as they load (default: on)")
    args = p.parse_args(argv)
    lines = read_jsonl(path := Path(args.prefs))
    if not lines or not lines[0].get(HEADER_KEY):
        raise UserError(f"{path}: not an hscr.py output (no header line)")
    options, records = lines[0]["options"], lines[1:]
    depth = max((len(r["negatives"]) for r in records), default=0)
    scored = [r["p_rejected"] for r in records if "p_rejected" in r]
    result = {"entries": len(records),
              "negatives": negatives_histogram(records, read_jsonl(sidecar(path, "rejects"))),
              "similarity_by_rank": [_mean(r["negatives"][j]["similarity"] for r in records
                                           if len(r["negatives"]) > j) for j in range(depth)],
              "p_chosen": _mean(r["p_chosen"] for r in records),
              "p_rejected": _mean(x for ps in scored for x in ps),
              "p_rejected_by_rank": ([_mean(ps[j] for ps in scored if len(ps) > j) for j in range(depth)]
                                     if scored else None)}
    if args.external and not (args.model and Path(args.external).is_file()):
        raise UserError(f"--external {args.external}: {'file not found' if args.model else 'needs --model'}")
    if args.model:
        each = external_probability(args, options, records)
        result.update(p_external=_mean(each), p_external_each=each)
    print(f"{path}: {result['entries']} entries; by number of negatives "
          + ", ".join(f"{k}: {v}" for k, v in result["negatives"].items()))
    print("  mean similarity by rank: "
          + ", ".join(f"{j + 1}: {s:.4f}" for j, s in enumerate(result["similarity_by_rank"])))
    for key in ("p_chosen", "p_rejected", "p_external"):
        if result.get(key) is not None:
            print(f"  mean per-token probability, {key[2:]}: {result[key]:.4f}")
    if records and not scored:
        print("  no p_rejected in the file: rerun hscr.py with --score-negatives to compare the negatives")
    print(json.dumps({k: v for k, v in result.items() if k != "p_external_each"}))
    return result


def external_probability(args, options: dict, records: list[dict]) -> list[float]:
    """Per-token probability under --model of each entry's external negatives: those of --external (by id;
    a bad record is named and skipped), else its borrowed one (the next entry's different chosen answer,
    cyclically), each prepared as hscr.py prepares y_w (a reject is left out)."""
    external = {} if args.external else None  # id → its negative texts
    for index, item in read_json_records(args.external) if args.external else []:
        try:
            if not (isinstance(item, dict) and item.get(HEADER_KEY)):
                rid, *_, negatives = _preference_fields(item, None)
                external[rid] = [text for text, *_ in negatives]
        except ValueError as e:
            print(f"{args.external}: record {index} skipped: {e}", file=sys.stderr)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, vision_tower=args.vision_tower or options["vision_tower"],
                       dtype=resolve_dtype("auto", device), device=device, check_finite=args.check_finite)
    tokenizer = read_tokenizer(args.tokenizer or options["tokenizer"])
    opts = SimpleNamespace(**{**options, "image_root": args.image_root or options["image_root"],
                              "score_on": "reference", "continuation": "splice"})  # as the reference
    c = model.config
    pad = c.text.pad_token_id if c.text.pad_token_id not in (None, c.image_token_id) else c.text.eos_token_id
    chosen = [r["chosen"] for r in records]
    entries = []
    for i, r in enumerate(records[: args.limit] if args.limit else records):
        if external is not None:
            texts = external.get(r["id"], [])
        else:  # the next different chosen answer, cyclically: stops at the first, no copy of the list
            n = len(chosen)
            other = next((chosen[(i + d) % n] for d in range(1, n)
                          if chosen[(i + d) % n] != r["chosen"]), None)
            texts = [other] * (other is not None)
        entries += [prepare(r["index"], Record(r["id"], r["image"], r["question"], text, None), opts,
                            tokenizer, c) for text in texts]
    entries = [e for e in entries if isinstance(e, Entry)]
    probs = []
    for start in range(0, len(entries), args.batch_size):
        batch = entries[start: start + args.batch_size]
        features = model.encode_images(torch.stack([e.pixels for e in batch]).to(model.device, model.dtype))
        rows = teacher_forced_logits(model, [e.prompt_ids for e in batch], list(features),
                                     [e.response for e in batch], pad)
        probs += mean_token_probability(*rows).tolist()
    return probs
