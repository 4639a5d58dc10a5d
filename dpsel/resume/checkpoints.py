"""Checkpoints of a curation run's long stages, so a killed run resumes where it stopped.

Where: `.OUT.dpsel-checkpoint/` beside OUT (not inside: OUT is swapped as a whole when the run publishes),
removed once the run has published. What: per stage (`reference`: the meta-fitted reference and the row
features; `sampler`: θ, the weights, the optimizer's preconditioner state, running moments, baselines,
visit counts, RNG states, the step), tensors in a safetensors file and everything else in a JSON file — no
pickle, so loading a checkpoint can never run code. The JSON is written after the tensors and names their
sha256, so a kill between the two writes leaves the previous checkpoint, never a mix. Under torchrun each rank
sees them through `RankCheckpoints` (per-rank stages, saved together).

A run refuses to resume a checkpoint made by a different run: `fingerprint.json` holds the method, the
selection config and the inputs' content hashes; a changed one is an input error (exit 2) naming what
changed, and `--restart` discards the checkpoint. Stages reach the active checkpoint through `current()`
(a context variable the curation sets), so the selection methods' signatures need not change.

Saving only reads the state, so when it happens cannot change the result: a resumed run ends bit-identical
to an uninterrupted one on CPU. DPSEL_CHECKPOINT_EVERY_S (default 60) sets how often a loop saves (the
reference fit, the sampler, l2rw, the chunked pool passes); SIGTERM or Ctrl-C in such a loop saves one at the
end of the current step before the run stops. A stage that resumes says so (`resuming`: a line on stderr and
the manifest's `resumed_from_checkpoint`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import dpsel.signals as signals  # `from dpsel import` would be an edge to the package, whose API reaches back here
from dpsel.errors import DpselInputError
from dpsel.io import file_sha256, write_json_atomic
from dpsel.parallel.env import launched_rank, launched_world

CHECKPOINT_TAG = ".dpsel-checkpoint"
FINGERPRINT_FILE = "fingerprint.json"
DEFAULT_EVERY_S = 60.0

_current: ContextVar["Checkpoints | None"] = ContextVar("dpsel_checkpoints", default=None)


def checkpoint_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{CHECKPOINT_TAG}"


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two fingerprints."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


class Checkpoints:
    """The checkpoint folder of one OUT: stage name -> (tensors, JSON state)."""

    def __init__(self, directory: Path, fingerprint: dict, every_s: float | None = None):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every_s = float(os.environ.get("DPSEL_CHECKPOINT_EVERY_S", DEFAULT_EVERY_S)) if every_s is None \
            else every_s
        self.resumed: dict[str, Any] = {}   # stage -> what was resumed (for the manifest)
        self._last_save = time.monotonic()
        self._steps: dict[str, int] = {}   # after_step calls per stage in this process (fault injection)

    @classmethod
    def open(cls, out_dir: Path, fingerprint: dict, *, restart: bool = False) -> "Checkpoints":
        """The checkpoints of OUT for a run with this `fingerprint` (JSON-able). A checkpoint left by a run
        with another fingerprint is refused (exit 2) unless `restart` discards it."""
        directory = checkpoint_dir(out_dir)
        # as it reads back from disk; torchrun: the stages are per rank, so the process count is part of the run
        fingerprint = json.loads(json.dumps({**fingerprint, "processes": launched_world()}, default=str))
        owner = launched_rank() == 0   # under torchrun rank 0 alone deletes; every rank checks
        if restart:
            if owner and directory.exists():
                shutil.rmtree(directory)
            return cls(directory, fingerprint)
        saved_path = directory / FINGERPRINT_FILE
        if saved_path.exists():
            try:
                saved = json.loads(saved_path.read_text())
            except ValueError:
                saved = {"unreadable": True}
            changed = _changes(saved, fingerprint)
            if changed and not any(directory.glob("*.safetensors")):  # nothing saved yet: nothing to resume
                if owner:
                    shutil.rmtree(directory, ignore_errors=True)
            elif saved.get("processes", 1) != fingerprint["processes"]:
                raise DpselInputError(
                    f"a checkpoint of an interrupted run with {saved.get('processes', 1)} process(es) is in "
                    f"{directory}, but this run has {fingerprint['processes']}: re-run it with "
                    f"{saved.get('processes', 1)} (torchrun --nproc-per-node) to resume, or add --restart to "
                    "discard it and start from zero", file=str(directory))
            elif changed:
                raise DpselInputError(
                    f"a checkpoint of an interrupted run is in {directory}, but this run differs from it in: "
                    f"{', '.join(changed[:8])}; re-run the same command to resume it, or add --restart to "
                    "discard it and start from zero", file=str(directory))
        return cls(directory, fingerprint)

    # ---- stages ---------------------------------------------------------------------------------------

    def due(self) -> bool:
        return time.monotonic() - self._last_save >= self.every_s

    def save(self, stage: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Tensors to `<stage>.safetensors`, then the state (naming the tensors' sha256) to `<stage>.json`."""
        if not (self.directory / FINGERPRINT_FILE).exists():  # created on the first save: no empty folders
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.fingerprint, self.directory / FINGERPRINT_FILE)
        tensor_path = self.directory / f"{stage}.safetensors"
        tmp = tensor_path.with_name(f".{tensor_path.name}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, tensor_path)
        write_json_atomic({"stage": stage, "tensors_sha256": file_sha256(tensor_path), "state": state},
                          self.directory / f"{stage}.json")
        self._last_save = time.monotonic()
        _fault_kill_after(stage, state)

    def after_step(self, stage: str, snapshot: Callable[[], tuple[dict, dict]]) -> None:
        """Called by a loop after each complete step: save `snapshot()` when one is due or a stop signal
        arrived (then stop: `Terminated` or `Interrupted`). A stop signal waits for the step to finish from the
        first call until `loop_done`."""
        signals.defer(True)
        _fault_signal(stage, self._steps)
        stop = signals.pending()
        if self.due() or stop:
            tensors, state = snapshot()
            self.save(stage, tensors, state)
            if stop:
                _announce_stop(stage, state, self.directory)
        signals.raise_if_pending()

    def loop_start(self) -> None:
        """From here to `loop_done`, a stop signal waits for the step in progress to end (then `after_step`
        saves)."""
        signals.defer(True)

    def loop_done(self) -> None:
        signals.defer(False)

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The saved (tensors, state) of `stage`, or None when there is none (or a kill interrupted its save)."""
        state_path = self.directory / f"{stage}.json"
        tensor_path = self.directory / f"{stage}.safetensors"
        if not (state_path.exists() and tensor_path.exists()):
            return None
        record = json.loads(state_path.read_text())
        if record.get("tensors_sha256") != file_sha256(tensor_path):
            return None  # tensors newer than the state (killed between the two writes): not resumable
        return load_file(str(tensor_path)), record["state"]

    def resuming(self, stage: str, record: dict, message: str) -> None:
        """A stage goes on from its checkpoint: `record` goes to the manifest, `message` (what was skipped,
        where it goes on) to stderr."""
        self.resumed[stage] = record
        from dpsel.progress import announce
        announce(f"resuming from the checkpoint in {self.directory}: {message}")

    def discard(self) -> None:
        if launched_rank() == 0:   # torchrun: rank 0 publishes the run, so it alone removes the checkpoint
            shutil.rmtree(self.directory, ignore_errors=True)


class RankCheckpoints:
    """A run's checkpoints (`Checkpoints`) as one rank of a torchrun run sees them.

    Shared stages (`reference`: the same on every rank) are rank 0's files; every other stage is per rank:
    rank k saves and loads `<stage>.rank{k}`. Whether to save is decided together (any rank due, or any rank
    asked to stop by SIGTERM, and every rank saves the same step; a stop then stops every rank), and a resume
    uses a stage only where every rank has it at the same step. The folder must be one all ranks see (a shared
    filesystem across machines); the fingerprint names the number of processes (`Checkpoints.open`)."""

    SHARED_STAGES = ("reference",)

    def __init__(self, checkpoints: Checkpoints, data_parallel):
        self.base, self.data_parallel = checkpoints, data_parallel
        self.resumed = checkpoints.resumed

    def _name(self, stage: str) -> str:
        return stage if stage in self.SHARED_STAGES else f"{stage}.rank{self.data_parallel.rank}"

    def save(self, stage: str, tensors: dict, state: dict) -> None:
        if stage not in self.SHARED_STAGES or self.data_parallel.rank == 0:
            self.base.save(self._name(stage), tensors, state)

    def load(self, stage: str):
        saved = self.base.load(self._name(stage))
        steps = self.data_parallel.gather_rows(np.array([-1 if saved is None else int(saved[1].get("step", 0))]))
        if (steps == steps[0]).all():
            return saved
        where = f"{self.base.directory} (steps saved per rank: {steps.tolist()}, -1 = none)"
        if stage in self.SHARED_STAGES:
            raise DpselInputError(f"the {stage} checkpoint is not visible to every rank: the checkpoint folder "
                                  "must be on a filesystem all ranks share", file=where)
        from dpsel.progress import announce
        announce(f"rank {self.data_parallel.rank}: the ranks' {stage} checkpoints are from different steps in "
                 f"{where}; the {stage} stage starts from zero")
        return None

    def after_step(self, stage: str, snapshot) -> None:
        signals.defer(True)
        due, stop = self.data_parallel.sum_over_ranks(
            torch.tensor([float(self.base.due()), float(signals.pending())])).tolist()
        if due or stop:
            tensors, state = snapshot()
            self.base.save(self._name(stage), tensors, state)
            if stop:
                _announce_stop(stage, state, self.base.directory)
        if stop:
            signals.raise_if_pending()
            raise signals.Terminated("terminated: another rank received a stop signal")

    def resuming(self, stage: str, record: dict, message: str) -> None:
        self.base.resuming(stage, record, f"rank {self.data_parallel.rank}: {message}")

    def loop_start(self) -> None:
        self.base.loop_start()

    def loop_done(self) -> None:
        self.base.loop_done()


def _fault_kill_after(stage: str, state: dict) -> None:
    """Fault injection for the resume tests: DPSEL_FAULT_KILL_AFTER_SAVE=STAGE:STEP SIGKILLs this process right
    after a complete save of STAGE at step >= STEP, so a test kills at a point it chose, never by timing."""
    spec = os.environ.get("DPSEL_FAULT_KILL_AFTER_SAVE", "")
    if not spec:
        return
    name, _, step = spec.partition(":")
    if name == stage and int(state.get("step", 0)) >= int(step or 0):
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_signal(stage: str, steps: dict[str, int]) -> None:
    """Fault injection for the resume tests: DPSEL_FAULT_SIGNAL=STAGE:N[:SIGNAL] sends this process SIGNAL
    (default SIGINT, as Ctrl-C does) at the end of the N-th step of STAGE it completes, so a test stops a run
    at a step it chose, never by timing; the handler (`dpsel.signals`) runs before the step's save is decided."""
    spec = os.environ.get("DPSEL_FAULT_SIGNAL", "")
    name, _, rest = spec.partition(":")
    if not spec or name != stage:
        return
    steps[stage] = steps.get(stage, 0) + 1
    at, _, signame = rest.partition(":")
    if steps[stage] == int(at or 1):
        signal.raise_signal(getattr(signal, signame or "SIGINT"))


def _announce_stop(stage: str, state: dict, directory: Path) -> None:
    from dpsel.progress import announce
    announce(f"stopping: the {stage} stage is saved at step {state.get('step', 0)} in {directory}; re-run the "
             "same command to go on from there")


def current() -> Checkpoints | None:
    """The active run's checkpoints (None outside a checkpointed run: tests, benchmarks, the Python API
    without `out`)."""
    return _current.get()


def current_whole() -> Checkpoints | None:
    """The active checkpoints for a stage each process computes whole (the reference fit, a pool pass, l2rw):
    under torchrun rank 0 alone saves and resumes it (the ranks compute the same thing; rank 0 writes the run),
    so ranks never write the same files."""
    return current() if launched_rank() == 0 else None


@contextmanager
def active(checkpoints: Checkpoints | None) -> Iterator[Checkpoints | None]:
    token = _current.set(checkpoints)
    try:
        yield checkpoints
    finally:
        _current.reset(token)
        signals.defer(False)  # a loop that raised before `loop_done` must not leave stop signals deferred


# ---- helpers for the stages: flat tensor dicts and RNG states (safetensors holds only tensors) -----------

def flatten(prefix: str, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> dict[str, torch.Tensor]:
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    return {f"{prefix}.{key}": value for key, value in items}


def unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {key[len(start):]: value for key, value in tensors.items() if key.startswith(start)}


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors, JSON) for a checkpoint; `load_optimizer` puts it back."""
    saved = optimizer.state_dict()
    tensors = {}
    for idx, param_state in saved["state"].items():
        tensors.update(flatten(f"opt.{idx}", param_state))
    return tensors, {"param_groups": saved["param_groups"], "opt_state": sorted(saved["state"])}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict) -> None:
    optimizer.load_state_dict({"state": {i: unflatten(f"opt.{i}", tensors) for i in state["opt_state"]},
                               "param_groups": state["param_groups"]})
