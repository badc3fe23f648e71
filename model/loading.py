"""Load LLaVA(-Med) checkpoints from safetensors into `model.llava.Llava`, strictly.

Layouts (LLaVA-Med, llava-hf legacy and new, a CLIP directory as the tower), config fields, ignored keys:
docs/FORMATS.md. The layout is decided over every shard's keys (a shard may hold only lm_head); weights are
read once into a meta-device model (peak memory ≈ one copy). Pickles are refused: they can run arbitrary code.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from harness.cli import UserError, few
from harness.files import DataError, read_text

from .llava import Llava, LlavaConfig, TextConfig, VisionConfig

# dtype names the scripts accept; "auto" resolves per device.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device, *, gpu_default: str = "bfloat16") -> torch.dtype:
    """A dtype name of DTYPES, or "auto": `gpu_default` on CUDA, float32 elsewhere."""
    if name == "auto":
        name = gpu_default if str(device).startswith("cuda") else "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the keys or fields. A UserError:
    the scripts print it as one line; a ValueError for library callers."""


# One prefix table per source layout: (prefix on disk, prefix in `Llava`), first match wins.
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "llava-med": [("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
                  ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                  ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
                  ("model.mm_projector.", "multi_modal_projector.linear_1."),  # `linear` projector (v1)
                  ("model.", "language_model."),
                  ("lm_head.", "lm_head.")],
    "llava-hf-legacy": [("language_model.model.", "language_model."),
                        ("language_model.lm_head.", "lm_head."),
                        ("multi_modal_projector.", "multi_modal_projector."),
                        ("vision_tower.vision_model.", "vision_tower."),  # transformers 4.x
                        ("vision_tower.", "vision_tower.")],  # transformers 5.x
    "llava-hf": [("model.language_model.", "language_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.vision_tower.vision_model.", "vision_tower."),
                 ("model.vision_tower.", "vision_tower."),
                 ("lm_head.", "lm_head.")],
    # CLIPModel, CLIPVisionModelWithProjection and 4.x CLIPVisionModel write `vision_model.`;
    # transformers 5's CLIPVisionModel writes the tower's own names, without it.
    "clip": [("vision_model.", "vision_tower."),
             ("embeddings.", "vision_tower.embeddings."), ("pre_layrnorm.", "vision_tower.pre_layrnorm."),
             ("encoder.", "vision_tower.encoder."), ("post_layernorm.", "vision_tower.post_layernorm.")],
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids", "image_newline")
# The parts of a full CLIPModel that are not its vision tower.
CLIP_IGNORED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")

# Key prefixes that only one checkpoint layout writes; one such key anywhere in a checkpoint decides its
# layout (llava-med is tried first: its tower prefix extends llava-hf's). `lm_head.*` decides nothing.
TELLING = {
    "llava-med": ("model.vision_tower.vision_tower.", "model.mm_projector.", "model.layers.",
                  "model.embed_tokens.", "model.norm."),
    "llava-hf": ("model.language_model.", "model.multi_modal_projector.", "model.vision_tower."),
    "llava-hf-legacy": ("language_model.", "multi_modal_projector.", "vision_tower."),
}

# Vision towers that LLaVA-Med configs name by hub id (their config.json carries no tower shape).
KNOWN_TOWERS = {"openai/clip-vit-large-patch14-336": VisionConfig(),
                "openai/clip-vit-large-patch14": VisionConfig(image_size=224)}


def detect_layout(keys, source: str = "checkpoint") -> str:
    """The layout (a key of LAYOUTS, not "clip") of a whole checkpoint, from every key of every shard
    (_headers' {key: (file, shape)} names files in errors). No telling key, or two layouts, is an error."""
    where = {k: f"{k} ({keys[k][0].name})" if isinstance(keys, dict) else k  # sorted, as the errors name them
             for k in sorted(keys) if not k.endswith(IGNORED_SUFFIXES)}
    seen: dict[str, str] = {}  # layout → first key that tells it
    for key, named in where.items():
        if (layout := next((lay for lay, pre in TELLING.items() if key.startswith(pre)), None)) is not None:
            seen.setdefault(layout, named)
    if len(seen) == 1:
        return next(iter(seen))
    if seen:
        found = "; ".join(f"{k} is {lay}" for lay, k in seen.items())
        raise CheckpointError(f"{source}: keys of {len(seen)} layouts in one checkpoint: {found}")
    first = ", ".join(list(where.values())[:5]) or "none"
    raise CheckpointError(f"{source}: unrecognised key layout, no key starts with a prefix of "
                          f"{', '.join(sorted(TELLING))} (first keys: {first})")


def rename(key: str, layout: str) -> str | None:
    """Source key → our parameter name, or None when no prefix of the layout matches."""
    return next((dst + key[len(src):] for src, dst in LAYOUTS[layout] if key.startswith(src)), None)


# config.json
def _read_json(path: Path):
    """A JSON file's content; missing, not UTF-8 or not JSON is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return json.loads(read_text(path))
    except DataError as e:  # not UTF-8: the message names the file and the byte offset
        raise CheckpointError(str(e)) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _show(value) -> str:
    """A config value as it is written in the JSON file (strings quoted), cut to a line."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_REQUIRED = object()

# What transformers assumes for a field a nested config leaves out (4.x writes only those that differ from
# the class's defaults: llava-1.5-7b-hf has no text_config.hidden_size); tests/test_loading.py checks them.
MODEL_TYPE_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2},
    "clip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}
