"""Scheduled curation end to end: a real `prefect server start`, `python -m flows.serve` on a schedules file,
one triggered run of the served cron deployment that must complete. Both processes are ours and are
stopped by their process-group id afterwards."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dpsel.errors import DpselInputError

REPO = Path(__file__).resolve().parents[2]
SERVER_START_S = 120
RUN_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM the process group we started (the serve runner's flow-run children too), then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _env(home: Path, api_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_RUNNER_POLL_FREQUENCY="1",
               PREFECT_SERVER_UI_ENABLED="false")
    return env


def test_check_rejects_bad_schedules(tmp_path):
    from flows.serve import build_deployments, load_schedules

    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: a, flow: curate, cron: '99 * * *', parameters: {out: x}}\n")
    with pytest.raises(DpselInputError, match="deployment a: .*[Ii]nvalid cron"):
        build_deployments(load_schedules(bad), str(bad))
    bad.write_text("- {name: a, flow: train-everything}\n")
    with pytest.raises(DpselInputError, match="deployment 0 \\(a\\), field flow"):
        load_schedules(bad)
    bad.write_text("- {name: a, flow: curate, parameters: {curate: {budget: 3}}}\n")
    with pytest.raises(DpselInputError, match="deployment a.*field curate.budget"):
        build_deployments(load_schedules(bad), str(bad))


def test_repo_schedules_file_is_valid():
    from flows.serve import build_deployments, load_schedules

    deployments = build_deployments(load_schedules(REPO / "schedules.yaml"), "schedules.yaml", base=REPO)
    assert {d.name for d in deployments} == {"nightly-curation", "hourly-filter"}
    assert all(d.schedules and d.entrypoint.startswith("flows.pipeline.") for d in deployments)


@pytest.mark.slow
def test_served_cron_deployment_runs_on_a_real_server(tmp_path):
    from dpsel.synth import generate

    data = generate(tmp_path / "data", rows=30, noise=0.3, seed=2, meta_rows=6, test_rows=4)
    out = tmp_path / "scheduled"
    schedules = tmp_path / "schedules.yaml"
    schedules.write_text(yaml.safe_dump([{
        "name": "test-curation", "flow": "curate", "cron": "0 3 * * *",
        "parameters": {"data": {"train": str(data["train"]), "meta": str(data["meta"])},
                       "curate": {"method": "random", "budget": 0.5}, "out": str(out)}}]))

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path / "prefect-home", api_url)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = serve = None
    try:
        with open(server_log, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port), "--no-ui"], env=env, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        _wait_healthy(api_url, server, server_log, SERVER_START_S)
        with open(serve_log, "wb") as log:
            serve = subprocess.Popen([sys.executable, "-m", "flows.serve", str(schedules)], env=env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        state = _trigger_and_wait(api_url, "curate/test-curation", serve, serve_log)
        assert state.is_completed(), f"{state}\n{serve_log.read_text()[-3000:]}"
        assert (out / "curated.parquet").exists() and (out / "manifest.json").exists()
    finally:
        _stop(serve)
        _stop(server)


def _trigger_and_wait(api_url: str, deployment_name: str, serve: subprocess.Popen, serve_log: Path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + RUN_S
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:  # the serve process registers the deployment once it has started
            if serve.poll() is not None:
                pytest.fail(f"flows.serve exited with {serve.returncode}:\n{serve_log.read_text()[-3000:]}")
            try:
                deployment = client.read_deployment_by_name(deployment_name)
                break
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    pytest.fail(f"deployment never registered:\n{serve_log.read_text()[-3000:]}")
                time.sleep(1)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        run = client.create_flow_run_from_deployment(deployment.id)
        while True:
            state = client.read_flow_run(run.id).state
            if state is not None and state.is_final():
                return state
            if time.monotonic() > deadline:
                pytest.fail(f"run still {state.name if state else None} after {RUN_S} s:\n"
                            f"{serve_log.read_text()[-3000:]}")
            time.sleep(1)
