"""Tokenizer converter and LLaVA-Med prompt tokenization (model/tokenizer.py).

References:
- `sentencepiece` itself, on a tiny BPE model trained here and on the real Mistral-7B model that
  LLaVA-Med v1.5 ships (inside the `mistral_common` wheel): ids and decoded text must be equal;
- transformers' `LlamaConverter`: same vocab, merges, normalizer, decoder and ids;
- the LLaVA-Med v1.5 prompt ids measured with sentencepiece in docs/FORMATS.md (Prompt, chunk-wise tokenization).
"""
import importlib.resources
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer

from harness import provenance
from harness.cli import UserError
from model.tokenizer import (build_prompt, canonical_form, convert_sentencepiece, decode, load_tokenizer,
                             main, read_sentencepiece, tokenize_prompt, tokenize_response, word_classes)

# Training text for the tiny model: prose, medical phrases, code with indentation, numbers, some
# accented and CJK characters (others are left out so that byte fallback is exercised).
CORPUS = """\
The chest X-ray shows no sign of pneumonia or pleural effusion.
What is shown in the image? The image shows a CT scan of the abdomen.
Is there evidence of a fracture? Yes, there is a fracture of the left femur.
The lesion measures 12 mm by 34 mm and is located in the upper lobe.
A 45-year-old patient presented with fever, cough and shortness of breath.
    def forward(self, x):
        return self.proj(x) + x
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2,718
Café, naïve, résumé, Zürich, São Paulo — accents everywhere.
肺炎 胸部 图像 显示 病变
The   spaces   are   repeated   here,   and	tabs	too.
  Leading spaces and trailing spaces  
MRI of the brain demonstrates a hyperintense lesion in the white matter.
Histology reveals granulomatous inflammation with multinucleated giant cells.
""".splitlines()

TEXTS = [
    "Hello world", "What is shown in the image?", "  two leading spaces", "trailing  ",
    "runs   of    spaces", "tabs\tand\nnewlines\n\n", "\n", " ", "   ", "", "x" + " " * 9 + "y",
    "    def f():\n        return 1", "12345 678.9 0.001", "日本語のテキスト 🤖🎉 ünïcödé",
    "肺炎 is pneumonia", "emoji only 🫁🩻", "mixed\u00a0nbsp and \u3000 ideographic space",
    "[INST] <image>\nWhat is this? [/INST]", "zero-width\u200bjoiner", "ﬁ ligature",
]


def random_texts(n, seed=0):
    """Random strings over in-vocabulary and out-of-vocabulary characters, with space runs."""
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrst .,?\n\t0123456789ABC") + [
        "é", "ü", "肺", "日", "🤖", "  ", "   ", "\u00a0", "ﬁ", "—", "<", ">"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def train(tmp_path, name, **options):
    """Train a tiny SentencePiece model on CORPUS and return its path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_writer=model, num_threads=1, minloglevel=2,
        **options)
    path = tmp_path / f"{name}.model"
    path.write_bytes(model.getvalue())
    return path


# Llama / Mistral settings: BPE, byte fallback, no character normalisation, whitespace kept,
# whitespace-only pieces ("▁▁" etc., scored -1e9 by SentencePiece), digits split.
LLAMA_OPTIONS = dict(
    model_type="bpe", vocab_size=420, byte_fallback=True, character_coverage=1.0,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, sentencepiece processor, our tokenizer) for a tiny Llama-style model."""
    path = train(tmp_path_factory.mktemp("spm"), "tiny", user_defined_symbols=["<sep>"], **LLAMA_OPTIONS)
    return path, spm.SentencePieceProcessor(model_file=str(path)), convert_sentencepiece(path)


@pytest.fixture(scope="module")
def mistral():
    """(path, sentencepiece processor, our tokenizer) for the real LLaVA-Med v1.5 tokenizer.model."""
    path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    assert path.is_file() and path.stat().st_size == 493_443, path
    return path, spm.SentencePieceProcessor(model_file=str(path)), convert_sentencepiece(path)


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def transformers_llama_converter(path):
    """transformers' own SentencePiece -> tokenizers conversion for Llama (LlamaConverter).

    In transformers 5.x, SpmConverter.tokenizer still calls the extractor with the 4.x signature
    `extract(vocab_scores) -> (vocab, merges)` that SentencePieceExtractor no longer has; this
    shim restores it with transformers' own `generate_merges` (merges ranked by score).
    """
    from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    class Extractor(SentencePieceExtractor):
        def extract(self, vocab_scores):
            vocab = {p.piece: i for i, p in enumerate(self.proto.pieces)}
            return vocab, generate_merges(vocab, vocab_scores)

    class Converter(LlamaConverter):
        SpmExtractor = Extractor

    class SlowTokenizer:  # the attributes LlamaConverter reads from a slow LlamaTokenizer
        vocab_file = str(path)
        legacy = True  # LLaVA-Med's slow tokenizer: SentencePiece applied to each stretch of text
        add_prefix_space = True

        def convert_ids_to_tokens(self, i):
            return ["<unk>", "<s>", "</s>"][i]

    tokenizer = Converter(SlowTokenizer()).converted()
    # The converter registers control pieces only; the tokenizer class then adds its unk_token
    # as a special token, so every Llama tokenizer.json lists <unk> (id 0) among added tokens.
    tokenizer.add_special_tokens([AddedToken("<unk>", normalized=False, special=True)])
    return tokenizer


