"""Benchmark the fused self-contrast softmax against eager PyTorch and torch.compile.

For each row count (V = 32000, bf16 logits by default) it times

    triton        the kernel with its default launch (one block per row when V ≤ 32768 in bf16)
    triton-loop   the same kernel forced to loop over 4096-wide blocks (a tuning reference)
    eager         contrast_softmax_reference, the fp32 PyTorch specification
    compile       torch.compile(contrast_softmax_reference)

and reports milliseconds per call, achieved GB/s and the ratios. Bytes moved per call are the
minimum any implementation needs: read full and drop once, write fp32 P_diff once,
rows · V · (2 · itemsize + 4). The same run measures the device-to-device copy bandwidth
(dst.copy_(src), read + write), the ceiling for a memory-bound kernel.

Targets from the issue, checked on CUDA at 1k–8k rows: triton ≥ 3× eager, ≥ 1× compile, and
≥ 80% of the copy bandwidth. On CPU the kernel runs through the Triton interpreter: those
numbers show that the script runs, they are not speed claims.

    python benchmarks/bench_contrast_softmax.py                   # CUDA if present
    python benchmarks/bench_contrast_softmax.py --rows 1 8 --reps 2 --copy-mib 64   # CPU

Writes contrast_softmax.json (every measurement) and contrast_softmax.summary (a few lines
that benchmarks/gpu_check.sh prints at the end) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Without CUDA the kernel can only run through the interpreter, which must be switched on
# before triton is first imported (an explicit TRITON_INTERPRET in the environment wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels.contrast_softmax import (  # noqa: E402
    INTERPRETED,
    contrast_softmax_reference,
    contrast_softmax_triton,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_ROWS = (1024, 8192)  # the rows at which the targets apply (when measured)


@dataclass
class BenchConfig:
    rows: list[int] = field(default_factory=lambda: [1, 8, 64, 1024, 8192])
    vocab: int = 32000
    dtype: str = "bf16"
    beta: float = 0.9
    reps: int = 0  # timed repetitions per measurement; 0 = 20 on CUDA, 3 on CPU
    copy_mib: int = 0  # size of the copy-bandwidth buffer; 0 = 1024 on CUDA, 64 on CPU
    compile: bool = True
    out: str = os.environ.get("OUT", "benchmarks/out")


def parse_args() -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=d.rows, help="row counts to time")
    p.add_argument("--vocab", type=int, default=d.vocab, help="V, the row length")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="dtype of the logits")
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--reps", type=int, default=d.reps, help="timed repetitions (0: by device)")
    p.add_argument("--copy-mib", type=int, default=d.copy_mib, help="copy buffer MiB (0: by device)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--out", default=d.out, help="output folder (default $OUT or benchmarks/out)")
    return BenchConfig(**vars(p.parse_args()))


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds per call of fn() after warm-up (compilation, autotuning, caches)."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    # Short calls are timed in batches of n so that launch jitter and event resolution
    # (~µs) do not dominate; n is sized from one timed call to make a batch ≳ 5 ms.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(1, min(1000, int(5e-3 / max(time.perf_counter() - t0, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device, mib: int, reps: int) -> float:
    """Device-to-device copy bandwidth, counting the read and the write (GB/s, 1e9 bytes)."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * n / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    mode = "Triton interpreter" if INTERPRETED else "no Triton"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {mode})"


