"""hscr.py's output, prefs.jsonl, with its rejects, summary and rank files (docs/FORMATS.md "The
preference file"): JSON lines that a kill may interrupt and a rerun resumes bit for bit, sharded under
torchrun. The header line's fingerprint decides, through provenance.start, whether a rerun starts the
output again, continues it or is refused.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from harness import provenance
from harness.cli import UserError
from harness.dist import barrier
from harness.files import JsonlFile, merge_jsonl, read_jsonl, remove

HEADER_KEY = "_header"
BAD_RECORD = "bad record"  # the reject category of an input record that did not parse
RESTART = "rerun with --overwrite to start again (this deletes its records, rejects and summary)"


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


def _result_id(r: dict | Reject) -> str | None:  # None: a header
    return r.id if isinstance(r, Reject) else r.get("id")


def _reject_key(r: dict):  # a rejected entry's id; an input's bad record: (file, position)
    return (r.get("file"), r.get("position")) if r.get("category") == BAD_RECORD else r.get("id")


def _reject_order(r: dict):
    return (r.get("index") is not None, r.get("index") or 0, r.get("file") or "", r.get("position") or 0)


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
    """The output and rejects files of one process, made once the job's inputs have loaded. It starts
    again with `overwrite` (deleting what `written` lists) or when it holds nothing computed (only a
    header or bad records), else continues only with the header's fingerprint (provenance.start)."""

    def __init__(self, out: Path, header: dict, *, rank: int = 0, world: int = 1, overwrite: bool = False):
        self.out, self.rank, self.world = out, rank, world
        path = self.path = shard_path(out, rank, world) if world > 1 else out
        rejects = sidecar(path, "rejects")
        first, held = None, False
        if not overwrite:
            self.records, self.rejects = JsonlFile(path, _result_id), JsonlFile(rejects, _reject_key)
            first = self.records.first
            if first is not None and not first.get(HEADER_KEY):
                raise UserError(f"{path} exists but does not start with an hscr.py header; "
                                "choose another --out")
            computed = any(isinstance(k, str) for k in self.rejects.ids)  # rejected entries, not bad records
            held = bool(self.records.ids) or computed
        stored = first.get("provenance") if first is not None else None
        if first is not None:
            unknown = (f"{path}: not an hscr.py output (its header holds no fingerprint), "
                       "so it cannot be continued")
        else:
            unknown = (f"{rejects} holds rejects but {path} is {'empty' if path.exists() else 'gone'}, "
                       "so what made them cannot be checked")
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

    def write_bad(self, file: str, position: int, record_id: str | None, reason: str):
        """An input record that could not be parsed, once even across resumes; `position`: its index in
        the JSON list or its 0-based line in a JSONL file."""
        if (file, position) not in self.rejects.ids:
            self.rejects.write([{"index": None, "id": record_id, "category": BAD_RECORD, "reason": reason,
                                 "file": file, "position": position}])

    def run_batches(self, ids: list[str], batch_size: int, compute) -> dict:
        """This process's share of the entries (`ids`) through compute(positions) → one record or Reject
        per position; batch b is always positions [b·B, (b+1)·B), computed whole when any result is
        missing, only the missing ones written. Returns the summary (under torchrun, the merged one)."""
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
        summary = summarize(self.path, processed=processed, seconds=time.perf_counter() - t0)
        if self.world == 1:
            print_summary(self.out, summary)
            return summary
        barrier(self.world)
        if self.rank == 0:
            summary = merge_shards(self.out, self.world)
        barrier(self.world)
        dist.destroy_process_group()
        return summary


def merge_shards(out: Path, world: int) -> dict:
    """One file from the rank files, records and rejects in `index` order (a single-process run's);
    refuses rank files whose fingerprints differ. Returns the merged summary, printed."""
    parts = [shard_path(out, r, world) for r in range(world)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise UserError(f"cannot merge: missing rank files {', '.join(missing)}")
    headers = [JsonlFile(p, _result_id).first for p in parts]
    for p, h in zip(parts, headers):
        if not h or not h.get(HEADER_KEY) or not isinstance(h.get("provenance"), dict):
            raise UserError(f"cannot merge: {p} does not start with an hscr.py header holding a fingerprint")
    for r, h in enumerate(headers[1:], 1):
        diff = provenance.differences(headers[0]["provenance"], h["provenance"])
        if diff:
            raise UserError(f"cannot merge: rank {r} ran with other inputs or options than rank 0: "
                            f"{'; '.join(diff)}")
    merge_jsonl(out, parts, key=_result_id, order=lambda r: r["index"], head=headers[:1])
    merge_jsonl(sidecar(out, "rejects"), [sidecar(p, "rejects") for p in parts], key=_reject_key,
                order=_reject_order)
    summaries = [sidecar(p, "summary") for p in parts]
    summaries = [json.loads(f.read_text()) if f.exists() else {} for f in summaries]
    summary = summarize(out, processed=sum(s.get("processed_this_run", 0) for s in summaries),
                        seconds=max(s.get("seconds", 0.0) for s in summaries))
    print_summary(out, summary)
    return summary


def merge_main(argv) -> dict:
    """`python hscr.py merge --out FILE --world-size N`: the merge alone, e.g. after a crash."""
    p = argparse.ArgumentParser(prog="python hscr.py merge",
                                description="merge the rank files of a torchrun run")
    p.add_argument("--out", required=True, help="the run's --out")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks of the run")
    args = p.parse_args(argv)
    return merge_shards(Path(args.out), args.world_size)


def negatives_histogram(records: list[dict], rejects: list[dict]) -> dict[str, int]:
    """Entries by number of kept negatives, most first (3, 2, 1 and 0 always shown): the records,
    and the rejects of entries with too few (`negatives_found`)."""
    counts = Counter(len(r["negatives"]) for r in records)
    counts.update(r["negatives_found"] for r in rejects if r.get("negatives_found") is not None)
    return {str(n): counts.get(n, 0) for n in sorted(set(counts) | {0, 1, 2, 3}, reverse=True)}


def summarize(out: Path, *, processed: int, seconds: float) -> dict:
    """Counts over the whole output (a resumed run reports everything), this run's rate; written beside
    it (prefs.summary.json)."""
    records = [r for r in read_jsonl(out) if not r.get(HEADER_KEY)]
    rejects = read_jsonl(sidecar(out, "rejects"))
    skipped = Counter(r["category"] for r in rejects)
    summary = {"entries_written": len(records), "negatives": negatives_histogram(records, rejects),
               "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
               "processed_this_run": processed, "seconds": round(seconds, 3),
               "entries_per_s": round(processed / seconds, 4) if seconds > 0 else None}
    sidecar(out, "summary").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(out: Path, s: dict):
    negatives = ", ".join(f"{k}: {v}" for k, v in s["negatives"].items())
    skipped = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or "none"
    rate = f"{s['entries_per_s']} entries/s" if s["entries_per_s"] is not None else "nothing processed"
    print(f"hscr: {s['entries_written']} entries in {out} (by number of negatives {negatives}); "
          f"skipped {s['skipped_total']} ({skipped}); {rate}; summary in {sidecar(out, 'summary')}")
