"""The files of a curation run (`curate`, `filter`): scores.parquet, curated.parquet, manifest.json,
scorer/ (report.md and its plots come from `dpsel.report`).

One consistent run folder: a run writes everything into a staging folder beside OUT
(`.OUT.dpsel-staging-<run id>`), `manifest.json` last, then publishes it by swapping folders (old OUT
aside, staging in, old removed). A reader sees the old complete run, no folder for an instant, or the new
complete run — never a mix. `manifest.json` is the completion marker: it carries the run id, which the
Parquet files (schema metadata), scorer/selection.json and report.md also carry, and the sha256 of every
other file (`verify_run` checks them). Temp folders of a dead run are cleaned by the next run into the
same OUT (`clean_stale`, called with the OUT's lock held — see `dpsel.runlock`).

Inputs are never written to: `check_outputs_do_not_overwrite_inputs` refuses an OUT that is an input
folder, holds an input file, or lies inside an input folder. Files in an existing OUT that are not
dpsel's are carried over to the new folder; dpsel's own files are replaced as a whole.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import secrets
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from dpsel.data.schema import MESSAGE_TYPE
from dpsel.errors import DpselInputError
from dpsel.io import file_sha256, write_json_atomic

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
CURATED_FILE = "curated.parquet"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.md"
SCORER_DIR = "scorer"
CURATED_PARTS = ".curated-parts"   # in the staging folder: the Ray actors' parts of curated.parquet (merged on commit)
SELECTION_FILE = "selection.json"  # in scorer/: the selection rule and effective threshold of the run
RUN_ID_KEY = "dpsel_run_id"        # Parquet schema metadata key (and JSON field) naming the run
STAGING_TAG = ".dpsel-staging-"    # .OUT.dpsel-staging-<run id>: a run being written
OLD_TAG = ".dpsel-old-"            # .OUT.dpsel-old-<run id>: the previous run, during the swap
# dpsel's own entries of a run folder: replaced as a whole by the next run (anything else is the user's).
DPSEL_ENTRIES = {"scores.parquet", "curated.parquet", "manifest.json", "report.md", "scorer",
                 "weights_hist.png", "traces.png", "weights_by_task.png", "weights_by_source.png"}

# The columns dpsel adds; an input column of the same name is replaced by the fresh value.
SCORE_COLUMNS = ("dpsel_id", "dpsel_weight", "dpsel_weight_std", "dpsel_kept", "dpsel_reason",
                 "dpsel_detail", "dpsel_file", "dpsel_file_row")


def output_paths(out_dir: Path) -> dict[str, Path]:
    return {"scores": out_dir / SCORES_FILE, "curated": out_dir / CURATED_FILE,
            "manifest": out_dir / MANIFEST_FILE, "report": out_dir / REPORT_FILE,
            "scorer": out_dir / SCORER_DIR}


def check_outputs_do_not_overwrite_inputs(out_dir: Path, input_files: list[str],
                                          input_specs: list[str] | None = None) -> None:
    """Refuse an OUT that is a file, that would replace an input, that holds an input file (the run folder
    is swapped as a whole), or that lies inside an input folder (a recursive scan of that folder would
    read the run's own outputs next time). Checked before any expensive work, so a typo fails fast."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DpselInputError("--out must be a directory, but a file of that name exists", file=str(out_dir))
    out = out_dir.resolve()
    local_inputs = {Path(p).resolve() for p in input_files if "://" not in str(p)}
    for name, path in output_paths(out_dir).items():
        target = path.resolve()
        clash = [p for p in local_inputs if p == target or target in p.parents]
        if clash:
            raise DpselInputError(f"--out {out_dir} would overwrite input {clash[0]} (as {name}); "
                                  "choose another output directory", file=str(clash[0]))
    check_out_outside_inputs(out_dir, [*input_files, *(input_specs or [])])


def check_out_outside_inputs(out_dir: Path, specs: list) -> None:
    """Refuse an OUT that holds an input file (the run folder is swapped as a whole) or that is, or lies
    inside, an input folder (scanned recursively: the run's own outputs would be read as input next time).
    Cheap (no data read), so it runs before OUT's lock file is created beside OUT."""
    out = Path(out_dir).resolve()
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)) or "://" in os.fspath(spec):
            continue  # in-memory data or a URL: nothing local to protect
        path = Path(os.fspath(spec))
        if path.is_file() and out in path.resolve().parents:
            raise DpselInputError(f"--out {out_dir} holds input {path}: the run would overwrite or move it "
                                  "(dpsel never writes into an input folder); choose another output directory",
                                  file=str(path))
        if path.is_dir() and (out == path.resolve() or path.resolve() in out.parents):
            raise DpselInputError(f"--out {out_dir} is inside the input folder {path}, which is scanned "
                                  "recursively: the run's own outputs would be read as input next time; "
                                  "choose an output directory outside it", file=str(path))


