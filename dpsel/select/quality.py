"""Label-free answer-quality signals for the bads prior (issue 28): is this a *good* answer, not only an on-topic
one? One function per signal, each over a list of rows at once, each a badness in [0, 1] or ≥ 0 (high = looks bad):

- repetition: Gopher's rules (Rae et al. 2021, table A1): the share of characters in duplicated lines and in
  duplicated word n-grams, and a low zlib compression ratio (a loop compresses far better than prose);
- debris: markup and non-alphabetic junk (HTML tags and entities, URLs, words without a letter, symbol runs);
- language mismatch: the answer is not in the question's language (langid, probabilities normalised);
- incompleteness: ends mid-sentence, unbalanced code fences, brackets or quotes;
- echo: the answer repeats the question (share of its word trigrams, or its words, found in the question);
- template frequency: how often the answer's word 4-grams, with the question's own words masked, recur across
  other rows' answers (a generic answer is one template with the subject swapped in);
- genericness (embedder space): how close the answer sits to unrelated rows' answers, against how close it sits
  to its own question.

All text signals are plain Python/numpy over strings: at 100k rows they cost seconds, not an LM pass.
"""
from __future__ import annotations

import array
import re
import zlib
from collections import Counter

import numpy as np

from dpsel.models.embedding_store import as_column
from dpsel.stop_words import english_stop_words

WORD = re.compile(r"\w+", re.UNICODE)
TAG = re.compile(r"</?[a-zA-Z][^>]{0,80}>|&[a-z]{2,6};|&#\d+;|https?://\S+|\[\d+\]|\{\{|\}\}|\|\s*\|")
SYMBOL_RUN = re.compile(r"[^\w\s.,;:!?'\"()`-]{3,}")
ENDINGS = (".", "!", "?", "```", ")", ":", "\"", "'", "`", "]", "。", "！", "？", "»")
PAIRS = (("(", ")"), ("[", "]"), ("{", "}"))
LANG_MIN_CHARS = 20    # below this, langid's verdict on a question is a guess: no mismatch is claimed
LANG_MAX_CHARS = 300   # langid reads this much of each text: its cost is linear in length, its verdict settles early
ENGLISH_SHARE = 0.25   # share of English stop words above which a text is taken as English without langid


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def duplicate_line_fraction(answers: list[str]) -> np.ndarray:
    """Gopher: share of characters in lines that occur more than once in the answer (blank lines ignored)."""
    out = np.zeros(len(answers))
    for i, text in enumerate(answers):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        counts = Counter(lines)
        total = sum(len(line) for line in lines)
        out[i] = sum(len(line) for line in lines if counts[line] > 1) / total if total else 0.0
    return out


def duplicate_ngram_fraction(answers: list[str], n: int = 3) -> np.ndarray:
    """Gopher: share of word characters covered by word n-grams that occur more than once in the answer."""
    out = np.zeros(len(answers))
    for i, text in enumerate(answers):
        toks = words(text)
        grams = [tuple(toks[k:k + n]) for k in range(len(toks) - n + 1)]
        counts = Counter(grams)
        covered = np.zeros(len(toks), dtype=bool)
        for k, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[k:k + n] = True
        chars = np.asarray([len(t) for t in toks], dtype=np.float64)
        out[i] = float(chars[covered].sum() / chars.sum()) if chars.sum() else 0.0
    return out


def compression_badness(answers: list[str], min_chars: int = 60) -> np.ndarray:
    """1 − zlib ratio (compressed / raw bytes): near 1 for a loop, lower for prose. Answers under `min_chars`
    get 0: zlib's header alone makes every short text look incompressible."""
    out = np.zeros(len(answers))
    for i, text in enumerate(answers):
        raw = text.encode("utf-8")
        if len(raw) >= min_chars:
            out[i] = 1.0 - len(zlib.compress(raw, 9)) / len(raw)
    return out


def repetition(answers: list[str]) -> np.ndarray:
    """The worst of Gopher's repetition rules per answer: duplicated lines, duplicated word 3-grams, and the
    compression ratio beyond prose's (≈0.45 saved for English; clipped at 0 below it)."""
    compress = np.clip((compression_badness(answers) - 0.45) / 0.55, 0.0, 1.0)
    return np.max(np.stack([duplicate_line_fraction(answers), duplicate_ngram_fraction(answers), compress]), axis=0)


