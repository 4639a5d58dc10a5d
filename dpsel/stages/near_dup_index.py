"""The near-dup stage's kept state: per row its id and signatures (`NearDupIndex`), saved as one .npz so `dpsel
filter` can drop near-duplicates of curated rows; and sketches spilled to a file (`SpilledSketch`).

Two rules' signatures per row: the conversation's (`bands`, `sketch`) and its answer's with its question's keys
(`answer_bands`, `answer_sketch`, `keys`; see `near_dup`). An index saved before the answer rule existed has only
the first: it loads with `answer_missing` set, its rows given no keys, so they pair by the conversation rule only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

ANSWER_FIELDS = ("answer_bands", "answer_sketch", "keys")


@dataclass
class NearDupIndex:
    """Per row: `ids` (`S20`, wider for longer ids), `bands` (rows × bands, uint32), `sketch` (rows × num_perm,
    uint8), `answer_bands`, `answer_sketch` (the same for the answer), `keys` (rows × KEYS, uint32, 0 = none)."""
    ids: np.ndarray
    bands: np.ndarray
    sketch: np.ndarray
    answer_bands: np.ndarray
    answer_sketch: np.ndarray
    keys: np.ndarray
    answer_missing: bool = False      # loaded from an index saved before the answer rule

    @classmethod
    def empty(cls, widths: dict[str, tuple[int, type]], id_bytes: int) -> NearDupIndex:
        return cls(np.zeros(0, f"S{id_bytes}"), **{name: np.zeros((0, w), t) for name, (w, t) in widths.items()})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if f.name != "answer_missing")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.names)

    def sliced(self, rows: slice) -> NearDupIndex:
        return NearDupIndex(**{name: getattr(self, name)[rows] for name in self.names})

    def compact(self, rows: np.ndarray, chunk: int = 65536) -> None:
        """Keep only `rows` (ascending), moved down in place chunk by chunk: no second copy of the index
        (row k goes to a position <= k, and positions written never hold rows still to be read)."""
        for name in self.names:
            array = getattr(self, name)
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                array[start:start + len(part)] = array[part]
            setattr(self, name, array[:len(rows)])

    def save(self, path) -> None:
        np.savez(path, **{name: getattr(self, name) for name in self.names})

    @classmethod
    def load(cls, path) -> NearDupIndex:
        """The saved index; one saved before the answer rule gets zero-width answer fields (`answer_missing`)."""
        with np.load(path) as f:
            missing = not set(ANSWER_FIELDS) <= set(f.files)
            rows = len(f["ids"])
            answer = {name: np.zeros((rows, 0), np.uint8) if missing else f[name] for name in ANSWER_FIELDS}
            return cls(f["ids"], f["bands"], f["sketch"], **answer, answer_missing=missing)

    def fitted(self, widths: dict[str, tuple[int, type]]) -> NearDupIndex:
        """This index checked against a block's widths (ValueError naming the field that differs); an old one's
        answer fields filled with empty signatures and no keys, so its rows never pair by the answer rule."""
        for name, (width, dtype) in widths.items():
            array = getattr(self, name)
            if self.answer_missing and name in ANSWER_FIELDS:
                setattr(self, name, np.zeros((len(self), width), dtype))
            elif array.ndim != 2 or array.shape != (len(self), width) or array.dtype != dtype:
                raise ValueError(f"near-dup index field `{name}` is {array.dtype}{array.shape}, expected "
                                 f"{np.dtype(dtype)}({len(self)}, {width}): built by another version or settings")
        return self


class SpilledSketch:
    """Sketches appended to a file in row order instead of held in memory (`filter` on a pool: 128 bytes a row
    that only the few rows in candidate pairs are ever read back for). Stands in for `NearDupIndex.sketch` or
    `.answer_sketch`: `index.sketch[at:at + n] = block` appends; `take(rows)` reads the given rows back."""

    READ_ROWS = 65536      # rows read back at a time (8 MB at 128 bytes a row)

    def __init__(self, path, width: int):
        self.path, self.width, self.rows = path, width, 0
        self._handle = open(path, "wb")

    def __len__(self) -> int:
        return self.rows

    def __setitem__(self, where: slice, values: np.ndarray) -> None:
        if where.start != self.rows:
            raise RuntimeError(f"spilled sketches are written in row order: row {where.start}, expected {self.rows}")
        self._handle.write(np.ascontiguousarray(values, np.uint8).tobytes())
        self.rows += len(values)

    def __getitem__(self, where: slice) -> SpilledSketch:
        if where != slice(None, self.rows):
            raise RuntimeError("a spilled sketch is read back with take(), not sliced")
        return self

    def take(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), width] uint8 of `rows` (ascending, unique), read a chunk of the file at a time."""
        self._handle.flush()
        out = np.empty((len(rows), self.width), np.uint8)
        with open(self.path, "rb") as handle:
            for start in range(0, self.rows, self.READ_ROWS):
                lo, hi = np.searchsorted(rows, [start, start + self.READ_ROWS])
                if lo == hi:
                    continue
                handle.seek(start * self.width)
                chunk = np.frombuffer(handle.read(min(self.READ_ROWS, self.rows - start) * self.width), np.uint8)
                out[lo:hi] = chunk.reshape(-1, self.width)[rows[lo:hi] - start]
        return out

    def close(self) -> None:
        self._handle.close()
