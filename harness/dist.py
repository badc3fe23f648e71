"""Processes under torchrun: where this one runs, and the process group, set up in one place.

hscr.py and eval.py shard their entries over the ranks and only synchronise at the end (gloo);
train.py's DDP all-reduces gradients (NCCL on GPUs). All use one timeout, long enough for ranks
that finish their share hours apart.
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist

# Ranks meet at the end of a shard (hscr.py, eval.py) or at a checkpoint; one may be hours behind.
TIMEOUT = datetime.timedelta(days=7)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(backend: str = "gloo") -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group (once) when world size > 1."""
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return rank, world, local


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
