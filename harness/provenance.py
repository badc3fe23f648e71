"""Provenance: a fingerprint of what made an output, what changed since, and `start`, the one decision of
every output: start it, continue it, refuse it naming each change, or reuse it. Kept in a header line
(harness/prefs.py) or provenance.json (`save`, `load`), a fingerprint is name → part: an option value, or a
digest of an input's content, never of its path; large files' digests are cached (docs/FORMATS.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from harness.cli import UserError
from harness.dist import barrier
from harness.files import DataError, atomic_write_text
from model.tokenizer import canonical_form

FORMAT = "hscr-provenance/1"
# Files smaller than this are hashed every time (an image takes microseconds); larger ones are
# cached, so that the cache holds weights, not every image of a data set.
CACHE_MIN_BYTES = 1 << 20
# The JSON files of a checkpoint or adapter directory that change what its weights compute.
DIR_JSON = ("config.json", "adapter_config.json", "model.safetensors.index.json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class DigestCache:
    """The digests of large files in $HSCR_CACHE/fingerprints.json (default ~/.cache/hscr/), keyed by
    absolute path, size, mtime_ns, and ctime_ns and inode, which no copy tool can restore (cp -p and
    rsync -t keep the mtime); `save` merges the new ones with what other processes wrote."""

    def __init__(self):
        folder = os.environ.get("HSCR_CACHE")
        self.path = (Path(folder) if folder else Path.home() / ".cache" / "hscr") / "fingerprints.json"
        self.entries, self.new = self._read(), {}

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable or torn: start empty, it is only a cache
            return {}
        return entries if isinstance(entries, dict) else {}

    def digest(self, path: str | os.PathLike) -> str:
        """The sha256 (hex) of a file's bytes; from the cache when its stamp (see above) is unchanged."""
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        if st.st_size < CACHE_MIN_BYTES:
            return _sha256(path)
        key, stamp = str(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                                 "inode": st.st_ino}
        hit = self.entries.get(key)
        fresh = isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp
        if fresh and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        self.new[key] = self.entries[key] = {**stamp, "sha256": _sha256(path)}
        return self.new[key]["sha256"]

    def save(self) -> None:
        """Merge the new digests into the file atomically, dropping gone files (failing: a stderr note)."""
        if not self.new:
            return
        entries = {k: v for k, v in {**self._read(), **self.new}.items() if os.path.exists(k)}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            print(f"provenance: cannot write the digest cache {self.path} ({e.strerror}); "
                  "digests will be recomputed next time", file=sys.stderr)
            with contextlib.suppress(OSError):  # e.g. the cache "folder" is a file: no temporary either
                tmp.unlink(missing_ok=True)
        self.new = {}


# The inputs of a fingerprint, each resolved to a digest of its content: one file; a checkpoint or adapter
# directory (every *.safetensors and DIR_JSON file); many files under `root`, one digest of (name, content)
# pairs; data as read (JSON-serialisable), one digest and `n`, its length.
File = NamedTuple("File", [("path", str | os.PathLike)])
Dir = NamedTuple("Dir", [("path", str | os.PathLike)])
Files = NamedTuple("Files", [("root", str | os.PathLike), ("names", Sequence[str])])
Content = NamedTuple("Content", [("value", Any)])


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _resolve(part: Any, cache: DigestCache) -> Any:
    if isinstance(part, (File, Dir)):
        path, kind = Path(part.path), "file" if isinstance(part, File) else "directory"
        if not (path.is_file() if kind == "file" else path.is_dir()):
            raise UserError(f"{path}: " + (f"not a {kind}" if path.exists() else f"{kind} not found"))
        if kind == "file":
            return {"kind": "file", "path": str(path.resolve()), "sha256": cache.digest(path)}
        files = sorted(path.glob("*.safetensors")) + [path / n for n in DIR_JSON if (path / n).is_file()]
        if not files:
            raise UserError(f"{path}: no *.safetensors or {', '.join(DIR_JSON)} to fingerprint")
        return {"kind": "dir", "path": str(path.resolve()), "files": {f.name: cache.digest(f) for f in files}}
    if isinstance(part, Files):
        root, h = Path(part.root), hashlib.sha256()
        for name in part.names:
            h.update(_canonical([name, cache.digest(root / name)]))
        return {"kind": "files", "root": str(root.resolve()), "n": len(part.names), "sha256": h.hexdigest()}
    if isinstance(part, Content):
        n = len(part.value) if isinstance(part.value, (list, tuple)) else None
        return {"kind": "content", "n": n, "sha256": hashlib.sha256(_canonical(part.value)).hexdigest()}
    if isinstance(part, dict):
        if _is_input(part):  # resolved already (`tokenizer`)
            return part
        raise TypeError("an option value must be a JSON scalar or list; wrap inputs in File, Dir, Files or "
                        "Content")
    json.dumps(part)  # an option must survive the round trip through the record file
    return part


