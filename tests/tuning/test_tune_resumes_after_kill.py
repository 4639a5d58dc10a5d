"""`dpsel tune` killed with SIGKILL after a checkpoint, then re-run: it resumes and ends where an uninterrupted run does."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
# ~2 min on a loaded 2-core machine: on demand (DPSEL_SLOW=1); tests/tuning/test_tune_parquet.py covers the same resume
# in-process (training dies right after a checkpoint) in the default suite.
ARGS = ["--method", "lora", "--steps", "40", "--save-steps", "4", "--batch-size", "2", "--max-length", "48",
        "--device", "cpu", "--seed", "3"]


def _tune(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", "from dpsel.cli import app; app()", "tune", "--data", str(data), "--out", str(out), *ARGS,
                             *extra], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"tune ended before {path.name} appeared: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {path.name} within {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.on_demand
def test_sigkilled_tune_resumes_from_its_last_checkpoint(tmp_path):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(24)]
    data = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(data)

    victim = _tune(data, tmp_path / "killed")
    _wait_for(tmp_path / "killed" / "checkpoints" / "checkpoint-8" / "trainer_state.json", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed, whole = _tune(data, tmp_path / "killed"), _tune(data, tmp_path / "whole")
    for process in (resumed, whole):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    import json

    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 8 and metrics["steps"] == 40
    expected = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