def debris(answers: list[str]) -> np.ndarray:
    """Markup and non-alphabetic junk: the share of characters in tags, entities, URLs, citation marks and
    symbol runs, plus the share of whitespace-separated tokens with no letter (Gopher's alphabetic-word rule)."""
    out = np.zeros(len(answers))
    for i, text in enumerate(answers):
        if not text.strip():
            out[i] = 1.0
            continue
        junk = sum(len(m) for m in TAG.findall(text)) + sum(len(m) for m in SYMBOL_RUN.findall(text))
        tokens = text.split()
        no_letter = sum(not any(ch.isalpha() for ch in tok) for tok in tokens) / max(len(tokens), 1)
        out[i] = min(1.0, junk / len(text) + no_letter)
    return out


_IDENTIFIER = None


def _langid():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model
        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _IDENTIFIER


def plainly_english(text: str) -> bool:
    """At least ENGLISH_SHARE of the first LANG_MAX_CHARS characters' words are English stop words: running
    English ("the", "of", "is" make up ~40% of it; 1 in 20 English answers falls under 0.25 and goes to langid),
    which other languages rarely reach (3% of the vim catalogues' translated messages)."""
    tokens = words(text[:LANG_MAX_CHARS])
    stop = english_stop_words()
    return bool(tokens) and sum(t in stop for t in tokens) >= ENGLISH_SHARE * len(tokens)


def language_mismatch(questions: list[str], answers: list[str]) -> np.ndarray:
    """1 − P(answer is in the question's language) under langid (0 where the question is too short to say,
    or the answer has fewer than LANG_MIN_CHARS letters); each text's first (the question's last)
    LANG_MAX_CHARS characters are read. A question and answer both plainly English agree without asking
    langid (~9 ms a row for its two calls): in an English pool only the rows that might differ pay for it."""
    identifier, out = _langid(), np.zeros(len(answers))
    for i, (question, answer) in enumerate(zip(questions, answers)):
        if sum(ch.isalpha() for ch in answer) < LANG_MIN_CHARS or sum(ch.isalpha() for ch in question) < LANG_MIN_CHARS:
            continue
        if plainly_english(question[-LANG_MAX_CHARS:]) and plainly_english(answer):
            continue
        lang = identifier.classify(question[-LANG_MAX_CHARS:])[0]  # the end: the user turn, after any system turn
        probs = dict(identifier.rank(answer[:LANG_MAX_CHARS]))
        out[i] = 1.0 - float(probs.get(lang, 0.0))
    return out


def incompleteness(answers: list[str]) -> np.ndarray:
    """How cut off the answer looks: 0.5 for no sentence-final ending, 0.5 for an odd number of ``` fences,
    0.25 per unbalanced bracket kind and for an odd number of double quotes (capped at 1)."""
    out = np.zeros(len(answers))
    for i, text in enumerate(answers):
        body = text.rstrip()
        score = 0.0 if body.endswith(ENDINGS) else 0.5
        score += 0.5 * (body.count("```") % 2)
        score += 0.25 * sum(body.count(a) != body.count(b) for a, b in PAIRS)
        score += 0.25 * (body.count('"') % 2)
        out[i] = min(1.0, score)
    return out


def echo(questions: list[str], answers: list[str]) -> np.ndarray:
    """The share of the answer that repeats the question: its word trigrams found in the question (its words,
    for answers under three words), 0 for an empty answer."""
    out = np.zeros(len(answers))
    for i, (question, answer) in enumerate(zip(questions, answers)):
        a, q = words(answer), words(question)
        if not a:
            continue
        n = 3 if len(a) >= 3 else 1
        asked = {tuple(q[k:k + n]) for k in range(len(q) - n + 1)}
        grams = [tuple(a[k:k + n]) for k in range(len(a) - n + 1)]
        out[i] = sum(g in asked for g in grams) / len(grams)
    return out