def tokenizer(tok) -> dict:
    """The resolved part of a tokenizer: a digest of what it does (model.tokenizer.canonical_form)."""
    return _resolve(Content(canonical_form(tok)), None)


def fingerprint(**parts: Any) -> dict[str, Any]:
    """name → resolved part: File/Dir/Files/Content become digests, other values (options, or None for
    an input not given) are kept. Names may hold spaces (pass a dict with **)."""
    cache = DigestCache()
    out = {name: _resolve(part, cache) for name, part in parts.items()}
    cache.save()
    return out


def run_fingerprint(inputs: Mapping[str, Any], options: Any = None, leave_out: Sequence[str] = (),
                    **resolved: Any) -> dict[str, Any]:
    """The fingerprint of one run, the one way every script makes it: `inputs`, every field of the
    `options` dataclass but `leave_out` (paths, options that only steer the run), then `resolved`."""
    fields = dataclasses.asdict(options) if options is not None else {}
    return fingerprint(**inputs, **{k: v for k, v in fields.items() if k not in leave_out}, **resolved)


def _is_input(part: Any) -> bool:
    return isinstance(part, dict) and "kind" in part


def _show(value: Any) -> str:
    """An option value or an input as a person reads it in one line."""
    if value is None:
        return "none"
    if _is_input(value):
        return value.get("path") or value.get("root") or value["kind"]
    return value if isinstance(value, str) else json.dumps(value)


