"""curated.parquet from the parts (Arrow IPC files) that an engine's workers wrote into the run's staging folder
(`filter --engine ray`: each actor writes the rows it scored, see `dpsel.engines.ray_engine.ScoreBatches`). On
commit the driver keeps the kept rows of each part, in name order (= input order), adds what the stages decided
(their columns, `--pii redact`'s conversations and masking: `curated.finish_curated`, as every writer), and writes
one file: the contract's one curated.parquet stays one file; the parts never leave the staging folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpsel.curation.curated import finish_curated
from dpsel.curation.rows import RunRows
from dpsel.outputs import (CURATED_PART_SUFFIX, curated_part_name, curated_table, read_curated_part,
                           with_run_id, write_curated_part)

GROUP_ROWS = 65536   # rows read and written at a time (the local engine's streamed batch)


def merge_curated_parts(parts: Path, target: Path, rows: RunRows, scored: np.ndarray, keep: np.ndarray,
                        run_id: str) -> None:
    """Write `target` from the part files in `parts` (which hold the `scored` input rows, in order), keeping
    the `keep` rows (per input row); `parts` is removed. A part missing, extra or out of place is an error."""
    scored_rows = np.flatnonzero(scored)
    try:
        written = _write_kept(sorted(parts.glob(f"*{CURATED_PART_SUFFIX}")), target, rows, scored_rows, keep, run_id)
        if written != len(scored_rows):
            raise RuntimeError(f"the curated parts in {parts} hold {written} rows for {len(scored_rows)} scored rows")
    except BaseException:
        target.unlink(missing_ok=True)   # no curated.parquet with a hole, even in the staging folder
        raise
    shutil.rmtree(parts)


def _write_kept(files: list[Path], target: Path, rows: RunRows, scored_rows: np.ndarray, keep: np.ndarray,
                run_id: str) -> int:
    """The kept rows of the part files, in order, into `target`, a row group per ~`GROUP_ROWS` rows read
    (the actors' small blocks as row groups would make the file slower to write and to read); returns how
    many rows the parts held. Each part must start where the one before it ended (its name)."""
    writer, at, group = None, 0, []
    try:
        for k, path in enumerate(files):
            if path.name != curated_part_name(at):
                raise RuntimeError(f"curated part {path.name} is not the part starting at row {at} "
                                   f"(parts: {[f.name for f in files]})")
            group.append(read_curated_part(path))
            at += group[-1].num_rows
            if k + 1 < len(files) and sum(t.num_rows for t in group) < GROUP_ROWS:
                continue
            part, group = pa.concat_tables(group), []
            rows_here = scored_rows[at - part.num_rows:at]
            kept = keep[rows_here]
            table = with_run_id(finish_curated(part.filter(pa.array(kept, pa.bool_())), rows, rows_here[kept]), run_id)
            if writer is None:
                writer = pq.ParquetWriter(target, table.schema)
            writer.write_table(table if table.schema.equals(writer.schema) else table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    return at


def write_scored_part(parts_dir: Path, block: pa.Table, ids: list[str], weights: np.ndarray,
                      messages: pa.Array | pa.ChunkedArray, first_row: int) -> None:
    """What a worker writes for the block of usable rows it scored (handed to the engine, which never imports
    the run's output format): every row as curated.parquet holds it before the keep rule and the stages."""
    part = curated_table(block, ids, weights, np.ones(block.num_rows, bool), messages)
    write_curated_part(part, parts_dir, first_row)
