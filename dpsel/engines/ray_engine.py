"""The Ray engine: Ray Data reads the Parquet shards and a stateful scorer actor pool normalises, ids and
scores every row (`map_batches`); the driver keeps what needs the whole input at once (duplicates across
shards, the keep rule, the output files) and hands an `InstructionSet` plus per-row scores back to
`dpsel.curate`, which writes exactly what the local engine writes.

Where the work runs: the driver first reads the input with the data layer (`read_instruction_set`: ids,
verdicts and duplicates across all shards, the same code as the local engine, at tens of thousands of rows/s);
reading and decoding Parquet again (Ray read tasks), normalising, hashing and scoring (the actors: the
scorer/ folder is loaded once per actor, on a GPU when `num_gpus` > 0) — the per-row cost — is spread over the
cluster; the driver collects the scores in input order (`preserve_order`), checks each row's id against its
own and writes. Row order is the input order (files in `expand_paths`
order, rows in file order), so `scores.parquet` is row-for-row the local engine's.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from dpsel.data import InstructionSet, _plan, expand_paths, read_instruction_set, rows_to_score
from dpsel.engines import RayOptions, require_ray
from dpsel.errors import DpselInputError
from dpsel.select.base import ProgressFn

# Columns the actors add to each block; the prefix keeps them apart from any user column (dpsel_id included).
_PREFIX = "__dpsel_"
READ_CPUS = 1   # CPUs left to Ray Data's list/read tasks when the actor pool is sized from the cluster
_ID, _WEIGHT, _STD = (f"{_PREFIX}{n}" for n in ("id", "weight", "std"))


@contextlib.contextmanager
def ray_runtime(options: RayOptions) -> Iterator[object]:
    """Join `options.address`, or start a local Ray runtime that stops with the run; a runtime already
    started by the caller (a notebook, a test session) is used as is and left running."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if options.address:
        ray.init(address=options.address, **kwargs)
    else:
        # One logical CPU more than the actors get: Ray Data's list/read tasks ask for a CPU each, and a pool
        # holding every CPU would starve them (the run then waits forever).
        ray.init(num_cpus=(options.num_cpus or os.cpu_count()) + READ_CPUS, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


class ScoreBatches:
    """One Ray actor: loads the scorer once, then turns each block of input rows into their ids and posterior
    weights (invalid rows: weight 0, never scored), normalised exactly as the data layer's reader does."""

    def __init__(self, scorer_dir: str, shape: str, use_gpu: bool):
        from dpsel.select import load_scorer
        self.scorer = load_scorer(scorer_dir)
        self.shape = shape
        if use_gpu:
            _move_to_gpu(self.scorer)

    def __call__(self, block: pa.Table) -> pa.Table:
        ids, valid, messages = rows_to_score(block, self.shape)
        weight, std = np.zeros(len(ids)), np.zeros(len(ids))
        if valid.any():
            idx = np.flatnonzero(valid)
            # Duplicates of earlier rows are scored too (they are only known once all blocks are in);
            # the driver then gives them their first occurrence's weight, as the local engine does.
            mean, spread = self.scorer.score(messages, [ids[i] for i in idx])
            weight[idx], std[idx] = mean, spread
        return pa.table({_ID: pa.array(ids, pa.string()), _WEIGHT: pa.array(weight), _STD: pa.array(std)})


def _move_to_gpu(scorer) -> None:
    """Model-backed scorers load on CPU; an actor holding a GPU moves the reference model onto it."""
    import torch
    lm = getattr(scorer, "lm", None)
    if lm is None or not torch.cuda.is_available():
        return
    lm.model.to("cuda")
    lm.device = torch.device("cuda")


@dataclass
class RayScored:
    """What the driver gets back: every input row (input order) and the actors' weights for it."""
    data: InstructionSet
    weights: np.ndarray          # 0 for invalid rows; duplicates still carry their own (equal) score
    stds: np.ndarray
    seconds: float
    workers: int


def _worker_count(ray, options: RayOptions) -> int:
    if options.workers:
        return int(options.workers)
    resources = ray.cluster_resources()
    if options.num_gpus:
        return max(1, int(resources.get("GPU", 0) // options.num_gpus))
    return max(1, int(resources.get("CPU", 1)) - READ_CPUS)


def _dataset(ray, planned, options: RayOptions, scorer_dir: str, workers: int):
    """read_parquet -> map_batches(ScoreBatches) over an actor pool, in input order."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    files = [p.file for p in planned]
    filesystem = None
    if not all(type(f.fs).__name__ == "LocalFileSystem" for f in files):
        from pyarrow.fs import FSSpecHandler, PyFileSystem
        filesystem = PyFileSystem(FSSpecHandler(files[0].fs))
    ds = ray.data.read_parquet([f.path for f in files], filesystem=filesystem)
    # Ray sizes read blocks by bytes, so shards of short rows arrive as a few big blocks, and a block goes to
    # one actor: streaming repartition (order kept) into blocks of one batch lets every actor take work.
    ds = ds.repartition(target_num_rows_per_block=options.batch_size)
    return ds.map_batches(ScoreBatches, batch_format="pyarrow", batch_size=options.batch_size,
                          fn_constructor_kwargs={"scorer_dir": scorer_dir, "shape": planned[0].shape,
                                                 "use_gpu": options.num_gpus > 0},
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0 if options.num_gpus else 1,
                          num_gpus=options.num_gpus or None)


def _collect(ds, total_rows: int, progress: ProgressFn | None) -> pa.Table | None:
    """Stream the scored blocks (id, weight, std per row) to the driver in order, reporting rows done."""
    blocks, done = [], 0
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        blocks.append(block)
        done += block.num_rows
        if progress is not None:
            progress(done, total_rows, {"rows": float(done)})
    if not blocks:
        return None
    return pa.concat_tables(blocks)


def score_with_ray(scorer_dir, inputs, options: RayOptions | None = None,
                   progress: ProgressFn | None = None) -> RayScored:
    """Read and score `inputs` on Ray; every row comes back once, in input order.

    The driver reads the input with the data layer (`read_instruction_set`: ids, verdicts, duplicates across
    all shards, exactly as the local engine) before any Ray work, so bad input fails fast; the actors redo the
    per-row normalisation for the rows they score, and their ids are checked against the driver's."""
    import time
    options = options or RayOptions()
    started = time.perf_counter()
    data = read_instruction_set(inputs)
    planned = _plan(expand_paths(inputs))
    with ray_runtime(options) as ray:
        workers = _worker_count(ray, options)
        table = _collect(_dataset(ray, planned, options, str(scorer_dir), workers), len(data), progress)
    if table is None and not len(data):
        return RayScored(data=data, weights=np.zeros(0), stds=np.zeros(0),
                         seconds=time.perf_counter() - started, workers=workers)
    if table is None or table.num_rows != len(data) or not table.column(_ID).combine_chunks().equals(data.ids):
        got = 0 if table is None else table.num_rows
        raise RuntimeError(f"Ray returned rows that do not match the input ({got} rows for "
                           f"{len(data)}, or ids out of order)")
    return RayScored(data=data, weights=table.column(_WEIGHT).to_numpy(), stds=table.column(_STD).to_numpy(),
                     seconds=time.perf_counter() - started, workers=workers)
