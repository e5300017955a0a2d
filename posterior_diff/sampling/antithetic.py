"""Antithetic pairs of samples: the noise of one sample negated for the next.

A sampler run turns standard normal draws z (its start and every step's noise) into a sample
x = F(z). With antithetic pairs, rows 2i and 2i + 1 of a batch get z and -z. Each row is still
drawn from exactly the sampler's distribution (z and -z have the same law), so every sample is as
good a posterior sample as before; only the pairs are coupled. Where F is close to affine in z,
F(z) + F(-z) cancels the part of x that varies with z to first order, so the samples' average
carries only the higher-order part of the sampling noise that independent samples would leave in it.
For an affine F (a Gaussian prior, whose guided sampler is affine in its noise) the
pair's average is exactly the sampler's mean (docs/theory.md §5, "Antithetic pairs").

The samples' spread must then be read with the pairing in mind: the plain std of n samples
estimates Var[x] (n - 1 - rho) / (n - 1) for a within-pair correlation rho < 0, too wide.
`paired_std` splits each pair into its mean m_p = (a + b) / 2 and half-difference
d_p = (a - b) / 2, uncorrelated because a and b have the same law, with Var m = Var[x] (1 + rho) / 2
and Var d = Var[x] (1 - rho) / 2, so Var[x] = Var m + E d^2: both estimated without bias, the first
from the spread of the pair means (P - 1 degrees of freedom), the second from the half-differences
(E d = 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def paired_rows(half: Tensor, rows: int) -> Tensor:
    """Antithetic rows from `half` = (ceil(rows / 2), ...) independent draws: (rows, ...), row 2i
    being half[i] and row 2i + 1 its negation (an odd last row stays unpaired)."""
    if half.shape[0] != (rows + 1) // 2:
        raise ValueError(f"{rows} antithetic rows need {(rows + 1) // 2} draws, got {half.shape[0]}")
    return torch.stack((half, -half), dim=1).flatten(0, 1)[:rows]


def paired_std(samples: Tensor) -> Tensor:
    """The posterior std per entry from antithetic pairs (rows 2i, 2i + 1) of `samples`
    (n, *x_shape), n even: sqrt(S_m^2 + mean_p d_p^2), S_m^2 the sample variance of the P = n / 2
    pair means and d_p the half-differences (see the module docstring), unbiased for Var[x] whatever
    the pairs' correlation. With one pair the pair means' spread cannot be estimated: the plain
    sample std |a - b| / sqrt(2), wide by sqrt(1 - rho) (conservative for rho <= 0)."""
    count = samples.shape[0]
    if count % 2:
        raise ValueError(f"antithetic samples come in pairs: got {count} samples")
    if count == 2:
        return samples.std(dim=0)
    pairs = samples.reshape(count // 2, 2, *samples.shape[1:])
    means = pairs.mean(dim=1)
    half_differences = (pairs[:, 0] - pairs[:, 1]) / 2
    return (means.var(dim=0) + half_differences.square().mean(dim=0)).sqrt()
