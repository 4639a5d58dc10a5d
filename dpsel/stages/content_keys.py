"""What a question is about, cheaply: the named things in its user turns, as `near_dup`'s answer rule keys them.

A key is one of (after trimming surrounding punctuation and backticks, and a possessive 's, lower-cased):
- a code span: any whitespace token with a backtick in it (`os.listdir`, `ls` of `ls -la`);
- an identifier: a dotted name with parts of 2+ characters (os.listdir, example.com; not "e.g."), a name with an
  underscore or a call's parenthesis (read_csv, len(x)), camelCase or an inner capital (DataFrame), or an
  acronym of 2+ capitals (SQL, NASA);
- a number: any token with a digit (1984, 3.14, v2);
- a capitalised name: two adjacent capitalised tokens, neither opening a sentence (a row's first token, or one
  after a token ending in . ! ? or :), so "Where was Albert Einstein born" keys "albert einstein" but a
  sentence's capitalised first word never joins a name;
- a quoted phrase: the text between a pair of double quotes (" or “ ”), up to `QUOTED_CHARS` characters, so
  'What does the gnupg manual say about "Agent Signals"?' keys "agent signals".
Keys are whole tokens of the question, never its wording around them, so a re-templated question ("Describe X"
vs "What is X for?") keeps its keys. Everything is pyarrow/numpy over the flat tokens: no Python per row.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.stages.base import hash_strings

KEYS = 4                     # key hashes kept per row (its smallest: the same whatever the keys' order)
_TRIM = "`'\"()[]{}<>,.;:!?*“”‘’"
_POSSESSIVE = r"['’]s$"
_IDENTIFIER = r"\d|\w{2,}\.\w{2,}|\w_|_\w|\w\(|\p{Ll}\p{Lu}|^\p{Lu}[\p{Lu}\d]+$"   # numbers too
_SENTENCE_END = r"[.!?:]$"
_MAYBE = r"[`\d_(.]|\p{Lu}"             # what every kind of key has
QUOTED_CHARS = 60


def _flat_tokens(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Whitespace tokens of every row, flat, and each token's row."""
    lists = pc.utf8_split_whitespace(pc.fill_null(text, ""))
    offsets = np.asarray(lists.offsets, np.int64)
    flat = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    return flat, np.repeat(np.arange(len(text)), np.diff(offsets))


def _flag(array: pa.Array, pattern: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.match_substring_regex(array, pattern), False), bool)


def _name_pairs(raw: pa.Array, row: np.ndarray, at: np.ndarray, capital: np.ndarray) -> np.ndarray:
    """Of the candidate tokens (positions `at` in the flat tokens), the indices i where candidates i and i + 1
    form a capitalised name: adjacent tokens of one row, both capitalised, neither opening a sentence."""
    opens = np.ones(len(at), bool)
    inside = (at > 0) & (row[np.maximum(at - 1, 0)] == row[at])
    opens[inside] = _flag(raw.take(pa.array(at[inside] - 1)), _SENTENCE_END)
    name = capital & ~opens
    if len(at) < 2:
        return np.zeros(0, np.int64)
    return np.flatnonzero(name[:-1] & name[1:] & (at[1:] == at[:-1] + 1) & (row[at[1:]] == row[at[:-1]]))


