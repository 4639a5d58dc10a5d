"""Benchmark of the fine-tuning methods: LoRA (r=1, 8), SURM, C3A, LoKr, full, and their 4-bit variants.

Protocol. Adapters on a random-init base learn little, so a base is pretrained first: the tiny model, fully
trained for `--pretrain-seconds` on some synth task families plus generic text, cached under
benchmarks/cache/ and reused. Each method then adapts that base to *other* families it has not seen. The
learning rate of each method is picked on a validation split (one seed) from a small grid; the chosen lr is
then run with `--seeds` seeds and scored on a separate held-out test split (eval loss per task; greedy
exact match, reported only where it discriminates). The 4-bit variants reuse the lr their 16-bit twin won.
Step time is a ratio to LoRA r=8's, measured in this process with the methods interleaved.
Also measured: FFT product vs materialising ΔW for the SURM layer classes at d = 1024, 2048, 4096, and the
base-weight memory of a 4-bit model vs fp16.

  python benchmarks/tune.py                   # the full run (~10 min on 2 cores)
  python benchmarks/tune.py --quick           # a smoke run (~2 min)
  python benchmarks/tune.py --device cuda --model-size 100m   # QLoRA vs 16-bit LoRA timing on a GPU

Writes benchmarks/results/tune.json and tune.md (or tune-100m.* for the timing mode).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpsel.data import alpaca_to_messages  # noqa: E402
from dpsel.synth import TASK_FAMILIES, WORDS, make_rows  # noqa: E402
from peft_train.adapters import build_adapter, count_parameters, needs_4bit  # noqa: E402
from peft_train.models import TINY_CONFIG, build_tiny_model, load_model, save_model  # noqa: E402
from peft_train.tokenizer import ByteTokenizer  # noqa: E402
from peft_train.memory import model_memory_bytes  # noqa: E402
from peft_train.training import TrainConfig, evaluate, train  # noqa: E402

PRETRAIN_TASKS = ["add", "mul", "reverse", "sort", "upper", "count"]
ADAPT_TASKS = [t for t in TASK_FAMILIES if t not in PRETRAIN_TASKS]  # compare, next, convert, digits
BATCH_SIZE = 16
MAX_LENGTH = 128
PRETRAIN_LR = 3e-3


@dataclass(frozen=True)
class Spec:
    """One benchmarked configuration: a peft_train method and its hyper-parameters."""
    label: str
    method: str
    r: int = 8
    structure_kwargs: dict = field(default_factory=dict)
    lr_family: str = "lora"
    twin: str | None = None  # the 16-bit spec whose best lr a 4-bit spec reuses

    def __hash__(self) -> int:
        return hash(self.label)


SPECS = [
    Spec("lora-r8", "lora", r=8),
    Spec("lora-r1", "lora", r=1),
    Spec("surm-circulant", "surm-circulant", lr_family="surm"),
    Spec("surm-toeplitz", "surm-toeplitz", lr_family="surm"),
    Spec("surm-kronecker", "surm-kronecker", lr_family="surm"),
    Spec("surm-ldr-r1", "surm-ldr", r=1, lr_family="surm"),  # rank 1: 2n parameters, the circulant's budget
    Spec("c3a", "c3a", lr_family="c3a"),
    Spec("lokr", "lokr", lr_family="lokr"),
    Spec("full", "full", lr_family="full"),
    Spec("qlora-r8", "qlora", r=8, twin="lora-r8"),
    Spec("qsurm-circulant", "qsurm-circulant", twin="surm-circulant"),
    Spec("qsurm-toeplitz", "qsurm-toeplitz", twin="surm-toeplitz"),
    Spec("qsurm-kronecker", "qsurm-kronecker", twin="surm-kronecker"),
    Spec("qsurm-ldr-r1", "qsurm-ldr", r=1, twin="surm-ldr-r1"),
]
LR_GRID = {
    "lora": [3e-3, 1e-2, 3e-2],
    "surm": [3e-3, 1e-2, 3e-2],
    "c3a": [3e-2, 1e-1, 3e-1],
    "lokr": [3e-3, 1e-2, 3e-2],
    "full": [3e-4, 1e-3, 3e-3],
}
QUICK_LR = {"lora": 3e-3, "surm": 1e-2, "c3a": 1e-1, "lokr": 1e-2, "full": 1e-3}
# Extra seeds go to the configurations the claims are about.
MAIN = ["lora-r8", "lora-r1", "c3a", "lokr", "qlora-r8"]
MATCHED_BASELINES = ["lora-r1", "lokr", "c3a"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- data


def generic_text_rows(n: int, seed: int) -> list[list[dict]]:
    """Plain word sequences (continue a list of words) so the base also learns ordinary text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        cut = rng.randint(2, len(words) - 2)
        rows.append([{"role": "user", "content": "Continue: " + " ".join(words[:cut])},
                     {"role": "assistant", "content": " ".join(words[cut:])}])
    return rows


