"""Data parallelism inside one run: each of W processes trains on its slice of every batch, and gradients are
summed weighted by slice size, so W processes take the steps one process would (up to float summation order).

Plain torch.distributed: whoever starts the processes (Ray Train) sets up the process group; without one,
everything here is a no-op for a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_mean_gradients(params: list[torch.nn.Parameter], local_batch: int) -> None:
    """Turn each process's mean-loss gradients over its slice into the full batch's mean-loss gradients."""
    rank, size = world()
    if size == 1:
        return
    total = torch.tensor([float(local_batch)])
    dist.all_reduce(total)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(local_batch / float(total))
            dist.all_reduce(p.grad)


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over all processes (itself for one process)."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor
