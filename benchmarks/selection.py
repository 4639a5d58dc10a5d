"""Selection benchmark: how well each method finds the planted corruptions of `dpsel synth`, what training on
its curated set buys downstream, and what a step costs. Not a test; writes results/selection.{json,md}.

    python benchmarks/selection.py                         # CPU, tiny model, 3,000 rows, every method
    python benchmarks/selection.py --base random            # the same from a random-init tiny model
    python benchmarks/selection.py --device cuda --model-size base --methods bads --rows 2000
        # a random-init ~100M-parameter Llama (hidden 768 × 12 layers, ~113M) on a 4-bit NF4 base + LoRA:
        # steps/s and peak GPU memory of bads vs a plain step

`--base pretrained` (default) first pretrains the tiny model on a clean `dpsel.synth.make_rows` corpus drawn with
another seed, every task family, no prompt shared with the benchmark's train/meta/test rows (cached under
benchmarks/cache/, keyed by its settings): it stands in for the pretrained LLM a real user curates with.
Selection and the downstream trainings all start from that base.

Duplicates are exact copies, removed by dedup before selection (as `dpsel curate` does), so they are reported as
handled by dedup rather than scored. AUROC: clean = positive, higher weight = cleaner.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
KINDS = ("wrong", "swapped", "garbage", "truncated", "refusal")
DEFAULT_PEERS = "quality-clf,dsir,task-disagreement"
TEXT_PEERS = "qa-cosine,rds-embed,char-lm,fasttext,quality-clf"


def auroc_report(weights: np.ndarray, kinds: np.ndarray) -> dict:
    from dpsel.curation.truth import auroc_by_kind
    return auroc_by_kind(kinds, weights, KINDS)


def kept_mask(weights: np.ndarray, budget: float, seed: int) -> np.ndarray:
    """The top `budget` fraction by weight (ties broken by a seeded shuffle, so `all` keeps a random 70%...
    no: `all` keeps everything, see caller)."""
    order = np.lexsort((np.random.default_rng(seed).random(len(weights)), -weights))
    keep = np.zeros(len(weights), dtype=bool)
    keep[order[: int(round(budget * len(weights)))]] = True
    return keep


def load_rows(path: Path):
    from dpsel.data import alpaca_to_messages
    table = pd.read_parquet(path)
    return [alpaca_to_messages(r.instruction, r.output, r.input) for r in table.itertuples()], table


def make_data(args, workdir: Path):
    """One seed's rows: synth (with or without its task column) or the docstring real-text set (no task column)."""
    from dpsel.data import row_id
    if args.dataset == "realtext":
        from realtext import write
        paths = write(workdir, rows=args.rows, noise=args.noise, meta_rows=args.meta_rows, test_rows=args.test_rows,
                      seed=args.seed)
    else:
        from dpsel.synth import generate
        paths = generate(workdir, rows=args.rows, noise=args.noise, seed=args.seed, meta_rows=args.meta_rows,
                         test_rows=args.test_rows)
    train, train_table = load_rows(paths["train"])
    meta, _ = load_rows(paths["meta"])
    test, test_table = load_rows(paths["test"])
    truth = pd.read_parquet(paths["truth"])
    ids = [row_id(m) for m in train]
    first = ~pd.Series(ids).duplicated().to_numpy()  # dedup: first occurrence kept
    dup_kinds = truth.kind.to_numpy()[~first]
    has_tasks = args.dataset == "synth"
    data = {"train": [m for m, k in zip(train, first) if k], "meta": meta, "test": test,
            "tasks": train_table.task.to_numpy()[first] if has_tasks else None, "kinds": truth.kind.to_numpy()[first],
            "test_tasks": test_table.task.tolist() if has_tasks else None,
            "dedup": {"removed": int((~first).sum()), "removed_that_are_duplicates": int((dup_kinds == "duplicate").sum()),
                      "duplicates_planted": int((truth.kind == "duplicate").sum())}}
    return data


def run_method(name: str, data: dict, args, progress_every: float = 30.0) -> dict:
    from dpsel.select import select
    from dpsel.select.base import SelectConfig
    method, fields, extra = VARIANTS[name]
    extra = dict(extra, measure_plain_steps=args.plain_steps, **json.loads(args.extra))
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
    keep = np.ones(len(w), dtype=bool) if name == "all" else kept_mask(w, args.budget, args.seed)
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
    keep = kept_mask(weights, args.budget, args.seed)
    clean = data["kinds"] == "clean"
    result = {"method": name, "seconds": seconds, "peak_memory_bytes": 0, "memory_measure": "not measured",
              "timings": {}, "kept": int(keep.sum()), "precision_kept": float(clean[keep].mean()),
              "recall_clean": float(keep[clean].mean()), "auroc": auroc_report(weights, data["kinds"]), "_keep": keep}
    print(f"{name}: {json.dumps(result['auroc'])}", flush=True)
    return result


