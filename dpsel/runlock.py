"""One run at a time per output folder: an advisory lock (filelock) beside OUT.

The lock file is `.OUT.lock` in OUT's parent, not inside OUT, because a run publishes by swapping the OUT
folder (`dpsel.outputs.publish`): a lock inside it would move with the old folder. Beside it sits
`.OUT.lock.json` naming the holder (pid, host, start time), so a second run can say who holds the folder.
The OS drops the lock when its holder dies, even by SIGKILL, so a dead run never blocks the next one.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from dpsel.errors import DpselInputError
from dpsel.parallel.env import launched_rank


def lock_paths(out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.lock", out_dir.parent / f".{out_dir.name}.lock.json"


def _holder(info_path: Path) -> str:
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return "another dpsel run (its pid is not recorded yet)"
    return f"another dpsel run, pid {info.get('pid')} on {info.get('host')} since {info.get('started_utc')}"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT's lock for the whole run; a second run into the same OUT fails at once (exit 2) naming the
    holder's pid. Also the first write of a run: an OUT whose parent is not writable fails here, before
    any work."""
    from dpsel.outputs import output_error

    lock_path, info_path = lock_paths(out_dir)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, blocking=False)
        lock.acquire()
    except Timeout:
        raise DpselInputError(f"--out {out_dir} is in use by {_holder(info_path)}; wait for it to finish or "
                              "choose another output directory", file=str(out_dir)) from None
    except OSError as error:
        raise output_error(error, lock_path) from error
    try:
        info_path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        yield
    finally:
        info_path.unlink(missing_ok=True)
        lock.release()


def locks_out(*input_params: str) -> Callable[[Callable], Callable]:
    """Decorator: run the function holding the lock of its `out` argument, after checking that `out` is
    not inside one of the inputs named by `input_params` (the lock file must not land in an input folder),
    and clean what dead runs left beside `out`."""
    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            from dpsel.outputs import check_out_outside_inputs, clean_stale

            arguments = signature.bind(*args, **kwargs).arguments
            out_dir = Path(arguments["out"])
            specs = [spec for name in input_params for spec in _as_list(arguments.get(name))]
            check_out_outside_inputs(out_dir, specs)
            if launched_rank() != 0:  # under torchrun rank 0 holds the lock for the run all ranks share
                return function(*args, **kwargs)
            with run_lock(out_dir):
                clean_stale(out_dir)
                return function(*args, **kwargs)
        return wrapper
    return decorate


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
