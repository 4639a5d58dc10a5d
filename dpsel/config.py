"""One configuration model for a whole run: data paths, curation, tuning, device, seed, output folder.

The same `RunConfig` is read from YAML (`--config FILE`), overridden by CLI options, passed as the single
parameter of every Prefect flow and written into `schedules.yaml` deployments, so a run is described the
same way wherever it starts. Relative paths are taken relative to the working directory, like CLI paths.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpsel.errors import DpselInputError
from dpsel.select.base import METHODS as CURATE_METHODS, SelectConfig
from dpsel.stages.options import StagesConfig

PathSpec = str | list[str]  # a file, a folder of shards, a glob or an fsspec URL; or several of them


# The RunConfig fields, besides `data` and `out`, that curation reads (`dpsel.curation.run.curate_from_config`).
CURATE_STAGE_FIELDS = ("curate", "model", "embedder", "device", "seed", "engine", "ray", "stages")


class _Section(BaseModel):
    # forbid unknown keys so a typo in a YAML file is an error naming the field, not a silent default
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataConfig(_Section):
    train: PathSpec | None = None
    meta: PathSpec | None = None
    eval: PathSpec | None = Field(default=None, validation_alias=AliasChoices("eval", "test"))  # held-out rows
    truth: str | None = None                                     # synth truth -> selection AUROC
    scorer: str | None = None                                    # filter: a curation run's scorer/
    inputs: PathSpec | None = Field(default=None, validation_alias=AliasChoices("inputs", "in"))  # filter
    labels: str | None = None                                    # curate: a reviewer's keep/drop file


class SelectParams(_Section):
    """Selection hyperparameters: the fields of `dpsel.select.base.SelectConfig` a user may set, with its
    defaults (one set of defaults for the CLI, config files and Python; tests/curation/test_newcomer_defaults.py compares them)."""
    batch_size: int = Field(default=SelectConfig.batch_size, ge=1)
    meta_batch_size: int = Field(default=SelectConfig.meta_batch_size, ge=1)
    max_length: int = Field(default=SelectConfig.max_length, ge=8)
    variant: str = SelectConfig.variant
    weight_param: str = SelectConfig.weight_param
    extra: dict[str, Any] = Field(default_factory=dict)


class CurateConfig(_Section):
    method: str = "bads"
    budget: float | None = Field(default=None, gt=0.0, le=1.0)     # keep this top fraction
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)  # or keep weight >= threshold
    steps: int | None = Field(default=None, ge=1)                  # None: the method's default
    epochs: float | None = Field(default=None, gt=0.0)             # bads/l2rw passes after burn-in; steps overrides
    select: SelectParams = Field(default_factory=SelectParams)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in CURATE_METHODS:
            raise ValueError(f"unknown selection method {value!r}; choose one of {', '.join(CURATE_METHODS)}")
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> "CurateConfig":
        if self.budget is not None and self.threshold is not None:
            raise ValueError("give either budget or threshold, not both")
        return self


class TuneConfig(_Section):
    method: str = "lora"
    steps: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0.0)
    r: int | None = Field(default=None, ge=1)              # adapter rank where the method has one
    weights_column: str | None = None                    # e.g. dpsel_weight for weighted fine-tuning
    batch_size: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=8)
    epochs: float | None = Field(default=None, gt=0.0)      # passes over the rows, instead of steps
    grad_accum: int | None = Field(default=None, ge=1)     # micro-batches per optimizer step
    save_steps: int | None = Field(default=None, ge=1)     # steps between checkpoints (OUT/checkpoints/)
    resume: bool | None = None                             # unset: True, a re-run resumes a killed one
    report_to: str | None = None                           # unset: none | tensorboard | wandb | mlflow | trackio


class RaySection(_Section):
    """`engine: ray` settings (dpsel.engines.RayOptions): no address = a local runtime for the run."""
    address: str | None = None
    workers: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)


class RunConfig(_Section):
    """A whole run. Sections: `data`, `curate`, `tune`; shared: `model`, `device`, `seed`, `out`."""
    data: DataConfig = Field(default_factory=DataConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    model: str = "tiny"
    embedder: str = "default"                            # curate: sentence embedder (dpsel.models.embedder) | none
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    engine: str = "local"                                # filter: local | ray (Ray Data; see `ray`)
    ray: RaySection = Field(default_factory=RaySection)
    stages: StagesConfig = Field(default_factory=StagesConfig)   # the curation stages (dpsel.stages.options)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in ("local", "ray"):
            raise ValueError(f"engine must be local or ray, not {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], not {value!r}")
        return value

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, source: str | None = None) -> "RunConfig":
        """Validate a (nested) mapping; errors name `source` and the dotted field at fault."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as err:
            raise _input_error(err, source) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunConfig":
        """Read a YAML run config; an empty file is the defaults."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise DpselInputError(f"cannot read config: {err.strerror or err}", file=str(path)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DpselInputError(f"not valid YAML: {err}", file=str(path)) from None
        if data is not None and not isinstance(data, Mapping):
            raise DpselInputError("a run config must be a mapping of sections (data, curate, tune, ...)",
                                  file=str(path))
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def load(cls, config: "RunConfig | str | os.PathLike | None" = None,
             overrides: Mapping[str, Any] | None = None, *, stage: str | None = None) -> "RunConfig":
        """The run's settings: defaults < a RunConfig or YAML file < overrides (CLI options, flow parameters)."""
        if isinstance(config, RunConfig):
            base = config
        else:
            base = cls.from_yaml(config) if config is not None else cls()
        return base.with_overrides(overrides or {}, stage=stage)

    # ---- overrides -----------------------------------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any], *, stage: str | None = None) -> "RunConfig":
        """A copy with CLI-style overrides applied (None values are skipped: an option not given).

        Keys may be dotted (`tune.method`), prefixed (`tune_steps`, `curate_method`), or plain where the name
        is unambiguous (`train`, `budget`, `lr`, `out`, ...). `method` and `steps` exist in both `curate` and
        `tune`; plain ones go to `stage` ("curate" or "tune"), which must then be given.
        """
        merged = self.model_dump(by_alias=False)
        _check_exclusive(overrides, stage)
        for key, value in overrides.items():
            if value is None:
                continue
            section, field = _locate(key, stage)
            target = merged if section is None else merged[section]
            *parents, field = field.split(".")  # `curate.select.max_length` reaches into nested sections
            for parent in parents:
                if not isinstance(target.get(parent), dict):
                    raise DpselInputError(f"unknown run option {key!r}")
                target = target[parent]
            if isinstance(value, Path):
                value = os.fspath(value)
            if isinstance(value, tuple):
                value = list(value)
            target[field] = value
            if section == "curate" and field in _EXCLUSIVE_RULES:
                # a budget given on the command line replaces a threshold from the file, and vice versa
                target[_EXCLUSIVE_RULES[field]] = None
        return type(self).from_mapping(merged, source="command-line options")

    def with_absolute_paths(self, base: str | os.PathLike | None = None) -> "RunConfig":
        """A copy whose relative local paths are made absolute against `base` (default: the working
        directory), for runs started elsewhere (scheduled deployments run in the serving process's
        folder); URLs and absolute paths are left alone."""
        root = Path(base or Path.cwd())

        def absolute(spec: Any) -> Any:
            if spec is None:
                return None
            if isinstance(spec, list):
                return [absolute(one) for one in spec]
            return spec if "://" in spec or Path(spec).is_absolute() else os.fspath(root / spec)

        data = {name: absolute(getattr(self.data, name)) for name in type(self.data).model_fields}
        return self.model_copy(update={"data": self.data.model_copy(update=data), "out": absolute(self.out)})

    # ---- views for the library -----------------------------------------------------------------------

    def select_config(self) -> SelectConfig:
        """The `SelectConfig` the curation stage passes to `dpsel.select.select`."""
        params = self.curate.select
        return SelectConfig(model=self.model, embedder=self.embedder, device=self.device, seed=self.seed, steps=self.curate.steps,
                            epochs=self.curate.epochs,
                            batch_size=params.batch_size, meta_batch_size=params.meta_batch_size,
                            max_length=params.max_length, variant=params.variant,
                            weight_param=params.weight_param, extra=dict(params.extra))

    def curate_settings(self) -> dict[str, Any]:
        """What the curation stage reads besides its data and output folder, as JSON: the flows' curate task
        takes it as one parameter, so the stage's cache key covers exactly these settings."""
        return self.model_dump(mode="json", include=set(CURATE_STAGE_FIELDS))

    def with_eval_decontamination(self) -> "RunConfig":
        """curate-then-tune: the pool is also decontaminated against the run's own eval set."""
        if self.data.eval is None:
            return self
        evals = [self.data.eval] if isinstance(self.data.eval, str) else list(self.data.eval)
        wanted = list(dict.fromkeys([*self.stages.decontaminate, *evals]))
        return self.model_copy(update={"stages": self.stages.model_copy(update={"decontaminate": wanted})})

    def ray_options(self):
        """The `dpsel.engines.RayOptions` of an `engine: ray` run."""
        from dpsel.engines import RayOptions
        return RayOptions(address=self.ray.address, workers=self.ray.workers, batch_size=self.ray.batch_size,
                          num_gpus=self.ray.gpus_per_worker)

    def tune_options(self) -> dict[str, Any]:
        """Keyword options for `dpsel.tuning.tune_parquet` (unset ones left to its defaults)."""
        options = {"method": self.tune.method, "model": self.model, "seed": self.seed, "device": self.device,
                   "weights_column": self.tune.weights_column, "steps": self.tune.steps,
                   "lr": self.tune.lr, "r": self.tune.r, "batch_size": self.tune.batch_size,
                   "max_length": self.tune.max_length, "epochs": self.tune.epochs,
                   "grad_accum": self.tune.grad_accum, "save_steps": self.tune.save_steps,
                   "resume": self.tune.resume, "report_to": self.tune.report_to}
        return {key: value for key, value in options.items() if value is not None or key == "weights_column"}

    def require(self, *dotted: str, flow: str) -> None:
        """Raise DpselInputError naming every required field (e.g. `data.train`) that is unset."""
        missing = [name for name in dotted if _get_dotted(self, name) is None]
        if missing:
            raise DpselInputError(f"{flow} needs {', '.join(missing)} (set it in the config or as an option)")


