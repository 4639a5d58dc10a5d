"""SIGTERM handled like Ctrl-C: schedulers stop jobs with SIGTERM, and a stopped run must clean up (staging
folder removed, lock released, a checkpoint written where one is due) and say so, not vanish silently.

`install()` turns SIGTERM into `Terminated`, a KeyboardInterrupt, so every `finally`/`except BaseException`
path that handles Ctrl-C handles it too; the CLI maps it to exit 143 (128 + SIGTERM) with a message.
"""
from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def install() -> bool:
    """Install the SIGTERM handler (main thread only, where Python delivers signals); True if installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True