def main() -> None:
    cfg = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    reps = cfg.reps or (20 if on_gpu else 3)
    dtype = DTYPES[cfg.dtype]
    V = cfg.vocab
    print(f"device: {device_name(device)}")
    print(f"dtype: {cfg.dtype} in, fp32 out; V = {V}; beta = {cfg.beta}; torch {torch.__version__}")
    print(f"config: {json.dumps(asdict(cfg))}")

    copy_gbs = copy_bandwidth_gbs(device, cfg.copy_mib or (1024 if on_gpu else 64), reps)
    print(f"device-to-device copy: {copy_gbs:.4g} GB/s (read + write)")

    compiled = torch.compile(contrast_softmax_reference, dynamic=False) if cfg.compile else None
    impls = {
        "triton": lambda f, d: contrast_softmax_triton(f, d, cfg.beta),
        "triton-loop": lambda f, d: contrast_softmax_triton(f, d, cfg.beta, block_size=4096),
        "eager": lambda f, d: contrast_softmax_reference(f, d, cfg.beta),
    }
    if compiled is not None:
        impls["compile"] = lambda f, d: compiled(f, d, cfg.beta)

    results = []
    header = f"{'rows':>6} {'impl':<12} {'ms':>10} {'GB/s':>8} {'%copy':>6} {'x eager':>8} {'x compile':>9} {'max|diff|':>10}"
    print(header)
    for rows in cfg.rows:
        g = torch.Generator().manual_seed(rows)
        full = (3 * torch.randn(rows, V, generator=g)).to(device=device, dtype=dtype)
        drop = (0.8 * full.float() + 1.8 * torch.randn(rows, V, generator=g).to(device)).to(dtype)
        nbytes = rows * V * (2 * full.element_size() + 4)
        with torch.no_grad():
            ref = contrast_softmax_reference(full, drop, cfg.beta)
            ms = {name: time_ms(lambda fn=fn: fn(full, drop), device, reps) for name, fn in impls.items()}
            diffs = {name: float((fn(full, drop) - ref).abs().max()) for name, fn in impls.items()}
        for name in impls:
            r = {
                "rows": rows, "impl": name, "ms": ms[name], "gbs": nbytes / (ms[name] * 1e-3) / 1e9,
                "x_eager": ms["eager"] / ms[name],
                "x_compile": ms["compile"] / ms[name] if "compile" in ms else None,
                "max_abs_diff": diffs[name],
            }
            r["pct_copy"] = 100 * r["gbs"] / copy_gbs
            results.append(r)
            xc = f"{r['x_compile']:.2f}" if r["x_compile"] is not None else "-"
            print(f"{rows:>6} {name:<12} {r['ms']:>10.4g} {r['gbs']:>8.4g} {r['pct_copy']:>6.3g} "
                  f"{r['x_eager']:>8.2f} {xc:>9} {r['max_abs_diff']:>10.2e}")
        del full, drop, ref

    # The targets, for the triton rows at 1k–8k rows that were measured.
    checks = []
    for r in results:
        if r["impl"] == "triton" and r["rows"] in TARGET_ROWS:
            checks.append((f"rows {r['rows']}: >= 3x eager", r["x_eager"] >= 3))
            if r["x_compile"] is not None:
                checks.append((f"rows {r['rows']}: >= 1x compile", r["x_compile"] >= 1))
            checks.append((f"rows {r['rows']}: >= 80% copy bandwidth", r["pct_copy"] >= 80))
    summary = [f"contrast_softmax on {device_name(device)}, {cfg.dtype}, V={V}: copy {copy_gbs:.4g} GB/s"]
    for r in results:
        if r["impl"] == "triton":
            xc = f"{r['x_compile']:.2f}x compile" if r["x_compile"] is not None else "no compile"
            summary.append(f"  rows {r['rows']:>5}: triton {r['ms']:.4g} ms, {r['gbs']:.4g} GB/s "
                           f"({r['pct_copy']:.3g}% copy), {r['x_eager']:.2f}x eager, {xc}")
    if on_gpu:
        summary += [f"  target {name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks]
    else:
        summary.append("  targets: not checked (not a GPU; interpreter numbers are not speed claims)")
    print("\n".join(summary))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": asdict(cfg), "device": device_name(device), "torch": torch.__version__,
        "copy_gbs": copy_gbs, "results": results, "targets": {n: ok for n, ok in checks} if on_gpu else None,
    }
    (out / "contrast_softmax.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "contrast_softmax.summary").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
