"""Every long stage of `curate` resumes: the reference fit, the pool passes of loss, ifd and rds (by
chunk) and l2rw's loop. Each run is killed by SIGKILL right after a save it chose (DPSEL_FAULT_KILL_AFTER_SAVE,
never by timing), re-run with the same command, and must end with the uninterrupted run's scores bit for bit,
saying on stderr what it skipped and from where it goes on, and recording it in the manifest. Last, the flows'
curate→tune chain, killed in curate and then in tune, ends as an uninterrupted chain does."""
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

from dpsel.resume.checkpoints import checkpoint_dir

ROOT = Path(__file__).resolve().parents[2]
DPSEL = [sys.executable, "-c", "from dpsel.cli import main; main()"]
ROWS, CHUNK = 200, 64   # 4 chunks of whole 64-row batches (the passes' batch)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    rows = [{"instruction": "Please " * (i % 7) + f"add {i} and {i + 1}.", "output": str(2 * i + 1),
             "task": "ab"[i % 2]} for i in range(ROWS)]
    rows[3]["output"] = "banana"
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    meta = [{"instruction": f"Add {i} and 1.", "output": str(i + 1), "task": "a"} for i in range(100, 112)]
    pq.write_table(pa.Table.from_pylist(meta), root / "meta.parquet")
    (root / "run.yaml").write_text(
        f"data:\n  train: {root / 'train.parquet'}\n  meta: {root / 'meta.parquet'}\n"
        "curate:\n  steps: 6\n  select:\n    batch_size: 8\n    meta_batch_size: 4\n    max_length: 48\n"
        "    extra:\n      ref_steps: 6\n      ref_eval_every: 2\n")
    return root


