"""The Python API: `dpsel.curate`, `dpsel.filter`, `dpsel.tune`, `dpsel.inspect` — what the CLI does, from a notebook or script.

Data may be a path (file, folder of shards, glob, URL, or a list of them), a pandas DataFrame, a pyarrow Table
or a `datasets.Dataset`; in-memory data is written once to `OUT.inputs/<name>.parquet` (beside OUT: a run
folder never holds its inputs) so the run's manifest names and hashes a real file, as it does for the CLI. Options are resolved through the same `RunConfig` as the
CLI and the flows (`config=` takes a YAML path or a RunConfig), so the defaults are the same everywhere.
Each call returns a `Result` with the output paths and the scores as a DataFrame.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpsel.errors import DpselInputError

INPUTS_SUFFIX = ".inputs"


def inputs_dir(out: Path) -> Path:
    """Where in-memory data given to a call is written: beside OUT, since a run refuses inputs inside OUT."""
    return out.parent / f"{out.name}{INPUTS_SUFFIX}"

# Python keyword -> RunConfig field, where the names differ (the CLI's option names, with underscores).
_CURATE_FIELDS = {"variant": "curate.select.variant", "weight_param": "curate.select.weight_param",
                  "batch_size": "curate.select.batch_size", "meta_batch_size": "curate.select.meta_batch_size",
                  "max_length": "curate.select.max_length", "extra": "curate.select.extra"}
_TUNE_FIELDS = {"batch_size": "tune.batch_size", "max_length": "tune.max_length"}


@dataclass
class Result:
    """What a call wrote: `paths` (name -> file or folder), the scores as a DataFrame (curate, filter),
    the row counts and manifest (curate, filter) or the metrics (tune)."""
    out_dir: Path
    paths: dict[str, Path]
    scores: Any = None                       # pandas.DataFrame of scores.parquet (one row per input row)
    counts: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    auroc: dict | None = None

    def curated(self):
        """The kept rows (curated.parquet) as a DataFrame."""
        import pandas as pd
        return pd.read_parquet(self.paths["curated"])

    def scores_dataset(self):
        """The scores as a `datasets.Dataset`."""
        from datasets import Dataset
        return Dataset.from_pandas(self.scores, preserve_index=False)


def as_parquet_input(data: Any, folder: Path, name: str):
    """A path spec as is; in-memory rows written to `folder/<name>.parquet` (atomically) and that path."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return data
    if isinstance(data, (list, tuple)) and all(isinstance(item, (str, os.PathLike)) for item in data):
        return [os.fspath(item) for item in data]
    from dpsel.io import write_parquet_atomic

    table = _as_arrow(data, name)
    folder.mkdir(parents=True, exist_ok=True)
    return os.fspath(write_parquet_atomic(table, folder / f"{name}.parquet"))


def _as_arrow(data: Any, name: str):
    import pandas as pd
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    if type(data).__module__.startswith("datasets") and hasattr(data, "with_format"):
        return data.with_format("arrow")[:]  # honours select/shuffle (the indices mapping)
    raise DpselInputError(f"{name}: expected a path, a pandas DataFrame, a pyarrow Table or a datasets.Dataset, "
                          f"got {type(data).__name__}")


def _out_dir(out) -> Path:
    return Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="dpsel-"))


def _overrides(options: dict, renamed: dict[str, str]) -> dict:
    return {renamed.get(key, key): value for key, value in options.items()}


def _curation_result(result) -> Result:
    import pandas as pd
    return Result(out_dir=Path(result.out_dir), paths=dict(result.paths),
                  scores=pd.read_parquet(result.paths["scores"]), counts=dict(result.counts),
                  manifest=dict(result.manifest), auroc=result.auroc)


