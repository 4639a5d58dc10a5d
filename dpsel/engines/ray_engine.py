"""The Ray engine: Ray Data reads the Parquet shards and a stateful scorer actor pool normalises, ids and
scores every row (`map_batches`); the driver keeps what needs the whole input at once (duplicates across
shards, the keep rule, the output files) and hands an `InstructionSet` plus per-row scores back to
`dpsel.curate`, which writes exactly what the local engine writes.

Where the work runs: reading and decoding Parquet (Ray read tasks), normalising rows, hashing ids and
scoring (the actors: the scorer/ folder is loaded once per actor, on a GPU when `num_gpus` > 0) — the
per-row cost — is spread over the cluster; the driver collects the blocks in input order
(`preserve_order`), marks duplicates and writes. Row order is the input order (files in `expand_paths`
order, rows in file order), so `scores.parquet` is row-for-row the local engine's.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from dpsel.data import (ID_COLUMN, REASON_DUPLICATE, REASON_INVALID, FileInfo, InstructionSet, _normalise,
                        _plan, _row_ids, expand_paths)
from dpsel.engines import RayOptions, require_ray
from dpsel.errors import DpselInputError
from dpsel.io import file_sha256
from dpsel.select.base import ProgressFn

# Columns the actors add to each block; the prefix keeps them apart from any user column (dpsel_id included).
_PREFIX = "__dpsel_"
READ_CPUS = 1   # CPUs left to Ray Data's list/read tasks when the actor pool is sized from the cluster
_ID, _DETAIL, _WEIGHT, _STD, _MESSAGES = (f"{_PREFIX}{n}" for n in ("id", "detail", "weight", "std", "messages"))


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
    """One Ray actor: loads the scorer once, then turns each block of input rows into the same rows plus
    id, validity, normalised messages and posterior weight (invalid rows: weight 0, never scored)."""

    def __init__(self, scorer_dir: str, shape: str, use_gpu: bool):
        from dpsel.select import load_scorer
        self.scorer = load_scorer(scorer_dir)
        self.shape = shape
        if use_gpu:
            _move_to_gpu(self.scorer)

    def __call__(self, block: pa.Table) -> pa.Table:
        messages, problems = _normalise(block, self.shape)
        ids = _row_ids(block, messages)
        valid = np.array([p is None for p in problems], dtype=bool)
        weight, std = np.zeros(len(ids)), np.zeros(len(ids))
        if valid.any():
            idx = np.flatnonzero(valid)
            # Duplicates of earlier rows are scored too (they are only known once all blocks are in);
            # the driver then gives them their first occurrence's weight, as the local engine does.
            mean, spread = self.scorer.score([messages[i] for i in idx], [ids[i] for i in idx])
            weight[idx], std[idx] = mean, spread
        added = {_ID: pa.array(ids, pa.string()),
                 _DETAIL: pa.array(["" if p is None else p.detail for p in problems], pa.string()),
                 _WEIGHT: pa.array(weight), _STD: pa.array(std),
                 _MESSAGES: pa.array(messages, _MESSAGES_TYPE)}
        for name, column in added.items():
            block = block.append_column(name, column)
        return block


_MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


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


def _collect(ds, total_rows: int, progress: ProgressFn | None) -> pa.Table:
    """Stream the scored blocks to the driver in order, reporting rows done through `progress`."""
    blocks, done = [], 0
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        blocks.append(block)
        done += block.num_rows
        if progress is not None:
            progress(done, total_rows, {"rows": float(done)})
    if not blocks:
        return None
    try:
        return pa.concat_tables(blocks, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DpselInputError(f"shards have incompatible column types ({exc})",
                              file="(the --in shards)") from exc


def _mark_duplicates(ids: list[str], details: list[str]) -> tuple[list[str], list[str]]:
    """The data layer's rule over the whole input: a valid row whose id an earlier valid row had is a
    duplicate of that row (across shards too)."""
    first_seen: dict[str, int] = {}
    reasons, out_details = [], []
    for i, (rid, detail) in enumerate(zip(ids, details)):
        if detail:
            reasons.append(REASON_INVALID)
            out_details.append(detail)
        elif rid in first_seen:
            reasons.append(REASON_DUPLICATE)
            out_details.append(f"same content as input row {first_seen[rid]}")
        else:
            first_seen[rid] = i
            reasons.append("")
            out_details.append("")
    return reasons, out_details


def _instruction_set(table: pa.Table, planned) -> InstructionSet:
    """The driver's view of the scored input, shaped as `read_instruction_set` returns it."""
    original = table.drop_columns([c for c in table.column_names if c.startswith(_PREFIX)])
    ids = table.column(_ID).to_pylist()
    reasons, details = _mark_duplicates(ids, table.column(_DETAIL).to_pylist())
    frame = original.to_pandas()
    files_col = [p.file.url for p in planned for _ in range(p.rows)]
    for name, values in ((ID_COLUMN, ids), ("dpsel_messages", table.column(_MESSAGES).to_pylist()),
                         ("dpsel_reason", reasons), ("dpsel_detail", details), ("dpsel_file", files_col)):
        frame[name] = pd.Series(values, index=frame.index, dtype=object)
    files = [FileInfo(p.file.url, p.rows, file_sha256(p.file.path, p.file.fs)) for p in planned]
    return InstructionSet(frame, list(original.column_names), planned[0].shape, files, original)


def score_with_ray(scorer_dir, inputs, options: RayOptions | None = None,
                   progress: ProgressFn | None = None) -> RayScored:
    """Read and score `inputs` on Ray; every row comes back once, in input order."""
    import time
    options = options or RayOptions()
    started = time.perf_counter()
    planned = _plan(expand_paths(inputs))      # footers and shapes checked before any Ray work
    total = sum(p.rows for p in planned)
    with ray_runtime(options) as ray:
        workers = _worker_count(ray, options)
        table = _collect(_dataset(ray, planned, options, str(scorer_dir), workers), total, progress)
    if table is None:
        table = _empty_scored(planned)
    if table.num_rows != total:
        raise RuntimeError(f"Ray returned {table.num_rows} rows for {total} input rows")
    data = _instruction_set(table, planned)
    return RayScored(data=data, weights=table.column(_WEIGHT).to_numpy(), stds=table.column(_STD).to_numpy(),
                     seconds=time.perf_counter() - started, workers=workers)


def _empty_scored(planned) -> pa.Table:
    schema = pa.unify_schemas([p.schema for p in planned], promote_options="permissive")
    table = schema.empty_table()
    for name, kind in ((_ID, pa.string()), (_DETAIL, pa.string()), (_WEIGHT, pa.float64()),
                       (_STD, pa.float64()), (_MESSAGES, _MESSAGES_TYPE)):
        table = table.append_column(name, pa.array([], kind))
    return table
