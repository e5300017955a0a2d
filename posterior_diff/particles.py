r"""Particle mode: twisted sequential Monte Carlo with the averaged likelihood as the twist.

The guided sampler is exact only where p(x_0 | x_t) is Gaussian. Particle mode removes the
remaining error as the number of particles K grows (Wu et al. 2023, "Practical and
asymptotically exact conditional sampling in diffusion models", TDS), reusing what guidance
computes anyway: the twist is our averaged likelihood l~(y | x_t) = N(y; A D(x_t), C_t) with the
chosen covariance, the proposal is the guided reverse step.

The target is the path of the *unguided* reverse chain (the prior, discretised) tilted by the
true likelihood p(y | x_0). With p the unguided transition, q the guided one (both Gaussian
with the same variance: the same eta-family step, fed D or the corrected mean D_y):

    w_1        = l~(y | x_1),                      x_1 ~ N(0, (alpha^2 + sigma^2) I)
    w_{t -> s} = p(x_s | x_t) l~(y | x_s) / [q(x_s | x_t) l~(y | x_t)]
    w_final    = p(y | x_0) / l~(y | x_{t_min}),   x_0 = D(x_{t_min})

Systematic resampling whenever the effective sample size (sum w)^2 / sum w^2 drops below
`ess_threshold * K`. The product of the average incremental weights estimates the evidence
p(y) (in the model's units). Particles are denoised in chunks of `chunk_size`; all random
draws are made for the whole cloud at once, so the chunk size changes memory, not results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from operators import LinearOperator

from .denoisers import Denoiser, randn
from .guidance import AveragedLikelihoodGuidance
from .samplers import _Coefficients, check_eta, exponential_step, progress_bar, transition_std
from .time_grids import time_grid

PARTICLE_SOLVERS = ("multistep", "euler")


@dataclass
class ParticleResult:
    """The returned draws and the diagnostics of one particle run.

    Attributes:
        samples: `num_samples` draws from the final weighted cloud, (num_samples, *x_shape).
        particles: the final cloud (K, *x_shape) and its normalised weights `weights` (K,).
        ess: effective sample size / K after each reweighting (len = steps + 1).
        resampled: the steps (indices into `ess`) after which the cloud was resampled.
        log_evidence: the estimate of log p(y) (NaN where the twist's log det is unknown).
        nfe: network evaluations per particle; vjps: vector-Jacobian products on all chunks.
    """

    samples: Tensor
    particles: Tensor
    weights: Tensor
    ess: list[float] = field(default_factory=list)
    resampled: list[int] = field(default_factory=list)
    log_evidence: float = math.nan
    nfe: int = 0
    vjps: int = 0


def check_particle_settings(particles: int, eta: float, solver: str, ess_threshold: float, sigma_y: float) -> float:
    """Raise a ValueError naming the argument unless particle mode can weight these settings;
    returns eta as a float. The weights need a transition density (eta > 0, a solver with
    Gaussian steps) and the final weight the likelihood p(y | x_0) (sigma_y > 0)."""
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles must be an integer >= 1, got {particles!r}")
    eta = check_eta(eta, solver)
    if eta <= 0 or solver not in PARTICLE_SOLVERS:
        raise ValueError(f"particle mode weights particles by transition densities: it needs eta > 0 and solver in "
                         f"{PARTICLE_SOLVERS}, got eta={eta}, solver={solver!r}")
    if not (isinstance(ess_threshold, (int, float)) and 0 <= ess_threshold <= 1):
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold!r}")
    if sigma_y <= 0:
        raise ValueError("particle mode needs an operator with sigma > 0 (its final weight is the likelihood p(y | x_0))")
    return eta


def effective_sample_size(log_weights: Tensor) -> float:
    """(sum w)^2 / sum w^2 from unnormalised log weights (K,), computed in log space."""
    return float(torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0)))


def systematic_resample(log_weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """K ancestor indices by systematic resampling: one uniform u, points (u + k) / K."""
    count = log_weights.shape[0]
    weights = torch.softmax(log_weights.double(), 0)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device if generator else "cpu")
    points = (u.to(weights.device) + torch.arange(count, dtype=torch.float64, device=weights.device)) / count
    cumulative = torch.cumsum(weights, 0)
    cumulative[-1] = 1.0  # guard against round-off below the last point
    return torch.searchsorted(cumulative, points).clamp_max(count - 1)


def gaussian_log_density(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(x; mean, std^2 I) per sample, (B,), without the constant (it cancels in ratios)."""
    return -0.5 * ((x - mean) / std).square().flatten(1).sum(1)


def measurement_log_likelihood(operator: LinearOperator, y: Tensor, x0: Tensor) -> Tensor:
    """log p(y | x_0) = log N(y; A x_0, sigma_y^2 I) per sample, (B,)."""
    residual = y - operator.A(x0)
    m = residual[0].numel()
    return -0.5 * (residual.square().flatten(1).sum(1) / operator.sigma**2 + m * math.log(2 * math.pi * operator.sigma**2))


def particle_sample(
    model: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    x_shape: tuple[int, ...],
    *,
    particles: int,
    num_samples: int,
    steps: int = 100,
    covariance: str = "tweedie",
    eta: float = 1.0,
    solver: str = "multistep",
    grid: str = "log-snr",
    ess_threshold: float = 0.5,
    chunk_size: int | None = None,
    guidance_scale: float = 1.0,
    cg_tol: float = 1e-4,
    cg_max_iter: int = 50,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | Callable[[int], Any] = False,
) -> ParticleResult:
    """Twisted SMC posterior sampling (see the module docstring).

    Args:
        model: the unconditional Denoiser, in its own units (as are y and the operator).
        operator: A with sigma_y > 0 (the final weight is the Gaussian likelihood).
        y: one measurement, shape y_shape.
        x_shape: the shape of one x.
        particles: K, the size of the cloud.
        num_samples: draws returned from the final weighted cloud (multinomial, with replacement).
        steps, covariance, grid, guidance_scale, cg_tol, cg_max_iter: as in `restore`.
        eta: noise level in (0, 1]; the weights need a transition density, so eta > 0.
        solver: "multistep" (second order; each particle keeps its own D history) or "euler".
        ess_threshold: resample when ESS < ess_threshold * K (0 never, 1 always).
        chunk_size: particles denoised per network call (default: all K at once).
        generator, device, dtype, progress: as in `samplers.sample`.
    """
    eta = check_particle_settings(particles, eta, solver, ess_threshold, operator.sigma)
    chunk_size = particles if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    device = device or y.device
    dtype = dtype or model.sampling_dtype()
    schedule = model.schedule
    times = time_grid(schedule, steps, grid).tolist()
    coefficients = [_Coefficients(schedule, t) for t in times]
    guidance = AveragedLikelihoodGuidance(model, operator, y[None], covariance, guidance_scale, cg_tol, cg_max_iter)

    def guide_all(x: Tensor, c: _Coefficients):
        """Unguided D, corrected mean and log twist for the whole cloud, chunk by chunk."""
        t = torch.full((x.shape[0],), c.t, dtype=dtype, device=device)
        nonlocal normalised
        parts = [guidance.guide(x[i : i + chunk_size], t[i : i + chunk_size], likelihood=True)
                 for i in range(0, x.shape[0], chunk_size)]
        normalised = normalised and all(p.normalised for p in parts)
        return (torch.cat([p.x0 for p in parts]), torch.cat([p.corrected for p in parts]),
                torch.cat([p.log_likelihood for p in parts]).double())

    normalised = True  # every twist value carried its log det: the evidence estimate is meaningful
    start = coefficients[0]
    x = math.sqrt(start.alpha**2 + start.sigma**2) * randn((particles, *x_shape), generator, device, dtype)
    x0, corrected, log_twist = guide_all(x, start)
    log_weights = log_twist.clone()
    log_evidence = 0.0
    ess, resampled = [], []
    previous: tuple[Tensor, Tensor, float] | None = None  # (D, D_y, h) of the last step, per particle
    bar = progress_bar(progress, len(times), "particles")

    def reweighted(step: int) -> None:
        """Record the ESS; resample (ancestors carry their D history) when it is too low."""
        nonlocal x, x0, corrected, log_twist, log_weights, log_evidence, previous
        ess.append(effective_sample_size(log_weights) / particles)
        if ess[-1] < ess_threshold:
            log_evidence += float(torch.logsumexp(log_weights, 0)) - math.log(particles)
            ancestors = systematic_resample(log_weights, generator)
            x, x0, corrected, log_twist = x[ancestors], x0[ancestors], corrected[ancestors], log_twist[ancestors]
            if previous is not None:
                previous = (previous[0][ancestors], previous[1][ancestors], previous[2])
            log_weights = torch.zeros_like(log_weights)
            resampled.append(step)

    reweighted(0)
    for step, (now, nxt) in enumerate(zip(coefficients[:-1], coefficients[1:]), start=1):
        h = now.log_ratio - nxt.log_ratio
        if solver == "multistep" and previous is not None:
            factor = h / (2 * previous[2])
            unguided_x0, guided_x0 = x0 + (x0 - previous[0]) * factor, corrected + (corrected - previous[1]) * factor
        else:
            unguided_x0, guided_x0 = x0, corrected
        previous = (x0, corrected, h)
        prior_mean = exponential_step(x, unguided_x0, now, nxt, eta, None)
        proposal_mean = exponential_step(x, guided_x0, now, nxt, eta, None)
        std = transition_std(now, nxt, eta)
        x_next = proposal_mean + std * randn(x.shape, generator, device, dtype)
        transition = (gaussian_log_density(x_next, prior_mean, std) - gaussian_log_density(x_next, proposal_mean, std)).double()
        x0, corrected, next_twist = guide_all(x_next, nxt)
        log_weights = log_weights + transition + next_twist - log_twist
        x, log_twist = x_next, next_twist
        reweighted(step)
        bar.update(1)
    # The final weight swaps the last twist for the true likelihood of the unguided x_0 = D(x_{t_min}).
    log_weights = log_weights + measurement_log_likelihood(operator, y[None], x0).double() - log_twist
    ess.append(effective_sample_size(log_weights) / particles)
    log_evidence += float(torch.logsumexp(log_weights, 0)) - math.log(particles)
    bar.update(1)
    bar.close()
    weights = torch.softmax(log_weights, 0)
    device_generator = generator.device if generator is not None else weights.device
    draws = torch.multinomial(weights.to(device_generator), num_samples, replacement=True, generator=generator)
    return ParticleResult(x0[draws.to(x0.device)], x0, weights.to(x0.dtype), ess, resampled,
                          log_evidence if normalised else math.nan,
                          nfe=len(times), vjps=guidance.vjp_count)