def keys_of(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The keys of every row of `text` (flat, lower-cased strings) and each key's row."""
    raw, row = _flat_tokens(text)
    at = np.flatnonzero(_flag(raw, _MAYBE))          # the few tokens that can be keys, classified below
    candidates = raw.take(pa.array(at))
    trimmed = pc.utf8_trim(pc.replace_substring_regex(pc.utf8_trim(candidates, _TRIM), _POSSESSIVE, ""), _TRIM)
    code = np.asarray(pc.match_substring(candidates, "`"), bool)
    single = (code | _flag(trimmed, _IDENTIFIER)) & np.asarray(pc.greater(pc.utf8_length(trimmed), 0), bool)
    first = _name_pairs(raw, row, at, _flag(candidates, r"^[`'\"(“‘]?\p{Lu}") & ~single)
    names = pc.binary_join_element_wise(trimmed.take(pa.array(first)), trimmed.take(pa.array(first + 1)), " ")
    quoted, quoted_row = _quoted(text)
    keys = pa.concat_arrays([trimmed.filter(pa.array(single)).cast(pa.string()), names.cast(pa.string()), quoted])
    return pc.utf8_lower(keys), np.concatenate([row[at[single]], row[at[first]], quoted_row]).astype(np.int64)


def _quoted(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The phrases between pairs of double quotes (whitespace-trimmed, 1..QUOTED_CHARS characters) and their rows:
    split at every quote mark, the pieces at odd positions that a later quote closes."""
    quoting = np.flatnonzero(_flag(text, "[\"“”]"))        # most questions quote nothing: split only these
    pieces = pc.split_pattern_regex(pc.fill_null(text.take(pa.array(quoting, pa.int64())), ""), "[\"“”]")
    offsets = np.asarray(pieces.offsets, np.int64)
    flat = pieces.values.slice(offsets[0], offsets[-1] - offsets[0])
    counts = np.diff(offsets)
    local = np.repeat(np.arange(len(quoting)), counts)
    position = np.arange(len(flat)) - np.repeat(offsets[:-1] - offsets[0], counts)
    inside = (position % 2 == 1) & (position < counts[local] - 1)
    row = quoting[local]
    phrase = pc.utf8_trim_whitespace(flat.filter(pa.array(inside)))
    size = np.asarray(pc.utf8_length(phrase), np.int64)
    ok = (size > 0) & (size <= QUOTED_CHARS)
    return phrase.filter(pa.array(ok)).cast(pa.string()), row[inside][ok]


def key_hashes(keys: pa.Array) -> np.ndarray:
    """32-bit hashes of keys, never 0 (0 marks an empty slot)."""
    hashed = (hash_strings(keys) >> np.uint64(32)).astype(np.uint32)
    return np.maximum(hashed, np.uint32(1))


def key_matrix(text: pa.Array, width: int = KEYS) -> np.ndarray:
    """[rows, width] uint32: each row's smallest distinct key hashes, ascending, 0 where it has fewer."""
    keys, row = keys_of(text)
    packed = np.unique((row.astype(np.uint64) << np.uint64(32)) | key_hashes(keys).astype(np.uint64))
    rows = (packed >> np.uint64(32)).astype(np.int64)
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    out = np.zeros((len(text), width), np.uint32)
    take = rank < width
    out[rows[take], rank[take]] = (packed[take] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def shared_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row of two [rows, KEYS] key matrices, the smallest key hash both hold when the two questions ask
    about the same thing, else 0: every key of one is a key of the other. Sharing one key is not enough:
    "`gnupg` (Agent Signals)" and "`gnupg` (Dirmngr Signals)" share the manual but ask about different sections.
    A row with more than KEYS keys is judged on its KEYS smallest."""
    a_in_b = (a[:, :, None] == b[:, None, :]).any(axis=2)
    b_in_a = (b[:, :, None] == a[:, None, :]).any(axis=2)
    same = a_in_b & (a != 0)
    nested = (a_in_b | (a == 0)).all(axis=1) | (b_in_a | (b == 0)).all(axis=1)
    first = same.argmax(axis=1)          # keys are ascending: the first shared one is the smallest
    return np.where(same.any(axis=1) & nested, a[np.arange(len(a)), first], 0).astype(np.uint32)


def key_named(text: str, key: int) -> str | None:
    """The key of `text` whose hash is `key` (for saying which key two questions share)."""
    keys, _ = keys_of(pa.array([text]))
    hit = np.flatnonzero(key_hashes(keys) == key)
    return keys[int(hit[0])].as_py() if len(hit) else None
