"""The files of a curation run (`curate`, `filter`): scores.parquet, curated.parquet, manifest.json,
scorer/ (report.md and its plots come from `dpsel.report`).

Every file is written atomically (temp file + `os.replace`); scorer/ is built in a temp directory and
swapped in, so a crashed run leaves either the old or the new scorer, never a mix. Inputs are never
written to: `check_outputs_do_not_overwrite_inputs` refuses an OUT that would clobber an input file.
An existing OUT directory is reused: dpsel's own files in it are replaced, anything else is left alone.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from dpsel.errors import DpselInputError
from dpsel.io import write_json_atomic, write_parquet_atomic

SCORES_FILE = "scores.parquet"
CURATED_FILE = "curated.parquet"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.md"
SCORER_DIR = "scorer"
SELECTION_FILE = "selection.json"  # in scorer/: the selection rule and effective threshold of the run

# The columns dpsel adds; an input column of the same name is replaced by the fresh value.
SCORE_COLUMNS = ("dpsel_id", "dpsel_weight", "dpsel_weight_std", "dpsel_kept", "dpsel_reason",
                 "dpsel_detail", "dpsel_file", "dpsel_file_row")


def output_paths(out_dir: Path) -> dict[str, Path]:
    return {"scores": out_dir / SCORES_FILE, "curated": out_dir / CURATED_FILE,
            "manifest": out_dir / MANIFEST_FILE, "report": out_dir / REPORT_FILE,
            "scorer": out_dir / SCORER_DIR}


def check_outputs_do_not_overwrite_inputs(out_dir: Path, input_files: list[str]) -> None:
    """Refuse an OUT that is a file, or whose dpsel files would replace one of the inputs (checked before
    any expensive work, so a typo in --out fails fast)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DpselInputError("--out must be a directory, but a file of that name exists", file=str(out_dir))
    local_inputs = {Path(p).resolve() for p in input_files if "://" not in str(p)}
    for name, path in output_paths(out_dir).items():
        target = path.resolve()
        clash = [p for p in local_inputs if p == target or target in p.parents]
        if clash:
            raise DpselInputError(f"--out {out_dir} would overwrite input {clash[0]} (as {name}); "
                                  "choose another output directory", file=str(clash[0]))


def scores_table(ids: list[str], weights: np.ndarray, stds: np.ndarray, kept: np.ndarray,
                 reasons: list[str], details: list[str], files: list[str], file_rows: np.ndarray) -> pa.Table:
    """One row per input row, in input order."""
    return pa.table({
        "dpsel_id": pa.array(ids, pa.string()),
        "dpsel_weight": pa.array(np.asarray(weights, np.float64)),
        "dpsel_weight_std": pa.array(np.asarray(stds, np.float64)),
        "dpsel_kept": pa.array(np.asarray(kept, bool)),
        "dpsel_reason": pa.array(reasons, pa.string()),
        "dpsel_detail": pa.array(details, pa.string()),
        "dpsel_file": pa.array(files, pa.string()),
        "dpsel_file_row": pa.array(np.asarray(file_rows, np.int64)),
    })


MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def curated_table(original: pa.Table, ids: list[str], weights: np.ndarray, kept: np.ndarray,
                  messages: list[list[dict]] | None = None) -> pa.Table:
    """The kept rows with all original columns (schema untouched) plus `dpsel_id`, `dpsel_weight` and, where
    the input has no `messages` column, `messages`: the normalised conversation ({role, content} list, the
    shape TRL's SFTTrainer and chat templates take)."""
    keep_idx = pa.array(np.flatnonzero(kept), pa.int64())
    table = original.take(keep_idx)
    extra = {"dpsel_id": pa.array(ids, pa.string()).take(keep_idx),
             "dpsel_weight": pa.array(np.asarray(weights, np.float64)).take(keep_idx)}
    if messages is not None and "messages" not in original.column_names:
        kept_messages = [[{"role": m["role"], "content": m["content"]} for m in messages[i]]
                         for i in np.flatnonzero(kept)]
        extra["messages"] = pa.array(kept_messages, MESSAGE_TYPE)
    for name, column in extra.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table


def write_tables(out_dir: Path, scores: pa.Table, curated: pa.Table) -> None:
    write_parquet_atomic(scores, out_dir / SCORES_FILE)
    write_parquet_atomic(curated, out_dir / CURATED_FILE)


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    return write_json_atomic(manifest, out_dir / MANIFEST_FILE)


def replace_dir_atomic(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory with `build(tmp_dir)` beside `target`, then swap it in.

    Two renames (old aside, new in) rather than one: `os.replace` cannot replace a non-empty directory.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_scorer(out_dir: Path, scorer, selection: dict) -> Path | None:
    """scorer/ = the method's saved scorer + selection.json (the threshold `filter` applies by default).

    `scorer` is a Scorer to save, a directory to copy (filter: the output stays self-contained), or None
    (a method without a scorer: only selection.json is written, and `filter` cannot use this run)."""
    def build(tmp: Path) -> None:
        if isinstance(scorer, (str, os.PathLike)):
            shutil.copytree(scorer, tmp, dirs_exist_ok=True)
        elif scorer is not None:
            scorer.save(tmp)
        write_json_atomic(selection, tmp / SELECTION_FILE)

    target = out_dir / SCORER_DIR
    if isinstance(scorer, (str, os.PathLike)) and Path(scorer).resolve() == target.resolve():
        write_json_atomic(selection, target / SELECTION_FILE)  # filtering in place: keep the scorer files
        return target
    return replace_dir_atomic(target, build)
