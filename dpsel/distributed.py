"""Data-parallel `bads` under torchrun / accelerate launch, on torch.distributed (gloo on CPU, NCCL on GPU).

Each rank owns a contiguous shard of the training rows and the weights (logits u_i) of those rows only: w is
row-sparse, so it is never communicated. θ is shared: every step each rank back-propagates its shard's
minibatch, the θ gradients are summed over ranks (all-reduce), every rank takes the same preconditioned step
and θ is then broadcast from rank 0, so the SGLD noise (drawn per rank) is rank 0's and θ stays identical
everywhere. The posterior summaries (and visits) are gathered back into input order, so rank 0 writes one
`scores.parquet` with every row exactly once.

Why the sum is the single-process gradient: with global batch B over N rows, a rank holds N/W rows and draws
B/W of them, so its train term carries the same N/B scale; the θ prior and the meta term are the same on every
rank, so each rank counts them 1/W times (`objective`). Summed over ranks that is the gradient of one
B-row minibatch (plus W independent meta minibatches averaged). Single-process runs never touch this module.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dpsel.errors import DpselInputError


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

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `values` over every rank (every rank gets the sum)."""
        values = values.detach().clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    # -- the whole pool ----------------------------------------------------------------------------------
    def whole_pool(self, problem, *per_row: torch.Tensor) -> tuple:
        """The posterior pass's inputs over the whole pool, not this rank's shard: the pass standardises each
        row's loss by its group's mean and std and ranks it within its group, and those are statistics of the
        pool — per shard they would score a row against its shard's neighbours only. Returns a problem whose
        `all_losses()` gathers every rank's losses (in input order), then each per-row tensor gathered."""
        return (PoolLosses(problem, self), *(self.gather_tensor(t) for t in per_row))

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

    # -- θ ---------------------------------------------------------------------------------------------
    def objective(self, terms: dict[str, torch.Tensor], total: torch.Tensor) -> torch.Tensor:
        """This rank's share of the log joint: the terms every rank computes alike count 1/W each."""
        shared = terms["log_prior_theta"] + terms["log_meta"]
        return total - (1.0 - 1.0 / self.world) * shared

    def reduce_theta_grads(self, theta: list[torch.Tensor]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in theta]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _unflatten_into(flat, grads)
        for p, g in zip(theta, grads):
            p.grad = g

    @torch.no_grad()
    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Make `tensors` rank 0's on every rank (θ after each step: one shared noise draw)."""
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, tensors)

    # -- results -----------------------------------------------------------------------------------------
    def gather_result(self, result):
        """A rank's SamplerResult over its shard -> the same over all rows (every row exactly once)."""
        from dpsel.select.bads import coverage_summary
        gathered = {name: self.gather_rows(getattr(result, name))
                    for name in ("weight_mean", "weight_std", "visits", "under_visited")}
        alternatives = {k: self.gather_rows(v) for k, v in result.alternatives.items()}
        parts: list = [None] * self.world
        dist.all_gather_object(parts, result.coverage["rows_scored_by"])
        scored_by = {k: sum(p.get(k, 0) for p in parts) for k in parts[0]}
        coverage = coverage_summary(gathered["visits"], result.coverage["steps"],
                                    result.coverage["burn_in_steps"], scored_by)
        n = len(gathered["visits"])
        coverage["data_parallel"] = {"processes": self.world,
                                     "rows_per_process": [len(part) for part in np.array_split(np.arange(n),
                                                                                               self.world)]}
        timings = dict(result.timings, processes=self.world)
        return dataclasses.replace(result, **gathered, alternatives=alternatives, coverage=coverage,
                                   timings=timings)


class PoolLosses:
    """A rank's selection problem seen as the whole pool's, for the posterior pass: `all_losses()` (θ is the
    same on every rank) scores this rank's shard and gathers every rank's, in input order."""

    def __init__(self, problem, data_parallel: DataParallel):
        self.problem, self.data_parallel = problem, data_parallel
        self.n_train = int(data_parallel.gather_rows(np.array([problem.n_train])).sum())

    def all_losses(self) -> torch.Tensor:
        return torch.as_tensor(self.data_parallel.gather_rows(self.problem.all_losses().numpy()))


