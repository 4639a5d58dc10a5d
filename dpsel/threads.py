"""Thread policy for shared machines: how many intra-op threads torch uses, and how idle threads wait.

On a box shared with other work (a CI runner, a Prefect worker, a laptop), torch's defaults hurt twice:
it starts one OpenMP thread per *online* core even when the process may only use fewer (CPU affinity,
a container's cgroup CPU quota), and idle OpenMP threads spin for a while before sleeping, so a waiting
thread steals the core from the thread that has work. Measured on 2 cores with one other busy process:
a SGLD step 20x slower and a LoRA step 15x slower than with one thread.

`configure_threads` fixes both: intra-op threads = the cores this process may actually use (or what the
user asked for), and passive waiting (`OMP_WAIT_POLICY=PASSIVE`), which the OpenMP runtime reads when
torch is first imported, so it must run before that; where torch is already loaded it says so in the
returned policy (the thread count is still applied). Explicit settings win, in this order: the
`threads` argument (`dpsel --threads N`), `DPSEL_THREADS`, `OMP_NUM_THREADS`; and a user's own
`OMP_WAIT_POLICY` is left alone.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPolicy:
    threads: int
    source: str            # where the count came from: argument | DPSEL_THREADS | OMP_NUM_THREADS | available cores
    available: int         # cores this process may use (affinity and cgroup quota)
    wait_policy: str       # PASSIVE / ACTIVE / ... as the OpenMP runtime will read it, or why it could not be set

    def describe(self) -> str:
        return (f"{self.threads} intra-op thread(s) ({self.source}; {self.available} core(s) available), "
                f"OpenMP wait policy {self.wait_policy}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (quota / period), or None when unlimited or unknown (v2, then v1)."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota (rounded up), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def _positive_int(value: str, name: str) -> int:
    from dpsel.errors import DpselInputError
    try:
        number = int(value)
    except ValueError:
        raise DpselInputError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise DpselInputError(f"{name} must be a positive integer, got {number}")
    return number


def choose_threads(threads: int | None = None, root: Path = CGROUP_ROOT) -> tuple[int, str, int]:
    """(threads, where that came from, available cores): the explicit settings first, else the available cores."""
    available = available_cpus(root)
    if threads is not None:
        return _positive_int(str(threads), "--threads"), "argument", available
    for name in ("DPSEL_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name):
            return _positive_int(os.environ[name], name), name, available
    return available, "available cores", available


def configure_threads(threads: int | None = None, root: Path = CGROUP_ROOT) -> ThreadPolicy:
    """Apply the policy to this process (see the module docstring); call it before importing torch."""
    count, source, available = choose_threads(threads, root)
    torch_loaded = "torch" in sys.modules
    if not torch_loaded:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # torch reads both when it loads (the lower wins)
            os.environ[name] = str(count)
        wait = os.environ["OMP_WAIT_POLICY"]
    else:
        wait = f"{os.environ.get('OMP_WAIT_POLICY', 'runtime default')} (torch was already imported)"
        if "OMP_WAIT_POLICY" not in os.environ:
            warnings.warn("configure_threads ran after torch was imported: idle OpenMP threads keep the runtime's "
                          "default (spinning) wait policy; call it first, or set OMP_WAIT_POLICY=PASSIVE",
                          stacklevel=2)
        import torch
        torch.set_num_threads(count)
    return ThreadPolicy(count, source, available, wait)

