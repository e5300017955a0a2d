r"""Analytic priors whose denoiser E[x_0 | x_t] is exact: a Gaussian and a Gaussian mixture.

For x_0 ~ N(mu, Sigma) and x_t = alpha x_0 + sigma eps, with Sigma = U diag(lambda) U^T,

    D(x_t, t) = mu + U diag(alpha lambda / (alpha^2 lambda + sigma^2)) U^T (x_t - alpha mu),
    Cov[x_0 | x_t] = (sigma^2 / alpha) dD/dx_t,

so the averaged likelihood with the Tweedie covariance is exact and posterior samples are
exact up to the time discretisation: the sharpest end-to-end test of the package. A
mixture weighs its components' denoisers by their responsibilities
w_k(x_t) ∝ pi_k N(x_t; alpha mu_k, alpha^2 Sigma_k + sigma^2 I).

Both are batched and differentiable in x_t, follow any Schedule, and draw prior samples.
They hold their tensors in the dtype they are given (use float64 for exactness studies).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from posterior_diff.denoisers import Denoiser, as_time, randn
from posterior_diff.schedules import Schedule, VPSchedule


def _eigen(cov: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of symmetric PSD matrices (..., d, d)."""
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"{name} contains non-finite values")
    scale = cov.abs().amax().clamp_min(torch.finfo(cov.dtype).tiny)
    if bool(((cov - cov.transpose(-1, -2)).abs() > 1e-6 * scale).any()):
        raise ValueError(f"{name} must be symmetric")
    values, vectors = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
    if bool((values < -1e-6 * scale).any()):
        raise ValueError(f"{name} must be positive semi-definite (smallest eigenvalue {values.min().item():.3g})")
    return values.clamp_min(0), vectors


def _floating(tensor: Tensor | Sequence, name: str) -> Tensor:
    tensor = torch.as_tensor(tensor)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains non-finite values")
    return tensor


def condition_on_measurement(means: Tensor, covs: Tensor, operator, y: Tensor, x_shape: tuple[int, ...]):
    """Condition Gaussians N(mu_k, S_k) on one measurement y = A x + sigma_y n (dense A).

    Args:
        means: (K, d); covs: (K, d, d); operator: the forward model; y: one measurement;
        x_shape: the shape of one x (for A's dense matrix).

    Returns:
        (means (K, d), covs (K, d, d), log_evidence (K,)) with G_k = A S_k A^T + sigma_y^2 I,
        m_k = mu_k + S_k A^T G_k^+ (y - A mu_k), C_k = S_k - S_k A^T G_k^+ A S_k and
        log N(y; A mu_k, G_k) up to the (k-independent) constant -m/2 log(2 pi). G_k^+ is a
        pseudo-inverse, so noiseless measurements of a degenerate prior are fine.
    """
    dtype, device = means.dtype, means.device
    matrix = operator.to_matrix(x_shape, dtype=dtype).to(device)
    y_flat = torch.as_tensor(y, dtype=dtype, device=device).flatten()
    if y_flat.numel() != matrix.shape[0]:
        raise ValueError(f"y has {y_flat.numel()} entries but the operator produces {matrix.shape[0]}")
    sigma_a = covs @ matrix.T  # (K, d, m)
    gram = matrix @ sigma_a + operator.sigma_y**2 * torch.eye(matrix.shape[0], dtype=dtype, device=device)
    values, vectors = torch.linalg.eigh((gram + gram.transpose(1, 2)) / 2)
    positive = values > values.amax(-1, keepdim=True) * 1e-12
    inverse_values = torch.where(positive, 1 / values, 0.0)
    residual = y_flat - means @ matrix.T  # (K, m)
    coordinates = torch.einsum("km,kmj->kj", residual, vectors)
    log_evidence = -0.5 * ((coordinates**2 * inverse_values).sum(-1) + torch.where(positive, values.log(), 0.0).sum(-1))
    gain = sigma_a @ (vectors @ (inverse_values[..., None] * vectors.transpose(1, 2)))  # (K, d, m)
    posterior_means = means + torch.einsum("kdm,km->kd", gain, residual)
    posterior_covs = covs - gain @ sigma_a.transpose(1, 2)
    return posterior_means, (posterior_covs + posterior_covs.transpose(1, 2)) / 2, log_evidence