def curate(train, meta, out=None, *, truth=None, per_task: bool = False, config=None, progress=True,
           verbose: bool = False, restart: bool = False, **options) -> Result:
    """Score every row of `train` against the trusted `meta` set and keep the best (`dpsel curate`).

    `options` are the CLI's, with underscores: method, budget, threshold, model, embedder, steps, seed, device,
    variant, weight_param, batch_size, meta_batch_size, max_length, extra, engine, ray_address, labels (a
    reviewer's keep/drop file, `dpsel review`), and the
    curation stages' near_dup, near_dup_threshold, semantic_dup, decontaminate, filters, pii. `out`
    defaults to a new temporary folder. `progress`: True draws progress on stderr, False nothing, or a
    `progress(step, total, diag)` callback."""
    from dpsel.config import RunConfig
    from dpsel.curation.run import curate_from_config
    from dpsel.progress import default_phase_of, reporting, set_verbosity

    set_verbosity(verbose)
    out = _out_dir(out)
    inputs = inputs_dir(out)
    run = RunConfig.load(config, {**_overrides(options, _CURATE_FIELDS), "out": out,
                                  "train": as_parquet_input(train, inputs, "train"),
                                  "meta": as_parquet_input(meta, inputs, "meta"),
                                  "truth": as_parquet_input(truth, inputs, "truth")}, stage="curate")
    run.require("data.train", "data.meta", flow="curate")
    with reporting(progress, f"curate[{run.curate.method}]", default_phase_of(run.curate.method)) as reporter:
        result = curate_from_config(run, per_group=per_task, progress=reporter, restart=restart)
    return _curation_result(result)


def filter(scorer, data, out=None, *, threshold: float | None = None, budget: float | None = None,
           verbose: bool = False, config=None, **stages) -> Result:  # noqa: A001 - the CLI's name (`dpsel filter`)
    """Score new rows with a curation run's `scorer/` folder and keep what passes (`dpsel filter`); the
    threshold defaults to the curation run's. `stages`: the curation stages' options, as for `curate`
    (near_dup, near_dup_threshold, semantic_dup, decontaminate, filters, pii; `config`'s `stages:` too)."""
    from dpsel.config import RunConfig
    from dpsel.stages.options import StagesConfig
    from dpsel.curation.filter import filter_rows
    from dpsel.progress import set_verbosity

    set_verbosity(verbose)
    out = _out_dir(out)
    rows = as_parquet_input(data, inputs_dir(out), "in")
    unknown = set(stages) - set(StagesConfig.model_fields)
    if unknown:
        raise DpselInputError(f"dpsel.filter: unknown option(s) {', '.join(sorted(unknown))}")
    run = RunConfig.load(config, {f"stages.{k}": v for k, v in stages.items()})
    result = filter_rows(Path(scorer), rows if isinstance(rows, list) else [rows], out, threshold=threshold,
                         budget=budget, stages=run.stages, embedder=run.embedder)
    return _curation_result(result)


def inspect(run, reason=None, limit: int | None = None) -> list[dict]:
    """The dropped rows of a finished run (`dpsel inspect`): up to `limit` (default 20) of the given `reason`(s) (a string or a
    list; default every reason), in input order, each a dict with the row's reason, detail, text and what it
    matched (`partner`, `partner_text`: the kept duplicate or the eval text)."""
    from dpsel.curation.inspection import inspect_run
    return inspect_run(run, reason, limit)


def review(run, rows: int, out, format: str | None = None) -> list[Path]:  # noqa: A002 - the CLI's --format
    """The `rows` rows of a finished run whose keep/drop is most uncertain, written to `out` with an empty
    `label` column (`dpsel review`); returns the files written. Fill in keep/drop, then
    `curate(..., labels=out)`."""
    from dpsel.curation.review import review as review_run
    return review_run(run, rows, out, format)[1]


def tune(data, out=None, *, eval=None, config=None, progress=True, verbose: bool = False,  # noqa: A002
         **options) -> Result:
    """Fine-tune on `data` (`dpsel tune`); `eval` adds eval loss and exact match. `options` are the CLI's:
    method, model, weights_column, steps, seed, device, lr, r, batch_size, max_length."""
    from dpsel.config import RunConfig
    from dpsel.progress import set_verbosity
    from dpsel.tuning import ADAPTER_DIR, METRICS_FILE, tune_parquet

    set_verbosity(verbose)
    out = _out_dir(out)
    inputs = inputs_dir(out)
    run = RunConfig.load(config, {**_overrides(options, _TUNE_FIELDS), "out": out,
                                  "train": as_parquet_input(data, inputs, "train"),
                                  "eval": as_parquet_input(eval, inputs, "eval")}, stage="tune")
    run.require("data.train", flow="tune")
    metrics = tune_parquet(run.data.train, out, eval_path=run.data.eval, progress=progress, **run.tune_options())
    return Result(out_dir=out, paths={"adapter": out / ADAPTER_DIR, "metrics": out / METRICS_FILE}, metrics=metrics)
