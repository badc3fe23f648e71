"""Load LLaVA(-Med) checkpoints from safetensors into `model.llava.Llava`, strictly.

Accepted on disk (FORMATS.md):
  * LLaVA-Med original (`LlavaMistralForCausalLM`): config.json with `mm_*` fields, keys
    `model.layers.*`, `model.mm_projector.{0,2}.*`, `model.vision_tower.vision_tower.vision_model.*`.
  * llava-hf legacy (`LlavaForConditionalGeneration` as saved by transformers 4.x and 5.x):
    `language_model.model.*`, `language_model.lm_head.*`, `multi_modal_projector.*`,
    `vision_tower.vision_model.*` (4.x) or `vision_tower.*` (5.x); nested text/vision configs.
  * llava-hf new in-memory layout: `model.language_model.*`, `model.vision_tower.*`,
    `model.multi_modal_projector.*`, `lm_head.*`.
  * a CLIP directory (`vision_model.*`, the rest of a full CLIPModel is not read) supplying the
    vision tower, as LLaVA's own code does with OpenAI's CLIP.

The model is built on the meta device and the tensors are assigned in place, so peak memory is
about one copy of the weights. Every missing, unexpected or mis-shaped key is reported in one
error; the only keys ignored are RoPE `inv_freq`, CLIP `position_ids` and `image_newline`.
Pickle files (`.bin`, `.pt`) are refused: loading them would run arbitrary code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .llava import Llava, LlavaConfig, TextConfig, VisionConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the keys."""


# One prefix table per source layout: (prefix on disk, prefix in `Llava`), first match wins.
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "llava-med": [
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.mm_projector.", "multi_modal_projector.linear_1."),  # `linear` projector (v1)
        ("model.", "language_model."),
        ("lm_head.", "lm_head."),
    ],
    "llava-hf-legacy": [
        ("language_model.model.", "language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("vision_tower.vision_model.", "vision_tower."),  # transformers 4.x
        ("vision_tower.", "vision_tower."),  # transformers 5.x
    ],
    "llava-hf": [
        ("model.language_model.", "language_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("lm_head.", "lm_head."),
    ],
    "clip": [("vision_model.", "vision_tower.")],
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids", "image_newline")

# Vision towers that LLaVA-Med configs name by hub id (their config.json carries no tower shape).
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(),
    "openai/clip-vit-large-patch14": VisionConfig(image_size=224),
}


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("model.mm_projector.", "model.vision_tower.vision_tower.")) for k in keys):
        return "llava-med"
    if any(k.startswith("language_model.model.") for k in keys):
        return "llava-hf-legacy"
    if any(k.startswith("model.language_model.") for k in keys):
        return "llava-hf"
    if any(k.startswith("model.layers.") for k in keys):
        return "llava-med"  # a LLaVA-Med checkpoint stored without tower and projector
    raise CheckpointError(f"unrecognised key layout (first keys: {sorted(keys)[:5]}); expected one of {list(LAYOUTS)}")


def rename(key: str, layout: str) -> str | None:
    """Source key → our parameter name, or None when no prefix of the layout matches."""
    for src, dst in LAYOUTS[layout]:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


# Prefixes only read, never written: transformers 4.x's tower prefix (5.x writes the shorter one).
READ_ONLY = {"vision_tower.vision_model.", "model.vision_tower.vision_model."}


def unrename(name: str, layout: str) -> str:
    """Our parameter name → the key it has in `layout` (the first writable entry producing it)."""
    for src, dst in LAYOUTS[layout]:
        if name.startswith(dst) and src not in READ_ONLY:
            return src + name[len(dst):]
    raise KeyError(f"{name} has no key in layout {layout}")


# ----------------------------------------------------------------------------------------------
# config.json


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _rope_theta(c: dict, default: float) -> float:
    # transformers 5 writes rope_parameters: {rope_theta, rope_type}; older files a bare rope_theta.
    params = c.get("rope_parameters") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise CheckpointError(f"rope_type {params['rope_type']!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", c.get("rope_theta", default)))


