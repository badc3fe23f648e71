"""Quality of HSCR's negatives on the synthetic world: hallucinations of the right kind, or junk?

The world's answers are built from a small closed vocabulary: sides, counts, yes/no, modalities,
organs and regions, sizes, finding words, and a few function words. A good negative swaps one
word of an answer for another word that could fill the same slot ("left" → "right", "two" →
"three", "yes" → "no"): a hallucination the image contradicts. A poor one puts in a word that no
answer would hold there ("left" → "small", "the" → "abdomen"). The slot table below is this
module's own (not read from the world code), so that it keeps working when the world moves or
grows; extend it with the world's vocabulary.

classify(original, replacement), for one coupled position of an hscr.py record
  same-slot   both words fill one content slot (SLOTS): the hallucination a negative should hold.
              The original's slot is looked up with its case ("No" opening "No abnormality is
              seen." is a function word), the replacement's in any case ("yes" → "No" says no)
  grammar     both fill one function slot (GRAMMAR: is/are, There/No, a/an)
  same-word   the same word up to case and punctuation ("no" → "No", "abdomen" → "abdomen."):
              no wrong fact at all
  junk        anything else: another slot's word, a word outside the table, a word piece

summarize(path) over one prefs.jsonl (and its prefs.rejects.jsonl)
  replaced positions by class; the same over content positions (the original word is in SLOTS);
  coupled positions left unreplaced (rules whose candidate set can be empty); negatives per entry
  (0, 1, 2, 3, …, rejected entries counted with the negatives they had); clean negatives: kept
  negatives whose replaced positions hold at least one same-slot swap and no junk.

Usage:
    python -m demo.negatives prefs.jsonl [more.jsonl …] [--pairs 10]
    python -m demo.negatives compare --out DIR [--model assets/base] [--data .cache/world/align.json]
        [--image-root .cache/world] [--limit 300] [--rules NAME,…] [--hscr-args "…"]
The first prints one table row per file (and with --pairs the most frequent swaps of each).
`compare` runs hscr.py once per candidate rule of RULES (outputs DIR/<name>.jsonl, resumed when
present) and prints the same table; rerun it whenever the world or the model changes. Options in
--hscr-args come after the rule's own and win (the table's rule column reads the file header).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from model.tokenizer import piece_word as word
from harness.files import read_jsonl

# Content slots: a swap inside one is a factual hallucination.
SLOTS = {
    "side": ("left", "right"),
    "count": ("none", "one", "two", "three"),
    "yes/no": ("yes", "no"),
    "modality": ("X-ray", "MRI", "CT"),
    # "abdom": the shipped tokenizer's first piece of "abdominal" (abdom|in|al)
    "organ": ("chest", "brain", "abdomen", "abdominal", "abdom", "lung", "hemisphere"),
    "size": ("small", "large"),
    "finding": ("nodule", "lesion", "mass", "nodules", "lesions", "masses"),
}
# Function slots: a swap inside one breaks the grammar or the framing, not a fact.
GRAMMAR = {
    "is/are": ("is", "are", "Is", "Are"),
    "There/No": ("There", "No"),
    "a/an": ("a", "an"),
}
CLASSES = ("same-slot", "grammar", "same-word", "junk")


def _lookup(table: dict[str, tuple[str, ...]]) -> tuple[dict[str, str], dict[str, str]]:
    exact = {w: slot for slot, words in table.items() for w in words}
    return exact, {w.lower(): slot for w, slot in exact.items()}


_SLOT_OF, _SLOT_OF_LOWER = _lookup(SLOTS)
_GRAMMAR_OF, _ = _lookup(GRAMMAR)


def slot(w: str) -> str | None:
    """The content slot of a word: exact case first (so that "No" stays a function word), then
    any case."""
    if w in _GRAMMAR_OF:
        return None
    return _SLOT_OF.get(w) or _SLOT_OF_LOWER.get(w.lower())


def classify(original: str | None, replacement: str | None) -> str:
    """One of CLASSES for a swap of tokenizer pieces (or words)."""
    a, b = word(original), word(replacement)
    if a and a.lower() == b.lower():
        return "same-word"
    # The replacement's case does not matter: "yes" → "No" (then "abnormality is seen.") answers no.
    if slot(a) is not None and slot(a) == _SLOT_OF_LOWER.get(b.lower()):
        return "same-slot"
    if a in _GRAMMAR_OF and _GRAMMAR_OF[a] == _GRAMMAR_OF.get(b):
        return "grammar"
    return "junk"


# ----------------------------------------------------------------------------------------------
# One preference file


@dataclass
class Summary:
    path: str
    rule: str  # the candidate options of the run, from the file's header
    entries: int = 0  # written records + rejected entries that had a negatives count
    replaced: Counter = field(default_factory=Counter)  # class → replaced positions
    content: Counter = field(default_factory=Counter)  # the same, over content positions
    unreplaced: int = 0
    negatives: Counter = field(default_factory=Counter)  # negatives per entry → entries
    kept: int = 0  # kept negatives
    clean: int = 0  # kept negatives with a same-slot swap and no junk
    pairs: Counter = field(default_factory=Counter)  # (original word, replacement word) → count

    def share(self, counter: Counter, cls: str) -> float | None:
        total = sum(counter.values())
        return 100.0 * counter[cls] / total if total else None


def rule_name(options: dict) -> str:
    """The candidate options of a run, from an hscr.py header: the rule, c, and what differs from the
    defaults among α, the dropped branch's positions, ρ and the coupling score."""
    rule = options["candidates"]
    text = f"{rule} c={options['num_candidates']}"
    if rule != "dropped-topk":
        text += f" α={options['alpha']}"
    if options["drop_positions"] != "renumber":
        text += f" positions={options['drop_positions']}"
    if options["drop_ratio"] != 0.7:
        text += f" ρ={options['drop_ratio']}"
    if options["coupling"] != "logit":
        text += f" coupling={options['coupling']}"
    return text


