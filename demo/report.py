"""report.html of a demo run: one self-contained page (no server, no network: images inline as
base64 PNG, no scripts) that shows what each stage of HSCR did, from the files the stages wrote.

Sections, in page order:
  results      table.md (base vs aligned), timings.json, prefs.summary.json
  preferences  with --negatives external, histograms of the mean per-token probability under the
               base of the self-made and the external negatives (sampling.json: `sampling_png`);
               a sample of alignment entries of prefs.jsonl (hscr.py, stages 1-2 of
               docs/METHOD.md): the image, the question, y_w with each token shaded by its
               coupling score s_t (step 4: `token_shade`), the coupled positions in score order
               with their replacement (step 5), the graded negatives kept by the re-ranking, with
               their m and similarity to y_w (steps 6-8; `word_diff` marks what differs from y_w)
  training     loss, rewards and margin, pair accuracies from train/metrics.jsonl (`curves_png`,
               matplotlib: a listed requirement, its absence is an error)
  answers      a sample of test questions: the ground truth and the base and aligned models'
               answers (eval-base/, eval-hscr/), scored as eval.py scores them

What the files do not hold is said on the page: hscr.py stores s_t only for the top n coupled
positions of an answer (the other tokens stay unshaded). Each replaced position's candidate set C_t
with their P_diff (`candidates` in a coupled item) is shown; files of older hscr.py versions lack
it, and the page says so.

    write_report(run_dir) -> Path         demo/run.py calls it at the end of a run
    python -m demo.report runs/default    the same, for an existing run directory
"""
from __future__ import annotations

import argparse
import base64
import difflib
import html
import io
import json
from pathlib import Path

from PIL import Image

import eval as evaluation
from harness.evalfiles import answers_path, parse_named
from harness.cli import UserError, run_main
from harness.files import read_jsonl
from data import read_records, resolve_image
from model.tokenizer import load_tokenizer, tokenize_response

# Token shading: warm where the full image raises the token's logit (s_t > 0), cool where it
# lowers it; the opacity grows with |s_t|, SHADE_MAX at the largest |s_t| of the page.
POSITIVE, NEGATIVE = (232, 93, 38), (45, 110, 220)
SHADE_MAX = 0.75
ENTRIES, QUESTIONS = 8, 16  # sample sizes


# ---------------------------------------------------------------------------------------------
# Pieces: shading, diffs, images


def token_shade(score: float, scale: float) -> tuple[tuple[int, int, int], float]:
    """The colour and opacity of a token with coupling score s_t: POSITIVE or NEGATIVE by sign,
    opacity SHADE_MAX · min(1, |s_t| / scale), scale = the largest |s_t| shown on the page."""
    alpha = SHADE_MAX * min(1.0, abs(score) / scale) if scale > 0 else 0.0
    return (POSITIVE if score >= 0 else NEGATIVE), round(alpha, 5)


def word_diff(text: str, reference: str) -> str:
    """`text` as HTML with the words that are not in `reference` (difflib's matching blocks over
    whitespace-separated words) inside <mark>."""
    a, b = reference.split(), text.split()
    kept = [False] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for i in range(block.b, block.b + block.size):
            kept[i] = True
    return " ".join(html.escape(w) if k else f"<mark>{html.escape(w)}</mark>" for w, k in zip(b, kept))


def inline_png(path: Path, size: int = 128) -> str:
    """An <img> holding the image as a base64 PNG (re-encoded: any format PIL reads), drawn at
    `size` px with its pixels kept sharp; a note when it cannot be read."""
    try:
        with Image.open(path) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "PNG")
    except (OSError, ValueError) as e:
        return f'<div class="noimg">image {html.escape(str(path))} unreadable: {html.escape(str(e))}</div>'
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="scan" width="{size}" height="{size}" alt="{html.escape(path.name)}" ' \
           f'src="data:image/png;base64,{data}">'


def _image(root: str | None, name: str | None, size: int = 128) -> str:
    if not root or not name:
        return '<div class="noimg">no image</div>'
    try:
        return inline_png(resolve_image(root, name), size)
    except ValueError as e:
        return f'<div class="noimg">{html.escape(str(e))}</div>'


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


# ---------------------------------------------------------------------------------------------
# Section: results