def _input_changes(label: str, old: dict, new: dict) -> list[str]:
    kind = old["kind"]
    if kind != new["kind"]:
        return [f"{label} changed ({_show(old)} in the file, {_show(new)} now)"]
    if kind == "file":
        return [] if old["sha256"] == new["sha256"] else [f"{label} ({Path(new['path']).name}) changed"]
    if kind == "dir":
        a, b = old["files"], new["files"]
        role = {f: "weights" if f.endswith(".safetensors") else "weights index" if f.endswith(".index.json")
                else "config" for f in a}
        out = [f"{label} {role[f]} ({f}) changed" for f in a if f in b and a[f] != b[f]]
        out += [f"{label}: {f} is gone" for f in a if f not in b]
        return out + [f"{label}: {f} is new" for f in b if f not in a]
    if old["sha256"] == new["sha256"]:
        return []
    unit = "files" if kind == "files" else "items"
    if old.get("n") != new.get("n"):
        return [f"{label} changed ({old.get('n')} {unit} in the file, {new.get('n')} now)"]
    return [f"{label} changed (content of some of its {new.get('n')} {unit})" if new.get("n") is not None
            else f"{label} changed"]


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between a stored fingerprint and the current one, one phrase per change, e.g.
    "model weights (model.safetensors) changed", "option max_new_tokens: 32 in the file, 64 now".
    Empty when they agree. Paths alone never count."""
    out = []
    for name in list(stored) + [n for n in now if n not in stored]:
        old, new = stored.get(name), now.get(name)
        label = name if _is_input(old) or _is_input(new) else f"option {name}"
        if name not in stored or name not in now:
            where = "not recorded in the file" if name not in stored else f"{_show(old)} in the file"
            out.append(f"{label}: {where}, {_show(new) if name in now else 'not given'} now")
        elif _is_input(old) and _is_input(new):
            out += _input_changes(name, old, new)
        elif old != new:  # an option, or an input against an option value
            out.append(f"{label}: {_show(old)} in the file, {_show(new)} now")
    return out


class ProvenanceError(UserError):
    """An output was made from other inputs or options than the job resuming it would use."""

    def __init__(self, where: str | os.PathLike, changes: Sequence[str], restart: str):
        self.where, self.changes = str(where), list(changes)
        super().__init__(f"{where} was made from other inputs or options than this run: "
                         f"{'; '.join(self.changes)}. To resume it, use what made it; or {restart}, "
                         "or choose another output")


def start(where: str | os.PathLike, now: Mapping[str, Any], stored: Mapping[str, Any] | None, *, resume: bool,
          clear: Callable[[], Any], unknown: str, restart: str, changes: Sequence[str] = (),
          reuse: Callable[[], bool] = lambda: False, rank: int = 0, world: int = 1) -> bool:
    """The one decision of every output; True: `where` is reused as it is (`reuse()`). resume: only
    if `stored` equals `now` and there are no `changes`, else a ProvenanceError naming each (no `stored`:
    a UserError, `unknown` says why), on every rank. Otherwise rank 0 runs `clear()` once all have read."""
    if resume:
        if stored is None:
            raise UserError(f"{unknown}; {restart}, or choose another --out")
        found = differences(stored, now) + list(changes)
        if found:
            raise ProvenanceError(where, found, restart)
        if reuse():
            return True
    barrier(world)  # every process has read the old fingerprint before it is replaced
    if not resume and rank == 0:
        clear()
    return False


def load(path: str | os.PathLike) -> dict | None:
    """A provenance record written by `save`, or None when there is none; any other file is refused."""
    path = Path(path)
    if not path.is_file():
        return None
    with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
        record = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(record, dict) and record.get("format") == FORMAT
        if ours and isinstance(record.get("fingerprint"), dict):
            return record
    raise DataError(f"{path}: not a provenance record of format {FORMAT}, so not this project's to "
                    "replace: move it, or choose another --out")  # a user's file: never replaced


def save(path: str | os.PathLike, fingerprint: Mapping[str, Any], **info: Any) -> None:
    """Write {"format", "fingerprint", **info} atomically (a kill leaves the old record or the new)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps({"format": FORMAT, "fingerprint": dict(fingerprint), **info},
                                             indent=2) + "\n")


# The model of a run as a fingerprint records it. HSCR is on-policy: train.py trains the model that made
# its preferences (--data's header), eval.py applies an adapter to the model it was trained on.
def model_paths(made: Any) -> tuple[str, str | None] | None:
    """(model, vision tower or None): the directories that fingerprint `made` records; None if none."""
    if not isinstance(made, Mapping) or not _is_input(made.get("model")):
        return None
    tower = made.get("vision tower")
    return made["model"].get("path"), tower.get("path") if _is_input(tower) else None


def check_model(made: Any, now: Mapping[str, Any], what: str, hint: str) -> None:
    """A UserError when fingerprint `made` (of `what`, e.g. "--data prefs.jsonl") records another model or
    vision tower than `now`, by content (paths alone never count); one that records none is not checked."""
    if model_paths(made) is None:
        return
    parts = ("model", "vision tower")
    changes = differences({k: made.get(k) for k in parts}, {k: now.get(k) for k in parts})
    if changes:
        old, new = (" with vision tower ".join(_show(fp.get(k)) for k in parts if fp.get(k))
                    for fp in (made, now))
        raise UserError(f"{what} comes from another model: {old}, not {new} ({'; '.join(changes)}); {hint}")
