"""Checkpoint and resume: SIGKILL or Ctrl-C a `curate --method bads` mid-sampling,
re-run the same command, and get the scores of an uninterrupted run bit for bit, the re-run saying what it
skipped; a changed config refuses to resume (exit 2 naming what changed) and `--restart` discards the
checkpoint. Each run is a real subprocess; where it stops is chosen by the test (fault injection), never timed.
The other stages (reference fit, chunked passes, l2rw, the flows' chain): tests/curation/test_every_stage_resumes.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.resume.checkpoints import Checkpoints, checkpoint_dir

ROOT = Path(__file__).resolve().parents[2]
DPSEL = [sys.executable, "-c", "from dpsel.cli import main; main()"]
STEPS = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task": "ab"[i % 2]} for i in range(16)]
    rows[3]["output"] = "banana"  # something to down-weight
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    meta = [{"instruction": f"Add {i} and 1.", "output": str(i + 1), "task": "a"} for i in range(100, 106)]
    pq.write_table(pa.Table.from_pylist(meta), root / "meta.parquet")
    # a short reference fit (ref_steps) and small batches keep the sampler's share of the run large; θ is the LM's
    # (the embedder θ's sampler is over in milliseconds, too soon to be killed mid-run)
    (root / "run.yaml").write_text(
        f"data:\n  train: {root / 'train.parquet'}\n  meta: {root / 'meta.parquet'}\n"
        f"curate:\n  method: bads\n  steps: {STEPS}\n  select:\n    batch_size: 4\n    meta_batch_size: 2\n"
        "    max_length: 48\n    extra:\n      ref_steps: 4\n      ref_eval_every: 2\n      theta_space: lm\n")
    return root


def _command(small: Path, out: Path, *extra: str) -> list[str]:
    return [*DPSEL, "curate", "--config", str(small / "run.yaml"), "--out", str(out), *extra]


def _env(every_s: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "DPSEL_CHECKPOINT_EVERY_S": every_s}


def _run(command: list[str], every_s: str = "0") -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(every_s), capture_output=True, text=True, timeout=600)


def _kill_mid_sampling(command: list[str], out: Path) -> int:
    """Run it and SIGKILL it right after its sampler checkpoint at a third of the run has been written in full
    (the run kills itself there: DPSEL_FAULT_KILL_AFTER_SAVE), so where the kill lands never depends on timing."""
    at = STEPS // 3
    env = {**_env("0"), "DPSEL_FAULT_KILL_AFTER_SAVE": f"sampler:{at}"}
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-sampling"
    return json.loads((checkpoint_dir(out) / "sampler.json").read_text())["state"]["step"]


def _weights(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "scores.parquet")[["dpsel_id", "dpsel_weight", "dpsel_weight_std", "dpsel_kept"]]


@pytest.fixture(scope="module")
def whole(small, tmp_path_factory) -> Path:
    """The uninterrupted run's output folder."""
    out = tmp_path_factory.mktemp("whole") / "out"
    done = _run(_command(small, out), every_s="1e9")  # no periodic checkpoint
    assert done.returncode == 0, done.stderr
    return out


def test_killed_bads_run_resumes_to_the_uninterrupted_result(small, whole, tmp_path):
    out = tmp_path / "killed"
    killed_at = _kill_mid_sampling(_command(small, out), out)
    assert 0 < killed_at < STEPS and not (out / "manifest.json").exists()
    changed = _run(_command(small, out, "--seed", "7"))  # another config: refused, checkpoint kept
    assert changed.returncode == 2, changed.stderr
    assert "config.seed" in changed.stderr and "--restart" in changed.stderr
    resumed = _run(_command(small, out))
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_checkpoint"]["sampler"]["from_step"] >= killed_at
    assert "reference" in manifest["resumed_from_checkpoint"]
    assert f"going on from step {manifest['resumed_from_checkpoint']['sampler']['from_step']}" in resumed.stderr
    pd.testing.assert_frame_equal(_weights(out), _weights(whole), check_exact=True)
    assert not checkpoint_dir(out).exists()  # published: the checkpoint is gone


def test_checkpoint_refuses_changed_input_and_loads_no_pickle(tmp_path):
    out = tmp_path / "run"
    checkpoints = Checkpoints.open(out, {"inputs": {"train": ["aaa"]}})
    import torch
    checkpoints.save("stage", {"x": torch.arange(3)}, {"step": 2})
    tensors, state = Checkpoints.open(out, {"inputs": {"train": ["aaa"]}}).load("stage")
    assert state == {"step": 2} and tensors["x"].tolist() == [0, 1, 2]
    with pytest.raises(Exception, match="inputs.train"):
        Checkpoints.open(out, {"inputs": {"train": ["bbb"]}})
    # a tensor file changed behind the JSON's back (a kill between the two writes) is not resumed
    (checkpoint_dir(out) / "stage.safetensors").write_bytes(b"\0" * 8)
    assert Checkpoints.open(out, {"inputs": {"train": ["aaa"]}}).load("stage") is None
    # --restart: the old checkpoint (of another input) is discarded, not refused
    restarted = Checkpoints.open(out, {"inputs": {"train": ["bbb"]}}, restart=True)
    assert restarted.load("stage") is None


def test_sigterm_mid_sampling_saves_a_checkpoint_then_exits_143(small, tmp_path):
    """SIGTERM is Ctrl-C plus a checkpoint: the step in progress finishes, the sampler state is saved even
    though no periodic save was due, and the run exits 143 with a message."""
    out, steps = tmp_path / "run", 400
    process = subprocess.Popen(_command(small, out, "--steps", str(steps)), env=_env("1e9"),
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # progress lines: "curate[bads]: step/total ..." (the reference fit has its own total)
        if f"/{steps} " in line:
            process.send_signal(signal.SIGTERM)
            break
    stderr = process.stderr.read()
    process.wait(timeout=300)
    assert process.returncode == 143, stderr
    assert "terminated" in stderr
    saved = json.loads((checkpoint_dir(out) / "sampler.json").read_text())["state"]
    assert 0 < saved["step"] < steps and not out.exists()


def test_ctrl_c_mid_sampling_saves_that_step_and_the_rerun_goes_on_from_it(small, whole, tmp_path):
    """Ctrl-C is SIGTERM with exit 130: the step in progress finishes, the sampler is saved at the step it
    stopped although no periodic save was due, and the run exits 130 saying so; the re-run says what it skipped
    and from which step it goes on, and ends with the uninterrupted scores."""
    out, at = tmp_path / "run", STEPS // 2
    env = {**_env("1e9"), "DPSEL_FAULT_SIGNAL": f"sampler:{at}:SIGINT"}  # Ctrl-C's signal after step `at`
    stopped = subprocess.run(_command(small, out), env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 130, stopped.stderr
    assert f"sampler stage is saved at step {at}" in stopped.stderr
    assert "interrupted" in stopped.stderr and "re-run the same command" in stopped.stderr
    assert json.loads((checkpoint_dir(out) / "sampler.json").read_text())["state"]["step"] == at
    assert not out.exists()

    resumed = _run(_command(small, out), every_s="1e9")
    assert resumed.returncode == 0, resumed.stderr
    assert f"sampler steps 0-{at - 1} skipped, going on from step {at} of {STEPS}" in resumed.stderr
    assert "the reference fit" in resumed.stderr and "row feature pass skipped" in resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_checkpoint"]["sampler"] == {"from_step": at, "steps": STEPS}
    pd.testing.assert_frame_equal(_weights(out), _weights(whole), check_exact=True)
