"""The one selection interface: every method turns (train rows, meta rows) into per-row `Scores`.

Selection, outputs, flows and benchmarks only ever see `Scores` and a `Scorer`, so methods are interchangeable.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from peft_train.types import ProgressFn  # noqa: F401  (the methods' signatures name it from here)

# The one method registry: method -> (module, function), imported lazily by `dpsel.select.select` so `random`
# and `all` never pay for torch/transformers, and so reading a config (dpsel.config) never imports a method.
METHOD_IMPLEMENTATIONS = {
    "bads": ("dpsel.select.bads", "select_bads"),
    "l2rw": ("dpsel.select.l2rw", "select_l2rw"),
    "loss": ("dpsel.select.reference", "select_loss"),
    "ifd": ("dpsel.select.reference", "select_ifd"),
    "rds": ("dpsel.select.rds", "select_rds"),
    "random": ("dpsel.select.baselines", "select_random"),
    "all": ("dpsel.select.baselines", "select_all"),
}
METHODS = tuple(METHOD_IMPLEMENTATIONS)

Messages = list[dict]  # one row: [{"role": ..., "content": ...}, ...]


@dataclass
class SelectConfig:
    """Everything a selection method may need; methods ignore what they do not use."""
    model: str = "tiny"
    embedder: str = "default"         # sentence embedder for meaning evidence (dpsel.models.embedder); "none": off
    device: str = "auto"
    seed: int = 0
    steps: int | None = None          # None: the method's default (bads, l2rw: from `epochs`)
    epochs: float | None = None       # bads, l2rw: passes over the pool after burn-in (None: the method's default)
    batch_size: int = 16
    meta_batch_size: int = 4          # meta rows per step (the term is scaled by M/B_m): a bads step ~1.3-1.5x a plain one
    max_length: int = 256
    variant: str = "default"          # bads: "default" (meta-anchored, empirical-Bayes prior) | "paper"
    weight_param: str = "logits"      # bads: "logits" (free per-row logits) | "amortized" (weight network)
    extra: dict = field(default_factory=dict)  # method-specific hyperparameters

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scores:
    """Per-row posterior summary, aligned with the train rows given to `select`."""
    method: str
    weight_mean: np.ndarray            # [N] in [0, 1]; higher = keep
    weight_std: np.ndarray             # [N] >= 0
    config: dict
    diagnostics: dict[str, list[float]] = field(default_factory=dict)  # traces keyed by name, plus "step"
    timings: dict[str, float] = field(default_factory=dict)
    scorer: "Scorer | None" = None     # scores unseen rows (dpsel filter)
    # How every row got its weight (sampler methods): visits per row after burn-in (min/median/max), rows never
    # visited, and how rows with too few visits were scored. curate copies it into manifest.json.
    coverage: dict = field(default_factory=dict)
    # Other per-row estimates the same run produced (ablations for the benchmark; higher = keep; not saved).
    alternatives: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.weight_mean = np.asarray(self.weight_mean, dtype=np.float64)
        self.weight_std = np.asarray(self.weight_std, dtype=np.float64)
        if self.weight_mean.shape != self.weight_std.shape:
            raise ValueError("weight_mean and weight_std must have the same shape")


class Scorer(Protocol):
    """What `scorer/` holds: scores rows (seen or unseen) and saves itself."""
    kind: str

    def score(self, messages: list[Messages], ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, directory: Path) -> None: ...


SCORER_META = "scorer.json"


def write_scorer_meta(directory: Path, kind: str, **info) -> None:
    """Every scorer directory starts with scorer.json naming its kind, so `load_scorer` can dispatch."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SCORER_META).write_text(json.dumps({"kind": kind, **info}, indent=2))


def read_scorer_meta(directory: Path) -> dict:
    path = Path(directory) / SCORER_META
    if not path.exists():
        from dpsel.errors import DpselInputError
        raise DpselInputError(f"not a dpsel scorer directory (no {SCORER_META})", file=str(directory))
    return json.loads(path.read_text())