# Plain override keys -> (section, field). `None` section: a top-level field.
_PLAIN_KEYS: dict[str, tuple[str | None, str]] = {
    "train": ("data", "train"), "meta": ("data", "meta"), "eval": ("data", "eval"),
    "eval_path": ("data", "eval"), "test": ("data", "eval"), "truth": ("data", "truth"),
    "scorer": ("data", "scorer"), "labels": ("data", "labels"), "inputs": ("data", "inputs"), "in": ("data", "inputs"),
    "budget": ("curate", "budget"), "threshold": ("curate", "threshold"), "epochs": ("curate", "epochs"),
    "lr": ("tune", "lr"), "r": ("tune", "r"), "weights_column": ("tune", "weights_column"),
    "model": (None, "model"), "embedder": (None, "embedder"), "device": (None, "device"), "seed": (None, "seed"),
    "out": (None, "out"),
    "engine": (None, "engine"), "ray_address": ("ray", "address"), "ray_workers": ("ray", "workers"),
    "ray_batch_size": ("ray", "batch_size"), "ray_gpus_per_worker": ("ray", "gpus_per_worker"),
    # curation stages
    "near_dup": ("stages", "near_dup"), "near_dup_threshold": ("stages", "near_dup_threshold"),
    "semantic_dup": ("stages", "semantic_dup"), "decontaminate": ("stages", "decontaminate"),
    "filters": ("stages", "filters"), "pii": ("stages", "pii"),
}
_SHARED_KEYS = ("method", "steps")
_EXCLUSIVE_RULES = {"budget": "threshold", "threshold": "budget"}
_SECTIONS = ("data", "curate", "tune", "ray", "stages")


