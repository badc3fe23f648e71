"""Fused self-contrast softmax: HSCR's contrast reward P_diff in one pass over the logits.

HSCR (docs/METHOD.md, stage 1, step 3) contrasts the model with and without most of its visual
tokens. At a position, with logits `full` (image kept) and `drop` (70% of the visual tokens dropped):

    z      = (1 + β) · full − β · drop                       (β = 0.9 in the paper)
    P_diff = softmax(z)                                      over the vocabulary (last dim)

`index` (..., K) returns P_diff at those ids only: hscr.py's gather mode, reading 2·V logits per row
and writing K values. Edge cases, defined here and followed by both implementations:
- full_v = −inf ⇒ z_v = −inf whatever drop_v is (the limit for β ≥ 0; no −inf + inf = NaN).
- β = 0 ⇒ z = full exactly; drop is not used (0 · ±inf would otherwise give NaN).
- full_v finite, drop_v = −inf, β > 0 ⇒ z_v = +inf: the row's +inf entries share its mass equally.
- z = −inf everywhere ⇒ NaN, as `torch.softmax` gives. NaN inputs are not supported (GPU max may skip NaN).

`contrast_softmax_reference` is the specification (PyTorch, fp32). `_contrast_softmax_kernel` (Triton;
the layout of tutorial 02-fused-softmax and Liger's `ops/softmax.py`) runs one program per row in fp32,
the whole row in registers up to 64 KiB per input (V ≤ 32768 in fp16/bf16: Mistral/LLaMA's 32000, 32064),
else (Qwen's V = 151936) an online max/sum over blocks, then a second pass to write. `contrast_softmax`
checks its inputs and dispatches; inference only (the reward is a fixed target).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Largest block, in bytes of one input: 32768 fp16/bf16 or 16384 fp32 values over 32 warps. With 32768
# fp32 values ptxas (triton 3.8, sm_80-sm_90) spills 16-60 bytes per thread (benchmarks/RESULTS.md).
MAX_BLOCK_BYTES = 65536
# Gather mode reads the K requested ids in chunks of this many.
BLOCK_K = 64
BACKENDS = ("auto", "triton", "torch")


# Reference (the specification)
def contrast_softmax_reference(full: Tensor, drop: Tensor, beta: float = 0.9, *,
                               index: Tensor | None = None) -> Tensor:
    """P_diff = softmax((1+β)·full − β·drop) in fp32, unchecked (`contrast_softmax` checks)."""
    f, d = full.float(), drop.float()  # (..., V)
    # f + β(f − d) rather than (1+β)f − βd: one rounding less when |f| is large.
    z = f if beta == 0 else f + beta * (f - d)
    z = z.masked_fill(f == -math.inf, -math.inf)
    m = z.amax(dim=-1, keepdim=True)  # (..., 1)
    # +inf entries (only when m = +inf) share the row; −inf entries weigh 0 even when m = −inf.
    e = torch.where(z == -math.inf, 0.0, torch.where(z == math.inf, 0.0, z - m).exp())
    out = e / e.sum(dim=-1, keepdim=True)
    return out if index is None else out.gather(-1, index.long())  # (..., V) or (..., K)


# Triton kernel
@triton.jit
def _logits_at(full_ptr, drop_ptr, cols, mask, f_sv, d_sv, beta):
    """z = f + β(f − d) in fp32 at the columns `cols` of a row (the module doc's rules for −inf, β = 0).
    Masked lanes get full = −inf, hence z = −inf: nothing to max or sum. fp16/bf16 widen as they load."""
    f = tl.load(full_ptr + cols * f_sv, mask=mask, other=float("-inf")).to(tl.float32)
    d = tl.load(drop_ptr + cols * d_sv, mask=mask, other=0.0).to(tl.float32)
    z = f + beta * (f - d)
    z = tl.where(beta == 0.0, f, z)
    return tl.where(f > float("-inf"), z, float("-inf"))  # −inf in full is always ruled out


@triton.jit
def _weights(z, m):
    """exp(z − m) for the logits z of a row with max m, with the reference's rules for ±inf."""
    shifted = tl.where(z == float("inf"), 0.0, z - m)
    return tl.where(z == float("-inf"), 0.0, tl.exp(shifted))


@triton.jit
def _contrast_softmax_kernel(full_ptr, drop_ptr, index_ptr, out_ptr, n_inner, V, K,
                             f_s0, f_s1, f_sv, d_s0, d_s1, d_sv, i_s0, i_s1, i_sk, beta,
                             BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                             GATHER: tl.constexpr):
    # One program per row. Rows are the leading dims flattened into (outer, inner), each with its own
    # stride (f_ full, d_ drop, i_ index), so a slice like logits[:, 3:9, :V] is read in place.
    row = tl.program_id(0).to(tl.int64)
    outer, inner = row // n_inner, row % n_inner
    full_ptr += outer * f_s0 + inner * f_s1
    drop_ptr += outer * d_s0 + inner * d_s1
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        # The whole row in registers: one read of each input.
        z = _logits_at(full_ptr, drop_ptr, cols, cols < V, f_sv, d_sv, beta)  # (BLOCK,)
        m = tl.max(z, axis=0)
        s = tl.sum(_weights(z, m), axis=0)
    else:
        # Online max and sum (Milakov & Gimelshein 2018): rescale s whenever m grows.
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.full((), 0.0, tl.float32)
        for b in range(tl.cdiv(V, BLOCK)):
            c = b * BLOCK + cols
            z = _logits_at(full_ptr, drop_ptr, c, c < V, f_sv, d_sv, beta)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # exp(m − m_new) is NaN when both are the same infinity; the scale is then 1.
            scale = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
            s = s * scale + tl.sum(_weights(z, m_new), axis=0)
            m = m_new
    if GATHER:
        # Only the K requested ids: read them back from the inputs (L2-hot) and write K values.
        index_ptr += outer * i_s0 + inner * i_s1
        out_ptr += row * K
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            idx = tl.load(index_ptr + ks * i_sk, mask=kmask, other=0).to(tl.int64)
            # The launcher rejects ids outside [0, V); the mask keeps memory safe regardless.
            valid = kmask & (idx >= 0) & (idx < V)
            # (zk, not z: Triton wants fixed shapes per name)
            zk = _logits_at(full_ptr, drop_ptr, idx, valid, f_sv, d_sv, beta)
            tl.store(out_ptr + ks, tl.where(valid, _weights(zk, m) / s, float("nan")), mask=kmask)
    else:
        out_ptr += row * V  # the output is contiguous (..., V)
        if ONE_BLOCK:
            tl.store(out_ptr + cols, _weights(z, m) / s, mask=cols < V)
        else:
            for b in range(tl.cdiv(V, BLOCK)):
                c = b * BLOCK + cols
                z = _logits_at(full_ptr, drop_ptr, c, c < V, f_sv, d_sv, beta)
                tl.store(out_ptr + c, _weights(z, m) / s, mask=c < V)


# True under TRITON_INTERPRET=1 (set before triton's import): the kernel then runs on CPU tensors, not CUDA.
INTERPRETED = type(_contrast_softmax_kernel).__name__ == "InterpretedFunction"


# Launcher
def _row_layout(tensors: list[Tensor]) -> tuple[list[Tensor], int, int, list[tuple[int, int]]]:
    """(tensors, n_outer, n_inner, [(stride_outer, stride_inner)] per tensor), row r = outer·n_inner + inner.
    Adjacent leading dims merge where every tensor allows (size-1 dims drop out); > 2 groups: contiguous."""
    lead = tensors[0].shape[:-1]
    groups: list[list[int]] = []
    for i, n in enumerate(lead):
        if n > 1 and groups and all(t.stride(groups[-1][-1]) == t.stride(i) * n for t in tensors):
            groups[-1].append(i)
        elif n > 1:
            groups.append([i])
    if len(groups) > 2:
        return _row_layout([t.contiguous() for t in tensors])
    groups = [[]] * (2 - len(groups)) + groups  # exactly two: empty ones (size 1, stride 0) in front
    strides = [tuple(t.stride(g[-1]) if g else 0 for g in groups) for t in tensors]
    return tensors, *(math.prod(lead[i] for i in g) for g in groups), strides


def contrast_softmax_triton(full: Tensor, drop: Tensor, beta: float = 0.9, *, index: Tensor | None = None,
                            block_size: int | None = None) -> Tensor:
    """Run the Triton kernel; arguments as `contrast_softmax`, which validates them. `block_size` (a power
    of two) overrides the block, so tests reach the looped path on short rows and benchmarks compare."""
    V = full.shape[-1]
    out = full.new_empty((*full.shape[:-1], V if index is None else index.shape[-1]), dtype=torch.float32)
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"contrast_softmax_triton: block_size must be a power of two, got {block_size}")
    if out.numel() == 0:
        return out
    # Column offsets are int32 inside the kernel: a huge column stride needs a copy.
    tensors = [t if (V - 1) * t.stride(-1) < 2**31 else t.contiguous() for t in (full, drop)]
    gather = index is not None
    tensors, n_outer, n_inner, strides = _row_layout(tensors + [index] if gather else tensors)
    full, drop, index = tensors if gather else (*tensors, tensors[0])  # no index: `full` as a dummy pointer
    # One block for rows up to MAX_BLOCK_BYTES, else a loop over blocks of it. Warps grow with the block so
    # that a thread holds ≤ 32 values per array (Unsloth / Liger's `calculate_settings`), and 32 from 16384
    # on (with 16, sm_90a spills in gather mode).
    block = block_size or min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK_BYTES // full.element_size())
    warps = 32 if block >= 16384 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    _contrast_softmax_kernel[(n_outer * n_inner,)](
        full, drop, index, out, n_inner, V, out.shape[-1] if gather else 0, *strides[0], full.stride(-1),
        *strides[1], drop.stride(-1), *(strides[2] if gather else (0, 0)), index.stride(-1), float(beta),
        BLOCK=block, ONE_BLOCK=V <= block, BLOCK_K=BLOCK_K, GATHER=gather, num_warps=warps)
    return out


