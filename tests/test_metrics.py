import math

import pytest
import torch

from posterior_diff import GaussianPrior
from posterior_diff.metrics import covariance_error, exact_sample_floor, gaussian_w2, mean_error, sliced_wasserstein

DOUBLE = torch.float64


def test_gaussian_w2_matches_the_closed_form_in_one_dimension():
    # W2 between N(m1, s1^2) and N(m2, s2^2) is sqrt((m1 - m2)^2 + (s1 - s2)^2).
    value = gaussian_w2(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([0.0]), torch.tensor([[1.0]]))
    assert value == pytest.approx(math.sqrt(1 + 1))
    identity = torch.eye(3, dtype=DOUBLE)
    assert gaussian_w2(torch.zeros(3), identity, torch.zeros(3), identity) == pytest.approx(0.0, abs=1e-7)


def test_sample_errors_shrink_like_one_over_root_n():
    prior = GaussianPrior(torch.zeros(4, dtype=DOUBLE), torch.diag(torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=DOUBLE)))
    small = exact_sample_floor(prior, 500, repeats=20)
    large = exact_sample_floor(prior, 8000, repeats=20)
    for key in ("mean_error", "cov_error", "w2"):
        assert large[key] == pytest.approx(small[key] / 4, rel=0.35)  # sqrt(8000 / 500) = 4


def test_errors_see_a_wrong_distribution():
    prior = GaussianPrior(torch.zeros(2, dtype=DOUBLE), torch.eye(2, dtype=DOUBLE))
    draws = prior.sample(5000, torch.Generator().manual_seed(0))
    assert mean_error(draws + 0.5, prior.mean, prior.cov) > 0.3
    assert covariance_error(draws * 1.5, prior.cov) > 1.0
    generator = torch.Generator().manual_seed(1)
    same = sliced_wasserstein(draws, prior.sample(5000, generator), generator=torch.Generator().manual_seed(2))
    shifted = sliced_wasserstein(draws, prior.sample(5000, generator) + 1, generator=torch.Generator().manual_seed(2))
    assert shifted > 10 * same