class RankCheckpoints:
    """A run's checkpoints (`dpsel.checkpoint.Checkpoints`) as one rank of a torchrun run sees them.

    Shared stages (`reference`: the same on every rank) are rank 0's files; every other stage is per rank:
    rank k saves and loads `<stage>.rank{k}`. Whether to save is decided together (any rank due, or any rank
    asked to stop by SIGTERM, and every rank saves the same step; a stop then stops every rank), and a resume
    uses a stage only where every rank has it at the same step. The folder must be one all ranks see (a shared
    filesystem across machines); the fingerprint names the number of processes (`Checkpoints.open`)."""

    SHARED_STAGES = ("reference",)

    def __init__(self, checkpoints, data_parallel: DataParallel):
        self.base, self.data_parallel = checkpoints, data_parallel
        self.resumed = checkpoints.resumed

    def _name(self, stage: str) -> str:
        return stage if stage in self.SHARED_STAGES else f"{stage}.rank{self.data_parallel.rank}"

    def save(self, stage: str, tensors: dict, state: dict) -> None:
        if stage not in self.SHARED_STAGES or self.data_parallel.rank == 0:
            self.base.save(self._name(stage), tensors, state)

    def load(self, stage: str):
        saved = self.base.load(self._name(stage))
        steps = self.data_parallel.gather_rows(np.array([-1 if saved is None else int(saved[1].get("step", 0))]))
        if (steps == steps[0]).all():
            return saved
        where = f"{self.base.directory} (steps saved per rank: {steps.tolist()}, -1 = none)"
        if stage in self.SHARED_STAGES:
            raise DpselInputError(f"the {stage} checkpoint is not visible to every rank: the checkpoint folder "
                                  "must be on a filesystem all ranks share", file=where)
        from dpsel.progress import announce
        announce(f"rank {self.data_parallel.rank}: the ranks' {stage} checkpoints are from different steps in "
                 f"{where}; the {stage} stage starts from zero")
        return None

    def after_step(self, stage: str, snapshot) -> None:
        from dpsel import signals
        signals.defer(True)
        due, stop = self.data_parallel.sum_over_ranks(
            torch.tensor([float(self.base.due()), float(signals.pending())])).tolist()
        if due or stop:
            self.base.save(self._name(stage), *snapshot())
        if stop:
            signals.raise_if_pending()
            raise signals.Terminated("terminated: another rank received SIGTERM")

    def loop_start(self) -> None:
        self.base.loop_start()

    def loop_done(self) -> None:
        self.base.loop_done()


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def subset_rows(rows, idx: np.ndarray):
    """An EncodedRows holding only `idx` (a rank's shard), same encoding."""
    part = copy.copy(rows)
    part.examples = [rows.examples[i] for i in idx]
    part.lengths = rows.lengths[idx]
    part.has_response = rows.has_response[idx]
    return part


def from_env() -> DataParallel | None:
    """The process group torchrun / accelerate launch describe in the environment (WORLD_SIZE > 1), or None
    for a plain single-process run. gloo on CPU; NCCL with one GPU per rank (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DataParallel(rank=rank, world=world, device=device)


def launched_rank() -> int:
    """This process's rank as torchrun / accelerate launch set it (0 without a launcher), readable before
    the process group exists."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def launched_world() -> int:
    """Processes torchrun / accelerate launch started for this run (1 without a launcher)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def other_rank_note(out) -> str | None:
    """The one line a rank other than 0 prints instead of the run's summary (rank 0 writes and reports the
    whole run; N copies of its summary would read as N runs); None on rank 0 and in a single process."""
    rank = launched_rank()
    if rank == 0:
        return None
    return f"rank {rank} of {launched_world()}: done with its shard; rank 0 writes and reports the run in {out}"


def is_writer() -> bool:
    """Whether this process writes the run's files: always in a single process, rank 0 under torchrun."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