class GaussianPrior(Denoiser):
    """x_0 ~ N(mean, cov) as an exact denoiser.

    Args:
        mean: the mean, of the shape of one x (e.g. (d,) or (1, 8, 8)).
        cov: the covariance, shape (d, d) with d = mean.numel(); symmetric PSD.
        schedule: the noising schedule (VP by default).
    """

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Schedule | None = None):
        super().__init__()
        mean = _floating(mean, "mean")
        cov = _floating(cov, "cov").to(mean.dtype)
        d = mean.numel()
        if mean.dim() == 0:
            raise ValueError("mean must have the shape of one x, e.g. (d,), got a scalar")
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) for a mean with {d} entries, got {tuple(cov.shape)}")
        values, vectors = _eigen(cov, "cov")
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.x_shape = tuple(mean.shape)
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        self.register_buffer("eigenvalues", values)
        self.register_buffer("eigenvectors", vectors)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x_t)
        alpha, sigma = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        offset = (x_t - alpha.reshape(-1, *[1] * len(self.x_shape)) * self.mean).flatten(1)
        denominator = alpha**2 * self.eigenvalues + sigma**2
        gain = torch.where(denominator > 0, alpha * self.eigenvalues / denominator.clamp_min(1e-300), 0.0)
        coordinates = (offset @ self.eigenvectors) * gain
        return self.mean + (coordinates @ self.eigenvectors.T).reshape(x_t.shape)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws from N(mean, cov), shape (num_samples, *x_shape)."""
        z = randn((num_samples, self.mean.numel()), generator, self.mean.device, self.mean.dtype)
        draws = (z * self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return self.mean + draws.reshape(num_samples, *self.x_shape)

    def mean_square_norm(self) -> float:
        """E||x_0||^2 = ||mean||^2 + tr cov; `schedule.terminal_kl_bound` turns it into the start-up mismatch."""
        return float((self.mean**2).sum() + self.eigenvalues.sum())

    def posterior(self, operator, y: Tensor) -> "GaussianPrior":
        """The exact posterior N(m, C) of x_0 given one measurement y = A x_0 + sigma_y n.

        m = mu + Sigma A^T G^+ (y - A mu), C = Sigma - Sigma A^T G^+ A Sigma, G = A Sigma A^T + sigma_y^2 I.
        Materialises A as a dense matrix, so it is meant for small problems (tests, benchmarks).
        """
        means, covs, _ = condition_on_measurement(self.mean.flatten()[None], self.cov[None], operator, y, self.x_shape)
        return GaussianPrior(means[0].reshape(self.x_shape), covs[0], self.schedule)


class GaussianMixturePrior(Denoiser):
    """x_0 ~ sum_k weights_k N(means_k, covs_k) as an exact denoiser.

    Args:
        weights: mixture weights, shape (K,), non-negative (normalised here).
        means: component means, shape (K, *x_shape).
        covs: component covariances, shape (K, d, d) with d = prod(x_shape).
        schedule: the noising schedule (VP by default).
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, schedule: Schedule | None = None):
        super().__init__()
        means = _floating(means, "means")
        weights = _floating(weights, "weights").to(means.dtype)
        covs = _floating(covs, "covs").to(means.dtype)
        if weights.dim() != 1 or weights.numel() < 1:
            raise ValueError(f"weights must have shape (K,), got {tuple(weights.shape)}")
        K = weights.numel()
        if means.dim() < 2 or means.shape[0] != K:
            raise ValueError(f"means must have shape ({K}, *x_shape), got {tuple(means.shape)}")
        d = math.prod(means.shape[1:])
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        values, vectors = _eigen(covs, "covs")
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.x_shape = tuple(means.shape[1:])
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("eigenvalues", values)
        self.register_buffer("eigenvectors", vectors)
        scalars = torch.diagonal(covs, dim1=1, dim2=2)[:, :1, None] * torch.eye(d, dtype=covs.dtype, device=covs.device)
        self.isotropic = bool(torch.equal(covs, scalars))

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x_t)
        if self.isotropic:
            return self._isotropic_forward(x_t, t)
        alpha = self.schedule.alpha(t)[:, None, None]  # (B, 1, 1) against (B, K, d)
        sigma = self.schedule.sigma(t)[:, None, None]
        coordinates, variance, log_likelihood = self._components(x_t, alpha, sigma)
        component_x0 = self.means.flatten(1) + torch.einsum("bke,kde->bkd", coordinates * alpha * self.eigenvalues / variance, self.eigenvectors)
        responsibilities = torch.softmax(log_likelihood + self.weights.log(), dim=-1)  # (B, K)
        x0 = (responsibilities[..., None] * component_x0).sum(1)
        return x0.reshape(x_t.shape)

    def _isotropic_forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The same for S_k = c_k I, with (B, K) x (K, d) products only (no (B, K, d) tensor).

        With v_k = alpha^2 c_k + sigma^2 and g_k = alpha c_k / v_k, component k's E[x_0 | x_t] is
        mu_k + g_k (x_t - alpha mu_k), so the mixture's is sum_k r_k (1 - alpha g_k) mu_k + (sum_k r_k g_k) x_t.
        """
        x = x_t.flatten(1)
        means = self.means.flatten(1)  # (K, d)
        alpha = self.schedule.alpha(t)[:, None]  # (B, 1)
        sigma = self.schedule.sigma(t)[:, None]
        scale = self.eigenvalues[:, 0]  # (K,)
        variance = (alpha**2 * scale + sigma**2).clamp_min(torch.finfo(x.dtype).tiny)  # (B, K)
        squared = ((x**2).sum(-1, keepdim=True) - 2 * alpha * (x @ means.T) + alpha**2 * (means**2).sum(-1)).clamp_min(0)
        log_likelihood = -0.5 * (squared / variance + means.shape[1] * variance.log())
        responsibilities = torch.softmax(log_likelihood + self.weights.log(), dim=-1)  # (B, K)
        gain = alpha * scale / variance
        x0 = (responsibilities * (1 - alpha * gain)) @ means + (responsibilities * gain).sum(-1, keepdim=True) * x
        return x0.reshape(x_t.shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x_0) of the mixture for x of shape (B, *x_shape); returns (B,)."""
        _, _, log_likelihood = self._components(x.to(self.means.dtype), 1.0, 0.0)  # at t = 0
        d = self.means[0].numel()
        return torch.logsumexp(log_likelihood + self.weights.log(), dim=-1) - 0.5 * d * math.log(2 * math.pi)

    def _components(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per component k, x_t ~ N(alpha mu_k, alpha^2 S_k + sigma^2 I) in S_k's eigenbasis:
        the coordinates of x_t - alpha mu_k (B, K, d), the variances (., K, d) and the log
        densities without the 2 pi constant (B, K). alpha, sigma: floats or (B, 1, 1)."""
        offset = x_t.flatten(1)[:, None, :] - alpha * self.means.flatten(1)  # (B, K, d)
        coordinates = torch.einsum("bkd,kde->bke", offset, self.eigenvectors)
        variance = (alpha**2 * self.eigenvalues + sigma**2).clamp_min(torch.finfo(x_t.dtype).tiny)
        log_likelihood = -0.5 * ((coordinates**2 / variance).sum(-1) + variance.log().sum(-1))
        return coordinates, variance, log_likelihood

    def posterior(self, operator, y: Tensor) -> "GaussianMixturePrior":
        """The exact posterior of x_0 given one measurement y = A x_0 + sigma_y n: a mixture again.

        Component k becomes N(m_k, C_k) with G_k = A S_k A^T + sigma_y^2 I,
        m_k = mu_k + S_k A^T G_k^+ (y - A mu_k), C_k = S_k - S_k A^T G_k^+ A S_k, and its weight
        is multiplied by the evidence N(y; A mu_k, G_k). Dense in A: for small problems.
        """
        means, covs, log_evidence = condition_on_measurement(self.means.flatten(1), self.covs, operator, y, self.x_shape)
        weights = torch.softmax(self.weights.log() + log_evidence, dim=0)
        return GaussianMixturePrior(weights, means.reshape(self.means.shape), covs, self.schedule)

    def mean_square_norm(self) -> float:
        """E||x_0||^2 = sum_k w_k (||mu_k||^2 + tr S_k) with normalised weights (see GaussianPrior.mean_square_norm)."""
        per_component = (self.means.flatten(1) ** 2).sum(1) + self.eigenvalues.sum(-1)
        return float((self.weights * per_component).sum() / self.weights.sum())

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws from the mixture, shape (num_samples, *x_shape)."""
        device = generator.device if generator is not None else self.weights.device
        components = torch.multinomial(self.weights.to(device), num_samples, replacement=True, generator=generator)
        components = components.to(self.weights.device)
        z = randn((num_samples, self.means[0].numel()), generator, self.means.device, self.means.dtype)
        scaled = torch.empty_like(z)
        for k in components.unique().tolist():  # per component: no (N, d, d) gather
            chosen = components == k
            scaled[chosen] = (z[chosen] * self.eigenvalues[k].sqrt()) @ self.eigenvectors[k].T
        return (self.means.flatten(1)[components] + scaled).reshape(num_samples, *self.x_shape)

