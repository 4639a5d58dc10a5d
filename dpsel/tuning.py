"""`dpsel tune`: an instruction set in Parquet → peft_train's training loop → `OUT/adapter/`, `OUT/metrics.json`.

This module owns everything Parquet- and user-facing (reading, checking the weights column, naming the bad
row, writing outputs); the model work is peft_train's (models, adapters, train).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dpsel.errors import DpselInputError

METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"  # Trainer's checkpoint-N folders while a run is under way; removed when it ends
RUN_FILE = "run.json"  # in CHECKPOINT_DIR: the settings the checkpoints belong to (a resume must match them)
DEFAULT_STEPS = 200
TASK_COLUMN = "task"

# Learning rates when none is given, for short runs on small models: full fine-tuning moves every weight, so
# it wants a smaller step than the adapters; C3A's circulant kernels want much larger ones. The benchmark's
# sweep (benchmarks/results/tune.md, 150 steps on a pretrained tiny base) found 1e-2 best for LoRA and SURM,
# 3e-2 for LoKr, 3e-3 for full and >= 0.9 for C3A; larger bases usually want smaller steps (LoRA ~2e-4).
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3, "c3a": 1e-1, "lokr": 1e-2}
DEFAULT_SURM_LR = 1e-2


def default_lr(method: str) -> float:
    if method in DEFAULT_LR:
        return DEFAULT_LR[method]
    if method.startswith(("surm-", "qsurm-")):
        return DEFAULT_SURM_LR
    return DEFAULT_LR["lora"]


# ----------------------------------------------------------------------------- input checks


def _check_arguments(method: str, steps: int | None, epochs: float | None, batch_size: int, grad_accum: int,
                     max_length: int, lr: float | None, r: int, report_to: str) -> None:
    from peft_train.adapters import METHODS
    from peft_train.training import REPORT_TO

    if method not in METHODS:
        raise DpselInputError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if steps is not None and epochs is not None:
        raise DpselInputError("give steps or epochs, not both")
    if epochs is not None and not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise DpselInputError(f"epochs must be a positive number, not {epochs!r}")
    if report_to not in REPORT_TO:
        raise DpselInputError(f"report_to must be one of {', '.join(REPORT_TO)}, not {report_to!r}")
    if report_to not in ("none", "all"):
        from transformers.integrations import get_available_reporting_integrations

        if report_to not in get_available_reporting_integrations():
            raise DpselInputError(f"report_to {report_to} needs its package installed (pip install {report_to})")
    for name, value, minimum in (("steps", DEFAULT_STEPS if steps is None else steps, 1), ("batch_size", batch_size, 1),
                                 ("grad_accum", grad_accum, 1), ("max_length", max_length, 8), ("r", r, 1)):
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise DpselInputError(f"{name} must be an integer >= {minimum}, not {value!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DpselInputError(f"lr must be a positive number, not {lr!r}")


def _file_of(frame: pd.DataFrame, index: int) -> str | None:
    return str(frame["dpsel_file"].iloc[index]) if "dpsel_file" in frame.columns else None


def read_weights(frame: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    """The per-row loss weights of `rows` (positions in `frame`): numeric, finite, >= 0, not all zero."""
    if column not in frame.columns:
        available = ", ".join(c for c in frame.columns if not c.startswith("dpsel_") or c == "dpsel_weight")
        raise DpselInputError(f"weights column not found; columns are: {available}", column=column,
                              file=_file_of(frame, 0) if len(frame) else None)
    values = frame[column]
    if not (pd.api.types.is_numeric_dtype(values) or values.isna().all()) or pd.api.types.is_bool_dtype(values):
        raise DpselInputError(f"weights must be numbers, found {values.dtype}", column=column)
    weights = values.to_numpy(dtype=float, na_value=np.nan)[rows]
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        row = int(rows[bad[0]])
        raise DpselInputError(f"weight {frame[column].iloc[row]!r} is not a finite number >= 0 "
                              f"({bad.size} such row(s))", column=column, row=row, file=_file_of(frame, row))
    if not (weights > 0).any():
        raise DpselInputError("every weight is 0: nothing to train on", column=column)
    return weights


def _usable_rows(instruction_set, what: str) -> np.ndarray:
    rows = np.flatnonzero(instruction_set.usable_mask())
    if rows.size == 0:
        files = ", ".join(f.url for f in instruction_set.files)
        raise DpselInputError(f"no usable row in the {what} set (every row is invalid or a duplicate)", file=files)
    return rows


def _read_eval(eval_path) -> tuple[list, list | None, int]:
    from dpsel.data import read_instruction_set

    eval_set = read_instruction_set(eval_path)
    rows = _usable_rows(eval_set, "eval")
    messages = eval_set.messages(eval_set.usable_mask())
    tasks = None
    if TASK_COLUMN in eval_set.frame.columns:
        tasks = [str(t) for t in eval_set.frame[TASK_COLUMN].iloc[rows]]
    return messages, tasks, len(rows)


# ----------------------------------------------------------------------------- model


def _load_base(model: str, method: str, device: str):
    from dpsel.loading import load_model
    from peft_train.adapters import needs_4bit

    return load_model(model, quant="nf4" if needs_4bit(method) else None, device=device)


def _build_adapter(base, method: str, r: int):
    from peft_train.adapters import AdapterTargetError, build_adapter

    try:
        return build_adapter(base, method, r=r)
    except AdapterTargetError as error:
        raise DpselInputError(str(error)) from None
    except ValueError as error:  # peft refusing a method on this model (a layer size, a layer type)
        raise DpselInputError(f"method {method!r} cannot be built on this model: {error}") from None


def _run_fingerprint(settings: dict, messages: list, weights) -> dict:
    """What a checkpoint belongs to: the training settings and a hash of the rows and weights trained on."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode())
    if weights is not None:
        digest.update(np.asarray(weights, dtype=np.float64).tobytes())
    return {**settings, "data_sha256": digest.hexdigest()}


