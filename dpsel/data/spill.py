"""Arrow data moved out of the heap into a memory-mapped temporary file: held data that a long phase does not read
(the input table while selection runs) or reads a chunk at a time (the pool's messages) costs page cache, not the
process's RSS.

The file is unlinked as soon as it is mapped (the mapping keeps it alive until the last array that reads it is
gone), so a killed run leaves nothing behind. Pages a read touches stay resident in the process until
`Mapped.drop_pages` gives them back (`madvise(MADV_DONTNEED)`: the mapping is read-only and file-backed, so the
next read faults them in again from the page cache, unchanged). The files go to TMPDIR: on a RAM-backed tmpfs
they would cost memory all the same, so point TMPDIR at a disk for big pools.
"""
from __future__ import annotations

import logging
import mmap
import os
import tempfile

import pyarrow as pa

log = logging.getLogger(__name__)


def spill_or_hold(table: pa.Table) -> "Mapped | None":
    """`Mapped(table)`, or None (with a warning: the data stay in memory) where TMPDIR cannot take the file:
    spilling is a default, not something the user asked for, so a full or read-only TMPDIR slows nothing down."""
    try:
        return Mapped(table)
    except OSError as error:
        log.warning("could not spill %.0f MB to TMPDIR (%s): held in memory instead; point TMPDIR at a disk with "
                    "room (not a RAM-backed tmpfs) to keep it out of RSS", table.nbytes / 2**20, error)
        return None


class Mapped:
    """A read-only map of one temporary Arrow IPC stream file and the table read from it (zero-copy)."""

    def __init__(self, table: pa.Table):
        handle, name = tempfile.mkstemp(prefix="dpsel-spill-", suffix=".arrow")
        try:
            # the stream format, not the file format: it keeps a column's differing dictionaries chunk by chunk
            with os.fdopen(handle, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            with open(name, "rb") as source:
                self._map = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
        finally:
            os.unlink(name)
        self.table = pa.ipc.open_stream(pa.py_buffer(self._map)).read_all()   # zero-copy: buffers into the map

    def drop_pages(self) -> None:
        """Give back the pages reads have touched (they are read again from the page cache when next needed)."""
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)