def all_peers() -> dict:
    from peers import PEERS
    from peers_text import PEERS as TEXT_PEERS
    return {**PEERS, **TEXT_PEERS}


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


def build_sized_model(size: str, workdir: Path) -> str:
    """`tiny` as is; `base`: a random-init Llama of hidden 768 × 12 layers, MLP 3072 (~113M params) saved for 4-bit loading."""
    if size == "tiny":
        return "tiny"
    from peft_train.models import build_tiny_model, save_model
    from peft_train.tokenizer import ByteTokenizer
    sizes = {"base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12),
             "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=16)}
    model = build_tiny_model(seed=0, **sizes[size])
    params = sum(p.numel() for p in model.parameters())
    print(f"model {size}: {params / 1e6:.1f}M parameters", flush=True)
    path = workdir / f"model-{size}"
    save_model(model, ByteTokenizer(), path)
    return str(path)


def benchmark_prompts(workdir: Path) -> set[tuple[str, str]]:
    """(instruction, input) of every train/meta/test row, which the pretraining corpus must not contain."""
    prompts = set()
    for name in ("train", "meta", "test"):
        table = pd.read_parquet(workdir / f"{name}.parquet")
        prompts.update(zip(table.instruction, table.input))
    return prompts


def pretraining_rows(args, exclude: set[tuple[str, str]]) -> list:
    from dpsel.data import alpaca_to_messages
    from dpsel.synth import make_rows
    rows = make_rows(args.pretrain_rows, rng=args.pretrain_seed)
    kept = [r for r in rows if (r["instruction"], r["input"]) not in exclude]
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in kept]


def pretrain_settings(args, exclude: set[tuple[str, str]]) -> dict:
    import hashlib
    digest = hashlib.sha256("\n".join(sorted("\t".join(p) for p in exclude)).encode()).hexdigest()[:16]
    return {"rows": args.pretrain_rows, "seed": args.pretrain_seed, "steps": args.pretrain_steps,
            "seconds": args.pretrain_seconds, "lr": args.pretrain_lr, "batch_size": args.pretrain_batch_size,
            "max_length": args.max_length, "excluded_prompts": digest, "model": "tiny", "version": 2}


def pretrain_tiny(rows: list, settings: dict, device: str) -> tuple[object, dict]:
    """Full fine-tune of the random-init tiny model on `rows` with peft_train's `pretrain` (Trainer: AdamW,
    2% warmup then cosine over `steps`), stopped early when `seconds` run out (the bound on CPU; a GPU finishes)."""
    import math
    import torch
    from peft_train.models import build_tiny_model
    from peft_train.tokenizer import ByteTokenizer
    from peft_train.training import TrainConfig, pretrain
    torch.manual_seed(settings["seed"])
    tokenizer, model = ByteTokenizer(), build_tiny_model(seed=0)
    config = TrainConfig(max_steps=settings["steps"], learning_rate=settings["lr"], warmup_steps=0.02,
                         per_device_train_batch_size=settings["batch_size"], max_length=settings["max_length"],
                         seed=settings["seed"], use_cpu=device == "cpu", log_every=500)
    result = pretrain(model, tokenizer, rows, config, seconds=settings["seconds"], progress=True)
    info = {"steps_done": result.steps, "epochs": math.ceil(result.epochs), "seconds": result.seconds,
            "device": device, "final_loss": float(np.mean(result.losses[-100:])), "rows": result.n_rows}
    return model.cpu().eval(), info


def pretrained_base(args, synth_dir: Path) -> str:
    """The cached pretrained tiny base for these settings, pretrained now if absent; returns its directory."""
    import hashlib
    from peft_train.models import save_model
    from peft_train.tokenizer import ByteTokenizer
    exclude = benchmark_prompts(synth_dir)
    settings = pretrain_settings(args, exclude)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.cache) / f"pretrained-tiny-{key}"
    done = path / "pretrain.json"
    if done.is_file():
        args.pretrain_info = json.loads(done.read_text())
        print(f"pretrained base: reusing {path}", flush=True)
        return str(path)
    rows = pretraining_rows(args, exclude)
    print(f"pretraining the tiny base on {len(rows)} clean rows (seed {args.pretrain_seed})", flush=True)
    model, info = pretrain_tiny(rows, settings, args.pretrain_device)
    save_model(model, ByteTokenizer(), path)
    args.pretrain_info = {"settings": settings, **info}
    done.write_text(json.dumps(args.pretrain_info, indent=2) + "\n")
    print(f"pretrained base: {path} {info}", flush=True)
    return str(path)


