"""Generic data-parallel collectives on torch.distributed (gloo on CPU, NCCL on GPU): which rows a rank owns,
and gathering, summing and broadcasting across ranks. Knows nothing of any selection method; what bads does
with them is `dpsel/select/bads/parallel.py`. Single-process runs never build a `DataParallel`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dpsel.errors import DpselInputError
from dpsel.parallel.env import join_process_group


@dataclass
class DataParallel:
    rank: int
    world: int
    device: torch.device

    # -- rows ----------------------------------------------------------------------------------------
    def shard(self, n: int) -> np.ndarray:
        """This rank's rows: a contiguous block, so gathering in rank order restores input order."""
        return np.array_split(np.arange(n), self.world)[self.rank]

    def local_batch(self, batch_size: int) -> int:
        if batch_size % self.world:
            raise DpselInputError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                                  f"{self.world} processes")
        return batch_size // self.world

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """Per-row arrays of every rank's shard, concatenated in rank (= input) order."""
        parts: list = [None] * self.world
        dist.all_gather_object(parts, np.asarray(local))
        return np.concatenate(parts)

    def gather_objects(self, local) -> list:
        """Every rank's `local` (any picklable value), in rank order."""
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        return parts

    def gather_tensor(self, local: torch.Tensor) -> torch.Tensor:
        """A per-row CPU tensor of every rank's shard, in input order."""
        return torch.as_tensor(self.gather_rows(local.numpy()))

    def own_rows(self, values, n: int):
        """This rank's rows of whole-pool results (arrays/tensors of length `n`, in dicts), the rest as is."""
        if isinstance(values, dict):
            return {k: self.own_rows(v, n) for k, v in values.items()}
        if isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim and len(values) == n:
            return values[torch.as_tensor(self.shard(n))] if isinstance(values, torch.Tensor) \
                else values[self.shard(n)]
        return values

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `values` over every rank (every rank gets the sum)."""
        values = values.detach().clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    # -- shared parameters ----------------------------------------------------------------------------
    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of `params` over ranks (one flat all-reduce); a missing gradient counts as zero."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _unflatten_into(flat, grads)
        for p, g in zip(params, grads):
            p.grad = g

    @torch.no_grad()
    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Make `tensors` rank 0's on every rank (θ after each step: one shared noise draw)."""
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, tensors)


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def from_env() -> DataParallel | None:
    """The process group torchrun / accelerate launch describe in the environment (WORLD_SIZE > 1), or None
    for a plain single-process run."""
    joined = join_process_group()
    return None if joined is None else DataParallel(*joined)
