"""Data parallelism for the tower methods: each process takes a slice of every support batch, gradients are
summed across processes, so every process takes the same step as one process on the whole batch.

Works under ``accelerate launch`` / ``torchrun`` (which set ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...):
the process group is created on first use when the environment asks for more than one process and none
exists yet (NCCL on GPU, gloo on CPU). One process: nothing changes.

Losses are written as ``sum over this process's slice / size of the whole batch``; summing the gradients
then gives exactly the gradient of the mean loss over the whole batch (up to float summation order).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); initialises the process group when the launcher asked for several processes."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a batch of indices (the whole batch in one process)."""
    rank, size = world()
    return idx if size == 1 else idx.tensor_split(size)[rank]


def sum_gradients(params) -> None:
    """All-reduce (sum) the gradients of ``params`` across processes; nothing in one process."""
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