def target_checks(report: dict) -> list[str]:
    """The brief's targets, checked against this run's numbers (met or missed, nothing hidden)."""
    by = {r["method"]: r for r in report["methods"]}
    notes = ["## Targets (checked automatically)", ""]
    def line(ok, text):
        notes.append(f"- {'met' if ok else 'MISSED'}: {text}")
    bads = by.get("bads")
    if bads:
        au = bads["auroc"]
        line(au["overall"] >= 0.95, f"bads overall AUROC ≥ 0.95 (got {au['overall']:.3f})")
        worst = min(KINDS, key=lambda k: au.get(k, 1.0))
        line(au[worst] >= 0.90, f"bads ≥ 0.90 on every corruption kind (worst: {worst} {au[worst]:.3f})")
        if "loss" in by:
            line(au["overall"] > by["loss"]["auroc"]["overall"],
                 f"bads above the loss baseline overall ({au['overall']:.3f} vs {by['loss']['auroc']['overall']:.3f})")
        ratio = bads["timings"].get("step_ratio_vs_plain")
        if ratio:
            line(ratio <= 1.5, f"bads step ≤ 1.5× a plain step (got {ratio:.2f}×)")
    down = {d["arm"]: d for d in report.get("downstream", [])}
    if "bads curated" in down and "all rows" in down and "oracle (clean only)" in down:
        cur, full, oracle = (down[k]["eval_loss"] for k in ("bads curated", "all rows", "oracle (clean only)"))
        line(cur < full, f"curated eval loss below the full set's ({cur:.3f} vs {full:.3f})")
        line(cur <= 1.05 * oracle, f"curated eval loss within 5% of the oracle's ({(cur / oracle - 1) * 100:+.1f}%)")
    return notes


