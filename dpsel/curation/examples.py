"""What the stages dropped, shown: per reason the first `PER_REASON` dropped rows in input order, each beside
its partner — the row kept in a duplicate's place (`dpsel_dup_of`) or the eval text a contaminated row matched —
or, for the other reasons (invalid, filters, pii), beside its detail alone.

Rows are picked while they are in memory (`ExamplePicker.add`: the whole input of curate and the held filter,
batch by batch for the streamed filter, a bounded number per reason). A partner not in the same batch (an
earlier batch of a streamed run) and every text of a finished run (`dpsel inspect`) are read back from the
input files at the positions scores.parquet records (`dpsel_file`, `dpsel_file_row`): a few rows, never the
whole input. `report.md` renders them with `examples_markdown`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpsel.data import expand_paths, read_instruction_set
from dpsel.data.columnar import messages_with_overrides, normal_rows, verdicts
from dpsel.data.schema import open_parquet, plan_files
from dpsel.errors import DpselInputError
from dpsel.stages.pii import scan

PER_REASON = 5          # examples per reason in report.md
TEXT_CHARS = 200        # a shown text is cut to this many characters (with an ellipsis)
CONTAMINATED = "contaminated"
SECTION_TITLE = "## What the stages dropped"
_TOKEN = re.compile(r"[^\s,;:()\[\]{}'\"=]+")


@dataclass
class Example:
    """One dropped row and what it matched. `text`/`partner_text`: None until known (read back from files)."""
    row: int                        # input row (0-based, over the whole input)
    reason: str
    detail: str
    dpsel_id: str
    file: str
    file_row: int
    dup_of: str | None = None
    text: str | None = None
    partner: str | None = None      # what the partner is, in words ("input row 2", "eval row ... of FILE")
    partner_text: str | None = None

    def as_dict(self) -> dict:
        return {"row": self.row, "reason": self.reason, "detail": self.detail, "dpsel_id": self.dpsel_id,
                "file": self.file, "file_row": self.file_row, "dup_of": self.dup_of, "text": self.text,
                "partner": self.partner, "partner_text": self.partner_text}


def conversation_text(messages) -> str:
    """A conversation as text: one `role: content` line per message."""
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in (messages or []) if m)


def cut(text: str | None, limit: int = TEXT_CHARS) -> str:
    """`text` at most `limit` characters, an ellipsis marking a cut."""
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(text: str | None, limit: int = TEXT_CHARS) -> str:
    """A row's text as a report or `dpsel inspect` shows it: PII masked as `--pii redact` masks it (a report is
    shared further than the data; a row `--pii drop` dropped must not reappear there), then cut."""
    if not text:
        return cut(text, limit)
    return cut(scan(pa.array([str(text)], pa.string()))[0][0].as_py(), limit)


@dataclass
class ExamplePicker:
    """The first `per_reason` dropped rows of each reason, in input order, fed a batch of rows at a time."""
    per_reason: int = PER_REASON
    by_reason: dict[str, list[Example]] = field(default_factory=lambda: defaultdict(list))

    def examples(self) -> list[Example]:
        return [e for picked in self.by_reason.values() for e in picked]

    def add(self, rows, start: int = 0) -> None:
        """Pick from `rows` (a `RunRows` after the stages; its row 0 is input row `start`), their texts and the
        partners found among them."""
        picks = self._picks(rows.reasons)
        if not picks:
            return
        texts = row_texts(rows, picks)
        dup_of = rows.dup_of or [None] * rows.n
        fresh = [Example(start + i, rows.reasons[i], rows.details[i] or "", rows.ids[i], rows.files[i],
                         int(rows.file_rows[i]), dup_of[i], texts[i]) for i in picks]
        for example in fresh:
            self.by_reason[example.reason].append(example)
        _partners_in_batch(fresh, rows, start)

    def _picks(self, reasons: list[str]) -> list[int]:
        """The positions of the dropped rows still wanted, at most `per_reason` per reason in all."""
        room: dict[str, int] = {}
        picks = []
        for i, reason in enumerate(reasons):
            if reason and room.setdefault(reason, self.per_reason - len(self.by_reason.get(reason, ()))) > 0:
                room[reason] -= 1
                picks.append(i)
        return picks


def row_texts(rows, indices: list[int]) -> dict[int, str]:
    """Conversation text of rows `indices` of `rows`: as the run saw them (redacted after `--pii redact`), or as
    read where the stages saw none (invalid rows and exact duplicates never reach them)."""
    wanted = sorted(set(indices))
    texts = dict(zip(wanted, (conversation_text(m) for m in rows.conversations(_mask(rows.n, wanted)))))
    unseen = [i for i in wanted if not texts[i]]
    if unseen:
        texts.update(zip(unseen, (conversation_text(m) for m in rows.data.messages(_mask(rows.n, unseen)))))
    return texts


def _mask(n: int, indices: list[int]) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[indices] = True
    return mask


def _partners_in_batch(examples: list[Example], rows, start: int) -> None:
    """The partner of each duplicate whose partner (the first row with its `dup_of` id) is in `rows`."""
    wanted = {e.dup_of for e in examples if e.dup_of}
    first: dict[str, int] = {}
    for i, rid in enumerate(rows.ids):
        if rid in wanted and rid not in first:
            first[rid] = i
    found = [e for e in examples if e.dup_of in first and first[e.dup_of] + start != e.row]
    if not found:
        return
    texts = row_texts(rows, [first[e.dup_of] for e in found])
    for e in found:
        e.partner, e.partner_text = f"input row {first[e.dup_of] + start}", texts[first[e.dup_of]]


# ---- reading texts back from the run's files --------------------------------------------------------------

def read_file_rows(url: str, file_rows: list[int], render=None) -> dict[int, str]:
    """The conversation text of the given rows of one input file, reading only the row groups holding them;
    `render(messages)` (default: `conversation_text`) makes each row's value from its normalised messages."""
    planned = plan_files(expand_paths([url]))[0]
    wanted = sorted(set(file_rows))
    texts: dict[int, str] = {}
    with planned.file.open() as handle:
        parquet = open_parquet(handle, url)
        bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        for group in sorted({int(np.searchsorted(bounds, r, side="right")) - 1 for r in wanted}):
            local = [r - int(bounds[group]) for r in wanted if bounds[group] <= r < bounds[group + 1]]
            table = parquet.read_row_group(group).take(pa.array(local, pa.int64()))
            texts.update(zip((r + int(bounds[group]) for r in local),
                             _table_texts(table, planned.shape, render or conversation_text)))
    return texts


