"""The SGLD sampler draws from a known posterior, and the log joint + sampler find planted label noise."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from dpsel.select.sgld import SGLD, RunningMoments


def _conjugate_problem(seed=0, n=200, dim=2):
    """x_i ~ N(mu, diag(sigma²)), mu ~ N(0, tau² I): the posterior of mu is Gaussian in closed form."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor([1.0, 4.0])[:dim]  # two very different curvatures: pSGLD has something to fix
    tau = 3.0
    true_mu = torch.tensor([1.5, -2.0])[:dim]
    x = true_mu + sigma * torch.randn(n, dim, generator=g)
    post_prec = n / sigma**2 + 1 / tau**2
    post_var = 1 / post_prec
    post_mean = post_var * x.sum(0) / sigma**2
    return x, sigma, tau, post_mean, post_var


def _run_chains(precondition, lr, steps=3000, burn_in=1000, chains=256, batch=50, temperature=1.0, seed=0):
    """Many independent chains in one tensor; minibatch gradients scaled by N/B."""
    x, sigma, tau, post_mean, post_var = _conjugate_problem()
    n, dim = x.shape
    mu = torch.zeros(chains, dim, requires_grad=True)
    opt = SGLD([mu], lr=lr, precondition=precondition, temperature=temperature)
    opt.generator = torch.Generator().manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    moments = RunningMoments(chains * dim)
    for step in range(steps):
        idx = torch.randint(0, n, (chains, batch), generator=g)
        xb_sum = x[idx].sum(1)  # [chains, dim]
        # ∇U of U = −(N/B)·Σ_b log N(x_b; mu, σ²) − log N(mu; 0, τ²), in closed form (fast; the test is the sampler)
        mu.grad = -(n / batch) * (xb_sum - batch * mu.detach()) / sigma**2 + mu.detach() / tau**2
        opt.step()
        if step >= burn_in:
            moments.update(mu.detach().reshape(-1))
    samples_mean = moments.mean().reshape(chains, dim).mean(0)
    # Within-chain variance averaged over chains, plus the spread of the chain means.
    second = (moments.total_sq / moments.count).reshape(chains, dim).mean(0)
    samples_var = second - samples_mean**2
    return samples_mean, samples_var, post_mean, post_var


@pytest.mark.parametrize("precondition,lr", [(False, 2e-4), (True, 3e-3)])
def test_sgld_matches_conjugate_gaussian_posterior(precondition, lr):
    mean, var, post_mean, post_var = _run_chains(precondition, lr)
    post_sd = post_var.sqrt()
    assert torch.all((mean - post_mean).abs() < 0.1 * post_sd), (mean, post_mean, post_sd)
    assert torch.all((var / post_var - 1).abs() < 0.15), (var, post_var)


def test_temperature_scales_posterior_variance():
    _, var, _, post_var = _run_chains(True, 3e-3, temperature=0.25)
    assert torch.all((var / (0.25 * post_var) - 1).abs() < 0.2), (var, 0.25 * post_var)


def test_row_sparse_group_only_moves_visited_rows():
    u = torch.zeros(10, requires_grad=True)
    opt = SGLD([{"params": [u], "row_sparse": True, "visit_scale": 5.0}], lr=0.1)
    rows = torch.tensor([2, 7])
    (u[rows] ** 2).sum().backward()
    opt.set_visited(u, rows)
    opt.step()
    moved = (u.detach() != 0).nonzero().flatten().tolist()
    assert moved == [2, 7]


def test_polynomial_decay_shrinks_step():
    p = torch.zeros(1, requires_grad=True)
    opt = SGLD([p], lr=1.0, decay_gamma=0.5, decay_t0=1.0, temperature=0.0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.current_lr(opt.param_groups[0]))
        p.grad = torch.ones(1)
        opt.step()
    np.testing.assert_allclose(lrs, [1.0, 2**-0.5, 3**-0.5, 4**-0.5])


# ---------------------------------------------------------------------------- planted label noise


class _LogisticProblem:
    """Logistic regression on synthetic data with flipped labels: the LM swapped for a tiny model."""

    def __init__(self, n=1000, n_meta=60, dim=10, flip=0.25, seed=0):
        g = torch.Generator().manual_seed(seed)
        beta = torch.randn(dim, generator=g) * 2
        def draw(k):
            x = torch.randn(k, dim, generator=g)
            y = (torch.rand(k, generator=g) < torch.sigmoid(x @ beta * 2)).float()
            return x, y
        self.x, y = draw(n)
        self.noisy = torch.rand(n, generator=g) < flip
        self.y = torch.where(self.noisy, 1 - y, y)
        self.xm, self.ym = draw(n_meta)
        self.w = torch.nn.Parameter(torch.zeros(dim + 1))
        self.n_train, self.n_meta = n, n_meta
        self.groups = np.zeros(n, dtype=int)

    def theta(self):
        return [self.w]

    def _nll(self, x, y):
        logits = x @ self.w[:-1] + self.w[-1]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")

    def losses(self, train_idx, meta_idx):
        t, mi = torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(meta_idx, dtype=torch.long)
        return self._nll(self.x[t], self.y[t]), self._nll(self.xm[mi], self.ym[mi])

    def train_batches(self, batch_size, seed):
        from dpsel.select.bads import SelectionProblem
        return SelectionProblem.train_batches(self, batch_size, seed)

    def plain_step_loss(self, train_idx):
        return self.losses(train_idx, np.zeros(0, dtype=int))[0].mean()

    def fit_meta(self, steps=300):
        opt = torch.optim.Adam([self.w], lr=0.05)
        for _ in range(steps):
            loss = self._nll(self.xm, self.ym).mean() + 1e-2 * (self.w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("weight_param", ["logits", "amortized"])
def test_bads_finds_planted_label_noise(weight_param):
    from sklearn.metrics import roc_auc_score

    from dpsel.select.bads import BadsSettings, run_sampler

    problem = _LogisticProblem()
    problem.fit_meta()  # θ₀: anchored at a meta-fitted θ, the default variant's choice
    settings = BadsSettings.for_variant("default", {"steps": 400, "lr_theta": 1e-2, "lr_phi": 1e-2,
                                                    "prior_scale": 1.0, "centre_losses": "global"})
    # Features for the amortised weights: the inputs and the observed label (what a noisy row looks like).
    features = torch.cat([problem.x, problem.y[:, None], problem.x * (2 * problem.y[:, None] - 1)], dim=1)
    result = run_sampler(problem, settings, batch_size=50, meta_batch_size=20, seed=0,
                         prior_mean=torch.full((problem.n_train,), settings.beta), features=features,
                         weight_param=weight_param)
    clean = (~problem.noisy).numpy()
    auroc = roc_auc_score(clean, result.weight_mean)
    assert auroc >= 0.9, auroc
    assert np.all((result.weight_mean >= 0) & (result.weight_mean <= 1)) and np.all(result.weight_std >= 0)
    assert result.weight_mean[~clean].mean() < result.weight_mean[clean].mean()
