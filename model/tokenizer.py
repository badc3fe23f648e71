"""Tokenizer and prompt for LLaVA-Med v1.5, with the `tokenizers` library only.

`convert_sentencepiece` reads LLaVA-Med's SentencePiece `tokenizer.model` by hand into the Llama-style
Tokenizer of transformers' (4.x) `LlamaConverter`, equal to `sentencepiece` id for id; prompts follow
LLaVA-Med's `mistral_instruct` template (docs/FORMATS.md, "Tokenizer", "Prompt"). CLI:
`python -m model.tokenizer convert IN.model OUT.json`.
"""
from __future__ import annotations

import argparse
import json
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from harness.cli import UserError


def piece_word(piece: str | None) -> str:
    """A tokenizer piece as a word, case kept: no word-start mark (SentencePiece's, byte-level BPE's), no
    surrounding punctuation ("▁no." → "no"; "." → ""). hscr.py's --same-word and demo/negatives.py use it."""
    return (piece or "").lstrip("▁Ġ ").strip(".,;:!?\"'()[]")


def word_classes(pieces: Sequence[str | None]) -> list[int]:
    """A class per token id (pieces[i] = the piece of id i) for hscr.py's --same-word: tokens spelling one
    word (piece_word lower-cased: "▁No", "no", "▁no.") share one; a piece with no letter or digit is alone."""
    classes, seen = [], {}
    for i, piece in enumerate(pieces):
        w = piece_word(piece).lower()
        classes.append(seen.setdefault(w, len(pieces) + len(seen)) if any(ch.isalnum() for ch in w) else i)
    return classes


IMAGE_TOKEN = "<image>"  # the placeholder LLaVA writes into prompts
SPIECE = "\u2581"  # "▁", SentencePiece's visible space

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}  # TrainerSpec.model_type, for error messages

# LLaVA-Med's conv_mistral_instruct (sep_style LLAMA_2, empty system prompt), single turn.
TEMPLATES = {"mistral_instruct": "[INST] {user} [/INST]"}


# A minimal protobuf reader, just enough for sentencepiece_model.proto: a malformed message is a ValueError.
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; returns (value, next position)."""
    value = 0
    for shift in range(0, 70, 7):  # a 64-bit value needs at most 10 bytes
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte, pos = buf[pos], pos + 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of one message: int for varints, bytes for the rest. Wire types:
    0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit; groups (3, 4) are not in this schema."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):
            size, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            if pos + size > len(buf):
                raise ValueError(f"field {number} runs past the end of its message")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        yield number, value


def _int32(value: int | bytes) -> int:
    """An int32 / enum / bool field; a negative int32 (pad_id = -1) is a 64-bit two's complement varint."""
    if not isinstance(value, int):
        raise ValueError("a numeric field is not a varint")
    return value - (1 << 64) if value >= 1 << 63 else value


def _at(message: int, number: int, default):
    """Field `number` of ModelProto's field `message` (2 TrainerSpec, 3 NormalizerSpec, 5 denormalizer's)."""
    return field(default=default, metadata={"at": (message, number)})


@dataclass
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that decide how text becomes ids; the defaults are
    proto2's, which apply when a field is absent from the file; a field's type is its default's."""
    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = _at(2, 3, 1)  # default UNIGRAM
    byte_fallback: bool = _at(2, 35, False)
    unk_id: int = _at(2, 40, 0)
    bos_id: int = _at(2, 41, 1)
    treat_whitespace_as_suffix: bool = _at(2, 24, False)
    normalizer_name: str = _at(3, 1, "")
    precompiled_charsmap: bytes = _at(3, 2, b"")  # character rewriting table; empty = identity
    add_dummy_prefix: bool = _at(3, 3, True)
    remove_extra_whitespaces: bool = _at(3, 4, True)
    escape_whitespaces: bool = _at(3, 5, True)
    denormalizer_charsmap: bytes = _at(5, 2, b"")


