"""Invalid rows and exact duplicates, the first stage. The reader (`dpsel.data`) already decides both
(`dpsel_reason` = "invalid" / "duplicate", exact duplicates by `dpsel_id` through its `SeenIds` index);
this block carries those verdicts into the stage accounting. A table without `dpsel_reason` (rows built in
memory) is deduplicated here by `dpsel_id`, first occurrence kept. An exact duplicate's `dup_of` is its
own `dpsel_id`: the kept row has the same content, hence the same id."""
from __future__ import annotations

import numpy as np

from dpsel.stages.base import Block, ConversationBatch, Verdict

REASON_COLUMN = "dpsel_reason"
REASONS = ("invalid", "duplicate")


class Exact(Block):
    name = "exact"

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        verdict = Verdict.keep_all(len(rows))
        if REASON_COLUMN in rows.table.column_names:
            given = np.asarray(rows.table.column(REASON_COLUMN).to_pylist(), dtype=object)
            known = np.isin(given, REASONS)
            verdict.reason[known] = given[known]
            duplicate = given == "duplicate"
        else:
            _, first = np.unique(rows.ids.astype(str), return_index=True)
            duplicate = np.ones(len(rows), bool)
            duplicate[first] = False
            verdict.reason[duplicate] = "duplicate"
        verdict.dup_of[duplicate] = rows.ids[duplicate]
        return verdict
