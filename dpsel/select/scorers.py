"""Scorer building blocks shared by the methods.

Every scorer keeps a table of the rows its run saw (dpsel_id -> posterior mean/std), so scoring a seen row
returns exactly the run's weights; unseen rows go to the method's own model (`_score_unseen`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpsel.data import row_id
from dpsel.io import write_parquet_atomic
from dpsel.select.base import Messages, read_scorer_meta, write_scorer_meta

SEEN_TABLE = "seen.parquet"


class SeenTableScorer:
    """Base scorer: exact weights for seen rows, `_score_unseen` for the rest. Subclasses set `kind`."""
    kind = "table"

    def __init__(self, ids, weight_mean: np.ndarray, weight_std: np.ndarray, info: dict | None = None):
        # The seen ids as one Arrow string array (22 MB for 1M 20-character ids), looked up through a dict built
        # on the first `score`: a curation only saves its scorer, and the strings, list and dict held 141 MB.
        self.ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
        self.weight_mean = np.asarray(weight_mean, dtype=np.float64)
        self.weight_std = np.asarray(weight_std, dtype=np.float64)
        if not len(self.ids) == len(self.weight_mean) == len(self.weight_std):
            raise ValueError(f"scorer: {len(self.ids)} ids but {len(self.weight_mean)} weights, "
                             f"{len(self.weight_std)} stds")
        self.info = dict(info or {})
        self._seen: dict[str, int] | None = None

    @property
    def _index(self) -> dict[str, int]:
        """Seen id -> its row; duplicate ids (exact duplicate rows) share one weight: the first occurrence's."""
        if self._seen is None:
            self._seen = {}
            for i, key in enumerate(self.ids.to_pylist()):
                self._seen.setdefault(key, i)
        return self._seen

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, messages: list[Messages], ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        ids = list(ids) if ids is not None else [row_id(m) for m in messages]
        if len(ids) != len(messages):
            raise ValueError(f"score: {len(messages)} rows but {len(ids)} ids")
        mean = np.empty(len(ids), dtype=np.float64)
        std = np.empty(len(ids), dtype=np.float64)
        unseen = []
        for k, key in enumerate(ids):
            i = self._index.get(key)
            if i is None:
                unseen.append(k)
            else:
                mean[k], std[k] = self.weight_mean[i], self.weight_std[i]
        if unseen:
            m, s = self._score_unseen([messages[k] for k in unseen], [ids[k] for k in unseen])
            mean[unseen], std[unseen] = m, s
        return mean, std

    def _score_unseen(self, messages: list[Messages], ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        write_scorer_meta(directory, self.kind, **self.info)
        table = pa.table({"dpsel_id": self.ids, "weight_mean": self.weight_mean, "weight_std": self.weight_std})
        write_parquet_atomic(table, directory / SEEN_TABLE)
        self._save_model(directory)

    def _save_model(self, directory: Path) -> None:
        """Subclasses save whatever scores unseen rows (adapter, weight net, feature stats)."""

    @classmethod
    def load(cls, directory: Path) -> "SeenTableScorer":
        directory = Path(directory)
        info = read_scorer_meta(directory)
        info.pop("kind", None)
        table = pq.read_table(directory / SEEN_TABLE)
        scorer = cls(table.column("dpsel_id"), table.column("weight_mean").to_numpy(),
                     table.column("weight_std").to_numpy(), info)
        scorer._load_model(directory)
        return scorer

    def _load_model(self, directory: Path) -> None:
        pass


class ConstantScorer(SeenTableScorer):
    """`all`: every row, seen or not, weighs 1."""
    kind = "all"

    def _score_unseen(self, messages, ids):
        return np.ones(len(ids)), np.zeros(len(ids))


def hashed_uniform(ids: list[str], seed: int) -> np.ndarray:
    """A uniform(0,1) number per id, a pure function of (id, seed): random scores without shared state."""
    out = np.empty(len(ids))
    for k, key in enumerate(ids):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        out[k] = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return out


class RandomScorer(SeenTableScorer):
    """`random`: unseen rows get the same seeded hash-uniform the run used."""
    kind = "random"

    def _score_unseen(self, messages, ids):
        return hashed_uniform(ids, int(self.info.get("seed", 0))), np.zeros(len(ids))
