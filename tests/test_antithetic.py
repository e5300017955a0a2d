"""Antithetic pairs of samples (`sampling.antithetic`, `restore(antithetic=...)`)."""

import pytest
import torch

from operators import SuperResolution
from posterior_diff import memory, restore, restore_batch
from posterior_diff.memory import peak_bytes_per_row
from posterior_diff.sampling.antithetic import paired_rows, paired_std
from posterior_diff.sampling.samplers import NoiseSource
from test_mean_estimates import matrix_problem
from test_memory import image_model as tiny_image_model, measurement as small_image

DOUBLE = torch.float64


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def gaussian_problem():
    """N(0, I) in 16 entries seen through a random (8, 16) matrix, sigma_y 0.1."""
    return matrix_problem(dimension=16, rows=8)


@pytest.fixture(scope="module")
def image_model():
    """A tiny random UNet as an image model, whose defaults draw antithetic pairs."""
    return tiny_image_model()


def test_rows_come_in_pairs_of_a_draw_and_its_negation():
    half = torch.randn(3, 5, generator=seeded(0))
    rows = paired_rows(half, 5)
    assert torch.equal(rows[0::2], half) and torch.equal(rows[1::2], -half[:2])  # the odd last row is alone
    with pytest.raises(ValueError, match="need 3 draws"):
        paired_rows(half[:2], 5)


def test_each_block_of_a_noise_source_pairs_its_own_rows_from_its_own_generator():
    source = NoiseSource(((seeded(0), 4), (seeded(1), 2)), antithetic=True)
    draws = source.randn((6, 3), "cpu", DOUBLE)
    # block k's first rows are what its generator alone draws for half its rows
    assert torch.equal(draws[0:4:2], torch.randn(2, 3, generator=seeded(0), dtype=DOUBLE))
    assert torch.equal(draws[4], torch.randn(3, generator=seeded(1), dtype=DOUBLE))
    assert torch.equal(draws[1::2], -draws[0::2])


def test_the_paired_std_is_unbiased_whatever_the_pairs_correlation():
    # pairs of entries with variance 4 and correlation -0.6: a = 2 (sqrt(0.2) u + sqrt(0.8) v), b = 2 (sqrt(0.2) u
    # - sqrt(0.8) v). Over 100,000 entries the average of the estimated variance has a standard error under
    # 0.03 (the estimator's variance is a few sigma^4 = 16 per entry); the plain sample variance of the 4
    # samples expects 4 (3 - rho) / 3 = 4.8.
    u, v = torch.randn(2, 2, 100_000, generator=seeded(0), dtype=DOUBLE)
    a = 2 * (0.2**0.5 * u + 0.8**0.5 * v)
    b = 2 * (0.2**0.5 * u - 0.8**0.5 * v)
    samples = torch.stack((a[0], b[0], a[1], b[1])) + 3.0  # rows 2i, 2i + 1 paired; any mean
    assert paired_std(samples).square().mean() == pytest.approx(4.0, abs=0.15)
    assert samples.var(dim=0).mean() == pytest.approx(4.8, abs=0.15)
    with pytest.raises(ValueError, match="in pairs"):
        paired_std(samples[:3])


def test_on_a_gaussian_prior_every_pair_averages_to_the_samplers_own_mean():
    # The guided sampler on a Gaussian prior is affine in its noise (the prior's denoiser and the
    # isotropic guidance are affine in x_t), so a pair's average does not depend on the draws at all:
    # two seeds agree to float64 rounding, and sit at the posterior mean up to the 50 steps'
    # discretisation, far closer than the average of two independent samples.
    prior, operator, y = gaussian_problem()
    settings = dict(num_samples=2, steps=50, covariance="isotropic", antithetic=True)
    first = restore(y, operator, prior, generator=seeded(3), **settings)
    second = restore(y, operator, prior, generator=seeded(4), **settings)
    assert not torch.allclose(first.samples, second.samples)
    torch.testing.assert_close(first.mean, second.mean, rtol=0, atol=1e-10)
    posterior = prior.posterior(operator, y)
    independent = restore(y, operator, prior, generator=seeded(3), **{**settings, "antithetic": False})
    spread = posterior.cov.trace()
    assert (first.mean - posterior.mean).square().sum() < 0.01 * spread
    assert (independent.mean - posterior.mean).square().sum() > 10 * (first.mean - posterior.mean).square().sum()


