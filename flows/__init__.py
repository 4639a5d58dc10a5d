"""Prefect flows over the dpsel and peft_train libraries. The only package that imports Prefect.

`run_flow` is the entry point of `dpsel flow NAME`. With no PREFECT_API_URL, flows run against Prefect's
embedded server (ephemeral mode, SQLite under PREFECT_HOME); nothing has to be started by hand. Prefect reads
its settings when first imported, so this module must not import it at import time.
"""
from __future__ import annotations

import os
from typing import Any

from flows.environment import use_project_prefect_home

FLOW_NAMES = ("curate", "filter", "tune", "curate_then_tune", "curate_then_filter", "curate_review_curate")
# Options that are flow parameters rather than RunConfig fields.
_FLOW_OPTIONS = {"curate_then_tune": ("compare", "tune_model"),
                 "curate_review_curate": ("review_rows", "review_timeout_s")}
# Where an unqualified `method`/`steps` option goes for each flow (curate_then_tune needs curate_/tune_).
_STAGE_OF = {"curate": "curate", "filter": "curate", "tune": "tune", "curate_then_tune": None,
             "curate_then_filter": "curate", "curate_review_curate": "curate"}


def run_flow(name: str, config: Any = None, *, echo: bool = True, **options: Any) -> dict:
    """Run the flow `name` (curate | filter | tune | curate_then_tune | curate_then_filter |
    curate_review_curate) on `config` (a YAML path or a RunConfig) with `options` overriding it; prints where the
    outputs are and returns the flow's summary."""
    use_project_prefect_home()
    from dpsel.config import RunConfig
    from dpsel.errors import DpselInputError

    name = name.replace("-", "_")
    if name not in FLOW_NAMES:
        raise DpselInputError(f"unknown flow {name!r}; choose one of {', '.join(n.replace('_', '-') for n in FLOW_NAMES)}")
    flow_options = {key: options.pop(key) for key in _FLOW_OPTIONS.get(name, ()) if key in options}
    run_config = RunConfig.load(config, options, stage=_STAGE_OF[name])

    from flows.pipeline import FLOWS, describe
    from flows.review import curate_review_curate_flow

    if not os.environ.get("PREFECT_API_URL"):  # an embedded server will be started: it dies with us
        from flows.lifeline import tie_children_to_this_process
        tie_children_to_this_process()
    flows = {**FLOWS, "curate_review_curate": curate_review_curate_flow}
    summary = flows[name](config=run_config, **flow_options)
    if echo:
        print(describe(name, summary))
    return summary
