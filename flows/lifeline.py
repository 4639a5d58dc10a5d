"""Children die with their parent: the embedded Prefect server (a `uvicorn` subprocess that Prefect starts
for a flow run without PREFECT_API_URL) must not outlive a `dpsel flow`/`dpsel demo` that was killed.

Prefect stops its server at exit (atexit), which SIGKILL skips. Linux's PR_SET_PDEATHSIG would have to be
set inside the child, and Prefect starts it without a hook for that, so a small watchdog process does it:
it records the parent's descendants while the parent lives and, once the parent is gone (the watchdog is
re-parented), terminates the ones still running (psutil guards against a reused pid).
"""
from __future__ import annotations

import os
import subprocess
import sys

_WATCHDOG = """
import os, sys, time, psutil
parent_pid = int(sys.argv[1])
me = os.getpid()
seen = {}
while os.getppid() == parent_pid:
    try:
        for child in psutil.Process(parent_pid).children(recursive=True):
            if child.pid != me:
                seen[child.pid] = child
    except psutil.Error:
        break
    time.sleep(0.5)
alive = [child for child in seen.values() if child.is_running()]
for child in alive:
    try:
        child.terminate()
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(alive, timeout=5)
for child in alive:
    try:
        child.kill()
    except psutil.Error:
        pass
"""

_started_for: int | None = None


def tie_children_to_this_process() -> None:
    """Start (once per process) the watchdog that terminates this process's children after it dies."""
    global _started_for
    if _started_for == os.getpid():
        return
    # Its own session: a Ctrl-C or a kill of the parent's process group must leave it alive to clean up.
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _started_for = os.getpid()
