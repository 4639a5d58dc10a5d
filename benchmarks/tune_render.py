"""Tuning benchmark, rendering: the Markdown of a tune report and of the 100M timing mode. Reads only the saved
report (its config names the tasks, batch and base), so it re-renders a committed JSON."""
from __future__ import annotations

from stats import DASH, mib, plus_minus, table


def render_markdown(report: dict) -> str:
    cfg, tiny = report["config"], report["base"]["recipe"]["config"]
    lines = [
        "# Fine-tuning methods on the tiny model",
        "",
        *(["**Partial run** (interrupted or still running): only the methods below were measured.", ""]
          if report.get("partial") else []),
        f"Base: tiny Llama ({tiny['num_hidden_layers']} layers, hidden {tiny['hidden_size']}) pretrained "
        f"{report['base']['steps']} steps (~{report['base']['recipe']['seconds']:.0f} s) on "
        f"{', '.join(cfg['pretrain_tasks'])} + generic text. Adaptation: {cfg['steps']} steps, batch {cfg['batch_size']}, on the "
        f"unseen families {', '.join(cfg['adapt_tasks'])} ({cfg['n_train']} rows); lr picked on {cfg['n_val']} validation rows, "
        f"scored on {cfg['n_test']} test rows. Device {cfg['device']}, {cfg['threads']} thread(s), "
        f"{report['seconds'] / 60:.1f} min in all.",
        "",
    ]
    timing = report.get("step_time", {})
    ranked = sorted(report["methods"].items(), key=lambda kv: kv[1]["test_loss_mean"])
    lines += table(["method", "trainable params", "best lr", "test eval loss (mean ± sd)", "seeds", "exact match",
                    "step time ×LoRA r=8", "peak memory MiB"],
                   [[label, f"{r['trainable_params']:,}", f"{r['best_lr']:g}",
                     plus_minus(r["test_loss_mean"], r["test_loss_sd"]), len(r["seeds"]), f"{r['exact_match_mean']:.2f}",
                     f"{timing[label]['ratio']:.2f}" if label in timing else DASH, mib(r["peak_memory_bytes"])]
                    for label, r in ranked], align="lrrrrrrr")
    measure = next(iter(report["methods"].values()))["memory_measure"]
    lines += ["", f"Peak memory: {measure} (on CPU: weights + gradients + optimizer state + the largest set of "
                  "activations saved for backward; 4-bit runs use gradient checkpointing).", ""]
    tasks = cfg["adapt_tasks"]
    lines += ["Per-task test eval loss (exact match in brackets):", ""]
    lines += table(["method", *tasks],
                   [[label, *(f"{r['per_task_loss'][t]:.3f} ({r['per_task_exact_match'][t]:.2f})" for t in tasks)]
                    for label, r in ranked], align="l" + "r" * len(tasks))
    if all(r["exact_match_mean"] == 0 for r in report["methods"].values()):
        lines += ["", "Greedy exact match is 0 for every method and task: it does not discriminate at this scale, "
                      "so the comparison rests on eval loss."]
    lines += render_verdicts(report.get("verdicts", {}))
    if report.get("fft_vs_dense"):
        lines += ["", "FFT product vs materialising ΔW (forward + backward of ΔW x, "
                      f"{report['fft_vs_dense'][0]['tokens']} tokens, fp32 CPU, one thread). Dense = the layer's own "
                      "`get_delta_weight()` (what merging uses) then a matmul; for the circulant that multiplies two "
                      "n × n circulants (O(n³)), so its ratio is larger than against an O(n²) materialisation.", "",
                  *table(["structure", "d", "FFT ms", "dense ms", "dense / FFT"],
                         [[row["structure"], row["d"], f"{row['fft_ms']:.1f}", f"{row['dense_ms']:.1f}",
                           f"{row['dense_over_fft']:.1f}"] for row in report["fft_vs_dense"]], align="lrrrr")]
    if report.get("four_bit_memory"):
        m = report["four_bit_memory"]
        lines += ["", f"Base-weight memory, 4-bit NF4 (double quant) vs fp16: quantised linear layers "
                      f"{m['linear_ratio']:.3f}× ({mib(m['linear_nf4_bytes'])} vs {mib(m['linear_fp16_bytes'])} MiB); "
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


def render_100m(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# QLoRA vs 16-bit LoRA timing, random-init Llama ({cfg['num_hidden_layers']} layers, hidden "
             f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}), {cfg['device']}, batch {cfg['batch_size']} × "
             f"{cfg['max_length']} tokens max, {cfg['steps']} steps", ""]
    lines += table(["method", "total params", "trainable", "base weights MiB", "of which linear layers MiB",
                    "peak memory MiB", "steps/s", "grad ckpt", "optimizer"],
                   [[method, f"{r['total_params']:,}", f"{r['trainable_params']:,}", mib(r["base_weight_bytes"]),
                     mib(r["linear_weight_bytes"]), mib(r["peak_memory_bytes"]), f"{r['steps_per_second']:.2f}",
                     r["gradient_checkpointing"], r["optimizer"]] for method, r in report["runs"].items()],
                   align="lrrrrrrll")
    return "\n".join(lines) + "\n"