# ------------------------------------------------------------------------------------------------
# One consistent run folder: staging, publish, stale cleanup, verification
# ------------------------------------------------------------------------------------------------
def new_run_id() -> str:
    """Sortable and unique enough for one OUT: UTC time plus 32 random bits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def staging_dir(out_dir: Path, run_id: str) -> Path:
    return out_dir.parent / f".{out_dir.name}{STAGING_TAG}{run_id}"


def _is_dpsel_temp(name: str) -> bool:
    """Temp files and folders of dpsel's atomic writers (`.NAME.xxxx.tmp`, `.scorer.xxxx.old`)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old"))


def _carry_user_entries(source: Path, target: Path) -> None:
    """Move what the user put in the previous run folder (not dpsel's files) into the new one."""
    for entry in sorted(source.iterdir()):
        if entry.name in DPSEL_ENTRIES or _is_dpsel_temp(entry.name) or (target / entry.name).exists():
            continue
        os.replace(entry, target / entry.name)


def clean_stale(out_dir: Path) -> list[str]:
    """Remove what dead runs left beside (and inside) OUT; call with OUT's lock held, so nothing found is live.

    A run killed between the two renames of `publish` leaves no OUT and the previous run aside: it is put
    back. Returns the names removed or restored (for the log)."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    done = []
    name = glob.escape(out_dir.name)  # an OUT named like a pattern ("run[1]") matches only itself
    olds = sorted(out_dir.parent.glob(f".{name}{OLD_TAG}*"))
    if olds and not out_dir.exists():
        os.replace(olds[-1], out_dir)
        done.append(f"restored {olds[-1].name}")
        olds = olds[:-1]
    for old in olds:
        if out_dir.is_dir():
            _carry_user_entries(old, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {old.name}")
    for stage in out_dir.parent.glob(f".{name}{STAGING_TAG}*"):
        shutil.rmtree(stage, ignore_errors=True)
        done.append(f"removed {stage.name}")
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            if _is_dpsel_temp(entry.name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                done.append(f"removed {out_dir.name}/{entry.name}")
    if done:
        log.warning("cleaned up after an earlier interrupted run in %s: %s", out_dir, "; ".join(done))
    return done


def begin_staging(out_dir: Path, run_id: str) -> Path:
    """Create the run's staging folder (this also proves OUT's parent is writable, before the work)."""
    stage = staging_dir(out_dir, run_id)
    try:
        stage.mkdir(parents=True)
    except OSError as error:
        raise output_error(error, stage) from error
    return stage


def publish(stage: Path, out_dir: Path, run_id: str) -> Path:
    """Swap the finished staging folder in as OUT (see module docstring); the previous run is removed."""
    old = out_dir.parent / f".{out_dir.name}{OLD_TAG}{run_id}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    if old.exists():
        _carry_user_entries(old, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def file_records(folder: Path, skip: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, str]:
    """{relative path: sha256} of every dpsel file of a run folder (the manifest itself excepted)."""
    records = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and relative.parts[0] in DPSEL_ENTRIES and str(relative) not in skip:
            records[str(relative)] = file_sha256(path)
    return records


def verify_run(out_dir: Path) -> list[str]:
    """Problems that make OUT not one complete run ([] when it is): no manifest, a file missing, changed or
    from another run (sha256 and run id against the manifest)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{manifest_path} missing: not a finished run"]
    manifest = json.loads(manifest_path.read_text())
    run_id = manifest.get("run_id")
    problems = []
    for relative, digest in (manifest.get("files") or {}).items():
        path = out_dir / relative
        if not path.is_file():
            problems.append(f"{relative} missing")
        elif file_sha256(path) != digest:
            problems.append(f"{relative} differs from the manifest's record")
    for name in (SCORES_FILE, CURATED_FILE):
        if any(p.startswith(name) for p in problems) or not (out_dir / name).is_file():
            continue
        if run_id_of_parquet(out_dir / name) != run_id:
            problems.append(f"{name} is from run {run_id_of_parquet(out_dir / name)}, the manifest from {run_id}")
    return problems


def run_id_of_parquet(path: Path) -> str | None:
    import pyarrow.parquet as pq
    metadata = pq.read_schema(path).metadata or {}
    value = metadata.get(RUN_ID_KEY.encode())
    return value.decode() if value else None


_ENVIRONMENT_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                       errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
                       errno.EDQUOT: "disk quota exceeded"}


