"""Runs that survive: one consistent run folder, one run per --out, SIGTERM, cache keys, escaping, children that
die with the parent, and the other hostile cases (each test says which case it holds)."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import dpsel.curation.run as curate_module
from dpsel.cli import app
from dpsel.curation import curate, filter_rows
from dpsel.curation.rules import make_rule
from dpsel.errors import DpselInputError
from dpsel.outputs import STAGING_TAG, clean_stale, verify_run
from dpsel.runlock import lock_paths, run_lock

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
DPSEL = [sys.executable, "-c", "from dpsel.cli import main; main()"]


def _rows(n: int, task=lambda i: "ab"[i % 2]) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task": task(i), "source": "web"}
            for i in range(n)]


@pytest.fixture
def data(tmp_path) -> dict:
    root = tmp_path / "data"
    root.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(30)), root / "train.parquet")
    meta = [{"instruction": f"Add {i} and 1.", "output": str(i + 1), "task": "a", "source": "trusted"}
            for i in range(100, 108)]
    pq.write_table(pa.Table.from_pylist(meta), root / "meta.parquet")
    return {"train": root / "train.parquet", "meta": root / "meta.parquet", "root": root}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _leftovers(out: Path, keep_checkpoint: bool = False) -> list[str]:
    """dpsel temp folders/files beside or inside OUT (a killed run's checkpoint too, unless `keep_checkpoint`:
    it stays for the next run to resume, which removes it once it has published)."""
    beside = [p.name for p in out.parent.glob(f".{out.name}.dpsel-*")
              if not (keep_checkpoint and p.name.endswith(".dpsel-checkpoint"))]
    inside = [p.name for p in out.glob(".*") if p.name.endswith((".tmp", ".old"))] if out.is_dir() else []
    return beside + inside


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- case 1: one consistent run folder ---------------------------------------------------------------------

def test_run_folder_records_one_run_id_everywhere(data, tmp_path):
    out = tmp_path / "run"
    curate(data["train"], data["meta"], out, method="random", budget=0.5)
    manifest = _manifest(out)
    assert verify_run(out) == []
    run_id = manifest["run_id"]
    assert json.loads((out / "scorer" / "selection.json").read_text())["run_id"] == run_id
    assert f"run id**: {run_id}" in (out / "report.md").read_text()
    assert {"scores.parquet", "curated.parquet", "report.md", "scorer/selection.json"} <= set(manifest["files"])
    (out / "curated.parquet").write_bytes((out / "curated.parquet").read_bytes() + b"x")
    assert any("curated.parquet" in p for p in verify_run(out))


def _crash_at(write_point: int, train, meta, out, seed: int) -> None:
    """Child process: run curate and die like SIGKILL (no cleanup) at the `write_point`-th rename or mkdir."""
    calls = {"n": 0}
    real_replace, real_mkdir = os.replace, Path.mkdir

    def tick():
        calls["n"] += 1
        if calls["n"] == write_point:
            os._exit(137)

    def replace(*args, **kwargs):
        tick()
        return real_replace(*args, **kwargs)

    def mkdir(self, *args, **kwargs):
        tick()
        return real_mkdir(self, *args, **kwargs)

    os.replace, Path.mkdir = replace, mkdir
    curate(train, meta, out, method="random", budget=0.5, config=curate_module.SelectConfig(seed=seed))
    os._exit(100 + min(calls["n"], 99))  # finished: report how many write points there were


def _run_child(*args) -> int:
    process = multiprocessing.get_context("fork").Process(target=_crash_at, args=args)
    process.start()
    process.join()
    return process.exitcode


def test_a_kill_at_every_write_point_never_leaves_a_folder_that_looks_complete(data, tmp_path):
    """case 1: whatever write a kill interrupts, OUT is the previous complete run, the new complete run, or
    absent (the instant between the two renames) — never a mix; the next run cleans up and restores."""
    out = tmp_path / "run"
    first = curate(data["train"], data["meta"], out, method="random", budget=0.5).manifest["run_id"]
    points = _run_child(10**6, data["train"], data["meta"], out, 1) - 100
    first = _manifest(out)["run_id"]
    assert points >= 8  # lock, staging, parquet x2, scorer, plots, report, manifest, publish
    for point in range(1, points + 1):
        code = _run_child(point, data["train"], data["meta"], out, 2)
        assert code == 137 or code > 100  # killed, or this run had fewer write points and finished
        if out.exists():
            assert verify_run(out) == [], f"kill at write {point} left a mixed folder"
            assert _manifest(out)["run_id"] == first or _manifest(out)["seed"] == 2
        with run_lock(out):  # what the next run does first
            clean_stale(out)
        assert verify_run(out) == [] and _leftovers(out, keep_checkpoint=True) == []
        first = _manifest(out)["run_id"]
    curate(data["train"], data["meta"], out, method="random", budget=0.5)
    assert verify_run(out) == [] and _leftovers(out) == []


def test_user_files_in_out_survive_and_stale_temps_are_cleaned(data, tmp_path):
    out = tmp_path / "run"
    curate(data["train"], data["meta"], out, method="random")
    (out / "notes.txt").write_text("mine")
    (out / ".scorer.abc.tmp").mkdir()  # left by an older, killed version
    (tmp_path / f".run{STAGING_TAG}20200101T000000Z-dead").mkdir()
    curate(data["train"], data["meta"], out, method="random")
    assert (out / "notes.txt").read_text() == "mine"
    assert _leftovers(out) == []


# ---- case 2: one run per --out -------------------------------------------------------------------------------

def test_second_run_into_a_locked_out_exits_2_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from dpsel.runlock import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(out)],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                     "--out", str(out), "--method", "random"])
        assert result.exit_code == 2, result.output
        assert f"pid {holder.pid}" in result.output
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: the next run goes ahead
    curate(data["train"], data["meta"], out, method="random")
    assert verify_run(out) == []


def test_lock_is_released_after_a_failed_run(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DpselInputError):
        curate(data["train"], data["meta"], out, method="random", budget=2.0)
    with run_lock(out):  # would raise if the failed run had kept it
        pass
    assert not lock_paths(out)[1].exists()


# ---- cases 4-7, 11, 12, 14 -------------------------------------------------------------------------------------

def test_out_inside_an_input_folder_is_refused(data, tmp_path):
    """case 4: the folder is never written to, so a second run cannot read its own outputs."""
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(data["train"], shards / "part-0.parquet")
    before = sorted(p.name for p in shards.rglob("*"))
    for out in (shards, shards / "run", data["root"]):
        result = runner.invoke(app, ["curate", "--train", str(shards), "--meta", str(data["meta"]),
                                     "--out", str(out), "--method", "random"])
        assert result.exit_code == 2, result.output
        assert "input folder" in result.output
    assert sorted(p.name for p in shards.rglob("*")) == before


def test_budget_and_threshold_together_refused_everywhere(data, tmp_path):
    """case 5: CLI, run config overrides and the Python API."""
    from dpsel.config import RunConfig
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(tmp_path / "o"), "--budget", "0.5", "--threshold", "0.5"])
    assert result.exit_code == 2 and "not both" in result.output
    with pytest.raises(DpselInputError, match="not both"):
        RunConfig.load(None, {"budget": 0.5, "threshold": 0.5}, stage="curate")
    config = tmp_path / "run.yaml"
    config.write_text("curate:\n  budget: 0.5\n  threshold: 0.5\n")
    with pytest.raises(DpselInputError, match="not both"):
        RunConfig.load(config, {}, stage="curate")
    with pytest.raises(DpselInputError, match="not both"):
        curate(data["train"], data["meta"], tmp_path / "o", method="random", budget=0.5, threshold=0.5)
    # a file's budget replaced by a command-line threshold is fine (one source each)
    config.write_text("curate:\n  budget: 0.5\n")
    assert RunConfig.load(config, {"threshold": 0.4}, stage="curate").curate.budget is None


@pytest.mark.parametrize("threshold", ["2", "-0.1", "nan"])
def test_filter_validates_threshold_like_curate(data, tmp_path, threshold):
    """case 6"""
    run = tmp_path / "run"
    curate(data["train"], data["meta"], run, method="random")
    result = runner.invoke(app, ["filter", "--scorer", str(run / "scorer"), "--in", str(data["train"]),
                                 "--out", str(tmp_path / "f"), "--threshold", threshold])
    assert result.exit_code == 2, result.output
    assert "--threshold must be" in result.output
    with pytest.raises(DpselInputError, match="--threshold"):
        make_rule("random", None, float(threshold), None, False, "task")


def _denied(path):
    return PermissionError(errno.EACCES, "Permission denied", str(path))


def test_unreadable_input_is_exit_2_with_the_path(data, monkeypatch):
    """case 7 (reading). Root ignores permission bits, so as root the denial is injected where the file
    is opened; as any other user the file really is unreadable."""
    if os.geteuid() == 0:
        from dpsel.data import ResolvedFile
        real_open = ResolvedFile.open

        def open_denied(self):
            if self.path.endswith("train.parquet"):
                raise _denied(self.path)
            return real_open(self)
        monkeypatch.setattr(ResolvedFile, "open", open_denied)
    else:
        data["train"].chmod(0o000)
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(data["root"].parent / "o"), "--method", "random"])
    assert result.exit_code == 2, result.output
    assert "train.parquet" in result.output and "permission denied" in result.output.lower()


def test_read_only_out_is_exit_2_before_the_work(data, tmp_path, monkeypatch):
    """case 7 (writing): the write check (creating OUT's lock file) comes before reading and selection."""
    locked = tmp_path / "readonly"
    locked.mkdir()
    if os.geteuid() == 0:
        def acquire_denied(self, *args, **kwargs):
            raise _denied(self.lock_file)
        monkeypatch.setattr("dpsel.runlock.FileLock.acquire", acquire_denied)
    else:
        locked.chmod(0o555)
    monkeypatch.setattr(curate_module, "read_rows", lambda *a: pytest.fail("read inputs before the write check"))
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(locked / "o"), "--method", "random"])
    assert result.exit_code == 2, result.output
    assert str(locked) in result.output and "permission denied" in result.output


