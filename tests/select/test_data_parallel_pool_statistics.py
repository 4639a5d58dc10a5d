"""Data-parallel bads computes its per-pool statistics over the whole pool: two ranks (threads standing in for
torchrun's processes, with the collectives done in memory) score every row exactly as one process does."""
from __future__ import annotations

import threading

import numpy as np
import torch

from dpsel.parallel.collectives import DataParallel
from dpsel.select.bads import BadsSettings, GroupBaseline, posterior_pass_over_pool

N, WORLD = 37, 2   # an odd pool: the shards differ in size


class _Exchange:
    """all_gather between threads: each rank puts its value in, every rank gets all of them in rank order."""

    def __init__(self, world: int):
        self.barrier, self.slots = threading.Barrier(world, timeout=60), [None] * world

    def all_gather(self, rank: int, value) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()   # nobody overwrites a slot before every rank has read it
        return gathered


class _ThreadRank(DataParallel):
    """DataParallel whose collectives go through an in-memory exchange instead of a process group."""

    def __init__(self, rank: int, exchange: _Exchange):
        super().__init__(rank=rank, world=WORLD, device=torch.device("cpu"))
        self.exchange = exchange

    def gather_rows(self, local):
        return np.concatenate(self.exchange.all_gather(self.rank, np.asarray(local)))

    def sum_over_ranks(self, values):
        return sum(self.exchange.all_gather(self.rank, values.detach().clone()))


class _LinearLosses:
    """Row i's loss under θ (a scalar): base_i + slope_i · θ — enough for the posterior pass."""

    def __init__(self, base: torch.Tensor, slope: torch.Tensor, groups: np.ndarray):
        self.base, self.slope, self.groups = base, slope, groups
        self.n_train = len(base)
        self.theta_value = torch.nn.Parameter(torch.zeros(()))

    def theta(self):
        return [self.theta_value]

    def all_losses(self):
        with torch.no_grad():
            return (self.base + self.slope * self.theta_value).float()


def _pool():
    g = torch.Generator().manual_seed(0)
    base, slope = torch.rand(N, generator=g) * 3, torch.randn(N, generator=g)
    groups = np.arange(N) % 3
    prior_mean = torch.rand(N, generator=g, dtype=torch.float64) * 0.6 + 0.2
    draws = [[torch.tensor(v)] for v in (-0.5, 0.0, 0.7)]
    return base, slope, groups, prior_mean, draws


def _run_ranks(work) -> list:
    exchange, results = _Exchange(WORLD), [None] * WORLD

    def run(rank):
        results[rank] = work(_ThreadRank(rank, exchange))
    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results), "a rank failed (see the thread's traceback)"
    return results


def test_two_rank_posterior_pass_scores_every_row_as_one_process():
    base, slope, groups, prior_mean, draws = _pool()
    settings = BadsSettings(ablations=True)   # the pass without the refresh too
    one = _LinearLosses(base, slope, groups)
    single = posterior_pass_over_pool(one, one.theta(), draws, prior_mean, torch.as_tensor(groups), settings)

    def rank_pass(dp: DataParallel, data_parallel: bool):
        rows = dp.shard(N)
        shard = _LinearLosses(base[rows], slope[rows], groups[rows])
        return posterior_pass_over_pool(shard, shard.theta(), draws, prior_mean[rows],
                                        torch.as_tensor(groups[rows]), settings, dp if data_parallel else None)

    for key in ("mean", "std", "theta_loss", "reference_prior_mean"):
        two = np.concatenate([r[key] for r in _run_ranks(lambda dp: rank_pass(dp, True))])
        np.testing.assert_allclose(two, single[key], rtol=0, atol=1e-9, err_msg=key)
    # What the pool-wide statistics fix: each shard standardised and ranked on its own scores rows differently.
    per_shard = np.concatenate([r["mean"] for r in _run_ranks(lambda dp: rank_pass(dp, False))])
    assert np.abs(per_shard - single["mean"]).max() > 1e-3


def test_pooled_group_baseline_is_the_global_minibatch_baseline():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(12, generator=g) * 4, torch.randint(0, 3, (12,), generator=g)) for _ in range(5)]
    whole = GroupBaseline(3, 0.9, "group", True)
    for losses, groups in batches:
        whole.update(losses, groups)

    def rank_updates(dp: DataParallel):
        baseline = GroupBaseline(3, 0.9, "group", True)
        for losses, groups in batches:
            rows = dp.shard(len(losses))
            baseline.update(losses[rows], groups[rows], pooled=dp.sum_over_ranks)
        return baseline
    for baseline in _run_ranks(rank_updates):
        torch.testing.assert_close(baseline.mean, whole.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(baseline.var, whole.var, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- checkpoints under torchrun

def test_rank_checkpoints_are_per_rank_with_rank_zeros_reference(tmp_path):
    from dpsel.resume.checkpoints import Checkpoints, RankCheckpoints

    base = Checkpoints(tmp_path / "ckpt", {"run": 1}, every_s=3600.0)

    def save_and_load(dp: DataParallel):
        ranked = RankCheckpoints(base, dp)
        ranked.save("reference", {"theta": torch.full((2,), float(dp.rank))}, {"steps": 3})
        ranked.save("sampler", {"w": torch.full((3,), float(dp.rank))}, {"step": 7})
        return ranked.load("sampler"), ranked.load("reference")
    results = _run_ranks(save_and_load)
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert names == ["reference.safetensors", "sampler.rank0.safetensors", "sampler.rank1.safetensors"]
    for rank, (sampler, reference) in enumerate(results):
        assert sampler[1]["step"] == 7 and float(sampler[0]["w"][0]) == rank     # its own shard's state
        assert float(reference[0]["theta"][0]) == 0.0                              # rank 0's reference


def test_rank_checkpoints_save_together_and_resume_only_a_common_step(tmp_path):
    from dpsel.resume.checkpoints import Checkpoints, RankCheckpoints

    def run(dp: DataParallel):
        # Only rank 1 is due: both ranks save the same step (a resume needs every rank at one step).
        base = Checkpoints(tmp_path / "ckpt", {"run": 1}, every_s=0.0 if dp.rank == 1 else 3600.0)
        ranked = RankCheckpoints(base, dp)
        ranked.after_step("sampler", lambda: ({"x": torch.zeros(1)}, {"step": 5}))
        ranked.loop_done()
        first = ranked.load("sampler")
        if dp.rank == 0:   # rank 0's file moves on alone (as a kill between the ranks' saves leaves it)
            base.save("sampler.rank0", {"x": torch.zeros(1)}, {"step": 9})
        dp.gather_rows(np.zeros(1))   # both ranks past the save
        return first, ranked.load("sampler")
    for first, mixed in _run_ranks(run):
        assert first[1]["step"] == 5
        assert mixed is None   # steps 9 and 5: no common step, the stage starts from zero (announced)


def test_resume_with_another_process_count_is_refused_naming_both(tmp_path, monkeypatch):
    import pytest

    from dpsel.resume.checkpoints import Checkpoints
    from dpsel.errors import DpselInputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    two = Checkpoints.open(tmp_path / "out", {"method": "bads"})
    two.save("sampler.rank0", {"x": torch.zeros(1)}, {"step": 1})
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(DpselInputError, match=r"with 2 process\(es\).*this run has 1"):
        Checkpoints.open(tmp_path / "out", {"method": "bads"})
    assert Checkpoints.open(tmp_path / "out", {"method": "bads"}, restart=True).fingerprint["processes"] == 1