# Public function
def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" → "triton" on CUDA tensors, "torch" elsewhere; a forced backend is checked."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and not INTERPRETED else "torch"
    if backend == "triton":
        if device.type == "cuda" and INTERPRETED:
            raise ValueError("contrast_softmax: backend='triton' on CUDA tensors, but TRITON_INTERPRET=1 "
                             "made the kernel an interpreted one; unset it before importing triton")
        if device.type == "cpu" and not INTERPRETED:
            raise ValueError("contrast_softmax: backend='triton' on CPU tensors needs the Triton "
                             "interpreter: set TRITON_INTERPRET=1 before triton is imported")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"contrast_softmax: backend='triton' does not run on {device.type}")
    return backend


def contrast_softmax(full: Tensor, drop: Tensor, beta: float = 0.9, *, index: Tensor | None = None,
                     backend: str = "auto") -> Tensor:
    """P_diff = softmax((1+β)·full − β·drop) over the last dim, as fp32 (see the module doc).
    full, drop: (..., V) logits of the full and the dropped branch, same shape, dtype (float32, float16
    or bfloat16) and device, any strides; index: None, or (..., K) int64/int32 ids in [0, V) → (..., K).
    backend: "triton" (the kernel; on CPU only under TRITON_INTERPRET=1), "torch" (the fp32 reference)
    or "auto" (triton on CUDA tensors). Raises one ValueError listing every problem with the arguments."""
    problems: list[str] = []
    if not isinstance(full, Tensor) or not isinstance(drop, Tensor):
        raise ValueError(f"contrast_softmax: full and drop must be tensors, got {type(full).__name__} "
                         f"and {type(drop).__name__}")
    if full.ndim == 0:
        problems.append("full must have at least one dim (..., V)")
    elif full.shape[-1] == 0:
        problems.append("the last dim (V) is empty: there is no distribution to normalise")
    if full.shape != drop.shape:
        problems.append(f"full has shape {tuple(full.shape)} but drop has {tuple(drop.shape)}")
    if not {full.dtype, drop.dtype} <= {torch.float32, torch.float16, torch.bfloat16}:
        problems.append(f"dtypes must be float32, float16 or bfloat16, got {full.dtype} and {drop.dtype}")
    elif full.dtype != drop.dtype:
        problems.append(f"full is {full.dtype} but drop is {drop.dtype}")
    if full.device != drop.device:
        problems.append(f"full is on {full.device} but drop is on {drop.device}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 <= beta < math.inf):
        problems.append(f"beta must be a finite number >= 0, got {beta!r}")
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {BACKENDS}, got {backend!r}")
    if index is not None and not isinstance(index, Tensor):
        problems.append(f"index must be a tensor, got {type(index).__name__}")
    elif index is not None:
        if index.dtype not in (torch.int64, torch.int32):
            problems.append(f"index must be int64 or int32, got {index.dtype}")
        if index.ndim != full.ndim or index.shape[:-1] != full.shape[:-1]:
            problems.append(f"index has shape {tuple(index.shape)}; expected (..., K) with leading dims "
                            f"{tuple(full.shape[:-1])} of full")
        if index.device != full.device:
            problems.append(f"index is on {index.device} but full is on {full.device}")
    if torch.is_grad_enabled() and (full.requires_grad or drop.requires_grad):
        problems.append("inputs require grad: contrast_softmax is inference only (no autograd); "
                        "call it under torch.no_grad() or pass detached tensors")
    # Ids outside the vocabulary would read out of bounds (the one host sync of a call on GPU).
    if not problems and index is not None and bool(((index < 0) | (index >= full.shape[-1])).any()):
        problems.append(f"index holds ids in [{int(index.min())}, {int(index.max())}], "
                        f"outside [0, {full.shape[-1]})")
    if problems:
        raise ValueError("contrast_softmax: " + "; ".join(problems))
    if resolve_backend(backend, full.device) == "triton":
        return contrast_softmax_triton(full, drop, beta, index=index)
    return contrast_softmax_reference(full, drop, beta, index=index)
