"""Data-point selection: one `select()` over interchangeable methods, and `load_scorer` for `dpsel filter`.

Methods: `bads` (Bayesian data-point selection by SGLD, the default), `l2rw` (learning to reweight),
`loss` (loss under a meta-fitted reference), `ifd` (instruction-following difficulty), `rds` (representation
similarity to the meta rows, RDS+), `random`, `all`.
"""
from __future__ import annotations

import difflib
import importlib
import pickle
from pathlib import Path

from dpsel.errors import DpselInputError
from dpsel.select.base import (METHOD_IMPLEMENTATIONS, METHODS, Messages, ProgressFn, Scorer, Scores, SelectConfig,
                               read_scorer_meta)

# scorer.json kind -> (module, class)
_SCORER_IMPL = {
    "all": ("dpsel.select.scorers", "ConstantScorer"),
    "random": ("dpsel.select.scorers", "RandomScorer"),
    "bads": ("dpsel.select.bads", "BadsScorer"),
    "bads-embedder": ("dpsel.select.bads", "EmbedderBadsScorer"),
    "l2rw": ("dpsel.select.l2rw", "L2rwScorer"),
    "loss": ("dpsel.select.reference", "ReferenceScorer"),
    "ifd": ("dpsel.select.reference", "ReferenceScorer"),
    "rds": ("dpsel.select.rds", "RdsScorer"),
}


def _resolve(table: dict, key: str):
    module, name = table[key]
    return getattr(importlib.import_module(module), name)


def select(train: list[Messages], meta: list[Messages], method: str = "bads",
           config: SelectConfig | None = None, progress: ProgressFn | None = None,
           groups: list | None = None) -> Scores:
    """Score every train row (weights in [0,1], aligned with `train`) using the trusted `meta` rows.

    `groups` (optional, one label per train row, e.g. the `task` column): losses are normalised per group
    (bads, loss) so that inherently harder tasks are not dropped wholesale.
    """
    if method not in METHODS:
        raise DpselInputError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    if not train:
        raise DpselInputError("no training rows to select from")
    config = config or SelectConfig()
    if method not in ("random", "all") and not meta:
        raise DpselInputError(f"method {method!r} needs a non-empty meta set")
    if groups is not None and len(groups) != len(train):
        raise DpselInputError(f"got {len(groups)} group labels for {len(train)} training rows")
    check_extra_settings(config.extra)
    scores = _resolve(METHOD_IMPLEMENTATIONS, method)(train, meta, config, progress, groups=groups)
    if len(scores.weight_mean) != len(train):
        raise RuntimeError(f"{method}: returned {len(scores.weight_mean)} weights for {len(train)} rows")
    return scores


def check_extra_settings(extra: dict) -> None:
    """A `curate.select.extra` setting that no method reads is a typo, not a choice to drop in silence (exit 2).
    Another method's setting is let through, so one config file serves several methods."""
    if not extra:
        return
    known = set().union(*(importlib.import_module(module).EXTRA_KEYS for module, _ in METHOD_IMPLEMENTATIONS.values()))
    unknown = sorted(set(extra) - known)
    if unknown:
        near = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
        hints = "; ".join(f"{name!r} (did you mean {match[0]!r}?)" if match else repr(name) for name, match in near.items())
        raise DpselInputError(f"curate.select.extra: no selection method reads {hints}")


def load_scorer(directory: str | Path) -> Scorer:
    """Load a saved scorer (kind named in scorer.json) so unseen rows can be scored."""
    directory = Path(directory)
    kind = read_scorer_meta(directory).get("kind")
    if kind not in _SCORER_IMPL:
        raise DpselInputError(f"unknown scorer kind {kind!r} in scorer.json", file=str(directory))
    try:
        return _resolve(_SCORER_IMPL, kind).load(directory)
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused a crafted file: no code ran
        raise DpselInputError("a scorer file holds more than tensors and plain data (a crafted pickle?); "
                              "refused without running it", file=str(directory)) from error


__all__ = ["METHODS", "select", "load_scorer", "SelectConfig", "Scores", "Scorer", "Messages", "ProgressFn"]
