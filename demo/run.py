"""The embedded demo: all of HSCR on the shipped small Med-VLM (assets/base) and the synthetic
world (demo/world.py), on a CPU, and its ablation over seeds.

    demo()      world → hscr.py preference data from the base model → train.py LoRA with the
                multi-level loss → eval.py on the test split, base and aligned, with and without
                the image → DEMO_ROWS as a before/after table (table.md) → report.html
                (demo/report.py). The console shows a header per stage, the progress bars, the
                table and each stage's wall time (timings.json); options go to files.
    ablation()  every ABLATION variant over seeds → mean ± std per metric (ablation.md)

Reuse. A rerun into the same --out reuses a stage's output only when the same inputs and options
made it: hscr.py, train.py and eval.py each check their own (a content fingerprint in their
record, harness/provenance.py; train.py's train/provenance.json also holds the digest of the
adapter it finished with). Any difference stops the run with the stage's message naming it;
--overwrite makes that stage's output again (and, through the fingerprints, the outputs that
depend on it), reusing the stages that match. A training stage interrupted before its end is
continued by a rerun with the same options; with others, the demo says it was interrupted.

Command line (also `python train.py [demo|ablation] …`):
    python -m demo.run [demo] [--out runs/default] [--overwrite] [options]
    python -m demo.run ablation [--seeds 0 1 2] [options]
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import eval as evaluation
import hscr
from harness import provenance
import train
from harness.cli import UserError, dataclass_parser, option, run_main
from demo.report import write_report
from demo.world import build_world, write_external_negatives
from harness.files import read_jsonl
from harness.rundir import PROVENANCE
from model.sentence import default_minilm_path

ROOT = Path(__file__).resolve().parent.parent  # the repository: assets/base lives there


@dataclass
class DemoConfig:
    out: str = option("runs/default", "where every output of the run goes")
    world: str = option(".cache/world", "synthetic world directory (built on first use)")
    base: str = option(str(ROOT / "assets" / "base"),
                       "the base model (config.json, model.safetensors, tokenizer.json)")
    align: int | None = option(None, "alignment entries used (default: the whole 2,000-entry split)")
    test: int | None = option(None, "test questions evaluated (default: all)")
    split: str = option("test", "split evaluated: test, or val when choosing settings", choices=("test", "val"))
    steps: int | None = option(None, "stop training after this many steps (default: 2 epochs)")
    loss: str = option("hscr", "preference loss", choices=tuple(train.LOSSES))
    mask_strategy: str = option("token", "visual dropout of hscr.py (token, latent, patch, pixel)",
                                choices=("token", "latent", "patch", "pixel"))
    lr: float = option(5e-4, "LoRA learning rate (chosen on the world's validation split)")
    gamma: float = option(1.0, "γ of the reward γ·(log π_θ − log π_ref) (docs/METHOD.md: 0.1; 1.0 chosen on "
                          "the validation split: with 0.1 the small model drifts far from π_ref)")
    epochs: int = option(2, "passes over the preference data (paper: 2)")
    seed: int = option(0, "seed of the world sample, the negatives' dropout and training")
    similarity: str = option("auto", "minilm when its weights are installed, else lexical",
                             choices=("auto", "minilm", "lexical"))
    num_candidates: int = option(10, "hscr.py --num-candidates: most candidate replacements per coupled position "
                                 "(c; docs/METHOD.md step 5)")
    candidates: str = option("dropped-plausible", "hscr.py --candidates: the candidate rule (docs/METHOD.md, step 5: "
                             "the dropped branch's plausible tokens, chosen on the validation split)",
                             choices=("dropped-topk", "plausible", "both", "dropped-plausible"))
    alpha: float = option(0.01, "hscr.py --alpha: the plausibility cut of the plausible rules (0.01 chosen on the "
                          "validation split)")
    drop_ratio: float = option(0.7, "hscr.py --drop-ratio: the share ρ of visual tokens the dropped branch loses")
    drop_positions: str = option("keep", "hscr.py --drop-positions: position ids of the dropped branch's text "
                                 "(keep chosen on the validation split)", choices=("keep", "renumber"))
    coupling: str = option("logit", "hscr.py --coupling: the coupling score s_t (docs/METHOD.md step 4)",
                           choices=("logit", "logprob"))
    coupled: str = option("any", "hscr.py --coupled: any position or only those with s_t > 0 (docs/METHOD.md "
                          "step 4)", choices=("any", "positive"))
    same_word: str = option("allow", "hscr.py --same-word: candidates spelling y_t's word otherwise",
                            choices=("allow", "exclude"))
    prefs: str | None = option(None, "preference file to write or reuse (default: OUT/prefs.jsonl)")
    negatives: str = option("self", "train on hscr.py's negatives, or on one external negative per entry "
                            "written by the world from the reference (PREFS.external.jsonl; docs/METHOD.md, "
                            "Evaluation)", choices=("self", "external"))
    overwrite: bool = option(False, "make again the outputs in --out (and --prefs) that other inputs or options "
                             "made; without it the demo stops naming what changed. Outputs that match are reused")


def _strict_gain(r: dict, mode: str) -> float:
    """Closed visual gain on the strict score: full − `mode` (a blind mode)."""
    return r["modes"]["full"]["closed"]["accuracy_strict"] - r["modes"][mode]["closed"]["accuracy_strict"]


def _described(r: dict, key: str) -> float:
    """A description figure of eval.py (nan when the split has no question with facts, or the
    answers state none)."""
    value = r["modes"]["full"].get("description", {}).get(key)
    return float("nan") if value is None else value


# The rows of the default's table: label → figure of one eval.py result (× 100). Blind scores are
# strict: without its image the small base rambles ("yes is no is no …"), which LLaVA-Med's
# substring rule scores as a hit on both "yes" and "no" questions.
DEMO_ROWS = {
    "closed accuracy (LLaVA-Med, lenient)": lambda r: r["modes"]["full"]["closed"]["accuracy"],
    "closed accuracy, strict": lambda r: r["modes"]["full"]["closed"]["accuracy_strict"],
    "open recall": lambda r: r["modes"]["full"]["open"]["recall"],
    "hallucination rate": lambda r: r["modes"]["full"]["closed"]["hallucination_rate"],
    "description: facts contradicted %": lambda r: _described(r, "facts_contradicted"),
    "description: facts correct %": lambda r: _described(r, "facts_correct"),
    "closed strict, no image": lambda r: r["modes"]["no_image"]["closed"]["accuracy_strict"],
    "closed strict, blank image": lambda r: r["modes"]["blank_image"]["closed"]["accuracy_strict"],
    "open recall, no image": lambda r: r["modes"]["no_image"]["open"]["recall"],
    "visual gain, closed strict (full − no image)": lambda r: _strict_gain(r, "no_image"),
    "visual gain, closed strict (full − blank image)": lambda r: _strict_gain(r, "blank_image"),
    "visual gain, open (full − no image)": lambda r: r["visual_gain"]["no_image"]["open recall"],
}


def demo_table(base: dict, aligned: dict) -> str:
    """The before/after table of the default run (figures × 100, from eval.py's results)."""
    lines = ["| metric | base | HSCR | Δ |", "|---|---:|---:|---:|"]
    for label, figure in DEMO_ROWS.items():
        a, b = figure(base), figure(aligned)
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines)


