"""`dpsel tune` under torchrun (2 CPU processes, gloo): the per-row weighted loss is exact across ranks, so two
processes × batch 2 end with the same adapter as one process × batch 2 × 2 accumulated micro-batches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["tune", "--method", "surm-circulant", "--steps", "4", "--batch-size", "2", "--max-length", "48",
          "--device", "cpu", "--weights-column", "w", "--seed", "5"]


def _run(launcher: list[str], data: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*launcher, *COMMON, "--data", str(data), "--out", str(out), *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.on_demand
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    # uneven weights: a plain per-rank mean (instead of the global Σ w) would give a different adapter
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "w": [0.2, 1.0, 3.0][i % 3]}
            for i in range(32)]
    data = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(data)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dpsel.cli"]
    _run(torchrun, data, tmp_path / "ddp")
    _run([sys.executable, "-m", "dpsel.cli"], data, tmp_path / "one", "--grad-accum", "2")
    ddp, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert ddp["losses"] == pytest.approx(one["losses"], rel=1e-4)
    expected = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(got[k], expected[k], atol=1e-5) for k in expected)
