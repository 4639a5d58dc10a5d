"""The demo's up-front estimate: a short probe times a few training steps of each phase's model on this machine
(full training of the tiny model, each adapter method) and the evaluation of a few rows, and the plan
multiplies those rates by its planned steps and rows. The probe runs at the machine's current load, so the
estimate already includes whatever else is running.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

PROBE_STEPS = 6   # the first step pays one-off costs; the mean of the rest is the rate (batches differ in length)
PROBE_EVAL_ROWS = 16
# One bads sampler step costs about this many full-training steps of the tiny model, its share of the meta
# reference fit, the prior's evidence and the posterior pass over every row included (measured: 9.8 on the
# quick demo, 9.9 on the full one).
SELECTION_STEP_COST = 10.0
# Prefect's embedded server start, data generation, model loading and saving: about this many seconds per
# flow run on 2 free cores (measured on the demo).
OVERHEAD_S = 4.0


@dataclass(frozen=True)
class Rates:
    """Seconds per optimizer step (full training; each adapter method) and per evaluated row."""
    full_step: float
    adapter_step: dict[str, float]
    eval_row: float


def _probe_rows(count: int, tasks) -> list:
    from dpsel.data import alpaca_to_messages
    from dpsel.synth import make_rows

    rows = make_rows(count, tasks=tasks, rng=99)
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in rows]


def _step_seconds(model, tokenizer, rows, batch_size: int, max_length: int, device: str) -> float:
    from peft_train.models import resolve_device
    from peft_train.training import TrainConfig, train

    config = TrainConfig(max_steps=PROBE_STEPS, learning_rate=1e-3, per_device_train_batch_size=batch_size,
                         max_length=max_length, use_cpu=resolve_device(device).type == "cpu")
    result = train(model, tokenizer, rows, config=config, progress=False)
    return statistics.fmean(result.step_seconds[1:] or result.step_seconds)


def _eval_seconds(model, tokenizer, rows, max_length: int) -> float:
    from peft_train.training import evaluate

    started = time.perf_counter()
    evaluate(model, tokenizer, rows[:PROBE_EVAL_ROWS], max_length=max_length, batch_size=PROBE_EVAL_ROWS)
    return (time.perf_counter() - started) / PROBE_EVAL_ROWS


def probe(methods: dict[str, int], batch_size: int, max_length: int, device: str = "auto", tasks=None) -> Rates:
    """Time PROBE_STEPS steps of full training and of each adapter method {method: r} on the tiny model, on
    synthetic rows of `tasks` (all families when None)."""
    from dpsel.loading import load_model
    from peft_train.adapters import build_adapter, needs_4bit

    rows = _probe_rows(batch_size * PROBE_STEPS, tasks)
    model, tokenizer = load_model("tiny", device=device)
    eval_row = _eval_seconds(model, tokenizer, rows, max_length)
    full = _step_seconds(model, tokenizer, rows, batch_size, max_length, device)
    adapters = {}
    for method, r in methods.items():
        base, tokenizer = load_model("tiny", quant="nf4" if needs_4bit(method) else None, device=device)
        adapters[method] = _step_seconds(build_adapter(base, method, r=r), tokenizer, rows, batch_size, max_length,
                                         device)
    return Rates(full, adapters, eval_row)


def phase_seconds(rates: Rates, *, pretrain_steps: int, selection_steps: int, tune_steps: dict[str, int],
                  runs_per_method: int, eval_rows: int) -> dict[str, float]:
    """Estimated seconds of each phase: planned steps (and rows) times the measured rates; `tune_steps`:
    each adapter method's steps."""
    phases = {"pretrain base": pretrain_steps * rates.full_step,
              "select": selection_steps * SELECTION_STEP_COST * rates.full_step}
    for method, step in rates.adapter_step.items():
        phases[f"tune {method}"] = runs_per_method * (tune_steps[method] * step + eval_rows * rates.eval_row)
    phases["overhead"] = OVERHEAD_S * (1 + len(rates.adapter_step) * runs_per_method)
    return phases
