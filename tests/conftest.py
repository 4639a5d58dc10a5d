"""Shared test fixtures. Keep them small: the whole suite runs on 2 shared CPU cores."""

import os
from pathlib import Path

# Before anything imports Prefect: a project-local home and no analytics (no network here).
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs the suite on two xdist workers, one per core of a 2-core CI runner: each worker's torch takes
# one thread that waits passively, so neither spins on the core the other works on (dpsel.threads has the
# measurements). Set before torch is imported, here and in every CLI the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from peft_train.tokenizer import ByteTokenizer


SERVICES = ("prefect_server", "ray_local")   # session fixtures that start a server or a runtime


def pytest_collection_modifyitems(config, items):
    """`on_demand` tests (long extras: more architectures, real kills, launchers) run only with DPSEL_SLOW=1.
    Under xdist (`--dist loadgroup`), every test of a file runs on one worker (its module fixtures are built
    once), and the files that use a Prefect server or a Ray runtime all run on one worker: one of each per suite."""
    _group_for_workers(items)
    if os.environ.get("DPSEL_SLOW"):
        return
    skip = pytest.mark.skip(reason="on demand: set DPSEL_SLOW=1")
    for item in items:
        if "on_demand" in item.keywords:
            item.add_marker(skip)


def _group_for_workers(items) -> None:
    services = {item.path for item in items if set(SERVICES) & set(getattr(item, "fixturenames", ()))}
    for item in items:
        group = "services" if item.path in services else str(item.path)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True, scope="session")
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def chat() -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread buys nothing, and on a shared CPU it costs a lot of waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (Ray's start-up costs seconds): 2 CPUs for two scorer
    actors plus one logical CPU for Ray Data's own tasks (see dpsel.engines.ray_engine.READ_CPUS).
    Skips where `ray[data]` is not installed."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect test-harness server (its own temporary SQLite database) for the session, started on first use.
    Defined here, not imported into test modules: a fixture imported into several modules is a fixture per module,
    and each started its own server (7-15 s apiece). Task results (the cache) go to a temporary folder so test
    runs never touch the project's .prefect/."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    # 120 s: the subprocess server takes 7-15 s alone and far longer on a busy 2-core machine.
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
            yield
