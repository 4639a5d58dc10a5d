"""Selection benchmark, runs: every method (`dpsel.select`), its same-run ablations and the cheap peers on one
seed's data, the kept set at the budget by the product's rule, and the downstream trainings on the kept sets."""
from __future__ import annotations

import json
import time

import numpy as np

from dpsel.curation.rules import SelectionRule, apply_rule

# name -> (select() method, SelectConfig field overrides, extra overrides)
VARIANTS = {
    "bads": ("bads", {}, {}),
    "bads-paper": ("bads", {"variant": "paper"}, {}),
    "bads-amortized": ("bads", {"weight_param": "amortized"}, {}),
    "bads-no-eb": ("bads", {}, {"eb_prior": False}),
    "bads-base-anchor": ("bads", {}, {"anchor": "base"}),
    "bads-no-group-norm": ("bads", {}, {"centre_losses": "global"}),
    "bads-plain-sgld": ("bads", {}, {"precondition": False, "lr_theta": 1e-5}),
    "bads-visits": ("bads", {}, {"posterior_pass": False}),  # ablation: weights from visits only (the old form)
    "bads-lm": ("bads", {}, {"theta_space": "lm"}),   # θ = the LM's parameters even where the embedder loads
    # ablations as their own runs (θ trained under that prior): the prior concentration before issue 13's second
    # session, and the whole default before it (no group consistency, κ = 6)
    "bads-kappa6": ("bads", {}, {"kappa": 6.0}),
    "bads-previous-default": ("bads", {}, {"group_consistency": False, "kappa": 6.0}),
    "l2rw": ("l2rw", {}, {}),
    "loss": ("loss", {}, {}),
    "ifd": ("ifd", {}, {}),
    "rds": ("rds", {}, {}),
    "random": ("random", {}, {}),
    "all": ("all", {}, {}),
}
DEFAULT_METHODS = "bads,loss,rds,bads-paper,random"


def auroc_report(weights: np.ndarray, kinds: np.ndarray) -> dict:
    from dpsel.curation.truth import auroc_by_kind
    return auroc_by_kind(kinds, weights)  # every planted kind present


def kept_mask(weights: np.ndarray, budget: float) -> np.ndarray:
    """The top `budget` fraction by weight, by the product's rule (`dpsel.curation.rules`): the count rounds
    half up (`budget_count`) and equal weights go to the earlier row."""
    return apply_rule(SelectionRule(budget=budget), weights, np.ones(len(weights), dtype=bool))


def run_method(name: str, data: dict, args, progress_every: float = 30.0) -> dict:
    from dpsel.select import select
    from dpsel.select.base import SelectConfig
    method, fields, extra = VARIANTS[name]
    # ablations: bads's same-run ablation rows (`name[alt]`), which a product run does not compute
    extra = dict(extra, measure_plain_steps=args.plain_steps, ablations=True, **json.loads(args.extra))
    config = SelectConfig(model=args.model_path, device=args.device, seed=args.seed, steps=args.steps,
                          batch_size=args.batch_size, meta_batch_size=args.meta_batch_size,
                          max_length=args.max_length, extra=extra, **fields)
    last = [time.perf_counter()]
    def progress(step, total, diag):
        if time.perf_counter() - last[0] > progress_every:
            last[0] = time.perf_counter()
            shown = {k: round(v, 3) for k, v in diag.items() if isinstance(v, float)}
            print(f"  [{name}] {step}/{total} {shown}", flush=True)
    started = time.perf_counter()
    from peft_train.memory import PeakMemory
    with PeakMemory(args.device) as memory:
        groups = None if data["tasks"] is None else list(data["tasks"])
        scores = select(data["train"], data["meta"], method, config, progress, groups=groups)
    seconds = time.perf_counter() - started
    w = scores.weight_mean
    keep = np.ones(len(w), dtype=bool) if name == "all" else kept_mask(w, args.budget)
    clean = data["kinds"] == "clean"
    result = {"method": name, "seconds": seconds, "peak_memory_bytes": int(memory.delta),
              "memory_measure": "cuda_max_allocated" if args.device.startswith("cuda") else "rss_peak_delta",
              "timings": {k: float(v) for k, v in scores.timings.items()},
              "kept": int(keep.sum()), "precision_kept": float(clean[keep].mean()),
              "recall_clean": float(keep[clean].mean())}
    if scores.coverage:
        result["coverage"] = scores.coverage
    if name != "all":
        result["auroc"] = auroc_report(w, data["kinds"])
    # Ablations the same bads run produced (per-task ranks, as `loss` ranks its reference losses).
    from dpsel.select.ranks import rank_normalise
    result["_alternatives"] = {f"{name}[{alt}]": rank_normalise(v, data["tasks"]) for alt, v in scores.alternatives.items()}
    result["_keep"] = keep
    print(f"{name}: {json.dumps({k: v for k, v in result.items() if not k.startswith('_')}, default=float)}", flush=True)
    return result


