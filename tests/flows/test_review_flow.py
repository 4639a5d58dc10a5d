"""`curate-review-curate` on the Prefect test harness: curates, pauses for keep/drop input, resumes with the
answers (supplied here programmatically, as the UI form would) and re-curates with them."""
from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest

from dpsel.config import RunConfig

pytestmark = pytest.mark.prefect


def _paused_run_id(timeout_s: float = 120.0):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))))
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError("the flow never paused")


def test_flow_pauses_for_review_and_recurates_with_the_answers(prefect_server, tmp_path, monkeypatch):
    import flows.review
    from dpsel.synth import generate
    from flows.review import curate_review_curate_flow
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(flows.review, "POLL_S", 1)
    synth = generate(tmp_path / "synth", rows=40, noise=0.3, seed=2, meta_rows=8, test_rows=4)
    config = RunConfig.from_mapping({"data": {"train": str(synth["train"]), "meta": str(synth["meta"])},
                                     "curate": {"method": "random", "budget": 0.5}, "out": str(tmp_path / "out")})
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        summary=curate_review_curate_flow(config=config, review_rows=3, review_timeout_s=300)))
    worker.start()
    try:
        run_id = _paused_run_id()
        review = pd.read_parquet(tmp_path / "out" / "review.parquet")
        assert len(review) == 3 and set(review.label) == {""}
        resume_flow_run(run_id, run_input={"row_1": "drop", "row_2": "keep", "row_3": "skip"})
    finally:
        worker.join(timeout=300)
    summary = outcome["summary"]
    assert summary["answers"] == {"keep": 1, "drop": 1, "skip": 1}
    scores = pd.read_parquet(tmp_path / "out" / "reviewed" / "scores.parquet").set_index("dpsel_id")
    dropped, kept = review.dpsel_id[0], review.dpsel_id[1]
    assert scores.dpsel_reason[dropped] == "reviewed_drop" and scores.dpsel_label[dropped] == "drop"
    assert scores.dpsel_weight[kept] == 1.0 and scores.dpsel_kept[kept]
    assert pd.isna(scores.dpsel_label[review.dpsel_id[2]])
    manifest = json.loads((tmp_path / "out" / "reviewed" / "manifest.json").read_text())
    assert (manifest["labels"]["keep"], manifest["labels"]["drop"], manifest["labels"]["blank_rows"]) == (1, 1, 1)
