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

Modules: selection_data.py (rows, models, the pretrained base), selection_run.py (methods, peers, downstream),
selection_summary.py (mean ± sd over seeds, targets, merging saved runs), selection_render.py (Markdown), and
benchmarks/stats.py (shared by every benchmark). `--render-only results/selection.json` re-renders the Markdown
of a saved JSON without running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selection_data import build_sized_model, make_data, pretrained_base  # noqa: E402
from selection_render import full_markdown, multi_seed_markdown  # noqa: E402
from selection_run import DEFAULT_METHODS, VARIANTS, all_peers, run_seed  # noqa: E402
from selection_summary import merge_runs, multi_seed_targets, saved_runs, summarise  # noqa: E402
from stats import write_report  # noqa: E402

DEFAULT_PEERS = "quality-clf,dsir,task-disagreement"
TEXT_PEERS = "qa-cosine,rds-embed,char-lm,fasttext,quality-clf,gopher-c4"


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synth", choices=("synth", "synth-notask", "realtext", "realtext-chat"),
                        help="synth (with its task column), synth without it, the docstring real-text set "
                             "(benchmarks/realtext.py) or the chat-shaped one from package METADATA and info "
                             "manuals (benchmarks/realtext_chat.py); results go to selection[-DATASET].{json,md}")
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
    parser.add_argument("--render-only", type=Path, default=None, metavar="JSON",
                        help="re-render the Markdown of a saved selection JSON into --out (same file name), run nothing")
    return parser, parser.parse_args(argv)


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    if args.render_only:
        return render_only(args.render_only, Path(args.out))
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
        args.base = "random" if args.dataset.startswith("realtext") else args.base
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
    report["args"].pop("render_only", None)
    report["pretrain"] = report["args"].pop("pretrain_info", None)
    stem = "selection" if args.dataset == "synth" else f"selection-{args.dataset}"
    runs = saved_runs(out / f"{stem}.json")
    base = report["args"].get("base", "random") if args.model_size == "tiny" else args.model_size
    runs[f"{base}-{args.rows}"] = report
    write_report(out / f"{stem}.json", {"runs": runs}, full_markdown(runs), default=float)
    print(multi_seed_markdown(report))
    return report


def merge_reports(paths: list[Path], out: Path) -> dict:
    """One report from several runs with the same settings (`selection_summary.merge_runs`), written under --out
    with the first file's name; the other runs already in that file are kept."""
    merged = merge_runs(paths)
    target = out / paths[0].name
    runs = {**saved_runs(target), **merged}
    write_report(target, {"runs": runs}, full_markdown(runs), default=float)
    for report in merged.values():
        print(multi_seed_markdown(report))
    return merged


def render_only(path: Path, out: Path) -> dict:
    """The Markdown of a saved selection JSON, written as --out/<its name>.md; nothing runs."""
    runs = saved_runs(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / path.name).with_suffix(".md").write_text(full_markdown(runs))
    print(f"wrote {(out / path.name).with_suffix('.md')}")
    return runs


if __name__ == "__main__":
    main()
