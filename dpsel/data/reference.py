"""The per-row reference: one row's verdict, messages and id, the slow way (the oracle of the columnar path)."""
from __future__ import annotations

from dataclasses import dataclass

from dpsel.data.schema import ID_COLUMN, Shape
from dpsel.data.normalize import ROLES, alpaca_to_messages, row_id

MAX_MESSAGE_CHARS = 100_000
"""A message longer than this (in characters) marks its row invalid: almost surely a scraping/concat bug."""


# The per-row functions below are the reference semantics of a row's verdict, messages and id. The columnar
# path (columnar.py) decides in bulk which rows are certainly clean and sends only the others here, so
# error messages and the ids of bad rows come from this one definition.
@dataclass(frozen=True)
class RowProblem:
    """Why a row is invalid, and the column to blame."""
    detail: str
    column: str


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _too_long(messages: list[dict], column_of: dict[str, str]) -> RowProblem | None:
    for index, message in enumerate(messages):
        content = message["content"]
        if content is not None and len(content) > MAX_MESSAGE_CHARS:
            return RowProblem(f"{message['role']} message {index} has {len(content)} chars "
                              f"(limit {MAX_MESSAGE_CHARS})", column_of.get(message["role"], "messages"))
    return None


def _alpaca_row(instruction, output, input_text) -> tuple[list[dict], RowProblem | None]:
    messages = alpaca_to_messages(instruction, output, input_text or None)
    if _blank(instruction):
        kind = "null" if instruction is None else "empty"
        return messages, RowProblem(f"{kind} instruction", "instruction")
    if _blank(output):
        kind = "null" if output is None else "empty"
        return messages, RowProblem(f"{kind} output", "output")
    return messages, _too_long(messages, {"user": "instruction", "assistant": "output"})


def _chat_problem(raw: list[dict | None]) -> RowProblem | None:
    def bad(detail: str) -> RowProblem:
        return RowProblem(detail, "messages")
    if not raw:
        return bad("no messages")
    for index, message in enumerate(raw):
        if message is None:
            return bad(f"message {index} is null")
        if message.get("role") not in ROLES:
            return bad(f"message {index} has role {message.get('role')!r}; expected one of {list(ROLES)}")
        if message.get("content") is None:
            return bad(f"message {index} ({message['role']}) has null content")
        if message["role"] != "system" and _blank(message["content"]):
            return bad(f"message {index} ({message['role']}) is empty"
                       + (" (empty output)" if index == len(raw) - 1 else ""))
    if raw[-1]["role"] != "assistant":
        return bad(f"last message is from {raw[-1]['role']!r}, not the assistant")
    if not any(m["role"] == "user" for m in raw):
        return bad("no user message")
    return None


def _chat_row(raw: list[dict | None] | None) -> tuple[list[dict], RowProblem | None]:
    if raw is None:
        return [], RowProblem("messages is null", "messages")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in raw if m is not None]
    problem = _chat_problem(raw)
    return messages, problem or _too_long(messages, {})


def reference_row(shape: Shape, row: dict) -> tuple[list[dict], RowProblem | None, str]:
    """One row (as `to_pylist` gives it) -> messages, problem, id, the slow way: the oracle of the fast path."""
    if shape == "alpaca":
        messages, problem = _alpaca_row(row.get("instruction"), row.get("output"), row.get("input"))
    else:
        messages, problem = _chat_row(row.get("messages"))
    return messages, problem, row.get(ID_COLUMN) or row_id(messages)
