"""The process environment Prefect needs, set before Prefect is first imported (it reads its settings then):
where the embedded server keeps its SQLite, no analytics, time enough for the server to start."""
from __future__ import annotations

import os
from pathlib import Path


def use_project_prefect_home(cwd: str | os.PathLike | None = None) -> None:
    """Default PREFECT_HOME to `<cwd>/.prefect` (the embedded server's SQLite lives there), turn analytics off
    and give the embedded server time to start, unless the user set them. Call before prefect is imported."""
    os.environ.setdefault("PREFECT_HOME", os.fspath(Path(cwd or Path.cwd()) / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20 s default is too short for the embedded server on a small, busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
