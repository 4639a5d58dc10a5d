"""One batched forward routine for every pass that only reads a model: `filter`, the pool passes of `curate`
(the NLL of loss/ifd, the bads features, the RDS+ embeddings) and the reference's held-out loss all come
through `forward_rows`.

Rows are grouped by length (longest batch first, so an out-of-memory shows at once and padding stays
small), the model runs under `torch.inference_mode`, and the next batch is assembled (collated, moved to
the device) on a helper thread while the current forward runs: torch releases the GIL inside its kernels,
so the Python work of batch assembly is off the critical path.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

Reduce = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]   # (model output, batch) -> (B, k)


def length_batches(lengths: np.ndarray, indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`indices` sorted by length, longest first (stable), cut into batches of `batch_size`."""
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _prefetched(make: Callable[[np.ndarray], dict], batches: list[np.ndarray]) -> Iterator[tuple]:
    """(indices, batch) pairs, each batch built on a helper thread while the previous one is consumed."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpsel-collate") as pool:
        pending = pool.submit(make, batches[0])
        for k, chunk in enumerate(batches):
            batch = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(make, batches[k + 1])
            yield chunk, batch


def forward_rows(model: torch.nn.Module, make_batch: Callable[[np.ndarray], dict], lengths: np.ndarray,
                 reduce: Reduce, indices: np.ndarray | None = None, batch_size: int = 64,
                 output_hidden_states: bool = False) -> np.ndarray:
    """`reduce(output, batch)` for every row in `indices` (all rows by default), as float64 rows of an
    array aligned with `indices`. The model is put in eval mode for the pass and restored after."""
    lengths = np.asarray(lengths)
    indices = np.arange(len(lengths)) if indices is None else np.asarray(indices)
    position = {int(row): k for k, row in enumerate(indices)}
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for chunk, batch in _prefetched(make_batch, length_batches(lengths, indices, batch_size)):
                output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False, output_hidden_states=output_hidden_states)
                values = reduce(output, batch).double().cpu().numpy()
                if out is None:
                    out = np.zeros((len(indices),) + values.shape[1:])
                out[[position[int(row)] for row in chunk]] = values
    finally:
        model.train(was_training)
    return out if out is not None else np.zeros((0,))


def raw_forward_seconds(model: torch.nn.Module, batches: list[dict]) -> float:
    """Seconds the model alone takes on already-built batches (inference mode): the ceiling for scoring."""
    model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return time.perf_counter() - start
