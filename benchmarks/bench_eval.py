"""Answers per second of eval.py's generation loop: batched vs batch 1, same model, CPU.

The whole per-question path of `eval.generate_answers` is timed: prompt building and chunk-wise
tokenization, image loading and preprocessing, left padding, greedy `Llava.generate`, decoding,
and the flushed answer-file writes. Model: random weights with LLaVA-Med's image geometry
(CLIP 336 px / patch 14 → 576 visual tokens, Mistral vocabulary) at a CPU-sized width (~45M
parameters). Prompts: the first N real VQA-RAD questions (tests/data), tokenised with
Mistral's SentencePiece model when `mistral_common` is installed (a test dependency), on
synthetic 512×384 images. Every batch size must give the same answers as batch 1 (greedy).

    python benchmarks/bench_eval.py [--questions 16] [--batch-sizes 1 4 8] [--max-new-tokens 16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eval as E  # noqa: E402
from data import Record  # noqa: E402
from harness.evalfiles import answers_path  # noqa: E402
from harness.files import read_jsonl  # noqa: E402
from model import Llava, LlavaConfig, TextConfig, VisionConfig  # noqa: E402

QUESTION_FILE = ROOT / "tests" / "data" / "VQA_RAD_test_llavamed_format.jsonl"


def build_model() -> Llava:
    cfg = LlavaConfig(
        vision=VisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, n_layers=4,
                            n_heads=4),
        text=TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, n_layers=6, n_heads=8,
                        n_kv_heads=4, max_seq_len=1024),
        image_token_id=-200)
    torch.manual_seed(0)
    model = Llava(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("class_embedding"):  # torch.empty in the constructor
                p.normal_()
    return model.eval()


def build_tokenizer():
    """Mistral's real tokenizer if available, else a character-level stand-in."""
    try:
        import mistral_common

        from model.tokenizer import convert_sentencepiece

        path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        return convert_sentencepiece(path), "Mistral SentencePiece (mistral_common)"
    except ImportError:
        import string

        from tokenizers import Tokenizer, decoders, models

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for c in string.printable:
            vocab.setdefault(c, len(vocab))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.add_special_tokens(["<unk>", "<s>", "</s>"])
        tok.decoder = decoders.Fuse()
        return tok, "character-level stand-in"


def questions(n: int, image_dir: Path) -> list[Record]:
    """The first n VQA-RAD questions, each with its own synthetic image on disk."""
    from PIL import Image

    rows = [json.loads(line) for line in QUESTION_FILE.read_text().splitlines()[:n]]
    g = torch.Generator().manual_seed(0)
    records = []
    for row in rows:
        name = f"{row['question_id']}.png"
        pixels = torch.randint(0, 256, (384, 512, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(image_dir / name)
        question = row["text"].replace("<image>", "").strip()
        records.append(Record(str(row["question_id"]), name, question, row["gpt4_answer"], row["answer_type"]))
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model()
    tokenizer, tok_name = build_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads), float32, torch {torch.__version__}")
    print(f"model {n_params / 1e6:.1f}M parameters, {model.config.num_image_tokens} visual tokens; "
          f"tokenizer: {tok_name}")
    print(f"{args.questions} VQA-RAD questions, greedy, max_new_tokens={args.max_new_tokens}, "
          f"best of {args.repeats} interleaved runs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        records = questions(args.questions, tmp / "images")
        kw = dict(name="rad", mode="full", image_root=str(tmp / "images"), model_id="bench",
                  max_new_tokens=args.max_new_tokens)
        # warm-up: one batch of two, outside the timings
        E.generate_answers(model, tokenizer, records[:2], run_dir=tmp / "warm", batch_size=2, **kw)
        # Batch sizes interleaved within each repeat, best time kept: on a shared machine the
        # load changes over minutes, and this keeps it from favouring one batch size.
        best = {bs: float("inf") for bs in args.batch_sizes}
        answers = {}
        for rep in range(args.repeats):
            for bs in args.batch_sizes:
                run_dir = tmp / f"bs{bs}-{rep}"
                t = time.perf_counter()
                E.generate_answers(model, tokenizer, records, run_dir=run_dir, batch_size=bs, **kw)
                best[bs] = min(best[bs], time.perf_counter() - t)
                answers[bs] = [r["text"] for r in read_jsonl(answers_path(run_dir, "rad", "full", 0))]
        reference = answers[args.batch_sizes[0]]
        results = [(bs, best[bs], len(records) / best[bs], sum(a == b for a, b in zip(answers[bs], reference)))
                   for bs in args.batch_sizes]
    base = results[0][2]
    first = args.batch_sizes[0]
    print(f"\n| batch | seconds | answers/s | vs batch {first} | answers equal to batch {first} |")
    print("|---:|---:|---:|---:|---:|")
    for bs, seconds, rate, same in results:
        print(f"| {bs} | {seconds:.1f} | {rate:.2f} | {rate / base:.2f}× | {same}/{len(records)} |")


if __name__ == "__main__":
    main()
