"""Distances between sample sets and known distributions, and the calibration of posterior samples.

Conventions, for samples of shape (N, *x_shape) flattened to (N, d) and a reference
N(m, C):

- mean error: ||mean(samples) - m|| / sqrt(tr C)  (in units of the posterior spread);
- covariance error: ||cov(samples) - C||_F / ||C||_F  (relative Frobenius);
- Gaussian W2: the 2-Wasserstein distance between N(mean, cov) of the samples and N(m, C);
- trace ratio: tr cov(samples) / tr C (below 1 the samples shrink the spread, above 1 inflate it).

`exact_sample_floor` gives the errors that N exact samples achieve, the yardstick for the first three.

Calibration: `interval_coverage` is the exact posterior mass inside each coordinate's central
sample interval (nominal: the interval's level); on images, where only the truth is known,
`coverage_within_two_std` is the fraction of entries with |mean - truth| <= 2 std, to be read
against `calibrated_coverage(N)`, what exact posterior samples reach with N draws.
"""

from __future__ import annotations

import math

import torch
from scipy import stats
from torch import Tensor

ERROR_KEYS = ("mean_error", "cov_error", "w2")  # the keys of `gaussian_errors`, in report order


def sample_moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of samples (N, *), in float64."""
    flat = samples.flatten(1).to(torch.float64)
    mean = flat.mean(0)
    centred = flat - mean
    return mean, centred.T @ centred / (flat.shape[0] - 1)


def mean_error(samples: Tensor, mean: Tensor, cov: Tensor) -> float:
    estimate, _ = sample_moments(samples)
    return float((estimate - mean.flatten().to(torch.float64)).norm() / torch.trace(cov.to(torch.float64)).sqrt())


def covariance_error(samples: Tensor, cov: Tensor) -> float:
    _, estimate = sample_moments(samples)
    cov = cov.to(torch.float64)
    return float((estimate - cov).norm() / cov.norm())


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_w2(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """W2 between N(mean_a, cov_a) and N(mean_b, cov_b) (Bures formula)."""
    root_b = _psd_sqrt(cov_b.to(torch.float64))
    cross = _psd_sqrt(root_b @ cov_a.to(torch.float64) @ root_b)
    squared = (mean_a - mean_b).to(torch.float64).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(squared.clamp_min(0).sqrt())


def sample_w2(samples: Tensor, mean: Tensor, cov: Tensor) -> float:
    """Gaussian W2 between the samples' moments and N(mean, cov)."""
    estimate_mean, estimate_cov = sample_moments(samples)
    return gaussian_w2(estimate_mean, estimate_cov, mean.flatten().to(torch.float64), cov.to(torch.float64))


def gaussian_errors(samples: Tensor, mean: Tensor, cov: Tensor) -> dict[str, float]:
    """mean error, covariance error and Gaussian W2 of samples against N(mean, cov) (keys ERROR_KEYS)."""
    return {
        "mean_error": mean_error(samples, mean, cov),
        "cov_error": covariance_error(samples, cov),
        "w2": sample_w2(samples, mean, cov),
    }


def exact_sample_floor(prior, num_samples: int, repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """The average errors of `num_samples` exact draws from a GaussianPrior, over `repeats` draws."""
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    for _ in range(repeats):
        errors = gaussian_errors(prior.sample(num_samples, generator).cpu(), prior.mean.cpu(), prior.cov.cpu())
        for key, value in errors.items():
            totals[key] = totals.get(key, 0.0) + value / repeats
    return totals


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two sample sets (N, *) of equal size."""
    a, b = a.flatten(1).to(torch.float64), b.flatten(1).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_a, _ = torch.sort(a @ directions, dim=0)
    projected_b, _ = torch.sort(b @ directions, dim=0)
    return float((projected_a - projected_b).square().mean().sqrt())


def trace_ratio(samples: Tensor, cov: Tensor) -> float:
    """tr cov(samples) / tr C for samples (N, *) and C (d, d): below 1 the samples shrink the spread."""
    _, estimate = sample_moments(samples)
    return float(torch.trace(estimate) / torch.trace(cov.to(torch.float64)))


def normal_mass(lower: Tensor, upper: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """P(lower <= X <= upper) for X ~ N(mean, std^2), elementwise."""
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
    return standard.cdf((upper - mean) / std) - standard.cdf((lower - mean) / std)


def interval_coverage(samples: Tensor, mean: Tensor, cov: Tensor, level: float) -> float:
    """Mass of N(mean, cov) inside each coordinate's central `level` sample interval, averaged over coordinates.

    Args:
        samples: (N, *x_shape); mean: x_shape or (d,); cov: (d, d); level: in (0, 1), e.g. 0.9.
    Calibrated samples give `level` (up to the spread of N draws).
    """
    flat = samples.flatten(1).to(torch.float64)
    quantiles = torch.quantile(flat, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64), dim=0)
    std = cov.to(torch.float64).diagonal().clamp_min(1e-300).sqrt()
    return float(normal_mass(quantiles[0], quantiles[1], mean.flatten().to(torch.float64), std).mean())


def coverage_within_two_std(mean: Tensor, std: Tensor, truth: Tensor) -> float:
    """Fraction of entries with |mean - truth| <= 2 std (all three of one shape, e.g. (C, H, W))."""
    return float(((mean - truth).abs() <= 2 * std).double().mean())


def calibrated_coverage(num_samples: int, exact_mean: bool = False) -> float:
    """The coverage within 2 std that exact Gaussian posterior samples reach when mean and std come from N draws.

    truth - mean ~ N(0, s^2 (1 + 1/N)) and the sample std has N - 1 degrees of freedom, so the
    ratio is Student t: P(|T_{N-1}| <= 2 / sqrt(1 + 1/N)); 0.954 only as N grows.
    `exact_mean`: the mean is the posterior mean itself (restore's mean from a measurement
    start), so truth - mean ~ N(0, s^2) and the coverage is P(|T_{N-1}| <= 2).
    """
    if num_samples < 2:
        raise ValueError(f"a sample std needs at least 2 samples, got {num_samples}")
    bound = 2.0 if exact_mean else 2 / math.sqrt(1 + 1 / num_samples)
    return float(2 * stats.t.cdf(bound, df=num_samples - 1) - 1)
