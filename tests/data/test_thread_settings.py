"""dpsel.threads: cores from affinity and cgroup quota, precedence of explicit settings, passive waiting."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpsel.errors import DpselInputError
from dpsel.threads import available_cpus, cgroup_cpu_limit, choose_threads


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, limit):
    assert cgroup_cpu_limit(cgroup(tmp_path, files)) == limit


def test_available_cores_are_capped_by_quota_and_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(cgroup(tmp_path / "none", {})) == affinity
    assert available_cpus(cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1    # at least one
    assert available_cpus(cgroup(tmp_path / "big", {"cpu.max": f"{100000 * (affinity + 4)} 100000"})) == affinity


def test_explicit_settings_win_in_order(tmp_path, monkeypatch):
    root = cgroup(tmp_path, {"cpu.max": "100000 100000"})
    monkeypatch.delenv("DPSEL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(None, root) == (1, "available cores", 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None, root)[:2] == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("DPSEL_THREADS", "2")
    assert choose_threads(None, root)[:2] == (2, "DPSEL_THREADS")
    assert choose_threads(4, root)[:2] == (4, "argument")
    monkeypatch.setenv("DPSEL_THREADS", "zero")
    with pytest.raises(DpselInputError, match="DPSEL_THREADS"):
        choose_threads(None, root)


def test_configured_before_torch_gives_passive_waiting_and_the_thread_count():
    code = ("from dpsel.threads import configure_threads; p = configure_threads(2); import os, torch; "
            "print(p.wait_policy, os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "DPSEL_THREADS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "PASSIVE", "2"]
