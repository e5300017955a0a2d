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
  On Gaussian priors its weights stay far more even than the guided step's
  (docs/particle_mode.md measures both).
"auto" (the default) takes the conditioned proposal wherever it is available.

Systematic resampling whenever the effective sample size (sum w)^2 / sum w^2 drops below
`ess_threshold * K`. The product of the average incremental weights estimates the evidence
p(y) (in the model's units). Particles are denoised in chunks of `batch_size`; all random
draws are made for the whole cloud at once, so the chunk size changes memory, not results.

The loop is TDS around the samplers' own Gaussian step (`samplers.EulerSolver.transition`
and its multistep form): propose, reweight, resample when the ESS is low. The cloud's state is
a `Cloud`. The derivation is in docs/theory.md §6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor

from operators import LinearOperator

from posterior_diff.checks import choice, number_in, positive_int
from posterior_diff.denoisers import Denoiser, randn
from posterior_diff.sampling.guidance import (EXACT_LOG_DET_MAX, AveragedLikelihoodGuidance, Guided, GuidanceSettings,
                                              tweedie_spectrum)
from posterior_diff.sampling.samplers import (GAUSSIAN_SOLVERS, EulerSolver, GridPoint, SamplerSettings, Transition,
                                              exponential_transition, grid_points, make_solver, placement, progress_bar,
                                              start_sample)

PROPOSALS = ("auto", "guided", "conditioned")


@dataclass(frozen=True)
class ParticleSettings:
    """Particle mode's settings, checked together with the sampler's by `check_particle_settings`.

    Attributes:
        particles: K, the size of the cloud.
        ess_threshold: resample when ESS < ess_threshold * K (0 never, 1 always).
        proposal: "guided" or "conditioned" once checked ("auto" is resolved there).
        batch_size: particles denoised per network call (None: all K at once).
    """

    particles: int
    ess_threshold: float = 0.5
    proposal: str = "guided"
    batch_size: int | None = None


def check_particle_settings(particles, ess_threshold, proposal: str, batch_size, sampler: SamplerSettings,
                            covariance: str, sigma_y: float, measurement_size: int) -> ParticleSettings:
    """Checked ParticleSettings, with "auto" resolved; a ValueError naming the argument unless
    particle mode can weight these settings. The weights need a transition density (eta > 0, a
    solver with Gaussian steps) and the final weight the likelihood p(y | x_0) (sigma_y > 0)."""
    particles = positive_int(particles, "particles")
    if sampler.eta <= 0 or sampler.solver not in GAUSSIAN_SOLVERS:
        raise ValueError(f"particle mode weights particles by transition densities: it needs eta > 0 and solver in "
                         f"{GAUSSIAN_SOLVERS}, got eta={sampler.eta}, solver={sampler.solver!r}")
    ess_threshold = number_in(ess_threshold, "ess_threshold", 0.0, 1.0)
    if sigma_y <= 0:
        raise ValueError("particle mode needs an operator with sigma_y > 0 (its final weight is the likelihood p(y | x_0))")
    batch_size = None if batch_size is None else positive_int(batch_size, "batch_size")
    return ParticleSettings(particles, ess_threshold, choose_proposal(proposal, covariance, measurement_size), batch_size)


def choose_proposal(proposal: str, covariance: str, measurement_size: int) -> str:
    """The proposal particle mode runs: `proposal` itself, or for "auto" the conditioned one
    wherever it is available (Tweedie twist with an exact log det, whose pieces it reuses),
    else the guided one. Raises a ValueError naming `proposal` where "conditioned" cannot run."""
    choice(proposal, PROPOSALS, "proposal")
    available = covariance == "tweedie" and measurement_size <= EXACT_LOG_DET_MAX
    if proposal == "conditioned" and not available:
        raise ValueError(f'proposal="conditioned" needs covariance="tweedie" and a measurement of at most '
                         f"{EXACT_LOG_DET_MAX} entries (it builds the m x m covariance of y), got "
                         f"covariance={covariance!r} and {measurement_size} entries")
    if proposal == "auto":
        return "conditioned" if available else "guided"
    return proposal


