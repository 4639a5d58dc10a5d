"""The Ray engine: the driver reads the input once with the data layer and Ray Data spreads the per-row work
(normalising and scoring) over a pool of stateful actors (`map_batches`); the driver keeps what needs the
whole input at once (duplicates across shards, the keep rule, the output files).

Three users: the curation stages' per-row work (`RayBlocks`: the near-dup MinHash signatures, LSH band keys and
question keys; the driver keeps the band grouping and the clustering, on ~384 bytes a row), `filter --engine ray`
(`score_with_ray`: the scorer the run hands over, made once per actor) and the pool
passes of `curate --engine ray` (`RayPasses`, the model layer's executor that `curate` installs: the model of the
pass — the meta-fitted reference, or the base for `rds` — shipped to each actor once as its safetensors files,
runs the pass function the method handed over on every pool row: the NLL, the `bads` features or the RDS+
embeddings). The engine never knows which: it is handed a function and runs it.

Where the work runs: the driver reads the input once (`read_instruction_set`: ids, verdicts and duplicates
across all shards, the same code as the local engine, at tens of thousands of rows/s) and hands the usable
rows to Ray as Arrow blocks (`ray.data.from_arrow`: the object store, no second read of the Parquet files);
the actors do the per-row cost — normalising, tokenising, the model's forward pass — on a GPU when `num_gpus`
> 0; the driver collects the results in input order (`preserve_order`) and checks each row's id (or index)
against its own. Row order is the input order, so `scores.parquet` is row-for-row the local engine's.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dpsel.data import InstructionSet, read_instruction_set, rows_to_score_and_write
from dpsel.engines import RayOptions, check_engine, require_ray
from dpsel.models.passes import Executor, InProcess, RowPass
from peft_train.types import ProgressFn

if TYPE_CHECKING:  # the LM stack (transformers) loads in the passes that use it, not with the engine
    from dpsel.models.lm import LM

# Columns the actors add to each block; the prefix keeps them apart from any user column (dpsel_id included).
_PREFIX = "__dpsel_"
READ_CPUS = 1   # CPUs left to Ray Data's own tasks (and the driver) when the actor pool is sized from the cluster
_ID, _WEIGHT, _STD, _ROW, _MESSAGES, _VALUES, _NDIM = (f"{_PREFIX}{n}" for n in (
    "id", "weight", "std", "row", "messages", "values", "ndim"))


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
        # One logical CPU more than the actors get: Ray Data's own tasks may ask for a CPU, and a pool
        # holding every CPU would starve them (the run then waits forever).
        ray.init(num_cpus=(options.num_cpus or os.cpu_count()) + READ_CPUS, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


class ScoreBatches:
    """One Ray actor: makes the scorer once (`make_scorer`, handed over by the run), then turns each block of
    usable input rows into their ids and posterior weights, normalised exactly as the data layer's reader does.
    With `write_part` (also the run's: `curation.parts.write_scored_part`), it also hands it the block's rows,
    ids, weights, messages and first row, so the run's own format is written where the rows are; the driver
    keeps only ids and weights."""

    def __init__(self, make_scorer: Callable[[], object], shape: str, use_gpu: bool,
                 write_part: Callable | None = None):
        self.scorer = make_scorer()
        self.shape = shape
        self.write_part = write_part
        if use_gpu:
            _move_to_gpu(self.scorer)

    def __call__(self, block: pa.Table) -> pa.Table:
        rows, block = block.column(_ROW), block.drop_columns([_ROW])
        ids, valid, messages, message_array = rows_to_score_and_write(block, self.shape)
        if not valid.all():   # the driver sends usable rows only: its reader and the actor disagree
            raise RuntimeError(f"row {ids[int(np.flatnonzero(~valid)[0])]} is invalid on the actor, not on the driver")
        weight, std = self.scorer.score(messages, ids)
        if self.write_part is not None and block.num_rows:
            self.write_part(block, ids, weight, message_array, int(rows[0].as_py()))
        return pa.table({_ID: pa.array(ids, pa.string()), _WEIGHT: pa.array(weight, pa.float64()),
                         _STD: pa.array(std, pa.float64()), _ROW: rows})


class ModelPass:
    """One Ray actor of a curate pool pass: writes the model's files (sent once, with the actor) to its own
    temporary folder, loads the model once, then gives each block of rows (index, messages as JSON) the values
    of `fn` per row — the function the method handed to `pool_pass`, the one the local engine calls."""

    def __init__(self, files: dict[str, bytes], info: dict, max_length: int, use_gpu: bool, fn: RowPass):
        import tempfile

        from dpsel.models.lm import load_theta
        self._folder = tempfile.TemporaryDirectory(prefix="dpsel-reference-")
        for name, content in files.items():
            (Path(self._folder.name) / name).write_bytes(content)
        self.lm = load_theta(Path(self._folder.name), info, device="cuda" if use_gpu else "cpu")
        self.max_length, self.fn = max_length, fn

    def __call__(self, block: pa.Table) -> pa.Table:
        import json

        from dpsel.models.lm import EncodedRows
        messages = [json.loads(m) for m in block.column(_MESSAGES).to_pylist()]
        rows = EncodedRows(messages, self.lm.tokenizer, self.max_length, self.lm.pad_id)
        values = np.asarray(self.fn(self.lm, rows), dtype=np.float64)
        ndim = pa.array(np.full(len(messages), values.ndim, np.int8))   # the driver gives back fn's own shape
        values = values.reshape(len(messages), -1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float64()), values.shape[1])
        return pa.table({_ROW: block.column(_ROW), _VALUES: column, _NDIM: ndim})


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
    weights: np.ndarray          # usable rows: the actors' weights; invalid and duplicate rows: 0 (not scored)
    stds: np.ndarray
    seconds: float
    workers: int
    split: dict                  # manifest timings: driver read, Ray (actors, collect), first block, stream
    parts_written: bool = False  # the actors wrote the usable rows' curated parts (`ScoreBatches`)


def _worker_count(ray, options: RayOptions) -> int:
    if options.workers:
        return int(options.workers)
    resources = ray.cluster_resources()
    if options.num_gpus:
        return max(1, int(resources.get("GPU", 0) // options.num_gpus))
    return max(1, int(resources.get("CPU", 1)) - READ_CPUS)


@dataclass
class ActorRun:
    """The actors' output blocks (input order) and how the run went: pool size, seconds from submitting the
    pipeline to the first block back (actor start, scorer/model load, one batch) and to the last."""
    table: pa.Table | None
    workers: int
    first_block_s: float = 0.0
    seconds: float = 0.0
    first_block_rows: int = 0


def map_on_actors(table: pa.Table, actor: type, actor_kwargs: dict, options: RayOptions,
                  progress: ProgressFn | None = None) -> ActorRun:
    """`table`'s rows, in blocks of `options.batch_size`, through a pool of `actor` instances (each built once
    with `actor_kwargs`) by Ray Data's `map_batches`; the actors' output blocks concatenated in input order."""
    with ray_runtime(options) as ray:
        workers = _worker_count(ray, options)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        step = max(1, options.batch_size)
        blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
        if not blocks:
            return ActorRun(None, workers)
        ds = ray.data.from_arrow(blocks).map_batches(
            actor, batch_format="pyarrow", batch_size=step, fn_constructor_kwargs=actor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0 if options.num_gpus else 1,
            num_gpus=options.num_gpus or None)
        return _collect(ds, table.num_rows, progress, ActorRun(None, workers))


def _collect(ds, total_rows: int, progress: ProgressFn | None, run: ActorRun) -> ActorRun:
    """Stream the actors' blocks to the driver in order, reporting rows done and timing the first block."""
    blocks, done, started = [], 0, time.perf_counter()
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if not blocks:
            run.first_block_s, run.first_block_rows = time.perf_counter() - started, block.num_rows
        blocks.append(block)
        done += block.num_rows
        if progress is not None:
            progress(done, total_rows, {"rows": float(done)})
    run.seconds = time.perf_counter() - started
    run.table = pa.concat_tables(blocks) if blocks else None
    return run


