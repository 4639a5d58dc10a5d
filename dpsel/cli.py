"""`dpsel` command line: parses options and calls the library (or, for `dpsel flow`, the Prefect flows).

Exit codes (CONTRACT.md): 0 success, 2 bad input or bad arguments (one paragraph on stderr naming the
file, row or column), 1 internal failure (set DPSEL_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

import dpsel.signals as signals
from dpsel.errors import DpselInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Bayesian data-point selection for instruction tuning, then QLoRA/SURM fine-tuning.")

@app.callback()
def _global_options(
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="Also show library logs (Prefect INFO, transformers) and warnings."),
        threads: Optional[int] = typer.Option(
            None, "--threads", min=1, help="Torch intra-op threads for any command (default: DPSEL_THREADS, "
            "OMP_NUM_THREADS, else the cores this process may use; idle threads wait passively).")):
    """Quiet by default: progress and results only."""
    from dpsel.progress import set_verbosity
    from dpsel.threads import configure_threads
    configure_threads(threads)   # first: before anything imports torch (transformers does; dpsel.threads says why)
    set_verbosity(verbose)
    from dpsel.data.arrays import lean_memory_pool
    lean_memory_pool()           # the command's process only: a library import leaves the Arrow pool alone


SeedOpt = typer.Option(0, "--seed", help="Random seed; seeded CPU runs are reproducible bit for bit.")


def _fail(code: int, message: str) -> None:
    typer.echo(f"dpsel: error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(command: Callable) -> Callable:
    """Bad input -> exit 2 with a message naming file/column/row; anything else -> exit 1, no traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        signals.install()
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except DpselInputError as error:
            _fail(2, str(error))
        except signals.Terminated:
            _fail(143, "terminated (SIGTERM); re-run the same command to resume where a checkpoint exists")
        except KeyboardInterrupt:
            _fail(130, "interrupted (Ctrl-C); re-run the same command to resume where a checkpoint exists")
        except OSError as error:  # permissions, full disk, a missing file: the user's to fix -> exit 2
            from dpsel.outputs import output_error
            mapped = output_error(error)
            if mapped is error and not isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
                _internal(error)
            _fail(2, str(mapped) if mapped is not error else f"file {error.filename}: {error.strerror or error}")
        except Exception as error:  # internal failure: short message, traceback only on request
            _internal(error)
    return wrapper


def _internal(error: Exception) -> None:
    if os.environ.get("DPSEL_DEBUG"):
        traceback.print_exc()
    _fail(1, f"internal error: {type(error).__name__}: {error} (set DPSEL_DEBUG=1 for the traceback)")


@app.command()
@handle_errors
def synth(out: Path = typer.Option(..., "--out", help="Output directory."),
          rows: int = typer.Option(3000, "--rows", help="Training rows."),
          noise: float = typer.Option(0.3, "--noise", help="Corrupted fraction of the training rows."),
          seed: int = SeedOpt,
          tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated task families (default: all)."),
          meta_rows: int = typer.Option(200, "--meta-rows", help="Rows of the clean, trusted meta set."),
          test_rows: int = typer.Option(300, "--test-rows", help="Rows of the clean held-out test set.")):
    """Generate a noisy instruction set with known corruptions (train, meta, test, truth)."""
    from dpsel.synth import generate
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    paths = generate(out, rows=rows, noise=noise, seed=seed, tasks=task_list, meta_rows=meta_rows,
                     test_rows=test_rows)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command()
@handle_errors
def validate(paths: list[str] = typer.Argument(..., help="Parquet files, folders of shards or globs.")):
    """Check instruction-set files and print a summary."""
    from dpsel.data import validate_paths
    typer.echo(validate_paths(paths).render())


ConfigOpt = typer.Option(None, "--config", help="Run config YAML (see configs/demo.yaml); options given here override it.")


