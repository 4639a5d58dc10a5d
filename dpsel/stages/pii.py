"""PII: e-mail addresses, phone numbers, IP addresses, card numbers (Luhn-checked) and API-key shapes.

Every row gets `dpsel_pii`, the sorted kinds found in its conversation. Modes: `flag` (only that column),
`redact` (also the messages with each match replaced by `[EMAIL]`, `[PHONE]`, ...) and `drop` (rows with
any kind are dropped, reason `pii`). Kinds are matched in the order of `PATTERNS` on text whose earlier
kinds are already masked, so an IP address is not also read as a phone number, nor a key as a card.
Detection and redaction are Arrow regex kernels (RE2) over the whole batch; only card candidates go
through Python, for the Luhn check.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.stages.base import MESSAGE_COLUMNS, Block, ConversationBatch, Verdict

REASON = "pii"
COLUMN = "dpsel_pii"
MODES = ("flag", "redact", "drop")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
PATTERNS = {   # kind -> RE2 pattern (also valid for Python's re)
    "key": r"(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}|sk-(?:proj-)?[A-Za-z0-9_-]{20,}"
           r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}"
           r"|-----BEGIN [A-Z ]*PRIVATE KEY-----)",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "card": r"\b[0-9](?:[ -]?[0-9]){12,18}\b",
    "ip": rf"\b(?:{_OCTET}\.){{3}}{_OCTET}\b|\b(?:[0-9A-Fa-f]{{1,4}}:){{7}}[0-9A-Fa-f]{{1,4}}\b",
    "phone": r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)[ .-]?|\b[0-9]{2,4}[ .-])[0-9]{3,4}[ .-][0-9]{3,4}\b",
}
_CARD = re.compile(PATTERNS["card"])


def luhn(digits: str) -> bool:
    """The Luhn checksum of a digit string (13-19 digits for a card number)."""
    if not 13 <= len(digits) <= 19 or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _mask_cards(text: str) -> str:
    return _CARD.sub(lambda m: "[CARD]" if luhn(re.sub(r"[ -]", "", m.group())) else m.group(), text)


def _masked(text: pa.Array, kind: str) -> tuple[pa.Array, np.ndarray]:
    """(text with this kind's matches replaced by its placeholder, per value: was there one?)"""
    pattern, placeholder = PATTERNS[kind], f"[{kind.upper()}]"
    candidate = np.asarray(pc.fill_null(pc.match_substring_regex(text, pattern), False), bool)
    if kind != "card":
        return pc.replace_substring_regex(text, pattern, placeholder), candidate
    rows = np.flatnonzero(candidate)
    before = text.take(pa.array(rows)).to_pylist()
    after = [_mask_cards(value) for value in before]
    found = np.zeros(len(text), bool)
    found[rows] = [a != b for a, b in zip(after, before)]
    mask = np.zeros(len(text), bool)
    mask[rows] = True
    replaced = pc.replace_with_mask(text, pa.array(mask), pa.array(after, text.type)) if len(rows) else text
    return replaced, found


def scan(text: pa.Array) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """Mask every kind in turn: (fully masked text, kind -> per-value found)."""
    found = {}
    for kind in PATTERNS:
        text, found[kind] = _masked(text, kind)
    return text, found


def find(text: pa.Array) -> dict[str, np.ndarray]:
    """`scan`'s findings (kind -> per value: was there one?) without masking every value: only values that some
    pattern matches as given are scanned, since a value none matches is never masked, so no later kind can
    match it either. Flagging a batch copies its text once per kind only for those values."""
    some = np.zeros(len(text), bool)
    for pattern in PATTERNS.values():
        some |= np.asarray(pc.fill_null(pc.match_substring_regex(text, pattern), False), bool)
    rows = np.flatnonzero(some)
    found = {kind: np.zeros(len(text), bool) for kind in PATTERNS}
    if len(rows):
        for kind, hit in scan(text.take(pa.array(rows)))[1].items():
            found[kind][rows] = hit
    return found


def _kinds_column(found: dict[str, np.ndarray], n: int) -> pa.Array:
    """Per value, the sorted kinds found in it (built in Arrow: no Python list per value)."""
    kinds = sorted(found)
    matrix = np.stack([found[kind] for kind in kinds], axis=1) if kinds else np.zeros((n, 0), bool)
    _, kind = np.nonzero(matrix)            # row-major: each value's kinds in sorted order
    offsets = np.concatenate([[0], np.cumsum(matrix.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(kinds, pa.string()).take(pa.array(kind, pa.int64())))


def _redacted_messages(messages: pa.ListArray) -> pa.ListArray:
    """The messages with every content masked (other struct fields and the list shape unchanged)."""
    flat = messages.flatten()
    names = [flat.type.field(i).name for i in range(flat.type.num_fields)]
    children = flat.flatten()
    content = names.index("content")
    children[content] = scan(children[content])[0]
    structs = pa.StructArray.from_arrays(children, names, mask=flat.is_null())
    return pa.ListArray.from_arrays(pc.subtract(messages.offsets, messages.offsets[0]), structs,
                                    mask=messages.is_null())


def redact_text_columns(table: pa.Table, skip: tuple[str, ...] = ()) -> pa.Table:
    """The table with every top-level string column masked like the messages (`--pii redact` must not
    leave the PII in an input's `instruction`/`output`/`text` columns that ride along to curated.parquet)."""
    for k, field in enumerate(table.schema):
        if field.name in skip or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        table = table.set_column(k, field, scan(table.column(k).combine_chunks())[0])
    return table


class Pii(Block):
    name = "pii"

    def __init__(self, mode: str = "flag"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"--pii must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.overwrites = MESSAGE_COLUMNS if mode == "redact" else ()

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        found = find(rows.text)
        verdict = Verdict.keep_all(len(rows))
        verdict.columns[COLUMN] = _kinds_column(found, len(rows))
        if self.mode == "drop":
            verdict.reason[np.logical_or.reduce(list(found.values()))] = REASON
        elif self.mode == "redact":
            verdict.columns[rows.message_column] = _redacted_messages(rows.messages)
        return verdict
