"""English stop words: scikit-learn's list (318 words), loaded from its own small module file.

Importing scikit-learn takes ~1.2 s (longer than the near-dup stage takes to sign 30,000 rows), and a stop word
list is all the stages and the quality signals need from it, so the file is loaded by path; a scikit-learn laid
out otherwise is imported the public way.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


@functools.cache
def english_stop_words() -> frozenset[str]:
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "feature_extraction" / "_stop_words.py"
    if not path.exists():
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        return frozenset(ENGLISH_STOP_WORDS)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_dpsel_stop_words", path))
    module.__spec__.loader.exec_module(module)
    return frozenset(module.ENGLISH_STOP_WORDS)