# ---- curation stage options (CONTRACT.md "Curation stages"), shared by curate and filter -----------------
NearDupOpt = typer.Option(None, "--near-dup/--no-near-dup", help="Drop near-duplicates (MinHash-LSH; default on).")
NearDupThresholdOpt = typer.Option(None, "--near-dup-threshold", help="Near-dup Jaccard threshold J (default 0.8).")
SemanticDupOpt = typer.Option(None, "--semantic-dup", help="Drop semantic duplicates at this embedding cosine (default off).")
DecontaminateOpt = typer.Option(None, "--decontaminate", help="Drop rows overlapping this eval set (n-grams); repeatable.")
FiltersOpt = typer.Option(None, "--filters", help="Quality/language filters: none (default) | default | FILE.yaml.")
PiiOpt = typer.Option(None, "--pii", help="PII: flag (default: a dpsel_pii column) | redact | drop.")


def _stage_overrides(near_dup, near_dup_threshold, semantic_dup, decontaminate, filters, pii) -> dict:
    """The stage options as RunConfig overrides, checked first so a bad value names its option (exit 2)."""
    from dpsel.stages.options import stages_config
    given = {"near_dup": near_dup, "near_dup_threshold": near_dup_threshold, "semantic_dup": semantic_dup,
             "filters": filters, "pii": pii}
    stages_config(**{k: v for k, v in given.items() if v is not None})
    return {**given, "decontaminate": list(decontaminate) if decontaminate else None}


def _print_curation(result) -> None:
    from dpsel.parallel.env import other_rank_note
    if note := other_rank_note(result.out_dir):  # torchrun: only rank 0 reports the run
        typer.echo(note, err=True)
        return
    counts = result.counts
    typer.echo(f"kept {counts['kept_rows']} of {counts['input_rows']} rows -> {result.out_dir}")
    if getattr(result, "auroc", None):
        shown = ", ".join(f"{k} {v:.3f}" for k, v in result.auroc.items())
        typer.echo(f"AUROC vs truth: {shown}")


