"""dpsel: Bayesian data-point selection for instruction tuning.

Python API (see the README, "Python"): `dpsel.curate(train, meta, out=...)`, `dpsel.filter(scorer, data,
out=...)`, `dpsel.tune(data, out=...)`, `dpsel.inspect(run, reason=...)`, `dpsel.review(run, rows, out)`; they live in `dpsel.api` and are imported on first use, so
`import dpsel` stays cheap. The curation library itself is `dpsel.curation`.
"""
from dpsel.version import __version__

__all__ = ["curate", "filter", "inspect", "review", "tune", "__version__"]


def __getattr__(name):
    if name in ("curate", "filter", "inspect", "review", "tune"):
        from dpsel import api
        return getattr(api, name)
    raise AttributeError(f"module 'dpsel' has no attribute {name!r}")
