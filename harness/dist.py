"""Processes under torchrun: hscr.py and eval.py shard their entries and only synchronise at the end
(gloo); train.py's DDP all-reduces gradients (NCCL on GPUs), its process placed as a `Context`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(backend: str = "gloo") -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group (once) when world size > 1."""
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        # Ranks meet at the end of a shard (hscr.py, eval.py) or at a checkpoint; one may be hours behind.
        dist.init_process_group(backend, timeout=datetime.timedelta(days=7))
    return rank, world, local


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@dataclass
class Context:
    """Where this process runs: rank / world size under torchrun, device, autocast, pad id."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    amp: bool = False
    pad_id: int = 0

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self.amp else contextlib.nullcontext()

    def gather_dicts(self, d: dict) -> dict:
        """The union of every process's `d` (each process gets all of them)."""
        if self.world == 1:
            return d
        parts = [None] * self.world
        dist.all_gather_object(parts, d)
        return {k: v for part in parts for k, v in part.items()}

    def gather_tensors(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t` (all of the same shape), concatenated along dim 0 in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """Within it, DDP does not all-reduce gradients (when `skip`: a micro-step before the last)."""
        return model.no_sync() if self.world > 1 and skip else contextlib.nullcontext()

    def distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return model if self.world == 1 else torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def setup_context(device: str = "auto", autocast: bool = True) -> Context:
    """This process's Context; under torchrun, joins the process group (NCCL on GPUs, else gloo).
    device "auto": the local GPU under torchrun, else cuda if present, else cpu."""
    rank, world, local = dist_env()
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, device, amp=autocast and device.type == "cuda")