def test_image_models_pair_by_default_where_the_counts_allow(image_model):
    operator = SuperResolution(2, sigma_y=0.05)
    even = restore(small_image(), operator, image_model, num_samples=4, steps=2, generator=seeded(0))
    assert even.settings.antithetic
    # the pairs' samples differ, and their std is the paired one
    assert not torch.allclose(even.samples[0], even.samples[1])
    torch.testing.assert_close(even.std, paired_std(even.samples))
    for odd in (dict(num_samples=3), dict(num_samples=4, batch_size=3)):
        assert not restore(small_image(), operator, image_model, steps=2, **odd).settings.antithetic
    prior, matrix, y = gaussian_problem()
    assert not restore(y, matrix, prior, num_samples=4, steps=2).settings.antithetic  # analytic priors: independent


@pytest.mark.parametrize("options, message", [
    (dict(num_samples=3, antithetic=True), r"num_samples \(3\) and batch_size \(None\) must be even"),
    (dict(num_samples=4, batch_size=3, antithetic=True), r"batch_size \(3\) must be even"),
    (dict(num_samples=4, particles=4, antithetic=True), "particle mode"),
])
def test_pairs_that_cannot_be_made_are_refused(options, message):
    prior, operator, y = gaussian_problem()
    with pytest.raises(ValueError, match=message):
        restore(y, operator, prior, steps=2, **options)
    with pytest.raises(TypeError, match="antithetic must be True, False or None"):
        restore(y, operator, prior, steps=2, antithetic="yes")


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_batch_item_is_restore_with_its_generator(batch_size):
    prior, operator, y = gaussian_problem()
    other = operator.measure(prior.sample(1, seeded(5)), seeded(6))[0]
    settings = dict(num_samples=4, steps=4, covariance="isotropic", antithetic=True, batch_size=batch_size)
    alone = restore(y, operator, prior, generator=seeded(7), **settings)
    batch = restore_batch([other, y], operator, prior, generator=[seeded(8), seeded(7)], **settings)
    torch.testing.assert_close(batch[1].samples, alone.samples, rtol=0, atol=1e-10)
    torch.testing.assert_close(batch[1].std, alone.std, rtol=0, atol=1e-10)


def test_a_memory_limited_batch_keeps_its_pairs_whole(image_model, monkeypatch):
    per_row = peak_bytes_per_row(image_model, (3, 16, 16), True)
    monkeypatch.setattr(memory, "PROBE_ROW_PIXELS", 0)
    room = memory.OVERHEAD * per_row / memory.HEADROOM  # the memory one row may take
    options = dict(num_samples=4, steps=2, covariance="isotropic", generator=seeded(0))
    monkeypatch.setattr(memory, "available_bytes", lambda: int(3.5 * room))  # room for 3 rows: runs of 2
    split = restore(small_image(), SuperResolution(2, sigma_y=0.05), image_model, **options)
    assert split.settings.batch_size == 2 and split.settings.antithetic and split.settings.memory_limited
    monkeypatch.setattr(memory, "available_bytes", lambda: int(1.5 * room))  # one row: no pair fits
    single = restore(small_image(), SuperResolution(2, sigma_y=0.05), image_model, **options)
    assert single.settings.batch_size == 1 and not single.settings.antithetic


@pytest.mark.parametrize("batch_size", [None, 2, 4])
def test_with_one_generator_for_a_batch_every_pair_lies_within_one_measurement(batch_size):
    # the affine sampler of a Gaussian prior: an item's mean is its pairs' common average only where each
    # pair holds two samples of that item, so it cannot depend on the seed however the runs cut the rows
    prior, operator, y = gaussian_problem()
    other = operator.measure(prior.sample(1, seeded(5)), seeded(6))[0]
    settings = dict(num_samples=2, steps=4, covariance="isotropic", antithetic=True, batch_size=batch_size)
    first, second = (restore_batch([other, y, other], operator, prior, generator=seeded(seed), **settings)
                     for seed in (0, 1))
    for a, b in zip(first, second):
        assert not torch.allclose(a.samples, b.samples)
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-10)