def _messages(rows: list[dict]) -> list[list[dict]]:
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in rows]


@dataclass
class AdaptData:
    train: list[list[dict]]
    val: list[list[dict]]
    test: list[list[dict]]
    test_tasks: list[str]


def adaptation_data(n_train: int, n_val: int, n_test: int, seed: int = 1) -> AdaptData:
    rows = make_rows(n_train + n_val + n_test, tasks=ADAPT_TASKS, rng=seed)  # prompts distinct across splits
    train_rows, val_rows, test_rows = rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:]
    return AdaptData(_messages(train_rows), _messages(val_rows), _messages(test_rows), [r["task"] for r in test_rows])


# ----------------------------------------------------------------------------- pretrained base


def _probe_step_seconds(messages, threads_note: str) -> float:
    model = build_tiny_model(seed=0)
    config = TrainConfig(max_steps=8, learning_rate=PRETRAIN_LR, per_device_train_batch_size=BATCH_SIZE,
                         max_length=MAX_LENGTH, use_cpu=True)
    result = train(model, ByteTokenizer(), messages[:400], config=config, progress=False)
    seconds = result.seconds / result.steps
    log(f"pretraining probe: {seconds * 1000:.0f} ms/step ({threads_note})")
    return seconds


def pretrained_base(cache: Path, seconds: float, device: str) -> tuple[Path, dict]:
    """The tiny model fully trained on PRETRAIN_TASKS + generic text for about `seconds`; cached by its recipe."""
    recipe = {"tasks": PRETRAIN_TASKS, "rows": 4000, "text_rows": 1000, "seconds": seconds, "lr": PRETRAIN_LR,
              "batch_size": BATCH_SIZE, "config": TINY_CONFIG, "version": 1}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"base-{key}"
    info_file = folder / "pretrain.json"
    if info_file.exists():
        log(f"reusing the pretrained base {folder}")
        return folder, json.loads(info_file.read_text())
    messages = _messages(make_rows(recipe["rows"], tasks=PRETRAIN_TASKS, rng=0)) + generic_text_rows(1000, seed=0)
    steps = max(20, int(seconds / _probe_step_seconds(messages, f"{torch.get_num_threads()} thread(s)")))
    log(f"pretraining the base for {steps} steps (~{seconds:.0f} s)")
    model = build_tiny_model(seed=0)
    config = TrainConfig(max_steps=steps, learning_rate=PRETRAIN_LR, per_device_train_batch_size=BATCH_SIZE,
                         max_length=MAX_LENGTH, use_cpu=device == "cpu")
    result = train(model, ByteTokenizer(), messages, config=config, progress=False)
    save_model(model.cpu(), ByteTokenizer(), folder)
    info = {"recipe": recipe, "steps": steps, "seconds": result.seconds, "final_loss": result.train_loss,
            "first_loss": result.losses[0]}
    info_file.write_text(json.dumps(info, indent=2))
    log(f"base: loss {result.losses[0]:.3f} -> {result.train_loss:.3f} in {result.seconds:.0f} s")
    return folder, info


# ----------------------------------------------------------------------------- one run


def build(spec: Spec, base_dir: Path, seed: int, device: str):
    model, tokenizer = load_model(str(base_dir), quant="nf4" if needs_4bit(spec.method) else None, device=device)
    torch.manual_seed(seed)
    return build_adapter(model, spec.method, r=spec.r, structure_kwargs=spec.structure_kwargs), tokenizer