@app.command()
@handle_errors
def curate(train: Optional[list[str]] = typer.Option(None, "--train", help="Training set (file, folder or glob); repeatable."),
           meta: Optional[list[str]] = typer.Option(None, "--meta", help="Small trusted meta set; repeatable."),
           out: Optional[Path] = typer.Option(None, "--out", help="Output folder (scores, curated rows, manifest, report, scorer/)."),
           method: Optional[str] = typer.Option(None, "--method", help="bads (default) | l2rw | loss | ifd | rds | random | all"),
           budget: Optional[float] = typer.Option(None, "--budget", help="Fraction of rows to keep (default 0.7)."),
           threshold: Optional[float] = typer.Option(None, "--threshold", help="Minimum mean weight to keep."),
           per_task: bool = typer.Option(False, "--per-task", help="Apply the budget within each `task` group."),
           model: Optional[str] = typer.Option(None, "--model", help="'tiny' (default, built in), a local directory, or a hub id."),
           embedder: Optional[str] = typer.Option(None, "--embedder", help="Sentence embedder for the meaning "
                                                  "evidence: 'default' (packaged all-MiniLM-L6-v2), a local "
                                                  "folder, a hub id (offline), or 'none'."),
           steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (method default if unset)."),
           epochs: Optional[float] = typer.Option(None, "--epochs", help="bads/l2rw: passes over the pool after burn-in (--steps overrides)."),
           seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0); seeded CPU runs are reproducible."),
           device: Optional[str] = typer.Option(None, "--device", help="auto (default) | cpu | cuda"),
           variant: Optional[str] = typer.Option(None, "--variant", help="bads: default | paper"),
           weight_param: Optional[str] = typer.Option(None, "--weight-param", help="bads: logits | amortized"),
           batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training rows per sampler step (default 16). bads in embedder space grows the default on pools past bads.embed_max_steps."),
           max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per row; longer rows are cut (default 256)."),
           truth: Optional[Path] = typer.Option(None, "--truth", help="synth truth.parquet: adds AUROC to the report."),
           labels: Optional[Path] = typer.Option(None, "--labels", help="A reviewer's labels (dpsel review's file, "
                                                 "label = keep|drop): keep joins the meta evidence, drop fixes "
                                                 "the weight at 0 (reason reviewed_drop)."),
           restart: bool = typer.Option(False, "--restart", help="Discard the checkpoint of an interrupted run "
                                        "into this --out and start from zero (default: resume it)."),
           engine: Optional[str] = typer.Option(None, "--engine", help="local (default) | ray: the pool passes "
                                                "of --method loss/ifd/bads/rds on Ray Data (l2rw, random, all: "
                                                "local only)."),
           ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                     help="Join this Ray cluster (default: a local runtime)."),
           near_dup: Optional[bool] = NearDupOpt, near_dup_threshold: Optional[float] = NearDupThresholdOpt,
           semantic_dup: Optional[float] = SemanticDupOpt, decontaminate: Optional[list[str]] = DecontaminateOpt,
           filters: Optional[str] = FiltersOpt, pii: Optional[str] = PiiOpt,
           config: Optional[Path] = ConfigOpt):
    """Score every training row by data-point selection and keep the best."""
    from dpsel.config import RunConfig
    from dpsel.curation.run import curate_from_config
    from dpsel.progress import default_phase_of, progress_reporter
    run = RunConfig.load(config, {
        "train": train or None, "meta": meta or None, "out": out, "method": method, "budget": budget,
        "threshold": threshold, "model": model, "embedder": embedder, "steps": steps, "epochs": epochs, "seed": seed, "device": device, "truth": truth,
        "labels": labels, "curate.select.variant": variant, "curate.select.weight_param": weight_param,
        "curate.select.batch_size": batch_size, "curate.select.max_length": max_length,
        "engine": engine, "ray_address": ray_address,
        **_stage_overrides(near_dup, near_dup_threshold, semantic_dup, decontaminate, filters, pii)}, stage="curate")
    run.require("data.train", "data.meta", "out", flow="curate")
    from dpsel.parallel.env import launched_rank
    with progress_reporter(f"curate[{run.curate.method}]", default_phase=default_phase_of(run.curate.method),
                           terminal=launched_rank() == 0) as progress:  # torchrun: rank 0's progress only
        result = curate_from_config(run, per_group=per_task, progress=progress, restart=restart)
    _print_curation(result)


@app.command("filter")
@handle_errors
def filter_cmd(scorer: Path = typer.Option(..., "--scorer", help="A curation run's scorer/ directory."),
               inputs: list[str] = typer.Option(..., "--in", help="New data (file, folder or glob); repeatable."),
               out: Path = typer.Option(..., "--out", help="Output folder (the same files as curate)."),
               threshold: Optional[float] = typer.Option(None, "--threshold",
                                                         help="Minimum weight (default: the curation run's)."),
               engine: str = typer.Option("local", "--engine", help="local (one process) | ray (Ray Data)."),
               ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                         help="Join this Ray cluster (default: a local runtime)."),
               workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                                     help="ray: scorer actors (default: one per CPU, or per GPU)."),
               batch_size: int = typer.Option(1024, "--batch-size", min=1, help="ray: rows per scoring batch."),
               gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", min=0.0,
                                                     help="ray: GPUs per scorer actor (0: CPU actors)."),
               near_dup: Optional[bool] = NearDupOpt, near_dup_threshold: Optional[float] = NearDupThresholdOpt,
               semantic_dup: Optional[float] = SemanticDupOpt,
               decontaminate: Optional[list[str]] = DecontaminateOpt, filters: Optional[str] = FiltersOpt,
               pii: Optional[str] = PiiOpt):
    """Score new rows with a trained curation run's weight model and keep what passes (after the curation
    stages; near-duplicates also of the rows the curation run saw)."""
    from dpsel.config import RunConfig
    from dpsel.curation.filter import filter_rows
    from dpsel.engines import RayOptions
    ray = RayOptions(address=ray_address, workers=workers, batch_size=batch_size, num_gpus=gpus_per_worker)
    run = RunConfig.load(None, _stage_overrides(near_dup, near_dup_threshold, semantic_dup, decontaminate, filters, pii))
    result = filter_rows(scorer, inputs, out, threshold=threshold, engine=engine, ray=ray, stages=run.stages,
                         embedder=run.embedder)
    _print_curation(result)