MODEL_TYPE_DEFAULTS["mistral"] = {**MODEL_TYPE_DEFAULTS["llama"], "intermediate_size": 14336,
                                  "num_key_value_heads": 8, "max_position_embeddings": 131072,
                                  "sliding_window": 4096}


class _Fields:
    """Typed reads from one JSON object of a config file; every error names the file and the field's
    path. A left-out field takes its model_type's default (MODEL_TYPE_DEFAULTS), else the read's."""

    def __init__(self, obj, source: str, path: str = ""):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{source}: {path or 'the file'} must be a JSON object, got {_show(obj)}")
        self.obj, self.source, self.prefix = obj, source, f"{path}." if path else ""
        self.defaults = MODEL_TYPE_DEFAULTS.get(str(obj.get("model_type")), {})  # str(): a list is no key

    def error(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.prefix}{key} {what}")

    def get(self, key: str, default=_REQUIRED):
        if (value := self.obj.get(key, self.defaults.get(key, default))) is _REQUIRED:
            raise CheckpointError(f"{self.source}: missing field {self.prefix}{key}")
        return value

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key), self.source, self.prefix + key)

    def int(self, key: str, default=_REQUIRED, *, minimum: int | None = 1):
        v = self.get(key, default)
        if v is None and default is None:  # a field whose default is None may be null
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            null = " or null" if default is None else ""
            raise self.error(key, f"must be an integer{null}, got {_show(v)}")
        if minimum is not None and v < minimum:
            raise self.error(key, f"must be at least {minimum}, got {v}")
        return v

    def float(self, key: str, default=_REQUIRED) -> float:
        """A positive finite number (every float field read here is an epsilon or a RoPE base)."""
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(key, f"must be a number, got {_show(v)}")
        if v <= 0:
            raise self.error(key, f"must be positive, got {v}")
        return float(v)

    def bool(self, key: str, default=_REQUIRED) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {_show(v)}")
        return v

    def choice(self, key: str, default, choices: tuple, what: str = "supported"):
        v = self.get(key, default)
        if isinstance(v, (dict, list)) or v not in choices:
            raise self.error(key, f"is {_show(v)}; {what}: {', '.join(map(_show, choices))}")
        return v


def _rope_theta(f: _Fields) -> float:
    # transformers 5 writes rope_parameters: {rope_theta, rope_type}; older files a bare rope_theta
    # and, for scaled RoPE, rope_scaling. Only plain RoPE is implemented.
    if f.get("rope_scaling", None) is not None:
        scaling = f.sub("rope_scaling")
        scaling.choice("rope_type" if "rope_type" in scaling.obj else "type", "default", ("default",),
                       "only plain RoPE is supported")
    if f.get("rope_parameters", None) is not None:
        params = f.sub("rope_parameters")
        params.choice("rope_type", "default", ("default",), "only plain RoPE is supported")
        return params.float("rope_theta", f.defaults.get("rope_theta", 1e4))
    return f.float("rope_theta", 1e4)


def _token_id(f: _Fields, key: str, default: int) -> int:
    v = f.get(key, default)
    if isinstance(v, list) and v:
        v = v[0]  # several end-of-sequence ids: generation here stops at the first
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise f.error(key, f"must be a token id (an integer ≥ 0, or a list of them), got {_show(f.get(key))}")
    return v


