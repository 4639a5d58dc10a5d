"""User-facing errors: bad input is reported by file, column and row, never as a traceback."""
from __future__ import annotations


class DpselInputError(Exception):
    """Bad input or bad arguments (CLI exit code 2). Names the file, column and first offending row."""

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None,
                 row: int | None = None):
        self.file, self.column, self.row = file, column, row
        where = [f"file {file}" if file else None,
                 f"column '{column}'" if column else None,
                 f"row {row}" if row is not None else None]
        where = ", ".join(w for w in where if w)
        super().__init__(f"{where}: {message}" if where else message)
