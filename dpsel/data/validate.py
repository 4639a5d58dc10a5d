"""`validate`: strictly check an instruction set (the first bad row raises) and summarise it, streaming."""
from __future__ import annotations

import os
import posixpath
from collections import Counter

from dpsel.data.paths import ResolvedFile, expand_paths
from dpsel.data.reader import iter_planned
from dpsel.data.reasons import GROUP_COLUMNS
from dpsel.data.schema import plan_files
from dpsel.data.stats import ValidationSummary, empty_count, group_counts, length_stats, value_counts
from dpsel.errors import DpselInputError


# Files dpsel itself writes beside instruction sets that are not instruction sets: synth's truth, a run's
# scores. Inside a folder given to `validate` they are skipped (and listed); any other file is checked.
KNOWN_NON_INSTRUCTION_FILES = {"truth.parquet": "synth truth", "scores.parquet": "curation scores"}


def skip_known_outputs(files: list[ResolvedFile], paths) -> tuple[list[ResolvedFile], list[str]]:
    """(files to check, skipped ones): a known non-instruction file is skipped only when a folder or glob
    brought it in; named explicitly, it is checked (and fails, naming it)."""
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    named = {_comparable(os.fspath(spec)) for spec in specs}
    keep, skipped = [], []
    for file in files:
        known = KNOWN_NON_INSTRUCTION_FILES.get(posixpath.basename(file.path))
        if known and _comparable(file.url) not in named:
            skipped.append(f"{file.url} ({known}, not an instruction set)")
        else:
            keep.append(file)
    if not keep:
        raise DpselInputError("no instruction-set files here, only " + "; ".join(skipped), file=str(specs[0]))
    return keep, skipped


def _comparable(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)


def validate_paths(paths, batch_rows: int = 16384) -> ValidationSummary:
    """Strictly check an instruction set (raises `DpselInputError` on the first bad row) and summarise it.
    Streams: memory is one batch plus ~18 bytes per distinct row (the duplicate check)."""
    checked, skipped = skip_known_outputs(expand_paths(paths), paths)
    planned = plan_files(checked)
    rows, duplicates = 0, 0
    nulls: Counter[str] = Counter()
    empties: Counter[str] = Counter()
    groups: dict[str, Counter[str]] = {}
    prompt_lengths: Counter[int] = Counter()
    response_lengths: Counter[int] = Counter()
    for name in dict.fromkeys(n for p in planned for n in p.schema.names):
        nulls[name] += 0    # list every column, even one only in a shard with no rows
    for nb in iter_planned(planned, batch_rows):
        error = nb.first_error()
        if error is not None:
            raise error
        for name in nb.batch.schema.names:
            nulls[name] += nb.batch.column(name).null_count
            empties[name] += empty_count(nb.batch.column(name))
        for name in GROUP_COLUMNS:
            if name in nb.batch.schema.names:
                groups.setdefault(name, Counter()).update(group_counts(nb.batch.column(name)))
        prompt, response = nb.rows.prompt_response_chars()
        prompt_lengths.update(value_counts(prompt))
        response_lengths.update(value_counts(response))
        duplicates += int((nb.codes == 2).sum())
        rows += nb.num_rows
    files = [(p.file.url, p.rows) for p in planned]
    return ValidationSummary(rows, planned[0].shape, files, dict(nulls),
                             {c: empties[c] for c in nulls}, length_stats(prompt_lengths),
                             length_stats(response_lengths), duplicates,
                             {c: dict(v) for c, v in groups.items()}, skipped)