def _text_config(f: _Fields) -> TextConfig:
    f.choice("hidden_act", "silu", ("silu",), "LLaMA / Mistral use")
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise f.error("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    max_len = f.int("tokenizer_model_max_length", None) or 0
    pad = f.int("pad_token_id", None, minimum=None)
    return TextConfig(
        vocab_size=f.int("vocab_size"), hidden_size=f.int("hidden_size"),
        intermediate_size=f.int("intermediate_size"), n_layers=f.int("num_hidden_layers"), n_heads=heads,
        n_kv_heads=kv_heads, head_dim=f.int("head_dim", None),
        rms_norm_eps=f.float("rms_norm_eps", 1e-6), rope_theta=_rope_theta(f),
        sliding_window=f.int("sliding_window", None),
        max_seq_len=max(f.int("max_position_embeddings", 4096), max_len),
        bos_token_id=_token_id(f, "bos_token_id", 1), eos_token_id=_token_id(f, "eos_token_id", 2),
        pad_token_id=pad if pad is None or pad >= 0 else None)  # old LLaMA configs write -1 for "none"


def _vision_config(f: _Fields) -> VisionConfig:
    if "vision_config" in f.obj:
        f = f.sub("vision_config")  # a full CLIPModel config nests the tower's
    f.choice("hidden_act", "quick_gelu", ("quick_gelu",), "CLIP uses")
    image, patch = f.int("image_size"), f.int("patch_size")
    if image % patch:
        raise f.error("patch_size", f"{patch} does not divide image_size {image}")
    width, heads = f.int("hidden_size"), f.int("num_attention_heads")
    if width % heads:
        raise f.error("num_attention_heads", f"{heads} does not divide hidden_size {width}")
    return VisionConfig(
        image_size=image, patch_size=patch, hidden_size=width, intermediate_size=f.int("intermediate_size"),
        n_layers=f.int("num_hidden_layers"), n_heads=heads, layer_norm_eps=f.float("layer_norm_eps", 1e-5),
        num_channels=f.int("num_channels", 3))


def _select_layer(f: _Fields, key: str, vision: VisionConfig) -> int:
    if isinstance(f.get(key, -2), list):
        raise f.error(key, f"is {_show(f.get(key))}: only a single layer is supported")
    layer = f.int(key, -2, minimum=None)
    n_states = vision.n_layers + 1  # the embeddings, then each block's output
    if not -n_states <= layer < n_states:
        raise f.error(key, f"{layer} is outside the {n_states} hidden states of the vision tower")
    return layer


def config_from_json(c: dict, source: str = "config.json", vision: VisionConfig | None = None) -> LlavaConfig:
    """LlavaConfig of a llava-hf (nested) or LLaVA-Med (`mm_*`) config.json dict, every field type-checked."""
    f = _Fields(c, source)
    if "text_config" in c:  # llava-hf
        f.choice("projector_hidden_act", "gelu", ("gelu",))
        vision = vision or _vision_config(f.sub("vision_config"))
        text, bias = _text_config(f.sub("text_config")), f.bool("multimodal_projector_bias", True)
        layer = _select_layer(f, "vision_feature_layer", vision)
        strategy = f.choice("vision_feature_select_strategy", "default", ("default", "full"))
        # A vocabulary id, or LLaVA's -200 (outside the vocabulary), which save_model writes for LLaVA-Med's.
        key = "image_token_index" if "image_token_index" in c else "image_token_id"
        image_token = f.int(key, 32000, minimum=None)
        if image_token < 0 and image_token != -200:
            raise f.error(key, f"must be a token id >= 0 or LLaVA's -200, got {image_token}")
        return LlavaConfig(vision=vision, text=text, projector_type="mlp2x_gelu", projector_bias=bias,
                           select_layer=layer, image_token_id=image_token,
                           select_feature={"default": "patch", "full": "cls_patch"}[strategy])
    if "mm_vision_tower" in c or "mm_projector_type" in c:  # LLaVA-Med / LLaVA original
        if vision is None:
            tower = f.get("mm_vision_tower", None)
            if not isinstance(tower, str) or tower not in KNOWN_TOWERS:
                raise CheckpointError(f"{source}: vision tower {_show(tower)} is not one whose shape is known"
                                      f" ({', '.join(KNOWN_TOWERS)}); pass --vision-tower <CLIP directory>")
            vision = KNOWN_TOWERS[tower]
        if f.bool("mm_use_im_start_end", False):
            raise f.error("mm_use_im_start_end", "is true (LLaVA-Med v1): not supported")
        return LlavaConfig(
            vision=vision, text=_text_config(f), projector_bias=True,
            projector_type=f.choice("mm_projector_type", "linear", ("mlp2x_gelu", "linear")),
            select_layer=_select_layer(f, "mm_vision_select_layer", vision),
            select_feature=f.choice("mm_vision_select_feature", "patch", ("patch", "cls_patch")),
            image_token_id=-200)
    raise CheckpointError(f"{source}: neither a llava-hf config (text_config) nor a LLaVA-Med one "
                          "(mm_* fields)")


def read_config(path, vision_tower=None) -> LlavaConfig:
    """A checkpoint directory's LlavaConfig, with the tower of `vision_tower` (a CLIP directory) if given."""
    vision = None
    if vision_tower:
        file = Path(vision_tower) / "config.json"
        vision = _vision_config(_Fields(_read_json(file), str(file)))
    file = Path(path) / "config.json"
    return config_from_json(_read_json(file), str(file), vision)


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
            "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads,
            "num_key_value_heads": t.n_kv_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
            "sliding_window": t.sliding_window, "max_position_embeddings": t.max_seq_len,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "hidden_act": "silu", "tie_word_embeddings": False},
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads,
            "layer_norm_eps": v.layer_norm_eps, "num_channels": v.num_channels, "hidden_act": "quick_gelu"}}