@app.command()
@handle_errors
def tune(data: Optional[list[str]] = typer.Option(None, "--data", help="Instruction set to train on; repeatable."),
         out: Optional[Path] = typer.Option(None, "--out", help="Output folder (adapter/, metrics.json)."),
         method: Optional[str] = typer.Option(None, "--method", help="lora (default) | qlora | surm-* | qsurm-* | c3a | lokr | full"),
         model: Optional[str] = typer.Option(None, "--model", help="'tiny' (default, built in), a local directory, or a hub id."),
         weights_column: Optional[str] = typer.Option(None, "--weights-column",
                                                      help="Per-row loss weights, e.g. dpsel_weight."),
         eval_path: Optional[str] = typer.Option(None, "--eval", help="Clean eval set: eval loss and exact-match."),
         steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default 200)."),
         seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
         device: Optional[str] = typer.Option(None, "--device", help="auto (default) | cpu | cuda"),
         lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (method default if unset)."),
         r: Optional[int] = typer.Option(None, "--r", help="LoRA rank (LoRA-family methods)."),
         batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per step (default 16)."),
         max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per row; longer rows are cut (default 256)."),
         epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the rows (instead of --steps)."),
         grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
         save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Steps between checkpoints."),
         resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                               help="Resume a killed run from OUT/checkpoints (default) or start over."),
         report_to: Optional[str] = typer.Option(None, "--report-to", help="none (default) | tensorboard | wandb | ..."),
         config: Optional[Path] = ConfigOpt):
    """Parameter-efficient fine-tuning (LoRA, QLoRA, SURM, C3A, LoKr) on an instruction set."""
    from peft_train.adapters import METHODS
    from dpsel.config import RunConfig
    from dpsel.tuning import tune_parquet
    run = RunConfig.load(config, {
        "train": data or None, "out": out, "method": method, "model": model, "weights_column": weights_column,
        "eval": eval_path, "steps": steps, "seed": seed, "device": device, "lr": lr, "r": r,
        "tune.batch_size": batch_size, "tune.max_length": max_length, "tune.epochs": epochs,
        "tune.grad_accum": grad_accum, "tune.save_steps": save_steps, "tune.resume": resume,
        "tune.report_to": report_to}, stage="tune")
    run.require("data.train", "out", flow="tune")
    if run.tune.method not in METHODS:
        raise DpselInputError(f"--method must be one of {', '.join(METHODS)}, not {run.tune.method!r}")
    out_dir = Path(run.out)
    metrics = tune_parquet(run.data.train, out_dir, eval_path=run.data.eval, **run.tune_options())
    from dpsel.parallel.env import other_rank_note
    if note := other_rank_note(out_dir):  # torchrun: only rank 0 reports the run
        typer.echo(note, err=True)
        return
    shown = {k: metrics[k] for k in ("method", "trainable_params", "train_loss", "eval_loss", "eval_exact_match")
             if k in metrics}
    typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    typer.echo(f"adapter: {out_dir / 'adapter'}")


@app.command()
@handle_errors
def inspect(run: Path = typer.Argument(..., help="A finished curate or filter run folder."),
            reason: Optional[list[str]] = typer.Option(None, "--reason", help="Drop reason to show (repeatable or "
                                                       "comma-separated; default: every reason)."),
            rows: Optional[int] = typer.Option(None, "--rows", "--limit", min=1,
                                               help="Dropped rows shown at most (default 20)."),
            chars: Optional[int] = typer.Option(None, "--chars", min=20,
                                                help="Characters of each text shown (default 400).")):
    """Print dropped rows of a run beside what they matched (the kept duplicate, the eval text), in input order."""
    from dpsel.curation.inspection import inspect_run, render
    typer.echo(render(inspect_run(run, reason, rows), chars), nl=False)