def run_once(spec: Spec, lr: float, seed: int, steps: int, base_dir: Path, data: AdaptData, device: str,
             exact_match: bool) -> tuple[dict, torch.nn.Module, object]:
    """Train one configuration; score it on the validation split and (per task) on the test split."""
    model, tokenizer = build(spec, base_dir, seed, device)
    trainable, total = count_parameters(model)
    config = TrainConfig(max_steps=steps, learning_rate=lr, per_device_train_batch_size=BATCH_SIZE, max_length=MAX_LENGTH,
                         seed=seed, use_cpu=device == "cpu")
    result = train(model, tokenizer, data.train, config=config, progress=False)
    record = {"lr": lr, "seed": seed, "trainable_params": trainable, "total_params": total,
              "train_loss": result.train_loss, "seconds": result.seconds,
              "peak_memory_bytes": result.peak_memory_bytes, "memory_measure": result.memory_measure}
    record["val_loss"] = evaluate(model, tokenizer, data.val, exact_match=False, max_length=MAX_LENGTH)["eval_loss"]
    record.update(score_test(model, tokenizer, data, exact_match))
    return record, model, tokenizer


def score_test(model, tokenizer, data: AdaptData, exact_match: bool) -> dict:
    scored = evaluate(model, tokenizer, data.test, tasks=data.test_tasks, max_new_tokens=24, max_length=MAX_LENGTH,
                      exact_match=exact_match)
    scores = {"test_loss": scored["eval_loss"], "per_task": scored["per_task"]}
    if exact_match:
        scores["exact_match"] = scored["eval_exact_match"]
    return scores


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


# ----------------------------------------------------------------------------- the comparison


def sweep_and_seed(specs: list[Spec], args, base_dir: Path, data: AdaptData, on_result=None) -> dict:
    """Per spec: lr sweep at seed 0 (picked on validation loss), then more seeds at the best lr for MAIN specs."""
    results: dict[str, dict] = {}
    for spec in specs:  # 16-bit specs come first, so a 4-bit spec finds its twin's best lr
        if spec.twin is not None and spec.twin in results:
            grid = [results[spec.twin]["best_lr"]]
        else:
            grid = [QUICK_LR[spec.lr_family]] if args.quick else LR_GRID[spec.lr_family]
        sweep, best, best_model = [], None, None
        for lr in _grid_with_edge_extension(grid, lambda: best, quick=args.quick):
            record, model, tokenizer = run_once(spec, lr, 0, args.steps, base_dir, data, args.device, exact_match=False)
            sweep.append(record)
            log(f"{spec.label:16s} lr {lr:<7g} val {record['val_loss']:.4f} test {record['test_loss']:.4f} "
                f"({record['seconds']:.0f} s)")
            if best is None or _finite_or_inf(record["val_loss"]) < _finite_or_inf(best["val_loss"]):
                best, best_model = record, model  # kept, so exact match (generation) runs for the winner only
        best = {**best, **score_test(best_model, tokenizer, data, exact_match=True)}
        runs = [best]
        n_seeds = args.seeds if spec.label in MAIN else 1
        for seed in range(1, n_seeds):
            runs.append(run_once(spec, best["lr"], seed, args.steps, base_dir, data, args.device, exact_match=True)[0])
        results[spec.label] = summarise(spec, sweep, runs)
        log(f"{spec.label:16s} test loss {results[spec.label]['test_loss_mean']:.4f}"
            f" ± {results[spec.label]['test_loss_sd']:.4f} over {len(runs)} seed(s)")
        if on_result is not None:
            on_result(results)
    return results


def _grid_with_edge_extension(grid: list[float], best_so_far, quick: bool):
    """The grid's learning rates, then one more (×3) if the best so far sits on the grid's top edge, so the
    reported optimum is not just the largest value tried."""
    yield from grid
    if not quick and len(grid) > 1 and best_so_far()["lr"] == grid[-1]:
        yield grid[-1] * 3


def summarise(spec: Spec, sweep: list[dict], runs: list[dict]) -> dict:
    losses = [r["test_loss"] for r in runs]
    tasks = sorted(runs[0]["per_task"])
    return {
        "method": spec.method, "r": spec.r, "trainable_params": runs[0]["trainable_params"],
        "total_params": runs[0]["total_params"],
        "lr_sweep": {f"{r['lr']:g}": r["val_loss"] for r in sweep}, "best_lr": runs[0]["lr"],
        "seeds": [r["seed"] for r in runs], "test_losses": losses,
        "test_loss_mean": statistics.fmean(losses), "test_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "exact_match_mean": statistics.fmean(r["exact_match"] for r in runs),
        "per_task_loss": {t: statistics.fmean(r["per_task"][t]["eval_loss"] for r in runs) for t in tasks},
        "per_task_exact_match": {t: statistics.fmean(r["per_task"][t]["eval_exact_match"] for r in runs) for t in tasks},
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "memory_measure": runs[0]["memory_measure"],
        "train_seconds": statistics.fmean(r["seconds"] for r in runs),
    }