def score_result(name: str, weights: np.ndarray, seconds: float, data: dict, args) -> dict:
    """The same record as `run_method` for scores computed outside `select` (peers, ablations)."""
    keep = kept_mask(weights, args.budget)
    clean = data["kinds"] == "clean"
    result = {"method": name, "seconds": seconds, "peak_memory_bytes": 0, "memory_measure": "not measured",
              "timings": {}, "kept": int(keep.sum()), "precision_kept": float(clean[keep].mean()),
              "recall_clean": float(keep[clean].mean()), "auroc": auroc_report(weights, data["kinds"]), "_keep": keep}
    print(f"{name}: {json.dumps(result['auroc'])}", flush=True)
    return result


def all_peers() -> dict:
    from peers import PEERS
    from peers_rules import PEERS as RULE_PEERS
    from peers_text import PEERS as TEXT_PEERS
    return {**PEERS, **TEXT_PEERS, **RULE_PEERS}


def run_peer(name: str, data: dict, args) -> dict:
    PEERS = all_peers()
    started = time.perf_counter()
    scores = PEERS[name](data, args.seed)
    return score_result(name, np.asarray(scores, dtype=np.float64), time.perf_counter() - started, data, args)


def downstream(name: str, keep: np.ndarray, data: dict, args) -> dict:
    """Train the base (random-init or pretrained tiny) on the kept rows, the same steps for every arm; eval on the
    clean test set."""
    import torch
    from peft_train.adapters import build_adapter
    from peft_train.models import load_model
    from peft_train.training import TrainConfig, evaluate, train
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_path, device="cpu")
    model = build_adapter(model, "full")
    rows = [m for m, k in zip(data["train"], keep) if k]
    config = TrainConfig(max_steps=args.train_steps, learning_rate=args.train_lr, per_device_train_batch_size=16,
                         max_length=args.max_length, seed=args.seed, use_cpu=True, max_new_tokens=24)
    started = time.perf_counter()
    result = train(model, tokenizer, rows, config=config, progress=False)
    metrics = evaluate(model, tokenizer, data["test"], max_new_tokens=24, max_length=args.max_length)
    out = {"arm": name, "rows": len(rows), "train_seconds": time.perf_counter() - started,
           "train_loss": result.train_loss, "eval_loss": metrics["eval_loss"],
           "eval_exact_match": metrics.get("eval_exact_match")}
    print(f"downstream {name}: {out}", flush=True)
    return out


def run_seed(names: list[str], peers: list[str], data: dict, args) -> dict:
    """Every method, its same-run ablations and every peer on one seed's data."""
    results = []
    for name in names:
        result = run_method(name, data, args)
        results.append(result)
        results += [score_result(alt, w, 0.0, data, args) for alt, w in result["_alternatives"].items()]
    results += [run_peer(peer, data, args) for peer in peers]
    report = {"seed": args.seed, "dedup": data["dedup"],
              "methods": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results], "downstream": []}
    if args.train_steps and args.model_size == "tiny":
        clean = data["kinds"] == "clean"
        arms = [("all rows", np.ones(len(clean), dtype=bool)), ("oracle (clean only)", clean)]
        arms += [(f"{r['method']} curated", r["_keep"]) for r in results
                 if r["method"] in args.downstream_methods.split(",")]
        report["downstream"] = [downstream(arm, keep, data, args) for arm, keep in arms]
    return report
