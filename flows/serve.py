"""Scheduled curation: serve the deployments of a schedules file on their cron schedules.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve schedules.yaml   (what `make schedule` runs)

The file is a list of deployments (bare, or under `deployments:`), each with `name`, `flow` (curate | filter |
tune | curate-then-tune | curate-then-filter), `cron` (optional: without it the deployment only runs when triggered), `timezone`,
`config` (a run config YAML, optional) and `parameters` (RunConfig fields, merged over `config`;
`compare` for curate-then-tune). Relative paths are made absolute against the folder `flows.serve` runs in.
Serving needs a real Prefect server (`make serve`): the runner polls it for due runs and runs them here.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpsel.errors import DpselInputError

FlowName = Literal["curate", "filter", "tune", "curate-then-tune", "curate-then-filter"]
_FLOW_PARAMETERS = {"curate-then-tune": ("compare",)}  # flow parameters besides `config`


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    flow: FlowName
    cron: str | None = None
    timezone: str | None = None
    config: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    paused: bool = False


def _deep_merge(base: dict, over: Mapping) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (_deep_merge(merged[key], value)
                       if isinstance(value, Mapping) and isinstance(merged.get(key), dict) else value)
    return merged


def load_schedules(path: str | os.PathLike) -> list[ScheduleEntry]:
    """Read and validate a schedules file; errors name the file and the entry/field at fault."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DpselInputError(f"cannot read schedules: {err.strerror or err}", file=str(path)) from None
    except yaml.YAMLError as err:
        raise DpselInputError(f"not valid YAML: {err}", file=str(path)) from None
    if isinstance(raw, Mapping):
        raw = raw.get("deployments")
    if not isinstance(raw, list) or not raw:
        raise DpselInputError("expected a non-empty list of deployments (name, flow, cron, parameters)",
                              file=str(path))
    entries = []
    for index, item in enumerate(raw):
        try:
            entries.append(ScheduleEntry.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise DpselInputError(f"deployment {index} ({_name_of(item)}), field {field}: {first['msg']}",
                                  file=str(path)) from None
    names = [entry.name for entry in entries]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DpselInputError(f"deployment names must be unique; repeated: {', '.join(duplicated)}", file=str(path))
    return entries


def _name_of(item: Any) -> str:
    return str(item.get("name", "unnamed")) if isinstance(item, Mapping) else "not a mapping"


def flow_parameters(entry: ScheduleEntry, source: str, base: Path | None = None) -> dict[str, Any]:
    """The deployment's parameters: `config` as a full, validated RunConfig (absolute paths) + flow options."""
    from dpsel.config import RunConfig

    settings = dict(entry.parameters)
    options = {key: settings.pop(key) for key in _FLOW_PARAMETERS.get(entry.flow, ()) if key in settings}
    where = f"{source}, deployment {entry.name}"
    if entry.config:
        config_path = Path(entry.config)
        if not config_path.is_absolute():
            config_path = (base or Path.cwd()) / config_path
        loaded = RunConfig.from_yaml(config_path).model_dump(mode="json")
        config = RunConfig.from_mapping(_deep_merge(loaded, settings), source=where)
    else:
        config = RunConfig.from_mapping(settings, source=where)
    return {"config": config.with_absolute_paths(base).model_dump(mode="json"), **options}


def build_deployments(entries: list[ScheduleEntry], source: str = "schedules", base: Path | None = None) -> list:
    """One `RunnerDeployment` per entry, with its cron schedule and parameters."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import FLOWS

    deployments = []
    for entry in entries:
        flow = FLOWS[entry.flow.replace("-", "_")]
        timing = ({"schedules": [Cron(entry.cron, timezone=entry.timezone)]} if entry.cron and entry.timezone
                  else {"cron": entry.cron})
        try:
            # MODULE_PATH: runs load `flows.pipeline.<flow>` by import, whatever folder the runner is in.
            deployments.append(flow.to_deployment(
                entry.name, parameters=flow_parameters(entry, source, base), description=entry.description,
                paused=entry.paused, tags=["dpsel", entry.flow], entrypoint_type=EntrypointType.MODULE_PATH,
                **timing))
        except (ValueError, TypeError) as err:  # a bad cron expression or timezone
            why = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            raise DpselInputError(f"deployment {entry.name}: {why}", file=source) from None
    return deployments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("schedules", nargs="?", default="schedules.yaml", help="schedules YAML file")
    parser.add_argument("--check", action="store_true", help="validate the file and list deployments; serve nothing")
    args = parser.parse_args(argv)
    from dpsel.progress import set_verbosity
    from dpsel.threads import configure_threads

    configure_threads()   # scheduled runs share their machine: the same thread policy as the CLI
    set_verbosity(False)
    from flows.environment import use_project_prefect_home
    use_project_prefect_home()
    try:
        entries = load_schedules(args.schedules)
        deployments = build_deployments(entries, args.schedules)  # validates everything, registers nothing
        if args.check:
            for entry in entries:
                print(f"{entry.flow}/{entry.name}: cron={entry.cron or '(manual)'}")
            return 0
        if not os.environ.get("PREFECT_API_URL"):
            raise DpselInputError("serving schedules needs a Prefect server: start one with `make serve` and set "
                                  "PREFECT_API_URL=http://127.0.0.1:4200/api (`make schedule` does)")
    except DpselInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from prefect import serve
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