def _prepare_checkpoints(folder: Path, fingerprint: dict, resume: bool, rank: int) -> bool:
    """Make `folder` ready for this run; True when it holds checkpoints of this very run to resume from.

    Under torchrun / accelerate launch only rank 0 (`rank`: the process's global rank) deletes or writes; the
    other ranks come to the same answer from what they read (they read only where rank 0 leaves the folder alone).
    """
    from dpsel.io import write_json_atomic
    from peft_train.training import last_checkpoint

    run_file = folder / RUN_FILE
    if resume and last_checkpoint(folder) is not None and run_file.is_file():
        previous = json.loads(run_file.read_text())
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed:
            raise DpselInputError(f"checkpoints of an earlier run with other settings ({', '.join(changed)}) are "
                                  "in the way; re-run with --no-resume to start over (it deletes them)",
                                  file=str(folder))
        return True
    if rank != 0:
        return False
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json_atomic(fingerprint, run_file)
    return False


def _save(model, tokenizer, method: str, base_name: str, adapter_dir: Path) -> None:
    """`full` writes a whole model directory (load_model reads it); adapters write a PEFT adapter directory."""
    from dpsel.outputs import replace_dir_atomic
    from peft_train.models import save_model

    def build(tmp: Path) -> None:
        if method == "full":
            save_model(model, tokenizer, tmp)
        else:
            for peft_config in model.peft_config.values():  # "tiny" is built in memory (4-bit: via a temp dir)
                peft_config.base_model_name_or_path = base_name
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)  # so the adapter directory alone says how its text was tokenised

    replace_dir_atomic(adapter_dir, build)


def _parameter_counts(model) -> tuple[int, int]:
    from peft_train.adapters import count_parameters

    counts = count_parameters(model)
    if isinstance(counts, dict):
        return int(counts["trainable"]), int(counts["total"])
    trainable, total = counts
    return int(trainable), int(total)


# ----------------------------------------------------------------------------- tune


