"""The one normal form of an instruction row (chat `messages`) and its stable id.

Everything that needs a row's id (data layer, synth truth, filter) goes through `row_id` (one row) or
`row_ids_alpaca` / `row_ids_chat` (many rows, the data layer's fast path) so ids agree byte for byte.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from json.encoder import encode_basestring

ROLES = ("system", "user", "assistant")
ID_HEX_CHARS = 20


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
    return _digest(canonical)


def _digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


# The batch versions below write the same canonical JSON text as `row_id` without json.dumps' generic
# encoder: `encode_basestring` is the very function json.dumps(ensure_ascii=False) uses for a str (quotes
# and escapes), and roles come from ROLES, which need no escaping. Hashing stays per row (no vectorised
# sha256 in pyarrow); the rest of the row's work is columnar in the caller.
def row_ids_alpaca(prompts: Sequence[str], outputs: Sequence[str]) -> list[str]:
    """`row_id` of [user prompt, assistant output] for many valid rows (strings, never None)."""
    return [_digest(f'[["user",{encode_basestring(p)}],["assistant",{encode_basestring(o)}]]')
            for p, o in zip(prompts, outputs)]


def row_ids_chat(roles: Sequence[str], contents: Sequence[str], offsets: Sequence[int]) -> list[str]:
    """`row_id` of many valid chat rows given flat `roles`/`contents` and row `offsets` (len rows + 1)."""
    items = [f'["{role}",{encode_basestring(content)}]' for role, content in zip(roles, contents)]
    return [_digest("[" + ",".join(items[start:end]) + "]") for start, end in zip(offsets[:-1], offsets[1:])]