def markdown_table(text: str) -> str:
    """A markdown pipe table (as demo/run.py writes table.md) as an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.strip().startswith("|")]
    if not rows:
        return f"<pre>{html.escape(text)}</pre>"
    body = [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>'


def results_section(run_dir: Path) -> str:
    parts = ['<h2 id="results">Results</h2>']
    table = run_dir / "table.md"
    parts.append(markdown_table(table.read_text(encoding="utf-8")) if table.is_file()
                 else _note("no table.md (the run has not finished its evaluations)"))
    timings_path = run_dir / "timings.json"
    if timings_path.is_file():
        t = json.loads(timings_path.read_text(encoding="utf-8"))
        reused = set(t.get("reused", []))
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s{' (reused)' if k in reused else ''}</td></tr>"
                       for k, v in t.items() if isinstance(v, (int, float)) and k not in ("torch_threads", "cpus"))
        parts.append(f'<h3>Wall time per stage</h3><table class="timings">{rows}</table>'
                     + _note(f"{t.get('torch_threads', '?')} torch threads, {t.get('cpus', '?')} CPUs. Written before "
                             "this page: the total leaves out the report stage (timings.json has the final figures)."))
    summary = run_dir / "prefs.summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text(encoding="utf-8"))
        counts = ", ".join(f"{v} with {k}" for k, v in s.get("negatives", {}).items())
        skipped = ", ".join(f"{v} {k}" for k, v in s.get("skipped", {}).items()) or "none"
        parts.append(_note(f"hscr.py: {s.get('entries_written')} entries written (by number of negatives: {counts}); "
                           f"skipped: {skipped}."))
    config = run_dir / "demo_config.json"
    if config.is_file():
        parts.append(f"<details><summary>demo options (demo_config.json)</summary>"
                     f"<pre>{html.escape(config.read_text(encoding='utf-8'))}</pre></details>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Section: preference data


def sample_evenly(items: list, n: int) -> list:
    """n items spread evenly over `items` (first and last included), in their order."""
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def sample_entries(records: list[dict], n: int) -> list[dict]:
    """n entries to show: three quarters with several coupled positions (spread evenly over their
    number), the rest one-token answers (yes / no …), whichever kind has too few filling in."""
    def size(r):
        return len(r.get("coupled", [])) + len(r.get("unreplaced", []))

    by_size = sorted(records, key=lambda r: (size(r), r["index"]))
    short = [r for r in by_size if size(r) <= 1]
    long = by_size[len(short):]
    n_long = min(len(long), max(n - min(len(short), n // 4), 0))
    return sample_evenly(short, n - n_long) + sample_evenly(long, n_long)


def _answer_tokens(record: dict, tokenizer) -> list[tuple[int, str]] | None:
    """(id, piece) of y_w as hscr.py scored it: the record's chosen_ids, or the chosen text
    tokenized as hscr.py does (tokenize_response); None without a tokenizer."""
    if tokenizer is None:
        return None
    ids = record.get("chosen_ids")
    if ids is None:
        ids = tokenize_response(tokenizer, record.get("chosen") or "", eos_token_id=None)
    return [(i, tokenizer.id_to_token(int(i)) or f"<{i}>") for i in ids]


def _piece(piece: str) -> str:
    """A SentencePiece piece as HTML text: "▁" is the space before a word."""
    return html.escape(piece.replace("▁", " "))


def shaded_answer(tokens: list[tuple[int, str]], coupled: list[dict], scale: float) -> str:
    """y_w token by token; a token with a stored s_t (a coupled position) gets token_shade's
    background, its rank by score as a superscript and a tooltip; the others stay plain."""
    by_position = {c["position"]: (rank, c) for rank, c in enumerate(coupled, 1)}
    out = []
    for position, (token_id, piece) in enumerate(tokens):
        if position not in by_position:
            out.append(f'<span class="tok" title="position {position}: not among the top n, no s_t stored">'
                       f"{_piece(piece)}</span>")
            continue
        rank, c = by_position[position]
        (r, g, b), alpha = token_shade(c["score"], scale)
        replaced = c.get("replacement_id") is not None
        what = (f"replaced by {c.get('replacement')!r}" if replaced else "no candidate: left unreplaced")
        mismatch = "" if c.get("token_id") in (None, token_id) else " (the record names another token here)"
        out.append(f'<span class="tok coupled{"" if replaced else " unreplaced"}" data-score="{c["score"]:.6g}" '
                   f'style="background:rgba({r},{g},{b},{alpha})" '
                   f'title="position {position}: s_t = {c["score"]:.4f}, rank {rank}; {html.escape(what)}{mismatch}">'
                   f"{_piece(piece)}<sup>{rank}</sup></span>")
    return "".join(out)


def _coupled_in_score_order(record: dict) -> list[dict]:
    """The top-n positions: replaced ones (`coupled`) and those without a candidate
    (`unreplaced`), by descending s_t, equal scores earlier position first (as hscr.py ranks)."""
    items = list(record.get("coupled", [])) + [{**u, "replacement": None, "replacement_id": None}
                                                for u in record.get("unreplaced", [])]
    return sorted(items, key=lambda c: (-c["score"], c["position"]))


def coupled_table(record: dict, ranked: list[dict]) -> str:
    """The coupled positions by rank: token, s_t, replacement, the negatives m that carry it
    (candidate m replaces the m highest-scoring replaced positions), candidates when stored."""
    replaced = [c["position"] for c in record.get("coupled", [])]
    with_candidates = any("candidates" in c for c in ranked)
    head = ("<tr><th>rank</th><th>position</th><th>y_t</th><th>s_t</th><th>replacement</th>"
            "<th>in candidates m ≥</th>" + ("<th>candidates C_t (P_diff)</th>" if with_candidates else "") + "</tr>")
    rows = []
    for rank, c in enumerate(ranked, 1):
        m = replaced.index(c["position"]) + 1 if c["position"] in replaced else None
        replacement = (_piece(c["replacement"] or "") if c.get("replacement_id") is not None
                       else '<span class="note">none (no candidate)</span>')
        cells = [str(rank), str(c["position"]), _piece(c.get("token") or ""), f"{c['score']:.4f}",
                 replacement, str(m) if m else "–"]
        if with_candidates:
            cells.append(", ".join(
                f"{'<b>' if k.get('token_id') == c.get('replacement_id') else ''}{_piece(k.get('token') or '')}"
                f" ({_fmt(k.get('p_diff'), 4)}){'</b>' if k.get('token_id') == c.get('replacement_id') else ''}"
                for k in c.get("candidates", [])) or "–")
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return f'<table class="coupled">{head}{"".join(rows)}</table>'


def negatives_table(record: dict) -> str:
    """The kept negatives, most similar first (j = 1 … k): m, similarity to y_w, mean per-token
    probability under the full image, the text with what differs from y_w marked."""
    p = record.get("p_rejected") or []
    rows = []
    for j, n in enumerate(record.get("negatives", []), 1):
        complete = "" if n.get("complete", True) else ' <span class="note">(cut at max_new_tokens)</span>'
        rows.append(f"<tr><td>{j}</td><td>{n.get('m', '–')}</td><td>{_fmt(n.get('similarity'))}</td>"
                    f"<td>{_fmt(p[j - 1] if j <= len(p) else None)}</td>"
                    f"<td>{word_diff(n.get('text', ''), record.get('chosen', ''))}{complete}</td></tr>")
    head = ("<tr><th>j</th><th>m</th><th>similarity to y_w</th><th>mean p</th>"
            "<th>negative y_l (words not in y_w marked)</th></tr>")
    return f'<table class="negs">{head}{"".join(rows)}</table>'


def preferences_section(run_dir: Path, n: int = ENTRIES) -> str:
    parts = ['<h2 id="preferences">Preference data (hscr.py)</h2>']
    config = json.loads((run_dir / "demo_config.json").read_text(encoding="utf-8")) \
        if (run_dir / "demo_config.json").is_file() else {}
    prefs = Path(config.get("prefs") or run_dir / "prefs.jsonl")
    if not prefs.is_file():
        return "\n".join(parts + [_note(f"no {html.escape(str(prefs))}: hscr.py has not run")])
    lines = read_jsonl(prefs)
    if not lines or not lines[0].get("_header"):
        raise UserError(f"{prefs}: not an hscr.py output (no header line)")
    options, records = lines[0]["options"], lines[1:]
    tokenizer = None
    try:
        tokenizer = load_tokenizer(options.get("tokenizer") or options["model"])
    except (OSError, KeyError):
        pass
    shown = sorted(sample_entries(records, n), key=lambda r: r["index"])
    ranked = {r["id"]: _coupled_in_score_order(r) for r in shown}
    scale = max((abs(c["score"]) for cs in ranked.values() for c in cs), default=0.0)
    top_n, c = options.get("top_n", "n"), options.get("num_candidates", "c")
    parts.append(_note(
        f"{len(shown)} of the {len(records)} entries of {html.escape(prefs.name)}: most with several coupled "
        f"positions (spread over their number), a few one-token answers. Each token of the preferred answer "
        f"y_w is shaded by its coupling score "
        f"s_t = logits_full[t, y_t] − logits_drop[t, y_t] (docs/METHOD.md step 4): "
        f'<span class="tok" style="background:rgba({POSITIVE[0]},{POSITIVE[1]},{POSITIVE[2]},{SHADE_MAX})">warm</span> '
        f"where the full image raises the token's logit, "
        f'<span class="tok" style="background:rgba({NEGATIVE[0]},{NEGATIVE[1]},{NEGATIVE[2]},{SHADE_MAX})">cool</span> '
        f"where it lowers it, full strength at |s_t| = {scale:.3f} (the largest shown). "
        f"hscr.py stores s_t only for the top n = {top_n} positions of each answer (the superscript is the rank); "
        "the other tokens are unshaded: their scores are not in the file."))
    if not any("candidates" in c for cs in ranked.values() for c in cs):
        parts.append(_note(
            f"The candidate replacements C_t of a position (at most c = {c}) and their contrast reward P_diff are "
            "not in this file (written by an hscr.py older than the field): only the winner (argmin P_diff). "
            "To show them, each item of <code>coupled</code> would need "
            "<code>candidates: [{token, token_id, p_diff}]</code>, in the rule's order; rerun hscr.py."))
    if tokenizer is None:
        parts.append(_note(f"tokenizer {html.escape(str(options.get('tokenizer')))} not found: y_w is shown as text, "
                           "the coupled tokens in the table only."))
    sampling = run_dir / "sampling.json"
    if sampling.is_file():
        p = json.loads(sampling.read_text(encoding="utf-8"))
        parts.append('<h3>Sampling probability: self-made vs external negatives</h3>' + _note(
            "Mean per-token probability under the base (<code>python hscr.py stats --external</code>): "
            f"chosen {_fmt(p['p_chosen'])}, self-made negatives {_fmt(p['p_rejected'])}, external "
            f"{_fmt(p['p_external'])} (written by the world from the reference, the paper's GPT-4o pairs; "
            "training used these).")
            + f'<img class="curves" alt="sampling probability" src="data:image/png;base64,'
              f'{base64.b64encode(sampling_png(p)).decode("ascii")}">')
    root = options.get("image_root")
    for r in shown:
        tokens = _answer_tokens(r, tokenizer)
        answer = (shaded_answer(tokens, ranked[r["id"]], scale) if tokens is not None
                  else html.escape(r.get("chosen", "")))
        parts.append(
            f'<div class="entry" id="entry-{html.escape(r["id"])}">{_image(root, r.get("image"))}<div class="body">'
            f'<div class="meta">{html.escape(r["id"])} · p(y_w) = {_fmt(r.get("p_chosen"))} per token</div>'
            f'<p class="q">{html.escape(r.get("question", ""))}</p><p class="answer">{answer}</p>'
            f"{coupled_table(r, ranked[r['id']])}{negatives_table(r)}</div></div>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Section: training curves


def _matplotlib():
    """pyplot on the Agg backend. matplotlib is in requirements.txt: without it the report
    cannot draw its curves, and says so rather than leaving them out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError(f"the report draws the training curves with matplotlib, which is not installed ({e}); "
                        "pip install -r requirements.txt") from None
    return plt


