"""The sampler's runner: the loop around `kernel.SGLDKernel` and its hooks — minibatch order, the averages
after burn-in, diagnostics and progress, checkpoints (resume and save) — then every row's estimate."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dpsel.resume.checkpoints import flatten, unflatten
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.kernel import SGLDKernel, Step, listed
from dpsel.select.bads.posterior import posterior_pass_over_pool
from dpsel.select.bads.problems import SelectionProblem
from dpsel.select.bads.result import SamplerResult, coverage_summary
from dpsel.select.bads.timing import measure_plain_step, sync
from dpsel.select.base import ProgressFn
from dpsel.select.sgld import RunningMoments

DIAGNOSTICS = ("step", "mean_weight", "meta_loss", "train_loss", "weight_q10", "weight_q50", "weight_q90", "lr_theta")


@dataclass
class Trace:
    """What the loop carries from step to step besides the kernel (all of it in a checkpoint)."""
    rng: np.random.Generator
    moments: RunningMoments
    visits: torch.Tensor                      # minibatch visits per row after burn-in
    batches: list = field(default_factory=list)
    theta_draws: list = field(default_factory=list)   # θ kept for the posterior pass
    phi_samples: list = field(default_factory=list)   # amortised weights: the net's draws
    diag: dict = field(default_factory=lambda: {k: [] for k in DIAGNOSTICS})
    step_time: float = 0.0

    def state(self, next_step: int) -> tuple[dict, dict]:
        tensors = {**flatten("moments", self.moments.state_dict()), "torch_rng": torch.get_rng_state(),
                   "visits": self.visits, **_batch_tensors(self.batches)}
        for i, draw in enumerate(self.theta_draws):
            tensors.update(flatten(f"draw.{i}", draw))
        for i, sample in enumerate(self.phi_samples):
            tensors.update(flatten(f"phi.{i}", sample))
        state = {"step": next_step, "numpy_rng": self.rng.bit_generator.state,
                 "diag": self.diag,
                 "step_time": self.step_time, "draws": len(self.theta_draws), "phi": len(self.phi_samples)}
        return tensors, state

    def load_state(self, tensors: dict, state: dict) -> int:
        self.moments.load_state_dict(unflatten("moments", tensors))
        torch.set_rng_state(tensors["torch_rng"])
        self.visits.copy_(tensors["visits"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.batches[:] = _batches_from(tensors, state)
        self.diag.update(state["diag"])
        self.theta_draws[:] = [listed(tensors, f"draw.{i}") for i in range(state["draws"])]
        self.phi_samples[:] = [unflatten(f"phi.{i}", tensors) for i in range(state["phi"])]
        self.step_time = float(state["step_time"])
        return int(state["step"])


def _batch_tensors(batches: list) -> dict[str, torch.Tensor]:
    """The rest of this pass's minibatches as two int64 tensors (indices, sizes): a checkpoint's tensors, not
    a JSON list of a million ints."""
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches]) if batches else np.zeros(0, np.int64)
    return {"batches": torch.from_numpy(flat), "batch_sizes": sizes}


def _batches_from(tensors: dict, state: dict) -> list:
    """`_batch_tensors` read back (a checkpoint written before them kept the batches in its JSON)."""
    if "batch_sizes" not in tensors:
        return [np.asarray(b, dtype=np.int64) for b in state.get("batches", [])]
    sizes = tensors["batch_sizes"].numpy()
    return np.split(tensors["batches"].numpy(), np.cumsum(sizes)[:-1]) if len(sizes) else []


def _snapshot(kernel: SGLDKernel, trace: Trace, next_step: int) -> tuple[dict, dict]:
    """The loop's whole state after a step: tensors (safetensors) and JSON."""
    (k_tensors, k_state), (t_tensors, t_state) = kernel.state(), trace.state(next_step)
    return {**k_tensors, **t_tensors}, {**k_state, **t_state}