def demo_world(root: str | os.PathLike) -> dict[str, Path]:
    """The world's splits the demo reads (align, val, test). A world built whole is used as it is
    (`python -m demo.base world`, which the base model's training needs); otherwise the demo builds
    one without the SFT split, two thirds of the images: every split is drawn from (seed, split)
    alone, so align, val and test are the same files either way."""
    try:
        built = json.loads((Path(root) / "world.json").read_text(encoding="utf-8"))
        whole = built["n"]["sft"] > 0
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    return build_world(root, seed=0) if whole else build_world(root, seed=0, n_sft=0)


# ---------------------------------------------------------------------------------------------
# Reuse: a stage's output is kept only when what made it is what this run would use


def _redo_on_overwrite(run, options, overwrite: bool, **fresh):
    """Run a stage that refuses an output made from other inputs (ProvenanceError, naming what
    changed). With --overwrite, only such a stage runs again with its own `overwrite` set (and
    `fresh`, options that starting afresh needs): a stage whose output matches is resumed
    (reused), not redone."""
    try:
        return run(options)
    except provenance.ProvenanceError as error:
        if not overwrite:
            raise
        print(f"--overwrite: {error.where} was made from other inputs ({'; '.join(error.changes)}); made again")
    return run(dataclasses.replace(options, overwrite=True, **fresh))


