"""The launcher environment: what torchrun / accelerate launch told this process (RANK, WORLD_SIZE,
LOCAL_RANK), readable before any process group exists. A leaf: the lock, the checkpoints and the CLI ask it
who they are without pulling in the collectives (torch is imported only where a process group is needed)."""
from __future__ import annotations

import os


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
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def join_process_group():
    """(rank, world, device) of the process group the launcher describes (WORLD_SIZE > 1), joined on first
    call; None for a plain single-process run. gloo on CPU; NCCL with one GPU per rank (LOCAL_RANK)."""
    world = launched_world()
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device
