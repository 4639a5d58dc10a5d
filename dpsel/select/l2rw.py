"""`l2rw`: learning to reweight (Ren et al. 2018), the expensive bi-level baseline.

Per training batch: perturb the row losses by ε (zero), take one look-ahead SGD step θ' = θ − α ∇θ Σ ε_i ℓ_i
(`torch.func.functional_call` evaluates the model at θ' without touching it), measure the meta loss at θ',
and set w_i ∝ max(−∂meta/∂ε_i, 0), normalised over the batch; then θ takes a real step on Σ w_i ℓ_i.
That is three passes per step (forward+backward, a look-ahead forward+double backward, the real step).
A row's score is its batch-normalised weight B·w_i averaged over its visits, mapped to [0, 1) by v/(1+v).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from dpsel.models.lm import LM_EXTRA_KEYS
from dpsel.models.reference_fit import REFERENCE_EXTRA_KEYS
from dpsel.resume.checkpoints import current_whole, flatten, load_optimizer, optimizer_state, unflatten
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig
from dpsel.select.scorers import SeenTableScorer

# the `SelectConfig.extra` settings l2rw reads, with the LM's and the reference fit's (its θ₀)
EXTRA_KEYS = frozenset({"steps", "epochs", "l2rw_inner_lr", "l2rw_anchor", "l2rw_lr", "measure_plain_steps",
                        *LM_EXTRA_KEYS, *REFERENCE_EXTRA_KEYS})


def lookahead_weights(lm, train_batch: dict, meta_batch: dict, inner_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch-normalised weights w·B ≥ 0, per-row train losses) for one batch, by the one-step look-ahead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # The look-ahead differentiates through a backward pass; the fused attention kernels have no double
    # backward, the math one does.
    with sdpa_kernel(SDPBackend.MATH):
        return _lookahead_weights(lm, train_batch, meta_batch, inner_lr)


def _lookahead_weights(lm, train_batch: dict, meta_batch: dict, inner_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    from dpsel.models.lm import batch_nll
    named = lm.named_theta()
    names, params = list(named), list(named.values())
    train_nll = batch_nll(lm.model, train_batch)
    eps = torch.zeros(len(train_nll), requires_grad=True, device=train_nll.device)
    grads = torch.autograd.grad((eps * train_nll).sum(), params, create_graph=True)
    lookahead = {n: p - inner_lr * g for n, p, g in zip(names, params, grads)}
    logits = functional_call(lm.model, lookahead, args=(), kwargs={
        "input_ids": meta_batch["input_ids"], "attention_mask": meta_batch["attention_mask"], "use_cache": False},
        strict=False).logits
    from peft_train.encode import per_example_nll
    meta_loss = per_example_nll(logits, meta_batch["labels"]).mean()
    grad_eps, = torch.autograd.grad(meta_loss, eps)
    raw = torch.clamp(-grad_eps, min=0)
    total = raw.sum()
    weights = raw / total * len(raw) if total > 0 else torch.zeros_like(raw)
    return weights.detach(), train_nll


def to_unit(v: np.ndarray) -> np.ndarray:
    v = np.maximum(v, 0)
    return v / (1.0 + v)


def select_l2rw(train: list[Messages], meta: list[Messages], config: SelectConfig,
                progress: ProgressFn | None = None, groups=None) -> Scores:
    from peft_train.encode import length_grouped_batches
    from dpsel.data import row_id
    from dpsel.select.bads import coverage_summary, measure_plain_step, LMProblem
    from dpsel.models.lm import EncodedRows, batch_nll, build_lm, seed_all
    from dpsel.models.reference_fit import fit_reference
    from dpsel.select.sgld import RunningMoments

    started = time.perf_counter()
    extra = config.extra
    # Run length in passes over the pool (default one: every row visited), unless steps are given.
    steps = int(config.steps or extra.get("steps")
                or math.ceil(float(config.epochs or extra.get("epochs", 1.0)) * math.ceil(len(train) / config.batch_size)))
    inner_lr = float(extra.get("l2rw_inner_lr", 1e-2))
    seed_all(config.seed)
    lm = build_lm(config)
    train_rows = EncodedRows(train, lm.tokenizer, config.max_length, lm.pad_id)
    meta_rows = EncodedRows(meta, lm.tokenizer, config.max_length, lm.pad_id)
    ref_seconds = 0.0
    if extra.get("l2rw_anchor", "meta") == "meta":  # start from the same meta-fitted θ₀ as bads, for a fair race
        ref_seconds = fit_reference(lm, meta_rows, config, progress).seconds
    timings = {}
    if int(extra.get("measure_plain_steps", 0)):
        problem = LMProblem(lm, train_rows, meta_rows, np.zeros(len(train), dtype=int))
        timings["plain_step_seconds"] = measure_plain_step(problem, config.batch_size,
                                                           int(extra["measure_plain_steps"]), config.seed)
    optimizer = torch.optim.AdamW(lm.theta(), lr=float(extra.get("l2rw_lr", 1e-3)))
    loop = _Loop(np.random.default_rng(config.seed), RunningMoments(len(train)))
    checkpoint = current_whole()
    start = loop.resume(checkpoint, lm, optimizer, steps)
    lm.model.train()
    if checkpoint is not None:
        checkpoint.loop_start()   # a stop signal waits for the step in progress, then saves
    for step in range(start, steps):
        if not loop.batches:
            loop.batches = length_grouped_batches(train_rows.lengths.tolist(), config.batch_size,
                                                  int(loop.rng.integers(2**31)))
        idx = np.asarray(loop.batches.pop(0))
        meta_idx = loop.rng.choice(len(meta_rows), size=min(config.meta_batch_size, len(meta_rows)), replace=False)
        t0 = time.perf_counter()
        train_batch, meta_batch = train_rows.batch(idx, lm.device), meta_rows.batch(meta_idx, lm.device)
        weights, _ = lookahead_weights(lm, train_batch, meta_batch, inner_lr)
        loss = (weights * batch_nll(lm.model, train_batch)).sum() / len(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loop.step_time += time.perf_counter() - t0
        loop.moments.update(weights.cpu(), torch.as_tensor(idx))
        if step % 10 == 0 or step == steps - 1:
            _diagnose(lm, loop, meta_batch, loss, step, steps, progress)
        if checkpoint is not None and step < steps - 1:
            checkpoint.after_step("l2rw", lambda: loop.snapshot(lm, optimizer, step + 1))
    if checkpoint is not None:
        checkpoint.loop_done()
    moments, diag, step_time = loop.moments, loop.diag, loop.step_time
    lm.model.eval()
    visited = moments.count.numpy() > 0
    mean = np.where(visited, to_unit(moments.mean().numpy()), 0.5)  # never visited: undecided
    std = to_unit(moments.std().numpy()) * visited
    scorer = L2rwScorer([row_id(m) for m in train], mean, std,
                        {"seed": config.seed, "max_length": config.max_length, "inner_lr": inner_lr})
    scorer.attach(lm, meta_rows)
    timings.update(seconds=time.perf_counter() - started, sampler_seconds=step_time,
                   seconds_per_step=step_time / steps, reference_seconds=ref_seconds)
    if "plain_step_seconds" in timings:
        timings["step_ratio_vs_plain"] = timings["seconds_per_step"] / timings["plain_step_seconds"]
    visits = moments.count.numpy().astype(int)
    coverage = coverage_summary(visits, steps, 0, {"visits": int(visited.sum()),
                                                   "never_visited_left_at_0.5": int((~visited).sum())})
    return Scores("l2rw", mean, std, config.to_dict(), diag, timings, scorer, coverage=coverage)


@dataclass
class _Loop:
    """What l2rw's loop carries from step to step besides θ and the optimizer (all of it in a checkpoint)."""
    rng: np.random.Generator
    moments: object                  # dpsel.select.sgld.RunningMoments of the rows' weights
    batches: list = field(default_factory=list)
    diag: dict = field(default_factory=lambda: {k: [] for k in ("step", "meta_loss", "train_loss", "mean_weight")})
    step_time: float = 0.0

    def snapshot(self, lm, optimizer, next_step: int) -> tuple[dict, dict]:
        opt_tensors, opt_state = optimizer_state(optimizer)
        tensors = {**flatten("theta", lm.theta_state()), **flatten("moments", self.moments.state_dict()),
                   **opt_tensors, "torch_rng": torch.get_rng_state()}
        return tensors, {**opt_state, "step": next_step, "numpy_rng": self.rng.bit_generator.state,
                         "batches": [list(map(int, b)) for b in self.batches], "diag": self.diag,
                         "step_time": self.step_time}

    def resume(self, checkpoint, lm, optimizer, steps: int) -> int:
        """The step to start from: 0, or the one after the checkpoint's `l2rw` stage (its state restored)."""
        saved = checkpoint.load("l2rw") if checkpoint is not None else None
        if saved is None:
            return 0
        tensors, state = saved
        lm.load_theta(unflatten("theta", tensors))
        self.moments.load_state_dict(unflatten("moments", tensors))
        load_optimizer(optimizer, tensors, state)
        torch.set_rng_state(tensors["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.batches, self.diag, self.step_time = state["batches"], state["diag"], float(state["step_time"])
        start = int(state["step"])
        checkpoint.resuming("l2rw", {"from_step": start, "steps": steps},
                            f"l2rw steps 0-{start - 1} skipped, going on from step {start} of {steps}")
        return start


def _diagnose(lm, loop: _Loop, meta_batch: dict, loss: torch.Tensor, step: int, steps: int,
              progress: ProgressFn | None) -> None:
    from dpsel.models.lm import batch_nll
    with torch.no_grad():
        meta_loss = float(batch_nll(lm.model, meta_batch).mean())
    record = {"step": step, "meta_loss": meta_loss, "train_loss": float(loss.detach()),
              "mean_weight": float(to_unit(loop.moments.mean().numpy()).mean())}
    for k, v in record.items():
        loop.diag[k].append(float(v))
    if progress:
        progress(step + 1, steps, record)


class L2rwScorer(SeenTableScorer):
    """Unseen rows: one look-ahead at the final θ against the whole meta set, batch by batch."""
    kind = "l2rw"

    def attach(self, lm, meta_rows) -> None:
        self.lm, self.meta_rows = lm, meta_rows

    def _score_unseen(self, messages, ids):
        from dpsel.models.lm import EncodedRows
        rows = EncodedRows(messages, self.lm.tokenizer, int(self.info.get("max_length", 256)), self.lm.pad_id)
        meta_batch = self.meta_rows.batch(np.arange(len(self.meta_rows)), self.lm.device)
        out = np.zeros(len(rows))
        for start in range(0, len(rows), 16):
            idx = np.arange(start, min(start + 16, len(rows)))
            weights, _ = lookahead_weights(self.lm, rows.batch(idx, self.lm.device), meta_batch,
                                           float(self.info.get("inner_lr", 1e-2)))
            out[idx] = to_unit(weights.cpu().numpy())
        return out, np.zeros(len(rows))

    def _save_model(self, directory: Path) -> None:
        from dpsel.io import write_parquet_atomic
        from dpsel.models.lm import save_theta
        import pandas as pd
        info = save_theta(self.lm, directory / "model")
        torch.save({"model": info}, directory / "l2rw.pt")
        # the meta rows are needed for the look-ahead: keep their tokens (small)
        write_parquet_atomic(pd.DataFrame({"input_ids": [e.input_ids for e in self.meta_rows.examples],
                                           "labels": [e.labels for e in self.meta_rows.examples]}),
                             directory / "meta_tokens.parquet")

    def _load_model(self, directory: Path) -> None:
        import pandas as pd
        from peft_train.encode import EncodedExample
        from dpsel.models.lm import load_theta
        saved = torch.load(directory / "l2rw.pt", weights_only=True)
        lm = load_theta(directory / "model", saved["model"], device="cpu")
        full = saved["model"]["theta_kind"] == "full"
        for name, p in lm.model.named_parameters():  # θ must be differentiable again for the look-ahead
            if full or "lora_" in name:
                p.requires_grad_(True)
        table = pd.read_parquet(directory / "meta_tokens.parquet")
        meta = _TokenRows([EncodedExample(list(i), list(l)) for i, l in zip(table.input_ids, table.labels)],
                          lm.pad_id)
        self.attach(lm, meta)


class _TokenRows:
    """Already-tokenised rows with the same batch interface as EncodedRows."""

    def __init__(self, examples, pad_id):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self):
        return len(self.examples)

    def batch(self, indices, device):
        from peft_train.encode import collate
        return {k: v.to(device) for k, v in collate([self.examples[i] for i in indices], self.pad_id).items()}