def output_error(error: OSError, path: Path | str | None = None) -> Exception:
    """A read or write that failed for a reason the user must fix (permissions, full disk) as an input error
    naming the path (CLI exit 2); any other OSError is returned unchanged."""
    reason = _ENVIRONMENT_ERRNOS.get(error.errno or 0)
    if reason is None and "No space left on device" in str(error):
        reason = _ENVIRONMENT_ERRNOS[errno.ENOSPC]
    if reason is None:
        return error
    where = error.filename or path
    return DpselInputError(f"{reason}; fix the permissions or free some space, then re-run",
                           file=os.fspath(where) if where else None)


def scores_table(ids: list[str], weights: np.ndarray, stds: np.ndarray, kept: np.ndarray,
                 reasons: list[str], details: list[str], files: list[str], file_rows: np.ndarray,
                 dup_of: list | None = None) -> pa.Table:
    """One row per input row, in input order; `dpsel_dup_of`: the id kept in a duplicate's place."""
    return pa.table({
        "dpsel_id": pa.array(ids, pa.string()),
        "dpsel_weight": pa.array(np.asarray(weights, np.float64)),
        "dpsel_weight_std": pa.array(np.asarray(stds, np.float64)),
        "dpsel_kept": pa.array(np.asarray(kept, bool)),
        "dpsel_reason": pa.array(reasons, pa.string()),
        "dpsel_detail": pa.array(details, pa.string()),
        "dpsel_file": pa.array(files, pa.string()),
        "dpsel_file_row": pa.array(np.asarray(file_rows, np.int64)),
        "dpsel_dup_of": pa.array(dup_of if dup_of is not None else [None] * len(ids), pa.string()),
    })


def curated_table(original: pa.Table, ids: list[str] | pa.Array, weights: np.ndarray, kept: np.ndarray,
                  kept_messages: list[list[dict]] | pa.Array | pa.ChunkedArray | None = None) -> pa.Table:
    """The kept rows with all original columns (schema untouched) plus `dpsel_id`, `dpsel_weight` and, where
    the input has no `messages` column, `messages`: the normalised conversation of each kept row, in order
    (`kept_messages`; the {role, content} list shape TRL's SFTTrainer and chat templates take). What the
    stages add (their columns, redaction) is `dpsel.curation.curated.finish_curated`'s."""
    keep_idx = pa.array(np.flatnonzero(kept), pa.int64())
    table = original.take(keep_idx)
    ids = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    extra = {"dpsel_id": ids.take(keep_idx),
             "dpsel_weight": pa.array(np.asarray(weights, np.float64)).take(keep_idx)}
    if kept_messages is not None and "messages" not in original.column_names:
        if len(kept_messages) != len(keep_idx):
            raise ValueError(f"{len(kept_messages)} conversations for {len(keep_idx)} kept rows")
        if isinstance(kept_messages, (pa.Array, pa.ChunkedArray)):   # built columnar (InstructionSet.message_array)
            extra["messages"] = kept_messages.cast(MESSAGE_TYPE)
        else:
            extra["messages"] = pa.array([[{"role": m["role"], "content": m["content"]} for m in conversation]
                                          for conversation in kept_messages], MESSAGE_TYPE)
    return set_columns(table, extra)


def set_columns(table: pa.Table, columns: dict) -> pa.Table:
    """The table with each of `columns` replacing the column of that name in place, or appended after."""
    for name, column in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table


CURATED_PART_SUFFIX = ".arrow"


def curated_part_name(first_row: int) -> str:
    """A part of curated.parquet written by an engine's worker (`CURATED_PARTS` in the run's staging folder),
    named by its first row's position among the rows sent to the workers: name order is input order."""
    return f"{first_row:012d}{CURATED_PART_SUFFIX}"


def write_curated_part(table: pa.Table, folder: Path, first_row: int) -> None:
    """One worker's part, as an Arrow IPC file: internal to the staging folder, so the format that costs
    nothing to read back (memory-mapped, no decoding) when the parts are merged into curated.parquet."""
    target = folder / curated_part_name(first_row)   # `folder` made by the driver: a worker late for a failed
    # run (its staging folder removed) fails here rather than leave a part behind
    temporary = target.with_name(f".{target.name}.tmp")   # a retried task never leaves half a part
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(temporary, target)


def read_curated_part(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def with_run_id(table: pa.Table, run_id: str | None) -> pa.Table:
    """The table with the run id in its schema metadata (so a Parquet file names the run that wrote it)."""
    if run_id is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), RUN_ID_KEY.encode(): run_id.encode()})


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