def score_with_ray(make_scorer: Callable[[], object], inputs, options: RayOptions | None = None,
                   progress: ProgressFn | None = None, parts_dir: Path | None = None,
                   write_part: Callable | None = None) -> RayScored:
    """Read `inputs` once and score its usable rows on Ray; every row comes back once, in input order.

    The driver reads with the data layer (`read_instruction_set`: ids, verdicts, duplicates across all shards,
    exactly as the local engine), so bad input fails before any Ray work; the actors score the usable rows
    (as the local engine does), redoing their normalisation, and their ids are checked against the driver's.
    `parts_dir`: the actors also write the usable rows' curated parts there (see `ScoreBatches`) when every
    actor can reach it, i.e. on a one-node runtime (`RayScored.parts_written` says whether they did)."""
    options = options or RayOptions()
    started = time.perf_counter()
    data = read_instruction_set(inputs)
    usable = np.flatnonzero(data.usable_mask())
    read_s = time.perf_counter() - started
    with ray_runtime(options) as ray:
        parts_dir = parts_dir if parts_dir is not None and _one_node(ray) else None
        if parts_dir is not None:
            parts_dir.mkdir()
        blocks = data.table.take(pa.array(usable, pa.int64()))
        run = map_on_actors(blocks.append_column(_ROW, pa.array(np.arange(len(usable)), pa.int64())), ScoreBatches,
                            {"make_scorer": make_scorer, "shape": data.shape, "use_gpu": options.num_gpus > 0,
                             "write_part": None if parts_dir is None else partial(write_part, parts_dir)},
                            options, progress)
    table = run.table
    expected = data.ids.take(pa.array(usable, pa.int64())).combine_chunks()
    got = pa.array([], pa.string()) if table is None else table.column(_ID).combine_chunks()
    if not got.equals(expected):
        raise RuntimeError(f"Ray returned rows that do not match the input ({len(got)} ids for {len(usable)} "
                           "usable rows, or ids out of order)")
    weights, stds = np.zeros(len(data)), np.zeros(len(data))
    if table is not None:
        weights[usable], stds[usable] = table.column(_WEIGHT).to_numpy(), table.column(_STD).to_numpy()
    seconds = time.perf_counter() - started
    return RayScored(data=data, weights=weights, stds=stds, seconds=seconds, workers=run.workers,
                     split={"driver_read_s": read_s, "ray_score_s": seconds - read_s,
                            "ray_first_block_s": run.first_block_s, "ray_first_block_rows": run.first_block_rows,
                            "ray_stream_s": run.seconds, "ray_parallel_write": parts_dir is not None},
                     parts_written=parts_dir is not None)


