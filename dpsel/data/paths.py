"""Which Parquet files an input names: files as given, folders (recursively) and globs, on any fsspec filesystem."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dpsel.errors import DpselInputError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ResolvedFile:
    """One Parquet file: the fsspec filesystem it lives on, its path there, and a printable URL."""
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str
    url: str

    def open(self):
        return self.fs.open(self.path, "rb")


def _resolved(fs: fsspec.AbstractFileSystem, path: str) -> ResolvedFile:
    url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    return ResolvedFile(fs=fs, path=path, url=url)


def _is_hidden(path: str, root: str) -> bool:
    """Spark/Hadoop markers (_SUCCESS) and temp files (.x.tmp) inside a shard folder are not data."""
    rel = path[len(root):].lstrip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _folder_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    found = fs.find(folder)
    return sorted(p for p in found if p.endswith(".parquet") and not _is_hidden(p, folder))


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ResolvedFile]:
    """Paths/URLs -> the Parquet files they name: files as given, folders -> their sorted `*.parquet`
    (recursively, hidden/underscore entries skipped), globs -> sorted matches. Raises when nothing matches."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DpselInputError("no input paths given")
    files: list[ResolvedFile] = []
    for raw in paths:
        spec = os.fspath(raw)
        try:
            fs, path = fsspec.core.url_to_fs(spec)
        except (ValueError, ImportError) as exc:
            raise DpselInputError(f"cannot open this path or URL ({exc})", file=spec) from exc
        files.extend(_resolved(fs, p) for p in _expand_one(fs, path, spec))
    return files


def _expand_one(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> list[str]:
    if _GLOB_CHARS & set(path):
        matches = []
        for match in sorted(fs.glob(path)):
            matches.extend(_folder_files(fs, match) if fs.isdir(match) else [match])
        if not matches:
            raise DpselInputError("no files match this pattern", file=spec)
        return matches
    if fs.isdir(path):
        inside = _folder_files(fs, path)
        if not inside:
            raise DpselInputError("folder contains no .parquet files", file=spec)
        return inside
    if not fs.exists(path):
        raise DpselInputError("file not found", file=spec)
    return [path]
