"""Hand-written LoRA for the language model, with adapters saved in PEFT's format.

    y = x Wᵀ + b + (α / r) · B A dropout(x)        A: (r, D_in), B: (D_out, r)

LoRA (Hu et al., 2021): `LoRALinear` keeps the frozen weight under its original name; `lora_disabled`
gives back the base model (π_ref, docs/METHOD.md) from the same weights; `export_merged` folds B A into
W; `save_adapter` and `load_adapter` read and write PEFT 0.21's files for a transformers Llava.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer (weight and bias kept under their names) plus a LoRA update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # The very same Parameter objects as the base layer, frozen: no copy, names unchanged, so
        # checkpoints of the base model load into it unchanged.
        base.requires_grad_(False)
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale, self.dropout_p = rank, alpha, alpha / rank, dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The adapter is kept in fp32 even for a bf16 base: its updates are tiny relative to W,
        # and the optimizer state follows the parameter dtype.
        fp32 = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, **fp32)
        self.lora_B = nn.Linear(rank, self.out_features, **fp32)
        # A Kaiming-uniform (a = √5, what nn.Linear and PEFT use), B zero: a fresh adapter changes nothing.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False  # forward is the base layer only

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B A, the update that merging adds to W, in the adapter's dtype. # (D_out, D_in)"""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        # Disabled (π_ref): the adapter branch is skipped, so the output is the base layer's bit for bit.
        if self.disabled:
            return y
        # The adapter runs in its own dtype (x may be bf16 while A, B are fp32).
        h = self.dropout(x.to(self.lora_A.weight.dtype))
        return y + (self.scale * self.lora_B(self.lora_A(h))).to(y.dtype)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable parameters: lora_A and lora_B of every LoRALinear."""
    return (getattr(m, ab).weight for m in lora_modules(model).values() for ab in ("lora_A", "lora_B"))


def apply_lora(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS, rank: int = 16,
               alpha: float = 32.0, dropout: float = 0.05, scope: str = "language_model") -> list[str]:
    """Replace every nn.Linear under `scope` whose own name (the last component of its path, never a
    substring) is in `targets` by a LoRALinear, and freeze the rest; returns the replaced module names."""
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; apply_lora must be called once")
    root = model.get_submodule(scope)
    model.requires_grad_(False)  # everything frozen first; only the adapters created below train
    # Collect first, then replace, so that named_modules() is not walked while it changes.
    found = [(name, m) for name, m in root.named_modules()
             if name.rpartition(".")[2] in targets and isinstance(m, nn.Linear)]
    if unmatched := sorted(set(targets) - {name.rpartition(".")[2] for name, _ in found}):
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear under {scope!r}")
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name)  # "": root itself
        # A new module starts in training mode: follow the layer it replaces (eval → no dropout).
        setattr(parent, child, LoRALinear(linear, rank, alpha, dropout).train(linear.training))
    return [f"{scope}.{name}" for name, _ in found]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: inside this block every LoRALinear is its frozen layer only (π_ref)."""
    previous = {m: m.disabled for m in lora_modules(model).values()}  # restored on exit, so the blocks nest
    for m in previous:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in previous.items():
            m.disabled = d


# PEFT's format names a tensor "base_model.model." + <module path in the transformers model> +
# ".lora_A.weight". That path is "model." + ours since transformers 4.52 (what PEFT 0.21 + transformers 5
# write); older versions had Llava's decoder at language_model.model.layers.*: read both, write the new one.
_PEFT_PREFIX = "base_model.model."
_MAPPED = re.compile(r"(language_model\.layers\.\d+|multi_modal_projector)\.[\w.]+")  # our names PEFT knows
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_module_name(name: str) -> str | None:
    """Our module name -> the module's name inside transformers' Llava, or None if unmapped."""
    return f"model.{name}" if _MAPPED.fullmatch(name) else None