def fmt(v, digits=3):
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(report: dict) -> str:
    a = report["args"]
    base = a.get("base", "random") if a["model_size"] == "tiny" else "random"
    if base == "pretrained" and report.get("pretrain"):
        p = report["pretrain"]
        base_text = (f"Base: the tiny model **pretrained** for {p['steps_done']} steps ({p['epochs']} epochs, "
                     f"{p['seconds']:.0f} s on {p['device']}, final loss {p['final_loss']:.3f}) on {p['rows']} clean "
                     f"`make_rows` rows drawn with seed {p['settings']['seed']}, prompt-disjoint from this benchmark's "
                     "rows: a stand-in for the pretrained LLM a real user curates with (the random-init tiny model "
                     "cannot tell an arithmetic slip from a right answer). Selection and downstream start from it.")
    else:
        base_text = "Base: the tiny model at **random init** (no pretraining)."
    lines = [f"## Selection benchmark, {base} base", "", base_text, "",
             f"`dpsel synth` data: {a['rows']} training rows, {a['noise']:.0%} corrupted, {a['meta_rows']} meta rows, "
             f"model `{a['model_size']}` on `{a['device']}`, {a['steps']} selection steps, seed {a['seed']}. "
             f"Dedup removed {report['dedup']['removed']} rows before selection "
             f"({report['dedup']['removed_that_are_duplicates']} of {report['dedup']['duplicates_planted']} planted "
             f"duplicates): duplicates are handled by dedup, so they are not scored.", "",
             "AUROC of the posterior mean weights against the truth (clean = positive), overall and per corruption "
             f"kind; precision = fraction clean among the kept rows at budget {a['budget']}; step ratio = seconds per "
             "selection step / seconds per plain training step on the same batch size, measured in the same process.",
             "", "| method | AUROC | " + " | ".join(KINDS) + " | precision@budget | step ratio | s/step | total s | peak mem MB |",
             "|---|" + "---|" * (len(KINDS) + 6)]
    for r in report["methods"]:
        au = r.get("auroc", {})
        t = r["timings"]
        lines.append(f"| {r['method']} | {fmt(au.get('overall'))} | " + " | ".join(fmt(au.get(k)) for k in KINDS)
                     + f" | {fmt(r['precision_kept'])} | {fmt(t.get('step_ratio_vs_plain'), 2)} | "
                       f"{fmt(t.get('seconds_per_step'), 3)} | {fmt(r['seconds'], 1)} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    if report.get("downstream"):
        lines += ["", f"Downstream: the base model (full fine-tune) trained {a['train_steps']} steps on each set, evaluated on the clean "
                  "test set (exact match = greedy answer equals the reference).", "",
                  "| trained on | rows | eval loss | exact match | vs oracle loss |", "|---|---|---|---|---|"]
        oracle = next((d["eval_loss"] for d in report["downstream"] if d["arm"] == "oracle (clean only)"), None)
        for d in report["downstream"]:
            rel = f"{(d['eval_loss'] / oracle - 1) * 100:+.1f}%" if oracle else "–"
            lines.append(f"| {d['arm']} | {d['rows']} | {fmt(d['eval_loss'])} | {fmt(d['eval_exact_match'])} | {rel} |")
    if report.get("notes"):
        lines += ["", *report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synth", choices=("synth", "synth-notask", "realtext"),
                        help="synth (with its task column), synth without it, or the docstring real-text set "
                             "(benchmarks/realtext.py); results go to selection[-DATASET].{json,md}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--meta-rows", type=int, default=200)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=None, help="selection steps (bads, l2rw); default: the method's")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--model-size", default="tiny", choices=("tiny", "base", "large"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--plain-steps", type=int, default=8, help="plain steps timed for the cost ratio")
    parser.add_argument("--train-steps", type=int, default=400, help="downstream training steps (0: skip)")
    parser.add_argument("--train-lr", type=float, default=2e-3)
    parser.add_argument("--downstream-methods", default="bads,loss")
    parser.add_argument("--extra", default="{}", help="JSON merged into SelectConfig.extra for every method")
    parser.add_argument("--seed", type=int, default=0, help="one data seed (see --seeds)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of data seeds; every figure is mean ± sd over them")
    parser.add_argument("--peers", default=DEFAULT_PEERS,
                        help="comma list of the cheap peers in benchmarks/peers.py run on the same data")
    parser.add_argument("--base", default="pretrained", choices=("pretrained", "random"),
                        help="tiny model only: pretrain it on clean synth rows first (cached), or start random-init")
    parser.add_argument("--pretrain-seconds", type=float, default=150.0, help="wall-clock bound on pretraining")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-rows", type=int, default=20000)
    parser.add_argument("--pretrain-seed", type=int, default=1001, help="must differ from --seed")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument("--pretrain-device", default="cpu")
    parser.add_argument("--pretrain-only", action="store_true", help="build the cached base and stop")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / "cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--merge", default=None,
                        help="comma list of selection.json files from runs on disjoint seeds (same settings): "
                             "combine their per-seed results into one report under --out, run nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_reports([Path(p) for p in args.merge.split(",")], Path(args.out))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(VARIANTS)}")
    PEERS = all_peers()
    if args.dataset != "synth":  # no task column: task-disagreement has nothing to read; no synth base to pretrain
        args.peers = args.peers if args.peers != DEFAULT_PEERS else TEXT_PEERS
        args.base = "random" if args.dataset == "realtext" else args.base
        args.train_steps = 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(set(peers) - set(PEERS))}; choose from {', '.join(PEERS)}")
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="dpsel-bench-") as tmp:
        workdir = Path(tmp)
        args.model_path = build_sized_model(args.model_size, workdir)
        if args.model_size != "tiny":
            args.extra = json.dumps({"quant": "nf4", **json.loads(args.extra)})
        args.pretrain_info = None
        for k, seed in enumerate(seeds):
            args.seed = seed
            data = make_data(args, workdir / f"{args.dataset}-{seed}")
            if k == 0 and args.model_size == "tiny" and args.base == "pretrained":
                if args.pretrain_seed in seeds:
                    parser.error("--pretrain-seed must differ from every data seed")
                args.model_path = pretrained_base(args, workdir / f"synth-{seed}")
                # θ = the whole tiny model, as for the random-init base (a directory would otherwise get LoRA)
                args.extra = json.dumps({"theta": "full", **json.loads(args.extra)})
                if args.pretrain_only:
                    return {"base": args.model_path, "pretrain": args.pretrain_info}
            per_seed.append(run_seed(names, peers, data, args))
    args.seed = seeds[0]
    report = {"args": vars(args), "seeds": seeds, "per_seed": per_seed, "summary": summarise(per_seed)}
    report["notes"] = multi_seed_targets(report["summary"])
    report["seconds"] = time.perf_counter() - started
    report["args"].pop("model_path", None)
    report["pretrain"] = report["args"].pop("pretrain_info", None)
    stem = "selection" if args.dataset == "synth" else f"selection-{args.dataset}"
    runs = saved_runs(out / f"{stem}.json")
    base = report["args"].get("base", "random") if args.model_size == "tiny" else args.model_size
    runs[f"{base}-{args.rows}"] = report
    (out / f"{stem}.json").write_text(json.dumps({"runs": runs}, indent=2, default=float) + "\n")
    (out / f"{stem}.md").write_text(full_markdown(runs))
    print(multi_seed_markdown(report))
    return report


