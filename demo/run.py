"""The embedded demo: all of HSCR on the shipped small Med-VLM (assets/base) and the synthetic
world (demo/world.py), on a CPU, and its ablation over seeds.

    demo()      world → hscr.py preference data from the base model → train.py LoRA with the
                multi-level loss → eval.py on the test split, base and aligned, with and without
                the image → DEMO_ROWS as a before/after table (table.md)
    ablation()  every ABLATION variant over seeds → mean ± std per metric (ablation.md)

Command line (also `python train.py [demo|ablation] …`):
    python -m demo.run [demo] [--out runs/default] [options]
    python -m demo.run ablation [--seeds 0 1 2] [options]
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import eval as evaluation
import hscr
import train
from common import dataclass_parser, option
from demo.world import build_world
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
    prefs: str | None = option(None, "preference file to write or reuse (default: OUT/prefs.jsonl)")


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


def demo(cfg: DemoConfig, base_results: dict | None = None) -> dict:
    """World → hscr.py preference data from the base model → LoRA with the multi-level loss →
    eval.py on the test split, base and aligned, with and without the image → the table.
    base_results: the base model's eval results from an earlier run with the same test split
    (greedy decoding makes them the same), to skip evaluating it again."""
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.base)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (base / f).is_file()]
    if missing:
        raise SystemExit(f"the base model in {base} lacks {', '.join(missing)}; README.md gives the commands "
                         "that regenerate it")
    (out / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    print(f"[1/5] synthetic world in {cfg.world}")
    world = build_world(cfg.world, seed=0)

    similarity = cfg.similarity
    if similarity == "auto":
        similarity = "minilm" if default_minilm_path() else "lexical"
    prefs = Path(cfg.prefs) if cfg.prefs else out / "prefs.jsonl"
    print(f"[2/5] hscr.py: self-generated negatives from the base model → {prefs}")
    hscr.run(hscr.Options(model=str(base), data=str(world["align"]), image_root=str(world["root"]), out=str(prefs),
                          limit=cfg.align, seed=cfg.seed, similarity=similarity, mask_strategy=cfg.mask_strategy,
                          num_candidates=cfg.num_candidates, candidates=cfg.candidates, alpha=cfg.alpha,
                          batch_size=128, max_new_tokens=32, device="cpu"))

    print(f"[3/5] train.py: LoRA with the {cfg.loss} loss → {out / 'train'}")
    train.train(train.TrainConfig(
        model=str(base), data=str(prefs), image_root=str(world["root"]), out=str(out / "train"), loss=cfg.loss,
        gamma=cfg.gamma, epochs=cfg.epochs, batch_size=16, micro_batch=16, lr=cfg.lr, seed=cfg.seed,
        max_steps=cfg.steps, eval_fraction=0.05, eval_every=0, save_every=0, lora_dropout=0.0,
        max_response_tokens=64, device="cpu"))

    results = {} if base_results is None else {"base": base_results}
    for name, adapter in (("base", None), ("hscr", str(out / "train" / "adapter"))):
        if name in results:
            print("[4/5] eval.py: base model results reused")
            continue
        print(f"[{4 if name == 'base' else 5}/5] eval.py: {name} model on the {cfg.split} split, with and without the image")
        results[name] = evaluation.run(evaluation.EvalConfig(
            model=str(base), adapter=adapter, benchmark=[f"{cfg.split}={world[cfg.split]}"], image_root=[str(world["root"])],
            out=str(out / f"eval-{name}"), blind=True, batch_size=128, max_new_tokens=32, limit=cfg.test,
            device="cpu", dtype="float32"))[cfg.split]
    table = demo_table(results["base"], results["hscr"])
    (out / "table.md").write_text(table + "\n")
    print(f"\nBefore / after HSCR on the world's balanced {cfg.split} split ({out / 'table.md'}):\n\n{table}\n")
    print(f"Outputs in {out}/: prefs.jsonl (+ .summary.json, .rejects.jsonl), train/ (adapter/, metrics.jsonl), "
          f"eval-base/ and eval-hscr/ (answers, report.md, summary.json), table.md — {time.time() - t0:.0f} s")
    return results


# The ablation of issue 7 / the paper's tables: variant name → DemoConfig overrides.
ABLATION = {"dpo (1 negative)": {"loss": "dpo"}, "explicit only": {"loss": "explicit"},
            "implicit only": {"loss": "implicit"}, "hscr": {}, "hscr, pixel masking": {"mask_strategy": "pixel"}}
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
                                  description="The embedded demo's ablation: base, DPO, explicit only, implicit "
                                  "only, HSCR, HSCR with pixel masking, over several seeds.")
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
        return parser
    return dataclass_parser(DemoConfig, prog=f"{prog} [demo]", description=(
        "The embedded demo: all of HSCR on the shipped small Med-VLM and a synthetic Med-VQA world,\n"
        f"on a CPU. `{prog} ablation --help` lists the ablation's options.\n\n"
        "To train your own model: `python train.py train --help` lists the trainer's options\n"
        "(stage 3 on hscr.py's preference data, and SFT)."))


def main(argv: list[str] | None = None, prog: str = "python train.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ablation"]:
        args = vars(build_parser(prog, ablation_run=True).parse_args(argv[1:]))
        seeds = args.pop("seeds")
        print(ablation(DemoConfig(**args), seeds))
        return 0
    if argv[:1] == ["demo"]:
        argv = argv[1:]
    demo(DemoConfig(**vars(build_parser(prog).parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m demo.run"))