def _table_texts(table: pa.Table, shape, render) -> list:
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
    if batch is None:
        return []
    rows = normal_rows(batch, shape)
    _, _, overrides = verdicts(batch, rows)
    return [render(m) for m in messages_with_overrides(rows, np.arange(batch.num_rows), overrides)]


def positions_of(scores: Path, ids: set[str]) -> dict[str, tuple[int, str, int]]:
    """(input row, file, row in file) of the first row of each id in `ids`, scanning scores.parquet a batch
    at a time."""
    found: dict[str, tuple[int, str, int]] = {}
    at = 0
    for batch in pq.ParquetFile(scores).iter_batches(columns=["dpsel_id", "dpsel_file", "dpsel_file_row"]):
        for k, rid in enumerate(batch.column(0).to_pylist()):
            if rid in ids and rid not in found:
                found[rid] = (at + k, batch.column(1)[k].as_py(), batch.column(2)[k].as_py())
        at += batch.num_rows
        if len(found) == len(ids):
            break
    return found


def fill_texts(examples: list[Example], scores: Path, eval_paths=(), check_file=None) -> list[Example]:
    """Complete `examples`: the rows' own texts, duplicates' partners (read back from the input files) and
    contaminated rows' eval texts. `check_file(url)`: called before an input file is read (e.g. its hash)."""
    wanted = {e.dup_of for e in examples if e.dup_of and e.partner_text is None}
    positions = positions_of(scores, wanted) if wanted else {}
    reads: dict[str, set[int]] = defaultdict(set)
    for e in examples:
        if e.text is None:
            reads[e.file].add(e.file_row)
        if e.dup_of in positions and e.partner_text is None:
            reads[positions[e.dup_of][1]].add(positions[e.dup_of][2])
    texts = {}
    for url, file_rows in reads.items():
        if check_file is not None:
            check_file(url)
        texts.update({(url, r): t for r, t in read_file_rows(url, sorted(file_rows)).items()})
    for e in examples:
        e.text = texts.get((e.file, e.file_row), e.text)
        if e.dup_of and e.partner_text is None:
            _set_row_partner(e, positions.get(e.dup_of), texts)
    _eval_partners([e for e in examples if e.reason == CONTAMINATED and e.partner_text is None], eval_paths)
    return examples


