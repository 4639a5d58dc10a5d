"""Shared test fixtures. Keep them small: the whole suite runs on 2 shared CPU cores."""

import os
from pathlib import Path

# Before anything imports Prefect: a project-local home and no analytics (no network here).
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from peft_train.tokenizer import ByteTokenizer


def pytest_collection_modifyitems(config, items):
    """`on_demand` tests (long extras: more architectures, real kills, launchers) run only with DPSEL_SLOW=1."""
    if os.environ.get("DPSEL_SLOW"):
        return
    skip = pytest.mark.skip(reason="on demand: set DPSEL_SLOW=1")
    for item in items:
        if "on_demand" in item.keywords:
            item.add_marker(skip)


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