def _run(pool: Path, method: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    command = [*DPSEL, "curate", "--config", str(pool / "run.yaml"), "--method", method, "--out", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _scores(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "scores.parquet")[["dpsel_id", "dpsel_weight", "dpsel_weight_std", "dpsel_kept"]]


_WHOLE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def whole(pool, tmp_path_factory):
    """The uninterrupted run of a method (one pass over all rows, no periodic save), made once per module."""
    def get(method: str) -> Path:
        if method not in _WHOLE:
            out = tmp_path_factory.mktemp(f"whole-{method}") / "out"
            done = _run(pool, method, out, DPSEL_CHECKPOINT_EVERY_S="1e9")
            assert done.returncode == 0, done.stderr
            _WHOLE[method] = out
        return _WHOLE[method]
    return get


# (method, where the run kills itself, the stage resumed, what the re-run says)
CASES = [
    ("loss", "reference_fit:3", "reference_fit", {"from_step": 4, "steps": 6},
     "reference fit steps 1-3 skipped, going on from step 4 of 6"),
    ("loss", "loss.nll:2", "loss.nll", {"from_chunk": 2, "chunks": 4, "rows_skipped": 2 * CHUNK},
     f"loss.nll pass: chunks 1-2 of 4 ({2 * CHUNK} rows) skipped, going on from chunk 3"),
    ("ifd", "ifd.nll_response_only:1", "ifd.nll_response_only", {"from_chunk": 1, "chunks": 4, "rows_skipped": CHUNK},
     "ifd.nll_response_only pass: chunks 1-1 of 4"),
    ("rds", "rds.embeddings:3", "rds.embeddings", {"from_chunk": 3, "chunks": 4, "rows_skipped": 3 * CHUNK},
     "rds.embeddings pass: chunks 1-3 of 4"),
    ("l2rw", "l2rw:3", "l2rw", {"from_step": 3, "steps": 6}, "l2rw steps 0-2 skipped, going on from step 3 of 6"),
]


@pytest.mark.parametrize("method,kill_at,stage,record,says", CASES, ids=[c[1] for c in CASES])
def test_a_stage_killed_after_a_save_resumes_to_the_uninterrupted_scores(pool, whole, tmp_path, method, kill_at,
                                                                        stage, record, says):
    out = tmp_path / "run"
    env = {"DPSEL_CHECKPOINT_EVERY_S": "0", "DPSEL_PASS_CHUNK_ROWS": str(CHUNK)}   # save after every step/chunk
    killed = _run(pool, method, out, DPSEL_FAULT_KILL_AFTER_SAVE=kill_at, **env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "manifest.json").exists() and checkpoint_dir(out).exists()

    resumed = _run(pool, method, out, **env)
    assert resumed.returncode == 0, resumed.stderr
    assert says in resumed.stderr, resumed.stderr
    assert json.loads((out / "manifest.json").read_text())["resumed_from_checkpoint"][stage] == record
    # chunked and resumed, the scores are those of one uninterrupted pass over all rows
    pd.testing.assert_frame_equal(_scores(out), _scores(whole(method)), check_exact=True)
    assert not checkpoint_dir(out).exists()


def test_a_finished_reference_fit_is_not_redone(pool, whole, tmp_path):
    """Killed in the pass after the reference fit: the re-run takes the finished fit from the checkpoint."""
    out = tmp_path / "run"
    env = {"DPSEL_CHECKPOINT_EVERY_S": "1e9", "DPSEL_PASS_CHUNK_ROWS": str(CHUNK)}
    assert _run(pool, "loss", out, DPSEL_FAULT_KILL_AFTER_SAVE="reference_fit:6", **env).returncode == -signal.SIGKILL
    resumed = _run(pool, "loss", out, **env)
    assert resumed.returncode == 0, resumed.stderr
    assert "the reference fit (6 steps, finished) skipped" in resumed.stderr
    pd.testing.assert_frame_equal(_scores(out), _scores(whole("loss")), check_exact=True)


# ---- the flows' curate→tune chain, killed in each stage ------------------------------------------------

def _chain_env(home: Path, api_url: str) -> dict:
    """A `dpsel flow` subprocess against the session's Prefect test server, with its own results folder (the
    cache of the curate stage lives there across the three runs)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect-results"), "DPSEL_CHECKPOINT_EVERY_S": "0"}


def _chain(config: Path, out: Path, env: dict, **extra: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.{len(list(out.parent.glob(out.name + '.*.log')))}.log", "w")
    return subprocess.Popen([*DPSEL, "flow", "curate-then-tune", "--config", str(config), "--out", str(out)],
                            env={**env, **extra}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _kill_after_checkpoint(process: subprocess.Popen, checkpoint: Path, timeout: float = 600) -> None:
    """SIGKILL `process` once `checkpoint` (a Trainer checkpoint folder) is complete: a kill after a checkpoint
    known to exist, so the resume is from it or a later one, and the result the same either way."""
    import time
    from peft_train.training.checkpoints import is_complete
    deadline = time.monotonic() + timeout
    while not is_complete(checkpoint):
        assert process.poll() is None, f"the run ended before {checkpoint} was written"
        assert time.monotonic() < deadline, f"no {checkpoint} within {timeout} s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.on_demand  # ~65 s with its Prefect setup: DPSEL_SLOW=1 runs it (the suite must stay under 15 min)
@pytest.mark.prefect
def test_curate_then_tune_killed_in_each_stage_resumes_to_the_uninterrupted_result(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL
    from safetensors.torch import load_file
    import torch
    from dpsel.synth import generate

    data = generate(tmp_path / "synth", rows=40, noise=0.3, seed=1, meta_rows=8, test_rows=6)
    config = tmp_path / "chain.yaml"
    config.write_text(
        f"data:\n  train: {data['train']}\n  meta: {data['meta']}\n  eval: {data['test']}\n"
        "curate:\n  method: bads\n  budget: 0.5\n  steps: 8\n  select:\n    batch_size: 4\n    meta_batch_size: 2\n"
        "    max_length: 48\n    extra:\n      ref_steps: 4\n      ref_eval_every: 2\n"
        "tune:\n  steps: 40\n  batch_size: 4\n  max_length: 64\n  save_steps: 4\n"
        "device: cpu\nseed: 3\n")
    env = _chain_env(tmp_path, PREFECT_API_URL.value())
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert _chain(config, whole, env).wait(timeout=900) == 0, (tmp_path / "whole.0.log").read_text()[-3000:]

    # killed in curate: right after the sampler's save at step 3
    curate = _chain(config, out, env, DPSEL_FAULT_KILL_AFTER_SAVE="sampler:3")
    assert curate.wait(timeout=900) == -signal.SIGKILL, (tmp_path / "killed.0.log").read_text()[-3000:]
    assert (checkpoint_dir(out / "curate") / "sampler.json").exists()
    # re-run: curate resumes from step 3 and finishes; killed in tune after its checkpoint at step 4
    _kill_after_checkpoint(_chain(config, out, env), out / "tune-curated" / "checkpoints" / "checkpoint-4")
    assert "going on from step 3 of 8" in (tmp_path / "killed.1.log").read_text()
    assert not (out / "tune-curated" / "metrics.json").exists()
    # re-run: tune resumes from its checkpoint and the chain ends as the uninterrupted one did
    assert _chain(config, out, env).wait(timeout=900) == 0, (tmp_path / "killed.2.log").read_text()[-3000:]

    manifest = json.loads((out / "curate" / "manifest.json").read_text())
    assert manifest["resumed_from_checkpoint"]["sampler"]["from_step"] == 3
    pd.testing.assert_frame_equal(_scores(out / "curate"), _scores(whole / "curate"), check_exact=True)
    metrics = json.loads((out / "tune-curated" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 4
    expected = load_file(str(whole / "tune-curated" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "tune-curated" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)  # as tests/tuning/test_tune_resumes_after_kill.py
    assert metrics["eval_loss"] == pytest.approx(
        json.loads((whole / "tune-curated" / "metrics.json").read_text())["eval_loss"], abs=1e-5)