def _set_row_partner(example: Example, position, texts: dict) -> None:
    if position is None or position[0] == example.row:
        example.partner = f"row {example.dup_of} (not in this run's input)"
        return
    example.partner, example.partner_text = f"input row {position[0]}", texts.get(position[1:])


def _eval_partners(examples: list[Example], eval_paths) -> None:
    """The eval row a contaminated row matched: the one whose dpsel_id its detail names (any format: every
    token of the detail is tried), else an eval row with the row's own id (an exact copy). Unfound: no partner
    (the detail is shown)."""
    if not examples or not eval_paths:
        return
    for path in eval_paths:
        try:
            data = read_instruction_set([str(path)])
        except DpselInputError:
            continue              # an eval set moved since the run: the detail is shown instead
        index = {rid: i for i, rid in reversed(list(enumerate(data.id_list())))}
        for e in examples:
            hit = next((index[t] for t in [*_TOKEN.findall(e.detail), e.dpsel_id] if t in index), None)
            if hit is not None and e.partner_text is None:
                mask = np.zeros(len(data), bool)
                mask[hit] = True
                e.partner = f"eval row {int(data.file_rows[hit])} of {data.file_paths()[hit]}"
                e.partner_text = conversation_text(data.messages(mask)[0])


def require_file(url: str, known: dict[str, str]) -> None:
    """An input file must exist and still have the sha256 the run recorded (`known`: url -> sha256)."""
    from dpsel.io import file_sha256
    if url not in known:
        raise DpselInputError("the run's scores name an input file its manifest does not list", file=url)
    try:
        resolved = expand_paths([url])[0]
        digest = file_sha256(resolved.path, resolved.fs)
    except (FileNotFoundError, DpselInputError):
        raise DpselInputError("input file of the run not found (moved or deleted?)", file=url) from None
    if digest != known[url]:
        raise DpselInputError("input file changed since the run (its sha256 differs from the manifest's)", file=url)


# ---- report.md -------------------------------------------------------------------------------------------

def examples_markdown(examples: list[Example], stage_stats: list[dict]) -> list[str]:
    """report.md's section: per stage (in run order) and reason, a table of the dropped rows beside what they
    matched, every text cut (`cut`) and escaped for Markdown (`dpsel.report.escape`)."""
    from dpsel.report import escape   # plotting is imported only when a report is written
    if not examples:
        return []
    stage_of = {reason: st["stage"] for st in stage_stats for reason in st.get("by_reason", {})}
    order = [st["stage"] for st in stage_stats] + ["other"]
    by_stage: dict[str, dict[str, list[Example]]] = defaultdict(lambda: defaultdict(list))
    for e in examples:
        by_stage[stage_of.get(e.reason, "other")][e.reason].append(e)
    lines = [SECTION_TITLE, "",
             f"Per reason, the first {PER_REASON} dropped rows in input order beside what they matched (texts cut "
             f"to {TEXT_CHARS} characters; `dpsel inspect RUN --reason R` prints more).", ""]
    for stage in [s for s in order if s in by_stage]:
        lines += [f"### Stage {escape(stage)}", ""]
        for reason, picked in by_stage[stage].items():
            lines += [f"#### {escape(reason)}", "", "| row | detail | dropped row | beside |", "|---|---|---|---|"]
            lines += [f"| {e.row} | {escape(cut(e.detail))} | {escape(shown(e.text))} | {escape(partner_words(e))} |"
                      for e in picked] + [""]
    return lines


def partner_words(example: Example, limit: int = TEXT_CHARS) -> str:
    """What a dropped row is shown beside: its partner and the partner's text, cut; else why there is none."""
    if example.partner_text is not None:
        return f"{example.partner}: {shown(example.partner_text, limit)}"
    if example.partner:
        return example.partner
    if example.reason == CONTAMINATED:
        return f"(eval text not found; detail: {cut(example.detail, limit)})"
    return "-"


def report_section(report) -> list[str]:
    """The "What the stages dropped" section of a run's report.md, as lines (none if the file or section is
    missing): for views of a run that show what its report shows (the Prefect artifact)."""
    path = Path(report)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if SECTION_TITLE not in lines:
        return []
    start = lines.index(SECTION_TITLE)
    end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return lines[start:end] + [""]
