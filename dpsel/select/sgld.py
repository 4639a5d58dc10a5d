"""Stochastic-gradient Langevin dynamics as a `torch.optim.Optimizer`, and posterior running averages.

Written here because no maintained library ships an SGLD optimizer for torch (pyro has HMC/NUTS, which need
full-batch gradients; the old SGLD packages are unmaintained). The update (Welling & Teh 2011; the RMSprop
preconditioner of Li et al. 2016, pSGLD, with its small Γ correction term dropped as is customary) is:

    θ ← θ − ε_t · G · ∇U(θ) + sqrt(2 · ε_t · G · T) · ξ,      ξ ~ N(0, I)

with U = −log joint (the caller's `loss`), ε_t = lr · (1 + t / decay_t0) ** (−decay_gamma) (polynomial decay),
T the temperature (1 = the posterior, < 1 = a cold posterior) and G = 1 / (sqrt(V) + eps) with V a running
average of ∇U² when `precondition` is on (else G = 1).

Row-sparse parameter groups (`row_sparse=True`) hold one entry per data row along dim 0 (per-row weight
logits). Only the rows visited this step move (`set_visited`): their gradient already carries the minibatch
scale N/B, so a visit is a Langevin step of size ε·N/B, and the noise is scaled to match
(sqrt(2·ε·G·T·N/B)). Between visits a row stays put, so its running average is taken over its visits.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class SGLD(Optimizer):
    """SGLD / pSGLD with per-group step size, decay, temperature and optional RMSprop preconditioning."""

    def __init__(self, params, lr: float = 1e-4, temperature: float = 1.0, precondition: bool = False,
                 alpha: float = 0.99, eps: float = 1e-5, decay_gamma: float = 0.0, decay_t0: float = 1000.0,
                 row_sparse: bool = False, visit_scale: float = 1.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        defaults = dict(lr=lr, temperature=temperature, precondition=precondition, alpha=alpha, eps=eps,
                        decay_gamma=decay_gamma, decay_t0=decay_t0, row_sparse=row_sparse,
                        visit_scale=visit_scale)
        super().__init__(params, defaults)
        self._visited: dict[int, torch.Tensor] = {}
        self.generator: torch.Generator | None = None  # set for reproducible noise independent of global RNG
        self._device_generators: dict[str, torch.Generator] = {}

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The noise generators' states (`state_dict` holds the preconditioner, not these): for checkpoints."""
        states = {} if self.generator is None else {"cpu": self.generator.get_state()}
        states.update({key: generator.get_state() for key, generator in self._device_generators.items()})
        return states

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        for key, state in states.items():
            if key == "cpu":
                self.generator = self.generator or torch.Generator()
                self.generator.set_state(state)
            else:
                self._device_generators.setdefault(key, torch.Generator(device=key)).set_state(state)

    def set_visited(self, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows of a row-sparse parameter that this step's minibatch touched (unique indices)."""
        self._visited[id(param)] = rows

    def current_lr(self, group: dict) -> float:
        t = group.setdefault("step", 0)
        return group["lr"] * (1.0 + t / group["decay_t0"]) ** (-group["decay_gamma"])

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return torch.randn_like(like)
        if like.device.type == "cpu":
            return torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        # Draw on the parameter's device (no host-to-device copy per step), from a generator seeded off the CPU one.
        key = str(like.device)
        if key not in self._device_generators:
            self._device_generators[key] = torch.Generator(device=like.device).manual_seed(
                self.generator.initial_seed() + 1)
        return torch.randn(like.shape, generator=self._device_generators[key], dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = self.current_lr(group)
            stepped = [p for p in group["params"] if p.grad is not None]
            if not group["row_sparse"]:
                if stepped:
                    self._step_dense(stepped, group, lr)
            for p in stepped if group["row_sparse"] else ():
                rows = self._visited.get(id(p))
                if rows is None:
                    raise RuntimeError("row-sparse SGLD parameter stepped without set_visited(param, rows)")
                self._step_rows(p, rows, group, lr)
            group["step"] = group.get("step", 0) + 1
        self._visited.clear()
        return loss

    def _preconditioner(self, p: torch.Tensor, grad: torch.Tensor, group: dict, rows=None) -> torch.Tensor | float:
        if not group["precondition"]:
            return 1.0
        state = self.state[p]
        if "square_avg" not in state:
            state["square_avg"] = torch.zeros_like(p)
            state["seen"] = torch.zeros(p.shape[:1] if rows is not None else (), dtype=torch.bool, device=p.device)
        avg = state["square_avg"]
        if rows is None:
            # First step initialises V with g² (no bias toward 0, which would make G huge early on).
            if not bool(state["seen"]):
                avg.copy_(grad * grad)
                state["seen"].fill_(True)
            else:
                avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
            return 1.0 / (avg.sqrt() + group["eps"])
        sub = avg[rows]
        first = ~state["seen"][rows]
        sub = torch.where(first.view(-1, *[1] * (sub.dim() - 1)), grad * grad,
                          sub * group["alpha"] + (1 - group["alpha"]) * grad * grad)
        avg[rows] = sub
        state["seen"][rows] = True
        return 1.0 / (sub.sqrt() + group["eps"])

    def _dense_preconditioners(self, params: list, grads: list, group: dict) -> list[torch.Tensor]:
        """G = 1 / (sqrt(V) + eps) for every dense parameter at once (foreach ops: one launch per op, not per
        tensor, which is what a LoRA's ~170 small tensors make the GPU wait on)."""
        fresh, running = [], []
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "square_avg" not in state:
                state["square_avg"] = torch.zeros_like(p)
                state["seen"] = torch.zeros((), dtype=torch.bool, device=p.device)
            (running if bool(state["seen"]) else fresh).append((state, grad))
        # First visit initialises V with g² (no bias toward 0, which would make G huge early on).
        for state, grad in fresh:
            torch.mul(grad, grad, out=state["square_avg"])
            state["seen"].fill_(True)
        if running:
            avgs, gs = [s["square_avg"] for s, _ in running], [g for _, g in running]
            torch._foreach_mul_(avgs, group["alpha"])
            torch._foreach_addcmul_(avgs, gs, gs, value=1 - group["alpha"])
        out = torch._foreach_sqrt([self.state[p]["square_avg"] for p in params])
        torch._foreach_add_(out, group["eps"])
        torch._foreach_reciprocal_(out)
        return out

    def _step_dense(self, params: list, group: dict, lr: float) -> None:
        grads = [p.grad for p in params]
        temperature = group["temperature"]
        if group["precondition"]:
            g = self._dense_preconditioners(params, grads, group)
            update = torch._foreach_mul(grads, g)
            torch._foreach_mul_(update, -lr)
            if temperature > 0:
                std = torch._foreach_mul(g, 2.0 * lr * temperature)
                torch._foreach_sqrt_(std)
                torch._foreach_addcmul_(update, std, [self._noise(p) for p in params])
        else:
            update = torch._foreach_mul(grads, -lr)
            if temperature > 0:
                torch._foreach_add_(update, [self._noise(p) for p in params], alpha=(2.0 * lr * temperature) ** 0.5)
        torch._foreach_add_(params, update)

    def _step_rows(self, p: torch.Tensor, rows: torch.Tensor, group: dict, lr: float) -> None:
        grad = p.grad[rows]
        g = self._preconditioner(p, grad, group, rows=rows)
        scale = group["visit_scale"]
        noise_var = 2.0 * lr * group["temperature"] * scale
        noise_std = torch.sqrt(noise_var * torch.as_tensor(g)) if noise_var > 0 else 0.0
        # The gradient already carries the N/B minibatch scale; only the noise needs it explicitly.
        p[rows] = p[rows] - lr * g * grad + noise_std * self._noise(grad)


class RunningMoments:
    """Running mean and variance of a quantity per row, each row averaged over the times it was recorded."""

    def __init__(self, n: int, dtype=torch.float64):
        self.count = torch.zeros(n, dtype=dtype)
        self.total = torch.zeros(n, dtype=dtype)
        self.total_sq = torch.zeros(n, dtype=dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "total": self.total, "total_sq": self.total_sq}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.count, self.total, self.total_sq = (state[k].clone() for k in ("count", "total", "total_sq"))

    def update(self, values: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        values = values.detach().to(self.total.dtype).cpu()
        if rows is None:
            self.count += 1
            self.total += values
            self.total_sq += values * values
        else:
            rows = rows.cpu()
            self.count.index_add_(0, rows, torch.ones_like(values))
            self.total.index_add_(0, rows, values)
            self.total_sq.index_add_(0, rows, values * values)

    def update_moments(self, first: torch.Tensor, second: torch.Tensor, rows: torch.Tensor) -> None:
        """Record known conditional moments E[x], E[x²] (Rao-Blackwellised) instead of one draw."""
        rows = rows.cpu()
        self.count.index_add_(0, rows, torch.ones(len(rows), dtype=self.count.dtype))
        self.total.index_add_(0, rows, first.detach().to(self.total.dtype).cpu())
        self.total_sq.index_add_(0, rows, second.detach().to(self.total.dtype).cpu())

    def mean(self, fallback: torch.Tensor | None = None) -> torch.Tensor:
        mean = self.total / self.count.clamp(min=1)
        if fallback is not None:
            mean = torch.where(self.count > 0, mean, fallback.to(mean.dtype).cpu())
        return mean

    def std(self) -> torch.Tensor:
        mean = self.total / self.count.clamp(min=1)
        var = self.total_sq / self.count.clamp(min=1) - mean * mean
        return var.clamp(min=0).sqrt()


def polynomial_lr(lr: float, step: int, gamma: float, t0: float) -> float:
    """The decay schedule SGLD uses, for reporting."""
    return lr * (1.0 + step / t0) ** (-gamma)


__all__ = ["SGLD", "RunningMoments", "polynomial_lr"]