@dataclass
class ParticleResult:
    """The returned draws and the diagnostics of one particle run.

    Attributes:
        samples: `num_samples` draws from the final weighted cloud, (num_samples, *x_shape).
        particles: the final cloud (K, *x_shape) and its normalised weights `weights` (K,).
        ess: effective sample size / K after each reweighting (len = steps + 1).
        resampled: the steps (indices into `ess`) after which the cloud was resampled.
        log_evidence: the estimate of log p(y) (NaN where the twist's log det is unknown).
        nfe: network forward calls (each on a chunk of particles); vjps: vector-Jacobian
            products (each on a chunk).
        cg_truncated, cg_solves: Tweedie conjugate-gradient solves the cap `cg_max_iter`
            stopped before they met their stopping rule, and all such solves (each on a chunk).
    """

    samples: Tensor
    particles: Tensor
    weights: Tensor
    ess: list[float] = field(default_factory=list)
    resampled: list[int] = field(default_factory=list)
    log_evidence: float = math.nan
    nfe: int = 0
    vjps: int = 0
    cg_truncated: int = 0
    cg_solves: int = 0


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
    variance = operator.sigma_y**2
    return -0.5 * (residual.square().flatten(1).sum(1) / variance + m * math.log(2 * math.pi * variance))


def conditioned_step(prior_mean: Tensor, std: float, residual: Tensor, measurement_jacobian: Tensor,
                     covariance: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r"""Draw x_s from the unguided transition N(prior_mean, std^2 I) conditioned on the twist
    linearised at the current particle, and return it with log p(x_s | x_t) - log q(x_s | x_t).

    With B = A J (its rows `measurement_jacobian`, (K, m, *x_shape)), C the twist's covariance
    (K, m, m) and r = y - A D the residual of the unguided x_0 estimate (K, *y_shape), the
    linearised twist is N(y; A D + B (x_s - prior_mean), C) and the proposal is the exact
    Gaussian product

        q = N(prior_mean + tau^2 B^T G^{-1} r,  tau^2 I - tau^4 B^T G^{-1} B),   G = C + tau^2 B B^T,

    drawn by Matheron's rule (perturb, then correct by the m x m solve), so no d x d matrix is
    formed. The density ratio uses Sigma_q^{-1} = tau^{-2} I + B^T C^{-1} B and
    det Sigma_q = tau^{2d} det C / det G; the tau^{2d} cancels against the unguided transition.
    """
    shape, dtype = prior_mean.shape, prior_mean.dtype
    count, m = covariance.shape[:2]
    rows = measurement_jacobian.flatten(2).double()  # (K, m, d)
    prior = prior_mean.flatten(1).double()
    chol_c = torch.linalg.cholesky(covariance.double())
    chol_g = torch.linalg.cholesky(covariance.double() + std**2 * rows @ rows.transpose(1, 2))

    def apply(matrices: Tensor, vectors: Tensor) -> Tensor:
        return (matrices @ vectors[..., None])[..., 0]

    def gain(v: Tensor) -> Tensor:  # tau^2 B^T G^{-1} v
        return std**2 * apply(rows.transpose(1, 2), torch.cholesky_solve(v[..., None], chol_g)[..., 0])

    noise = randn(shape, generator, prior_mean.device, dtype).flatten(1).double()
    measurement_noise = apply(chol_c, randn((count, m), generator, prior_mean.device, dtype).double())
    mean = prior + gain(residual.flatten(1).double())
    x_next = mean + std * noise - gain(std * apply(rows, noise) + measurement_noise)
    offset = x_next - mean
    projected = apply(rows, offset)
    quadratic = offset.square().sum(1) / std**2 + (projected * torch.cholesky_solve(projected[..., None], chol_c)[..., 0]).sum(1)
    log_det_ratio = 2 * (chol_g.diagonal(dim1=1, dim2=2).log().sum(1) - chol_c.diagonal(dim1=1, dim2=2).log().sum(1))
    log_ratio = -0.5 * (x_next - prior).square().sum(1) / std**2 + 0.5 * quadratic - 0.5 * log_det_ratio
    return x_next.to(dtype).reshape(shape), log_ratio


def select_rows(record, indices: Tensor):
    """The rows `indices` of every per-particle tensor field of a dataclass (resampling)."""
    return replace(record, **{f.name: getattr(record, f.name)[indices] for f in fields(record)
                              if isinstance(getattr(record, f.name), Tensor)})


@dataclass
class Cloud:
    """The particle cloud between steps.

    Attributes:
        x: the particles at the current time, (K, *x_shape).
        guided: the guidance at x: D, D_y and the log twist per particle (and its pieces).
        log_weights: unnormalised log weights (K,), float64.
        ess: ESS / K after each reweighting; resampled: the steps after which it was resampled.
        log_evidence: the running estimate of log p(y).
        normalised: every twist value so far carried its log det (else the evidence is unknown).
    """

    x: Tensor
    guided: Guided
    log_weights: Tensor
    ess: list[float] = field(default_factory=list)
    resampled: list[int] = field(default_factory=list)
    log_evidence: float = 0.0
    normalised: bool = True

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def move(self, x_next: Tensor, guided_next: Guided, log_transition_ratio: Tensor) -> None:
        """Step every particle to x_next and reweight by p / q times the ratio of twists."""
        self.log_weights = self.log_weights + log_transition_ratio + guided_next.log_likelihood - self.guided.log_likelihood
        self.normalised = self.normalised and guided_next.normalised
        self.x, self.guided = x_next, guided_next

    def close_evidence(self) -> None:
        """Fold the current average weight into the evidence estimate."""
        self.log_evidence += float(torch.logsumexp(self.log_weights, 0)) - math.log(self.size)

    def resample_if_degenerate(self, step: int, threshold: float, generator, solvers: list[EulerSolver]) -> None:
        """Record the ESS; when it is below threshold * K, resample (the solvers' D histories too)."""
        self.ess.append(effective_sample_size(self.log_weights) / self.size)
        if self.ess[-1] >= threshold:
            return
        self.close_evidence()
        ancestors = systematic_resample(self.log_weights, generator)
        self.x, self.guided = self.x[ancestors], select_rows(self.guided, ancestors)
        for solver in solvers:
            solver.select(ancestors)
        self.log_weights = torch.zeros_like(self.log_weights)
        self.resampled.append(step)


def guide_cloud(guidance: AveragedLikelihoodGuidance, x: Tensor, point: GridPoint, batch_size: int) -> Guided:
    """D, D_y and the log twist for the whole cloud at a grid point, `batch_size` particles at a time."""
    parts = [guidance.guide(x[i : i + batch_size], point.t, likelihood=True)  # a float t: no device sync
             for i in range(0, x.shape[0], batch_size)]
    if len(parts) == 1:  # the whole cloud in one call: nothing to join (the rows of A J are K x m x d)
        return replace(parts[0], log_likelihood=parts[0].log_likelihood.double())

    def cat(name: str) -> Tensor | None:
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else torch.cat(values)

    return Guided(cat("denoised"), cat("guided_mean"), cat("log_likelihood").double(), all(p.normalised for p in parts),
                  cat("measurement_jacobian"), cat("gram_eigenvalues"), cat("gram_eigenvectors"))


def guided_proposal(cloud: Cloud, prior: Transition, proposal: Transition, generator) -> tuple[Tensor, Tensor]:
    """x_s from the guided step N(proposal.mean, tau^2 I), with log p(x_s | x_t) - log q(x_s | x_t)."""
    x_next = proposal.draw(randn(cloud.x.shape, generator, cloud.x.device, cloud.x.dtype))
    log_ratio = gaussian_log_density(x_next, prior.mean, prior.std) - gaussian_log_density(x_next, proposal.mean, proposal.std)
    return x_next, log_ratio.double()


def conditioned_proposal(cloud: Cloud, prior: Transition, now: GridPoint, nxt: GridPoint, eta: float,
                         operator: LinearOperator, y: Tensor, generator) -> tuple[Tensor, Tensor]:
    """`conditioned_step` with the twist at the next time linearised around the prior mean.

    The rows of A J are those at x_t (re-evaluating them at the prior mean would cost a network
    call; extrapolating them from the last step gained nothing on Gaussian priors and overshot
    on mixtures); C is rebuilt from the same A J A^T at the next time's scale sigma^2 / alpha;
    and A D there is A D(x_t) moved by A J along the difference between this step's mean and
    the first-order one (a first-order prediction: it ignores how J and D change between the
    two times).
    """
    guided = cloud.guided
    spectrum = tweedie_spectrum(guided.gram_eigenvalues, operator.sigma_y**2, nxt.sigma**2 / nxt.alpha)
    vectors = guided.gram_eigenvectors
    covariance_next = (vectors * spectrum[:, None, :]) @ vectors.transpose(1, 2)
    first_order_mean = exponential_transition(cloud.x, guided.denoised, now, nxt, eta).mean
    shift = (prior.mean - first_order_mean).flatten(1)
    rows = guided.measurement_jacobian
    predicted = operator.A(guided.denoised) + (rows.flatten(2) @ shift[..., None]).reshape(-1, *y.shape)
    return conditioned_step(prior.mean, prior.std, y[None] - predicted, rows, covariance_next, generator)


def particle_sample(
    model: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    x_shape: tuple[int, ...],
    settings: ParticleSettings,
    sampler: SamplerSettings,
    guidance: GuidanceSettings,
    *,
    num_samples: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | Callable[[int], Any] = False,
) -> ParticleResult:
    """Twisted SMC posterior sampling (see the module docstring), settings checked already.

    Args:
        model: the unconditional Denoiser, in its own units (as are y and the operator).
        operator: A with sigma_y > 0 (the final weight is the Gaussian likelihood).
        y: one measurement, shape y_shape.
        x_shape: the shape of one x.
        settings: from `check_particle_settings` (proposal resolved); sampler: the time grid,
            eta and solver ("multistep": each particle keeps its own D history, or "euler");
            guidance: the twist's covariance and its solve.
        num_samples: draws returned from the final weighted cloud (multinomial, with replacement).
        generator, device, dtype, progress: as in `samplers.sample`.
    """
    device, dtype = placement(model, device or y.device, dtype)
    count = settings.particles
    batch_size = settings.batch_size or count
    points = grid_points(model.schedule, sampler.steps, sampler.grid, sampler.s_min)
    twist = AveragedLikelihoodGuidance.from_settings(model, operator, y[None], guidance)
    x = start_sample(points[0], (count, *x_shape), generator, device, dtype)
    first = guide_cloud(twist, x, points[0], batch_size)
    cloud = Cloud(x, first, first.log_likelihood.clone(), normalised=first.normalised)
    # The unguided step (the target's transition) and the guided one keep separate D histories.
    prior_solver, proposal_solver = make_solver(sampler), make_solver(sampler)
    bar = progress_bar(progress, len(points), "particles")
    cloud.resample_if_degenerate(0, settings.ess_threshold, generator, [prior_solver, proposal_solver])
    for now, nxt in zip(points[:-1], points[1:]):
        prior = prior_solver.transition(cloud.x, cloud.guided.denoised, now, nxt)
        if settings.proposal == "conditioned":
            x_next, log_ratio = conditioned_proposal(cloud, prior, now, nxt, sampler.eta, operator, y, generator)
        else:
            proposal = proposal_solver.transition(cloud.x, cloud.guided.guided_mean, now, nxt)
            x_next, log_ratio = guided_proposal(cloud, prior, proposal, generator)
        cloud.move(x_next, guide_cloud(twist, x_next, nxt, batch_size), log_ratio)
        cloud.resample_if_degenerate(nxt.index, settings.ess_threshold, generator, [prior_solver, proposal_solver])
        bar.update(1)
    result = finish(cloud, operator, y, num_samples, generator, forward_calls=twist.forward_count, vjps=twist.vjp_count)
    result.cg_truncated, result.cg_solves = twist.cg_truncated, len(twist.cg_iterations)
    bar.update(1)
    bar.close()
    return result


def finish(cloud: Cloud, operator: LinearOperator, y: Tensor, num_samples: int, generator, *,
           forward_calls: int, vjps: int) -> ParticleResult:
    """The final weight swaps the last twist for the true likelihood of the unguided
    x_0 = D(x_{t_min}); then `num_samples` draws from the weighted cloud."""
    x0 = cloud.guided.denoised
    cloud.log_weights = (cloud.log_weights + measurement_log_likelihood(operator, y[None], x0).double()
                         - cloud.guided.log_likelihood)
    cloud.ess.append(effective_sample_size(cloud.log_weights) / cloud.size)
    cloud.close_evidence()
    weights = torch.softmax(cloud.log_weights, 0)
    device_generator = generator.device if generator is not None else weights.device
    draws = torch.multinomial(weights.to(device_generator), num_samples, replacement=True, generator=generator)
    return ParticleResult(x0[draws.to(x0.device)], x0, weights.to(x0.dtype), cloud.ess, cloud.resampled,
                          cloud.log_evidence if cloud.normalised else math.nan, nfe=forward_calls, vjps=vjps)