def run_sampler(problem: SelectionProblem, settings: BadsSettings, *, batch_size: int, meta_batch_size: int,
                seed: int, prior_mean: torch.Tensor, theta0: list[torch.Tensor] | None = None,
                features: torch.Tensor | None = None, weight_param: str = "logits",
                progress: ProgressFn | None = None, measure_plain_steps: int = 0,
                checkpoint=None, data_parallel=None,
                ablation_priors: dict[str, torch.Tensor] | None = None) -> SamplerResult:
    """Joint SGLD over θ and the weights; posterior mean/std of every weight from running averages after burn-in.

    `checkpoint` (a `dpsel.resume.checkpoints.Checkpoints`): resume from its `sampler` stage when there is one, and
    save the whole sampler state there whenever it says one is due.
    `data_parallel` (dpsel.parallel.collectives.DataParallel, under torchrun): `problem` is this rank's row
    shard, θ's gradients are summed over ranks and θ is kept identical (see bads/parallel.py).
    `ablation_priors`: other prior means put through the same posterior pass (`posterior_pass_<name>` alternatives)."""
    torch.manual_seed(seed)
    trace = Trace(np.random.default_rng(seed), RunningMoments(problem.n_train),
                  torch.zeros(problem.n_train, dtype=torch.long))
    kernel = SGLDKernel(problem, settings, batch_size=batch_size, seed=seed, prior_mean=prior_mean, theta0=theta0,
                        features=features, weight_param=weight_param, data_parallel=data_parallel)
    steps = settings.resolve_steps(problem.n_train, batch_size)
    burn_in = int(settings.burn_in * steps)
    # θ draws kept for the posterior pass, evenly spaced after burn-in (the last step always among them)
    draw_steps = set(np.linspace(burn_in, steps - 1, max(1, settings.theta_draws)).round().astype(int).tolist())
    timings = {}
    if measure_plain_steps:
        timings["plain_step_seconds"] = measure_plain_step(problem, batch_size, measure_plain_steps, seed)

    start_step = _resume(checkpoint, kernel, trace, steps)
    if checkpoint is not None:
        checkpoint.loop_start()   # a stop signal during the first step waits for it too, then saves
    for step in range(start_step, steps):
        done = _timed_step(problem, kernel, trace, batch_size, meta_batch_size)
        if step >= burn_in:
            keep_theta = settings.posterior_pass and step in draw_steps
            _record(kernel, trace, done, step, steps, burn_in, keep_theta)
        if step % settings.diag_every == 0 or step == steps - 1:
            _diagnose(kernel, trace, done, step, steps, progress)
        if checkpoint is not None and step < steps - 1:
            checkpoint.after_step("sampler", lambda: _snapshot(kernel, trace, step + 1))
    if checkpoint is not None:
        checkpoint.loop_done()
    return _estimates(problem, kernel, trace, prior_mean, steps, burn_in, timings, ablation_priors)


def _resume(checkpoint, kernel: SGLDKernel, trace: Trace, steps: int) -> int:
    """The step to start from: 0, or the one after the checkpoint's `sampler` stage (whose state is restored)."""
    saved = checkpoint.load("sampler") if checkpoint is not None else None
    if saved is None:
        return 0
    kernel.load_state(*saved)
    start_step = trace.load_state(*saved)
    checkpoint.resuming("sampler", {"from_step": start_step, "steps": steps},
                        f"sampler steps 0-{start_step - 1} skipped, going on from step {start_step} of {steps}")
    return start_step


def _timed_step(problem: SelectionProblem, kernel: SGLDKernel, trace: Trace, batch_size: int,
                meta_batch_size: int) -> Step:
    """The next minibatch (train rows in the problem's batch order, meta rows at random) through one step."""
    if not trace.batches:
        trace.batches = problem.train_batches(batch_size, int(trace.rng.integers(2**31)))
    train_idx = np.asarray(trace.batches.pop(0))
    meta_idx = trace.rng.choice(problem.n_meta, size=min(meta_batch_size, problem.n_meta), replace=False)
    sync(kernel.theta[0].device)
    started = time.perf_counter()
    done = kernel.step(train_idx, meta_idx)
    sync(kernel.theta[0].device)
    trace.step_time += time.perf_counter() - started
    return done