def _skeleton_grams(question: str, answer: str, n: int) -> set[int]:
    """Hashed word n-grams of the answer with the question's words masked (the subject swapped into a template)."""
    asked = set(words(question))
    toks = ["·" if t in asked else t for t in words(answer)]
    return {hash(tuple(toks[k:k + n])) for k in range(len(toks) - n + 1)}


def _skeleton_hashes(questions: list[str], answers: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct masked-gram hashes of every row, flat int64; row offsets)."""
    flat, offsets = array.array("q"), [0]
    for q, a in zip(questions, answers):
        flat.extend(_skeleton_grams(q, a, n))
        offsets.append(len(flat))
    return np.frombuffer(flat, np.int64) if len(flat) else np.zeros(0, np.int64), np.asarray(offsets, np.int64)


def template_frequency(questions: list[str], answers: list[str], extra: tuple[list[str], list[str]] = ((), ()),
                       n: int = 4) -> np.ndarray:
    """Per row: the mean, over its answer's masked word 4-grams, of the share of the other rows' answers that
    share the 4-gram (log-scaled, 0 = all unique). `extra` (questions, answers): rows that only count, e.g. the
    pool when scoring meta rows. A row's own grams are not counted. Counted on one sorted array of 64-bit gram
    hashes (8 bytes a gram: ~250 MB at 1M rows, where a Counter of tuples would take gigabytes)."""
    own, offsets = _skeleton_hashes(questions, answers, n)
    counted = np.concatenate([own, _skeleton_hashes(*extra, n)[0]])
    values, counts = np.unique(counted, return_counts=True)
    per_gram = np.log1p(counts[np.searchsorted(values, own)] - 1) if len(own) else np.zeros(0)
    others = max(len(answers) + len(extra[1]) - 1, 1)
    sizes = np.diff(offsets)
    running = np.concatenate([[0.0], np.cumsum(per_gram)])
    totals = running[offsets[1:]] - running[offsets[:-1]]
    return np.where(sizes > 0, totals / np.maximum(sizes, 1), 0.0) / np.log1p(others)


def genericness(q: np.ndarray, a: np.ndarray, pool_a: np.ndarray | None = None, k: int = 10,
                sample: int = 2000, seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """Embedder space: mean cosine of each answer to its k nearest answers of *other* rows (a sample of up to
    `sample` of `pool_a`, default the rows themselves) minus its cosine to its own question. A generic answer
    fits any question, so it sits among other answers more than near its question. Inputs are unit rows; read
    `chunk` rows at a time (memory: chunk x sample similarities, whatever the pool's size); arrays or
    embedding-store columns."""
    pool_a = a if pool_a is None else pool_a
    same = pool_a is a
    idx = np.sort(np.random.default_rng(seed).permutation(len(pool_a))[:sample])
    pool_a, a, q = as_column(pool_a), as_column(a), as_column(q)
    neighbours = pool_a.rows(idx).T
    k = min(k, max(1, len(idx) - 1))
    out = np.empty(len(a), np.float64)
    for start in range(0, len(a), chunk):
        span = np.arange(start, min(start + chunk, len(a)))
        rows_a = a.rows(span)
        sims = rows_a @ neighbours
        if same:  # a row is not its own neighbour
            mine = np.flatnonzero((idx >= start) & (idx < start + len(rows_a)))
            sims[idx[mine] - start, mine] = -np.inf
        nearest = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
        rows_q = q.rows(span)
        out[start:start + len(rows_a)] = nearest - np.sum(rows_q * rows_a, axis=1)
    return out


TEXT_SIGNALS = ("repetition", "debris", "language", "incomplete", "echo", "template")


def text_signals(questions: list[str], answers: list[str],
                 extra: tuple[list[str], list[str]] = ((), ())) -> dict[str, np.ndarray]:
    """Every text signal by name (`extra`: rows template frequency counts but does not score)."""
    return {"repetition": repetition(answers), "debris": debris(answers),
            "language": language_mismatch(questions, answers), "incomplete": incompleteness(answers),
            "echo": echo(questions, answers), "template": template_frequency(questions, answers, extra)}