# ----------------------------------------------------------------------------------------------
# (a) the converter on a tiny model trained here


def test_reader_matches_sentencepiece(tiny):
    path, sp, _ = tiny
    model = read_sentencepiece(path)
    assert len(model.pieces) == sp.get_piece_size() > 300
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert model.scores == [sp.get_score(i) for i in range(sp.get_piece_size())]
    byte_ids = [i for i in range(len(model.pieces)) if sp.is_byte(i)]
    assert [i for i, t in enumerate(model.types) if t == 6] == byte_ids and len(byte_ids) == 256
    assert [i for i, t in enumerate(model.types) if t == 3] == [1, 2]  # <s>, </s>
    assert model.types[model.pieces.index("<sep>")] == 4  # user defined
    assert (model.model_type, model.byte_fallback, model.unk_id, model.add_dummy_prefix,
            model.remove_extra_whitespaces, model.precompiled_charsmap) == (2, True, 0, True, False, b"")


def test_tiny_matches_sentencepiece(tiny):
    """Ids and decoded text equal sentencepiece's, including whitespace runs and byte fallback."""
    _, sp, tok = tiny
    texts = TEXTS + random_texts(500)
    assert any(sp.is_byte(i) for t in texts for i in sp.encode(t))  # byte fallback exercised
    used = {sp.id_to_piece(i) for t in texts for i in sp.encode(t)}
    assert any(len(piece) > 1 and set(piece) == {"▁"} for piece in used)  # whitespace-run pieces
    for text in texts:
        expected = sp.encode(text)
        assert ids(tok, text) == expected, text
        assert tok.decode(expected) == sp.decode(expected), text


def test_tiny_matches_transformers_converter(tiny):
    """Same model (vocab, merges in order), normalizer and decoder as transformers' LlamaConverter,
    hence the same ids, also around special and user-defined tokens."""
    path, _, tok = tiny
    reference = transformers_llama_converter(path)
    ours, theirs = json.loads(tok.to_str()), json.loads(reference.to_str())
    assert ours["model"] == theirs["model"]
    assert len(ours["model"]["merges"]) > 50
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[key] == theirs[key], key
    extra = ["a<sep>b", "</s>[INST] next turn", "<s>x</s>", "<unk> y"]
    for text in TEXTS + extra + random_texts(300, seed=1):
        expected = ids(reference, text)
        assert ids(tok, text) == expected, text
        assert tok.decode(expected) == reference.decode(expected), text
        skipped = reference.decode(expected, skip_special_tokens=True)
        assert tok.decode(expected, skip_special_tokens=True) == skipped, text


def test_no_dummy_prefix(tmp_path):
    """add_dummy_prefix=false: no "▁" prepended, no leading space stripped on decode."""
    path = train(tmp_path, "noprefix", add_dummy_prefix=False, **LLAMA_OPTIONS)
    sp, tok = spm.SentencePieceProcessor(model_file=str(path)), convert_sentencepiece(path)
    for text in TEXTS + random_texts(200, seed=2):
        expected = sp.encode(text)
        assert ids(tok, text) == expected, text
        assert tok.decode(expected) == sp.decode(expected), text


# ----------------------------------------------------------------------------------------------
# (b) the real LLaVA-Med v1.5 (Mistral) tokenizer


def test_mistral_matches_sentencepiece(mistral):
    _, sp, tok = mistral
    assert tok.get_vocab_size() == 32000
    for text in TEXTS + random_texts(500, seed=3):
        expected = sp.encode(text)
        assert ids(tok, text) == expected, text
        assert tok.decode(expected) == sp.decode(expected), text


