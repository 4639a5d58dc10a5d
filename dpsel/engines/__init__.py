"""Execution engines for the row-parallel stages (`filter`, and the scoring passes of `curate`): `local` (one
process, the default) and `ray` (Ray Data, a stateful scorer actor per CPU/GPU worker).

`curate --engine ray` runs the pool passes of the methods in `RAY_CURATE_METHODS` on Ray: `curate` installs the
Ray executor (`ray_engine.pool_executor`) in the model layer (`dpsel.models.passes.executing_on`), and the
methods' `pool_pass` calls run on it; methods never import an engine. Any other method with `--engine ray` is
refused (exit 2), never run locally in silence.

Nothing here imports Ray at import time: `ray` is an optional extra (`pip install 'dpsel[ray]'`).
"""
from __future__ import annotations

from dataclasses import dataclass

from dpsel.errors import DpselInputError

ENGINES = ("local", "ray")
# curate methods whose pool passes run on Ray: the reference's NLL (`loss`; `ifd`'s two passes), the reference's
# features (`bads`: its SGLD sampling stays in this process, or data-parallel under torchrun), RDS+ embeddings
RAY_CURATE_METHODS = ("loss", "ifd", "bads", "rds")
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


def curate_engine(engine: str, method: str, options: "RayOptions | None") -> "RayOptions | None":
    """The Ray options `curate`'s scoring passes run with (None: local); exit 2 for a method whose passes
    are local-only, naming it."""
    if check_engine(engine) == "local":
        return None
    if method not in RAY_CURATE_METHODS:
        raise DpselInputError(f"--engine ray runs the pool passes of --method {', '.join(RAY_CURATE_METHODS)} "
                              f"only; method {method!r} is local-only: run it with --engine local")
    return options or RayOptions()
