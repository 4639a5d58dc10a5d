"""`bads`: Bayesian data-point selection — joint SGLD over θ and the row weights w (see DESIGN.md).

Pyro-style separation: `model.log_joint` is the model (written once, priors as pyro distributions); what
computes per-row losses is a `problems.SelectionProblem` (an LM here; a logistic regression in the tests);
the sampler is split as Pyro's MCMC is, a kernel (`kernel.SGLDKernel`: one step, with `sgld.SGLD`) and a
runner (`runner.run_sampler`: the loop and its hooks — progress, checkpoints, data parallelism). Swapping
the model changes nothing else.

    log p(w)            = Σ_i log Beta(w_i; a_i, b_i)            (sparsity prior; a_i, b_i from the meta-fitted
                                                                   reference in the default variant: empirical Bayes)
    log p(θ | w, D_t)   ≈ log N(θ; θ₀, s²I) − ρ Σ_i w_i ℓ̃_i(θ)   (weighted train rows as a prior on θ; Z(w) dropped)
    log p(D_m | θ)      = −Σ_j ℓ(z_j; θ)                          (the meta rows are the likelihood)

ℓ̃_i = ℓ_i − c_g(i): the default variant centres each row's loss on a running mean of its group's losses
(per-task normalisation, `baseline.GroupBaseline`; it stands in for the dropped normaliser's gradient, which
is what keeps every weight from being pushed down alike). Minibatch terms are scaled by N/B and M/B_m.

Files: config (settings), model, problems, embedding_problem (θ in the sentence embedder's space), weights (parametrisations), baseline, kernel, runner, result,
posterior (the posterior pass), priors (empirical Bayes), parallel (torchrun), timing, method
(`select_bads`), embedder_method (its embedder-θ path), scorer (`BadsScorer`, `EmbedderBadsScorer`). The names below are the package's public ones.
"""
from dpsel.select.bads.baseline import GroupBaseline
from dpsel.select.bads.config import DEFAULT_EPOCHS, BadsSettings
from dpsel.select.bads.method import EXTRA_KEYS, reference_budget, select_bads
from dpsel.select.bads.model import beta_prior_params, conditional_weight_moments, log_joint
from dpsel.select.bads.posterior import posterior_pass, posterior_pass_over_pool
from dpsel.select.bads.priors import empirical_bayes_mean, evidence_ablations, prior_evidence_z
from dpsel.select.bads.embedding_problem import EmbeddingProblem
from dpsel.select.bads.problems import LMProblem, SelectionProblem, infer_groups
from dpsel.select.bads.result import SamplerResult, coverage_summary
from dpsel.select.bads.runner import run_sampler
from dpsel.select.bads.scorer import BadsScorer, EmbedderBadsScorer
from dpsel.select.bads.timing import measure_plain_step
from dpsel.select.bads.weights import AmortizedWeights, LogitWeights

__all__ = ["EXTRA_KEYS", "AmortizedWeights", "BadsScorer", "EmbedderBadsScorer", "EmbeddingProblem", "BadsSettings", "DEFAULT_EPOCHS", "GroupBaseline", "LMProblem",
           "LogitWeights", "SamplerResult", "SelectionProblem", "beta_prior_params", "conditional_weight_moments",
           "coverage_summary", "empirical_bayes_mean", "evidence_ablations", "infer_groups", "log_joint",
           "measure_plain_step", "posterior_pass", "posterior_pass_over_pool", "prior_evidence_z",
           "reference_budget", "run_sampler", "select_bads"]
