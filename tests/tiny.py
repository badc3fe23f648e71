"""Tiny random transformers Llava checkpoints, written to disk in each layout `load_model` reads.

transformers is the reference: the tests build its `LlavaForConditionalGeneration` with random
weights, save it (with transformers' own save_pretrained, or key by key in the other layouts),
and check that our loader + model compute the same function (`assert_same_logits`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

IMAGE_TOKEN = 120  # a real token id in llava-hf checkpoints (vocab 128 here)
IMAGE_SIZE, PATCH = 28, 7  # 4×4 = 16 patches


def hf_tiny_llava(text: str = "llama", strategy: str = "default", feature_layer: int = -2, seed: int = 0,
                  sliding_window: int | None = None):
    """A random transformers Llava: CLIP (3 layers) → 2-layer GELU MLP → Llama/Mistral (GQA 4:2)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if text == "llama":
        tc = LlamaConfig(**common, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    else:
        tc = MistralConfig(**common, sliding_window=sliding_window,
                           rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    cfg = LlavaConfig(vision_config=vision, text_config=tc, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Random init leaves RMSNorm weights at 1 and biases at 0: perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("class_embedding"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_key_parts(key: str) -> tuple[str, str]:
    """Split an in-memory transformers 5 key into (component, rest)."""
    for prefix, part in (("model.language_model.", "lm"), ("model.vision_tower.", "vt"),
                         ("model.multi_modal_projector.", "proj"), ("lm_head.", "head")):
        if key.startswith(prefix):
            return part, key[len(prefix):]
    raise KeyError(key)


LAYOUT_PREFIXES = {
    # component → prefix on disk
    "llava-hf": {"lm": "model.language_model.", "vt": "model.vision_tower.", "proj": "model.multi_modal_projector.",
                 "head": "lm_head."},
    "llava-hf-legacy": {"lm": "language_model.model.", "vt": "vision_tower.", "proj": "multi_modal_projector.",
                        "head": "language_model.lm_head."},
    "llava-hf-legacy4": {"lm": "language_model.model.", "vt": "vision_tower.vision_model.",
                         "proj": "multi_modal_projector.", "head": "language_model.lm_head."},
    "llava-med": {"lm": "model.", "vt": "model.vision_tower.vision_tower.vision_model.", "proj": "model.mm_projector.",
                  "head": "lm_head."},
}


def save_layout(hf_model, out: Path, layout: str, *, shards: int = 1) -> Path:
    """Write `hf_model` as config.json + safetensors in `layout`, optionally sharded with an index."""
    out.mkdir(parents=True, exist_ok=True)
    prefixes = LAYOUT_PREFIXES[layout]
    tensors = {}
    for key, t in hf_model.state_dict().items():
        part, rest = _hf_key_parts(key)
        if layout == "llava-med" and part == "proj":
            rest = rest.replace("linear_1.", "0.").replace("linear_2.", "2.")
        tensors[prefixes[part] + rest] = t.contiguous()
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = hf_model.config.to_dict()
    if layout == "llava-med":
        cfg = llava_med_config(hf_model)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return out


def llava_med_config(hf_model) -> dict:
    """A LLaVA-Med-style config.json (flat text fields + mm_*) for the tiny model."""
    t = hf_model.config.text_config
    return {
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"], "sliding_window": getattr(t, "sliding_window", None),
        "max_position_embeddings": t.max_position_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "mm_vision_tower": "tiny-clip (given as vision_tower=)", "mm_hidden_size": hf_model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": hf_model.config.vision_feature_layer,
        "mm_vision_select_feature": "patch" if hf_model.config.vision_feature_select_strategy == "default" else "cls_patch",
        "mm_use_im_start_end": False, "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048,
        "img_size": 224, "vision_backbone": "inert leftover field",
    }


def save_clip_dir(hf_model, out: Path) -> Path:
    """The tiny CLIP tower as a standalone CLIPVisionModel directory (`vision_model.*` keys)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"vision_model." + k[len("model.vision_tower."):]: t.contiguous()
               for k, t in hf_model.state_dict().items() if k.startswith("model.vision_tower.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_model.config.vision_config.to_dict(), default=str))
    return out


def reshard(ckpt: Path, shard_of, *, index: bool = True) -> dict[str, list[str]]:
    """Rewrite the safetensors of `ckpt` as shards, `shard_of(key)` naming each key's file, with a
    model.safetensors.index.json (or none, when `index` is false). Returns {file: keys}."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
        file.unlink()
    (ckpt / "model.safetensors.index.json").unlink(missing_ok=True)
    shards: dict[str, list[str]] = {}
    for key in sorted(tensors):
        shards.setdefault(shard_of(key), []).append(key)
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(ckpt / name), metadata={"format": "pt"})
    if index:
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def hf_clip_model(hf_model):
    """A transformers CLIPModel (tiny random text tower) whose vision tower is `hf_model`'s."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=hf_model.config.vision_config.to_dict(),
                                projection_dim=16))
    clip.vision_model.load_state_dict(hf_model.model.vision_tower.state_dict())
    return clip.eval()


def batch_inputs(image_token: int = IMAGE_TOKEN, n_image: int = 16, seed: int = 1):
    """Two left-padded prompts with the image at different positions, and two random images."""
    g = torch.Generator().manual_seed(seed)
    img = [image_token] * n_image
    rows = [[1, 5, 6] + img + [7, 8], [1, 11, 12, 13, 14, 15, 16] + img + [17]]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, mask, pixels


# ---------------------------------------------------------------------------------------------
# Parity with transformers


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_logits(hf, ids, mask, pixels):
    # transformers' plain forward numbers positions 0..T-1 regardless of padding; give it the
    # same running count of real tokens that generate() uses and that our model uses by default.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).logits


def our_inputs(model, ids):
    # LLaVA-Med checkpoints mark image positions with -200 instead of a vocabulary id.
    return ids.masked_fill(ids == IMAGE_TOKEN, model.config.image_token_id)


def assert_same_logits(model, hf, tol: float = 1e-5) -> None:
    """fp32 logits of our `model` equal transformers' `hf` (max relative error ≤ tol) at every real
    position of `batch_inputs()`: two left-padded prompts with the image at different positions."""
    ids, mask, pixels = batch_inputs(n_image=model.config.num_image_tokens)
    with torch.no_grad():
        ours = model(our_inputs(model, ids), pixels, mask)
    ref = hf_logits(hf, ids, mask, pixels)
    real = mask.bool()
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert rel_err(ours[real], ref[real]) <= tol
