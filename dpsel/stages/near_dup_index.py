"""The near-dup stage's kept state: per row its id and signatures (`NearDupIndex`), saved as one .npz so `dpsel
filter` can drop near-duplicates of curated rows; and sketches spilled to a file (`SpilledSketch`).

Two rules' signatures per row: the conversation's (`bands`, `sketch`) and its answer's with its question's keys
(`answer_bands`, `answer_sketch`, `keys`; see `near_dup`). An index saved before the answer rule existed has only
the first: it loads with `answer_missing` set, its rows given no keys, so they pair by the conversation rule only.
"""
from __future__ import annotations

import os
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, fields, replace

import numpy as np

ANSWER_FIELDS = ("answer_bands", "answer_sketch", "keys")
SKETCH_FIELDS = ("sketch", "answer_sketch")


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

    def spilled(self, folder=None, prefix: str = "dpsel-sketch-") -> NearDupIndex:
        """This index with its sketches moved to temporary files `prefix`* in `folder` (default TMPDIR;
        `SpilledSketch.temporary`, deleted when no longer referenced): 192 of its ~330 bytes a row, which only
        the rows in candidate pairs are read back for."""
        out = replace(self)
        for name in SKETCH_FIELDS:
            held = getattr(self, name)
            if not isinstance(held, SpilledSketch):
                sketch = SpilledSketch.temporary(held.shape[1], folder, prefix)
                sketch[0:len(held)] = held
                setattr(out, name, sketch)
        return out

    def compact(self, rows: np.ndarray, chunk: int = 65536) -> None:
        """Keep only `rows` (ascending), moved down in place chunk by chunk: no second copy of the index
        (row k goes to a position <= k, and positions written never hold rows still to be read)."""
        for name in self.names:
            array = getattr(self, name)
            if isinstance(array, SpilledSketch):
                array.compact(rows)
                continue
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                array[start:start + len(part)] = array[part]
            setattr(self, name, array[:len(rows)])

    def save(self, path) -> None:
        """One .npz (what `np.savez` writes; `load` reads it), written field by field: a spilled sketch is
        copied from its file a chunk at a time, never held whole."""
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in self.names:
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    _write_npy(member, getattr(self, name))

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


def _write_npy(handle, array) -> None:
    """`array` (an ndarray, or a `SpilledSketch` read back in chunks) in .npy format to an open binary handle."""
    if not isinstance(array, SpilledSketch):
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
        return
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(array), array.width)}
    np.lib.format.write_array_header_2_0(handle, header)
    for _, chunk in array.chunks():
        handle.write(chunk.tobytes())


class SpilledSketch:
    """Sketches appended to a file in row order instead of held in memory (`filter` on a pool: 128 bytes a row
    that only the few rows in candidate pairs are ever read back for). Stands in for `NearDupIndex.sketch` or
    `.answer_sketch`: `index.sketch[at:at + n] = block` appends; `take(rows)` reads the given rows back."""

    READ_ROWS = 65536      # rows read back at a time (8 MB at 128 bytes a row)

    def __init__(self, path, width: int):
        self.path, self.width, self.rows = path, width, 0
        self._handle = open(path, "wb")

    @classmethod
    def temporary(cls, width: int, folder=None, prefix: str = "dpsel-sketch-") -> SpilledSketch:
        """A sketch file `prefix`* in `folder` (default TMPDIR), deleted when the object is (or at exit)."""
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=".u8", dir=folder)
        os.close(handle)
        sketch = cls(name, width)
        weakref.finalize(sketch, os.unlink, name)
        return sketch

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

    def chunks(self):
        """(start, [rows, width] uint8) over the whole file, `READ_ROWS` rows at a time."""
        self._handle.flush()
        with open(self.path, "rb") as handle:
            for start in range(0, self.rows, self.READ_ROWS):
                data = handle.read(min(self.READ_ROWS, self.rows - start) * self.width)
                yield start, np.frombuffer(data, np.uint8).reshape(-1, self.width)

    def compact(self, rows: np.ndarray) -> None:
        """Keep only `rows` (ascending, unique), moved down in place a chunk at a time: every kept row goes to a
        position at or before its own, and a chunk is read whole before any of it is overwritten."""
        written = 0
        with open(self.path, "r+b") as handle:    # the append handle is flushed by `chunks` and not written to
            for start, chunk in self.chunks():
                lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
                kept = chunk[rows[lo:hi] - start].tobytes()
                os.pwrite(handle.fileno(), kept, written * self.width)
                written += hi - lo
            handle.truncate(written * self.width)
        self.rows = int(written)
        self._handle.close()
        self._handle = open(self.path, "ab")      # appends go after the kept rows

    def close(self) -> None:
        self._handle.close()
