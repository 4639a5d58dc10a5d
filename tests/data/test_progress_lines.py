"""dpsel.progress: phases with their own totals, plain timestamped lines off a terminal, the same events for
every sink; tuning reports training and answer generation through it."""
import io
import re

import pandas as pd
import pytest

from dpsel.progress import LineSink, Progress, ProgressEvent, progress_reporter


def test_each_phase_keeps_its_own_total_and_an_early_stop_is_said():
    events: list[ProgressEvent] = []
    progress = Progress("curate[bads]", [events.append])
    progress(25, 400, {"phase": "reference", "heldout_loss": 2.0})
    progress(50, 400, {"phase": "reference", "heldout_loss": 1.9})   # then early-stopped at 50
    progress(10, 150, {"meta_loss": 1.5})                             # the sampler names no phase
    progress.end_phase()
    shown = [(e.phase, e.step, e.total, e.finished) for e in events]
    assert shown == [("reference fit on the meta set", 25, 400, False), ("reference fit on the meta set", 50, 400, False),
                     ("reference fit on the meta set", 50, 400, True), ("SGLD sampling", 10, 150, False),
                     ("SGLD sampling", 10, 150, True)]
    assert "stopped early" in events[2].text()
    assert events[0].rate is None  # one update says nothing about speed yet
    assert "ETA" in events[1].text() and "step/s" in events[1].text() and events[1].rate > 0


def test_off_a_terminal_lines_are_timestamped_throttled_and_name_the_phase():
    stream = io.StringIO()
    with progress_reporter("tune[lora]", stream=stream, log_every_s=3600, default_phase="training") as progress:
        for step in range(1, 11):
            progress(step, 10, {"phase": "training", "loss": 1.0 / step})
        progress(4, 4, {"phase": "generate"})
    lines = stream.getvalue().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ tune\[lora\] · ", line) for line in lines)
    # first update and end of each phase only (the hour-long throttle hides the rest)
    assert [line.split(" · ")[1] for line in lines] == [
        "fine-tuning 1/10 (10%)", "fine-tuning 10/10 (100%)", "generating eval answers 4/4 (100%)"]
    assert all(" · done in " in line for line in lines[1:])


def test_line_sink_throttles_within_a_phase():
    stream = io.StringIO()
    sink = LineSink(stream, every_s=3600)
    for step in range(1, 6):
        sink(ProgressEvent("t", "p", step, 5, 1.0))
    assert len(stream.getvalue().splitlines()) == 1


@pytest.mark.usefixtures("one_thread")
def test_tuning_reports_training_eval_loss_and_generation(tmp_path):
    from dpsel.tuning import tune_parquet

    rows = [{"instruction": f"Double {i}.", "output": str(2 * i)} for i in range(12)]
    pd.DataFrame(rows[:8]).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(rows[8:]).to_parquet(tmp_path / "eval.parquet")
    calls = []
    tune_parquet(tmp_path / "train.parquet", tmp_path / "out", eval_path=tmp_path / "eval.parquet", steps=3,
                 batch_size=4, max_length=48, device="cpu", max_new_tokens=4,
                 progress=lambda step, total, diag: calls.append((diag["phase"], step, total)))
    phases = {}
    for phase, step, total in calls:
        phases.setdefault(phase, []).append((step, total))
    assert phases["training"] == [(1, 3), (2, 3), (3, 3)]
    assert phases["eval_loss"][-1] == (4, 4)
    assert phases["generate"][-1] == (4, 4)


def test_trainer_callback_reports_the_trainers_steps():
    from types import SimpleNamespace

    from peft_train.training.progress import ProgressCallback

    calls = []
    callback = ProgressCallback(lambda step, total, diag: calls.append((step, total, diag)))
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=20), None)
    state = SimpleNamespace(global_step=3, max_steps=20)
    callback.on_step_begin(None, state, None)
    callback.on_step_end(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 1.5, "learning_rate": 0.01, "epoch": 0.1})
    callback.on_log(None, state, None, logs={"eval_loss": 2.0})  # an eval log is no training step
    assert calls == [(3, 20, {"phase": "training", "loss": 1.5, "lr": 0.01})]
    assert len(callback.step_seconds) == 1 and callback.step_seconds[0] >= 0


def test_trainer_callback_reports_nothing_on_other_ranks():
    from types import SimpleNamespace

    from peft_train.training.progress import ProgressCallback

    calls = []
    callback = ProgressCallback(lambda step, total, diag: calls.append(step))
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=False, global_step=0, max_steps=20), None)
    callback.on_log(None, SimpleNamespace(global_step=1, max_steps=20), None, logs={"loss": 1.0})
    assert calls == []


def test_on_a_terminal_a_bar_per_phase_names_stage_and_phase():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with progress_reporter("curate[bads]", stream=stream) as progress:
        progress(50, 400, {"phase": "reference"})
        progress(150, 150, {"meta_loss": 1.2})
    shown = stream.getvalue()
    assert "curate[bads] · reference fit on the meta set" in shown and "curate[bads] · SGLD sampling" in shown


def test_quiet_output_holds_no_library_warnings_from_a_4bit_model(tmp_path):
    """A default (quiet) run that loads and runs a 4-bit base prints nothing of its own: bitsandbytes looks for
    an optional hub kernel on first use, and offline the loader (`kernels`) says it skips its trust check."""
    import os
    import subprocess
    import sys
    code = ("from dpsel.progress import set_verbosity; set_verbosity(False)\n"
            "import torch\nfrom peft_train.models import load_model\n"
            "model, _ = load_model('tiny', quant='nf4', device='cpu')\nmodel.eval()\n"
            "with torch.no_grad():\n    model(torch.tensor([[1, 2, 3, 4]]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr
