"""Time and peak memory of one HSCR training step: train.py's step vs a naive one.

One entry: 1 chosen + 3 rejected responses of 128 tokens after a prompt of 576 image tokens and
~40 text tokens (LLaVA-Med v1.5's geometry: 336 px, patch 14). Both steps compute the same
loss (Eq. 7, reference log-probs given, as train.py caches them) and its backward pass:

    ours    image encoded once; the 4 rows packed after their shared prefix (image tokens and
            prompt run once, model.rows.collate); hidden states taken at the 4 × 128 response
            positions only; vocabulary projection + log-softmax in checkpointed chunks
            (train.row_logprobs)
    rows    the same, but each row its own sequence, the prefix run 4 times (the layout before
            packing)
    naive   the 4 rows with the image each (the vision tower runs 4 times, as TRL's
            concatenated forward does); full (4, T, V) fp32 logits; log_softmax over all of it

CPU (default): a small model with the real image geometry and V = 32000, fp32. GPU
(`--size 7b --device cuda`): the LLaVA-Med v1.5 7B shape with random bf16 weights; add
`--gradient-checkpointing` for the target of ≤ 24 GB peak for one entry (one 24 GB card).
Each variant runs in its own process so that peak memory (CUDA max allocated, or CPU peak RSS)
belongs to it alone.

    python benchmarks/bench_train.py [--size small|7b] [--device cpu|cuda] [--gradient-checkpointing]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from model.llava import Llava, LlavaConfig, TextConfig, VisionConfig, preset  # noqa: E402
from model.lora import apply_lora  # noqa: E402

GB = 1024 ** 3


def build(size: str, device: str, dtype: torch.dtype, checkpointing: bool) -> Llava:
    """Random weights (no checkpoint on disk: the 7B shape would take minutes to write)."""
    if size == "7b":
        cfg = preset("llava-med-v1.5-mistral-7b")
    else:
        # Real image geometry and vocabulary, narrow and shallow elsewhere (~25M parameters).
        cfg = LlavaConfig(vision=VisionConfig(hidden_size=128, intermediate_size=512, n_layers=2, n_heads=4),
                          text=TextConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, n_layers=2,
                                          n_heads=8, n_kv_heads=4))
    with torch.device("meta"):
        model = Llava(cfg).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith(("class_embedding", "position_embedding.weight")):
                p.normal_(0, 0.02, generator=g)
            else:  # norm weights 1, biases 0
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    apply_lora(model, rank=16, alpha=32, dropout=0.05)
    if checkpointing:
        train.enable_gradient_checkpointing(model)
    return model.train()


def entry(cfg: LlavaConfig, responses: int, response_tokens: int, seed: int = 0):
    """One entry as train.py sees it: a prompt with the image placeholders and 1 + K responses."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, cfg.text.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompt = [1] + text(4) + [cfg.image_token_id] * cfg.num_image_tokens + text(32)
    rows = [prompt + text(response_tokens - 1) + [2] for _ in range(responses)]
    targets = [[False] * len(prompt) + [True] * response_tokens for _ in rows]
    return train.Example("bench", Path("random-image"), rows, targets)


def step_ours(model, ex, pixels, ref):
    rows = train.collate([ex], pad_id=0).to(pixels.device)
    logp = train.row_logprobs(model, model, rows, pixels, chunk_rows=256)                 # (1 + K,)
    return logp


def step_rows(model, ex, pixels, ref):
    single = [train.Example(f"row{r}", ex.image, [row], [target]) for r, (row, target) in
              enumerate(zip(ex.rows, ex.targets))]
    rows = train.collate(single, pad_id=0).to(pixels.device)
    return train.row_logprobs(model, model, rows, pixels.expand(len(single), -1, -1, -1), chunk_rows=256)


def step_naive(model, ex, pixels, ref):
    ids = torch.tensor(ex.rows, device=pixels.device)                                     # (R, T)
    logits = model(ids, pixels.expand(len(ex.rows), -1, -1, -1))                          # (R, T, V) fp32
    logp = torch.log_softmax(logits[:, :-1], dim=-1)                                      # (R, T−1, V)
    token = logp.gather(-1, ids[:, 1:, None].clamp(min=0)).squeeze(-1)                   # (R, T−1)
    mask = torch.tensor(ex.targets, device=ids.device)[:, 1:]
    return (token * mask).sum(-1)


def run_variant(args) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build(args.size, args.device, dtype, args.gradient_checkpointing)
    ex = entry(model.config, 1 + args.negatives, args.response_tokens)
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref = torch.randn(1 + args.negatives, generator=torch.Generator().manual_seed(2)).to(device) - 300.0
    fn = {"ours": step_ours, "rows": step_rows, "naive": step_naive}[args.variant]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            logp = fn(model, ex, pixels, ref)
        mask = torch.ones(1, args.negatives, dtype=torch.bool, device=device)
        loss, _ = train.multilevel_loss(logp[:1], logp[None, 1:], ref[:1], ref[None, 1:], mask)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return logp.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        static = _rss_bytes()
    times = []
    for _ in range(1 + args.repeats):  # the first one warms up
        sync()
        t = time.perf_counter()
        logp = step()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "size": args.size, "device": _device_name(device), "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing, "rows": 1 + args.negatives,
            "tokens_per_row": len(ex.rows[0]), "ms": 1000 * statistics.median(times[1:]),
            "peak_gb": peak / GB, "over_weights_gb": (peak - static) / GB, "logp": logp.float().tolist()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("small", "7b"), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--variant", choices=("ours", "rows", "naive", "all"), default="all")
    p.add_argument("--negatives", type=int, default=3)
    p.add_argument("--response-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="directory for bench_train.json and bench_train.summary")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.variant != "all":
        print(json.dumps(run_variant(args)))
        return
    results = []
    for variant in ("ours", "rows", "naive"):  # one process each: peak memory is per process
        cmd = [sys.executable, __file__, "--variant", variant] + [
            a for a in sys.argv[1:] if a not in ("--variant", "all")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            results.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1]})
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ok = [r for r in results if "error" not in r]
    lines = [f"bench_train: one HSCR step, {args.size} model, {ok[0]['device'] if ok else args.device}, "
             f"{args.dtype}, 1 + {args.negatives} rows of {ok[0]['tokens_per_row'] if ok else '?'} tokens, "
             f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
             f"{'variant':8} {'ms':>9} {'peak GB':>9} {'above weights GB':>17}"]
    for r in results:
        lines.append(f"{r['variant']:8} {r['ms']:9.1f} {r['peak_gb']:9.2f} {r['over_weights_gb']:17.2f}"
                     if "error" not in r else f"{r['variant']:8} failed: {r['error']}")
    first = ok[0] if ok and ok[0]["variant"] == "ours" else None
    for other in ok[1:] if first else []:
        diff = max(abs(a - b) for a, b in zip(first["logp"], other["logp"]))
        lines.append(f"ours vs {other['variant']}: {other['ms'] / first['ms']:.2f}x faster, "
                     f"{other['over_weights_gb'] / max(first['over_weights_gb'], 1e-9):.2f}x less memory above "
                     f"the weights; max |Δ log π| = {diff:.3g}")
    if args.size == "7b" and ok and ok[0]["variant"] == "ours":
        lines.append(f"target peak ≤ 24 GB for one entry: {'PASS' if ok[0]['peak_gb'] <= 24 else 'FAIL'} "
                     f"({ok[0]['peak_gb']:.2f} GB)")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_train.json").write_text(json.dumps(results, indent=2))
        (out / "bench_train.summary").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
