"""The posterior mean from the sampler's trajectory (`sampling.mean_estimates`, `restore(mean_level=...)`)."""

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import tiny_unet
from operators import Denoising, MatrixOperator, SuperResolution
from posterior_diff import GaussianPrior, denoiser_from_diffusers, restore
from posterior_diff.defaults import IMAGE_DEFAULTS, MEAN_LEVEL, defaults_for
from posterior_diff.sampling.mean_estimates import mean_step
from posterior_diff.sampling.samplers import SamplerSettings, grid_points

DOUBLE = torch.float64


def matrix_problem(dimension=64, rows=32, seed=0):
    """A Gaussian prior N(0, I) in `dimension` entries, y = A x + 0.1 n with a random (rows, dimension) A."""
    generator = torch.Generator().manual_seed(seed)
    prior = GaussianPrior(torch.zeros(dimension, dtype=DOUBLE), torch.eye(dimension, dtype=DOUBLE))
    operator = MatrixOperator(torch.randn(rows, dimension, generator=generator, dtype=DOUBLE) / dimension**0.5, 0.1)
    y = operator.measure(prior.sample(1, generator), generator)[0]
    return prior, operator, y


class Levels:
    """A restore callback that keeps each step's noise level and the average of its estimates."""

    def __init__(self):
        self.levels, self.means = {}, {}

    def __call__(self, step, noise_level, estimates):
        self.levels[step], self.means[step] = noise_level, estimates.mean(0)


@pytest.mark.parametrize("solver", [dict(solver="multistep"), dict(solver="heun", eta=0.0), dict(solver="pc")])
def test_the_trajectory_mean_is_the_posterior_mean_with_less_sampling_noise(solver):
    # For a Gaussian prior the Tweedie guided mean is E[x | x_s, y] exactly, so the average of N of
    # them at level s misses E[x | y] by the spread of E[x | x_s, y] / sqrt(N): the posterior
    # covariance minus Cov(x | x_s, y) = (C_post^-1 + I / s^2)^-1, per eigenvalue l^2 / (s^2 + l), at most a
    # seventh of the posterior's own spread (l <= 1) at the grid level taken, 2.45 for mean_level 3. The
    # samples' own mean carries all of it.
    # Any solver: the probability-flow ODE (heun, eta = 0) moves x_t along paths with the same marginals,
    # and the two-evaluation solvers keep the evaluation at the point the next step starts from.
    prior, operator, y = matrix_problem()
    samples, steps = Levels(), 50
    result = restore(y, operator, prior, num_samples=256, steps=steps, mean_level=3.0, callback=samples,
                     generator=torch.Generator().manual_seed(1), **solver)
    posterior = prior.posterior(operator, y)
    step = result.settings.mean_step
    level = samples.levels[step]
    assert level <= 3.0 < samples.levels[step - 1]
    remaining = torch.linalg.inv(torch.linalg.inv(posterior.cov) + torch.eye(64, dtype=DOUBLE) / level**2)
    spread = torch.trace(posterior.cov - remaining) / 256
    trajectory_error = (result.mean - posterior.mean).square().sum() / spread
    samples_error = (result.samples.mean(0) - posterior.mean).square().sum() / spread
    # trajectory_error is a chi-square with 64 degrees of freedom over 64 for exact sampling (mean 1,
    # std 0.18); 2 leaves room for the 50 steps' discretisation (conftest: up to 1.25x) and 4 std.
    # The samples' own mean sits near tr(C_post) / tr(C_post - remaining), about 7 here (4-10 over seeds 0-3).
    assert trajectory_error < 2.0
    assert samples_error > 3 * trajectory_error


def test_mean_level_zero_is_the_samples_own_mean():
    prior, operator, y = matrix_problem(dimension=8, rows=4)
    result = restore(y, operator, prior, num_samples=5, steps=10, mean_level=0.0, generator=torch.Generator().manual_seed(0))
    assert result.settings.mean_step is None
    assert torch.equal(result.mean, result.samples.mean(0))


