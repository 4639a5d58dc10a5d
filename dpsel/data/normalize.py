"""The one normal form of an instruction row (chat `messages`) and its stable id.

Everything that needs a row's id (data layer, synth truth, filter) goes through `row_id` (one row) or
`row_ids_alpaca` / `row_ids_chat` (many rows, the data layer's fast path) so ids agree byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from json.encoder import encode_basestring

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.data.arrays import numpy_bool, value_offsets

log = logging.getLogger(__name__)
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


# ----------------------------------------------------------------------------- columnar ids
# The same canonical text built over Arrow columns: JSON string escaping by replace passes (run only on
# the values that contain something to escape), concatenation by Arrow kernels, then one tight loop that
# hashes slices of the column's buffer (no vectorised sha256 exists in pyarrow). Values holding control
# characters that JSON spells \u00XX are left to the per-row functions above (`slow` rows).
_JSON_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
                 ("\b", "\\b"), ("\f", "\\f"))
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'
_UNICODE_ESCAPED = r"[\x00-\x07\x0b\x0e-\x1f]"
_UNICODE_ESCAPED_BYTES = np.array([*range(0x00, 0x08), 0x0b, *range(0x0e, 0x20)])
_HEX_PAIRS = np.array([f"{i:02x}".encode() for i in range(256)]).view(np.uint16)


def json_escaped(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Each (non-null) large_string value as the inside of its JSON string literal, as `json.dumps(...,
    ensure_ascii=False)` writes it; and a mask of the values left unescaped for the per-row path."""
    special = numpy_bool(pc.match_substring_regex(text, _NEEDS_ESCAPE))
    if not special.any():
        return text, np.zeros(len(text), dtype=bool)
    index = pa.array(np.flatnonzero(special), pa.int64())
    subset = text.take(index)
    present = _bytes_present(subset)       # ASCII bytes never occur inside multi-byte UTF-8 sequences
    slow = np.zeros(len(text), dtype=bool)
    if present[_UNICODE_ESCAPED_BYTES].any():
        slow[index.to_numpy()] = numpy_bool(pc.match_substring_regex(subset, _UNICODE_ESCAPED))
    for char, escaped in _JSON_ESCAPES:
        if present[ord(char)]:
            subset = pc.replace_substring(subset, char, escaped)
    return pc.replace_with_mask(text, pa.array(special), subset), slow


def _bytes_present(text: pa.Array) -> np.ndarray:
    """Which byte values occur in a large_string array's values (a 256-long bool mask)."""
    offsets = value_offsets(text)
    data = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] if len(text) else np.zeros(0, np.uint8)
    return np.bincount(data, minlength=256) > 0


def sha_ids(canonical: pa.Array) -> pa.Array:
    """`dpsel_id` (first 20 hex chars of sha256) of every value of a string column, by polars-hash's sha256
    (Rust, off the GIL: 0.28 s per 1M rows against 0.78 s for a per-row hashlib loop, `sha_ids_hashlib`)."""
    if not len(canonical):
        return pa.array([], pa.string())
    if _POLARS["forked"]:
        if not _POLARS["said"]:
            _POLARS["said"] = True
            log.info("ids: this process was forked after polars ran in its parent; hashing with hashlib (the same "
                     "ids, about 3x slower)")
        return sha_ids_hashlib(canonical)
    import polars as pl      # here, not at import: the library's other users need no polars
    import polars_hash  # noqa: F401  (registers the `chash` namespace)
    _polars_in_use()
    frame = pl.from_arrow(pa.table({"c": canonical.cast(pa.large_string())}), rechunk=False)
    hashed = frame.select(pl.col("c").chash.sha2_256().str.slice(0, ID_HEX_CHARS)).to_series().to_arrow()
    return hashed.cast(pa.string())


# polars' thread pool does not survive a fork: a process forked after this one used it waits forever on its
# first polars call (seen with multiprocessing's fork start method). Such a child hashes with hashlib instead.
_POLARS = {"used": False, "forked": False, "said": False}


def _polars_in_use() -> None:
    if not _POLARS["used"]:
        _POLARS["used"] = True
        os.register_at_fork(after_in_child=lambda: _POLARS.update(forked=True))


def sha_ids_hashlib(canonical: pa.Array) -> pa.Array:
    """`sha_ids` by hashlib, one row at a time: the reference the fast path is tested against."""
    data = canonical.cast(pa.large_binary())
    buffers = data.buffers()
    offsets = value_offsets(data).tolist()
    view = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")
    sha256 = hashlib.sha256
    digests = b"".join([sha256(view[start:end]).digest()[:ID_HEX_CHARS // 2]
                        for start, end in zip(offsets[:-1], offsets[1:])])
    hex_bytes = _HEX_PAIRS[np.frombuffer(digests, np.uint8)].tobytes()
    id_offsets = np.arange(0, ID_HEX_CHARS * len(data) + 1, ID_HEX_CHARS, dtype=np.int32)
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(id_offsets.tobytes()), pa.py_buffer(hex_bytes))


def _literal(text: str) -> pa.Scalar:
    return pa.scalar(text, pa.large_string())


def alpaca_canonical(prompt: pa.Array, output: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Canonical JSON of [user prompt, assistant output] per row (valid rows), and the per-row-path mask."""
    (p, p_slow), (o, o_slow) = json_escaped(prompt), json_escaped(output)
    text = pc.binary_join_element_wise(_literal('[["user","'), p, _literal('"],["assistant","'), o,
                                       _literal('"]]'), _literal(""))
    return text, p_slow | o_slow


def chat_canonical(role: pa.Array, content: pa.Array, offsets: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Canonical JSON per row from flat role/content items (roles from ROLES) and row `offsets`."""
    escaped, slow_items = json_escaped(content)
    items = pc.binary_join_element_wise(_literal('["'), role, _literal('","'), escaped, _literal('"]'),
                                        _literal(""))
    rows = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), items)
    text = pc.binary_join_element_wise(_literal("["), pc.binary_join(rows, _literal(",")), _literal("]"),
                                       _literal(""))
    counts = np.diff(offsets)
    slow = np.bincount(np.repeat(np.arange(len(counts)), counts), weights=slow_items, minlength=len(counts)) > 0
    return text, slow
