"""Small builders several test folders share (tests/ is on sys.path through its conftest.py)."""
from __future__ import annotations

import random

import pyarrow as pa

# a short meta-fitted reference: tests that check the plumbing of an LM method, not its quality
SMALL_LM = dict(ref_steps=20, ref_eval_every=10, ref_batch_size=8)

VOCAB = [f"word{i}" for i in range(3000)]


def make_table(prompts, answers=None, ids=None, column="dpsel_messages"):
    answers = answers if answers is not None else ["ok"] * len(prompts)
    ids = ids if ids is not None else [f"id{i:05d}" for i in range(len(prompts))]
    messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    return pa.table({"dpsel_id": ids, column: messages})


def docs(n, words=100, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(words)) for _ in range(n)]


def planted(seed=0):
    """300 distinct documents plus near copies of the first 30: word edits, reorderings, template changes."""
    rng = random.Random(seed)
    base = docs(300, seed=seed)
    copies, truth = [], []
    for k, text in enumerate(base[:30]):
        words = text.split()
        if k % 3 == 0:        # a word edited (word-5-shingle Jaccard ~0.9; two edits would be ~0.81)
            words[rng.randrange(len(words))] = "edited"
            copy = " ".join(words)
        elif k % 3 == 1:      # paragraphs reordered
            copy = " ".join(words[50:] + words[:50])
        else:                 # another prompt template around the same text
            copy = f"### Instruction:\n{text}\n\n### Response:"
        copies.append(copy)
        truth.append(f"id{k:05d}")
    return base + copies, truth
