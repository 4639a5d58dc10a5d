"""Step timing: CUDA work synchronised before reading the clock, and the plain-training step the sampler's
cost is reported against (`step_ratio_vs_plain`)."""
from __future__ import annotations

import time

import numpy as np
import torch

from dpsel.select.bads.problems import SelectionProblem


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for the work before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_plain_step(problem: SelectionProblem, batch_size: int, steps: int, seed: int) -> float:
    """Seconds per plain training step (forward/backward on B train rows + an AdamW update), θ restored after."""
    theta = problem.theta()
    saved = [t.detach().clone() for t in theta]
    opt = torch.optim.AdamW(theta, lr=1e-4)
    batches = problem.train_batches(batch_size, seed)[:steps + 1]
    elapsed = 0.0
    for k, b in enumerate(batches):
        sync(theta[0].device)
        started = time.perf_counter()
        loss = problem.plain_step_loss(np.asarray(b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(theta[0].device)  # CUDA runs asynchronously: time the work, not the launch
        if k > 0:  # the first step pays one-off allocation costs
            elapsed += time.perf_counter() - started
    with torch.no_grad():
        for t, s in zip(theta, saved):
            t.copy_(s)
            t.grad = None
    return elapsed / max(len(batches) - 1, 1)
