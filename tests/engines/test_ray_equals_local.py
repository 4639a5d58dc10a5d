"""`--engine ray`: Ray Data + a scorer actor pool give the local engine's outputs, byte for byte in content."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.curation import curate, filter_rows
from dpsel.engines import RayOptions, check_engine
from dpsel.errors import DpselInputError
from dpsel.select.base import SelectConfig


def _rows(lo: int, hi: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task": "ab"[i % 2],
             "source": "web"} for i in range(lo, hi)]


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory):
    """A `loss` curation (a tiny reference model in scorer/, so unseen rows go through the model)."""
    root = tmp_path_factory.mktemp("ray")
    pq.write_table(pa.Table.from_pylist(_rows(0, 40)), root / "train.parquet")
    meta = [{"instruction": f"Add {i} and 1.", "output": str(i + 1), "task": "a", "source": "trusted"}
            for i in range(100, 110)]
    pq.write_table(pa.Table.from_pylist(meta), root / "meta.parquet")
    curate(root / "train.parquet", root / "meta.parquet", root / "run", method="loss",
           config=SelectConfig(steps=20, max_length=64))
    return root


@pytest.fixture(scope="module")
def four_shards(loss_run):
    """40 new rows in 4 shards: 10 seen by the curation, 30 not; an invalid row, a duplicate inside a
    shard and one across shards."""
    rows = _rows(30, 70)
    rows[3]["output"] = " "
    rows[7] = dict(rows[2])
    rows[25] = dict(rows[4])
    folder = loss_run / "new"
    folder.mkdir()
    for k in range(4):
        pq.write_table(pa.Table.from_pylist(rows[10 * k:10 * (k + 1)]), folder / f"part-{k}.parquet")
    return folder


def test_ray_filter_matches_local(ray_local, loss_run, four_shards):
    scorer = loss_run / "run" / "scorer"
    local = filter_rows(scorer, four_shards, loss_run / "local")
    on_ray = filter_rows(scorer, four_shards, loss_run / "ray", engine="ray",
                         ray=RayOptions(workers=2, batch_size=4))
    for name in ("scores.parquet", "curated.parquet"):
        assert pq.read_table(on_ray.out_dir / name).equals(pq.read_table(local.out_dir / name)), name
    scores = pq.read_table(on_ray.out_dir / "scores.parquet").to_pandas()
    assert list(scores["dpsel_reason"].iloc[[3, 7, 25]]) == ["invalid", "duplicate", "duplicate"]
    assert scores["dpsel_detail"].iloc[25] == "same content as input row 4"   # across shards
    left, right = (json.loads((r.out_dir / "manifest.json").read_text()) for r in (local, on_ray))
    for manifest in (left, right):
        manifest["selection"].pop("run_id")   # each run has its own id (dpsel.outputs)
    for key in ("inputs", "method", "config", "selection", "counts", "groups", "outputs"):
        assert left[key] == right[key], key
    assert right["timings"]["engine"] == "ray" and right["timings"]["ray_workers"] == 2
    assert right["counts"]["input_rows"] == right["counts"]["kept_rows"] + right["counts"]["dropped_rows"]


def test_ray_actors_write_curated_parts_that_equal_local_with_redaction_and_a_budget(ray_local, loss_run,
                                                                                     four_shards):
    """The actors write curated.parquet's parts (the driver merges the kept rows on commit): with `--pii redact`
    (redacted messages and text columns, the `dpsel_pii` column) and a budget rule, the files equal the local
    engine's, and no part is left in the published folder."""
    from dpsel.stages.options import StagesConfig
    folder = loss_run / "pii"
    folder.mkdir()
    rows = _rows(200, 230)
    rows[4]["output"] = "Write to jane.doe@example.com for the answer."
    for odd in range(1, 30, 2):   # half the rows carry a phone number, so any 18 kept rows hold at least 3
        rows[odd]["instruction"] = f"Call +1 415 555 01{odd:02d} and {rows[odd]['instruction']}"
    pq.write_table(pa.Table.from_pylist(rows[:17]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[17:]), folder / "b.parquet")
    scorer, stages = loss_run / "run" / "scorer", StagesConfig(pii="redact")
    local = filter_rows(scorer, folder, loss_run / "pii-local", budget=0.6, stages=stages)
    on_ray = filter_rows(scorer, folder, loss_run / "pii-ray", budget=0.6, stages=stages, engine="ray",
                         ray=RayOptions(workers=2, batch_size=4))
    curated = pq.read_table(on_ray.out_dir / "curated.parquet")
    assert curated.equals(pq.read_table(local.out_dir / "curated.parquet"))
    assert pq.read_table(on_ray.out_dir / "scores.parquet").equals(pq.read_table(local.out_dir / "scores.parquet"))
    # whichever rows the scorer ranks high: the budget keeps 18 of 30, so at least 3 carry a phone number
    assert curated.num_rows == 18
    assert curated.column("dpsel_pii").to_pylist().count(["phone"]) >= 3
    assert "415 555" not in str(curated.to_pylist())   # redacted in `instruction` and `messages`
    manifest = json.loads((on_ray.out_dir / "manifest.json").read_text())
    assert manifest["timings"]["ray_parallel_write"] is True
    assert sorted(p.name for p in on_ray.out_dir.iterdir() if p.name.startswith(".")) == []