def read_sentencepiece(model_path: str | Path) -> SentencePieceModel:
    """Parse a SentencePiece `tokenizer.model` (ModelProto) without protobuf or sentencepiece.
    ModelProto: 1 pieces (repeated SentencePiece {1 piece, 2 score, 3 type}), 2 trainer_spec,
    3 normalizer_spec, 5 denormalizer_spec. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    spm = SentencePieceModel(pieces=[], scores=[], types=[])
    spec = {f.metadata["at"]: f.name for f in fields(spm) if f.metadata}  # (message, field) → attribute
    try:
        for number, value in _fields(path.read_bytes()):
            if number == 1 and isinstance(value, bytes):
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = _int32(v)
                spm.pieces.append(piece)
                spm.scores.append(score)
                spm.types.append(kind)
            elif number in (2, 3, 5) and isinstance(value, bytes):
                for name, v in ((spec[number, n], v) for n, v in _fields(value) if (number, n) in spec):
                    old = getattr(spm, name)
                    if not isinstance(old, (str, bytes)):
                        setattr(spm, name, type(old)(_int32(v)))  # an int, enum or bool
                    elif isinstance(v, bytes):  # a string / bytes field of another wire type is skipped
                        setattr(spm, name, v.decode("utf-8") if isinstance(old, str) else v)
    except ValueError as e:  # a malformed message, or a piece that is not UTF-8
        raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from None
    if not spm.pieces:
        raise ValueError(f"{path} is not a valid SentencePiece model: it has no pieces")
    return spm


def _bpe_merges(pieces: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """All (left, right) with left + right a piece and both halves pieces, in rank order.
    SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation has the highest
    score; HF BPE merges the pair with the lowest rank: ranking by score (descending) makes the two
    agree. Secondary keys and ties follow transformers' converter, so the merges list is its."""
    known = set(pieces)
    merges = [(score, piece[:k], piece[k:]) for piece, score in zip(pieces, scores)
              for k in range(1, len(piece)) if piece[:k] in known and piece[k:] in known]
    # A stable sort: ties keep piece order (two splits of one piece never tie: their lefts differ in length).
    merges.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))
    return [(left, right) for _, left, right in merges]


def convert_sentencepiece(model_path: str | Path) -> Tokenizer:
    """Build the Llama-style `tokenizers.Tokenizer` equivalent to a SentencePiece BPE model; one
    ValueError lists every way the model differs from the Llama/Mistral kind rebuilt here."""
    path = Path(model_path)
    spm = read_sentencepiece(path)
    kind = _MODEL_TYPES.get(spm.model_type, str(spm.model_type))
    duplicates = sorted(p for p, n in Counter(spm.pieces).items() if n > 1)
    checks = [  # (unsupported?, the problem)
        (spm.model_type != 2, f"model_type is {kind}; only BPE (Llama / Mistral style) is supported"),
        (not spm.byte_fallback, "byte_fallback is off; Llama-style tokenizers need it"),
        (spm.precompiled_charsmap or spm.denormalizer_charsmap,
         f"normalizer {spm.normalizer_name!r} rewrites characters; only 'identity' is supported"),
        (spm.remove_extra_whitespaces, "remove_extra_whitespaces is on; whitespace runs would be lost"),
        (not spm.escape_whitespaces, "escape_whitespaces is off; spaces must become '▁'"),
        (spm.treat_whitespace_as_suffix, "treat_whitespace_as_suffix is on; only '▁' prefixes are supported"),
        (not 0 <= spm.unk_id < len(spm.pieces) or spm.types[spm.unk_id] != UNKNOWN,
         f"unk_id {spm.unk_id} is not an UNKNOWN piece"),
        (duplicates, f"duplicate pieces {duplicates[:5]}"),
    ]
    if problems := [problem for failed, problem in checks if failed]:
        raise ValueError(f"unsupported SentencePiece model {path}:\n  - " + "\n  - ".join(problems))
    return llama_tokenizer(spm)


