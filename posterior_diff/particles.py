r"""Particle mode: twisted sequential Monte Carlo with the averaged likelihood as the twist.

The guided sampler is exact only where p(x_0 | x_t) is Gaussian. Particle mode removes the
remaining error as the number of particles K grows (Wu et al. 2023, "Practical and
asymptotically exact conditional sampling in diffusion models", TDS), reusing what guidance
computes anyway: the twist is our averaged likelihood l~(y | x_t) = N(y; A D(x_t), C_t) with the
chosen covariance.

The target is the path of the *unguided* reverse chain (the prior, discretised) tilted by the
true likelihood p(y | x_0). With p the unguided transition N(prior mean, tau^2 I) and q the
proposal:

    w_1        = l~(y | x_1),                      x_1 ~ N(0, (alpha^2 + sigma^2) I)
    w_{t -> s} = p(x_s | x_t) l~(y | x_s) / [q(x_s | x_t) l~(y | x_t)]
    w_final    = p(y | x_0) / l~(y | x_{t_min}),   x_0 = D(x_{t_min})

Two proposals:
- "guided": the guided step, N(mean fed D_y instead of D, tau^2 I). Any covariance mode.
- "conditioned": p(x_s | x_t) times the twist at s linearised in x_s (`conditioned_step`):
  the step's mean *and* covariance are conditioned on y, which the guided step's covariance
  is not. It needs the rows of A J and the m x m matrix C, which the Tweedie twist builds
  anyway when y has at most EXACT_LOG_DET_MAX entries, so it costs no extra network call.
  On Gaussian priors its weights stay far more even (lowest ESS without resampling 0.6-0.77 K at
  100 steps on the 8x8 benchmark tasks, against 0.003-0.12 K for the guided step).
"auto" (the default) takes the conditioned proposal wherever it is available.

Systematic resampling whenever the effective sample size (sum w)^2 / sum w^2 drops below
`ess_threshold * K`. The product of the average incremental weights estimates the evidence
p(y) (in the model's units). Particles are denoised in chunks of `chunk_size`; all random
draws are made for the whole cloud at once, so the chunk size changes memory, not results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor

from operators import LinearOperator

from .denoisers import Denoiser, randn
from .guidance import EXACT_LOG_DET_MAX, AveragedLikelihoodGuidance, Guided, tweedie_spectrum
from .samplers import _Coefficients, check_eta, exponential_step, progress_bar, transition_std
from .time_grids import time_grid

PARTICLE_SOLVERS = ("multistep", "euler")
PROPOSALS = ("auto", "guided", "conditioned")


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
    return -0.5 * (residual.square().flatten(1).sum(1) / operator.sigma_y**2 + m * math.log(2 * math.pi * operator.sigma_y**2))


def choose_proposal(proposal: str, covariance: str, measurement_size: int) -> str:
    """The proposal particle mode runs: `proposal` itself, or for "auto" the conditioned one
    wherever it is available (Tweedie twist with an exact log det, whose pieces it reuses),
    else the guided one. Raises a ValueError naming `proposal` where "conditioned" cannot run."""
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    available = covariance == "tweedie" and measurement_size <= EXACT_LOG_DET_MAX
    if proposal == "conditioned" and not available:
        raise ValueError(f'proposal="conditioned" needs covariance="tweedie" and a measurement of at most '
                         f"{EXACT_LOG_DET_MAX} entries (it builds the m x m covariance of y), got "
                         f"covariance={covariance!r} and {measurement_size} entries")
    if proposal == "auto":
        return "conditioned" if available else "guided"
    return proposal


def conditioned_step(prior_mean: Tensor, std: float, residual: Tensor, jacobian: Tensor, covariance: Tensor,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r"""Draw x_s from the unguided transition N(prior_mean, std^2 I) conditioned on the twist
    linearised at the current particle, and return it with log p(x_s | x_t) - log q(x_s | x_t).

    With B = A J (the rows `jacobian`, (K, m, *x_shape)), C the twist's covariance (K, m, m)
    and r = y - A D the residual of the unguided x_0 estimate (K, *y_shape), the linearised
    twist is N(y; A D + B (x_s - prior_mean), C) and the proposal is the exact Gaussian product

        q = N(prior_mean + tau^2 B^T G^{-1} r,  tau^2 I - tau^4 B^T G^{-1} B),   G = C + tau^2 B B^T,

    drawn by Matheron's rule (perturb, then correct by the m x m solve), so no d x d matrix is
    formed. On a Gaussian prior this is the locally optimal proposal up to taking J and C at
    x_t instead of x_s, an O(step) error in an O(step) correction. The density ratio uses
    Sigma_q^{-1} = tau^{-2} I + B^T C^{-1} B and det Sigma_q = tau^{2d} det C / det G; the
    tau^{2d} cancels against the unguided transition.
    """
    shape, dtype = prior_mean.shape, prior_mean.dtype
    count, m = covariance.shape[:2]
    matrix = jacobian.flatten(2).double()  # (K, m, d)
    prior = prior_mean.flatten(1).double()
    chol_c = torch.linalg.cholesky(covariance.double())
    chol_g = torch.linalg.cholesky(covariance.double() + std**2 * matrix @ matrix.transpose(1, 2))

    def apply(matrices: Tensor, vectors: Tensor) -> Tensor:
        return (matrices @ vectors[..., None])[..., 0]

    def gain(v: Tensor) -> Tensor:  # tau^2 B^T G^{-1} v
        return std**2 * apply(matrix.transpose(1, 2), torch.cholesky_solve(v[..., None], chol_g)[..., 0])

    noise = randn(shape, generator, prior_mean.device, dtype).flatten(1).double()
    measurement_noise = apply(chol_c, randn((count, m), generator, prior_mean.device, dtype).double())
    mean = prior + gain(residual.flatten(1).double())
    x_next = mean + std * noise - gain(std * apply(matrix, noise) + measurement_noise)
    offset = x_next - mean
    projected = apply(matrix, offset)
    quadratic = offset.square().sum(1) / std**2 + (projected * torch.cholesky_solve(projected[..., None], chol_c)[..., 0]).sum(1)
    log_det_ratio = 2 * (chol_g.diagonal(dim1=1, dim2=2).log().sum(1) - chol_c.diagonal(dim1=1, dim2=2).log().sum(1))
    log_ratio = -0.5 * (x_next - prior).square().sum(1) / std**2 + 0.5 * quadratic - 0.5 * log_det_ratio
    return x_next.to(dtype).reshape(shape), log_ratio


def _concatenate(parts: list[Guided]) -> Guided:
    """One Guided for the whole cloud from its chunks (log likelihoods in float64)."""
    def cat(name: str) -> Tensor | None:
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else torch.cat(values)
    return Guided(cat("x0"), cat("corrected"), cat("log_likelihood").double(), all(p.normalised for p in parts),
                  cat("measurement_jacobian"), cat("gram_eigenvalues"), cat("gram_eigenvectors"))


@dataclass
class _History:
    """What the last step leaves for the next: D and D_y per particle, and the step length h
    in log(sigma / alpha)."""

    x0: Tensor
    corrected: Tensor
    h: float


def _select(record, indices: Tensor):
    """The rows `indices` of every per-particle tensor field of a dataclass (resampling)."""
    return replace(record, **{f.name: getattr(record, f.name)[indices] for f in fields(record)
                              if isinstance(getattr(record, f.name), Tensor)})


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
    proposal: str = "auto",
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
        proposal: "guided" (the guided step: mean shifted, covariance unchanged), "conditioned"
            (`conditioned_step`: the unguided step conditioned on the linearised twist, mean and
            covariance; Tweedie covariance with y of at most EXACT_LOG_DET_MAX entries; memory
            K x m x d for the rows of A J) or "auto" (conditioned wherever it is available).
        chunk_size: particles denoised per network call (default: all K at once).
        generator, device, dtype, progress: as in `samplers.sample`.
    """
    eta = check_particle_settings(particles, eta, solver, ess_threshold, operator.sigma_y)
    proposal = choose_proposal(proposal, covariance, y.numel())
    chunk_size = particles if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    device = device or y.device
    dtype = dtype or model.sampling_dtype()
    schedule = model.schedule
    times = time_grid(schedule, steps, grid).tolist()
    coefficients = [_Coefficients(schedule, t) for t in times]
    guidance = AveragedLikelihoodGuidance(model, operator, y[None], covariance, guidance_scale, cg_tol, cg_max_iter)

    def guide_all(x: Tensor, c: _Coefficients) -> Guided:
        """Unguided D, corrected mean and log twist (and its pieces) for the whole cloud, chunk by chunk."""
        t = torch.full((x.shape[0],), c.t, dtype=dtype, device=device)
        return _concatenate([guidance.guide(x[i : i + chunk_size], t[i : i + chunk_size], likelihood=True)
                             for i in range(0, x.shape[0], chunk_size)])

    start = coefficients[0]
    x = math.sqrt(start.alpha**2 + start.sigma**2) * randn((particles, *x_shape), generator, device, dtype)
    now_guided = guide_all(x, start)
    normalised = now_guided.normalised  # every twist value carried its log det: the evidence estimate is meaningful
    log_weights = now_guided.log_likelihood.clone()
    log_evidence = 0.0
    ess, resampled = [], []
    previous: _History | None = None
    bar = progress_bar(progress, len(times), "particles")

    def reweighted(step: int) -> None:
        """Record the ESS; resample (ancestors carry their D history) when it is too low."""
        nonlocal x, now_guided, log_weights, log_evidence, previous
        ess.append(effective_sample_size(log_weights) / particles)
        if ess[-1] < ess_threshold:
            log_evidence += float(torch.logsumexp(log_weights, 0)) - math.log(particles)
            ancestors = systematic_resample(log_weights, generator)
            x, now_guided = x[ancestors], _select(now_guided, ancestors)
            if previous is not None:
                previous = _select(previous, ancestors)
            log_weights = torch.zeros_like(log_weights)
            resampled.append(step)

    reweighted(0)
    for step, (now, nxt) in enumerate(zip(coefficients[:-1], coefficients[1:]), start=1):
        x0, corrected = now_guided.x0, now_guided.corrected
        h = now.log_ratio - nxt.log_ratio
        # Second-order extrapolation of D (and D_y), as the multistep sampler does.
        if solver == "multistep" and previous is not None:
            factor = h / (2 * previous.h)
            unguided_x0, guided_x0 = x0 + (x0 - previous.x0) * factor, corrected + (corrected - previous.corrected) * factor
        else:
            unguided_x0, guided_x0 = x0, corrected
        prior_mean = exponential_step(x, unguided_x0, now, nxt, eta, None)
        std = transition_std(now, nxt, eta)
        if proposal == "conditioned":
            # The twist at the next time, linearised around the prior mean: the rows of A J at
            # x_t (re-evaluating them there would cost a network call; extrapolating them from
            # the last step gained nothing on Gaussian priors and overshot on mixtures), C
            # rebuilt from the same A J A^T at the next time's scale sigma^2 / alpha, and A D
            # there = A D(x_t) moved by A J along the difference between this step's mean and
            # the first-order one (exact for a linear D).
            rows = now_guided.measurement_jacobian
            spectrum = tweedie_spectrum(now_guided.gram_eigenvalues, operator.sigma_y**2, nxt.sigma**2 / nxt.alpha)
            vectors = now_guided.gram_eigenvectors
            covariance_next = (vectors * spectrum[:, None, :]) @ vectors.transpose(1, 2)
            shift = (prior_mean - exponential_step(x, x0, now, nxt, eta, None)).flatten(1)
            predicted = operator.A(x0) + (rows.flatten(2) @ shift[..., None]).reshape(-1, *y.shape)
            x_next, transition = conditioned_step(prior_mean, std, y[None] - predicted, rows, covariance_next, generator)
        else:
            proposal_mean = exponential_step(x, guided_x0, now, nxt, eta, None)
            x_next = proposal_mean + std * randn(x.shape, generator, device, dtype)
            transition = (gaussian_log_density(x_next, prior_mean, std)
                          - gaussian_log_density(x_next, proposal_mean, std)).double()
        previous = _History(x0, corrected, h)
        next_guided = guide_all(x_next, nxt)
        normalised = normalised and next_guided.normalised
        log_weights = log_weights + transition + next_guided.log_likelihood - now_guided.log_likelihood
        x, now_guided = x_next, next_guided
        reweighted(step)
        bar.update(1)
    # The final weight swaps the last twist for the true likelihood of the unguided x_0 = D(x_{t_min}).
    x0 = now_guided.x0
    log_weights = log_weights + measurement_log_likelihood(operator, y[None], x0).double() - now_guided.log_likelihood
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
