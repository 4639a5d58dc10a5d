"""Ctrl-C (SIGINT) and SIGTERM stop a run the same way: schedulers stop jobs with SIGTERM, people press
Ctrl-C, and a stopped run must clean up (staging folder removed, lock released, a checkpoint written where
one is due) and say so, not vanish silently.

`install()` turns SIGTERM into `Terminated` and SIGINT into `Interrupted`, both KeyboardInterrupts, so every
`finally`/`except BaseException` path that handles Ctrl-C handles both; the CLI maps them to exit 143
(128 + SIGTERM) and 130 (128 + SIGINT) with a message. Inside a checkpointed loop (`defer(True)`, see
`dpsel.resume.checkpoints.Checkpoints.after_step`) a signal only marks a request: the loop finishes its step, saves a
checkpoint, then raises — so the run resumes from there. A second signal while one waits stops at once.
"""
from __future__ import annotations

import signal
import threading

_state = {"defer": False, "pending": None}


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


class Interrupted(KeyboardInterrupt):
    """The process received SIGINT (Ctrl-C)."""


def _stop(signum: int) -> KeyboardInterrupt:
    kind = Terminated if signum == signal.SIGTERM else Interrupted
    return kind(f"{'terminated' if kind is Terminated else 'interrupted'} by signal {signal.Signals(signum).name}")


def _on_signal(signum, frame) -> None:
    if _state["defer"] and _state["pending"] is None:
        _state["pending"] = signum
        return
    _state["pending"] = None
    raise _stop(signum)


def install() -> bool:
    """Install the SIGTERM and SIGINT handlers (main thread only, where Python delivers signals); True if
    installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return True


def defer(on: bool) -> None:
    """While on, a stop signal is recorded rather than raised (a step in progress finishes first); turning it
    off raises a recorded one."""
    _state["defer"] = on
    if not on:
        raise_if_pending()


def pending() -> bool:
    return _state["pending"] is not None


def raise_if_pending() -> None:
    signum, _state["pending"] = _state["pending"], None
    if signum is not None:
        raise _stop(signum)
