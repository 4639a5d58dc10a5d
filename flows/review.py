"""`curate-review-curate`: curate, hand the posterior's most uncertain rows to a person, re-curate with the answers.

The review rows (`dpsel.curation.review`) are written to OUT/review.parquet and shown as a table artifact; the
flow then pauses with Prefect's `pause_flow_run(wait_for_input=...)`, whose form has one keep/drop/skip choice
per row (Prefect UI: the paused run's "Resume" button). On resume the answers go to OUT/labels.parquet and the
curation runs again with them (`curate --labels`): OUT/curate/ is the first run, OUT/reviewed/ the second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field, create_model

from dpsel.config import RunConfig
from dpsel.curation.examples import conversation_text, cut
from dpsel.curation.review import answered, review_rows as pick_review_rows, write_review
from dpsel.io import write_json_atomic, write_parquet_atomic
import flows.artifacts as artifacts
from flows.pipeline import curate_kwargs, publish_curation, flow_engine, run_stage
from flows.tasks import curate_stage

REVIEW_ROWS = 20          # rows a reviewer is asked about, by default
REVIEW_TIMEOUT_S = 24 * 3600
POLL_S = 10               # how often the paused flow asks the server for the answers
Answer = Literal["keep", "drop", "skip"]


def answer_form(ids: list[str], texts: list[str]) -> type[RunInput]:
    """A Prefect input form: one keep/drop/skip field per review row (`row_1`, ...), titled with its text."""
    fields = {f"row_{k}": (Answer, Field(default="skip", title=f"{k}. {cut(text, 160)}", description=row_id))
              for k, (row_id, text) in enumerate(zip(ids, texts), start=1)}
    return create_model("ReviewAnswers", __base__=RunInput, **fields)


def _show_review(table) -> tuple[list[str], list[str]]:
    """The review rows as the `review-rows` table artifact; returns their ids and conversation texts."""
    rows = table.to_pylist()
    texts = [conversation_text(r["messages"]) for r in rows]
    artifacts.table([{"row": k, "dpsel_id": r["dpsel_id"], "text": cut(text, 300), "weight": r["dpsel_weight"],
                      "std": r["dpsel_weight_std"], "P(flip)": r["flip_probability"]}
                     for k, (r, text) in enumerate(zip(rows, texts), start=1)],
                    key="review-rows", description="Rows to review: keep or drop?")
    return [r["dpsel_id"] for r in rows], texts


@flow(name="curate-review-curate")
def curate_review_curate_flow(config: RunConfig, review_rows: int = REVIEW_ROWS,
                              review_timeout_s: int = REVIEW_TIMEOUT_S) -> dict:
    """Curate into OUT/curate, pause for a reviewer's keep/drop answers on the `review_rows` most uncertain
    rows (OUT/review.parquet, artifact `review-rows`), then curate again with them into OUT/reviewed."""
    config.require("data.train", "data.meta", "out", flow="curate-review-curate")
    out = Path(config.out)
    with flow_engine(config):
        first, first_state = run_stage(curate_stage, **curate_kwargs(config, out / "curate"))
        publish_curation(first, "curate", f"Curation ({first.get('method')})")
        table = pick_review_rows(first["out_dir"], review_rows)
        write_review(table, out / "review.parquet")
        ids, texts = _show_review(table)
        answers = pause_flow_run(wait_for_input=answer_form(ids, texts), timeout=review_timeout_s,
                                 poll_interval=POLL_S, key="review")
        by_id = {row_id: getattr(answers, f"row_{k}") for k, row_id in enumerate(ids, start=1)}
        labels = write_parquet_atomic(answered(table, by_id), out / "labels.parquet")
        reviewed_config = config.model_copy(update={"data": config.data.model_copy(update={"labels": str(labels)})})
        second, second_state = run_stage(curate_stage, **curate_kwargs(reviewed_config, out / "reviewed"))
        publish_curation(second, "reviewed", f"Curation after review ({second.get('method')})")
    summary = {"curate": first, "reviewed": second, "labels": str(labels),
               "answers": {a: sum(v == a for v in by_id.values()) for a in ("keep", "drop", "skip")},
               "stages": {"curate": first_state, "reviewed": second_state}}
    write_json_atomic(summary, out / "summary.json")
    return summary