# Panels of the figure: title → (metrics.jsonl key, label); eval_* keys are drawn as markers.
PANELS = {
    "loss": (("loss", "train"), ("loss_explicit", "explicit L_E"), ("loss_implicit", "implicit L_I"),
             ("eval_loss", "held out")),
    "rewards r(y) = γ·(log π_θ − log π_ref)": (("reward_chosen", "y_w"), ("reward_rejected_1", "y_l1"),
                                                ("reward_rejected_2", "y_l2"), ("reward_rejected_3", "y_l3"),
                                                ("margin", "margin r(y_w) − r(y_l)"),
                                                ("eval_margin", "held-out margin")),
    "pair accuracy": (("accuracy_explicit", "y_w over y_l"), ("accuracy_implicit", "y_lj over y_lj′, j < j′"),
                      ("eval_accuracy_explicit", "held out, y_w over y_l"),
                      ("eval_accuracy_implicit", "held out, y_lj over y_lj′")),
    "learning rate": (("lr", "lr"),),
}


def curves_png(metrics: list[dict]) -> bytes:
    """The training curves of metrics.jsonl records (one per optimizer step) as a PNG."""
    plt = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), squeeze=False)
    few = len(metrics) < 30
    for ax, (title, series) in zip(axes.flat, PANELS.items()):
        drawn = 0
        for key, label in series:
            points = [(r["step"], r[key]) for r in metrics if r.get(key) is not None]
            if not points:
                continue
            held_out = key.startswith("eval_")
            ax.plot(*zip(*points), label=label, marker="o" if held_out else ("." if few else None),
                    linestyle=":" if held_out else "-", linewidth=1.2)
            drawn += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    return _png_of(plt, fig)


