"""Every long stage of `curate` resumes (issue 20): the reference fit, the pool passes of loss, ifd and rds (by
chunk) and l2rw's loop. Each run is killed by SIGKILL right after a save it chose (DPSEL_FAULT_KILL_AFTER_SAVE,
never by timing), re-run with the same command, and must end with the uninterrupted run's scores bit for bit,
saying on stderr what it skipped and from where it goes on, and recording it in the manifest."""
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

from dpsel.checkpoint import checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
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