def test_curated_parts_out_of_place_are_an_error(tmp_path):
    """A part missing from the actors' set fails the commit instead of writing a curated.parquet with a hole."""
    from dpsel.curation.parts import merge_curated_parts
    from dpsel.curation.rows import read_rows
    from dpsel.outputs import write_curated_part
    pq.write_table(pa.Table.from_pylist(_rows(0, 6)), tmp_path / "in.parquet")
    rows = read_rows(tmp_path / "in.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    for first in (0, 4):   # rows 0-1 and 4-5: the part for rows 2-3 is missing
        write_curated_part(pa.Table.from_pylist(_rows(first, first + 2)), parts, first)
    with pytest.raises(RuntimeError, match="not the part starting at row 2"):
        merge_curated_parts(parts, tmp_path / "curated.parquet", rows, np.ones(6, bool), np.ones(6, bool), "r")
    assert not (tmp_path / "curated.parquet").exists()


def test_unknown_engine_is_an_input_error():
    with pytest.raises(DpselInputError, match="--engine"):
        check_engine("spark")


def test_engine_ray_without_ray_exits_2_with_install_hint(tmp_path):
    # A child process where `import ray` fails: the CLI must exit 2 and say how to install it.
    (tmp_path / "in").mkdir()
    code = ("import sys; sys.modules['ray'] = None\n"
            "from dpsel.cli import app\n"
            f"app(['filter', '--scorer', {str(tmp_path)!r}, '--in', {str(tmp_path / 'in')!r}, '--out', "
            f"{str(tmp_path / 'o')!r}, '--engine', 'ray'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "pip install 'dpsel[ray]'" in done.stderr


@pytest.mark.parametrize("method", ["loss", "bads", "rds"])
def test_ray_curate_scores_match_local(ray_local, loss_run, method):
    """`curate --engine ray`: the pool pass of each method (the reference's NLL for `loss`, its features for
    `bads`, whose sampling stays local, the base's RDS+ embeddings for `rds`) runs on Ray actors (the model
    shipped to each once) and gives the local engine's scores."""
    root = loss_run
    options = dict(method=method, config=SelectConfig(steps=20, max_length=64))
    local = root / "run" if method == "loss" else \
        curate(root / "train.parquet", root / "meta.parquet", root / f"curate-{method}-local", **options).out_dir
    on_ray = curate(root / "train.parquet", root / "meta.parquet", root / f"curate-{method}-ray", engine="ray",
                    ray=RayOptions(workers=2, batch_size=8), **options)
    assert pq.read_table(on_ray.out_dir / "scores.parquet").equals(pq.read_table(local / "scores.parquet"))
    assert json.loads((on_ray.out_dir / "manifest.json").read_text())["timings"]["engine"] == "ray"


def test_ray_curate_refuses_a_local_only_method(tmp_path):
    with pytest.raises(DpselInputError, match="method 'l2rw'.*local-only"):
        curate(tmp_path / "train.parquet", tmp_path / "meta.parquet", tmp_path / "out", method="l2rw",
               engine="ray")


def test_near_dup_signatures_on_ray_give_the_local_verdicts(ray_local, monkeypatch):
    """The near-dup stage's MinHash signatures and band keys computed by Ray actors (several blocks, two
    actors) give the same index and the same verdicts, `dup_of` included, as in this process."""
    from builders import make_table, planted

    from dpsel.engines.ray_engine import RayBlocks
    from dpsel.stages import near_dup
    from dpsel.stages.base import ConversationBatch, mapping_blocks_on
    monkeypatch.setattr(near_dup, "CHUNK_ROWS", 64)   # 330 rows: six blocks, so order across blocks matters
    table = make_table(planted()[0])
    local = near_dup.NearDup()
    expected = local(ConversationBatch(table))
    on_ray = near_dup.NearDup()
    with mapping_blocks_on(RayBlocks(RayOptions(workers=2))):
        got = on_ray(ConversationBatch(table))
    assert got.reason.tolist() == expected.reason.tolist() and (got.reason != "").sum() == 30
    assert got.dup_of.tolist() == expected.dup_of.tolist()
    for name in local.index.names:
        assert np.array_equal(getattr(on_ray.index, name), getattr(local.index, name)), name