def test_disk_full_is_exit_2_and_keeps_the_previous_run(data, tmp_path, monkeypatch):
    """case 12"""
    out = tmp_path / "run"
    first = curate(data["train"], data["meta"], out, method="random").manifest["run_id"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dpsel.io.pq.write_table", full)
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(out), "--method", "random"])
    assert result.exit_code == 2, result.output
    assert "no space left on device" in result.output and str(tmp_path) in result.output
    assert _manifest(out)["run_id"] == first and verify_run(out) == [] and _leftovers(out) == []


def test_meta_duplicates_are_dropped_and_recorded(data, tmp_path, caplog):
    """case 11"""
    meta = pq.read_table(data["meta"]).to_pylist()
    pq.write_table(pa.Table.from_pylist(meta + [meta[2]]), tmp_path / "meta_dup.parquet")
    with caplog.at_level("WARNING"):
        result = curate(data["train"], tmp_path / "meta_dup.parquet", tmp_path / "run", method="random")
    dropped = result.manifest["meta_duplicates_dropped"]
    assert dropped["count"] == 1 and dropped["rows"][0]["row"] == len(meta)
    assert "duplicate" in caplog.text


def test_bad_truth_fails_before_the_work(data, tmp_path, monkeypatch):
    """case 14: a truth file without dpsel_id is refused before selection runs."""
    pq.write_table(pa.table({"row": list(range(30)), "kind": ["clean"] * 30}), tmp_path / "truth.parquet")

    def no_work(*args, **kwargs):
        raise AssertionError("selection ran before the truth file was checked")

    monkeypatch.setattr(curate_module, "select", no_work)
    with pytest.raises(DpselInputError, match="dpsel_id"):
        curate(data["train"], data["meta"], tmp_path / "run", method="random", truth=tmp_path / "truth.parquet")