def _one_node(ray) -> bool:
    """Whether the runtime is this machine alone: actors elsewhere could not write into the local staging folder."""
    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


def pass_with_ray(lm: LM, messages: list, max_length: int, options: RayOptions, fn: RowPass,
                  progress: ProgressFn | None = None) -> np.ndarray:
    """`fn(lm, rows)` (one value [N] or one vector [N, F] per row) over every row of `messages` (in order), run
    by Ray actors: the model is saved once (`save_theta`: safetensors) and its files travel with each actor, so
    actors on other machines need no shared folder; `fn` travels by reference (a module-level function)."""
    import json
    import tempfile

    from dpsel.models.lm import save_theta
    with tempfile.TemporaryDirectory(prefix="dpsel-ray-reference-") as folder:
        info = save_theta(lm, Path(folder))
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    table = pa.table({_ROW: pa.array(np.arange(len(messages)), pa.int64()),
                      _MESSAGES: pa.array([json.dumps(m) for m in messages], pa.string())})
    scored = map_on_actors(table, ModelPass, {"files": files, "info": info, "max_length": max_length,
                                               "use_gpu": options.num_gpus > 0, "fn": fn}, options, progress).table
    rows = np.zeros(0, np.int64) if scored is None else scored.column(_ROW).to_numpy()
    if not np.array_equal(rows, np.arange(len(messages))):
        raise RuntimeError(f"Ray returned {len(rows)} rows for {len(messages)}, or out of order")
    if scored is None:
        return np.zeros(0)
    values = scored.column(_VALUES).combine_chunks()
    matrix = np.array(values.flatten().to_numpy()).reshape(len(messages), values.type.list_size)  # writable
    return matrix[:, 0] if scored.column(_NDIM)[0].as_py() == 1 else matrix


@dataclass
class RayPasses:
    """The model layer's `Executor` on Ray: each pool pass runs on a pool of `ModelPass` actors."""
    options: RayOptions

    def run(self, fn: RowPass, lm: LM, messages: list, max_length: int) -> np.ndarray:
        return pass_with_ray(lm, messages, max_length, self.options, fn)


class ApplyToBlock:
    """One Ray actor of a curation stage's per-row work: `fn` (a module-level function of one Arrow block,
    e.g. the near-dup signatures) on each block, the row index carried through to check the order."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, block: pa.Table) -> pa.Table:
        out = self.fn(block.drop_columns([_ROW]))
        if out.num_rows != block.num_rows:
            raise RuntimeError(f"a stage's block function gave {out.num_rows} rows for {block.num_rows}")
        return out.append_column(_ROW, block.column(_ROW))


@dataclass
class RayBlocks:
    """The curation stages' block map (`dpsel.stages.base.mapping_blocks_on`) on Ray: the table's blocks go
    through a pool of `ApplyToBlock` actors and come back whole, in input order (checked)."""
    options: RayOptions

    def __call__(self, fn, table: pa.Table, rows: int) -> Iterator[pa.Table]:
        import dataclasses
        indexed = table.append_column(_ROW, pa.array(np.arange(table.num_rows), pa.int64()))
        out = map_on_actors(indexed, ApplyToBlock, {"fn": fn},
                            dataclasses.replace(self.options, batch_size=rows)).table
        got = np.zeros(0, np.int64) if out is None else out.column(_ROW).to_numpy()
        if not np.array_equal(got, np.arange(table.num_rows)):
            raise RuntimeError(f"Ray returned {len(got)} rows for {table.num_rows}, or out of order")
        if out is not None:
            yield out.drop_columns([_ROW])


def engine_runtime(options: RayOptions | None):
    """One Ray runtime held across a run's Ray work (the stages, then the passes or the scoring), so its
    start-up is paid once; nothing to hold for the local engine (None)."""
    return contextlib.nullcontext() if options is None else ray_runtime(options)


def flow_runtime(engine: str, options: RayOptions | None = None):
    """One Ray runtime for several runs in a row (a flow's stages): started, or joined at `options.address`,
    on entry and shut down on exit; each run inside finds it running and leaves it (`ray_runtime`), so the
    start-up is paid once per flow, not once per stage. Nothing to hold for the local engine."""
    return engine_runtime((options or RayOptions()) if check_engine(engine) == "ray" else None)


def block_map(options: RayOptions | None):
    """What the curation stages' per-row work runs on: Ray actors with `options`, or this process (None)."""
    return None if options is None else RayBlocks(options)


def pool_executor(options: RayOptions | None) -> Executor:
    """What `curate` runs its pool passes on: Ray actors with `options`, or this process (None)."""
    return InProcess() if options is None else RayPasses(options)
