import functools

import pytest
import torch

from posterior_diff import (GaussianMixturePrior, GaussianPrior, NonFiniteSampleError, RectifiedFlow, VESchedule,
                            VPSchedule, sample)
from posterior_diff.evaluation.metrics import sample_moments, sliced_wasserstein

DOUBLE = torch.float64


def mixture(schedule=None):
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=DOUBLE)
    covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]), 0.1 * torch.eye(2), torch.tensor([[0.5, -0.2], [-0.2, 0.3]])]).to(DOUBLE)
    return GaussianMixturePrior(torch.tensor([0.5, 0.3, 0.2]), means, covs, schedule)


@pytest.mark.parametrize(
    "schedule, solver, eta",
    [
        (VPSchedule(), "multistep", 1.0),
        (VPSchedule(), "multistep", 0.0),
        (VESchedule(0.01, 50.0), "multistep", 0.5),
        (RectifiedFlow(), "multistep", 0.0),
        (VPSchedule(), "heun", 0.0),
        (VPSchedule(), "pc", 1.0),
        (VPSchedule(), "multistep", 2.0),
    ],
    ids=["vp-sde", "vp-ode", "ve-eta0.5", "rf-ode", "heun", "pc", "vp-eta2"],
)
def test_unconditional_sampling_reproduces_a_mixture_prior(schedule, solver, eta):
    """Sliced Wasserstein to exact draws is as small as between two sets of exact draws."""
    prior = mixture(schedule)
    n = 3000
    drawn, _ = sample(prior, (n, 2), steps=60, eta=eta, solver=solver, generator=torch.Generator().manual_seed(0))
    exact = prior.sample(n, torch.Generator().manual_seed(1))
    distance = sliced_wasserstein(drawn, exact, generator=torch.Generator().manual_seed(3))
    assert distance < exact_distance_bound(n), (distance, exact_distance_bound(n))


@functools.cache
def exact_distance_bound(n: int, pairs: int = 10) -> float:
    """Where the sliced Wasserstein distance between two sets of n exact mixture draws stays: the mean
    over `pairs` pairs plus 4 standard deviations. One pair is no yardstick: the share of draws in
    each mode varies, and one pair's distance ranges 0.03-0.21 at n = 3000 (mean 0.09, sd 0.03-0.05),
    while a sampler that misses the mixture sits at 6 (test_a_too_coarse_sampler_...)."""
    prior = mixture()  # the schedule is the sampler's; exact draws do not depend on it
    distances = torch.tensor([
        sliced_wasserstein(prior.sample(n, torch.Generator().manual_seed(1000 + 2 * k)),
                           prior.sample(n, torch.Generator().manual_seed(1001 + 2 * k)),
                           generator=torch.Generator().manual_seed(3))
        for k in range(pairs)], dtype=DOUBLE)
    return float(distances.mean() + 4 * distances.std())


def test_a_too_coarse_sampler_is_detected_by_the_same_measure():
    """The test above can fail: a first-order sampler with 4 steps misses the mixture."""
    prior = mixture()
    drawn, _ = sample(prior, (3000, 2), steps=4, eta=1.0, solver="euler_maruyama", generator=torch.Generator().manual_seed(0))
    exact = prior.sample(3000, torch.Generator().manual_seed(1))
    assert sliced_wasserstein(drawn, exact, generator=torch.Generator().manual_seed(3)) > 3 * exact_distance_bound(3000)


@pytest.mark.parametrize("solver, eta", [("multistep", 1.0), ("euler", 0.5), ("heun", 0.0), ("pc", 1.0), ("euler_maruyama", 1.0),
                                         ("multistep", 3.0)])
def test_every_solver_gets_the_variance_of_a_gaussian_right(solver, eta):
    prior = GaussianPrior(torch.tensor([0.5, -1.0], dtype=DOUBLE), torch.diag(torch.tensor([1.0, 0.04], dtype=DOUBLE)))
    drawn, _ = sample(prior, (20000, 2), steps=200, eta=eta, solver=solver, generator=torch.Generator().manual_seed(0))
    mean, cov = sample_moments(drawn)
    # Monte Carlo at N = 20000: the mean's standard error is sqrt(1 / N) = 0.007 (atol: 4 of them), a
    # variance's relative one sqrt(2 / N) = 0.01 (rtol: 10 of them, room for 200 steps' discretisation).
    assert torch.allclose(mean, prior.mean, atol=0.03)
    assert torch.allclose(torch.diagonal(cov), torch.tensor([1.0, 0.04], dtype=DOUBLE), rtol=0.1)


