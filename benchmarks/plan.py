"""Plan the GPU run without a GPU: peak memory, FLOPs and a time estimate of every HSCR stage.

The planner builds model/llava.py at a named config (the LLaVA-Med v1.5 Mistral-7B shape or a
tiny one) with *fake* floating-point tensors (shapes and dtypes, no storage: a 7B model costs no
memory here) and runs one real step of each stage through the project's own functions:

    hscr       hscr_step: hscr.visual_token_dropout → hscr.score_two_branches (full + dropped
               branch in one batch) → coupling_scores → select_coupled_positions →
               hallucinated_replacements → graded_negatives → greedy_continuations (model/rows.py)
               (model.generate, one KV cache for the candidates of many entries) →
               teacher_forced_logits of the kept negatives (p_rejected, with --score-negatives), as
               HSCR.process runs them
    train      train_step: train.batch_loss (row_logprobs + the multi-level loss, reference
               log-probs given as cached) → backward → gradient clipping → AdamW, with and
               without train.enable_gradient_checkpointing, at several micro-batch sizes
    reference  reference_step: train.row_logprobs with LoRA disabled, no gradients
    eval       eval_step: one batch of greedy answers, model.generate

and measures each step (`measure`):

    memory  the peak of all live tensors, by kind: frozen weights, LoRA, gradients, optimizer
            state, activations, KV cache, temporaries of the backward pass (`Tracker`, a
            MemTracker from torch.distributed._tools, which follows every storage by category);
    FLOPs   FlopCounterMode's formulas (torch.utils.flop_counter, plus CPU flash attention),
            counted per operator by `OpCost`. FlopCounterMode itself is not stacked on the step:
            its module tracker keeps checkpointed activations alive (tiny model, one training
            step: a 36 MiB peak becomes 79 MiB); tests/test_bench_plan.py checks that both count alike;
    time    a roofline per card: each operator takes max(FLOPs / (u_c · peak FLOP/s), bytes /
            (u_m · bandwidth)) + a launch cost, summed over the step (`OpCost`); u_c, u_m and
            the launch cost are stated assumptions, as are the card figures (`CARDS`).

Fake floats, real integers (`FakeFloats`): floating-point tensors are fake (FakeTensorMode),
integer and boolean tensors real, so token ids, masks, positions and every Python decision made
on them (`.tolist()`, `nonzero`, lengths) run exactly as on a GPU. What is computed *from* fake
floats (an argmax, a sort order, `.item()` of a loss) is a placeholder of the right shape: 0 for
argmax / argmin / `.item()`, a reversed `arange` for sort orders (the coupled positions are then
the last ones of a response: the longest continuations, the worst case). A greedy decode thus
never meets EOS by itself; `FakeFloats(eos_after=m)` makes it stop after m steps, and
`decode_extrapolated` turns runs of 0, 1 and 2 steps into any length (a decode step costs an
affine function of the cache length it reads). The peak needs no extrapolation: the KV cache is
allocated whole before the first step.

Where a CPU run would keep other tensors than a GPU: dropout (LoRA's) keeps a noise tensor on a
CPU and a bool mask on a GPU, so planned models use `CudaDropout` (the GPU's kernel); attention
runs CPU flash attention, which keeps what CUDA's flash / memory-efficient kernels keep (output
and log-sum-exp). Outside the tensors: the CUDA context and cuBLAS workspaces (`RESERVE_GIB`)
and the caching allocator's rounding and fragmentation (`FRAGMENTATION`) enter the verdict
"fits a card" (`device_gib`).

Usage:
    python benchmarks/plan.py                     # LLaVA-Med 7B: tables, answers, hours (~5 min)
    python benchmarks/plan.py --json              # the same as JSON (peak GiB per stage)
    python benchmarks/plan.py --preset tiny --quick
Validation (tests/test_bench_plan.py): at a small config, each stage's fake peak against the same step
run with real tensors on the CPU, tracked the same way: within 10 % (in fact equal).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hscr  # noqa: E402
from harness.cli import dataclass_parser, option  # noqa: E402
from model.llava import left_pad  # noqa: E402
from model.rows import greedy_continuations, mean_token_probability, teacher_forced_logits  # noqa: E402
import train  # noqa: E402
from model.llava import PRESETS, Llava, preset  # noqa: E402
from model.lora import apply_lora, lora_disabled, lora_parameters  # noqa: E402

aten = torch.ops.aten
GIB = 1024 ** 3

# ---------------------------------------------------------------------------------------------
# Cards: peak dense bf16 tensor FLOP/s (FP32 accumulate, no sparsity), memory bandwidth, memory.


@dataclass(frozen=True)
class Card:
    name: str
    flops: float       # dense bf16 FLOP/s
    bandwidth: float   # bytes/s
    memory_gib: float  # total device memory as nvidia-smi reports it
    source: str


CARDS = {
    "rtx3090": Card("RTX 3090", 71e12, 936e9, 24576 / 1024,
                    "NVIDIA Ampere GA102 whitepaper, appendix A (GeForce RTX 3090): peak BF16 tensor TFLOPS with "
                    "FP32 accumulate 71 (142 with sparsity), 936 GB/s GDDR6X; 24576 MiB"),
    "a100-80gb": Card("A100-80GB SXM", 312e12, 2039e9, 81920 / 1024,
                      "NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS (624 with sparsity), 80GB HBM2e at 2,039 GB/s; "
                      "81920 MiB"),
    "h100": Card("H100 SXM", 989e12, 3350e9, 81559 / 1024,
                 "NVIDIA H100 datasheet: BF16 tensor 1,979 TFLOPS with sparsity (989 dense), 80GB HBM3 at 3.35 TB/s; "
                 "81559 MiB"),
}

# Assumptions of the estimate (all stated in the output and in benchmarks/RESULTS.md).
COMPUTE_UTILISATION = 0.5   # u_c: share of peak FLOP/s an eager bf16 matmul reaches
MEMORY_UTILISATION = 0.7    # u_m: share of peak bandwidth a memory-bound kernel reaches
LAUNCH_SECONDS = 10e-6      # per operator: kernel launch + eager PyTorch dispatch
RESERVE_GIB = 1.0           # CUDA context, cuBLAS workspaces: outside the tensors tracked here
FRAGMENTATION = 1.05        # caching allocator: block rounding and fragmentation over the live bytes


def device_gib(tracked_bytes: int) -> float:
    """What a card must hold for `tracked_bytes` of live tensors."""
    return tracked_bytes * FRAGMENTATION / GIB + RESERVE_GIB


# ---------------------------------------------------------------------------------------------
# Fake floating-point tensors, real integers


# Ops that choose indices from floating-point values: the code reads their results (the next
# token, the coupled positions, the candidate tokens), so their placeholders are real.
_ORDERS = {aten.sort.default, aten.sort.stable, aten.topk.default, aten.argsort.default, aten.argsort.stable}
_CHOICES = {aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim, aten.multinomial.default}
_ARGMAX = {aten.argmax.default}


class FakeFloats(TorchDispatchMode):
    """Inside this mode floating-point tensors are fake (no storage) and integer/bool tensors real.

    An op on real inputs only runs for real, except a factory that would make a floating-point
    tensor of more than one element (weights, caches, `randn` images): that one is fake. An op
    with a fake input runs in FakeTensorMode; if it chooses indices (argmax, sort, topk, …) its
    integer outputs become real placeholders (module doc), other outputs stay fake (a dropout
    mask, a comparison of logits: nothing reads them in Python), and `.item()` of a fake tensor
    is 0. A real boolean index into a fake tensor is turned into integer indices first (`x[mask]
    = v` has a data-dependent shape only when the mask is fake).

    `eos_after`: within one generation (`restart()` marks its start) the first `eos_after`
    argmax placeholders are 0 and later ones `eos_id`, so that `model.generate` stops after
    exactly `eos_after` decode steps (the planner extrapolates the cost of longer decodes).
    """

    def __init__(self, eos_id: int | None = None, eos_after: int | None = None):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.eos_id, self.eos_after = eos_id, eos_after
        self.argmax_calls = 0

    def restart(self) -> None:
        self.argmax_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:  # asked thousands of times by autograd: the fast path
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        has_fake = any(isinstance(t, FakeTensor) for t in tensors)
        if not has_fake:
            if tensors:
                return func(*args, **kwargs)
            with self.fake:  # a factory: fake when it makes a float tensor of more than one element
                out = func(*args, **kwargs)
            outs, _ = tree_flatten(out)
            if any(isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel() > 1 for o in outs):
                return out
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            return {torch.bool: False}.get(args[0].dtype, 0.0 if args[0].is_floating_point() else 0)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            args = (args[0], _integer_indices(args[1]), *args[2:])
        with self.fake:
            out = func(*args, **kwargs)
        if func not in _ORDERS and func not in _CHOICES:
            return out
        outs, spec = tree_flatten(out)
        real = []
        for k, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and not o.is_floating_point():
                if func in _ORDERS:
                    o = _reversed_order(o, _dim_argument(func, args, kwargs))
                else:
                    o = torch.full(o.shape, self._choice(func), dtype=o.dtype)
            real.append(o)
        return tree_unflatten(real, spec)

    def _choice(self, func) -> int:
        if func not in _ARGMAX or self.eos_after is None:
            return 0
        self.argmax_calls += 1
        return self.eos_id if self.argmax_calls > self.eos_after else 0


def _integer_indices(indices):
    out = []
    for i in indices:
        if isinstance(i, torch.Tensor) and not isinstance(i, FakeTensor) and i.dtype == torch.bool:
            out += list(i.nonzero(as_tuple=True))  # (mask) → the positions it selects
        else:
            out.append(i)
    return out


def _dim_argument(func, args, kwargs) -> int:
    names = [a.name for a in func._schema.arguments]
    if "dim" in kwargs:
        return kwargs["dim"]
    return args[names.index("dim")] if "dim" in names and names.index("dim") < len(args) else -1


def _reversed_order(like: torch.Tensor, dim: int) -> torch.Tensor:
    n = like.shape[dim]
    shape = [1] * like.dim()
    shape[dim] = n
    return torch.arange(n - 1, -1, -1).view(shape).expand(like.shape).contiguous()


# ---------------------------------------------------------------------------------------------
# Counting: FLOPs of CPU attention, bytes per operator, the roofline


def _attention_flops(query_shape, key_shape, backward: bool = False) -> int:
    """Q Kᵀ and P V: 2 matmuls of 2·B·H·T·S·Dh FLOPs forward, 4 backward (dQ, dK, dV, dP).
    Causality is not discounted (FlopCounterMode's convention); H is the query heads (GQA)."""
    B, H, T, Dh = query_shape
    S = key_shape[-2]
    return (8 if backward else 4) * B * H * T * S * Dh


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, backward=True)