# safetensors files
def safetensors_files(path: Path) -> list[Path]:
    """The shards model.safetensors.index.json names (others beside them are not read, as in transformers),
    else every *.safetensors of a checkpoint directory; pickles are refused."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or Path(v).name != v), None)
        if bad is not None:
            raise CheckpointError(f"{index}: weight_map[{bad!r}] must be a file name in {path}, "
                                  f"got {_show(weight_map[bad])}")
        files = [path / f for f in sorted(set(weight_map.values()))]
        if missing := [str(f) for f in files if not f.is_file()]:
            raise CheckpointError(f"{index} names {len(missing)} shards that do not exist: {few(missing)}")
        return files
    if files := sorted(path.glob("*.safetensors")):
        return files
    if pickles := sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(ext)):
        raise CheckpointError(
            f"{path} has only pickles ({', '.join(pickles)}); this project never unpickles weights (they can "
            "run arbitrary code). Convert each shard where you trust it:\n  python -c \"import torch; from "
            "safetensors.torch import save_file; sd = torch.load('pytorch_model.bin', weights_only=True); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"")
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not readable as safetensors (truncated or corrupt?): {e}") from None


def _headers(source: Path, files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{key: (file, shape)} over all the files of a checkpoint, from their headers only. A key held by
    two files is an error naming both: whichever copy loaded would depend on file order (a stray
    partial file of zeros next to the real shards would load without a word)."""
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    twice: dict[tuple[str, str], list[str]] = {}  # (first file, second file) → keys in both
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if key in where:
                    twice.setdefault((where[key][0].name, file.name), []).append(key)
                else:
                    where[key] = (file, tuple(f.get_slice(key).get_shape()))
    if twice:
        pairs = [f"{a} and {b} both hold {k[0]}" + (f" (and {len(k) - 1} more keys)" if len(k) > 1 else "")
                 for (a, b), k in twice.items()]
        raise CheckpointError(f"{source}: tensors stored twice, remove the stray file: " + few(pairs, "; "))
    return where


def _index(path: Path, layout: str | None = None, *, skip: tuple[str, ...] = (), drop: str | None = None):
    """({our name: (file, key, shape)}, [unexpected "key (file)"]) of the checkpoint at `path` in `layout`
    (None: detected). Keys starting with `skip` are not read; names starting with `drop` are left out (a
    tower replaced by vision_tower=). Two keys naming one parameter are an error."""
    headers = _headers(path, safetensors_files(path))
    layout = layout or detect_layout(headers, str(path))
    found, unexpected, clashes = {}, [], []
    for key, (file, shape) in headers.items():
        if key.endswith(IGNORED_SUFFIXES) or key.startswith(skip):
            continue
        name = rename(key, layout)
        if name is None:
            unexpected.append(f"{key} ({file.name})")
        elif drop and name.startswith(drop):
            continue
        elif name in found:
            other_file, other_key, _ = found[name]
            clashes.append(f"{other_key} ({other_file.name}) and {key} ({file.name}) are both {name}")
        else:
            found[name] = (file, key, shape)
    if clashes:
        raise CheckpointError(f"{path}: {len(clashes)} parameters stored under two keys: "
                              + few(clashes, "; "))
    return found, unexpected


def load_model(path, *, vision_tower=None, dtype: torch.dtype = torch.float32, device="cpu",
               check_finite: bool = True) -> Llava:
    """A LLaVA(-Med) checkpoint directory (config.json + safetensors) as a `Llava` in eval mode;
    `vision_tower`: a CLIP directory whose tower replaces the checkpoint's or supplies a missing one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    tower_dir = Path(vision_tower) if vision_tower is not None else None
    if tower_dir is not None and not tower_dir.is_dir():
        raise CheckpointError(f"{tower_dir}: not a CLIP directory (vision_tower)")
    config = read_config(path, tower_dir)
    found, unexpected = _index(path, drop="vision_tower." if tower_dir else None)
    if tower_dir:
        tower, unexpected_tower = _index(tower_dir, "clip", skip=CLIP_IGNORED)
        found, unexpected = found | tower, unexpected + unexpected_tower
    with torch.device("meta"):
        model = Llava(config)
    # A tower that does not fit the config (its width, else its depth) in words, not as hundreds of keys.
    why, v = "", config.vision
    width = found.get("vision_tower.embeddings.class_embedding", (0, 0, None))[2]
    depth = len({k.split(".")[3] for k in found if k.startswith("vision_tower.encoder.layers.")})
    if tower_dir is None and not any(k.startswith("vision_tower.") for k in found):
        why = " the checkpoint has no vision tower: pass --vision-tower <CLIP directory>"
    elif tower_dir is None and width and (width, depth) != ((v.hidden_size,), v.n_layers):
        has, field, n = ((f"width {width[0]}", "hidden_size", v.hidden_size) if width != (v.hidden_size,)
                         else (f"{depth} layers", "num_hidden_layers", v.n_layers))
        tower = _read_json(path / "config.json").get("mm_vision_tower")  # llava-hf: none, a shape
        said = f"mm_vision_tower {_show(tower)}" if tower else f"vision_config.{field}"
        why = (f" the vision tower in the checkpoint has {has} where {said} implies {n}: "
               "pass --vision-tower <the CLIP directory it was trained with>")
    return assign_weights(model, found, unexpected, str(path), dtype=dtype, device=device,
                          check_finite=check_finite, why=why).eval()


def assign_weights(model: torch.nn.Module, found: dict, unexpected: list[str], source: str, *,
                   dtype: torch.dtype, device, check_finite: bool = True, why: str = "") -> torch.nn.Module:
    """Check `found` ({name: (file, key, shape)}) against a meta-device model, strictly, then read each
    tensor once and assign it in place. One CheckpointError (`why` ends its first line) counts every
    missing, unexpected, mis-shaped and non-floating-point key, naming a few of each with their files.
    With `check_finite`, tensors holding NaN or Inf are an error (checked on `device`, one wait in all)."""
    handle = functools.cache(_open)  # one open file per shard
    params = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in params.items()}
    at = {k: f"{key} ({file.name})" for k, (file, key, _) in found.items()}  # as the errors name a key
    missing = sorted(set(expected) - set(found))
    unexpected = unexpected + sorted(at[k] for k in set(found) - set(expected))
    both = sorted(set(found) & set(expected))
    wrong = [f"{at[k]}: {found[k][2]} in the file, {expected[k]} expected"
             for k in both if found[k][2] != expected[k]]
    # safetensors dtype names: F16, BF16, F32, F64, F8_E4M3, ... are floating; I*, U*, BOOL are not.
    dtypes = {k: handle(found[k][0]).get_slice(found[k][1]).get_dtype() for k in both}
    not_float = [f"{at[k]} is {dtypes[k]}" for k in both
                 if params[k].is_floating_point() and not dtypes[k].startswith(("F", "BF"))]
    problems = [(missing, "missing", ", "), (unexpected, "unexpected", ", "),
                (wrong, "with the wrong shape", "; "),
                (not_float, "not floating point where a weight belongs", "; ")]
    if lines := [f"  {len(items)} {what}: " + few(items, sep) for items, what, sep in problems if items]:
        raise CheckpointError("\n".join([f"cannot load {source}:{why}", *lines]))
    state, finite = {}, {}
    for name, (file, key, _) in found.items():
        try:
            t = handle(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: tensor {key} unreadable (truncated or corrupt?): {e}") from None
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if check_finite and t.is_floating_point():
            finite[name] = state[name].isfinite().all()  # stays on the device: no wait per tensor
    flags = torch.stack(list(finite.values())).tolist() if finite else []  # the one wait
    if bad := [at[k] for k, ok in zip(finite, flags) if not ok]:
        raise CheckpointError(f"cannot load {source}: {len(bad)} of {len(flags)} tensors hold NaN or Inf "
                              f"(damaged bytes?): {few(bad)}; --no-check-finite skips this check of --model")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_model(model: Llava, out_dir) -> Path:
    """Write config.json (llava-hf's, readable by transformers too) + model.safetensors in llava-hf's
    legacy layout as transformers 5 writes it: its LAYOUTS table backwards, less the 4.x tower prefix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = [(dst, src) for src, dst in LAYOUTS["llava-hf-legacy"] if src != "vision_tower.vision_model."]
    tensors = {next(src + k[len(dst):] for dst, src in table if k.startswith(dst)):
               v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_json(model.config), indent=2))
    return out