# ---------------------------------------------------------------------------------------------
# The console: a header per stage, its wall time, the table and the timings at the end


class Stages:
    """Numbered stage headers on the console and each stage's wall time (timings.json)."""

    def __init__(self, names: list[str]):
        self.names, self.seconds, self.reused = names, {}, []
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, title: str):
        print(f"\n[{self.names.index(name) + 1}/{len(self.names)}] {title}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)

    def timings(self) -> dict:
        return {**self.seconds, "total": round(time.perf_counter() - self.t0, 2), "reused": self.reused,
                "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}

    @staticmethod
    def table(timings: dict) -> str:
        """Stage, seconds, as aligned text lines."""
        rows = [(k, v) for k, v in timings.items()
                if isinstance(v, (int, float)) and k not in ("torch_threads", "cpus")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v:7.1f} s" + ("  (reused)" if k in timings["reused"] else "")
                         for k, v in rows)


# The stages of one demo run, in order (the keys of timings.json, with "total").
STAGES = ["world", "hscr", "train", "eval base", "eval aligned", "report"]


def demo(cfg: DemoConfig, base_results: dict | None = None) -> dict:
    """World → hscr.py preference data from the base model → LoRA with the multi-level loss →
    eval.py on the test split, base and aligned, with and without the image → the table and
    report.html. Options go to files (demo_config.json, each stage's config); the console shows
    a header per stage, its progress bars, the table and the timings (also in timings.json).
    base_results: the base model's eval results from an earlier run with the same test split
    (greedy decoding makes them the same), to skip evaluating it again.

    Every stage reuses its output only when the same inputs and options made it; otherwise the
    demo stops naming what changed, or, with cfg.overwrite, makes that stage's output again."""
    stages = Stages(STAGES)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.base)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (base / f).is_file()]
    if missing:
        raise SystemExit(f"the base model in {base} lacks {', '.join(missing)}; README.md gives the commands "
                         "that regenerate it")
    print(f"HSCR demo → {out}/ (options in {out / 'demo_config.json'} once every stage has run)")
    with stages.stage("world", f"synthetic world in {cfg.world}"):
        world = demo_world(cfg.world)

    similarity = cfg.similarity
    if similarity == "auto":
        similarity = "minilm" if default_minilm_path() else "lexical"
    prefs = Path(cfg.prefs) if cfg.prefs else out / "prefs.jsonl"
    with stages.stage("hscr", f"hscr.py: self-generated negatives from the base model → {prefs}"):
        _redo_on_overwrite(hscr.run, hscr.Options(
            model=str(base), data=str(world["align"]), image_root=str(world["root"]), out=str(prefs),
            limit=cfg.align, seed=cfg.seed, similarity=similarity, mask_strategy=cfg.mask_strategy,
            num_candidates=cfg.num_candidates, candidates=cfg.candidates, alpha=cfg.alpha, drop_ratio=cfg.drop_ratio,
            drop_positions=cfg.drop_positions, coupling=cfg.coupling, coupled=cfg.coupled, same_word=cfg.same_word,
            batch_size=128, max_new_tokens=32, device="cpu", score_negatives=True), cfg.overwrite)  # shows p_rejected
        data = prefs
        if cfg.negatives == "external":  # the paper's GPT-4o pairs, played by the world; p under the base
            data = write_external_negatives(prefs, world["align"], prefs.with_suffix(".external.jsonl"),
                                            cfg.seed, cfg.overwrite)
            stats = hscr.main(["stats", str(prefs), "--external", str(data), "--model", str(base),
                               "--device", "cpu", "--batch-size", "128"])
            each = {"self-made": [p for r in read_jsonl(prefs)[1:] for p in r.get("p_rejected", [])],
                    "external": stats.pop("p_external_each")}
            (out / "sampling.json").write_text(json.dumps({**stats, "each": each}) + "\n")  # for report.html

    with stages.stage("train", f"train.py: LoRA with the {cfg.loss} loss → {out / 'train'}"):
        # train.py --resume decides on its own record: this run finished is reused, interrupted resumed,
        # another refused naming what changed (--overwrite trains again). No record: nothing to reuse.
        record = provenance.load(out / "train" / PROVENANCE)
        holds = record is not None
        options = train.TrainConfig(
            model=str(base), data=str(data), image_root=str(world["root"]), out=str(out / "train"),
            loss=cfg.loss, gamma=cfg.gamma, epochs=cfg.epochs, batch_size=16, micro_batch=16, lr=cfg.lr,
            seed=cfg.seed, max_steps=cfg.steps, eval_fraction=0.05, eval_every=0, save_every=0,
            lora_dropout=0.0, max_response_tokens=64, device="cpu", resume=holds,
            overwrite=cfg.overwrite and not holds)
        try:
            if _redo_on_overwrite(train.train, options, cfg.overwrite, resume=False).get("reused"):
                stages.reused.append("train")
        except provenance.ProvenanceError as error:  # a record without its end: a training cut short
            if "finished" in record:
                raise
            why = "; ".join(error.changes)
            raise UserError(f"{error.where}: a training interrupted before its end, from other inputs or "
                            f"options than this run ({why}): to continue it, rerun the demo with those of "
                            "the interrupted run; or pass --overwrite to train again with these") from None

    results = {}
    for name, stage, adapter in (("base", "eval base", None), ("hscr", "eval aligned", str(out / "train" / "adapter"))):
        title = (f"eval.py: {'base' if adapter is None else 'aligned'} model on the {cfg.split} split, with and "
                 f"without the image → {out / f'eval-{name}'}")
        with stages.stage(stage, title):
            if name == "base" and base_results is not None:
                print("reused: the base model's results of an earlier run on the same split")
                results[name] = base_results
                stages.reused.append(stage)
                continue
            results[name] = _redo_on_overwrite(evaluation.run, evaluation.EvalConfig(
                model=str(base), adapter=adapter, benchmark=[f"{cfg.split}={world[cfg.split]}"],
                image_root=[str(world["root"])], out=str(out / f"eval-{name}"), blind=True, batch_size=128,
                max_new_tokens=32, limit=cfg.test, device="cpu", dtype="float32"), cfg.overwrite)[cfg.split]
    table = demo_table(results["base"], results["hscr"])
    (out / "table.md").write_text(table + "\n")
    (out / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")  # made them

    (out / "timings.json").write_text(json.dumps(stages.timings(), indent=2) + "\n")  # for the page
    with stages.stage("report", f"report → {out / 'report.html'}"):
        write_report(out)
    timings = stages.timings()
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\nBefore / after HSCR on the world's balanced {cfg.split} split ({out / 'table.md'}):\n\n{table}\n")
    print(f"Timings ({out / 'timings.json'}):\n{Stages.table(timings)}\n")
    print(f"Outputs in {out}/: report.html (open it in a browser), prefs.jsonl (+ .summary.json, .rejects.jsonl), "
          "train/ (adapter/, metrics.jsonl), eval-base/ and eval-hscr/ (answers, report.md, summary.json), "
          "table.md, timings.json")
    return results


# The ablation of issue 7 / the paper's tables: variant name → DemoConfig overrides.
# "dpo, external negatives": the paper's GPT-4o pairs (Table 3), one per entry, written by the world.
ABLATION = {"dpo (1 negative)": {"loss": "dpo"},
            "dpo, external negatives": {"loss": "dpo", "negatives": "external"},
            "explicit only": {"loss": "explicit"}, "implicit only": {"loss": "implicit"}, "hscr": {},
            "hscr, pixel masking": {"mask_strategy": "pixel"}}
ABLATION_METRICS = {label: DEMO_ROWS[key] for label, key in (
    ("closed acc", "closed accuracy (LLaVA-Med, lenient)"), ("closed strict", "closed accuracy, strict"),
    ("open recall", "open recall"), ("halluc. rate", "hallucination rate"),
    ("visual gain, closed strict", "visual gain, closed strict (full − no image)"),
    ("visual gain, open", "visual gain, open (full − no image)"),
    ("facts contradicted", "description: facts contradicted %"), ("facts correct", "description: facts correct %"))}


def ablation(cfg: DemoConfig, seeds: list[int]) -> str:
    """Every ABLATION variant (and the base) over `seeds`: mean ± std of each metric, as markdown.
    Preference files are shared by the variants that generate the same negatives."""
    root = Path(cfg.out)
    runs: dict[str, list[dict]] = {"base": []}
    for seed in seeds:
        for name, overrides in ABLATION.items():
            mask = overrides.get("mask_strategy", cfg.mask_strategy)
            slug = name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
            res = demo(dataclasses.replace(cfg, **overrides, seed=seed, out=str(root / f"{slug}-seed{seed}"),
                                           prefs=str(root / f"prefs-{mask}-seed{seed}.jsonl")),
                       base_results=runs["base"][0] if runs["base"] else None)
            runs.setdefault(name, []).append(res["hscr"])
            runs["base"] = runs["base"] or [res["base"]]
    runs["base"] = runs["base"] * len(seeds)  # greedy decoding: the base scores the same every seed

    def cell(results, metric):
        values = [metric(r) for r in results]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    lines = ["| variant | " + " | ".join(ABLATION_METRICS) + " |", "|---|" + "---:|" * len(ABLATION_METRICS)]
    for name, results in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(results, m) for m in ABLATION_METRICS.values()) + " |")
    table = "\n".join(lines)
    (root / "ablation.md").write_text(f"seeds {seeds}; {json.dumps(dataclasses.asdict(cfg))}\n\n{table}\n")
    return table