def _record(kernel: SGLDKernel, trace: Trace, done: Step, step: int, steps: int, burn_in: int,
            keep_theta: bool) -> None:
    """After burn-in: count the visits, keep θ at the draw steps, and average the weights."""
    settings, weights, idx = kernel.settings, kernel.weights, done.idx
    trace.visits.index_add_(0, idx, torch.ones(len(idx), dtype=torch.long))
    if keep_theta:
        trace.theta_draws.append([t.detach().clone() for t in kernel.theta])
    if kernel.weight_param == "logits" and settings.rao_blackwell:
        trace.moments.update_moments(*kernel.conditional_moments(done), idx)
    elif kernel.weight_param == "logits":
        trace.moments.update(weights.weights(idx).detach(), idx)
    else:
        trace.moments.update(weights.all_weights())
        if (step - burn_in) % max(1, (steps - burn_in) // 8) == 0:
            trace.phi_samples.append({k: v.detach().clone() for k, v in weights.net.state_dict().items()})


def _quantiles(w: torch.Tensor) -> list[float]:
    return torch.quantile(w.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()


def _diagnose(kernel: SGLDKernel, trace: Trace, done: Step, step: int, steps: int, progress: ProgressFn | None) -> None:
    all_w = kernel.weights.all_weights()
    q = _quantiles(all_w)
    optimizer = kernel.optimizer
    record = {"step": step, "mean_weight": float(all_w.mean()), "meta_loss": float(done.meta_nll.detach().mean()),
              "train_loss": float(done.train_nll.detach().mean()), "weight_q10": q[0], "weight_q50": q[1],
              "weight_q90": q[2], "lr_theta": optimizer.current_lr(optimizer.param_groups[0])}
    for k, v in record.items():
        trace.diag[k].append(float(v))
    if progress:
        progress(step + 1, steps, record)


def _estimates(problem: SelectionProblem, kernel: SGLDKernel, trace: Trace, prior_mean: torch.Tensor, steps: int,
               burn_in: int, timings: dict, ablation_priors: dict[str, torch.Tensor] | None) -> SamplerResult:
    """Every row's weight (mean, std) once the loop is done, and how each row got it."""
    settings, moments, n = kernel.settings, trace.moments, problem.n_train
    visits_np = trace.visits.numpy()
    under_visited = np.zeros(n, dtype=bool)
    alternatives: dict[str, np.ndarray] = {}
    if kernel.weight_param == "amortized":
        # w_i = g_φ(e_i): every row's weight is recorded at every step after burn-in, visited or not.
        mean, std = moments.mean().numpy(), moments.std().numpy()
        scored_by = {"weight_network_draws": n}
    elif settings.posterior_pass:
        pass_started = time.perf_counter()
        passed = posterior_pass_over_pool(problem, kernel.theta, trace.theta_draws, prior_mean, kernel.groups,
                                          settings, kernel.data_parallel, ablation_priors)
        mean, std = passed["mean"], passed["std"]
        timings["posterior_pass_seconds"] = time.perf_counter() - pass_started
        scored_by = {"posterior_pass": n}
        # Ablations from the same run (asked for by `settings.ablations`): the visit averages alone (unvisited
        # rows at their prior), θ's standardised loss alone (no prior), the posterior pass without the refreshed
        # prior, and the posterior pass from each of `ablation_priors`.
        alternatives = {} if not settings.ablations else {"visits_only": moments.mean(fallback=prior_mean).numpy(),
                        "theta_loss_only": -passed["theta_loss"],
                        "posterior_pass_no_theta_refresh": passed["reference_prior_mean"],
                        **{f"posterior_pass_{name}": mean for name, mean in passed["ablations"].items()}}
    else:
        # A row seen fewer than min_visits times after burn-in has no posterior of its own worth the name: the
        # caller scores it another way (select_bads: the weight network) and the coverage record says so.
        under_visited = visits_np < settings.min_visits
        mean = moments.mean(fallback=prior_mean).numpy()
        std = moments.std().numpy()
        scored_by = {"visits": int((~under_visited).sum()), "under_visited": int(under_visited.sum())}
    timings.update(sampler_seconds=trace.step_time, seconds_per_step=trace.step_time / max(steps, 1))
    if "plain_step_seconds" in timings:
        timings["step_ratio_vs_plain"] = timings["seconds_per_step"] / timings["plain_step_seconds"]
    coverage = coverage_summary(visits_np, steps, burn_in, scored_by)
    return SamplerResult(np.clip(mean, 0, 1), std, trace.diag, timings, kernel.weights, trace.phi_samples, visits_np,
                         under_visited, coverage, alternatives)
