"""Reference inverse problems with closed-form posteriors (docs/theory.md §7).

- `gaussian_image_problems`: a Gaussian prior N(0, Sigma) on 8 x 8 images, Sigma from a
  squared-exponential kernel on the pixel grid, observed through the three tasks of the
  exactness study.
- `mixture_problem`: the Gaussian-mixture benchmark of MCGdiff (Cardoso et al. 2023,
  arXiv 2308.07983), multimodal, where Gaussian approximations of p(x_0 | x_t) are not exact.

The operators are linear, so `prior.posterior(operator, y)` is the exact answer the
samplers are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from operators import Denoising, Inpainting, LinearOperator, MatrixOperator, SuperResolution, random_mask

from posterior_diff.models.priors import GaussianMixturePrior, GaussianPrior
from posterior_diff.schedules import Schedule


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
        "inpainting": Inpainting(random_mask((1, size, size), 0.5, generator=generator).to(dtype), sigma_y=0.1),
        "super-resolution": SuperResolution(2, sigma_y=0.05),
        "denoising": Denoising(sigma_y=0.5),
    }
    problems = []
    for name, operator in operators_.items():
        x_true = prior.sample(1, generator)
        y = operator.measure(x_true, generator)[0]
        problems.append(GaussianProblem(name, prior, operator, x_true[0], y, prior.posterior(operator, y)))
    return problems


@dataclass
class MixtureProblem:
    """A mixture prior, a matrix operator, one measurement and the exact (mixture) posterior."""

    name: str
    prior: GaussianMixturePrior
    operator: MatrixOperator
    x_true: Tensor
    y: Tensor
    posterior: GaussianMixturePrior


def mixture_problem(dimension: int, measurements: int, seed: int = 0, dtype=torch.float64,
                    schedule: Schedule | None = None) -> MixtureProblem:
    """The MCGdiff Gaussian-mixture problem in `dimension` d with `measurements` d_y.

    Prior: 25 components N(mu_ij, I), mu_ij = (8 i, 8 j, 8 i, 8 j, ...) for i, j in {-2, ..., 2},
    weights w_ij = z_ij^2 / sum z^2 with z standard normal. Operator: take the SVD
    U S V^T of a standard Gaussian d_y x d matrix and replace S by sorted U(0, 1) draws;
    sigma_y = u max(S) with u ~ U(0, 1). The measurement is y = A x + sigma_y n, x from the prior.
    """
    if dimension < 2 or dimension % 2 or not 1 <= measurements <= dimension:
        raise ValueError(f"need an even dimension >= 2 and 1 <= measurements <= dimension, got {dimension}, {measurements}")
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(-2, 3, dtype=dtype) * 8
    pairs = torch.cartesian_prod(grid, grid)  # (25, 2)
    means = pairs.repeat(1, dimension // 2)  # (25, d)
    weights = torch.randn(25, generator=generator, dtype=dtype) ** 2
    covs = torch.eye(dimension, dtype=dtype).expand(25, dimension, dimension).clone()
    prior = GaussianMixturePrior(weights, means, covs, schedule)
    gaussian = torch.randn(measurements, dimension, generator=generator, dtype=dtype)
    left, _, right_t = torch.linalg.svd(gaussian, full_matrices=False)
    singular = torch.sort(torch.rand(measurements, generator=generator, dtype=dtype), descending=True).values
    matrix = left @ torch.diag(singular) @ right_t
    sigma = float(torch.rand((), generator=generator, dtype=dtype) * singular.max())
    operator = MatrixOperator(matrix, sigma)
    x_true = prior.sample(1, generator)
    y = operator.measure(x_true, generator)[0]
    return MixtureProblem(f"mixture d={dimension} d_y={measurements} seed={seed}", prior, operator, x_true[0], y,
                          prior.posterior(operator, y))