def test_llava_med_prompt_ids(mistral):
    """The ids measured with sentencepiece in docs/FORMATS.md (Prompt, chunk-wise tokenization)."""
    _, _, tok = mistral
    assert ids(tok, "[INST] ") == [733, 16289, 28793, 28705]
    assert tok.encode("[INST] ").ids == [1, 733, 16289, 28793, 28705]  # post-processor adds BOS
    prompt = build_prompt("What is shown in the image?")
    assert prompt == "[INST] <image>\nWhat is shown in the image? [/INST]"
    got = tokenize_prompt(tok, prompt, image_token_id=-200, num_image_tokens=576)
    assert got == [1, 733, 16289, 28793, 28705] + [-200] * 576 + [
        28705, 13, 3195, 349, 4894, 297, 272, 3469, 28804, 733, 28748, 16289, 28793]


def test_build_prompt_moves_image_first():
    assert build_prompt("  <image>\nIs this normal? ") == "[INST] <image>\nIs this normal? [/INST]"
    assert build_prompt("Is this normal?\n<image>") == "[INST] <image>\nIs this normal? [/INST]"


def test_chunked_prompt_edge_cases(mistral):
    """LLaVA's rule on other shapes: image first (empty first chunk), two images, no image."""
    _, sp, tok = mistral
    got = tokenize_prompt(tok, "<image>\nHi", image_token_id=-200, num_image_tokens=2)
    assert got == [1, -200, -200] + sp.encode("\nHi")
    got = tokenize_prompt(tok, "a <image> b <image>", image_token_id=-200, num_image_tokens=1)
    assert got == [1] + sp.encode("a ") + [-200] + sp.encode(" b ") + [-200]
    got = tokenize_prompt(tok, "no image", image_token_id=-200, num_image_tokens=3)
    assert got == [1] + sp.encode("no image")
    got = tokenize_prompt(tok, "x", image_token_id=-200, num_image_tokens=3, bos_token_id=None)
    assert got == sp.encode("x")


@pytest.mark.parametrize("answer", ["Yes.", "The image shows a chest X-ray.", "  two spaces",
                                    "ends with space ", "12 mm\nsecond line", "肺炎 🫁"])
def test_response_follows_inst(mistral, answer):
    """A response's ids are those that follow "[/INST]" when prompt and answer are encoded as one
    string joined by a space (LLaVA's training format), then EOS."""
    _, sp, tok = mistral
    prompt = "[INST] Q? [/INST]"
    response = tokenize_response(tok, answer)
    assert response[-1] == 2
    assert sp.encode(prompt) + response[:-1] == sp.encode(prompt + " " + answer)
    assert decode(tok, response) == answer.strip()


def test_decode_stops_at_eos_and_skips_special(mistral):
    _, sp, tok = mistral
    body = sp.encode("The answer is yes.")
    assert decode(tok, [1] + body + [2] + sp.encode("junk")) == "The answer is yes."
    assert decode(tok, body + [0]) == "The answer is yes."  # <unk> is special too
    assert decode(tok, [2, 5, 6]) == ""
    assert decode(tok, body + [2], eos_token_id=None) == "The answer is yes."


def test_load_tokenizer_and_cli(mistral, tmp_path, capsys):
    """A directory with only tokenizer.model is converted; the CLI's tokenizer.json reloads equal."""
    path, sp, _ = mistral
    shutil.copy(path, tmp_path / "tokenizer.model")
    text = "What is shown in the image?  Two  spaces 🤖"
    assert ids(load_tokenizer(tmp_path), text) == sp.encode(text)
    out = tmp_path / "out" / "tokenizer.json"
    out.parent.mkdir()
    main(["convert", str(tmp_path / "tokenizer.model"), str(out)])
    assert "32000 tokens" in capsys.readouterr().out
    assert ids(load_tokenizer(out), text) == sp.encode(text)
    assert ids(load_tokenizer(out.parent), text) == sp.encode(text)
    assert ids(load_tokenizer(tmp_path / "tokenizer.model"), text) == sp.encode(text)


def test_a_converted_tokenizer_json_is_the_same_tokenizer(mistral, tiny, tmp_path):
    """What the fingerprints hash is what a tokenizer does, not its file: tokenizer.model, the
    tokenizer.json `convert` writes from it, and that file with its merges in the older "a b" string
    form all have one canonical form and digest (so hscr.py, train.py and eval.py resume across the
    conversion); another tokenizer has another."""
    path = tmp_path / "tokenizer.model"
    shutil.copy(mistral[0], path)
    main(["convert", str(path), str(tmp_path / "tokenizer.json")])
    old = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    old["model"]["merges"] = [" ".join(pair) for pair in old["model"]["merges"]]
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    assert (tmp_path / "old.json").read_bytes() != (tmp_path / "tokenizer.json").read_bytes()

    def digest(tokenizer_path):
        part = provenance.Content(canonical_form(load_tokenizer(tokenizer_path)))
        return provenance.fingerprint(tokenizer=part)["tokenizer"]

    same = [digest(p) for p in (path, tmp_path / "tokenizer.json", tmp_path / "old.json")]
    assert same[0] == same[1] == same[2] and digest(tiny[0]) != same[0]