@app.command()
@handle_errors
def review(run: Path = typer.Option(..., "--run", help="A finished curate run folder."),
           rows: int = typer.Option(..., "--rows", min=1, help="Rows to review (K)."),
           out: Path = typer.Option(..., "--out", help="Review file: Parquet, or .csv / .jsonl by extension."),
           fmt: Optional[str] = typer.Option(None, "--format", help="parquet | csv | jsonl | label-studio "
                                             "(default: by the --out extension, else parquet).")):
    """Write the K rows whose keep/drop decision is most uncertain under the posterior, with an empty `label`
    column to fill with keep or drop; then `dpsel curate ... --labels FILE`."""
    from dpsel.curation.review import review as review_run
    table, written = review_run(run, rows, out, fmt)
    typer.echo(f"{table.num_rows} row(s) to review -> {', '.join(str(p) for p in written)}")


FLOW_OPTIONS_HELP = """Options after NAME override the config file (--key value, or --key=value):
--train PATH, --meta PATH, --eval PATH, --truth PATH: data (file, folder of shards or glob).
--scorer DIR, --in PATH: filter's scorer/ and new data.
--out DIR: output folder.
--method M, --steps N: the flow's stage (curate-then-tune: --curate-method, --tune-steps, ...).
--budget F | --threshold T: curation's keep rule.
--model NAME, --device auto|cpu|cuda, --seed S: shared settings.
--lr F, --r N, --weights-column COL: tuning.
--curate.select.batch-size N, --tune.max-length N, ...: any field of the config by its dotted name.
--compare: curate-then-tune also tunes on all rows, for comparison.
--review-rows K, --review-timeout-s S: curate-review-curate's rows to review (default 20) and how long it waits.
--labels FILE: a reviewer's keep/drop file for curation.
"""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog=FLOW_OPTIONS_HELP)
@handle_errors
def flow(ctx: typer.Context,
         name: str = typer.Argument(..., help="curate | filter | tune | curate-then-tune | curate-then-filter | "
                                                "curate-review-curate"),
         config: Optional[Path] = typer.Option(None, "--config", help="Run config YAML (see configs/demo.yaml).")):
    """Run a Prefect flow (embedded server unless PREFECT_API_URL is set). Extra --key value options override the config."""
    from flows import run_flow
    overrides = _parse_extra_options(ctx.args)
    run_flow(name.replace("-", "_"), config=config, **overrides)


embedder_app = typer.Typer(no_args_is_help=True, help="Sentence embedders for the meaning evidence.")
app.add_typer(embedder_app, name="embedder")


@embedder_app.command("distil")
@handle_errors
def embedder_distil(out: Path = typer.Option(..., "--out", help="Folder for the static embedder."),
                    source: str = typer.Option("default", "--source", help="Embedder to distil (default: the "
                                               "packaged all-MiniLM-L6-v2; a folder or a locally cached hub id)."),
                    dims: int = typer.Option(256, "--dims", min=2, help="PCA dimensions kept.")):
    """Distil a static (model2vec) embedder from SOURCE offline; use it with --embedder OUT."""
    from dpsel.models.distil import distil_static
    typer.echo(f"static embedder: {distil_static(out, source=source, dims=dims)} (use it with --embedder)")


def _parse_extra_options(args: list[str]) -> dict:
    """`--train a.parquet --steps 5 --compare` -> {"train": "a.parquet", "steps": "5", "compare": True}."""
    options, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise DpselInputError(f"unexpected argument {arg!r}: options are --key value")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            options[key] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            options[key] = args[i + 1]
            i += 1
        else:
            options[key] = True
        i += 1
    return options


def main() -> None:
    app()


if __name__ == "__main__":
    main()