def _text_config(c: dict) -> TextConfig:
    return TextConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=c.get("head_dim"),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(c, 1e4),
        sliding_window=c.get("sliding_window"),
        max_seq_len=max(c.get("max_position_embeddings", 4096), c.get("tokenizer_model_max_length") or 0),
        bos_token_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
        eos_token_id=c.get("eos_token_id", 2) if isinstance(c.get("eos_token_id", 2), int) else c["eos_token_id"][0],
        pad_token_id=c.get("pad_token_id"),
    )


def _vision_config(c: dict) -> VisionConfig:
    c = c.get("vision_config", c)  # a full CLIPModel config nests the tower's
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"vision hidden_act {c['hidden_act']!r} is not supported (CLIP uses quick_gelu)")
    return VisionConfig(
        image_size=c["image_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], layer_norm_eps=c.get("layer_norm_eps", 1e-5),
        num_channels=c.get("num_channels", 3),
    )


def config_from_json(c: dict, source: str = "config.json", vision: VisionConfig | None = None) -> LlavaConfig:
    """LlavaConfig from a llava-hf (nested) or LLaVA-Med (`mm_*`) config.json dict."""
    try:
        if "text_config" in c:  # llava-hf
            if c.get("projector_hidden_act", "gelu") != "gelu":
                raise CheckpointError(f"{source}: projector_hidden_act {c['projector_hidden_act']!r} is not supported")
            strategy = c.get("vision_feature_select_strategy", "default")
            layer = c.get("vision_feature_layer", -2)
            if not isinstance(layer, int):
                raise CheckpointError(f"{source}: vision_feature_layer {layer!r}: only a single layer is supported")
            return LlavaConfig(
                vision=vision or _vision_config(c["vision_config"]), text=_text_config(c["text_config"]),
                projector_type="mlp2x_gelu", projector_bias=c.get("multimodal_projector_bias", True),
                select_layer=layer, select_feature={"default": "patch", "full": "cls_patch"}[strategy],
                image_token_id=c.get("image_token_index", c.get("image_token_id", 32000)),
            )
        if "mm_vision_tower" in c or "mm_projector_type" in c:  # LLaVA-Med / LLaVA original
            if vision is None:
                tower = c.get("mm_vision_tower")
                if tower not in KNOWN_TOWERS:
                    raise CheckpointError(f"{source}: vision tower {tower!r} is not one whose shape is known "
                                          f"({', '.join(KNOWN_TOWERS)}); pass vision_tower=<CLIP directory>")
                vision = KNOWN_TOWERS[tower]
            if c.get("mm_use_im_start_end"):
                raise CheckpointError(f"{source}: mm_use_im_start_end=true (LLaVA-Med v1) is not supported")
            projector = c.get("mm_projector_type", "linear")
            return LlavaConfig(
                vision=vision, text=_text_config(c), projector_type=projector, projector_bias=True,
                select_layer=c.get("mm_vision_select_layer", -2),
                select_feature=c.get("mm_vision_select_feature", "patch"), image_token_id=-200,
            )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
    raise CheckpointError(f"{source}: neither a llava-hf config (text_config) nor a LLaVA-Med one (mm_* fields)")


def config_to_json(config: LlavaConfig) -> dict:
    """A llava-hf config.json for `config` (how this project saves its own models)."""
    t, v = config.text, config.vision
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": config.image_token_id, "image_seq_length": config.num_image_tokens,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": {"patch": "default", "cls_patch": "full"}[config.select_feature],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "mistral" if t.sliding_window else "llama", "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads, "num_key_value_heads": t.n_kv_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
            "sliding_window": t.sliding_window, "max_position_embeddings": t.max_seq_len,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "hidden_act": "silu", "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads,
            "layer_norm_eps": v.layer_norm_eps, "num_channels": v.num_channels, "hidden_act": "quick_gelu",
        },
    }


