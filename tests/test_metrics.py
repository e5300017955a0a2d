import math

import pytest
import torch

from posterior_diff import GaussianPrior
from posterior_diff.evaluation.metrics import (ERROR_KEYS, calibrated_coverage, coverage_within_two_std,
                                               covariance_error, exact_sample_floor, gaussian_errors, gaussian_w2,
                                               interval_coverage, mean_error, sliced_wasserstein, trace_ratio)

DOUBLE = torch.float64


def test_gaussian_w2_matches_the_closed_form_in_one_dimension():
    # W2 between N(m1, s1^2) and N(m2, s2^2) is sqrt((m1 - m2)^2 + (s1 - s2)^2).
    value = gaussian_w2(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([0.0]), torch.tensor([[1.0]]))
    assert value == pytest.approx(math.sqrt(1 + 1))  # computed in float64: rounding, measured 2e-16
    identity = torch.eye(3, dtype=DOUBLE)
    # W2 is a square root: a float64 rounding residual of 1e-15 in W2^2 becomes 3e-8
    assert gaussian_w2(torch.zeros(3), identity, torch.zeros(3), identity) == pytest.approx(0.0, abs=1e-7)


def test_sample_errors_shrink_like_one_over_root_n():
    prior = GaussianPrior(torch.zeros(4, dtype=DOUBLE), torch.diag(torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=DOUBLE)))
    # Monte Carlo: over 100 repeats each (independent seeds) 4 large / small scatters by 0.035-0.06
    # across seeds (0.11 at worst in 20), so 0.25 is 4 sd; with 20 repeats the spread was 0.125
    # and a 0.35 bound failed on 1 seed in 30.
    small = exact_sample_floor(prior, 500, repeats=100, seed=0)
    large = exact_sample_floor(prior, 8000, repeats=100, seed=1)
    for key in ("mean_error", "cov_error", "w2"):
        assert large[key] == pytest.approx(small[key] / 4, rel=0.25)  # sqrt(8000 / 500) = 4


def test_errors_see_a_wrong_distribution():
    prior = GaussianPrior(torch.zeros(2, dtype=DOUBLE), torch.eye(2, dtype=DOUBLE))
    draws = prior.sample(5000, torch.Generator().manual_seed(0))
    # 0.5 and 1.25 in expectation, 0.48-0.51 and 1.20-1.29 over 5 seeds: the bounds are far below
    assert mean_error(draws + 0.5, prior.mean, prior.cov) > 0.3
    assert covariance_error(draws * 1.5, prior.cov) > 1.0
    generator = torch.Generator().manual_seed(1)
    same = sliced_wasserstein(draws, prior.sample(5000, generator), generator=torch.Generator().manual_seed(2))
    shifted = sliced_wasserstein(draws, prior.sample(5000, generator) + 1, generator=torch.Generator().manual_seed(2))
    assert shifted > 10 * same  # 20-27x over 5 seeds


def test_gaussian_errors_report_the_error_keys():
    prior = GaussianPrior(torch.zeros(3, dtype=DOUBLE), torch.eye(3, dtype=DOUBLE))
    draws = prior.sample(100, torch.Generator().manual_seed(0))
    assert tuple(gaussian_errors(draws, prior.mean, prior.cov)) == ERROR_KEYS


def test_trace_ratio_sees_shrunk_and_inflated_samples():
    draws = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0), dtype=DOUBLE)
    identity = torch.eye(5, dtype=DOUBLE)
    # Monte Carlo: 4000 x 5 squares of N(0, 1), standard error sqrt(2 / 20000) = 0.01 (x 0.25 shrunk)
    assert trace_ratio(draws, identity) == pytest.approx(1.0, abs=0.05)
    assert trace_ratio(0.5 * draws, identity) == pytest.approx(0.25, abs=0.02)


def test_interval_coverage_is_nominal_for_exact_draws_and_high_for_too_wide_ones():
    mean, cov = torch.zeros(20, dtype=DOUBLE), torch.eye(20, dtype=DOUBLE)
    exact = torch.randn(4000, 20, generator=torch.Generator().manual_seed(0), dtype=DOUBLE)
    # Monte Carlo: over 20 seeds the coverage scattered by 0.0012 (0.9) and 0.0018 (0.5)
    assert interval_coverage(exact, mean, cov, 0.9) == pytest.approx(0.9, abs=0.01)
    assert interval_coverage(exact, mean, cov, 0.5) == pytest.approx(0.5, abs=0.02)
    assert interval_coverage(3 * exact, mean, cov, 0.5) > 0.85


def test_calibrated_coverage_is_what_exact_samples_reach():
    # Truth and N posterior draws from the same Gaussian, many times over: the fraction of truths
    # within 2 sample std of the sample mean is calibrated_coverage(N). Monte Carlo: a binomial
    # fraction of 100000 truths, standard error <= 0.0015, so 0.01 is 6.7 of them (at 20000
    # truths it was 3 for N = 2).
    generator = torch.Generator().manual_seed(0)
    for num_samples in (2, 4, 16):
        draws = torch.randn(num_samples + 1, 100_000, generator=generator, dtype=DOUBLE)
        truth, samples = draws[0], draws[1:]
        measured = coverage_within_two_std(samples.mean(0), samples.std(0), truth)
        assert measured == pytest.approx(calibrated_coverage(num_samples), abs=0.01)
        # With the exact posterior mean (0) in place of the sample mean the coverage is higher.
        measured = coverage_within_two_std(torch.zeros(100_000, dtype=DOUBLE), samples.std(0), truth)
        assert measured == pytest.approx(calibrated_coverage(num_samples, exact_mean=True), abs=0.01)
        assert calibrated_coverage(num_samples, exact_mean=True) > calibrated_coverage(num_samples) + 0.005  # closed forms
    assert calibrated_coverage(10_000) == pytest.approx(0.9545, abs=1e-3)  # 0.9545 is P(|Z| <= 2) to 4 digits
    with pytest.raises(ValueError, match="at least 2"):
        calibrated_coverage(1)


def test_calibrated_coverage_at_four_samples_is_the_student_t_value():
    assert calibrated_coverage(4) == pytest.approx(0.8284, abs=1e-4)  # P(|T_3| <= 2 / sqrt(1.25)), tables
    draws = torch.randn(200_000, 5, generator=torch.Generator().manual_seed(0))  # 4 samples and a truth
    within = ((draws[:, :4].mean(1) - draws[:, 4]).abs() <= 2 * draws[:, :4].std(1)).double().mean()
    assert float(within) == pytest.approx(calibrated_coverage(4), abs=4 * 0.0009)  # 4 binomial sds
