"""Prefect test fixtures: one test-harness server (its own temporary SQLite database) for the session.

Import the fixture into a test module (`from prefect_fixtures import prefect_server`; tests/ is on sys.path); pytest then
starts the server once per session, on first use. Task results (the cache) go to a temporary folder so
test runs never touch the project's .prefect/.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    # 120 s: the subprocess server takes 7-15 s alone and far longer on a busy 2-core machine.
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
            yield
