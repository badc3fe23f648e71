"""LLaVA-Med in one file: CLIP ViT → MLP projector → LLaMA/Mistral decoder, in pure PyTorch.

    pixels (B, 3, 336, 336)
      └─ CLIP ViT-L/14            patch conv (no bias) + [CLS] + learned positions, pre_layrnorm,
         (VisionTower)            24 pre-LN blocks with quick_gelu; the hidden state of layer
                                  `select_layer` (−2 = output of block 23 of 24) without [CLS]
      └─ projector                mlp2x_gelu: Linear(1024→4096) · GELU(erf) · Linear(4096→4096)
         (Projector)              or `linear`: one Linear (LLaVA-Med v1)
      └─ N = 576 visual tokens    written into the N placeholder positions of the text embedding
                                  (input_ids == config.image_token_id) by one masked assignment
      └─ decoder                  LLaMA / Mistral: RMSNorm (fp32), rotate-half RoPE (θ = 1e6 for
         (language_model)         Mistral-v0.2), GQA, SwiGLU MLP, optional sliding window
      └─ lm_head                  logits, optionally only at chosen positions

Sources of the facts reproduced here (the code is ours): LLaVA / LLaVA-Med (projector, feature layer,
image placement), OpenAI CLIP and HF's CLIPVisionModel (quick_gelu, `pre_layrnorm`, hidden-state list),
Meta's LLaMA and Mistral-7B (RMSNorm, RoPE, GQA, sliding window), gpt-fast (preallocated KV cache,
prefill / decode_one_token / generate). Parameter names follow llava-hf's, without its `model.` prefix.

Shape letters: B batch, T query length, S key/cache length, D model width, H heads, Hkv key/value
heads, Dh head width, N image tokens, P chosen logit positions, V vocabulary.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


# Configs
@dataclass
class VisionConfig:
    """CLIP vision transformer. Defaults: ViT-L/14 at 336 px (LLaVA-Med v1.5's tower)."""
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    n_layers: int = 24
    n_heads: int = 16
    layer_norm_eps: float = 1e-5
    num_channels: int = 3


@dataclass
class TextConfig:
    """LLaMA / Mistral decoder. Defaults: Mistral-7B-v0.2 as used by LLaVA-Med v1.5."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None → hidden_size // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None  # Mistral-v0.1 used 4096; v0.2 / LLaVA-Med v1.5 use none
    max_seq_len: int = 4096  # upper bound for the KV cache, not a property of the weights
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads


@dataclass
class LlavaConfig:
    """The whole model's shape; model/loading.py validates configs read from config.json, not ones in code."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # or "linear"
    projector_bias: bool = True
    select_layer: int = -2  # index into the hidden-state list (0 = embeddings after pre_layrnorm)
    select_feature: str = "patch"  # "patch" drops [CLS]; "cls_patch" keeps it
    # LLaVA marks image positions with -200 (outside the vocabulary); llava-hf checkpoints have a
    # real `<image>` token (32000). Either way those ids are never looked up in the embedding.
    image_token_id: int = -200

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2 + (self.select_feature == "cls_patch")

    @property
    def vision_layers_used(self) -> int:
        """Blocks that must run to produce hidden state `select_layer` (the rest are never read)."""
        return self.select_layer % (self.vision.n_layers + 1)


PRESETS: dict[str, LlavaConfig] = {
    # microsoft/llava-med-v1.5-mistral-7b (docs/FORMATS.md, "The LLaVA-Med config").
    "llava-med-v1.5-mistral-7b": LlavaConfig(),
    # A small model of the same architecture for tests and the embedded default.
    "tiny": LlavaConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, n_layers=4,
                            n_heads=4),
        text=TextConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, n_layers=4, n_heads=8,
                        n_kv_heads=4, rope_theta=1e4, max_seq_len=512), image_token_id=3),
}


def preset(name: str, **overrides) -> LlavaConfig:
    return replace(PRESETS[name], **overrides)  # callers offer only these names (argparse choices)


# Vision tower: CLIP ViT
class CLIPEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1+N, D)


class CLIPAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        projections = (self.q_proj, self.k_proj, self.v_proj)  # → q, k, v (B, H, T, Dh)
        q, k, v = (p(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for p in projections)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh), bidirectional
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, T, D)


class CLIPMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as OpenAI trained CLIP


class CLIPLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """CLIP ViT → hidden state `select_layer` of [embeddings, block 1, …, block L]. All blocks and
    `post_layernorm` exist for strict loading; only the first `vision_layers_used` run (all LLaVA reads)."""
    def __init__(self, c: LlavaConfig):
        super().__init__()
        self.n_used, self.keep_cls, v = c.vision_layers_used, c.select_feature == "cls_patch", c.vision
        self.embeddings = CLIPEmbeddings(v)
        self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # sic, CLIP's name
        # A container (as nanoGPT's `transformer`), so that parameter names follow the checkpoint.
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(v) for _ in range(v.n_layers))))
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # unused

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))  # hidden state 0, (B, 1+N, D)
        for layer in self.encoder.layers[: self.n_used]:
            x = layer(x)
        return x if self.keep_cls else x[:, 1:]  # (B, N, D)


class Projector(nn.Module):
    def __init__(self, c: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(c.vision.hidden_size, c.text.hidden_size, bias=c.projector_bias)
        self.linear_2 = (nn.Linear(c.text.hidden_size, c.text.hidden_size, bias=c.projector_bias)
                         if c.projector_type == "mlp2x_gelu" else None)

    def forward(self, x):
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))  # exact erf GELU, not tanh


# Decoder: LLaMA / Mistral
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16/fp16 variance underflows), cast back, then scale: LLaMA's order.
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, Dh) for integer positions (B, T); inv_freq_i = θ^(−2i/Dh)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, Dh/2), fp32 so long positions stay exact
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, Dh): rotate-half layout pairs i with i + Dh/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, H, T, Dh); HF-converted LLaMA weights are permuted so that rotate-half is the right form.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]  # rotate-half


class KVCache(nn.Module):
    """Preallocated keys/values (B, Hkv, S_max, Dh); slot s of every row holds sequence step s."""
    def __init__(self, batch: int, max_len: int, c: TextConfig, dtype, device):
        super().__init__()
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor):
        # slots (T,), k/v (B, Hkv, T, Dh) → the whole cache (B, Hkv, S_max, Dh)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, slots=None):
        """`mask`: boolean (B, 1, T, S), or None (causal over S = T keys); with a cache, its first S slots."""
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)  # → q (B, H, T, Dh); k, v (B, Hkv, T, Dh)
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in projections)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:  # write the T new keys/values, attend to the first S slots
            S = mask.shape[-1] if mask is not None else T
            k, v = (kv[:, :, :S] for kv in self.kv_cache.update(slots, k, v))  # (B, Hkv, S, Dh)
        # GQA: SDPA repeats each key/value head over its n_heads / n_kv_heads query heads.
        # Without a mask SDPA can take its fused causal path (no (B, 1, T, S) tensor to read).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=k.shape[1] != q.shape[1])  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(key_valid: Tensor, q_slots: Tensor, window: int | None) -> Tensor:
    """Boolean SDPA mask (B, 1, T, S): key slot k is visible from query slot q iff the key is a real
    token, k ≤ q (causal) and q − k < window (Mistral's sliding window, if any). A query that sees
    nothing (left padding) sees itself, so that SDPA gives finite values there (nothing reads them)."""
    k_slots = torch.arange(key_valid.shape[1], device=key_valid.device)  # (S,)
    visible = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    if window is not None:
        visible = visible & (q_slots[:, None] - k_slots[None, :] < window)
    mask = visible[None] & key_valid[:, None, :]  # (B, T, S)
    mask = mask | (k_slots[None, None, :] == q_slots[None, :, None]) & ~mask.any(-1, keepdim=True)
    return mask[:, None]  # (B, 1, T, S)