def merge_reports(paths: list[Path], out: Path) -> dict:
    """One report from several runs with the same settings, written under --out with the first file's name.
    Disjoint seeds are appended (single-process runs side by side, to use both cores); on a seed two files share,
    their methods are joined and a method in both keeps the first file's row (a peers-only run, `--methods ''`,
    adds its peers to a committed report without touching its bads rows)."""
    merged: dict = {}
    for path in paths:
        for key, report in saved_runs(path).items():
            if "per_seed" not in report:
                continue
            if key not in merged:
                merged[key] = {**report, "per_seed": [], "seeds": []}
            _join_seeds(merged[key], report)
    for report in merged.values():
        report["summary"] = summarise(report["per_seed"])
        report["notes"] = multi_seed_targets(report["summary"])
        report["args"]["seeds"] = ",".join(map(str, report["seeds"]))
    out.mkdir(parents=True, exist_ok=True)
    target = out / paths[0].name
    runs = {**saved_runs(target), **merged}
    target.write_text(json.dumps({"runs": runs}, indent=2, default=float) + "\n")
    target.with_suffix(".md").write_text(full_markdown(runs))
    for report in merged.values():
        print(multi_seed_markdown(report))
    return merged


def _join_seeds(into: dict, report: dict) -> None:
    by_seed = {run["seed"]: run for run in into["per_seed"]}
    for run in report["per_seed"]:
        if run["seed"] not in by_seed:
            into["per_seed"].append(run)
            into["seeds"].append(run["seed"])
            continue
        have = {m["method"] for m in by_seed[run["seed"]]["methods"]}
        by_seed[run["seed"]]["methods"] += [m for m in run["methods"] if m["method"] not in have]
    into["seconds"] = max(into.get("seconds", 0), report["seconds"])


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