# ----------------------------------------------------------------------------------------------
# (c) the llava-hf convention: "<image>" is a real (added) token


def whole_prompt_ids(tokenizer, prompt, image_token_id, num_image_tokens):
    """llava-hf's convention: BOS, the whole prompt encoded at once with "<image>" a real token,
    then each image token repeated `num_image_tokens` times."""
    ids = [1]
    for token in tokenizer.encode(prompt, add_special_tokens=False).ids:
        ids += [token] * (num_image_tokens if token == image_token_id else 1)
    return ids


def test_llava_hf_image_token(mistral):
    """Chunk-wise tokenization gives a llava-hf tokenizer the ids of its own convention."""
    _, sp, tok = mistral
    tok = Tokenizer.from_str(tok.to_str())  # a copy: the fixture is shared
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                            AddedToken("<pad>", normalized=False, special=True)])
    assert (tok.token_to_id("<image>"), tok.token_to_id("<pad>")) == (32000, 32001)
    prompt = build_prompt("What is shown in the image?")
    got = whole_prompt_ids(tok, prompt, 32000, 4)
    # The normalizer gives the text after the added token its own "▁", like LLaVA's chunks.
    text_after = sp.encode("\nWhat is shown in the image? [/INST]")
    assert got == [1] + sp.encode("[INST] ") + [32000] * 4 + text_after
    assert got == tokenize_prompt(tok, prompt, image_token_id=32000, num_image_tokens=4)
    assert decode(tok, got) == "[INST]  \nWhat is shown in the image? [/INST]"  # image tokens are skipped


# ----------------------------------------------------------------------------------------------
# (d) errors


def test_errors_no_image_tokens(mistral):
    _, _, tok = mistral
    with pytest.raises(ValueError, match="num_image_tokens must be >= 1"):
        tokenize_prompt(tok, "x", image_token_id=-200, num_image_tokens=0)


def test_errors_prompt_and_decode(mistral):
    _, _, tok = mistral
    with pytest.raises(ValueError, match="unknown template 'vicuna'.*mistral_instruct"):
        build_prompt("Q", template="vicuna")
    with pytest.raises(ValueError, match=r"negative ids \[-200\]"):
        decode(tok, [733, -200])


def test_errors_missing_files(tmp_path):
    with pytest.raises(UserError, match="tokenizer .*nowhere: not found"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"{tmp_path}: no tokenizer.json or tokenizer.model in it"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found: .*missing.model"):
        convert_sentencepiece(tmp_path / "missing.model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer file .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_errors_corrupt_model(mistral, tmp_path):
    path, _, _ = mistral
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(path.read_bytes()[:1001])
    with pytest.raises(ValueError, match="truncated.model is not a valid SentencePiece model"):
        convert_sentencepiece(truncated)
    text = tmp_path / "tokenizer.model"
    text.write_text('{"version": "1.0"}')  # a tokenizer.json under the wrong name
    with pytest.raises(ValueError, match="tokenizer.model is not a valid SentencePiece model"):
        convert_sentencepiece(text)


def test_errors_unsupported_model(tmp_path):
    """A default SentencePiece model (unigram, NFKC, collapsed spaces, no byte fallback): every
    problem is listed in one error."""
    path = train(tmp_path, "unigram", vocab_size=200, hard_vocab_limit=False)
    with pytest.raises(ValueError) as error:
        convert_sentencepiece(path)
    message = str(error.value)
    assert message.startswith(f"unsupported SentencePiece model {path}:")
    for problem in ["model_type is UNIGRAM", "byte_fallback is off", "normalizer 'nmt_nfkc' rewrites",
                    "remove_extra_whitespaces is on"]:
        assert problem in message


def test_word_classes_group_spellings_of_one_word():
    """Pieces of one word share a class whatever their word-start mark, case or surrounding
    punctuation; pieces without a letter or digit each keep their own (their id), as does a
    missing piece. Hand classes: ids 0, 1, 2 = "no"; 3 "." alone; 4 "▁" alone; 5, 7, 8 = "left";
    6 missing; 9 "lef" is another word."""
    pieces = ["▁No", "no", "▁no.", ".", "▁", "▁left", None, "left,", "Ġleft", "▁lef"]
    cls = word_classes(pieces)
    assert cls[0] == cls[1] == cls[2] and cls[5] == cls[7] == cls[8]
    assert len({cls[0], cls[3], cls[4], cls[5], cls[6], cls[9]}) == 6
    assert (cls[3], cls[4], cls[6]) == (3, 4, 6)
