"""Curation: read → select → keep/drop every input row → write the run's record (`curate`), and the same with
a saved scorer on new data (`filter_rows`). The Python API's `dpsel.curate` is `dpsel.api.curate`.

Modules: `rules` (budget / threshold / per-group keep rules), `rows` (the row view and row accounting),
`truth` (AUROC against a synth truth file), `record` (writing and publishing a run), `run` (`curate`,
`curate_from_config`), `filter` (`filter_rows`).
"""
from dpsel.curation.filter import filter_rows
from dpsel.curation.record import CurationResult
from dpsel.curation.run import curate, curate_from_config

__all__ = ["CurationResult", "curate", "curate_from_config", "filter_rows"]