# The model
class Llava(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.multi_modal_projector = Projector(config)
        t = config.text  # the decoder, a container as VisionTower.encoder
        self.language_model = nn.ModuleDict(dict(embed_tokens=nn.Embedding(t.vocab_size, t.hidden_size),
                                                 layers=nn.ModuleList(Block(t) for _ in range(t.n_layers)),
                                                 norm=RMSNorm(t.hidden_size, t.rms_norm_eps)))
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self._cache_len: int | None = None  # slots of the KV cache, while there is one
        self.apply(self._init_weights)  # a no-op cost on the meta device, where loading builds

    @staticmethod
    def _init_weights(m: nn.Module, std: float = 0.02):
        """Random init for models trained from scratch (the embedded default's base model)."""
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, CLIPEmbeddings):
            nn.init.normal_(m.class_embedding, std=std)
            # A patch embedding sums 3·p² pixels (~15x a position embedding of the same std), and a
            # from-scratch ViT then takes hundreds of steps to tell left from right: scale positions up.
            nn.init.normal_(m.position_embedding.weight, std=0.3)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) pixels → (B, N, D) visual tokens in the decoder's embedding space."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids, pixel_values=None, image_features=None) -> Tensor:
        """Token embeddings, visual tokens in the image placeholders. `image_features` (pre-computed, e.g.
        after visual-token dropout), (B_img, N, D) or (M, D), fill them in reading order, one each."""
        is_image = input_ids == self.config.image_token_id  # (B, T)
        # Placeholder ids may lie outside the vocabulary (-200): look up id 0 there, then overwrite.
        x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return x
        if image_features is None:
            if pixel_values is None:
                raise ValueError(f"input_ids' {n_slots} image positions need pixel_values or image_features")
            image_features = self.encode_images(pixel_values)
        feats = image_features.reshape(-1, x.shape[-1])  # (M, D)
        if feats.shape[0] != n_slots:
            raise ValueError(f"input_ids hold {n_slots} image positions but {feats.shape[0]} visual tokens "
                             f"were given ({self.config.num_image_tokens} per image)")
        x[is_image] = feats.to(x.dtype)  # the one masked assignment
        return x

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, *, image_features: Tensor | None = None,
                logits_positions: Tensor | None = None, position_ids: Tensor | None = None,
                return_hidden: bool = False) -> Tensor:
        """Logits (B, T, V) float32, or (B, P, V) at `logits_positions` (B, P) only; with `return_hidden`
        the final-norm hidden states (B, T, D) instead, for callers that log-softmax in chunks.
        `attention_mask` (B, T): 1 on real tokens, padding on either side, `position_ids` defaulting to
        their running count. Or (B, T, T): which key each query sees (answers packed after one prompt,
        rows.collate), with `position_ids` given (the sliding window applies to them) and no KV cache."""
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        x = self.embed(input_ids, pixel_values, image_features)
        if attention_mask.dim() == 3:  # packed rows
            if (window := self.config.text.sliding_window) is not None:  # counted in positions
                distance = position_ids[:, :, None] - position_ids[:, None, :]  # (B, T, T)
                attention_mask = attention_mask & (distance < window)
            h = self._layers(x, position_ids, attention_mask[:, None])
        else:
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if self._cache_len is not None:  # prefill: the slots after the prompt take new tokens
                self._key_valid = F.pad(attention_mask, (0, self._cache_len - input_ids.shape[1]), value=True)
            h = self._run_decoder(x, position_ids, attention_mask)
        if logits_positions is not None:
            h = h.gather(1, logits_positions[..., None].expand(-1, -1, h.shape[-1]))  # (B, P, D)
        return h if return_hidden else self.lm_head(h).float()

    def _run_decoder(self, x, position_ids, key_valid, start: int = 0):
        """Decoder over T queries in cache slots [start, S = start + T), seeing the real keys in [0, S)."""
        window, S = self.config.text.sliding_window, start + x.shape[1]
        slots = torch.arange(start, S, device=x.device)
        if start == 0 and (window is None or S <= window) and key_valid[:, :S].all():
            mask = None  # plain causal attention from slot 0: SDPA's fused path
        else:
            mask = attention_mask_4d(key_valid[:, :S], slots, window)
        return self._layers(x, position_ids, mask, slots if self._cache_len is not None else None)

    def _layers(self, x, position_ids, mask, slots=None):
        cos, sin = rope_cos_sin(position_ids, self.config.text.head_dim, self.config.text.rope_theta, x.dtype)
        for layer in self.language_model.layers:
            x = layer(x, cos, sin, mask, slots)
        return self.language_model.norm(x)

    # KV cache and generation
    def setup_cache(self, batch: int, max_len: int):
        c = self.config.text
        if max_len > c.max_seq_len:
            raise ValueError(f"{max_len} steps exceed TextConfig.max_seq_len={c.max_seq_len}; raise it")
        for layer in self.language_model.layers:
            layer.self_attn.kv_cache = KVCache(batch, max_len, c, self.dtype, self.device)
        self._cache_len = max_len

    def clear_cache(self):
        for layer in self.language_model.layers:
            layer.self_attn.kv_cache = None
        self._cache_len = None

    def decode_one_token(self, token: Tensor, position: Tensor, slot: Tensor, keys: int | None = None):
        """One step: token (B,) at per-row position (B,) into cache slot `slot` (1,) → logits (B, V).
        Attention reads cache slots [0, keys): slot + 1 eagerly; all (None) under torch.compile, the causal
        mask hiding unwritten ones, so that shapes never change: why the slot is a tensor too (gpt-fast)."""
        x = self.language_model.embed_tokens(token[:, None])  # (B, 1, D)
        mask = attention_mask_4d(self._key_valid[:, :keys], slot, self.config.text.sliding_window)
        return self.lm_head(self._layers(x, position[:, None], mask, slot)[:, -1]).float()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                 attention_mask: Tensor | None = None, max_new_tokens: int = 64,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 image_features: Tensor | None = None, compile: bool = False) -> Tensor:
        """Greedy new token ids (B, T_new) for left-padded prompts, the only decoding HSCR and LLaVA-Med's
        evaluation use; a row stops at its first EOS, then `pad_token_id` (default: the config's pad id,
        else EOS). `compile`: the decode step runs under torch.compile (same tokens up to rounding)."""
        B, T = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if T > 0 and not attention_mask[:, -1].all():
            raise ValueError("generate() needs left-padded prompts: every row must end in a real token")
        self.setup_cache(B, T + max_new_tokens)
        try:  # (forward's default position ids: the running count, as in the decode steps)
            logits = self(input_ids, pixel_values, attention_mask, image_features=image_features,
                          logits_positions=torch.full((B, 1), T - 1, device=input_ids.device))[:, -1]
            position = attention_mask.long().sum(-1) - 1  # (B,) the last prompt token's
            return self._decode_loop(logits, position, T, max_new_tokens, eos_token_id, pad_token_id, compile)
        finally:
            self.clear_cache()

    @torch.no_grad()
    def generate_shared(self, prefix_ids: Tensor, prefix_mask: Tensor, rows: Tensor, suffix_ids: Tensor,
                        suffix_mask: Tensor, *, image_features: Tensor | None = None,
                        max_new_tokens: int = 64, eos_token_id: int | None = None,
                        pad_token_id: int | None = None, compile: bool = False) -> Tensor:
        """generate() for B rows whose input is prefix[rows[b]] + suffix[b], the E prefixes (a prompt with its
        image) prefilled once: generate()'s new token ids (B, T_new) up to rounding. rows (B,): each row's
        prefix; prefix_ids / prefix_mask (E, Tp) and suffix_ids / suffix_mask (B, Ts) left-padded, image
        placeholders in the prefixes only, ≥ 1 real token per suffix (the last predicts the first new one)."""
        # Cache slots [0, Tp) hold the prefixes, [Tp, Tp + Ts) the suffixes, then the new tokens. A short
        # suffix leaves padding slots after its prefix, which the key mask hides and the positions skip.
        # Mistral's sliding window counts slots: a model with one refuses rows that could span more.
        c = self.config.text
        (E, Tp), (B, Ts) = prefix_ids.shape, suffix_ids.shape
        suffix_mask, prefix_mask = suffix_mask.bool(), prefix_mask.bool()
        if Ts == 0 or not suffix_mask[:, -1].all():
            raise ValueError("generate_shared() needs left-padded suffixes, at least one real token per row")
        if ((suffix_ids == self.config.image_token_id) & suffix_mask).any():
            raise ValueError("generate_shared(): image placeholders belong in the prefixes, not the suffixes")
        if c.sliding_window is not None and Tp + Ts + max_new_tokens > c.sliding_window:
            raise ValueError(f"generate_shared(): rows of up to {Tp + Ts + max_new_tokens} slots exceed the "
                             f"sliding window {c.sliding_window}, which counts slots; use generate()")
        rows = rows.to(prefix_ids.device)
        try:
            # 1. The E prefixes, once; their caches, keys/values (E, Hkv, Tp, Dh) per layer.
            prefix_kv = []
            if Tp > 0:
                self.setup_cache(E, Tp)
                self(prefix_ids, attention_mask=prefix_mask, image_features=image_features,
                     return_hidden=True)  # position ids: forward's default, the running count
                prefix_kv = [layer.self_attn.kv_cache for layer in self.language_model.layers]
                self.clear_cache()  # the caches live on in prefix_kv
            # 2. Each row's cache starts as a copy of its prefix's.
            self.setup_cache(B, Tp + Ts + max_new_tokens)
            for layer, prefix in zip(self.language_model.layers, prefix_kv):
                layer.self_attn.kv_cache.k[:, :, :Tp] = prefix.k[rows]
                layer.self_attn.kv_cache.v[:, :, :Tp] = prefix.v[rows]
            del prefix_kv
            # Real keys: the prefix's, the suffix's, every new token's (hidden by causality until written).
            new_tokens = suffix_mask.new_ones(B, max_new_tokens)
            self._key_valid = torch.cat([prefix_mask[rows], suffix_mask, new_tokens], 1)  # (B, Tp+Ts+T_new)
            # 3. The suffixes, positioned after their prefix's real tokens.
            positions = prefix_mask.long().sum(-1)[rows, None] + suffix_mask.long().cumsum(-1) - 1  # (B, Ts)
            x = self.language_model.embed_tokens(suffix_ids)  # (B, Ts, D)
            h = self._run_decoder(x, positions, self._key_valid, Tp)  # (B, Ts, D)
            return self._decode_loop(self.lm_head(h[:, -1]).float(), positions[:, -1], Tp + Ts,
                                     max_new_tokens, eos_token_id, pad_token_id, compile)
        finally:
            self.clear_cache()

    def _decode_loop(self, logits, position, slot: int, max_new_tokens: int, eos: int | None, pad: int | None,
                     compile: bool) -> Tensor:
        """The argmax of `logits` (B, V), then greedy steps into cache slots `slot`, slot + 1, … at per-row
        positions `position` + 1, …; eos/pad as generate(). Once half the rows are done, those leave the
        batch (same tokens up to rounding). One host sync per step, none if EOS is outside the vocabulary."""
        c = self.config.text
        eos = c.eos_token_id if eos is None else eos
        pad = next(p for p in (pad, c.pad_token_id, eos) if p is not None)
        rows = torch.arange(len(logits), device=logits.device)  # the output row of each cache row
        out = torch.full((len(rows), max_new_tokens), pad, dtype=torch.long, device=rows.device)
        done = torch.zeros_like(rows, dtype=torch.bool)
        slots = torch.arange(slot, slot + max_new_tokens, device=rows.device)  # (T_new,)

        def greedy_step(token, position, slot, keys):
            return self.decode_one_token(token, position, slot, keys).argmax(-1)
        if compile:  # as gpt-fast: CUDA graphs on a GPU; new shapes (rows leaving) compile once more
            greedy_step = torch.compile(greedy_step, fullgraph=True, mode="reduce-overhead")
        token = logits.argmax(-1)  # (B,)
        for step in range(max_new_tokens):
            token = token.masked_fill(done, pad)
            out[rows, step] = token
            done |= token == eos
            if step == max_new_tokens - 1:
                break
            if 0 <= eos < c.vocab_size:
                n_done = int(done.sum())  # the step's one host sync
                if n_done == len(done):
                    return out[:, :step + 1]
                if 2 * n_done >= len(done):  # half are done: the unfinished rows, in order, go on alone
                    live = torch.sort(done.to(torch.uint8), stable=True).indices[:len(done) - n_done]
                    rows, token, position, done = self._keep_rows(live, rows, token, position, done)
            position = position + 1
            token = greedy_step(token, position, slots[step:step + 1], None if compile else slot + step + 1)
        return out

    def _keep_rows(self, live: Tensor, *state: Tensor) -> list[Tensor]:
        """Shrink the KV cache (and its key mask) to rows `live`, in that order; those rows of `state`."""
        for layer in self.language_model.layers:
            cache = layer.self_attn.kv_cache
            cache.k, cache.v = cache.k[live], cache.v[live]
        self._key_valid = self._key_valid[live]
        return [t[live] for t in state]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """ids (R, T) and attention mask (R, T) of `rows` left-padded to the longest, as generate() expects."""
    T = max((len(r) for r in rows), default=0)
    ids = [[pad_id] * (T - len(r)) + list(r) for r in rows]
    mask = [[0] * (T - len(r)) + [1] * len(r) for r in rows]
    return tuple(torch.tensor(x, dtype=torch.long, device=device).view(len(rows), T) for x in (ids, mask))


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[y] at each position, in the logits' dtype: (..., V), (...) → (...)."""
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


def enable_gradient_checkpointing(model: Llava) -> None:
    """Recompute each decoder layer in the backward pass; its forward is wrapped, so parameter names stay."""
    for layer in model.language_model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
