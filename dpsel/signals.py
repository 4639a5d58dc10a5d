"""SIGTERM handled like Ctrl-C: schedulers stop jobs with SIGTERM, and a stopped run must clean up (staging
folder removed, lock released, a checkpoint written where one is due) and say so, not vanish silently.

`install()` turns SIGTERM into `Terminated`, a KeyboardInterrupt, so every `finally`/`except BaseException`
path that handles Ctrl-C handles it too; the CLI maps it to exit 143 (128 + SIGTERM) with a message.
Inside a checkpointed loop (`defer(True)`, see `dpsel.checkpoint.Checkpoints.after_step`) the signal only
marks a request: the loop finishes its step, saves a checkpoint, then raises — so the run resumes from there.
"""
from __future__ import annotations

import signal
import threading

_state = {"defer": False, "pending": None}


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _on_sigterm(signum, frame) -> None:
    if _state["defer"]:
        _state["pending"] = signum
        return
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def install() -> bool:
    """Install the SIGTERM handler (main thread only, where Python delivers signals); True if installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def defer(on: bool) -> None:
    """While on, SIGTERM is recorded rather than raised (a step in progress finishes first); turning it off
    raises a recorded one."""
    _state["defer"] = on
    if not on:
        raise_if_pending()


def pending() -> bool:
    return _state["pending"] is not None


def raise_if_pending() -> None:
    signum, _state["pending"] = _state["pending"], None
    if signum is not None:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")