def extra_seeds_for_best_surm(results: dict, args, base_dir: Path, data: AdaptData) -> str | None:
    """The best SURM variant is one of the claim's subjects: give it the same number of seeds as the baselines."""
    surm = [label for label in results if label.startswith("surm-")]
    if not surm:
        return None
    best = min(surm, key=lambda label: results[label]["test_loss_mean"])
    spec = next(s for s in SPECS if s.label == best)
    runs_have = len(results[best]["seeds"])
    for seed in range(runs_have, args.seeds):
        record = run_once(spec, results[best]["best_lr"], seed, args.steps, base_dir, data, args.device,
                          exact_match=True)[0]
        entry = results[best]
        entry["seeds"].append(seed)
        entry["test_losses"].append(record["test_loss"])
        entry["test_loss_mean"] = statistics.fmean(entry["test_losses"])
        entry["test_loss_sd"] = statistics.stdev(entry["test_losses"])
        log(f"{best:16s} seed {seed} test {record['test_loss']:.4f}")
    return best


def step_time_ratios(specs: list[Spec], args, base_dir: Path, data: AdaptData, rounds: int = 3, steps: int = 8) -> dict:
    """Seconds per step of each spec over LoRA r=8's, interleaved round-robin so machine load hits all alike."""
    lora = next(s for s in SPECS if s.label == "lora-r8")
    timed = [lora] + [s for s in specs if s.label != "lora-r8"]
    per_step: dict[str, list[float]] = {s.label: [] for s in timed}
    for _ in range(rounds):
        for spec in timed:
            model, tokenizer = build(spec, base_dir, 0, args.device)
            config = TrainConfig(max_steps=steps, learning_rate=1e-3, per_device_train_batch_size=BATCH_SIZE,
                                 max_length=MAX_LENGTH, use_cpu=args.device == "cpu")
            result = train(model, tokenizer, data.train, config=config, progress=False)
            per_step[spec.label].append(statistics.median(result.step_seconds[1:]))  # first step: warm-up
    reference = statistics.median(per_step["lora-r8"])
    return {label: {"ms_per_step": 1000 * statistics.median(v), "ratio": statistics.median(v) / reference}
            for label, v in per_step.items()}


# ----------------------------------------------------------------------------- FFT vs dense, 4-bit memory


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def fft_vs_dense(sizes=(1024, 2048, 4096), tokens: int = 64, repeats: int = 1) -> list[dict]:
    """Forward + backward of ΔW x: the structured (FFT) product vs building the dense ΔW and multiplying."""
    from peft_train.surm import make_structure

    rows = []
    for structure in ("circulant", "toeplitz", "ldr"):
        for d in sizes:
            torch.manual_seed(0)
            delta = make_structure(structure, d, d)
            with torch.no_grad():
                for p in delta.parameters():
                    p.normal_()
            x = torch.randn(tokens, d)

            def structured():
                delta.zero_grad()
                delta(x).sum().backward()

            def dense():
                delta.zero_grad()
                (x @ delta.get_delta_weight().T).sum().backward()

            with torch.no_grad():
                agree = torch.allclose(delta(x), x @ delta.get_delta_weight().T, rtol=1e-3, atol=1e-3 * d)
            t_fft, t_dense = _time(structured, repeats), _time(dense, repeats)
            rows.append({"structure": structure, "d": d, "tokens": tokens, "fft_ms": 1000 * t_fft,
                         "dense_ms": 1000 * t_dense, "dense_over_fft": t_dense / t_fft,
                         "dense_delta_bytes": 4 * d * d, "same_output": bool(agree)})
            log(f"fft vs dense {structure} d={d}: {1000 * t_fft:.1f} ms vs {1000 * t_dense:.1f} ms")
    return rows


def _linear_weight_bytes(model) -> int:
    """Bytes of the weights of the linear layers that 4-bit quantisation replaces (not the head)."""
    import bitsandbytes as bnb

    total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, (bnb.nn.Linear4bit, torch.nn.Linear)):
            total += model_memory_bytes(module)
    return total


