"""Tuning benchmark, summary: one configuration's runs as mean ± sd over seeds, and the verdicts on the claims
(best SURM vs the matched baselines, QLoRA vs 16-bit LoRA)."""
from __future__ import annotations

from stats import mean, sd

MATCHED_BASELINES = ["lora-r1", "lokr", "c3a"]


def summarise(spec, sweep: list[dict], runs: list[dict]) -> dict:
    """`spec` (a tune_data.Spec): its lr `sweep` records and its `runs` at the best lr (one per seed)."""
    losses = [r["test_loss"] for r in runs]
    tasks = sorted(runs[0]["per_task"])
    return {
        "method": spec.method, "r": spec.r, "trainable_params": runs[0]["trainable_params"],
        "total_params": runs[0]["total_params"],
        "lr_sweep": {f"{r['lr']:g}": r["val_loss"] for r in sweep}, "best_lr": runs[0]["lr"],
        "seeds": [r["seed"] for r in runs], "test_losses": losses,
        "test_loss_mean": mean(losses), "test_loss_sd": sd(losses),
        "exact_match_mean": mean(r["exact_match"] for r in runs),
        "per_task_loss": {t: mean(r["per_task"][t]["eval_loss"] for r in runs) for t in tasks},
        "per_task_exact_match": {t: mean(r["per_task"][t]["eval_exact_match"] for r in runs) for t in tasks},
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "memory_measure": runs[0]["memory_measure"],
        "train_seconds": mean(r["seconds"] for r in runs),
    }


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