def build_parser(prog: str, ablation_run: bool = False):
    """The options of DemoConfig; the ablation's default --out is runs/ablation and it adds --seeds."""
    if ablation_run:
        parser = dataclass_parser(DemoConfig, prog=f"{prog} ablation", defaults={"out": "runs/ablation"},
                                  description="The embedded demo's ablation: base, DPO, DPO on external "
                                  "negatives, explicit only, implicit only, HSCR, HSCR with pixel masking, "
                                  "over several seeds.")
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
        return parser
    return dataclass_parser(DemoConfig, prog=f"{prog} [demo]", description=(
        "The embedded demo: all of HSCR on the shipped small Med-VLM and a synthetic Med-VQA world,\n"
        f"on a CPU. `{prog} ablation --help` lists the ablation's options.\n\n"
        "To train your own model: `python train.py train --help` lists the trainer's options\n"
        "(stage 3 on hscr.py's preference data, and SFT)."))


def main(argv: list[str] | None = None, prog: str = "python train.py") -> int:
    """The CLI; an error the user can fix (a stage's output made from other inputs, a bad file)
    ends with one line on stderr and exit status 2 (harness.cli.run_main; --debug shows the traceback)."""
    def run(argv: list[str]) -> int:
        if argv[:1] == ["ablation"]:
            args = vars(build_parser(prog, ablation_run=True).parse_args(argv[1:]))
            seeds = args.pop("seeds")
            print(ablation(DemoConfig(**args), seeds))
            return 0
        if argv[:1] == ["demo"]:
            argv = argv[1:]
        demo(DemoConfig(**vars(build_parser(prog).parse_args(argv))))
        return 0
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(prog="python -m demo.run"))
