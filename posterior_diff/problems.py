"""Reference inverse problems with closed-form posteriors (THEORY section 5).

A Gaussian prior N(0, Sigma) on 8 x 8 images, Sigma from a squared-exponential kernel on
the pixel grid, observed through the three tasks of the exactness study. Because the
prior is Gaussian and the operators linear, `prior.posterior(operator, y)` is the exact
answer the samplers are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from operators import Denoising, Inpainting, LinearOperator, SuperResolution, random_mask

from .priors import GaussianPrior
from .schedules import Schedule


def squared_exponential_covariance(size: int, length_scale: float = 2.0, variance: float = 1.0, dtype=torch.float64) -> Tensor:
    """Covariance (size^2, size^2) of a size x size image: variance exp(-|p - q|^2 / (2 l^2))."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    squared_distances = torch.cdist(points, points).square()
    return variance * torch.exp(-squared_distances / (2 * length_scale**2))


@dataclass
class GaussianProblem:
    """A prior, an operator, one measurement and the exact posterior."""

    name: str
    prior: GaussianPrior
    operator: LinearOperator
    x_true: Tensor
    y: Tensor
    posterior: GaussianPrior


def gaussian_image_problems(
    size: int = 8, length_scale: float = 2.0, seed: int = 0, dtype=torch.float64, schedule: Schedule | None = None
) -> list[GaussianProblem]:
    """The exactness study's three tasks on a size x size Gaussian image prior.

    inpainting of a random 50% of pixels (sigma_y = 0.1), 2x2 average-pool
    super-resolution (sigma_y = 0.05) and denoising (sigma_y = 0.5).
    """
    generator = torch.Generator().manual_seed(seed)
    cov = squared_exponential_covariance(size, length_scale, dtype=dtype)
    # A little jitter keeps the tiny eigenvalues of the smooth kernel positive in float32 too.
    prior = GaussianPrior(torch.zeros(1, size, size, dtype=dtype), cov + 1e-6 * torch.eye(size * size, dtype=dtype), schedule)
    operators_ = {
        "inpainting": Inpainting(random_mask((1, size, size), 0.5, generator=generator).to(dtype), sigma=0.1),
        "super-resolution": SuperResolution(2, sigma=0.05),
        "denoising": Denoising(sigma=0.5),
    }
    problems = []
    for name, operator in operators_.items():
        x_true = prior.sample(1, generator)
        y = operator.measure(x_true, generator)[0]
        problems.append(GaussianProblem(name, prior, operator, x_true[0], y, prior.posterior(operator, y)))
    return problems
