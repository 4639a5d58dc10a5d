"""Tuning benchmark, runs: each configuration's lr sweep and seeds, the step-time ratios, FFT vs dense ΔW, the
4-bit memory, and the 100M-parameter QLoRA timing mode."""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from peft_train.adapters import build_adapter, count_parameters, needs_4bit
from peft_train.memory import model_memory_bytes
from peft_train.models import build_tiny_model, load_model, save_model
from peft_train.tokenizer import ByteTokenizer
from peft_train.training import TrainConfig, evaluate, train
from stats import mean, ratio, sd
from tune_data import (BATCH_SIZE, LLAMA_100M, LR_GRID, MAIN, MAX_LENGTH, QUICK_LR, SPECS, AdaptData, Spec, log,
                       long_rows)
from tune_summary import summarise

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
        entry["test_loss_mean"] = mean(entry["test_losses"])
        entry["test_loss_sd"] = sd(entry["test_losses"])
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
    return {label: {"ms_per_step": 1000 * statistics.median(v), "ratio": ratio(statistics.median(v), reference)}
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


# ----------------------------------------------------------------------------- 100M timing mode


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
