"""dpsel: Bayesian data-point selection for instruction tuning.

Python API (see the README, "Python"): `dpsel.curate(train, meta, out=...)`, `dpsel.filter(scorer, data,
out=...)`, `dpsel.tune(data, out=...)`; they live in `dpsel.api` and are imported on first use, so
`import dpsel` stays cheap.
"""
__version__ = "0.1.0"

__all__ = ["curate", "filter", "tune", "__version__"]


def __getattr__(name):
    if name == "curate":
        # `dpsel.curate` is also the curation module; that module is callable as the API function (the
        # end of dpsel/curate.py), so `dpsel.curate(...)` and `dpsel.curate.curate(...)` both work.
        import importlib
        return importlib.import_module("dpsel.curate")
    if name in ("filter", "tune"):
        from dpsel import api
        return getattr(api, name)
    raise AttributeError(f"module 'dpsel' has no attribute {name!r}")