def test_nfe_counts_and_generator_reproducibility():
    prior = mixture()
    a, nfe = sample(prior, (5, 2), steps=12, generator=torch.Generator().manual_seed(7))
    b, _ = sample(prior, (5, 2), steps=12, generator=torch.Generator().manual_seed(7))
    c, _ = sample(prior, (5, 2), steps=12, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and nfe == 12
    assert sample(prior, (5, 2), steps=12, eta=0.0, solver="heun")[1] == 23
    assert sample(prior, (5, 2), steps=12, solver="pc")[1] == 23


def test_non_finite_values_stop_the_sampler_naming_the_step():
    class Exploding(GaussianPrior):
        def forward(self, x_t, t):
            out = super().forward(x_t, t)
            return out / 0 if float(t[0]) < 0.5 else out

    prior = Exploding(torch.zeros(2, dtype=DOUBLE), torch.eye(2, dtype=DOUBLE))
    with pytest.raises(NonFiniteSampleError, match=r"step \d+ \(t="):
        sample(prior, (3, 2), steps=10, eta=0.0, solver="euler")


@pytest.mark.parametrize("kwargs, message", [
    (dict(eta=-0.5), "eta"), (dict(eta=float("inf")), "eta must be finite"), (dict(eta=float("nan")), "eta"),
    (dict(eta=1.5, solver="euler_maruyama"), r"euler_maruyama.*eta in \[0, 1\]"), (dict(solver="rk4"), "solver"),
    (dict(solver="heun", eta=1.0), "eta=0"), (dict(steps=0), "steps")])
def test_bad_sampler_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(mixture(), (2, 2), **kwargs)


def test_progress_bar_reports_every_step(capsys):
    """A bar of `progress(total)` sees one update(1) per step, in order, then close(); the tqdm bar
    (progress=True, which tqdm redraws at most every 0.1 s) ends at 7/7."""

    class RecordingBar:
        def __init__(self, total):
            self.total, self.updates, self.closed = total, [], False

        def update(self, n):
            assert not self.closed
            self.updates.append(n)

        def close(self):
            self.closed = True

    bars = []
    sample(mixture(), (2, 2), steps=7, progress=lambda total: bars.append(RecordingBar(total)) or bars[-1])
    assert len(bars) == 1 and bars[0].total == 7 and bars[0].updates == [1] * 7 and bars[0].closed
    sample(mixture(), (2, 2), steps=7, progress=True)
    assert "7/7" in capsys.readouterr().err


def test_on_an_accelerator_the_finiteness_checks_are_read_every_few_steps():
    """FiniteGuard for a CUDA device reads its flag every FINITE_CHECK_EVERY steps (one stall per
    window instead of two per step) and still stops the run, naming the window; on the CPU at once."""
    from posterior_diff.sampling.samplers import FINITE_CHECK_EVERY, FiniteGuard, GridPoint

    def point(index):
        return GridPoint(index, 1.0 - index / 100, 1.0, 0.1, 0.0, 0.0)

    bad = torch.tensor([float("nan")])
    lazy = FiniteGuard(torch.device("cuda"))
    for index in range(1, FINITE_CHECK_EVERY):
        lazy.observe(bad if index == 4 else torch.ones(1), "the denoiser returned", point(index))  # no read yet
    with pytest.raises(NonFiniteSampleError, match=rf"between step 1 .* and step {FINITE_CHECK_EVERY} "):
        lazy.observe(torch.ones(1), "the denoiser returned", point(FINITE_CHECK_EVERY))
    eager = FiniteGuard(torch.device("cpu"))
    eager.observe(torch.ones(1), "the denoiser returned", point(1))
    with pytest.raises(NonFiniteSampleError, match=r"the denoiser returned non-finite values at step 2 \(t="):
        eager.observe(bad, "the denoiser returned", point(2))
    tail = FiniteGuard(torch.device("cuda"))
    tail.observe(bad, "the sampler produced", point(11))
    with pytest.raises(NonFiniteSampleError, match="at step 11"):
        tail.read(point(11))  # the run's last read, after the final denoising


def test_a_run_from_a_given_start_begins_at_its_noise_ratio():
    from posterior_diff.sampling.samplers import SamplerSettings, run_sampler

    prior = GaussianPrior(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    start = torch.full((3, 4), 0.5, dtype=torch.float64)
    settings = SamplerSettings(steps=5, eta=0.0, s_max=1e-2)
    x0, nfe = run_sampler(prior, (3, 4), settings, start=start)
    # from so little noise the ODE barely moves: x_0 ~ x_t / alpha, shrunk a little by the prior
    assert nfe == 5 and torch.allclose(x0, torch.full_like(x0, 0.5), atol=0.02)
    with pytest.raises(ValueError, match="needs its start sample"):
        run_sampler(prior, (3, 4), settings)
    with pytest.raises(ValueError, match="only such a run"):
        run_sampler(prior, (3, 4), SamplerSettings(steps=5), start=start)
    with pytest.raises(ValueError, match="batch's shape"):
        run_sampler(prior, (2, 4), settings, start=start)
    with pytest.raises(ValueError, match="s_max must exceed s_min"):
        SamplerSettings(steps=5, s_max=1e-3)