def _png_of(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def sampling_png(p: dict) -> bytes:
    """Two histograms on the same bins (sampling.json: `python hscr.py stats --external` with the
    per-negative values under "each"): self-made and external negatives, each with its mean and
    the chosen answers' mean marked."""
    plt = _matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharex=True, squeeze=False)
    for ax, key, mean in zip(axes.flat, ("self-made", "external"), (p["p_rejected"], p["p_external"])):
        ax.hist(p["each"][key], bins=[i / 20 for i in range(21)], color="C0" if key == "self-made" else "C1")
        ax.axvline(mean, color="k", label=f"mean {_fmt(mean)}")
        ax.axvline(p["p_chosen"], color="k", linestyle=":", label=f"chosen, mean {_fmt(p['p_chosen'])}")
        ax.set_title(f"{key} negatives ({len(p['each'][key])})", fontsize=10)
        ax.set_xlabel("mean per-token probability under the base", fontsize=8)
        ax.legend(fontsize=7)
    return _png_of(plt, fig)


def training_section(run_dir: Path) -> str:
    parts = ['<h2 id="training">Training (train.py)</h2>']
    path = run_dir / "train" / "metrics.jsonl"
    metrics = read_jsonl(path)
    png = curves_png(metrics)  # drawn even without metrics: a missing matplotlib is an error either way
    if not metrics:
        return "\n".join(parts + [_note(f"no {html.escape(str(path))}: train.py has not run")])
    last = metrics[-1]
    parts.append(_note(
        f"{len(metrics)} optimizer steps (train/metrics.jsonl). Held-out figures (markers) are computed at the "
        f"end and every eval_every steps. Last step: loss {_fmt(last.get('loss'))}, margin {_fmt(last.get('margin'))}, "
        f"pair accuracy {_fmt(last.get('accuracy_explicit'))} (y_w over y_l) and {_fmt(last.get('accuracy_implicit'))} "
        "(between negatives)."))
    parts.append(f'<img class="curves" alt="training curves" src="data:image/png;base64,'
                 f'{base64.b64encode(png).decode("ascii")}">')
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Section: test answers, base vs aligned


