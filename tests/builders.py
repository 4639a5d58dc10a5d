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


def dropped_rows_inputs(folder) -> dict:
    """train/meta/eval Parquet files whose dropped rows are decided by the stages: rows 12, 15 and 17-22 exact
    duplicates (of rows 1, 14 and 0), row 13 a near copy of row 3 (one word edited), row 7 contaminated
    (eval.parquet holds a copy), row 16 invalid; row 14 (and its copy 15) has `|`, a newline and 400+ chars."""
    import pyarrow.parquet as pq

    texts = docs(12, words=100, seed=7)
    rows = [{"instruction": f"Question {i} about item {i}", "input": "", "output": t} for i, t in enumerate(texts)]
    near = rows[3]["output"].split()
    near[50] = "edited"
    rows += [dict(rows[1]), {**rows[3], "output": " ".join(near)},
             {"instruction": "left | right\nsecond line " + "long " * 80, "input": "", "output": "a | b"}]
    rows += [dict(rows[14]), {"instruction": "  ", "input": "", "output": "no question"}]
    rows += [dict(rows[0]) for _ in range(6)]
    meta = [{"instruction": f"Meta question {i}", "input": "", "output": t} for i, t in enumerate(docs(6, 30, 9))]
    paths = {"train": folder / "train.parquet", "meta": folder / "meta.parquet", "eval": folder / "eval.parquet"}
    for name, table in (("train", rows), ("meta", meta), ("eval", [dict(rows[7])])):
        pq.write_table(pa.Table.from_pylist(table), paths[name])
    return {name: str(path) for name, path in paths.items()}
