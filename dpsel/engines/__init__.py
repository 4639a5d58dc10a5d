"""Execution engines for the row-parallel stages (`filter` today): `local` (one process, the default) and
`ray` (Ray Data over the Parquet shards, a stateful scorer actor per CPU/GPU worker).

Nothing here imports Ray at import time: `ray` is an optional extra (`pip install 'dpsel[ray]'`).
"""
from __future__ import annotations

from dataclasses import dataclass

from dpsel.errors import DpselInputError

ENGINES = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'dpsel[ray]' (or: pip install 'ray[data]>=2.30')"


@dataclass
class RayOptions:
    """How the Ray engine runs. `address`: join that cluster (None: start a local runtime for the run);
    `workers`: scorer actors (None: one per CPU of the runtime, or one per GPU with `num_gpus`);
    `batch_size`: rows per `map_batches` call; `num_gpus`: GPUs per actor (0 on CPU)."""
    address: str | None = None
    workers: int | None = None
    batch_size: int = 1024
    num_gpus: float = 0.0
    num_cpus: int | None = None         # local runtime only: CPUs it may use (None: all of this machine)


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise DpselInputError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "ray":
        require_ray()
    return engine


def require_ray():
    """The `ray` module, or exit 2 saying how to install it (no silent fallback to the local engine)."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pandas/pyarrow glue)
    except ImportError as exc:
        raise DpselInputError(f"--engine ray needs Ray Data, which is not installed ({exc}); "
                              f"install it with: {RAY_INSTALL_HINT}") from None
    return ray
