"""`bads`' hyperparameters: the defaults, the `paper` variant, and the run length."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from dpsel.errors import DpselInputError
from dpsel.select.base import SelectConfig

# Passes over the pool after burn-in. Two give every row at least one visit after burn-in (measured at 3,000 rows:
# min 1 / median 2 / max 3 visits), so the visit averages (the `visits_only` ablation) exist for every row; the
# default variant's weights come from the posterior pass, which needs θ trained, not every row visited.
DEFAULT_EPOCHS = 2.0


@dataclass
class BadsSettings:
    """Hyperparameters (SelectConfig.extra overrides any of them by name)."""
    steps: int | None = None          # None: from `epochs` (SelectConfig.steps / extra["steps"] override)
    epochs: float = DEFAULT_EPOCHS    # passes over the pool after burn-in (LM θ; see embed_epochs)
    # Passes after burn-in when θ is the embedder map and neither --epochs nor --steps is given: its steps cost
    # microseconds, and at 2 passes each row was visited ~2 times, too few for its weight to move off the prior
    # (issue 28); 8 visits each, measured on the real-text sets (docs/selection.md)
    embed_epochs: float = 8.0
    # The embedder θ's run length in steps when it is defaulted (embed_epochs, the default --batch-size): on pools
    # where those passes would take more steps, the train batch grows instead, so every row is still visited
    # embed_epochs times. A step costs ~3 ms at 16 rows and ~6 ms at 256 (θ is a d×d map; the per-step cost is
    # Python and the meta term), so the pool's rows then cost ~10x less each (5k rows, seed 0: AUROC 0.743 at a
    # batch of 16, 0.747 at 256). 0: no cap.
    embed_max_steps: int = 20_000
    burn_in: float = 0.25             # fraction of steps before averaging starts
    posterior_pass: bool = True       # score every row under θ draws after the run (Rao-Blackwellised, below)
    theta_draws: int = 4              # θ snapshots kept after burn-in for the posterior pass
    ref_fraction: float = 0.5         # meta reference fit capped at this fraction of the run (ref_steps overrides)
    refresh_prior: str = "min"        # posterior pass: "min" (prior from reference and θ, see posterior_pass) | "none"
    min_visits: int = 2               # without the posterior pass: rows visited fewer times get the weight net
    beta: float = 0.7                 # prior expected kept fraction
    # Prior concentration a + b. 12 since the prior carries two kinds of evidence (reference loss and group
    # consistency): measured on 3k rows, seeds 0 / 1, AUROC 0.802 / 0.827 at 6, 0.813 / 0.829 at 12. The paper
    # form keeps 6 (its flat prior carries no evidence).
    kappa: float = 12.0
    rho: float = 3.0                  # weight of the train-likelihood term on w (measured: 1 → 0.69, 3 → 0.75 AUROC)
    prior_scale: float = 1.0          # s: std of the Gaussian prior on θ around θ₀ (0.05 kept θ from learning)
    lr_theta: float = 1e-3
    lr_w: float = 0.5                 # per-visit Langevin step of a free logit (its 1-D conditional has curvature ~κ/4)
    lr_phi: float = 1e-3
    temperature_theta: float = 1e-3   # cold posterior on θ (pSGLD with a small temperature)
    temperature_w: float = 1.0        # the weights are sampled at the true posterior temperature
    precondition: bool = True         # pSGLD
    decay_gamma: float = 0.33         # polynomial step-size decay ε_t = ε (1 + t/t0)^-γ
    decay_t0: float = 200.0
    anchor: str = "meta"              # θ₀: "meta" (short fit on meta) | "base"
    eb_prior: bool = True             # Beta prior means from the reference's per-group loss ranks
    eb_gamma: float = 1.0             # how sharply the reference ranks move the prior mean
    group_consistency: bool = True    # prior evidence: does the answer look like its group's? (select/consistency.py)
    semantic: bool = True             # prior evidence from the embedder (select/semantic.py)
    embedder: str = "default"         # SelectConfig.embedder: a sentence-transformers folder / hub id, or "none"
    centre_losses: str = "group"      # "group" | "global" | "none"
    standardise_losses: bool = True   # divide centred losses by the group's running std
    baseline_momentum: float = 0.95
    rao_blackwell: bool = True        # logits: average E[w_i | θ, ℓ̃_i] (1-D quadrature) at each visit, not the draw
    diag_every: int = 10
    weight_hidden: int = 32
    # θ's space: "embedder" (a question→answer map in the sentence embedder's space, embedding_problem.py),
    # "lm" (the causal LM's parameters) or "auto": the embedder when it loads and the model is the built-in,
    # language-free `tiny` (a real --model, --variant paper, torchrun or no embedder keep the LM; the run says so)
    theta_space: str = "auto"
    embed_alpha: float = 1.0          # ridge penalty of the embedding maps (θ₀ and the meta-only reference)
    embed_loss_scale: float = 0.1     # τ in ℓ = (1 − cos)/τ: losses on the scale of an LM's per-token NLL
    fluency: bool = True              # prior evidence: word-order fluency of the answer (select/fluency.py)
    # Fluency's robust z is lowered by this before the prior's `max`, so only the clearly disfluent tail counts
    # (docstring set, seed 0, embedder θ: margin 0 → AUROC 0.872, wrong 0.67; margin 1 → 0.869, wrong 0.73)
    fluency_margin: float = 1.0
    # Pseudo-groups (k-means of the instructions) where the pool has no group column. None: on for the LM θ, off
    # for the embedder θ, whose question–answer evidence they only add noise to (docstring set, seed 0: 0.684
    # AUROC alone; the prior's `max` with them 0.789, without them 0.865)
    pseudo_groups: bool | None = None
    # How the prior's evidence becomes prior means: "tail" (each source calibrated on the meta rows into P(bad),
    # noisy-or, calibration.py), "max" (the robust z's `max`), or "auto": tail for the embedder θ, max for the LM θ.
    # Tail leaves the embedder's meta-only reference map out of the prior: it is the question–answer map again,
    # fitted on 150 rows instead of the pool (tuned on the docstring set, seed 0: max 0.875 → tail 0.876, and
    # tail with the reference 0.865)
    prior_combine: str = "auto"
    # Answer-quality evidence (select/quality.py: repetition, debris, language, completeness, echo, template
    # frequency, genericness), each calibrated on meta into the prior's noisy-or (`tail` rule only) and read by θ's
    # quality density (embedder θ)
    quality: bool = True
    # The same run's ablation scores (Scores.alternatives: each evidence source alone, the prior alone, θ alone,
    # the posterior pass from the prior without each kind of evidence): what benchmarks/selection.py reports. Off
    # by default: a run writes none of them, and each ablation prior costs one more posterior-pass average and
    # a few per-row arrays (at 1M rows, most of the posterior pass's time).
    ablations: bool = False

    @classmethod
    def for_variant(cls, variant: str, extra: dict) -> "BadsSettings":
        base = cls()
        if variant == "paper":
            # The plain form: θ anchored at the base model, symmetric Beta prior, raw losses, plain SGLD at T = 1.
            base = cls(anchor="base", eb_prior=False, centre_losses="none", standardise_losses=False,
                       precondition=False, temperature_theta=1.0, lr_theta=1e-6, prior_scale=1.0,
                       posterior_pass=False, group_consistency=False, semantic=False, kappa=6.0,
                       fluency=False, theta_space="lm", quality=False)
        elif variant != "default":
            raise DpselInputError(f"unknown bads variant {variant!r}; use 'default' or 'paper'")
        names = {f.name for f in fields(cls)}
        overrides = {k: v for k, v in extra.items() if k in names}
        return cls(**{**asdict(base), **overrides})

    @classmethod
    def from_config(cls, config: SelectConfig) -> "BadsSettings":
        """The variant's settings with the run's overrides: `extra`, then --epochs, then --steps (which wins)."""
        settings = cls.for_variant(config.variant, config.extra)
        settings.embedder = config.extra.get("embedder", config.embedder)
        settings.epochs_given = "epochs" in config.extra or "steps" in config.extra
        if config.epochs is not None:
            settings.epochs, settings.steps = float(config.epochs), None
        if config.steps is not None:
            settings.steps = int(config.steps)
        settings.epochs_given = settings.epochs_given or config.epochs is not None or config.steps is not None
        return settings

    epochs_given: bool = False        # set by from_config: the run length was asked for (the embedder θ keeps it)

    def embed_batch_size(self, n_rows: int, batch_size: int) -> int:
        """The embedder θ's train batch: `batch_size`, or where the run length and the batch are both defaulted and
        `embed_max_steps` would be passed, the smallest batch that keeps the run within it."""
        if self.epochs_given or self.steps is not None or not self.embed_max_steps \
                or batch_size != SelectConfig.batch_size:
            return batch_size
        grown = max(batch_size, math.ceil(self.epochs / (1.0 - self.burn_in) * n_rows / self.embed_max_steps))
        while grown < n_rows and self.resolve_steps(n_rows, grown) > self.embed_max_steps:
            grown += 1   # the last partial batch of each pass is a step too
        return grown

    def resolve_steps(self, n_rows: int, batch_size: int) -> int:
        """Run length: the explicit `steps`, else `epochs` passes over the pool after a `burn_in` fraction."""
        if self.steps is not None:
            return int(self.steps)
        batches_per_pass = math.ceil(n_rows / batch_size)
        return max(1, math.ceil(self.epochs * batches_per_pass / (1.0 - self.burn_in)))