# On the CPU, SDPA runs these ops, which FlopCounterMode does not know (formulas on shapes, as
# FlopCounterMode's `custom_mapping` expects).
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


# In-place writes into a slice of a large tensor: only the written values move, not the whole.
_SCATTERS = {aten.index_copy_.default, aten.index_put_.default, aten.index_add_.default, aten.scatter_.src,
             aten.scatter_add_.default, aten.copy_.default}


# Ops that launch no kernel on a GPU.
_NOT_KERNELS = {aten.detach.default, aten._local_scalar_dense.default, aten.lift_fresh.default}


class OpCost(TorchDispatchMode):
    """Per operator: FLOPs (FlopCounterMode's formulas) and bytes moved (tensor inputs + outputs;
    views move nothing; a scatter into a slice moves its source twice), accumulated per card as
    roofline seconds: max(F / (u_c · P), B / (u_m · BW)) + the launch cost. A composite op that
    arrives whole (under inference_mode) is counted by its parts, as FlopCounterMode does."""

    def __init__(self, cards: dict[str, Card]):
        super().__init__()
        self.cards = cards
        self.flops = 0
        self.bytes = 0
        self.ops = 0
        self.seconds = dict.fromkeys(cards, 0.0)
        # FlopCounterMode's formulas, called as it calls them (tensors in, `out_val` = the output).
        self._fns = {**flop_registry, **{k: shape_wrapper(f) for k, f in CPU_ATTENTION_FLOPS.items()}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fn = self._fns.get(func.overloadpacket)
        if fn is None and func is not torch.ops.prim.device.default:
            # Under inference_mode composite ops (linear, SDPA) arrive whole: count their parts,
            # as FlopCounterMode does.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func.namespace != "aten" or func.is_view or func in _NOT_KERNELS:
            return out
        if not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            return out
        flops = fn(*args, **kwargs, out_val=out) if fn is not None else 0
        if func in _SCATTERS and len(args) > 1:
            source = [t for t in tree_flatten(args[1:])[0] if isinstance(t, torch.Tensor)]
            moved = 2 * max((_nbytes(t) for t in source), default=0)
        else:
            moved = sum(_nbytes(t) for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
        self.flops += flops
        self.bytes += moved
        self.ops += 1
        for name, card in self.cards.items():
            self.seconds[name] += max(flops / (COMPUTE_UTILISATION * card.flops),
                                      moved / (MEMORY_UTILISATION * card.bandwidth)) + LAUNCH_SECONDS
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# Memory by kind


class Tracker(MemTracker):
    """MemTracker for whole stages: a module may run many times in one measured step (the decode
    loop calls every decoder layer once per token; hscr calls the model for scoring and again
    for generation), so a repeated forward starts the module's statistics afresh instead of
    raising; and only the global peak is kept (the per-module peak bookkeeping scans every
    module at every operator, which a 7B decode loop cannot afford)."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        # A frozen parameter cannot take a gradient hook (and gets no gradient): mark it as hooked.
        for p in module.parameters():
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module, inputs):
        if not self._mod_tracker.is_bw and module in self.memory_tracking:
            del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


class _NoHook:
    def remove(self) -> None:
        pass


KINDS = ("weights", "lora", "gradients", "optimizer", "activations", "kv_cache", "temporaries")


def memory_by_kind(snapshot: dict, lora_bytes: int) -> dict[str, int]:
    """MemTracker's categories → ours: parameters split into frozen weights and LoRA; buffers
    are the KV cache (the model has no other buffers); backward temporaries and tensors tracked
    as external ("Other") are temporaries."""
    by = {getattr(k, "value", k): v for k, v in snapshot.items()}
    return {"weights": by.get("Parameter", 0) - lora_bytes, "lora": lora_bytes,
            "gradients": by.get("Gradient", 0), "optimizer": by.get("Optstate", 0),
            "activations": by.get("Activation", 0), "kv_cache": by.get("Buffer", 0),
            "temporaries": by.get("Temp", 0) + by.get("Other", 0)}


@dataclass
class Measurement:
    """One measured step: the peak by kind, FLOPs, bytes moved, operators, roofline seconds."""
    stage: str
    settings: dict
    peak: dict[str, int]          # bytes by kind at the peak
    flops: int
    bytes: int
    ops: int
    seconds: dict[str, float]     # roofline estimate per card
    wall: float                   # seconds the planner took

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak.values())

    def fits(self, card: Card) -> bool:
        return device_gib(self.peak_bytes) <= card.memory_gib

    def to_json(self) -> dict:
        return {"stage": self.stage, "settings": self.settings,
                "peak_gib": round(self.peak_bytes / GIB, 3),
                "device_gib": round(device_gib(self.peak_bytes), 3),
                "peak_gib_by_kind": {k: round(v / GIB, 3) for k, v in self.peak.items()},
                "tflop": round(self.flops / 1e12, 3), "gbytes_moved": round(self.bytes / 1e9, 3), "ops": self.ops,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "fits": {k: self.fits(c) for k, c in CARDS.items()}}


def measure(stage: str, settings: dict, model: Llava, step: Callable[[], None], *,
            optimizer: torch.optim.Optimizer | None = None, floats: FakeFloats | None = None) -> Measurement:
    """Run `step()` once under the memory tracker and OpCost.

    The model (and optimizer state) exist before the step: they are registered as external
    tensors. The KV cache that `model.generate` allocates is re-labelled as a buffer (MemTracker
    counts a new tensor as an activation) by wrapping the model's `setup_cache`, which also
    tells `floats` that a generation starts.
    """
    tracker = Tracker()
    tracker.track_external(model)
    if optimizer is not None:
        tracker.track_external(optimizer)
    setup_cache = model.setup_cache

    def labelled_setup_cache(batch: int, max_len: int):
        setup_cache(batch, max_len)
        if floats is not None:
            floats.restart()
        tracker.track_external(*(layer.self_attn for layer in model.language_model.layers))

    model.setup_cache = labelled_setup_cache
    lora_bytes = sum(_nbytes(p) for p in lora_parameters(model))
    cost = OpCost(CARDS)
    t0 = time.perf_counter()
    try:
        with tracker, cost:
            step()
    finally:
        del model.setup_cache
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
    return Measurement(stage, settings, memory_by_kind(snapshot, lora_bytes), cost.flops, cost.bytes, cost.ops,
                       dict(cost.seconds), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Building models


def resolve_preset(name: str) -> str:
    aliases = {"llava-med-7b": "llava-med-v1.5-mistral-7b"}
    name = aliases.get(name, name)
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; known: {', '.join(sorted(set(PRESETS) | set(aliases)))}")
    return name


class CudaDropout(torch.nn.Module):
    """nn.Dropout as it runs on a GPU, for the LoRA adapters of a planned model (fake and real
    runs alike). CUDA takes the fused `native_dropout`, which keeps a bool mask for the backward
    pass (1 byte per element); on a CPU tensor `F.dropout` multiplies by a noise tensor of the
    input's dtype and keeps that instead: 4 bytes per element of LoRA's fp32 input, ~0.11 MiB
    per token and decoder layer at 7B (7 adapters) that a GPU never holds. Same distribution.
    (SDPA needs no such swap: on both devices it keeps its output and log-sum-exp.)"""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, True)[0] if self.training and 0 < self.p < 1 else x


def build_model(config, dtype: torch.dtype = torch.bfloat16, *, lora: bool = False,
                gradient_checkpointing: bool = False, lora_rank: int = 16) -> Llava:
    """The model with parameters in `dtype`, built with that default dtype (`.to(dtype)` of a
    fake module fails), plus LoRA as train.py applies it (fp32 adapters, its default targets,
    dropout as a GPU runs it: CudaDropout)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Llava(config)
    finally:
        torch.set_default_dtype(previous)
    if lora:
        defaults = train.TrainConfig(model="-", data="-")
        apply_lora(model, defaults.targets, rank=lora_rank, alpha=defaults.lora_alpha, dropout=defaults.lora_dropout)
        for m in model.modules():
            if isinstance(getattr(m, "dropout", None), torch.nn.Dropout):
                m.dropout = CudaDropout(m.dropout.p)
    if gradient_checkpointing:
        train.enable_gradient_checkpointing(model)
    return model


# ---------------------------------------------------------------------------------------------
# Workloads: synthetic entries of the right lengths


@dataclass
class Workload:
    """Lengths of one entry. Defaults: LLaVA-Med's prompt `[INST] <image>\\n{question} [/INST]`
    has ~40 text tokens around the 576 image tokens; responses are capped at 512 in training."""
    prompt_text_tokens: int = 40
    response_tokens: int = 256


def text_ids(config, n: int, rng: torch.Generator) -> list[int]:
    """n random ids above every special id (BOS, EOS, pad, an in-vocabulary image token)."""
    t = config.text
    low = 1 + max(i for i in (t.bos_token_id, t.eos_token_id, t.pad_token_id, config.image_token_id, 0)
                  if i is not None)
    return torch.randint(low, t.vocab_size, (n,), generator=rng).tolist()


def prompt_ids(config, text_tokens: int, rng: torch.Generator) -> list[int]:
    """BOS, the image placeholders, then text."""
    return [config.text.bos_token_id] + [config.image_token_id] * config.num_image_tokens + text_ids(config, text_tokens, rng)


def response_ids(config, tokens: int, rng: torch.Generator) -> list[int]:
    """`tokens` ids ending with EOS."""
    return text_ids(config, tokens - 1, rng) + [config.text.eos_token_id]


def fake_pixels(config, n: int, dtype) -> torch.Tensor:
    size = config.vision.image_size
    return torch.randn(n, config.vision.num_channels, size, size, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The stages


def _hscr_default(name: str):
    """The default of hscr.Options' field `name`: the planner plans what hscr.py runs."""
    return hscr.Options.__dataclass_fields__[name].default


@dataclass
class HscrSettings:
    """hscr.py's defaults (Options): batch of entries, n, c, continuation length, decode rows."""
    batch_size: int = _hscr_default("batch_size")
    top_n: int = _hscr_default("top_n")
    num_candidates: int = _hscr_default("num_candidates")
    num_negatives: int = _hscr_default("num_negatives")
    max_new_tokens: int = _hscr_default("max_new_tokens")
    decode_rows: int = _hscr_default("decode_rows")
    beta: float = _hscr_default("beta")
    drop_ratio: float = _hscr_default("drop_ratio")
    score_negatives: bool = _hscr_default("score_negatives")


def hscr_step(model: Llava, s: HscrSettings, work: Workload, seed: int = 0) -> Callable:
    """Stage 1 for one batch of entries, in HSCR.process's order, through hscr.py's functions."""
    c = model.config
    eos, pad, image = c.text.eos_token_id, c.text.pad_token_id or 0, c.image_token_id
    banned = tuple(t for t in (eos, c.text.bos_token_id, pad, image) if t is not None and t >= 0)

    def step():
        rng = torch.Generator().manual_seed(seed)
        prompts = [prompt_ids(c, work.prompt_text_tokens, rng) for _ in range(s.batch_size)]
        responses = [response_ids(c, work.response_tokens, rng) for _ in range(s.batch_size)]
        generators = [hscr.entry_generator(seed, f"plan-{b}") for b in range(s.batch_size)]
        with torch.no_grad():
            full, dropped = hscr.visual_token_dropout(model, fake_pixels(c, s.batch_size, model.dtype), generators,
                                                      ratio=s.drop_ratio)
            full = list(full)
            drop_prompts = [hscr.with_image_tokens(p, image, f.shape[0]) for p, f in zip(prompts, dropped)]
            lf, ld, targets, valid = hscr.score_two_branches(model, prompts, drop_prompts, full, dropped, responses, pad)
            mean_token_probability(lf, targets, valid).tolist()
            scores = hscr.coupling_scores(lf, ld, targets, valid)
            positions = hscr.select_coupled_positions(scores, targets, valid, s.top_n, eos)
            rows = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], dtype=torch.long)
            cols = torch.tensor([p for ps in positions for p in ps], dtype=torch.long)
            repl, _, _ = hscr.hallucinated_replacements(lf[rows, cols], ld[rows, cols], targets[rows, cols],
                                                        s.num_candidates, s.beta, banned)
            repl = repl.tolist()
            del lf, ld
            candidates, start = [], 0
            for b, ps in enumerate(positions):
                candidates.append(hscr.graded_negatives(responses[b], ps, repl[start:start + len(ps)]))
                start += len(ps)
            owner = [b for b, cands in enumerate(candidates) for _ in cands]
            prefixes = [x for cands in candidates for x in cands]
            tails = greedy_continuations(model, prompts, full, prefixes, owners=owner,
                                         max_new_tokens=s.max_new_tokens, pad_id=pad, rows_per_call=s.decode_rows)
            # The worst case from here on: every continuation ran to max_new_tokens (a fake decode
            # may stop early, see FakeFloats.eos_after; a real one where the model says EOS).
            filler = text_ids(c, 1, rng)[0]
            tails = [t[:s.max_new_tokens - 1] + [filler] * (s.max_new_tokens - 1 - len(t)) + [eos]
                     for t in (tail[:-1] if tail and tail[-1] == eos else tail for tail in tails)]
            # p_rejected (--score-negatives): the j kept negatives of each entry teacher-forced with the full image.
            kept = [(b, i) for b, cands in enumerate(candidates) for i in range(min(s.num_negatives, len(cands)))]
            joined = {}
            k = 0
            for b, cands in enumerate(candidates):
                for i, prefix in enumerate(cands):
                    joined[b, i] = prefix + tails[k]
                    k += 1
            if kept and s.score_negatives:
                logits, t, v = teacher_forced_logits(model, [prompts[b] for b, _ in kept], [full[b] for b, _ in kept],
                                                     [joined[key] for key in kept], pad)
                mean_token_probability(logits, t, v).tolist()
                del logits
    return step


@dataclass
class TrainSettings:
    """train.py's step: micro-batch entries of 1 chosen + `negatives` rejected responses."""
    micro_batch: int = 1
    gradient_checkpointing: bool = False
    negatives: int = 3
    logit_chunk: int = 256
    amp: bool = True  # train.py uses bf16 autocast on a GPU (CPU autocast stands in for it)


def train_examples(config, s: TrainSettings, work: Workload, seed: int = 0) -> list:
    rng = torch.Generator().manual_seed(seed)
    examples = []
    for e in range(s.micro_batch):
        prompt = prompt_ids(config, work.prompt_text_tokens, rng)
        responses = [response_ids(config, work.response_tokens, rng) for _ in range(1 + s.negatives)]
        examples.append(train.Example(f"plan-{e}", Path(f"plan-{e}.png"), [prompt + r for r in responses],
                                      [[False] * len(prompt) + [True] * len(r) for r in responses]))
    return examples


@contextlib.contextmanager
def fake_image_loading(dtype):
    """train.batch_loss reads the entries' images; here they are tensors of the right shape."""
    original = train.batch_pixels

    def load_pixels(examples, image_size, aspect="pad"):
        n = sum(ex.image is not None for ex in examples)
        return torch.randn(n, 3, image_size, image_size, dtype=dtype) if n else None

    train.batch_pixels = load_pixels
    try:
        yield
    finally:
        train.batch_pixels = original


def train_setup(model: Llava) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters with its state already allocated (a step after the first)."""
    params = list(lora_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def train_step(model: Llava, optimizer, s: TrainSettings, work: Workload, seed: int = 0) -> Callable:
    """One optimizer step of one micro-batch through train.batch_loss, as train.train's loop runs it."""
    cfg = train.TrainConfig(model="-", data="-", micro_batch=s.micro_batch, num_negatives=s.negatives,
                            logit_chunk=s.logit_chunk, gradient_checkpointing=s.gradient_checkpointing)
    ctx = train.Context(device=model.device, amp=s.amp, pad_id=model.config.text.pad_token_id or 0)
    params = list(lora_parameters(model))

    def step():
        batch = train_examples(model.config, s, work, seed)
        ref = {ex.id: [0.0] * len(ex.rows) for ex in batch}  # cached reference log-probs
        model.train()
        with fake_image_loading(model.dtype):
            loss, _ = train.batch_loss(model, model, batch, ref, cfg, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


@dataclass
class EvalSettings:
    batch_size: int = 8
    max_new_tokens: int = 64


def eval_step(model: Llava, s: EvalSettings, work: Workload, seed: int = 0) -> Callable:
    """eval.generate_answers' model call: left-padded prompts, greedy, with images."""
    c = model.config

    def step():
        rng = torch.Generator().manual_seed(seed)
        # Questions differ in length (left padding); the first is the longest.
        shorter = [0] + torch.randint(0, min(8, work.prompt_text_tokens), (s.batch_size - 1,), generator=rng).tolist()
        rows = [prompt_ids(c, work.prompt_text_tokens - d, rng) for d in shorter]
        ids, mask = left_pad(rows, c.text.pad_token_id or 0)
        with torch.inference_mode():
            model.generate(ids, fake_pixels(c, s.batch_size, model.dtype), mask, max_new_tokens=s.max_new_tokens,
                           eos_token_id=c.text.eos_token_id)
    return step


def reference_step(model: Llava, s: TrainSettings, work: Workload, seed: int = 0) -> Callable:
    """One micro-batch of train.logprobs_by_id under lora_disabled (train.py's log π_ref), no gradients."""
    ctx = train.Context(device=model.device, amp=s.amp, pad_id=model.config.text.pad_token_id or 0)

    def step():
        batch = train_examples(model.config, s, work, seed)
        model.eval()
        with torch.no_grad(), lora_disabled(model), ctx.autocast(), fake_image_loading(model.dtype):
            train.row_logprobs(model, model, train.collate(batch, ctx.pad_id).to(ctx.device),
                               train.batch_pixels(batch, model.config.vision.image_size), s.logit_chunk)
    return step


# ---------------------------------------------------------------------------------------------
# Running a stage: build, measure, and extrapolate decode loops


def run_stage(config, stage: str, settings, work: Workload, *, fake: bool = True, dtype=torch.bfloat16,
              floats: FakeFloats | None = None) -> Measurement:
    """Build the model for `stage` ("hscr", "train", "reference", "eval") and measure one step.

    fake: inside `floats` (a FakeFloats, made here if not given); otherwise with real tensors
    (the validation at a small config)."""
    if fake and floats is None:
        floats = FakeFloats(config.text.eos_token_id)
    with floats if fake else contextlib.nullcontext():
        is_train = stage in ("train", "reference")
        model = build_model(config, dtype, lora=is_train,
                            gradient_checkpointing=stage == "train" and settings.gradient_checkpointing)
        optimizer = None
        if stage == "hscr":
            model.eval()
            step = hscr_step(model, settings, work)
        elif stage == "eval":
            model.eval()
            step = eval_step(model, settings, work)
        elif stage == "train":
            optimizer = train_setup(model)
            step = train_step(model, optimizer, settings, work)
        elif stage == "reference":
            step = reference_step(model, settings, work)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        label = {**dataclasses.asdict(settings), **dataclasses.asdict(work)}
        return measure(stage, label, model, step, optimizer=optimizer, floats=floats if fake else None)


def decode_extrapolated(config, stage: str, settings, work: Workload, decode_steps: int) -> Measurement:
    """The step with `decode_steps` decode steps per generation, from fake runs that stop after
    0, 1 and 2 (FakeFloats.eos_after). A decode step's FLOPs, bytes and roofline time grow
    linearly with the cache length it reads, so a generation's total is quadratic in its step
    count and three runs fix it exactly. The peak is the largest of the three: the cache is
    allocated whole before the first step, so later steps add nothing to it."""
    runs = []
    for m in range(3):
        floats = FakeFloats(config.text.eos_token_id, eos_after=m)
        runs.append(run_stage(config, stage, settings, work, floats=floats))

    def at(f0, f1, f2):
        c = (f2 - 2 * f1 + f0) / 2
        return f0 + (f1 - f0 - c) * decode_steps + c * decode_steps ** 2

    top = max(runs, key=lambda r: r.peak_bytes)
    return Measurement(stage, {**top.settings, "decode_steps": decode_steps}, top.peak,
                       round(at(*(r.flops for r in runs))), round(at(*(r.bytes for r in runs))),
                       round(at(*(r.ops for r in runs))),
                       {k: at(*(r.seconds[k] for r in runs)) for k in CARDS}, sum(r.wall for r in runs))


# ---------------------------------------------------------------------------------------------
# The plan: memory of every stage, the largest settings per card, hours of the paper's run


@dataclass
class PlanConfig:
    preset: str = option("llava-med-7b", "model/llava.py preset (llava-med-7b = llava-med-v1.5-mistral-7b; tiny)")
    prompt_text_tokens: int = option(40, "text tokens of a prompt besides the image tokens")
    max_response_tokens: int = option(512, "longest response (train.py --max-response-tokens): memory verdicts")
    mean_response_tokens: int = option(256, "assumed typical response length: time estimates")
    hscr_batch: int = option(8, "hscr.py --batch-size (entries per batch)")
    hscr_max_new_tokens: int = option(256, "hscr.py --max-new-tokens (continuations run to it in the estimate)")
    eval_max_new_tokens: int = option(1024, "eval.py --max-new-tokens: sizes the KV cache")
    eval_decode_tokens: int = option(128, "assumed decode steps of an eval batch (its longest answer): time")
    entries: int = option(2000, "entries of the paper's run (hscr and training)")
    epochs: int = option(2, "training epochs")
    batch_size: int = option(16, "global batch of the paper's run (train.py --batch-size)")
    eval_questions: int = option(451 + 1061 + 6719, "VQA-RAD + SLAKE + PathVQA test questions")
    quick: bool = option(False, "default settings only: no search for the largest batch sizes, no hours")
    json: bool = option(False, "print the report as JSON")


HSCR_ROWS = (16, 32, 64)           # hscr.py --decode-rows tried
EVAL_BATCHES = (8, 16, 32, 64)     # eval.py --batch-size tried
FLEETS = (("rtx3090", 8), ("a100-80gb", 1), ("h100", 1))  # (card, number of cards) of the hours table
MAX_MICRO_BATCH = 64               # the search stops here (the paper's global batch is 16)


def largest_fitting(peaks: dict[int, int], card: Card) -> int | None:
    """The largest key whose peak fits the card, or None."""
    fitting = [k for k, p in peaks.items() if device_gib(p) <= card.memory_gib]
    return max(fitting) if fitting else None


def largest_micro_batch(config, gc: bool, work: Workload, measured: dict[int, Measurement], card: Card,
                        log) -> int:
    """Largest micro-batch that fits `card`: the peak is affine in the micro-batch (weights +
    per-entry activations), so mb 1 and 2 give the line; the answer is then measured, and
    lowered until it fits. 0 when even mb 1 does not fit."""
    p1, p2 = measured[1].peak_bytes, measured[2].peak_bytes
    if device_gib(p1) > card.memory_gib:
        return 0
    per_entry = max(p2 - p1, 1)
    budget = (card.memory_gib - RESERVE_GIB) * GIB / FRAGMENTATION
    mb = min(MAX_MICRO_BATCH, max(1, int((budget - p1) // per_entry) + 1))
    while mb > 2:
        if mb not in measured:
            log(f"train gc={gc} micro-batch {mb} (check for {card.name})")
            measured[mb] = run_stage(config, "train", TrainSettings(micro_batch=mb, gradient_checkpointing=gc), work)
        if measured[mb].fits(card):
            return mb
        mb -= 1
    return mb if measured[mb].fits(card) else mb - 1


def plan(cfg: PlanConfig, log=print) -> dict:
    """Every measurement, the answers and the hours; see the module doc."""
    config = preset(resolve_preset(cfg.preset))
    # max_seq_len bounds the KV cache, not the weights: make room for the workload's longest row.
    longest = (1 + config.num_image_tokens + cfg.prompt_text_tokens + cfg.max_response_tokens
               + max(cfg.hscr_max_new_tokens, cfg.eval_max_new_tokens))
    config.text = dataclasses.replace(config.text, max_seq_len=max(config.text.max_seq_len, longest))
    worst = Workload(cfg.prompt_text_tokens, cfg.max_response_tokens)
    typical = Workload(cfg.prompt_text_tokens, cfg.mean_response_tokens)
    t0 = time.perf_counter()
    memory: list[Measurement] = []

    # Memory at the longest responses: hscr over decode rows, train over GC and micro-batch, eval over batch.
    hscr_peaks = {}
    for rows in (HSCR_ROWS[-1:] if cfg.quick else HSCR_ROWS):
        log(f"hscr decode rows {rows}")
        s = HscrSettings(batch_size=cfg.hscr_batch, max_new_tokens=cfg.hscr_max_new_tokens, decode_rows=rows)
        m = run_stage(config, "hscr", s, worst, floats=FakeFloats(config.text.eos_token_id, eos_after=1))
        memory.append(m)
        hscr_peaks[rows] = m.peak_bytes
    train_runs: dict[bool, dict[int, Measurement]] = {False: {}, True: {}}
    for gc in (False, True):
        for mb in (1, 2):
            log(f"train gc={gc} micro-batch {mb}")
            train_runs[gc][mb] = run_stage(config, "train", TrainSettings(micro_batch=mb, gradient_checkpointing=gc), worst)
    eval_peaks = {}
    for batch in (EVAL_BATCHES[:1] if cfg.quick else EVAL_BATCHES):
        log(f"eval batch {batch}")
        s = EvalSettings(batch_size=batch, max_new_tokens=cfg.eval_max_new_tokens)
        m = run_stage(config, "eval", s, worst, floats=FakeFloats(config.text.eos_token_id, eos_after=1))
        memory.append(m)
        eval_peaks[batch] = m.peak_bytes

    largest = {}
    if not cfg.quick:
        for name, card in CARDS.items():
            largest[name] = {f"gc_{'on' if gc else 'off'}": largest_micro_batch(config, gc, worst, train_runs[gc], card, log)
                             for gc in (False, True)}
    for gc in (False, True):
        memory += [train_runs[gc][mb] for mb in sorted(train_runs[gc])]
    report = {"preset": resolve_preset(cfg.preset), "config": dataclasses.asdict(cfg),
              "assumptions": assumptions(), "cards": {k: dataclasses.asdict(c) for k, c in CARDS.items()},
              "memory": [m.to_json() for m in memory], "largest_micro_batch": largest,
              "hscr_decode_rows": {k: largest_fitting(hscr_peaks, c) for k, c in CARDS.items()},
              "eval_batch": {k: largest_fitting(eval_peaks, c) for k, c in CARDS.items()}}
    if not cfg.quick:
        report["time"], report["hours"] = hours(config, cfg, typical, report, train_runs, log)
    report["planner_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def assumptions() -> dict:
    return {"compute_utilisation": COMPUTE_UTILISATION, "memory_utilisation": MEMORY_UTILISATION,
            "launch_seconds_per_op": LAUNCH_SECONDS, "reserve_gib": RESERVE_GIB, "fragmentation": FRAGMENTATION}


def hours(config, cfg: PlanConfig, work: Workload, report: dict, train_runs, log) -> tuple[list, dict]:
    """Step times at the settings each card allows (typical lengths), and the paper's run in hours:
    hscr over the entries, reference log-probs once, 2 epochs of training with held-out
    evaluation every 50 steps on 5 % of the entries, and the three VQA test sets; data-parallel
    stages split evenly over the cards, training exchanges only LoRA gradients (ignored)."""
    timed: dict[tuple, Measurement] = {}

    def timed_run(key, make):
        if key not in timed:
            log(f"time: {key}")
            timed[key] = make()
        return timed[key]

    held_out = round(0.05 * cfg.entries)
    steps = (cfg.entries - held_out) // cfg.batch_size * cfg.epochs
    evaluations = steps // 50 + (steps % 50 != 0)
    out = {}
    for name, n in FLEETS:
        card = CARDS[name]
        rows, batch = report["hscr_decode_rows"][name], report["eval_batch"][name]
        per_card = cfg.batch_size // n
        gc = not train_runs[False][1].fits(card)
        mb = min(report["largest_micro_batch"][name][f"gc_{'on' if gc else 'off'}"], per_card)
        if rows is None or batch is None or mb < 1:
            out[f"{n}x {name}"] = {"fits": False}
            continue
        hs = HscrSettings(batch_size=cfg.hscr_batch, max_new_tokens=cfg.hscr_max_new_tokens, decode_rows=rows)
        h = timed_run(("hscr", rows), lambda: decode_extrapolated(config, "hscr", hs, work, cfg.hscr_max_new_tokens - 1))
        ts = TrainSettings(micro_batch=mb, gradient_checkpointing=gc)
        t = timed_run(("train", mb, gc), lambda: run_stage(config, "train", ts, work))
        r = timed_run(("reference", mb), lambda: run_stage(config, "reference", TrainSettings(micro_batch=mb), work))
        es = EvalSettings(batch_size=batch, max_new_tokens=cfg.eval_max_new_tokens)
        e = timed_run(("eval", batch), lambda: decode_extrapolated(config, "eval", es, work, cfg.eval_decode_tokens - 1))
        micro_steps = math.ceil(per_card / mb)
        seconds = {
            "hscr": math.ceil(cfg.entries / cfg.hscr_batch / n) * h.seconds[name],
            "reference": math.ceil(cfg.entries / n / mb) * r.seconds[name],
            "train": steps * micro_steps * t.seconds[name],
            "held_out": evaluations * math.ceil(held_out / n / mb) * r.seconds[name],
            "eval": math.ceil(cfg.eval_questions / batch / n) * e.seconds[name],
        }
        out[f"{n}x {name}"] = {"fits": True, "settings": {"hscr_decode_rows": rows, "train_micro_batch": mb,
                                                          "gradient_checkpointing": gc, "eval_batch": batch},
                               "hours": {k: round(v / 3600, 2) for k, v in seconds.items()},
                               "total_hours": round(sum(seconds.values()) / 3600, 2)}
    return [m.to_json() for m in timed.values()], out


# ---------------------------------------------------------------------------------------------
# Output


def _settings_text(m: dict) -> str:
    s = m["settings"]
    if m["stage"] == "hscr":
        text = f"{s['batch_size']} entries, n={s['top_n']}, c={s['num_candidates']}, decode rows {s['decode_rows']}, " \
               f"+{s['max_new_tokens']} new"
    elif m["stage"] in ("train", "reference"):
        text = f"mb {s['micro_batch']} × (1+{s['negatives']}), GC {'on' if s['gradient_checkpointing'] else 'off'}"
    else:
        text = f"batch {s['batch_size']}, cache +{s['max_new_tokens']} new"
    text += f", response {s['response_tokens']}" if m["stage"] != "eval" else ""
    return text + (f", {s['decode_steps']} decode steps" if "decode_steps" in s else "")


def memory_table(memory: list[dict]) -> str:
    head = ("| stage | settings | weights | LoRA | grads | optim. | activ. | KV cache | temp. | peak GiB "
            "| on a card GiB | fits RTX 3090 | fits H100 |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 11]
    for m in memory:
        k = m["peak_gib_by_kind"]
        cells = [m["stage"], _settings_text(m)] + [f"{k[x]:.2f}" for x in KINDS]
        cells += [f"{m['peak_gib']:.2f}", f"{m['device_gib']:.2f}",
                  "yes" if m["fits"]["rtx3090"] else "no", "yes" if m["fits"]["h100"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(timed: list[dict]) -> str:
    lines = ["| stage | settings | TFLOP | GB moved | ops | " + " | ".join(f"s on {c.name}" for c in CARDS.values()) + " |",
             "|---|---|" + "---:|" * (3 + len(CARDS))]
    for m in timed:
        cells = [m["stage"], _settings_text(m), f"{m['tflop']:.1f}", f"{m['gbytes_moved']:.0f}", str(m["ops"])]
        cells += [f"{m['seconds'][k]:.2f}" for k in CARDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hours_table(hours: dict) -> str:
    stages = ("hscr", "reference", "train", "held_out", "eval")
    lines = ["| cards | settings | " + " | ".join(stages) + " | total h |", "|---|---|" + "---:|" * (len(stages) + 1)]
    for fleet, h in hours.items():
        if not h["fits"]:
            lines.append(f"| {fleet} | does not fit |" + " |" * (len(stages) + 1))
            continue
        s = h["settings"]
        text = (f"decode rows {s['hscr_decode_rows']}, mb {s['train_micro_batch']}, GC "
                f"{'on' if s['gradient_checkpointing'] else 'off'}, eval batch {s['eval_batch']}")
        lines.append(f"| {fleet} | {text} | " + " | ".join(f"{h['hours'][x]:.2f}" for x in stages)
                     + f" | {h['total_hours']:.2f} |")
    return "\n".join(lines)


def render(report: dict) -> str:
    a = report["assumptions"]
    out = [f"Plan for {report['preset']} (fake tensors; peak = live tensors at the peak, by kind, GiB; "
           f"on a card = peak × {a['fragmentation']} + {a['reserve_gib']} GiB)", "", memory_table(report["memory"])]
    if report["largest_micro_batch"]:
        out += ["", "Largest train micro-batch (entries of 1 + 3 responses, longest responses):", "",
                "| card | GC off | GC on |", "|---|---:|---:|"]
        out += [f"| {CARDS[k].name} | {v['gc_off']} | {v['gc_on']} |" for k, v in report["largest_micro_batch"].items()]
    out += ["", "Largest hscr decode rows / eval batch (of those tried) that fit: "
            + "; ".join(f"{CARDS[k].name} {report['hscr_decode_rows'][k]} / {report['eval_batch'][k]}" for k in CARDS)]
    if "time" in report:
        out += ["", f"Step times (roofline: max(FLOPs / ({a['compute_utilisation']} × peak), bytes / "
                f"({a['memory_utilisation']} × bandwidth)) + {a['launch_seconds_per_op'] * 1e6:.0f} µs per op; "
                "typical lengths):", "", time_table(report["time"]), "",
                "The paper's run in hours:", "", hours_table(report["hours"])]
    out += ["", "Cards: " + "; ".join(f"{c['name']}: {c['source']}" for c in report["cards"].values()),
            f"Planner time: {report['planner_seconds']} s"]
    return "\n".join(out)


def main(argv=None) -> dict:
    parser = dataclass_parser(PlanConfig, prog="python benchmarks/plan.py", description=__doc__.split("\n")[0])
    cfg = PlanConfig(**vars(parser.parse_args(argv)))
    torch.set_num_threads(1)  # fake tensors compute nothing; the real integer work is tiny
    log = (lambda msg: print(msg, file=sys.stderr)) if cfg.json else (lambda msg: print(f"... {msg}", file=sys.stderr))
    report = plan(cfg, log)
    print(json.dumps(report, indent=1) if cfg.json else render(report))
    return report


if __name__ == "__main__":
    main()
