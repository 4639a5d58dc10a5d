"""The one stage-options model (`StagesConfig`): the YAML `stages:` section, the CLI's stage options, the Python
API's keywords and the flows' parameters all build it, and the run hands it to the stages as it is."""
from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dpsel.errors import DpselInputError
from dpsel.stages.filters import FilterRules
from dpsel.stages.pii import MODES as PII_MODES

_NO_EMBEDDER = ("none", "off", "false")


class StagesConfig(BaseModel):
    """The contract's options: `--near-dup/--no-near-dup`, `--near-dup-threshold`, `--semantic-dup COS`,
    `--decontaminate` (instruction sets to match against), `--filters none|default|FILE.yaml`, `--pii`."""
    # unknown keys are errors naming the field, not silent defaults (a typo in a YAML file)
    model_config = ConfigDict(extra="forbid", frozen=True)
    near_dup: bool = True
    near_dup_threshold: float = 0.8                                  # Jaccard
    semantic_dup: float | None = None                                # cosine; None: off
    decontaminate: list[str] = Field(default_factory=list)
    filters: str = "none"                                            # none | default | FILE.yaml
    pii: str = "flag"

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, os.PathLike)) else value

    @field_validator("near_dup_threshold")
    @classmethod
    def _jaccard(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"--near-dup-threshold must be a Jaccard similarity in (0, 1], not {value}")
        return value

    @field_validator("semantic_dup")
    @classmethod
    def _cosine(cls, value: float | None) -> float | None:
        if value is not None and not -1 <= value <= 1:
            raise ValueError(f"--semantic-dup must be a cosine in [-1, 1], not {value}")
        return value

    @field_validator("pii")
    @classmethod
    def _pii_mode(cls, value: str) -> str:
        if value not in PII_MODES:
            raise ValueError(f"--pii must be one of {', '.join(PII_MODES)}, not {value!r}")
        return value


def first_problem(error: ValidationError) -> str:
    """A validation error's first problem as the sentence its validator wrote."""
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    return str(cause) if cause is not None else f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def stages_config(**options: Any) -> StagesConfig:
    """`StagesConfig(**options)` with a bad value an input error naming its option (exit 2)."""
    try:
        return StagesConfig(**options)
    except ValidationError as error:
        raise DpselInputError(first_problem(error)) from None


def check_stages(config: StagesConfig, embedder: str) -> StagesConfig:
    """What the values alone cannot tell, found before any work: the filter rules load, and semantic
    duplicates have an embedder."""
    if config.semantic_dup is not None and str(embedder).lower() in _NO_EMBEDDER:
        raise DpselInputError("--semantic-dup needs sentence embeddings and --embedder is none; give an "
                              "embedder or leave --semantic-dup out")
    try:
        FilterRules.from_spec(config.filters)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
        raise DpselInputError(f"--filters {config.filters!r}: {error}") from None
    return config