def _mark(pred: str | None, record) -> str:
    """eval.py's score of one answer: strict hit for a closed question, recall for an open one."""
    if pred is None or not record.answer or record.answer_type not in ("OPEN", "CLOSED"):
        return ""
    s = evaluation.score_answer(pred, record.answer, record.answer_type)
    if record.answer_type == "CLOSED":
        return '<span class="ok">✓</span>' if s["strict"] else '<span class="bad">✗</span>'
    return f'<span class="recall">recall {100 * s["recall"]:.0f}%</span>'


def answers_section(run_dir: Path, n: int = QUESTIONS) -> str:
    parts = ['<h2 id="answers">Test answers, base vs aligned (eval.py)</h2>']
    config_path = run_dir / "eval-base" / "config.json"
    if not config_path.is_file():
        return "\n".join(parts + [_note(f"no {html.escape(str(config_path))}: eval.py has not run")])
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    benchmarks = parse_named(cfg["benchmark"], "--benchmark")
    roots = parse_named(cfg.get("image_root", []), "--image-root", names=list(benchmarks), allow_global=True)
    for name, path in benchmarks.items():
        records, _ = read_records(path)
        answers = {}
        for run in ("base", "hscr"):
            file = answers_path(run_dir / f"eval-{run}", name, "full")
            answers[run] = {str(a["question_id"]): a["text"] for a in read_jsonl(file)}
        answered = [r for r in records if r.id in answers["base"] and r.id in answers["hscr"]]
        differ = [r for r in answered if answers["base"][r.id] != answers["hscr"][r.id]]
        shown = differ[: n // 2]
        rest = [r for r in answered if r not in shown]
        shown = [r for r in answered if r in shown or r in sample_evenly(rest, n - len(shown))]
        parts.append(_note(
            f"{name}: {len(shown)} of the {len(answered)} questions both runs answered with the image; the aligned "
            f"model's answer differs from the base's on {len(differ)} of them, and up to {n // 2} of those come "
            "first in this sample, the rest spread over the file. ✓/✗: eval.py's strict closed score (one yes/no "
            "answer equal to the ground truth); open questions: LLaVA-Med's token recall."))
        rows = []
        for r in shown:
            base, aligned = answers["base"][r.id], answers["hscr"][r.id]
            changed = ' class="changed"' if base != aligned else ""
            rows.append(f"<tr{changed}><td>{_image(roots.get(name, roots.get('*')), r.image, 80)}</td>"
                        f"<td>{html.escape(r.question)}<div class='note'>{html.escape(r.id)} · "
                        f"{html.escape((r.answer_type or '?').lower())}</div></td>"
                        f"<td>{html.escape(r.answer or '')}</td><td>{html.escape(base)} {_mark(base, r)}</td>"
                        f"<td>{html.escape(aligned)} {_mark(aligned, r)}</td></tr>")
        parts.append('<table class="answers"><tr><th>image</th><th>question</th><th>ground truth</th>'
                     f'<th>base</th><th>aligned (HSCR)</th></tr>{"".join(rows)}</table>')
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The page

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d1d1f; max-width: 1180px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 34px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 7px; vertical-align: top; text-align: left; }
th { background: #f3f3f5; font-weight: 600; }
table.results td:not(:first-child), table.timings td:last-child {
  text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 13px; }
.entry { display: flex; gap: 16px; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 12px 0; }
.entry .body { flex: 1; min-width: 0; }
.meta { color: #666; font-size: 12px; }
.q { font-weight: 600; margin: 4px 0; }
.answer { font-size: 16px; line-height: 2; margin: 4px 0 8px; }
.tok { white-space: pre-wrap; border-radius: 3px; padding: 1px 0; }
.tok.coupled { outline: 1px solid rgba(0,0,0,.25); }
.tok.unreplaced { outline: 1px dashed #000; }
.tok sup { font-size: 9px; color: #333; margin-left: 1px; }
img.scan { image-rendering: pixelated; border: 1px solid #999; flex: none; }
img.curves { max-width: 100%; border: 1px solid #ddd; }
mark { background: #ffe08a; }
table.answers tr.changed td { background: #fbf7e8; }
.ok { color: #1a7f37; font-weight: 700; } .bad { color: #c62828; font-weight: 700; }
.recall { color: #555; font-size: 12px; }
.noimg { width: 128px; color: #a00; font-size: 12px; }
"""


def write_report(run_dir: str | Path) -> Path:
    """run_dir/report.html from the files of a demo run (see the module docstring); returns its path.
    Sections whose files are missing say so; a missing matplotlib is an error (UserError)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (the --out of a demo run)")
    _matplotlib()  # first, before any work
    sections = [results_section(run_dir), preferences_section(run_dir), training_section(run_dir),
                answers_section(run_dir)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>HSCR demo: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>HSCR demo run: {html.escape(str(run_dir))}</h1>\n"
            '<p class="note">Sections: <a href="#results">results</a> · <a href="#preferences">preference data</a> · '
            '<a href="#training">training</a> · <a href="#answers">test answers</a>. '
            "Written by demo/report.py from the run's files; docs/METHOD.md describes the steps.</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    path = run_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    def run(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="python -m demo.report", description=__doc__.split("\n")[0])
        parser.add_argument("run_dir", help="the --out of a demo run (e.g. runs/default)")
        print(write_report(parser.parse_args(argv).run_dir))
        return 0
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