# ---- case 8: SIGTERM ------------------------------------------------------------------------------------------

def test_sigterm_exits_143_with_a_message_and_cleans_up(data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([*DPSEL, "curate", "--train", str(data["train"]),
                                "--meta", str(data["meta"]), "--out", str(out), "--method", "bads",
                                "--steps", "100000"], env=_env(), stderr=subprocess.PIPE, text=True)
    info = lock_paths(out)[1]
    deadline = time.monotonic() + 120
    while not info.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    # a SIGTERM inside the reference fit saves it: that checkpoint stays for the re-run
    assert not out.exists() and _leftovers(out, keep_checkpoint=True) == [] and not info.exists()


# ---- case 9: cache keys ----------------------------------------------------------------------------------------

def test_scorer_cache_key_covers_every_file(data, tmp_path):
    from flows.cache import stage_key
    run = tmp_path / "run"
    curate(data["train"], data["meta"], run, method="random")
    params = {"scorer": str(run / "scorer"), "shard": str(data["train"]), "out": "x", "threshold": None}
    before = stage_key("filter-shard", params, ["scorer", "shard"])
    selection = run / "scorer" / "selection.json"
    selection.write_text(selection.read_text().replace('"effective_threshold"', '"effective_threshold" ', 1))
    assert stage_key("filter-shard", params, ["scorer", "shard"]) != before


# ---- case 10: escaping --------------------------------------------------------------------------------------

HOSTILE = "evil\n# heading <script>alert(1)</script> \x1b[31mred\x1b[0m | pipe \x07\x9b"


def test_report_escapes_user_values(data, tmp_path):
    rows = _rows(20, task=lambda i: HOSTILE if i % 2 else "plain")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    result = curate(tmp_path / "train.parquet", data["meta"], tmp_path / "run", method="random")
    report = (tmp_path / "run" / "report.md").read_text()
    for bad in ("<script>", "\x1b", "\x07", "\x9b", "\n# heading"):
        assert bad not in report
    assert "&lt;script&gt;" in report
    from flows.pipeline import curation_markdown
    from flows.tasks import curation_summary
    markdown = curation_markdown(curation_summary(result), "t")
    assert "<script>" not in markdown and "\x1b" not in markdown and "\n# heading" not in markdown


def test_escape_helper():
    from dpsel.report import escape
    assert escape("a|b") == "a\\|b"
    assert escape("x\ny\tz") == "x y z"
    assert escape("\x1b]0;title\x07ok\x1b[2J") == "ok"
    assert escape("<b>&") == "&lt;b&gt;&amp;"


# ---- case 13: children die with the parent ---------------------------------------------------------------

def test_children_die_with_a_killed_parent(tmp_path):
    import psutil
    code = ("import subprocess, sys, time\nfrom flows.lifeline import tie_children_to_this_process\n"
            "tie_children_to_this_process()\nchild = subprocess.Popen(['sleep', '120'])\n"
            "print(child.pid, flush=True)\ntime.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(1.5)  # the watchdog polls every 0.5 s
    parent.kill()
    parent.wait()
    child.wait(timeout=20)  # raises psutil.TimeoutExpired if the child outlived its parent


def test_long_group_names_keep_plots_small(tmp_path):
    """Found by the hostile suite: a 5,000-character task name made the bar plot 4 GB and two minutes."""
    import matplotlib.image
    from dpsel.report import plot_group_weights
    path = plot_group_weights("task", [{"group": "x" * 5000, "mean_weight": 0.5, "scored": 3, "ci95": 0.1},
                                       {"group": "$\\frac{", "mean_weight": 0.2, "scored": 2, "ci95": 0.1}],
                              tmp_path / "p.png")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width < 2000 and height < 2000


def test_crafted_pickle_in_a_scorer_folder_is_refused_without_running(data, tmp_path):
    """No pickle or remote code: a scorer file that unpickles to a code call is exit 2, and the call never runs."""
    import pickle
    run = tmp_path / "run"
    curate(data["train"], data["meta"], run, method="random")
    scorer = run / "scorer"
    info = json.loads((scorer / "scorer.json").read_text())
    (scorer / "scorer.json").write_text(json.dumps({**info, "kind": "loss"}))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (scorer / "reference.pt").write_bytes(pickle.dumps(Evil()))
    result = runner.invoke(app, ["filter", "--scorer", str(scorer), "--in", str(data["train"]),
                                 "--out", str(tmp_path / "f")])
    assert result.exit_code == 2, result.output
    assert "refused" in result.output and not marker.exists()