def _mean_sd(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarise(per_seed: list[dict]) -> list[dict]:
    """Mean ± sample sd over the seeds, per method (in the order they ran)."""
    order = list(dict.fromkeys(r["method"] for s in per_seed for r in s["methods"]))
    summary = []
    for name in order:
        rows = [r for s in per_seed for r in s["methods"] if r["method"] == name]
        entry = {"method": name, "seeds": len(rows), "precision_kept": _mean_sd([r["precision_kept"] for r in rows]),
                 "seconds": _mean_sd([r["seconds"] for r in rows])}
        if all("auroc" in r for r in rows):
            entry["auroc"] = {k: _mean_sd([r["auroc"][k] for r in rows]) for k in rows[0]["auroc"]}
        ratios = [r["timings"]["step_ratio_vs_plain"] for r in rows if "step_ratio_vs_plain" in r["timings"]]
        if ratios:
            entry["step_ratio_vs_plain"] = _mean_sd(ratios)
        if rows[0].get("coverage"):
            entry["coverage"] = [r["coverage"] for r in rows]
        summary.append(entry)
    return summary


def multi_seed_targets(summary: list[dict]) -> list[str]:
    """The issue's targets on the seed means: bads ≥ every peer (overall, each kind), bads ≥ loss + 0.02."""
    by = {e["method"]: e for e in summary if "auroc" in e}
    notes = ["Targets (checked automatically on the seed means):", ""]
    bads, loss = by.get("bads"), by.get("loss")
    if not bads:
        return notes
    others = [n for n in by if not n.startswith("bads") and n not in ("random",)]
    for key in ["overall", *KINDS]:
        if key not in bads["auroc"]:
            continue
        best = max(others, key=lambda n: by[n]["auroc"][key]["mean"], default=None)
        if best:
            b, o = bads["auroc"][key]["mean"], by[best]["auroc"][key]["mean"]
            notes.append(f"- {'met' if b >= o else 'MISSED'}: bads ≥ every other method on {key} "
                         f"(bads {b:.3f}, best other {best} {o:.3f})")
    if loss:
        gain = _paired_gain(bads, loss)
        ok = gain.mean() >= 0.02 and gain.mean() > gain.std(ddof=1 if len(gain) > 1 else 0)
        notes.append(f"- {'met' if ok else 'MISSED'}: bads ≥ loss + 0.02 AUROC overall, margin above its spread "
                     f"(paired gain {_gain_text(gain)})")
    best = max(others, key=lambda n: by[n]["auroc"]["overall"]["mean"], default=None)
    if best and best != "loss":
        gain = _paired_gain(bads, by[best])
        notes.append(f"- paired gain of bads over the best other method ({best}), overall: {_gain_text(gain)}; "
                     f"per seed {', '.join(f'{g:+.3f}' for g in gain)}")
    return notes


def _paired_gain(entry: dict, other: dict) -> np.ndarray:
    return np.asarray(entry["auroc"]["overall"]["values"]) - np.asarray(other["auroc"]["overall"]["values"])


def _gain_text(gain: np.ndarray) -> str:
    return f"{gain.mean():+.3f} ± {gain.std(ddof=1) if len(gain) > 1 else 0:.3f} over {len(gain)} seeds"


def _pm(entry: dict | None, digits: int = 3) -> str:
    return "–" if not entry else f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def multi_seed_markdown(report: dict) -> str:
    a, summary = report["args"], report["summary"]
    base = a.get("base", "random") if a["model_size"] == "tiny" else a["model_size"]
    lines = [f"## {a.get('dataset', 'synth')}: {a['rows']} rows, {base} base, seeds {', '.join(map(str, report['seeds']))}", "",
             f"`dpsel synth --rows {a['rows']} --noise {a['noise']}`, {a['meta_rows']} meta rows (the trusted set every "
             f"method and peer gets), model `{a['model_size']}` on `{a['device']}`, {a['threads']} torch thread(s), "
             f"selection run length {'--steps ' + str(a['steps']) if a['steps'] else 'the method default (epochs)'}, "
             f"extra {a['extra']}. Every figure: mean ± sample sd over the {len(report['seeds'])} data seeds. "
             "`name[alt]` rows are ablations computed from the same bads run.", "",
             "| method | AUROC | " + " | ".join(KINDS) + f" | precision@{a['budget']} | step ratio | s |",
             "|---|" + "---|" * (len(KINDS) + 4)]
    for e in summary:
        au = e.get("auroc", {})
        lines.append(f"| {e['method']} | {_pm(au.get('overall'))} | " + " | ".join(_pm(au.get(k), 2) for k in KINDS)
                     + f" | {_pm(e['precision_kept'])} | {_pm(e.get('step_ratio_vs_plain'), 2)} | "
                       f"{e['seconds']['mean']:.0f} |")
    for e in summary:
        for k, cov in enumerate(e.get("coverage", [])):
            v = cov["visits_after_burn_in"]
            lines.append(f"{'' if k else chr(10)}- {e['method']} seed {report['seeds'][k]}: {cov['steps']} steps, visits "
                         f"after burn-in min {v['min']} / median {v['median']:g} / max {v['max']}, "
                         f"{cov['rows_never_visited_after_burn_in']} rows never visited, scored by "
                         f"{cov['rows_scored_by']}")
    lines += ["", *report.get("notes", [])]
    return "\n".join(lines) + "\n"


def saved_runs(path: Path) -> dict:
    """Earlier runs kept in selection.json, one per base (a file from before bases were tracked is random-init)."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return saved["runs"] if "runs" in saved else {"random": saved}


def full_markdown(runs: dict) -> str:
    multi = [k for k in runs if "summary" in runs[k]]
    single = sorted((k for k in runs if k not in multi), key=lambda k: (k != "pretrained", k != "random", k))
    head = ["# Selection benchmark", "",
            "Newest run per (base, rows) (`python benchmarks/selection.py --base random --rows 3000 --seeds 0,1,2`); "
            "earlier single-seed runs kept below them."]
    body = [multi_seed_markdown(runs[k]) for k in sorted(multi, key=lambda k: (runs[k]["args"]["rows"], k))]
    if single:
        body += ["# Earlier single-seed runs (before issue 13)", ""] + [markdown(runs[k]) for k in single]
    return "\n".join(head) + "\n\n" + "\n".join(body)


if __name__ == "__main__":
    main()
