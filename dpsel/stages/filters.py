"""Heuristic quality and language filters (reason `filtered:<rule>`, the first rule a row fails).

Rules (all thresholds configurable; a YAML file gives any subset, unknown keys are an error):
| rule               | drops a row when                                                          | `default`   |
| ------------------ | ------------------------------------------------------------------------- | ----------- |
| `min_words`        | fewer words than this                                                     | 1           |
| `max_words`        | more words than this                                                      | 100,000     |
| `line_repetition`  | duplicate lines hold more than this fraction of the lines (Gopher: 0.3)   | 0.3         |
| `ngram_repetition` | the top 2/3/4-gram covers > 0.20/0.18/0.16 of the word characters, or    | Gopher's    |
|                    | duplicated 5..10-grams cover > 0.15..0.10 of them (Gopher's values)        |             |
| `non_alpha`        | more than this fraction of non-space characters is neither letter nor digit | 0.5         |
| `language`         | `langid` is at least `min_confidence` sure the text is in no allowed       | off         |
|                    | language (texts of at least `min_chars` characters only)                   |             |
`default` is conservative for instruction data: the repetition rules only judge rows of at least
`repetition_min_words` (50) words, as Gopher did for documents, since short answers repeat by nature,
and `non_alpha` only rows of at least 20 characters (arithmetic rows stay). `none` runs no rule.
Word counts and `non_alpha` are Arrow kernels; repetition is a Python pass over the long rows only.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from langid.langid import LanguageIdentifier, model

from dpsel.stages.base import Block, ConversationBatch, Verdict

PREFIX = "filtered:"
GOPHER_TOP = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass
class Language:
    allow: list[str]
    min_confidence: float = 0.9
    min_chars: int = 40


@dataclass
class FilterRules:
    min_words: int | None = None
    max_words: int | None = None
    max_dup_line_frac: float | None = None
    max_top_ngram_frac: dict[int, float] | None = None
    max_dup_ngram_frac: dict[int, float] | None = None
    repetition_min_words: int = 50
    max_non_alpha_frac: float | None = None
    non_alpha_min_chars: int = 20
    language: Language | None = None

    @classmethod
    def default(cls) -> FilterRules:
        return cls(min_words=1, max_words=100_000, max_dup_line_frac=0.3, max_top_ngram_frac=dict(GOPHER_TOP),
                   max_dup_ngram_frac=dict(GOPHER_DUP), max_non_alpha_frac=0.5)

    @classmethod
    def from_dict(cls, values: dict) -> FilterRules:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown filter rules {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        for key in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            if values.get(key) is not None:
                values[key] = {int(n): float(v) for n, v in values[key].items()}
        if values.get("language") is not None:
            values["language"] = Language(**values["language"])
        return cls(**values)

    @classmethod
    def from_spec(cls, spec: str | Path | None) -> FilterRules | None:
        """`none` (or None) -> no filtering, `default` -> the documented set, else a YAML file of rules."""
        if spec is None or str(spec) == "none":
            return None
        if str(spec) == "default":
            return cls.default()
        return cls.from_dict(yaml.safe_load(Path(spec).read_text()) or {})


def _ngram_repetition(words: list[str], top: dict[int, float] | None, dup: dict[int, float] | None) -> bool:
    """Gopher's repetition rules over one row's words (fractions of the characters in words)."""
    total = sum(len(w) for w in words) or 1
    for n, limit in (top or {}).items():
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            if count > 1 and sum(len(w) for w in gram) * count / total > limit:
                return True
    for n, limit in (dup or {}).items():
        seen, covered = set(), np.zeros(len(words), bool)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                covered[i:i + n] = True
            seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered) if c) / total > limit:
            return True
    return False


def _dup_line_frac(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


class Filters(Block):
    name = "filters"

    def __init__(self, rules: FilterRules):
        super().__init__()
        self.rules = rules
        self._identifier = None

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        verdict = Verdict.keep_all(len(rows))
        for rule, failed in self._checks(rows):
            verdict.reason[failed & (verdict.reason == "")] = PREFIX + rule
        return verdict

    def _checks(self, rows: ConversationBatch):
        r = self.rules
        counts = np.asarray(pc.list_value_length(rows.words), np.int64)
        if r.min_words is not None:
            yield "min_words", counts < r.min_words
        if r.max_words is not None:
            yield "max_words", counts > r.max_words
        long_rows = np.flatnonzero(counts >= r.repetition_min_words)
        if r.max_dup_line_frac is not None:
            failed = np.zeros(len(rows), bool)
            texts = rows.text.take(pa.array(long_rows)).to_pylist()
            failed[long_rows] = [_dup_line_frac(t) > r.max_dup_line_frac for t in texts]
            yield "line_repetition", failed
        if r.max_top_ngram_frac or r.max_dup_ngram_frac:
            failed = np.zeros(len(rows), bool)
            words = rows.words.take(pa.array(long_rows)).to_pylist()
            failed[long_rows] = [_ngram_repetition(w, r.max_top_ngram_frac, r.max_dup_ngram_frac) for w in words]
            yield "ngram_repetition", failed
        if r.max_non_alpha_frac is not None:
            yield "non_alpha", self._non_alpha(rows.text)
        if r.language is not None:
            yield "language", self._foreign(rows.text)

    def _non_alpha(self, text: pa.Array) -> np.ndarray:
        visible = np.asarray(pc.utf8_length(pc.replace_substring_regex(text, r"\s+", "")), np.float64)
        other = np.asarray(pc.count_substring_regex(text, r"[^\p{L}\p{N}\s]"), np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(visible > 0, other / visible, 0.0)
        return (visible >= self.rules.non_alpha_min_chars) & (frac > self.rules.max_non_alpha_frac)

    def _foreign(self, text: pa.Array) -> np.ndarray:
        language = self.rules.language
        if self._identifier is None:    # unpacking the model takes ~1 s: only when the rule is on
            self._identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        long_rows = np.flatnonzero(np.asarray(pc.utf8_length(text), np.int64) >= language.min_chars)
        failed = np.zeros(len(text), bool)
        for k, value in zip(long_rows.tolist(), text.take(pa.array(long_rows)).to_pylist()):
            code, confidence = self._identifier.classify(value)
            failed[k] = code not in language.allow and confidence >= language.min_confidence
        return failed