def test_the_mean_is_the_average_of_the_callbacks_estimates_at_the_chosen_step():
    prior, operator, y = matrix_problem(dimension=8, rows=4)
    seen = Levels()
    result = restore(y, operator, prior, num_samples=6, steps=12, mean_level=0.5, batch_size=4, callback=seen,
                     generator=torch.Generator().manual_seed(0))
    # Two sampler runs (4 + 2 rows): the callback's average is the last run's, restore's both runs'.
    again = restore(y, operator, prior, num_samples=2, steps=12, mean_level=0.5, callback=seen,
                    generator=torch.Generator().manual_seed(0))
    step = result.settings.mean_step
    assert step is not None and sorted(seen.levels) == list(range(12))
    torch.testing.assert_close(again.mean, seen.means[step])
    assert not torch.equal(result.mean, result.samples.mean(0))


def test_an_image_models_mean_is_the_average_of_what_the_callback_shows():
    # Each guided mean is put in [0, 1] and clamped as a sample is, then averaged: the mean is
    # exactly what the callback shows at the chosen step, clamped pixels included.
    model = denoiser_from_diffusers(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    seen = Levels()
    y = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = restore(y, SuperResolution(2, sigma_y=0.05), model, num_samples=3, steps=6, mean_level=0.5,
                     callback=seen, generator=torch.Generator().manual_seed(0))
    assert result.settings.mean_step is not None
    torch.testing.assert_close(result.mean, seen.means[result.settings.mean_step], rtol=0, atol=1e-6)


def test_a_measurement_start_keeps_its_exact_mean_at_any_level():
    prior = GaussianPrior(torch.zeros(6, dtype=DOUBLE), torch.eye(6, dtype=DOUBLE) * 0.5)
    operator = Denoising(0.2)
    y = torch.linspace(-1, 1, 6, dtype=DOUBLE)
    exact = prior.posterior(operator, y).mean
    for level in (0.0, 0.05, 10.0):
        result = restore(y, operator, prior, num_samples=3, steps=5, mean_level=level)
        assert result.settings.start == "measurement" and result.settings.mean_step == 0
        torch.testing.assert_close(result.mean, exact)


def test_mean_step_is_the_first_grid_time_at_or_below_the_level():
    prior = GaussianPrior(torch.zeros(4), torch.eye(4))
    sampler = SamplerSettings(steps=10)
    ratios = [p.sigma / p.alpha for p in grid_points(prior.schedule, 10)]
    assert mean_step(prior.schedule, None, sampler, ratios[3]) == 3
    assert mean_step(prior.schedule, None, sampler, (ratios[3] + ratios[4]) / 2) == 4
    assert mean_step(prior.schedule, None, sampler, ratios[0] * 2) == 0
    assert mean_step(prior.schedule, None, sampler, ratios[-1] / 2) is None
    assert mean_step(prior.schedule, None, sampler, 0.0) is None
    # An image model's levels are in [0, 1] units: half its [-1, 1] ratios.
    assert mean_step(prior.schedule, (-1.0, 1.0), sampler, ratios[3] / 2) == 3


def test_defaults():
    assert IMAGE_DEFAULTS.mean_level == MEAN_LEVEL > 0
    assert defaults_for(GaussianPrior(torch.zeros(2), torch.eye(2))).mean_level == 0


@pytest.mark.parametrize("change, error, message", [
    (dict(mean_level=-0.1), ValueError, "mean_level"),
    (dict(mean_level="low"), TypeError, "mean_level"),
    (dict(mean_level=0.1, particles=8), ValueError, "mean_level does not apply in particle mode"),
    (dict(callback="print"), TypeError, "callback must be callable"),
    (dict(callback=print, particles=8), ValueError, "callback is not available in particle mode"),
])
def test_bad_mean_settings_are_refused_before_any_work(change, error, message):
    prior, operator, y = matrix_problem(dimension=4, rows=2)
    with pytest.raises(error, match=message):
        restore(y, operator, prior, steps=3, **change)
