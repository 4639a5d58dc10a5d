"""A pool pass resumable by chunk (`dpsel.models.passes.pool_pass` with a `stage`, in a checkpointed run).

The rows are cut into chunks of the pass's own length order (longest first, whole batches), so each chunk
batches and pads its rows exactly as one pass over all rows would: the values are bit-identical. Finished
chunks' values are saved by the checkpoints' policy (`Checkpoints.after_step`): the chunks finished since the
last save go to one part (`<stage>.part<j>`), then the stage's own record names the parts, so what is
written in all grows with the rows once, not once per save. A re-run loads the parts and goes on from the
first chunk they lack; a record of another pass (function, rows, θ or chunk size) is not resumed.
"""
from __future__ import annotations

import numpy as np
import torch

from dpsel.models.forward import length_batches
from dpsel.models.lm import LM, EncodedRows, theta_digest


class _Parts:
    """The chunks' values so far, and which of them are saved in which part."""

    def __init__(self, stage: str, key: list[str], n_chunks: int):
        self.stage, self.key, self.n_chunks = stage, key, n_chunks
        self.values: list[np.ndarray] = []   # one per finished chunk
        self.part_sizes: list[int] = []      # chunks per saved part

    def resume(self, checkpoint) -> int:
        """The chunks a saved record holds (their values loaded), 0 if none matches this pass."""
        saved = checkpoint.load(self.stage)
        if saved is None or saved[1].get("key") != self.key:
            return 0
        for j, size in enumerate(saved[1]["parts"]):
            part = checkpoint.load(f"{self.stage}.part{j}")
            if part is None or len(part[1]["sizes"]) != size:
                self.values, self.part_sizes = [], []
                return 0
            values = part[0]["values"].numpy()
            self.values += np.split(values, np.cumsum(part[1]["sizes"])[:-1])
            self.part_sizes.append(size)
        return len(self.values)

    def snapshot(self, checkpoint) -> tuple[dict, dict]:
        """Save the chunks since the last part as a new part; the stage's record (tensorless) naming them all."""
        first = sum(self.part_sizes)
        new = self.values[first:]
        if new:
            checkpoint.save(f"{self.stage}.part{len(self.part_sizes)}",
                            {"values": torch.from_numpy(np.concatenate(new))},
                            {"step": len(self.values), "sizes": [len(v) for v in new]})
            self.part_sizes.append(len(new))
        return {}, {"step": len(self.values), "chunks": self.n_chunks, "parts": self.part_sizes, "key": self.key}


def chunked_pass(fn, lm: LM, rows: EncodedRows, stage: str, checkpoint, size: int) -> np.ndarray:
    """`fn(lm, rows)`'s values, computed chunk by chunk (`size` rows, whole batches) with saves between."""
    chunks = length_batches(rows.lengths, np.arange(len(rows)), size)
    key = [f"{fn.__module__}.{fn.__qualname__}", rows.digest(), theta_digest(lm), str(size)]
    parts = _Parts(stage, key, len(chunks))
    done = parts.resume(checkpoint)
    if done:
        skipped = sum(len(c) for c in chunks[:done])
        checkpoint.resuming(stage, {"from_chunk": done, "chunks": len(chunks), "rows_skipped": skipped},
                            f"{stage} pass: chunks 1-{done} of {len(chunks)} ({skipped} rows) skipped, going on "
                            f"from chunk {done + 1}")
    checkpoint.loop_start()
    for k in range(done, len(chunks)):
        parts.values.append(fn(lm, rows.subset(chunks[k])))
        if k < len(chunks) - 1:
            checkpoint.after_step(stage, lambda: parts.snapshot(checkpoint))
    checkpoint.loop_done()
    values = np.concatenate(parts.values)
    out = np.zeros((len(rows),) + values.shape[1:], dtype=values.dtype)
    out[np.concatenate(chunks)] = values
    return out
