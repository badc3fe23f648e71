"""Train the shipped base model's tokenizer (assets/base/tokenizer.json) on the world's texts.

A small Llama-style BPE tokenizer, trained from scratch: the demo's stand-in for Mistral's.

CLI: `python -m demo.tokenizer OUT/tokenizer.json --json FILE.json [FILE.json …] [--vocab-size 512]`
(README.md, "The shipped base model", gives the files and the size).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from model.tokenizer import (BYTE, CONTROL, IMAGE_TOKEN, NORMAL, SPIECE, TEMPLATES, UNKNOWN, USER_DEFINED,
                             SentencePieceModel, llama_tokenizer)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Tokenizer:
    """Train a small Llama-style tokenizer on `texts` (the embedded default's own vocabulary).

    The result has the same shape as a converted LLaMA/Mistral tokenizer, so every function of
    model/tokenizer.py treats both alike: ids 0-3 are `<unk>`, `<s>`, `</s>` and `<image>` (a
    real, special token, so both the chunked and the llava-hf conventions work), then the 256 byte
    pieces `<0x00>`…`<0xFF>` for byte fallback (no character is ever unknown), then BPE pieces
    learnt with `tokenizers`' trainer on words split at spaces ("▁" starts a word). Each learnt
    piece gets the score −rank, so merges are ranked as SentencePiece ranks them.
    """
    specials = ["<unk>", "<s>", "</s>", IMAGE_TOKEN]
    n_learnt = vocab_size - len(specials) - 256
    if n_learnt < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for learnt pieces (needs > {len(specials) + 256})")
    learner = Tokenizer(BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    learner.pre_tokenizer = pre_tokenizers.Split(SPIECE, behavior="merged_with_next")  # pieces never span words
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=n_learnt, show_progress=False))
    learnt = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])  # single characters first, then merges
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in learnt]
    types = [UNKNOWN, CONTROL, CONTROL, USER_DEFINED] + [BYTE] * 256 + [NORMAL] * len(learnt)
    scores = [0.0] * (len(specials) + 256) + [-float(rank) for rank in range(len(learnt))]
    tokenizer = llama_tokenizer(SentencePieceModel(pieces, scores, types, model_type=2, byte_fallback=True))
    # `<image>` must be special (skipped when decoding); llama_tokenizer adds user-defined pieces as plain.
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    return tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="tokenizer.json to write")
    parser.add_argument("--json", type=Path, nargs="+", required=True,
                        help="LLaVA instruction / test.json files: every conversation turn is training text")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args(argv)
    # Repeats are kept: BPE ranks merges by frequency, and deduplicated texts would leave the
    # commonest answers ("yes") split into pieces.
    texts = list(TEMPLATES.values())
    for path in args.json:
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: cannot read {path}: {e}") from None
        for record in records:
            for turn in record.get("conversations") or record.get("conversatons") or []:
                texts.append(turn["value"].replace(IMAGE_TOKEN, "").strip())
    tokenizer = train_tokenizer(texts, args.vocab_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output))
    print(f"wrote {args.output} ({tokenizer.get_vocab_size()} tokens, from {len(texts)} texts)")


if __name__ == "__main__":
    main()