def four_bit_memory(base_dir: Path) -> dict:
    fp16, _ = load_model(str(base_dir), dtype="float16", device="cpu")
    nf4, _ = load_model(str(base_dir), quant="nf4", device="cpu")
    result = {
        "linear_fp16_bytes": _linear_weight_bytes(fp16), "linear_nf4_bytes": _linear_weight_bytes(nf4),
        "model_fp16_bytes": model_memory_bytes(fp16), "model_nf4_bytes": model_memory_bytes(nf4),
    }
    result["linear_ratio"] = result["linear_nf4_bytes"] / result["linear_fp16_bytes"]
    result["model_ratio"] = result["model_nf4_bytes"] / result["model_fp16_bytes"]
    return result


# ----------------------------------------------------------------------------- verdicts and report


def verdicts(results: dict, best_surm: str | None) -> dict:
    out = {}
    if best_surm:
        surm = results[best_surm]
        checks = {}
        for baseline in MATCHED_BASELINES:
            if baseline not in results:
                continue
            other = results[baseline]
            margin = other["test_loss_mean"] - surm["test_loss_mean"]
            spread = max(surm["test_loss_sd"], other["test_loss_sd"])
            checks[baseline] = {"margin": margin, "spread": spread, "beats": margin > spread and margin > 0,
                                "params": other["trainable_params"]}
        out["surm_beats_matched_baselines"] = {"best_surm": best_surm, "params": surm["trainable_params"],
                                               "checks": checks,
                                               "holds": bool(checks) and all(c["beats"] for c in checks.values())}
    if "qlora-r8" in results and "lora-r8" in results:
        q, l = results["qlora-r8"], results["lora-r8"]
        gap = abs(q["test_loss_mean"] - l["test_loss_mean"])
        spread = max(q["test_loss_sd"], l["test_loss_sd"])
        out["qlora_matches_lora"] = {"gap": gap, "spread": spread, "holds": gap <= spread}
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# Fine-tuning methods on the tiny model",
        "",
        *(["**Partial run** (interrupted or still running): only the methods below were measured.", ""]
          if report.get("partial") else []),
        f"Base: tiny Llama ({TINY_CONFIG['num_hidden_layers']} layers, hidden {TINY_CONFIG['hidden_size']}) pretrained "
        f"{report['base']['steps']} steps (~{report['base']['recipe']['seconds']:.0f} s) on "
        f"{', '.join(PRETRAIN_TASKS)} + generic text. Adaptation: {cfg['steps']} steps, batch {BATCH_SIZE}, on the "
        f"unseen families {', '.join(ADAPT_TASKS)} ({cfg['n_train']} rows); lr picked on {cfg['n_val']} validation rows, "
        f"scored on {cfg['n_test']} test rows. Device {cfg['device']}, {cfg['threads']} thread(s), "
        f"{report['seconds'] / 60:.1f} min in all.",
        "",
        "| method | trainable params | best lr | test eval loss (mean ± sd) | seeds | exact match | step time ×LoRA r=8 | peak memory MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    timing = report.get("step_time", {})
    for label, r in sorted(report["methods"].items(), key=lambda kv: kv[1]["test_loss_mean"]):
        ratio = f"{timing[label]['ratio']:.2f}" if label in timing else "–"
        lines.append(f"| {label} | {r['trainable_params']:,} | {r['best_lr']:g} | {r['test_loss_mean']:.3f} ± "
                     f"{r['test_loss_sd']:.3f} | {len(r['seeds'])} | {r['exact_match_mean']:.2f} | {ratio} | "
                     f"{_mib(r['peak_memory_bytes'])} |")
    measure = next(iter(report["methods"].values()))["memory_measure"]
    lines += ["", f"Peak memory: {measure} (on CPU: weights + gradients + optimizer state + the largest set of "
                  "activations saved for backward; 4-bit runs use gradient checkpointing).", ""]
    tasks = ADAPT_TASKS
    lines += ["Per-task test eval loss (exact match in brackets):", "",
              "| method | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for label, r in sorted(report["methods"].items(), key=lambda kv: kv[1]["test_loss_mean"]):
        cells = [f"{r['per_task_loss'][t]:.3f} ({r['per_task_exact_match'][t]:.2f})" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if all(r["exact_match_mean"] == 0 for r in report["methods"].values()):
        lines += ["", "Greedy exact match is 0 for every method and task: it does not discriminate at this scale, "
                      "so the comparison rests on eval loss."]
    lines += render_verdicts(report.get("verdicts", {}))
    if report.get("fft_vs_dense"):
        lines += ["", "FFT product vs materialising ΔW (forward + backward of ΔW x, "
                      f"{report['fft_vs_dense'][0]['tokens']} tokens, fp32 CPU, one thread). Dense = the layer's own "
                      "`get_delta_weight()` (what merging uses) then a matmul; for the circulant that multiplies two "
                      "n × n circulants (O(n³)), so its ratio is larger than against an O(n²) materialisation.", "",
                  "| structure | d | FFT ms | dense ms | dense / FFT |", "| --- | ---: | ---: | ---: | ---: |"]
        for row in report["fft_vs_dense"]:
            lines.append(f"| {row['structure']} | {row['d']} | {row['fft_ms']:.1f} | {row['dense_ms']:.1f} | "
                         f"{row['dense_over_fft']:.1f} |")
    if report.get("four_bit_memory"):
        m = report["four_bit_memory"]
        lines += ["", f"Base-weight memory, 4-bit NF4 (double quant) vs fp16: quantised linear layers "
                      f"{m['linear_ratio']:.3f}× ({_mib(m['linear_nf4_bytes'])} vs {_mib(m['linear_fp16_bytes'])} MiB); "
                      f"whole tiny model {m['model_ratio']:.3f}× (embeddings, head and norms stay 16-bit)."]
    return "\n".join(lines) + "\n"


def render_verdicts(verdict: dict) -> list[str]:
    lines = []
    claim = verdict.get("surm_beats_matched_baselines")
    if claim:
        lines += ["", f"**Claim: at a matched budget the best SURM variant beats LoRA r=1, LoKr and C3A by more than the "
                      f"seed spread — {'holds' if claim['holds'] else 'does not hold'}** (best SURM: "
                      f"{claim['best_surm']}, {claim['params']:,} params; margin = baseline loss − SURM loss):", ""]
        for baseline, check in claim["checks"].items():
            lines.append(f"- vs {baseline} ({check['params']:,} params): margin {check['margin']:+.3f}, "
                         f"spread {check['spread']:.3f} → {'beats' if check['beats'] else 'does not beat'}")
    qlora = verdict.get("qlora_matches_lora")
    if qlora:
        lines += ["", f"**Claim: QLoRA matches 16-bit LoRA within the seed spread — "
                      f"{'holds' if qlora['holds'] else 'does not hold'}** (|gap| {qlora['gap']:.4f}, "
                      f"spread {qlora['spread']:.4f})."]
    return lines


def _short(value):
    return round(value, 4) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- 100M timing mode


LLAMA_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)


def long_rows(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(70)]
        rows.append([{"role": "user", "content": "Reverse the word order: " + " ".join(words)},
                     {"role": "assistant", "content": " ".join(reversed(words))}])
    return rows


def timing_100m(args) -> dict:
    """QLoRA vs 16-bit LoRA on a random-init Llama-style model of >= 100M parameters: peak memory, steps/s."""
    rows = long_rows(256)
    report = {"config": {**LLAMA_100M, "device": args.device, "steps": args.steps, "batch_size": 8, "max_length": 512},
              "runs": {}}
    with tempfile.TemporaryDirectory(prefix="dpsel-100m-") as tmp:
        save_model(build_tiny_model(seed=0, **LLAMA_100M), ByteTokenizer(), tmp)
        for label in args.methods or ["lora", "lora+ckpt", "qlora", "surm-circulant", "qsurm-circulant"]:
            method, checkpointing = label.removesuffix("+ckpt"), label.endswith("+ckpt")
            model, tokenizer = load_model(tmp, quant="nf4" if needs_4bit(method) else None, device=args.device)
            base_bytes, linear_bytes = model_memory_bytes(model), _linear_weight_bytes(model)
            if checkpointing:  # what the 4-bit methods get from prepare_model_for_kbit_training, for a fair memory match
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            torch.manual_seed(0)
            model = build_adapter(model, method, r=8)
            trainable, total = count_parameters(model)
            config = TrainConfig(max_steps=args.steps, learning_rate=1e-4, per_device_train_batch_size=8, max_length=512,
                                 use_cpu=args.device == "cpu")
            result = train(model, tokenizer, rows, config=config, progress=False)
            run = {"trainable_params": trainable, "total_params": total, "base_weight_bytes": base_bytes,
                   "linear_weight_bytes": linear_bytes,
                   "peak_memory_bytes": result.peak_memory_bytes, "memory_measure": result.memory_measure,
                   "steps_per_second": 1 / statistics.median(result.step_seconds[2:]),  # past the warm-up steps
                   "optimizer": result.optimizer,
                   "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
                   "final_loss": result.train_loss}
            report["runs"][label] = run
            log(f"{label}: {json.dumps(run)}")
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return report


def render_100m(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# QLoRA vs 16-bit LoRA timing, random-init Llama ({cfg['num_hidden_layers']} layers, hidden "
             f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}), {cfg['device']}, batch {cfg['batch_size']} × "
             f"{cfg['max_length']} tokens max, {cfg['steps']} steps", "",
             "| method | total params | trainable | base weights MiB | of which linear layers MiB | peak memory MiB | steps/s | grad ckpt | optimizer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for method, r in report["runs"].items():
        lines.append(f"| {method} | {r['total_params']:,} | {r['trainable_params']:,} | {_mib(r['base_weight_bytes'])} | "
                     f"{_mib(r['linear_weight_bytes'])} | "
                     f"{_mib(r['peak_memory_bytes'])} | {r['steps_per_second']:.2f} | {r['gradient_checkpointing']} | "
                     f"{r['optimizer']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one lr per method, fewer steps and rows")
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the main methods (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default 150, quick 100; 100m mode 30)")
    parser.add_argument("--pretrain-seconds", type=float, default=None, help="base pretraining (default 120, quick 40)")
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=None,
                        help="comma-separated labels (e.g. lora-r8,surm-circulant); default all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny matrices: 1 is fastest)")
    parser.add_argument("--model-size", choices=["tiny", "100m"], default="tiny")
    parser.add_argument("--no-extras", action="store_true", help="skip the FFT and 4-bit memory measurements")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 2)
    default_steps = 30 if args.model_size == "100m" else (100 if args.quick else 150)
    args.steps = args.steps or default_steps
    args.pretrain_seconds = args.pretrain_seconds or (40 if args.quick else 120)
    return args


