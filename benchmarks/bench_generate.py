"""Tokens/s of our `Llava.generate`, eager and with its decode step compiled (`compile=True`),
vs transformers' `generate` on the same weights and prompts.

CPU (default): a small LLaVA of ~40M parameters with the real image geometry (336 px, patch 14,
576 image tokens), batch 1 and 8, 64 new tokens, greedy, fp32.
GPU (`--device cuda`): the LLaVA-Med v1.5 7B shape with random bf16 weights, batch 1 (and 8).
transformers is only the baseline here; it is never imported by the project's run-time code.
"call" counts the whole call (vision tower, prefill, decoding); "decode" only the steps after the
first token: (T_new − 1) · B over the time of a call of T_new tokens less that of a 1-token call.

    python benchmarks/bench_generate.py [--device cuda] [--batch 1 8] [--new-tokens 64] [--compile]
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(device: str, dtype: torch.dtype, big: bool):
    """The same random weights as a transformers Llava and as ours (renamed by our loader's table,
    in memory: writing 15 GB to disk for the 7B shape would dominate the run)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from model.llava import Llava
    from model.loading import config_from_json, rename

    if big:  # LLaVA-Med v1.5: CLIP ViT-L/14-336 + Mistral-7B
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)
        text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6, sliding_window=None,
                             max_position_embeddings=4096)
    else:
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=4, image_size=336, patch_size=14)
        text = MistralConfig(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=4, sliding_window=None,
                             max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    with torch.device(device):
        hf = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    with torch.device("meta"):
        ours = Llava(config_from_json(cfg.to_dict()))
    ours.load_state_dict({rename(k, "llava-hf"): v for k, v in hf.state_dict().items()}, strict=True, assign=True)
    return hf, ours.eval()


def prompts(batch: int, device: str, n_img: int = 576):
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(batch):  # ragged: 20..(20+3b) text tokens around the image
        text = torch.randint(3, 31000, (20 + 3 * b,), generator=g).tolist()
        rows.append([1] + text[:5] + [32000] * n_img + text[5:])
    T = max(map(len, rows))
    ids = torch.zeros(batch, T, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time ours with generate(compile=True)")
    args = ap.parse_args()
    big = args.device == "cuda"
    dtype = torch.bfloat16 if big else torch.float32
    torch.manual_seed(0)
    hf, ours = build(args.device, dtype, big)
    n_params = sum(p.numel() for p in ours.parameters())
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, dtype {dtype}, {n_params / 1e6:.1f}M parameters, 576 image tokens, "
          f"{args.new_tokens} new tokens, greedy, torch {torch.__version__}")
    n = args.new_tokens
    variants = {"ours": lambda ids, px, mask, k: ours.generate(ids, px, mask, max_new_tokens=k, eos_token_id=-1)}
    if args.compile:
        variants["ours compiled"] = lambda ids, px, mask, k: ours.generate(
            ids, px, mask, max_new_tokens=k, eos_token_id=-1, compile=True)
    variants["transformers"] = lambda ids, px, mask, k: hf.generate(
        input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
        do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    print(f"{'batch':>5} {'variant':14} {'call tok/s':>10} {'decode tok/s':>12} {'x ours':>7} "
          f"{'same tokens':>11}")
    for batch in args.batch:
        ids, mask = prompts(batch, args.device)
        pixels = torch.randn(batch, 3, 336, 336, device=args.device, dtype=dtype)
        calls = {(label, k): functools.partial(gen, ids, pixels, mask, k) for label, gen in variants.items()
                 for k in (n, 1)}  # k = 1: the vision tower, the prefill and the first token only
        best, outs = {}, {}
        with torch.no_grad():
            for key, call in calls.items():
                outs[key] = call()  # warm-up (and compilation)
            # The variants take turns, so that a machine's changing load touches them alike.
            for _ in range(args.repeats):
                for key, call in calls.items():
                    best[key] = min(best.get(key, math.inf), timed(call, args.device)[0])
        first = outs["ours", n]
        eager_decode = batch * (n - 1) / max(best["ours", n] - best["ours", 1], 1e-9)
        for label in variants:
            decode = batch * (n - 1) / max(best[label, n] - best[label, 1], 1e-9)
            print(f"{batch:>5} {label:14} {batch * n / best[label, n]:>10.1f} {decode:>12.1f} "
                  f"{decode / eager_decode:>6.2f}x {str(torch.equal(outs[label, n], first)):>11}")


if __name__ == "__main__":
    main()