def rejects_path(prefs: Path) -> Path:
    """hscr.py's rejects file beside prefs.jsonl: prefs.rejects.jsonl."""
    stem = str(prefs)[: -len(".jsonl")] if str(prefs).endswith(".jsonl") else str(prefs)
    return Path(stem + ".rejects.jsonl")


def summarize(path: str | Path) -> Summary:
    """The statistics of one hscr.py output (see the module doc)."""
    path = Path(path)
    lines = read_jsonl(path)
    if not lines or not lines[0].get("_header"):
        raise SystemExit(f"{path}: not an hscr.py output (no header line)")
    s = Summary(str(path), rule_name(lines[0].get("options", {})))
    for n, r in enumerate(lines[1:], 2):
        if not isinstance(r.get("coupled"), list) or not isinstance(r.get("negatives"), list):
            raise SystemExit(f"{path}:{n}: record without 'coupled' and 'negatives' lists")
        s.entries += 1
        s.negatives[len(r["negatives"])] += 1
        classes = []
        for c in r["coupled"]:
            cls = classify(c.get("token"), c.get("replacement"))
            classes.append(cls)
            s.replaced[cls] += 1
            if slot(word(c.get("token"))) is not None:
                s.content[cls] += 1
            s.pairs[(word(c.get("token")), word(c.get("replacement")))] += 1
        s.unreplaced += len(r.get("unreplaced", []))
        for neg in r["negatives"]:
            swaps = classes[: neg["m"]]  # negative m replaces the m best-scoring coupled positions
            s.kept += 1
            s.clean += "same-slot" in swaps and "junk" not in swaps
    for r in read_jsonl(rejects_path(path)):
        if r.get("negatives_found") is not None:
            s.entries += 1
            s.negatives[r["negatives_found"]] += 1
    return s


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def table(summaries: list[Summary]) -> str:
    """A Markdown table, one row per file."""
    depth = max([3] + [max(s.negatives, default=0) for s in summaries])
    head = (["file", "rule", "entries", "replaced"] + [f"{c} %" for c in CLASSES]
            + ["content: same-slot %", "unreplaced", "clean negatives %"]
            + [f"{k} neg" for k in range(depth + 1)])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [Path(s.path).name, s.rule, str(s.entries), str(sum(s.replaced.values()))]
        cells += [_pct(s.share(s.replaced, c)) for c in CLASSES]
        cells += [_pct(s.share(s.content, "same-slot")), str(s.unreplaced),
                  _pct(100.0 * s.clean / s.kept if s.kept else None)]
        cells += [str(s.negatives.get(k, 0)) for k in range(depth + 1)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def top_pairs(s: Summary, n: int) -> str:
    pairs = ", ".join(f"{a}→{b} {k} ({classify(a, b)})" for (a, b), k in s.pairs.most_common(n))
    return f"{Path(s.path).name}: {pairs}"


# ----------------------------------------------------------------------------------------------
# compare: one hscr.py run per candidate rule

# name → hscr.py options of the rule (the rest are compare's common options).
RULES = {
    "dropped-topk-c10": ["--candidates", "dropped-topk", "--num-candidates", "10"],
    "dropped-topk-c1": ["--candidates", "dropped-topk", "--num-candidates", "1"],
    "dropped-topk-c2": ["--candidates", "dropped-topk", "--num-candidates", "2"],
    "dropped-topk-c3": ["--candidates", "dropped-topk", "--num-candidates", "3"],
    "plausible-a0.1": ["--candidates", "plausible", "--alpha", "0.1"],
    "both-c10-a0.1": ["--candidates", "both", "--num-candidates", "10", "--alpha", "0.1"],
    "dropped-plausible-a0.1": ["--candidates", "dropped-plausible", "--alpha", "0.1"],
    "plausible-a0.01": ["--candidates", "plausible", "--alpha", "0.01"],
    "dropped-plausible-a0.01": ["--candidates", "dropped-plausible", "--alpha", "0.01"],
    "dropped-plausible-a0.001": ["--candidates", "dropped-plausible", "--alpha", "0.001"],
    "both-c10-a0.01": ["--candidates", "both", "--num-candidates", "10", "--alpha", "0.01"],
    "both-c10-a0.001": ["--candidates", "both", "--num-candidates", "10", "--alpha", "0.001"],
    "plausible-a0.001": ["--candidates", "plausible", "--alpha", "0.001"],
}
HSCR = Path(__file__).resolve().parent.parent / "hscr.py"


def hscr_command(name: str, args) -> list[str]:
    """The hscr.py command line of rule `name`. --min-negatives 0 writes every entry, so that the
    coupled positions of entries left without negatives are counted too."""
    return [sys.executable, str(HSCR), "--model", args.model, "--data", args.data, "--image-root", args.image_root,
            "--out", str(Path(args.out) / f"{name}.jsonl"), "--limit", str(args.limit), "--seed", str(args.seed),
            "--similarity", "lexical", "--batch-size", "64", "--max-new-tokens", "32", "--device", args.device,
            "--min-negatives", "0", *RULES[name], *shlex.split(args.hscr_args)]


def compare(argv) -> list[Summary]:
    p = argparse.ArgumentParser(prog="python -m demo.negatives compare",
                                description="run hscr.py once per candidate rule and compare the negatives")
    p.add_argument("--out", required=True, help="folder for the runs' outputs (<rule>.jsonl, resumed when present)")
    p.add_argument("--model", default="assets/base", help="checkpoint directory (default: assets/base)")
    p.add_argument("--data", default=".cache/world/align.json", help="entries (default: .cache/world/align.json)")
    p.add_argument("--image-root", default=".cache/world", help="image folder (default: .cache/world)")
    p.add_argument("--limit", type=int, default=300, help="entries sampled (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the dropout (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated names of RULES (default: all: "
                                                            f"{', '.join(RULES)})")
    p.add_argument("--hscr-args", default="", help="more hscr.py options for every run, one quoted string")
    p.add_argument("--pairs", type=int, default=0, help="also print each run's N most frequent swaps")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise SystemExit(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in names:
        cmd = hscr_command(name, args)
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
    summaries = [summarize(Path(args.out) / f"{n}.jsonl") for n in names]
    report(summaries, args.pairs)
    return summaries


def report(summaries: list[Summary], pairs: int = 0):
    print(table(summaries))
    for s in summaries if pairs else []:
        print(top_pairs(s, pairs))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        return compare(argv[1:])
    p = argparse.ArgumentParser(prog="python -m demo.negatives", description=__doc__.split("\n")[0])
    p.add_argument("prefs", nargs="+", help="hscr.py outputs (prefs.jsonl)")
    p.add_argument("--pairs", type=int, default=0, help="also print each file's N most frequent swaps")
    args = p.parse_args(argv)
    # A shell glob (runs/*.jsonl) also names the rejects files, which summarize reads beside theirs.
    summaries = [summarize(f) for f in args.prefs if not str(f).endswith(".rejects.jsonl")]
    report(summaries, args.pairs)
    return summaries


if __name__ == "__main__":
    main()
