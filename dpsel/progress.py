"""One progress reporter for every long stage (reference fit, sampler, training, generation) and every entry
point (CLI, flows, demo, Python API).

A `Progress` is a `ProgressFn` — `progress(step, total, diag)` — so the selection methods and peft_train's
loops call it without knowing who listens. The phase is `diag["phase"]` (the methods name theirs: the
reference fit says "reference", training says "training") or the reporter's default; a new phase name starts
a new line/bar with its own fixed total, so counters never jump from /400 to /150 under one label.

Every update becomes a `ProgressEvent` handed to each sink: the terminal sink draws a rich bar with rate and
ETA on a TTY and writes plain timestamped lines otherwise (logs, CI, schedulers); flows add a sink that
updates the Prefect progress artifact from the same events.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

# Readable names for the phases the loops report (their `diag["phase"]` values).
PHASE_LABELS = {
    "reference": "reference fit on the meta set",
    "sampler": "SGLD sampling",
    "training": "fine-tuning",
    "eval_loss": "eval loss",
    "generate": "generating eval answers",
    "scoring": "scoring rows",
    "l2rw": "meta-reweighting (l2rw)",
}
LOG_EVERY_S = 10.0


def default_phase_of(method: str) -> str:
    """The phase a selection method's unnamed progress calls belong to (its main loop)."""
    return "l2rw" if method == "l2rw" else "sampler"


def phase_label(name: str) -> str:
    return PHASE_LABELS.get(name, name)


@dataclass
class ProgressEvent:
    """One update of one phase, as every sink sees it."""
    title: str                      # the stage, e.g. "curate[bads]"
    phase: str                      # readable phase name
    step: int
    total: int
    elapsed_s: float                # since the phase started
    diag: dict = field(default_factory=dict)
    finished: bool = False          # the phase is over (it may have stopped before `total`, e.g. early stopping)
    rate: float | None = None       # steps per second, measured between this phase's updates (None: too early)

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return None if rate is None or self.finished else max(0.0, (self.total - self.step) / rate)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    def text(self) -> str:
        """`curate[bads] · SGLD sampling 40/150 (27%) · 3.2 step/s · ETA 0:34 · meta_loss=1.2`."""
        parts = [self.title, f"{self.phase} {self.step}/{self.total} ({100 * self.fraction:.0f}%)"]
        if self.finished:
            parts.append(f"done in {format_seconds(self.elapsed_s)}"
                         + (" (stopped early)" if self.step < self.total else ""))
        else:
            if self.rate is not None:
                parts.append(f"{self.rate:.3g} step/s")
            if self.eta_s is not None:
                parts.append(f"ETA {format_seconds(self.eta_s)}")
        shown = format_diag(self.diag)
        return " · ".join(parts + ([shown] if shown else []))


Sink = Callable[[ProgressEvent], None]


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_diag(diag: dict, limit: int = 3) -> str:
    shown = [f"{k}={v:.3g}" for k, v in (diag or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "phase")]
    return " ".join(shown[:limit])


class Progress:
    """A `ProgressFn` that tracks phases and feeds sinks (see the module docstring)."""

    def __init__(self, title: str, sinks: Sequence[Sink] = (), default_phase: str = "sampler"):
        self.title = title
        self.sinks = list(sinks)
        self.default_phase = default_phase
        self._phase: str | None = None
        self._total = 0
        self._step = 0
        self._diag: dict = {}
        self._started = time.monotonic()      # a phase starts when the one before it ends (or at creation)
        self._first: tuple[int, float] | None = None  # the phase's first update: where its rate is measured from

    def __call__(self, step: int, total: int, diag: dict | None = None) -> None:
        diag = dict(diag or {})
        name = str(diag.get("phase") or self.default_phase)
        if self._phase is None or name != self._phase or total != self._total:
            self.start_phase(name, total)
        self._step, self._diag = int(step), diag
        if self._first is None:
            self._first = (self._step, time.monotonic())
        if self._total and self._step >= self._total:
            self.end_phase()  # the last step ends the phase: one "done" line, not a 100% line and then "done"
        else:
            self._emit(finished=False)

    def start_phase(self, name: str, total: int) -> None:
        """End the current phase (if any) and start `name` with a fixed `total` of steps."""
        self.end_phase()
        self._phase, self._total, self._step, self._diag, self._first = name, int(total), 0, {}, None

    def end_phase(self) -> None:
        if self._phase is not None:
            self._emit(finished=True)
            self._started = time.monotonic()
        self._phase = None

    def _rate(self, now: float) -> float | None:
        if self._first is None or self._step <= self._first[0] or now <= self._first[1]:
            return None
        return (self._step - self._first[0]) / (now - self._first[1])

    def _emit(self, finished: bool) -> None:
        now = time.monotonic()
        event = ProgressEvent(self.title, phase_label(self._phase or self.default_phase), self._step, self._total,
                              now - self._started, self._diag, finished, self._rate(now))
        for sink in self.sinks:
            sink(event)