def our_module_name(peft_name: str) -> str | None:
    """transformers' Llava module name (either layout) -> ours, or None if unmapped."""
    for theirs, ours in (("model.", ""), ("language_model.model.layers.", "language_model.layers."),
                         ("multi_modal_projector.", "multi_modal_projector.")):
        if peft_name.startswith(theirs) and _MAPPED.fullmatch(name := ours + peft_name[len(theirs):]):
            return name
    return None


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_path: str | None = None) -> Path:
    """Write the adapter files that peft.PeftModel.from_pretrained loads onto transformers' Llava."""
    modules = lora_modules(model)
    names = {name: peft_module_name(name) for name in modules}  # ours → PEFT's
    if unmapped := sorted(n for n, p in names.items() if p is None):
        raise ValueError(f"LoRA layers with no PEFT name (see _MAPPED in model/lora.py): {unmapped}")
    # target_modules as one regex that PEFT fullmatches against module names: each name with its layer
    # index generalised to \d+ (apply_lora gives every layer of a kind LoRA, so it selects exactly ours).
    pattern = "|".join(sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(p)) for p in names.values()}))
    # The fields PEFT reads; the rest of LoraConfig keeps its defaults (plain LoRA, no DoRA, no rsLoRA
    # scaling, no bias training), which is what LoRALinear computes. apply_lora, called once, gives
    # every layer the same r, α and dropout.
    one = next(iter(modules.values()))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_path,
              "r": one.rank, "lora_alpha": one.alpha, "lora_dropout": one.dropout_p,
              "target_modules": pattern, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    # PEFT's file holds A and B only, keyed without the adapter name ("default").
    tensors = {f"{_PEFT_PREFIX}{names[n]}.{ab}.weight": getattr(m, ab).weight.detach().contiguous().cpu()
               for n, m in modules.items() for ab in ("lora_A", "lora_B")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | Path, dropout: float | None = None) -> list[str]:
    """Load a PEFT LoRA adapter (ours or PEFT's own), applying LoRA first if the model has none; what is
    wrong in the files (unknown, missing, mis-shaped or non-finite tensors) raises one error listing it all."""
    config_path, weights_path = Path(adapter_dir) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: cannot read the adapter config ({e})") from None
    if unsupported := [f"{k}={config.get(k)!r}" for k, ok in (
            ("peft_type", "LORA"), ("bias", "none"), ("fan_in_fan_out", False), ("use_rslora", False),
            ("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None))
            if config.get(k, ok) != ok]:
        raise ValueError(f"{config_path}: unsupported adapter settings: {', '.join(unsupported)}")
    # The file's tensors by our module name: {module: {"lora_A": t, "lora_B": t}}.
    by_module, unknown = {}, []
    for key, value in load_file(weights_path).items():
        match = re.fullmatch(re.escape(_PEFT_PREFIX) + r"(.+)\.(lora_[AB])\.weight", key)  # (module, A or B)
        if match and (name := our_module_name(match.group(1))):
            by_module.setdefault(name, {})[match.group(2)] = value
        else:
            unknown.append(key)
    if not lora_modules(model):
        # A bare model: give it LoRA on exactly the layer kinds the file has (e.g. q,v only).
        targets = tuple(sorted({n.rpartition(".")[2] for n in by_module}))
        scopes = sorted({n.split(".")[0] for n in by_module})
        if len(scopes) != 1:
            raise ValueError(f"{weights_path}: adapter spans {scopes}; load_adapter applies one scope")
        apply_lora(model, targets, rank=config["r"], alpha=config["lora_alpha"], scope=scopes[0],
                   dropout=config.get("lora_dropout", 0.0) if dropout is None else dropout)
    modules = lora_modules(model)
    # Everything that is wrong goes into one error: unknown, missing and mis-shaped tensors.
    unknown += [f"{_PEFT_PREFIX}{peft_module_name(n)}.*" for n in by_module if n not in modules]
    missing = [f"{n}.{ab}" for n in modules for ab in ("lora_A", "lora_B") if ab not in by_module.get(n, {})]
    shapes = [f"{n}.{ab}: file {tuple(t.shape)} vs model {tuple(getattr(modules[n], ab).weight.shape)}"
              for n, d in by_module.items() if n in modules for ab, t in d.items()
              if t.shape != getattr(modules[n], ab).weight.shape]
    nonfinite = [f"{n}.{ab}" for n, d in by_module.items() for ab, t in d.items() if not t.isfinite().all()]
    problems = [f"{what}: {items}" for what, items in (("unknown keys", sorted(unknown)), ("missing", missing),
                                                        ("mis-shaped", shapes), ("NaN or Inf", nonfinite)) if items]
    if problems:
        raise ValueError(f"{weights_path}: " + "; ".join(problems))
    # A model that had LoRA already: its layers must have the file's r and α.
    wrong = sorted(n for n, m in modules.items() if (m.rank, m.alpha) != (config["r"], config["lora_alpha"]))
    if wrong:
        raise ValueError(f"{config_path}: r={config['r']}, lora_alpha={config['lora_alpha']} differ from "
                         f"the model's LoRA layers {wrong[:3]}…")
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A.weight.copy_(by_module[name]["lora_A"])
            m.lora_B.weight.copy_(by_module[name]["lora_B"])
    return sorted(modules)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with LoRA folded into the weights (the model unchanged): the base keys, on the CPU."""
    modules = lora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module.rpartition(".")[0] in modules:  # lora_A, lora_B: the adapter's own entries
            continue
        if module in modules and leaf == "weight":
            # Sum in fp32, round once to the weight's dtype.
            value = (value.float() + modules[module].delta_weight().float()).to(modules[module].weight.dtype)
        out[key] = value.detach().cpu()
    return out


def export_merged(model: nn.Module, out_dir: str | Path, *, source: str | Path) -> Path:
    """A full checkpoint with LoRA merged, with exactly the keys, dtypes and config.json of `source` (the
    directory the model was loaded from, in any dtype): it replaces the input wherever it was used."""
    from . import loading  # loading imports the model; keep lora.py importable on its own
    state = merged_state_dict(model)
    source = Path(source)
    dtypes = {}  # key → its safetensors dtype name in the source ("BF16", ...)
    for file in loading.safetensors_files(source):
        with safe_open(str(file), framework="pt") as f:  # reads the header only
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()
                           if not k.endswith(loading.IGNORED_SUFFIXES)})
    src_layout = loading.detect_layout(list(dtypes))
    as_torch = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    tensors, unknown = {}, []
    for key, dtype in dtypes.items():
        if (name := loading.rename(key, src_layout)) in state:
            value = state.pop(name)  # a model trained in fp32 is merged in fp32, rounded once here
            tensors[key] = value.to(as_torch.get(dtype, value.dtype)).contiguous()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: keys with no parameter in the model: {sorted(unknown)}")
    # Parameters the source lacks (a vision tower given separately) are left out, as in the input.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text((source / "config.json").read_text())
    return out_dir