def tune_parquet(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "lora",
    model: str = "tiny",
    weights_column: str | None = None,
    eval_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    lr: float | None = None,
    batch_size: int = 16,
    max_length: int = 256,
    r: int = 8,
    progress=True,
    max_new_tokens: int = 64,
    epochs: float | None = None,
    grad_accum: int = 1,
    resume: bool = True,
    save_steps: int | None = None,
    report_to: str = "none",
) -> dict:
    """Fine-tune `model` with `method` on the usable rows of `data`; write `OUT/adapter/` and `OUT/metrics.json`.

    `weights_column` (e.g. `dpsel_weight` from `dpsel curate`) weights each row's loss; rows of weight 0 are
    not trained on. Invalid and duplicate rows (see dpsel.data) are left out and counted. Returns the metrics.
    Length: `steps` optimizer steps (default 200) or `epochs` passes; each step sees `batch_size` ×
    `grad_accum` rows (× processes under `accelerate launch` / `torchrun`). While it runs, Trainer
    checkpoints go to `OUT/checkpoints/` every `save_steps` steps (default: about ten per run); a run that was
    killed, re-run with the same settings and data, resumes from the newest one (`resume=False` starts over).
    `report_to`: none (default), tensorboard, wandb, mlflow, trackio or all (logs under `OUT/checkpoints/`).
    `progress`: True draws dpsel's reporter (training, eval loss, answer generation), False nothing, or a
    `progress(step, total, diag)` callback to feed.
    """
    import torch

    from dpsel.data import read_instruction_set
    from dpsel.io import write_json_atomic
    from dpsel.progress import reporting
    from peft_train import training
    from peft_train.models import resolve_device, tokenizer_defaults

    started = time.perf_counter()
    _check_arguments(method, steps, epochs, batch_size, grad_accum, max_length, lr, r, report_to)
    if steps is None and epochs is None:
        steps = DEFAULT_STEPS
    train_set = read_instruction_set(data)
    rows = _usable_rows(train_set, "training")
    weights = read_weights(train_set.frame, weights_column, rows) if weights_column else None
    messages = train_set.messages(train_set.usable_mask())
    eval_messages, eval_tasks, eval_rows = _read_eval(eval_path) if eval_path is not None else (None, None, 0)

    base, tokenizer = _load_base(model, method, device)
    torch.manual_seed(seed)  # the adapter's initialisation is random too
    tuned = _build_adapter(base, method, r)
    length = {"max_steps": steps} if steps is not None else {"max_steps": -1, "num_train_epochs": epochs}
    config = training.TrainConfig(
        **length, learning_rate=lr if lr is not None else default_lr(method), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_length=max_length, seed=seed,
        use_cpu=resolve_device(device).type == "cpu", max_new_tokens=max_new_tokens, save_steps=save_steps,
        report_to=report_to)
    out_dir = Path(out)
    checkpoints = out_dir / CHECKPOINT_DIR
    settings = {"method": method, "model": model, "steps": steps, "epochs": epochs, "lr": config.learning_rate,
                "r": r, "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length, "seed": seed,
                "weights_column": weights_column}
    resuming = _prepare_checkpoints(checkpoints, _run_fingerprint(settings, messages, weights), resume,
                                    config.process_index)
    evaluation = None
    with reporting(progress, f"tune[{method}]", default_phase="training") as reporter:
        result = training.train(tuned, tokenizer, messages, None if weights is None else weights.tolist(), config,
                       progress=reporter or False, checkpoint_dir=checkpoints, resume=resuming)
        if not result.is_main_process:  # other DDP ranks: rank 0 evaluates and writes the outputs
            return {"method": method, "train_loss": result.train_loss, "steps": result.steps}
        if eval_messages:
            evaluation = training.evaluate(tuned, tokenizer, eval_messages, max_new_tokens=max_new_tokens,
                                           tasks=eval_tasks, batch_size=config.per_device_eval_batch_size,
                                           max_length=max_length, progress=reporter)

    _save(tuned, tokenizer, method, model, out_dir / ADAPTER_DIR)
    trainable, total = _parameter_counts(tuned)
    counts = train_set.counts()
    metrics = {
        "method": method,
        "model": model,
        "trainable_params": trainable,
        "total_params": total,
        "train_loss": result.train_loss,
        "initial_train_loss": result.losses[0],
        "peak_memory_bytes": result.peak_memory_bytes,
        "memory_measure": result.memory_measure,
        "seconds": time.perf_counter() - started,
        "train_seconds": result.seconds,
        "steps": result.steps,
        "epochs": epochs,
        "resumed_from_step": result.resumed_from_step,
        "lr": config.learning_rate,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "report_to": report_to,
        "trainer": "transformers.Trainer",
        "tokenizer_defaults": tokenizer_defaults(tokenizer),
        "max_length": max_length,
        "r": r,
        "seed": seed,
        "device": str(next(tuned.parameters()).device),
        "optimizer": result.optimizer,
        "weights_column": weights_column,
        "input_rows": counts.get("input_rows", len(train_set)),
        "trained_rows": result.n_rows,
        "skipped_rows": result.n_skipped,
        "dropped_rows": int(len(train_set) - rows.size),
        "truncated_rows": result.n_truncated,
        "losses": result.losses,
    }
    if evaluation is not None:
        metrics["eval_loss"] = evaluation["eval_loss"]
        metrics["eval_exact_match"] = evaluation["eval_exact_match"]
        metrics["eval_rows"] = eval_rows
        if "per_task" in evaluation:
            metrics["eval_per_task"] = evaluation["per_task"]
    write_json_atomic(metrics, out_dir / METRICS_FILE)
    _remove_checkpoints(checkpoints)
    return metrics


def _remove_checkpoints(folder: Path) -> None:
    """A finished run's checkpoints go (adapter/ and metrics.json are its outputs); report_to logs stay."""
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    (folder / RUN_FILE).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
