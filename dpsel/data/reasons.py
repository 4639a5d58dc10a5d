"""Drop reasons and group columns: the one home of these names, for the reader, curation and the report."""
from __future__ import annotations

import numpy as np

REASON_INVALID, REASON_DUPLICATE = "invalid", "duplicate"
REASON_LOW_WEIGHT = "low_weight"
REASON_CODES = np.array(["", REASON_INVALID, REASON_DUPLICATE], dtype=object)   # by NormalizedBatch.codes
GROUP_COLUMNS = ("task", "source")
"""Columns whose values group rows in the validate summary and the report, where the input has them."""