# ---- the terminal sink ---------------------------------------------------------------------------------

def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


class LineSink:
    """Plain timestamped lines (not a TTY): a phase's first update, then at most one line per `every_s`,
    and its end."""

    def __init__(self, stream, every_s: float = LOG_EVERY_S):
        self.stream, self.every_s = stream, every_s
        self._last: dict[str, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        key = f"{event.title}/{event.phase}"
        now = time.monotonic()
        if not event.finished and key in self._last and now - self._last[key] < self.every_s:
            return
        self._last[key] = now
        print(f"{timestamp()} {event.text()}", file=self.stream, flush=True)
        if event.finished:
            self._last.pop(key, None)


class RichSink:
    """A rich bar per phase on a terminal: phase name, count, rate, ETA and the latest diagnostics."""

    def __init__(self, stream):
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        self._escape = escape  # stage titles such as "curate[bads]" are not rich markup

        self._bars = RichProgress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), TextColumn("{task.fields[diag]}", markup=False),
                                  console=Console(file=stream), transient=False)
        self._tasks: dict[str, int] = {}
        self._bars.start()

    def __call__(self, event: ProgressEvent) -> None:
        key = f"{event.title} · {event.phase}"
        if key not in self._tasks or event.step < self._bars.tasks[self._tasks[key]].completed:
            self._tasks[key] = self._bars.add_task(self._escape(key), total=event.total, rate="", diag="")
        rate = f"{event.rate:.3g} step/s" if event.rate else ""
        total = event.step if event.finished else event.total  # an early stop ends the bar where it stopped
        self._bars.update(self._tasks[key], completed=event.step, total=total, rate=rate,
                          diag=format_diag(event.diag))

    def close(self) -> None:
        self._bars.stop()


def terminal_sink(stream=None, every_s: float = LOG_EVERY_S) -> Sink:
    stream = stream or sys.stderr
    return RichSink(stream) if _isatty(stream) else LineSink(stream, every_s)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_reporter(title: str, *, sinks: Sequence[Sink] = (), stream=None, terminal: bool = True,
                      log_every_s: float = LOG_EVERY_S, default_phase: str = "sampler") -> Iterator[Progress]:
    """A `Progress` drawing on the terminal (unless `terminal=False`) and feeding `sinks`; the last phase is
    ended and the bar closed on exit."""
    shown = terminal_sink(stream, log_every_s) if terminal else None
    progress = Progress(title, [*([shown] if shown else []), *sinks], default_phase=default_phase)
    try:
        yield progress
        progress.end_phase()
    finally:
        if isinstance(shown, RichSink):
            shown.close()


@contextlib.contextmanager
def reporting(progress, title: str, default_phase: str = "sampler") -> Iterator[Callable | None]:
    """What library entry points do with their `progress` argument: True -> a terminal reporter for the
    call, a callable -> itself, False/None -> no reporting."""
    if progress is True:
        with progress_reporter(title, default_phase=default_phase) as reporter:
            yield reporter
    else:
        yield progress or None


def announce(message: str, stream=None) -> None:
    """A timestamped one-liner for the start of a stage (what is about to happen)."""
    print(f"{timestamp()} {message}", file=stream or sys.stderr, flush=True)


def set_verbosity(verbose: bool = False) -> None:
    """Quiet by default: only dpsel's progress and results. Libraries' INFO logs, transformers' own progress
    bars ("Loading weights", "Writing model shards") and their FutureWarnings show only with `verbose`.
    Prefect reads its level from the environment when first imported, so this runs before any flow; a
    level the user set (PREFECT_LOGGING_LEVEL) is kept."""
    import logging
    import os
    import warnings

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("dpsel").setLevel(logging.INFO if verbose else logging.WARNING)
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    # peft saving an adapter of the built-in model: there is no hub config to compare the vocabulary with
    for message in ("Could not find a config file", "Unable to fetch remote file"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    # bitsandbytes on an avx512-bf16 CPU looks for an optional hub kernel when first imported and warns when
    # it is absent ("Failed to load CPU gemm_4bit_forward"); its own CPU path runs instead. The hub-kernel
    # loader (`kernels`) says offline that it skips its publisher check for that kernel.
    for library in ("bitsandbytes", "kernels"):
        logging.getLogger(library).setLevel(logging.ERROR)