def _check_exclusive(overrides: Mapping[str, Any], stage: str | None) -> None:
    """Budget and threshold given together (CLI, flow options) is an error, not "the last one wins"."""
    given = {_locate(key, stage)[1].split(".")[-1] for key, value in overrides.items() if value is not None}
    both = [name for name in _EXCLUSIVE_RULES if name in given]
    if len(both) > 1:
        raise DpselInputError("give either --budget or --threshold, not both")


def _locate(key: str, stage: str | None) -> tuple[str | None, str]:
    if "." in key:
        section, _, field = key.partition(".")
        if section not in _SECTIONS:
            raise DpselInputError(f"unknown config section {section!r} in override {key!r}")
        return section, field
    for section in ("curate", "tune"):
        if key.startswith(section + "_") and key[len(section) + 1:] in _SHARED_KEYS:
            return section, key[len(section) + 1:]
    if key in _SHARED_KEYS:
        if stage not in ("curate", "tune"):
            raise DpselInputError(f"option {key!r} is ambiguous here: use curate_{key} or tune_{key}")
        return stage, key
    if key in _PLAIN_KEYS:
        return _PLAIN_KEYS[key]
    raise DpselInputError(f"unknown run option {key!r}")


def _get_dotted(config: BaseModel, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _input_error(err: ValidationError, source: str | None) -> DpselInputError:
    """The first validation problem as one sentence: `<file>: field curate.budget: <why>`."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    why = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]   # our validators' words
    if first["type"] == "extra_forbidden":
        why = "unknown field (check the spelling; see configs/demo.yaml for the known ones)"
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if source is not None and not source.endswith((".yaml", ".yml")) and not os.path.exists(source):
        return DpselInputError(f"{source}: field {field}: {why}{more}")  # not a file: e.g. command-line options
    return DpselInputError(f"field {field}: {why}{more}", file=source)