# ----------------------------------------------------------------------------------------------
# safetensors files


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: sharded (index.json), single, or refused pickles."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(ext))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); this project never unpickles weights "
            "(it can run arbitrary code). Convert them once, where you trust the file, e.g.\n"
            "  python -c \"import torch; from safetensors.torch import save_file; "
            "sd = torch.load('pytorch_model.bin', weights_only=True); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"\n"
            "(one output file per .bin shard), then load the directory again.")
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _index(files: list[Path], layout: str | None, skip_prefix: str | None = None):
    """{our name: (file, key, shape)} for every tensor in `files`; ignored and unknown keys apart."""
    found, unexpected = {}, []
    for file in files:
        f = _open(file)
        keys = list(f.keys())
        lay = layout or detect_layout(keys)
        for key in keys:
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if lay == "clip" and not key.startswith("vision_model."):
                continue  # a full CLIPModel: its text half and projections are not the tower
            name = rename(key, lay)
            if name is None:
                unexpected.append(f"{key} ({file.name})")
            elif skip_prefix and name.startswith(skip_prefix):
                continue
            else:
                found[name] = (file, key, tuple(f.get_slice(key).get_shape()))
    return found, unexpected


def load_model(path, *, vision_tower=None, dtype: torch.dtype = torch.float32, device="cpu") -> Llava:
    """Load a LLaVA(-Med) checkpoint directory (config.json + safetensors) as a `Llava` in eval mode.

    `vision_tower`: a CLIP directory (config.json + safetensors) whose `vision_model.*` replaces
    the tower stored in the checkpoint, or supplies it when the checkpoint has none.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    tower_dir = Path(vision_tower) if vision_tower is not None else None
    vision = _vision_config(_read_json(tower_dir / "config.json")) if tower_dir else None
    config = config_from_json(_read_json(path / "config.json"), str(path / "config.json"), vision)

    found, unexpected = _index(safetensors_files(path), None, skip_prefix="vision_tower." if tower_dir else None)
    if tower_dir:
        tower, unexpected_tower = _index(safetensors_files(tower_dir), "clip")
        found.update(tower)
        unexpected += unexpected_tower

    with torch.device("meta"):
        model = Llava(config)
    def hint(missing):
        if any(k.startswith("vision_tower.") for k in missing):
            return "the checkpoint has no vision tower: pass vision_tower=<CLIP directory>"
    return assign_weights(model, found, unexpected, str(path), dtype=dtype, device=device, missing_hint=hint).eval()


def assign_weights(model: torch.nn.Module, found: dict, unexpected: list[str], source: str, *,
                   dtype: torch.dtype, device, missing_hint=None) -> torch.nn.Module:
    """Check `found` ({name: (file, key, shape)}) against a meta-device model, strictly, then read
    each tensor once and assign it in place (peak memory ≈ one copy of the weights).

    One CheckpointError lists every missing, unexpected and mis-shaped key, naming the files;
    `missing_hint(missing_names)` may add advice to the missing line.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = unexpected + sorted(f"{found[k][1]} ({found[k][0].name})" for k in set(found) - set(expected))
    wrong = sorted(f"{found[k][1]} ({found[k][0].name}): {found[k][2]} in the file, {expected[k]} expected"
                   for k in set(found) & set(expected) if found[k][2] != expected[k])
    if missing or unexpected or wrong:
        lines = [f"cannot load {source}:"]
        if missing:
            advice = missing_hint(missing) if missing_hint else None
            lines.append(f"  {len(missing)} missing" + (f" ({advice})" if advice else "") + ": " + ", ".join(missing))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected: " + ", ".join(unexpected))
        if wrong:
            lines.append(f"  {len(wrong)} with the wrong shape: " + "; ".join(wrong))
        raise CheckpointError("\n".join(lines))

    state, handles = {}, {}
    for name, (file, key, _) in found.items():
        f = handles.get(file) or handles.setdefault(file, _open(file))
        try:
            t = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: tensor {key} cannot be read (truncated or corrupt?): {e}") from None
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_model(model: Llava, out_dir, *, layout: str = "llava-hf-legacy", config_json: dict | None = None,
               state_dict: dict | None = None) -> Path:
    """Write config.json + model.safetensors in `layout` (keys renamed through its table).

    `config_json` defaults to a llava-hf config for the model (readable by transformers too); pass
    the source checkpoint's own config.json to export in its own format.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {unrename(k, layout): v.detach().contiguous().cpu() for k, v in sd.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json or config_to_json(model.config), indent=2))
    return out
