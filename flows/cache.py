"""Cache keys for flow stages: content hashes of the stage's input files + its options + the code version.

Prefect's default `INPUTS` policy hashes the Python arguments; our arguments are paths, so an edited input
file would look unchanged to it, and hashing in-memory DataFrames instead is fragile. Here a stage declares
which of its parameters name input files; the key covers the bytes of every file they resolve to (Parquet
files, folders of shards, globs, URLs — or every file of a folder such as a scorer directory), the other
parameters (output folder included) and `dpsel.version.__version__`. Results are persisted by Prefect under
PREFECT_HOME (`storage/`), keyed by this value, so an unchanged re-run is a cache hit across processes.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dpsel.version
from dpsel.data import expand_paths
from dpsel.io import file_sha256

CacheKeyFn = Callable[[Any, dict[str, Any]], str | None]


def _canonical(value: Any) -> Any:
    """JSON-able form with a stable order (paths as strings, sets sorted, models dumped)."""
    if hasattr(value, "model_dump"):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    return value


def _tree_hashes(folder: Path) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file below a local folder."""
    return [(str(path.relative_to(folder)), file_sha256(path))
            for path in sorted(folder.rglob("*")) if path.is_file()]


def content_fingerprint(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list:
    """Hashes of every file `spec` names: Parquet files/globs/remote folders via `expand_paths`; a local folder
    file by file, every file (a scorer directory holds seen.parquet but also selection.json and the weight
    model: hashing only the Parquet part would reuse a stale result after the scorer changed)."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    fingerprint = []
    for one in specs:
        local = Path(os.fspath(one))
        if local.is_dir():
            fingerprint.append([os.fspath(one), _tree_hashes(local)])
            continue
        fingerprint.append([os.fspath(one), [file_sha256(f.path, fs=f.fs) for f in expand_paths(one)]])
    return fingerprint


def stage_key(stage: str, parameters: dict[str, Any], path_params: Iterable[str]) -> str:
    """The cache key of one stage run (see module docstring)."""
    path_params = set(path_params)
    payload = {
        "stage": stage,
        "code_version": dpsel.version.__version__,  # read per call: a test patches it
        "inputs": {name: content_fingerprint(parameters[name]) for name in sorted(path_params)
                   if parameters.get(name) is not None},
        "options": _canonical({k: v for k, v in parameters.items() if k not in path_params}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return f"dpsel-{stage}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()}"


def content_cache_key(*path_params: str) -> CacheKeyFn:
    """A Prefect `cache_key_fn` for a task whose `path_params` name input files.

    An input that cannot be read gives no key (None: no caching), so the task itself runs and reports the
    problem with its own error message instead of failing inside the cache machinery.
    """
    def key(context: Any, parameters: dict[str, Any]) -> str | None:
        try:
            return stage_key(context.task.name, parameters, path_params)
        except Exception:  # noqa: BLE001 - any unreadable input: run the task, let it raise the real error
            return None
    return key
