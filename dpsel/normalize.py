"""The one normal form of an instruction row (chat `messages`) and its stable id.

Everything that needs a row's id (data layer, synth truth, filter) goes through `row_id` so ids agree.
"""
from __future__ import annotations

import hashlib
import json

ROLES = ("system", "user", "assistant")


def alpaca_to_messages(instruction: str, output: str, input: str | None = None,
                       system: str | None = None) -> list[dict]:
    """Alpaca row -> chat messages: optional system, user = instruction (+ blank line + input), assistant = output."""
    prompt = instruction if not input else f"{instruction}\n\n{input}"
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def row_id(messages: list[dict]) -> str:
    """Stable content hash of normalised messages (role and content only; other columns do not count)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]