def llama_tokenizer(spm: SentencePieceModel) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a (checked) SentencePiece BPE model; demo/tokenizer.py uses it too."""
    vocab, unk = {piece: i for i, piece in enumerate(spm.pieces)}, spm.pieces[spm.unk_id]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(spm.pieces, spm.scores), unk_token=unk,
                              fuse_unk=True, byte_fallback=True, dropout=None))
    # The dummy prefix lives in the normalizer (no pre-tokenizer), so that every stretch of text between
    # special tokens gets its "▁", as in LLaVA-Med's slow "legacy" LlamaTokenizer (SentencePiece per stretch).
    steps = [normalizers.Prepend(SPIECE)] if spm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE)])
    undo = [decoders.Strip(content=" ", left=1, right=0)] if spm.add_dummy_prefix else []  # the dummy prefix
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), *undo])
    # Control and unknown pieces are special: matched verbatim, skipped by decode(skip_special_tokens=True);
    # user-defined ones are matched verbatim but decoded. The ids stay: the pieces are in the vocab.
    tokenizer.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                  for p, t in zip(spm.pieces, spm.types) if t in (UNKNOWN, CONTROL)])
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False)
                          for p, t in zip(spm.pieces, spm.types) if t == USER_DEFINED])
    if 0 <= spm.bos_id < len(spm.pieces):
        # LLaVA-Med's tokenizer_config has add_bos_token=True: plain `encode` gives BOS first.
        bos = spm.pieces[spm.bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spm.bos_id)])
    return tokenizer


# Loading, prompts, tokenization.
def tokenizer_file(path: str | Path) -> Path:
    """The file load_tokenizer reads: `path`, or a directory's tokenizer.json, else its tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        if found := [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]:
            return found[0]
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model in it (pass --tokenizer)")
    if not path.is_file():
        raise UserError(f"tokenizer {path}: not found")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of tokenizer_file(path); a SentencePiece tokenizer.model (LLaVA-Med's) is converted."""
    path = tokenizer_file(path)
    if path.suffix == ".model":
        return convert_sentencepiece(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"cannot read tokenizer file {path}: {e}") from None


def canonical_form(tokenizer: Tokenizer) -> dict:
    """What a tokenizer does as one JSON value, whichever file it was read from (a tokenizer.model and the
    tokenizer.json `convert` writes from it give the same): the scripts' fingerprints hash this."""
    form = json.loads(tokenizer.to_str())
    form.pop("version", None)  # the file format's, as are merges as "a b" strings (older tokenizers)
    if "merges" in (model := form["model"]):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    return form


def build_prompt(question: str, template: str = "mistral_instruct") -> str:
    """The evaluation prompt: any "<image>" removed from the question, "<image>\\n" put first:
    build_prompt("What is shown?<image>") == '[INST] <image>\\nWhat is shown? [/INST]'."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template].format(user=f"{IMAGE_TOKEN}\n{question.replace(IMAGE_TOKEN, '').strip()}")


def tokenize_prompt(tokenizer: Tokenizer, prompt: str, *, image_token_id: int,
                    num_image_tokens: int, bos_token_id: int | None = 1) -> list[int]:
    """Prompt ids with each "<image>" expanded to `num_image_tokens` copies of `image_token_id` (-200 is
    never looked up), by LLaVA's chunk-wise tokenization (docs/FORMATS.md, "Prompt": each chunk between
    "<image>"s gets its own "▁" prefix, BOS only once); for a llava-hf tokenizer, the whole prompt's ids."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    image = [image_token_id] * num_image_tokens
    ids = [] if bos_token_id is None else [bos_token_id]
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):  # never the post-processor: BOS is placed here
        ids += (image if i else []) + tokenizer.encode(chunk, add_special_tokens=False).ids
    return ids


def image_span(ids: Sequence[int], image_token_id: int) -> tuple[int, int]:
    """(first, last) index of the run of image placeholders in a tokenized prompt."""
    ids = list(ids)
    return ids.index(image_token_id), len(ids) - 1 - ids[::-1].index(image_token_id)


def tokenize_response(tokenizer: Tokenizer, text: str, *, eos_token_id: int | None = 2) -> list[int]:
    """The ids of a response as they follow the prompt's "[/INST]", then EOS.
    LLaVA joins "[/INST]" and the answer with one space; SentencePiece pieces never cross the "]" / "▁"
    boundary, so the answer's ids are its own encoding, the dummy prefix standing for that space."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids  # EOS placed here, not by the post-processor
    return ids if eos_token_id is None else ids + [eos_token_id]


def decode(tokenizer: Tokenizer, ids: Sequence[int], *, eos_token_id: int | None = 2) -> str:
    """Text of generated ids: cut at the first EOS, special tokens skipped, stripped (as LLaVA-Med's eval)."""
    ids = [int(i) for i in ids]
    ids = ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids
    if negative := [i for i in ids if i < 0]:
        raise ValueError(f"cannot decode negative ids {sorted(set(negative))} (image placeholders?)")
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.tokenizer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="SentencePiece tokenizer.model -> tokenizer.json")
    convert.add_argument("model", type=Path, help="SentencePiece tokenizer.model")
    convert.add_argument("output", type=Path, help="tokenizer.json to write")
    args = parser.parse_args(argv)
    try:
        tokenizer = convert_sentencepiece(args.model)
    except (FileNotFoundError, ValueError) as e:  # the message names the file and the problem
        raise SystemExit(f"error: {e}") from None
    tokenizer.save(str(args.output))
    print(f"wrote {args.output} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
