"""The curation stages through every entry point: `dpsel curate` / `dpsel filter` (CLI), the config file's
`stages:`, the Python API and curate-then-tune's eval decontamination. Small hand-built pools with planted
cases: an exact and a near duplicate, a row copied from the eval set, a repetitive row, a row with PII."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from typer.testing import CliRunner

from dpsel.cli import app

runner = CliRunner()

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _sentence(seed: int, n: int = 30) -> str:
    pick = random.Random(seed)
    return " ".join(pick.choice(WORDS) + str(pick.randrange(11)) for _ in range(n))


EVAL_ROW = {"instruction": "Explain why the sky looks blue on a clear afternoon in summer to a curious child",
            "output": "Sunlight scatters off air molecules and blue light scatters the most."}


def _pool() -> pd.DataFrame:
    rows = [{"instruction": f"Task {i}: {_sentence(i, 60)}", "output": _sentence(i + 100, 12)} for i in range(12)]
    near = dict(rows[2])
    near["instruction"] = rows[2]["instruction"].rsplit(" ", 1)[0] + " changed"     # the last word edited
    rows += [dict(rows[1]),                                                       # 12: exact duplicate of 1
             near,                                                                # 13: near duplicate of 2
             dict(EVAL_ROW),                                                      # 14: copied from the eval set
             {"instruction": "Repeat", "output": "\n".join(["the same line again"] * 60)},   # 15: repetitive
             {"instruction": "Who do I write to?", "output": "Write to jane.doe@example.com today."}]  # 16: PII
    return pd.DataFrame(rows)


@pytest.fixture
def data(tmp_path):
    pool = tmp_path / "train.parquet"
    _pool().to_parquet(pool)
    meta = tmp_path / "meta.parquet"
    pd.DataFrame([{"instruction": f"meta {i} {_sentence(i + 50, 8)}", "output": "ok"} for i in range(4)]).to_parquet(meta)
    evalset = tmp_path / "eval.parquet"
    pd.DataFrame([EVAL_ROW]).to_parquet(evalset)
    return {"train": pool, "meta": meta, "eval": evalset, "dir": tmp_path}


def _curate(data, out, *flags):
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(out), "--method", "all", *flags])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "scores.parquet"), json.loads((out / "manifest.json").read_text())


def _ids(scores):
    return scores.dpsel_id.tolist()


def test_every_stage_reason_and_dup_of_through_curate(data):
    scores, manifest = _curate(data, data["dir"] / "run", "--decontaminate", str(data["eval"]),
                               "--filters", "default", "--pii", "drop")
    ids = _ids(scores)
    reasons = scores.dpsel_reason.tolist()
    assert reasons[12] == "duplicate" and scores.dpsel_dup_of[12] == ids[1]
    assert reasons[13] == "near_duplicate" and scores.dpsel_dup_of[13] == ids[2]
    assert reasons[14] == "contaminated" and reasons[15].startswith("filtered:") and reasons[16] == "pii"
    assert all(r == "" for r in reasons[:12])              # method all: everything else kept
    assert scores.dpsel_dup_of[:12].isna().all() and scores.dpsel_dup_of[14:].isna().all()
    counts = manifest["counts"]
    assert counts["input_rows"] == counts["kept_rows"] + counts["dropped_rows"] == 17
    assert counts["dropped_by_reason"]["near_duplicate"] == 1 and counts["dropped_by_reason"]["pii"] == 1
    assert counts["dropped_by_stage"] == {"exact": 1, "near_dup": 1, "decontaminate": 1, "filters": 1, "pii": 1,
                                          "selection": 0}
    stats = {s["stage"]: s for s in counts["stages"]}
    assert [s["stage"] for s in counts["stages"]] == ["exact", "near_dup", "decontaminate", "filters", "pii"]
    assert stats["near_dup"]["rows_in"] == 16 and stats["pii"]["rows_in"] == 13
    assert all("seconds" not in s for s in counts["stages"])      # counts hold facts; timings hold seconds
    assert set(manifest["timings"]["stages"]) == set(stats) and min(manifest["timings"]["stages"].values()) >= 0
    assert manifest["stages"]["decontaminate"] == [str(data["eval"])]
    report = (data["dir"] / "run" / "report.md").read_text()
    assert "## Curation stages" in report and "near\\_dup" in report
    curated = pd.read_parquet(data["dir"] / "run" / "curated.parquet")
    assert curated.dpsel_id.tolist() == ids[:12]


def test_defaults_near_dup_on_pii_flagged_others_off(data):
    scores, manifest = _curate(data, data["dir"] / "run")
    reasons = scores.dpsel_reason.tolist()
    assert reasons[13] == "near_duplicate" and reasons[14] == reasons[15] == reasons[16] == ""
    curated = pd.read_parquet(data["dir"] / "run" / "curated.parquet")
    pii = dict(zip(curated.dpsel_id, curated.dpsel_pii.map(list)))
    assert pii[scores.dpsel_id[16]] == ["email"] and pii[scores.dpsel_id[0]] == []
    assert manifest["stages"] == {"near_dup": True, "near_dup_threshold": 0.8, "semantic_dup": None,
                                  "filters": "none", "pii": "flag", "decontaminate": []}
    assert (data["dir"] / "run" / "scorer" / "near_dup.npz").exists()


def test_no_near_dup_and_redact(data):
    scores, _ = _curate(data, data["dir"] / "run", "--no-near-dup", "--pii", "redact")
    assert scores.dpsel_reason[13] == ""
    curated = pd.read_parquet(data["dir"] / "run" / "curated.parquet")
    text = " ".join(m["content"] for conversation in curated.messages for m in conversation)
    assert "jane.doe@example.com" not in text and "[EMAIL]" in text
    assert not curated.output.str.contains("jane.doe@example.com").any()     # nor in the input's own columns
    assert curated.output.str.contains("[EMAIL]", regex=False).any()


def test_stages_are_deterministic(data):
    first, _ = _curate(data, data["dir"] / "a", "--filters", "default", "--decontaminate", str(data["eval"]))
    second, _ = _curate(data, data["dir"] / "b", "--filters", "default", "--decontaminate", str(data["eval"]))
    columns = ["dpsel_id", "dpsel_kept", "dpsel_reason", "dpsel_dup_of"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


def test_yaml_stages_section_and_python_api(data):
    config = data["dir"] / "run.yaml"
    config.write_text(f"stages:\n  near_dup: false\n  pii: drop\n  decontaminate: {data['eval']}\n")
    scores, _ = _curate(data, data["dir"] / "run", "--config", str(config))
    assert scores.dpsel_reason[13] == "" and scores.dpsel_reason[14] == "contaminated"
    assert scores.dpsel_reason[16] == "pii"
    import dpsel
    result = dpsel.curate(data["train"], data["meta"], out=data["dir"] / "api", method="all", near_dup=False,
                          pii="drop", progress=False)
    assert result.scores.dpsel_reason[13] == "" and result.scores.dpsel_reason[16] == "pii"


@pytest.mark.parametrize("flags, option", [
    (["--near-dup-threshold", "1.5"], "--near-dup-threshold"),
    (["--pii", "hide"], "--pii"),
    (["--semantic-dup", "2"], "--semantic-dup"),
    (["--filters", "no-such-file.yaml"], "--filters"),
])
def test_bad_stage_values_exit_2_naming_the_option(data, flags, option):
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(data["dir"] / "run"), "--method", "all", *flags])
    assert result.exit_code == 2 and option in result.output


TOPICS = [("How do I bake a loaf of bread at home?",
           "Mix flour, water, yeast and salt, let it rise, then bake it for forty minutes."),
          ("Why do cats purr?", "Cats purr when content and also to soothe themselves when hurt."),
          ("What causes the tides?", "The moon's gravity pulls the oceans, raising the water twice a day."),
          ("How do I reverse a list in Python?", "Call list.reverse() or take the slice items[::-1]."),
          ("Name a primary colour.", "Red is one of the three primary colours of paint."),
          ("What is the boiling point of water at sea level?", "One hundred degrees Celsius.")]
PARAPHRASE = ("What is the way to bake a bread loaf at home?",
              "Mix flour, water, salt and yeast, let it rise, and bake for forty minutes.")


def test_semantic_dup_drops_a_paraphrase_with_the_packaged_embedder(data, tmp_path):
    pytest.importorskip("sentence_transformers")
    rows = [*TOPICS, PARAPHRASE]
    pd.DataFrame([{"instruction": q, "output": a} for q, a in rows]).to_parquet(data["train"])
    scores, manifest = _curate(data, tmp_path / "run", "--semantic-dup", "0.9", "--no-near-dup")
    assert scores.dpsel_reason.tolist() == [""] * len(TOPICS) + ["semantic_duplicate"]
    assert scores.dpsel_dup_of.tolist()[-1] == scores.dpsel_id[0]
    assert manifest["counts"]["dropped_by_stage"]["semantic_dup"] == 1
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(tmp_path / "off"), "--semantic-dup", "0.9", "--embedder", "none"])
    assert result.exit_code == 2 and "--semantic-dup" in result.output and "--embedder" in result.output


def test_filter_drops_near_duplicates_of_rows_the_scorer_has_seen(data):
    out = data["dir"] / "run"
    result = runner.invoke(app, ["curate", "--train", str(data["train"]), "--meta", str(data["meta"]),
                                 "--out", str(out), "--method", "random", "--budget", "1.0"])
    assert result.exit_code == 0, result.output
    pool = _pool()
    fresh = pool.iloc[[3, 4]].copy()
    fresh["instruction"] = fresh["instruction"].str.replace("Task", "Job", n=1)    # near, not exact, copies
    new = pd.concat([fresh, pd.DataFrame([{"instruction": "A brand new question about tides and moons here",
                                           "output": "They pull."}])], ignore_index=True)
    shard = data["dir"] / "new.parquet"
    new.to_parquet(shard)
    curated_ids = pd.read_parquet(out / "scores.parquet").dpsel_id.tolist()
    result = runner.invoke(app, ["filter", "--scorer", str(out / "scorer"), "--in", str(shard),
                                 "--out", str(data["dir"] / "filtered"), "--threshold", "0"])
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(data["dir"] / "filtered" / "scores.parquet")
    assert scores.dpsel_reason.tolist() == ["near_duplicate", "near_duplicate", ""]
    assert scores.dpsel_dup_of.tolist()[:2] == [curated_ids[3], curated_ids[4]]
    manifest = json.loads((data["dir"] / "filtered" / "manifest.json").read_text())
    assert manifest["counts"]["dropped_by_stage"]["near_dup"] == 2
    # the index was built at 0.8: another threshold cannot use it, and says so
    result = runner.invoke(app, ["filter", "--scorer", str(out / "scorer"), "--in", str(shard),
                                 "--out", str(data["dir"] / "f2"), "--near-dup-threshold", "0.7"])
    assert result.exit_code == 2 and "--near-dup-threshold" in result.output
    result = runner.invoke(app, ["filter", "--scorer", str(out / "scorer"), "--in", str(shard),
                                 "--out", str(data["dir"] / "f3"), "--no-near-dup", "--threshold", "0"])
    assert result.exit_code == 0 and pd.read_parquet(data["dir"] / "f3" / "scores.parquet").dpsel_reason.eq("").all()


def test_curate_then_tune_decontaminates_against_its_eval_set(data):
    """The flow's curate stage gets the eval set added to `stages.decontaminate` (flows/pipeline.py)."""
    from dpsel.config import RunConfig
    from dpsel.curation.run import curate_from_config
    config = RunConfig.from_mapping({"data": {"train": str(data["train"]), "meta": str(data["meta"]),
                                              "eval": str(data["eval"])}, "curate": {"method": "all"}})
    plain = curate_from_config(config, out=data["dir"] / "plain")
    assert plain.counts["dropped_by_reason"].get("contaminated", 0) == 0
    decontaminated = curate_from_config(config.with_eval_decontamination(), out=data["dir"] / "flow")
    scores = pd.read_parquet(decontaminated.paths["scores"])
    assert scores.dpsel_reason.tolist()[14] == "contaminated"
    assert decontaminated.counts["dropped_by_reason"]["contaminated"] == 1
    import inspect
    import flows.pipeline
    assert "with_eval_decontamination()" in inspect.getsource(flows.pipeline.curate_then_tune_flow)