def _write(out: Path, stem: str, report: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=_short) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.model_size == "100m":
        report = timing_100m(args)
        report["seconds"] = time.perf_counter() - started
        _write(args.out, "tune-100m", report, render_100m(report))
        return 0

    specs = [s for s in SPECS if args.methods is None or s.label in args.methods]
    unknown = set(args.methods or []) - {s.label for s in SPECS}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {', '.join(s.label for s in SPECS)}")
    n_train, n_val, n_test = (400, 48, 80) if args.quick else (800, 96, 160)
    data = adaptation_data(n_train, n_val, n_test)
    base_dir, base_info = pretrained_base(args.cache, args.pretrain_seconds, args.device)
    config = {"steps": args.steps, "seeds": args.seeds, "quick": args.quick, "device": args.device,
              "threads": args.threads, "n_train": n_train, "n_val": n_val, "n_test": n_test,
              "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH, "pretrain_tasks": PRETRAIN_TASKS,
              "adapt_tasks": ADAPT_TASKS, "python": platform.python_version(), "torch": torch.__version__}

    def write_partial(results: dict) -> None:  # an interrupted run still leaves what it measured
        partial = {"config": config, "base": base_info, "methods": results, "partial": True,
                   "seconds": time.perf_counter() - started}
        _write(args.out, "tune", partial, render_markdown(partial))

    results = sweep_and_seed(specs, args, base_dir, data, on_result=write_partial)
    best_surm = extra_seeds_for_best_surm(results, args, base_dir, data)
    report = {
        "config": config,
        "base": base_info,
        "methods": results,
        "step_time": step_time_ratios(specs, args, base_dir, data),
        "verdicts": verdicts(results, best_surm),
    }
    if not args.no_extras:
        report["fft_vs_dense"] = fft_vs_dense()
        report["four_bit_memory"] = four_bit_memory(base_dir)
    report["seconds"] = time.perf_counter() - started
    _write(args.out, "tune", report, render_markdown(report))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
