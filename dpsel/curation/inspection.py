"""`dpsel inspect RUN`: the dropped rows of a finished run beside what they matched, read back from the run's
scores.parquet and the input files its manifest names (checked against their recorded sha256), a few rows at a
time — the input is never loaded whole."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from dpsel.curation.examples import Example, fill_texts, partner_words, require_file, shown
from dpsel.errors import DpselInputError
from dpsel.outputs import MANIFEST_FILE, SCORES_FILE

DEFAULT_ROWS = 20        # dropped rows shown
SHOWN_CHARS = 400        # characters of each text printed
_COLUMNS = ("dpsel_reason", "dpsel_detail", "dpsel_id", "dpsel_file", "dpsel_file_row", "dpsel_dup_of")


def inspect_run(run, reasons=None, limit: int | None = None) -> list[dict]:
    """Up to `limit` dropped rows of the run in folder `run` (of the given reasons, default every reason), in
    input order, each a dict: row, reason, detail, dpsel_id, file, file_row, dup_of, text, partner,
    partner_text. An unknown reason, a folder that is not a finished run or a missing/changed input file is
    an input error naming the file."""
    folder, limit = Path(run), DEFAULT_ROWS if limit is None else limit
    scores, manifest = run_files(folder)
    wanted = _reasons(reasons)
    present, examples = _scan(scores, wanted, limit)
    unknown = sorted(wanted - set(present))
    if unknown:
        shown = ", ".join(f"{r} ({n})" for r, n in sorted(present.items())) or "none (no row was dropped)"
        raise DpselInputError(f"no row of this run was dropped as {', '.join(unknown)}; reasons present: {shown}",
                              file=str(scores))
    known = {f["path"]: f["sha256"] for entry in (manifest.get("inputs") or {}).values()
             if isinstance(entry, dict) for f in entry.get("files") or []}
    eval_paths = (manifest.get("stages") or {}).get("decontaminate") or []
    filled = fill_texts(examples, scores, eval_paths, lambda url: require_file(url, known))
    return [e.as_dict() for e in filled]


def run_files(folder: Path) -> tuple[Path, dict]:
    scores, manifest = folder / SCORES_FILE, folder / MANIFEST_FILE
    if not folder.is_dir():
        raise DpselInputError("no run folder here", file=str(folder))
    if not scores.is_file():
        raise DpselInputError("not a curate or filter run folder: it has no scores.parquet", file=str(scores))
    if not manifest.is_file():
        raise DpselInputError("not a finished run: it has no manifest.json", file=str(manifest))
    try:
        return scores, json.loads(manifest.read_text())
    except json.JSONDecodeError as error:
        raise DpselInputError(f"unreadable manifest ({error})", file=str(manifest)) from None


def _reasons(reasons) -> set[str]:
    """`--reason` values: one, several, or comma-separated."""
    if reasons is None:
        return set()
    given = [reasons] if isinstance(reasons, str) else list(reasons)
    return {r.strip() for value in given for r in str(value).split(",") if r.strip()}


def _scan(scores: Path, wanted: set[str], limit: int) -> tuple[Counter, list[Example]]:
    """(dropped rows per reason, the first `limit` dropped rows of the `wanted` reasons — every reason if
    none), a batch of scores.parquet at a time."""
    parquet = pq.ParquetFile(scores)
    columns = [c for c in _COLUMNS if c in parquet.schema_arrow.names]
    present, picked, at = Counter(), [], 0
    for batch in parquet.iter_batches(columns=columns):
        values = {c: batch.column(c).to_pylist() for c in columns}
        for k, reason in enumerate(values["dpsel_reason"]):
            if not reason:
                continue
            present[reason] += 1
            if len(picked) < limit and (not wanted or reason in wanted):
                picked.append(Example(at + k, reason, values["dpsel_detail"][k] or "", values["dpsel_id"][k],
                                      values["dpsel_file"][k], int(values["dpsel_file_row"][k]),
                                      values.get("dpsel_dup_of", [None] * batch.num_rows)[k]))
        at += batch.num_rows
    return present, picked


def render(items: list[dict], chars: int | None = None) -> str:
    """Plain text, one block per dropped row: reason, detail, the row's text and its partner's, each cut to
    `chars` characters, with terminal escape sequences removed."""
    from dpsel.report import terminal_safe
    chars = SHOWN_CHARS if chars is None else chars
    if not items:
        return "no dropped rows\n"
    blocks = []
    for item in items:
        lines = [f"[{item['reason']}] input row {item['row']} ({item['file']} row {item['file_row']}, id {item['dpsel_id']})",
                 f"  detail: {item['detail']}", f"  row:    {_indented(shown(item['text'], chars))}",
                 f"  beside: {_indented(partner_words(Example(**item), chars))}"]
        blocks.append(terminal_safe("\n".join(lines)))
    return "\n\n".join(blocks) + "\n"


def _indented(text: str) -> str:
    return text.replace("\n", "\n          ")
