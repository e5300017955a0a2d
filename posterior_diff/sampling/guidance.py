r"""Guidance by the averaged likelihood, as a denoiser that returns the posterior mean.

Observing y = A x_0 + sigma_y n, the score of p_t(x | y) is score(x, t) + grad log l(y | x_t)
with the averaged likelihood (docs/theory.md §5), under p(x_0 | x_t) ~= N(D, V_t):

    l(y | x_t) ~= N(y; A D(x_t), C),     C = sigma_y^2 I + A V_t A^T,
    grad_{x_t} log l = J^T A^T C^{-1} (y - A D),      J = dD/dx_t.

Because score = -(x - alpha D) / sigma^2, adding grad log l to the score is the same as
replacing D by the guided mean

    D_y = D + (sigma^2 / alpha) * guidance_scale * grad_{x_t} log l,

so guidance is a Denoiser wrapper and every sampler works with it unchanged. For the
Tweedie covariance V_t = (sigma^2 / alpha) J and a Gaussian prior, D_y is exactly
E[x_0 | x_t, y].

Covariance choices for V_t, and what one call costs beyond the single network forward:

| covariance  | V_t                                   | C^{-1} applied by                       | VJPs  |
|-------------|---------------------------------------|-----------------------------------------|-------|
| "zero"      | 0 (DPS-like)                          | division by sigma_y^2                    | 1     |
| "isotropic" | r_t^2 I, r_t^2 = sigma^2/(alpha^2+sigma^2) (PiGDM) | the operator's solve (closed form where it has one) | 1 |
| "diagonal"  | diag(C) ~= row sums of A V_t A^T (TMPD)| division                                | 2     |
| "tweedie"   | (sigma^2 / alpha) J, matrix-free      | conjugate gradient (preconditioned by the isotropic solve where closed form) | CG products |
| "projection"| r_t^2 I, with the Jacobian it implies | the operator's solve                    | 0     |

"projection" is Jacobian-free: the Gaussian p(x_0 | x_t) = N(D, r_t^2 I) implies, by Tweedie,
J = (alpha / sigma^2) V_t = (alpha r_t^2 / sigma^2) I, so the guided mean is the Gaussian
conditioning of D on y,

    D_y = D + r_t^2 A^T (sigma_y^2 I + r_t^2 A A^T)^{-1} (y - A D),

one network forward and no backward pass (docs/theory.md §5; the data-consistency step of DDNM
and DiffPIR with ΠGDM's r_t). It is exact for a Gaussian prior N(mu, I).

When the twist log l is asked for (particle mode) with the Tweedie covariance and y of at most
EXACT_LOG_DET_MAX = 64 entries, the m rows of A J are built instead (m VJPs): C^{-1} r is then
exact in the eigenbasis of A J A^T and the gradient a combination of the rows, with no CG.

The Tweedie solve stops at a residual of a tenth of the noise's norm (`cg_noise_tol`), starts
from the previous step's solution (`warm_start`), and hands back the gradient J^T A^T C^{-1} r
accumulated from its own products, so a step costs one VJP per CG product and no more
(docs/theory.md §5). `cg_max_iter` is a cap, not part of the rule: a solve that reaches it with
some sample's residual still above its tolerance is truncated, its C^{-1} r (and so the Tweedie
covariance it applies) only approximate. Such solves are counted (`cg_truncated`), and `restore`
reports them, with a warning where the caller named the covariance but not the cap (the image
models' default cap of 4 truncates most solves).

All Jacobian products reuse the one forward pass (vector-Jacobian products on its graph).
Every sample of a batch has its own residual, its own CG step lengths and stopping test.

Models with a known data range (image models: `data_range = (-1, 1)`) get the guided
mean clipped to that range, as DDPM samplers clip their x_0 estimate. The reason: for a
noise-predicting network the correction is s^2 (I - sigma d eps_hat/dx)^T A^T v with
s = sigma / alpha, so at high noise (s ~ 50-150) any error in the network's Jacobian is
amplified by s^2 and can throw the estimate far outside the data; clipping keeps such
steps harmless while later, low-noise steps (s < 1) carry the measurement. Analytic priors
have no data range and are never clipped, so the exactness on Gaussian priors is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from operators import LinearOperator, conjugate_gradient, per_sample

from posterior_diff.checks import choice, number_in, positive_int
from posterior_diff.denoisers import Denoiser, as_time

COVARIANCES = ("zero", "isotropic", "diagonal", "tweedie", "projection")
EXACT_LOG_DET_MAX = 64  # measurement sizes up to which the Tweedie twist's log det is exact


class CGTruncatedWarning(RuntimeWarning):
    """Tweedie conjugate-gradient solves stopped at the cap `cg_max_iter` before meeting their
    stopping rule: the Tweedie covariance was applied only approximately."""


def pigdm_variance(alpha: Tensor, sigma: Tensor) -> Tensor:
    """PiGDM's isotropic r_t^2 = sigma^2 / (alpha^2 + sigma^2): V_t for data of unit variance."""
    return sigma**2 / (alpha**2 + sigma**2)


@dataclass(frozen=True)
class GuidanceSettings:
    """The averaged likelihood's settings, checked when built (a ValueError naming the argument).

    Attributes:
        covariance: "zero", "isotropic", "diagonal", "tweedie" or "projection" (see the module docstring).
        guidance_scale: multiplier on grad log l (1 = Bayes' rule), finite and >= 0.
        cg_tol: relative residual at which the Tweedie conjugate gradient stops, > 0.
        cg_max_iter: cap on conjugate-gradient iterations (each one vector-Jacobian product).
        cg_noise_tol: residual norm at which the Tweedie CG stops, in units of the measurement
            noise's norm sigma_y sqrt(m), >= 0. Stopping there solves the system exactly for a
            y moved by that fraction of its own noise (0: the relative rule only).
        warm_start: start each Tweedie solve from the previous step's solution.
        jacobian_s_max: the noise ratio s = sigma / alpha above which the gradient is pulled back
            through the Jacobian the Gaussian approximation implies (the projection step: no VJP)
            instead of the network's; > 0, inf (the default) for the network's Jacobian at every
            step, the default for image models too (`defaults.IMAGE_DEFAULTS`); 2 pays on SR and scattered
            missing pixels and at few steps (docs/theory.md §5, docs/jacobian_range.md).
    """

    covariance: str = "tweedie"
    guidance_scale: float = 1.0
    cg_tol: float = 1e-3
    cg_max_iter: int = 50
    cg_noise_tol: float = 0.1
    warm_start: bool = True
    jacobian_s_max: float = math.inf

    def __post_init__(self):
        choice(self.covariance, COVARIANCES, "covariance")
        object.__setattr__(self, "guidance_scale", number_in(self.guidance_scale, "guidance_scale", 0.0, math.inf))
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        object.__setattr__(self, "cg_tol", number_in(self.cg_tol, "cg_tol", 0.0, open_low=True))
        object.__setattr__(self, "cg_max_iter", positive_int(self.cg_max_iter, "cg_max_iter"))
        object.__setattr__(self, "cg_noise_tol", number_in(self.cg_noise_tol, "cg_noise_tol", 0.0, math.inf))
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"warm_start must be True or False, got {self.warm_start!r}")
        object.__setattr__(self, "jacobian_s_max", number_in(self.jacobian_s_max, "jacobian_s_max", 0.0, math.inf,
                                                             open_low=True))


@dataclass(frozen=True)
class WarmStart:
    """The Tweedie solve of the last call, for the next one to start from: the batch's residual
    shape, the time t of that call, C^{-1} r, and the isotropic solve of that r (None without a
    closed form)."""

    shape: torch.Size
    t: float
    solution: Tensor
    isotropic: Tensor | None


@dataclass
class Guided:
    """One guided denoising of a batch: the unguided D(x_t), the guided mean D_y, and
    log l(y | x_t) per sample (B,) when asked for (normalised: including its log det).

    Where the Tweedie log det is exact (y of at most EXACT_LOG_DET_MAX entries) the likelihood
    also carries the pieces that built it, which particle mode's conditioned proposal reuses:
    `measurement_jacobian` (B, m, *x_shape), row i = J^T A^T e_i (the rows of A J), and the
    eigendecomposition of A J A^T (symmetrised, float64): `gram_eigenvalues` (B, m) and
    `gram_eigenvectors` (B, m, m). C at any time's scale is then `tweedie_spectrum` in that
    basis, with no further operator application or eigendecomposition.
    """

    denoised: Tensor
    guided_mean: Tensor
    log_likelihood: Tensor | None
    normalised: bool = False
    measurement_jacobian: Tensor | None = None
    gram_eigenvalues: Tensor | None = None
    gram_eigenvectors: Tensor | None = None


def tweedie_spectrum(gram_eigenvalues: Tensor, noise_variance: float, tweedie_scale: Tensor | float) -> Tensor:
    """Eigenvalues of C = sigma_y^2 I + s A J A^T, (B, m), from those of A J A^T, (B, m), and
    s = sigma^2 / alpha, (B,) or a float; C has the eigenvectors of A J A^T.

    They are floored at 1e-6 sigma_y^2 (and 1e-18) so that C stays positive definite where a
    network's Jacobian is not.
    """
    scale = torch.as_tensor(tweedie_scale, dtype=gram_eigenvalues.dtype, device=gram_eigenvalues.device).reshape(-1, 1)
    return (noise_variance + scale * gram_eigenvalues).clamp_min(max(noise_variance * 1e-6, 1e-18))


def _solve_in_eigenbasis(eigenvectors: Tensor, spectrum: Tensor, residual: Tensor) -> Tensor:
    """C^{-1} r per sample for C = V diag(spectrum) V^T: eigenvectors (B, m, m), spectrum (B, m),
    r (B, *y_shape); solved in float64, returned in r's dtype and shape."""
    coordinates = (eigenvectors.transpose(1, 2) @ residual.flatten(1).double()[..., None])[..., 0] / spectrum
    return (eigenvectors @ coordinates[..., None])[..., 0].to(residual.dtype).reshape(residual.shape)


class AveragedLikelihoodGuidance(Denoiser):
    """Wrap a denoiser so that it returns E[x_0 | x_t, y] under the averaged likelihood.

    Args:
        denoiser: the unconditional Denoiser D(x_t, t).
        operator: the forward model A with its noise level sigma_y.
        y: measurements, shape (B, *y_shape), one per sample of the batches that will be
            denoised (or (1, *y_shape), shared by every sample).
        covariance: "zero", "isotropic", "diagonal", "tweedie" or "projection" (see the module docstring).
        guidance_scale: multiplier on grad log l (1 = Bayes' rule).
        cg_tol: relative residual at which the Tweedie conjugate gradient stops.
        cg_max_iter: cap on conjugate-gradient iterations (each one vector-Jacobian product).
        cg_noise_tol, warm_start, jacobian_s_max: as in `GuidanceSettings`.

    Counters `forward_count` and `vjp_count` record the network work done; `cg_iterations`,
    `cg_residuals` (per sample, ||r - C u|| / ||r||) and `cg_converged` (per sample, whether
    the stopping rule was met) each Tweedie solve's; `cg_truncated` counts the solves stopped
    by the cap `cg_max_iter` before every sample met the rule.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        operator: LinearOperator,
        y: Tensor,
        covariance: str = "tweedie",
        guidance_scale: float = 1.0,
        cg_tol: float = 1e-3,
        cg_max_iter: int = 50,
        cg_noise_tol: float = 0.1,
        warm_start: bool = True,
        jacobian_s_max: float = math.inf,
    ):
        self._configure(denoiser, operator, y, GuidanceSettings(covariance, guidance_scale, cg_tol, cg_max_iter,
                                                                cg_noise_tol, warm_start, jacobian_s_max))

    @classmethod
    def from_settings(cls, denoiser: Denoiser, operator: LinearOperator, y: Tensor,
                      settings: GuidanceSettings) -> "AveragedLikelihoodGuidance":
        """The guidance for settings checked already (GuidanceSettings checks itself when built)."""
        guidance = cls.__new__(cls)
        guidance._configure(denoiser, operator, y, settings)
        return guidance

    def _configure(self, denoiser: Denoiser, operator: LinearOperator, y: Tensor, settings: GuidanceSettings) -> None:
        super().__init__()
        if settings.covariance == "zero" and operator.sigma_y == 0:
            raise ValueError('covariance="zero" divides by sigma_y^2: it needs an operator with sigma_y > 0')
        self.denoiser = denoiser
        self.operator = operator
        self.schedule = denoiser.schedule
        self.x_shape = denoiser.x_shape
        self.data_range = denoiser.data_range
        self.settings = settings
        self.register_buffer("y", y)
        self.forward_count = 0
        self.vjp_count = 0
        self.cg_iterations: list[int] = []
        # per solve, each sample's ||r - C u|| / ||r|| (B,), kept on the device: no sync per step
        self.cg_residuals: list[Tensor] = []
        # per solve, each sample's CGInfo.converged (B,), on the device likewise
        self.cg_converged: list[Tensor] = []
        self._warm_start: WarmStart | None = None

    @property
    def cg_truncated(self) -> int:
        """Tweedie solves so far that the cap `cg_max_iter` stopped before every sample met the
        stopping rule (relative residual `cg_tol` or residual norm `cg_noise_tol` sigma_y sqrt(m)):
        solves whose C^{-1} r is truncated. 0 where no CG ran. (Reads the flags off the device.)"""
        cap = self.settings.cg_max_iter
        return sum(1 for iterations, converged in zip(self.cg_iterations, self.cg_converged)
                   if iterations >= cap and not bool(converged.all()))

    @property
    def covariance(self) -> str:
        """The covariance choice of the settings."""
        return self.settings.covariance

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        return self.guide(x_t, t).guided_mean

    def at_time(self, x_t: Tensor, t: float) -> Tensor:
        """D_y at one time t: the float goes to `guide` as it is (see `_above_network_jacobian`)."""
        return self.guide(x_t, t).guided_mean

    def final_estimate(self, x_t: Tensor, t: float) -> Tensor:
        """The sampler's closing x_0 at t_min, guided Jacobian-free (the projection mean), whatever
        the covariance: one forward and no VJP.

        At t_min (s = sigma/alpha = 2e-3 by default) the posterior p(x_0 | x_t) has shrunk to
        Cov ~= s^2 I for any prior whose density is smooth at that scale, so V_t = r_t^2 I and the
        Jacobian it implies, J = (alpha r_t^2 / sigma^2) I ~= I / alpha, are what every covariance
        choice tends to there, and the correction is at most r_t^2 / sigma_y^2 (4e-6 / sigma_y^2 at the
        default s_min) of the residual (docs/theory.md §5). deepinv's DPS and PiGDM skip the last
        step's guidance altogether; this keeps its data consistency and, like them, spends no
        backward pass on it."""
        t = as_time(t, x_t)
        return self._projection(x_t, t, self.schedule.alpha(t), self.schedule.sigma(t), False).guided_mean

    def guide(self, x_t: Tensor, t: Tensor | float, likelihood: bool = False) -> "Guided":
        """One guided denoising: the unguided D, the guided mean D_y, and (if `likelihood`) log l.

        log l(y | x_t) = log N(y; A D, C) per sample is what particle mode needs as its twist.
        Its log det C is exact for the zero and isotropic covariances (where the operator has
        `log_det`), for the diagonal one, and for the Tweedie one when y has at most
        EXACT_LOG_DET_MAX entries (m more VJPs); beyond that the Tweedie twist takes the
        isotropic log det, which does not depend on x_t (and is left out where the operator has
        none: `normalised` is then False). Such x-independent terms drop out of normalised weights.

        Above `jacobian_s_max` (any sample's s = sigma / alpha) every covariance takes the projection
        step instead: one forward and no VJP.
        """
        implied_jacobian = self.covariance == "projection" or self._above_network_jacobian(t)
        t = as_time(t, x_t)
        alpha = self.schedule.alpha(t)
        sigma = self.schedule.sigma(t)
        if implied_jacobian:
            return self._projection(x_t, t, alpha, sigma, likelihood)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            denoised = self.denoiser(x, t)
            self.forward_count += 1

            def vjp(w: Tensor, last: bool = False) -> Tensor:
                """J^T w on the graph of this call's single forward pass; `last`: no VJP follows, so
                the graph's buffers are freed as the backward pass goes (no copy kept for another)."""
                self.vjp_count += 1
                (product,) = torch.autograd.grad(denoised, x, grad_outputs=w, retain_graph=not last)
                return product

            residual = self.y - self.operator.A(denoised.detach())
            measurement_jacobian = eigenvalues = eigenvectors = None
            if likelihood and self.covariance == "tweedie" and residual[0].numel() <= EXACT_LOG_DET_MAX:
                # The exact log det needs the rows of A J (m VJPs) and the eigendecomposition of
                # A J A^T; with them C^{-1} r is exact in that basis and J^T A^T C^{-1} r is a
                # combination of the rows, so neither the CG solve nor the gradient's VJP is needed.
                measurement_jacobian, eigenvalues, eigenvectors = self._measurement_jacobian(residual, vjp)
                weighted = _solve_in_eigenbasis(eigenvectors, tweedie_spectrum(eigenvalues, self.operator.sigma_y**2,
                                                                               sigma**2 / alpha), residual)
                grad_log_likelihood = torch.einsum("bm,bm...->b...", weighted.flatten(1), measurement_jacobian)
                diagonal = None
            else:
                weighted, diagonal, grad_log_likelihood = self._apply_inverse_covariance(
                    residual, vjp, t, alpha, sigma, warm=self.settings.warm_start and not likelihood)
                if grad_log_likelihood is None:
                    grad_log_likelihood = vjp(self.operator.A_adjoint(weighted), last=True)
            log_likelihood, normalised = (self._log_likelihood(residual, weighted, diagonal, eigenvalues, alpha, sigma)
                                          if likelihood else (None, False))
        step = per_sample(sigma**2 / alpha, x_t) * self.settings.guidance_scale
        guided_mean = (denoised + step * grad_log_likelihood).detach()
        if self.data_range is not None:
            guided_mean = guided_mean.clamp(*self.data_range)
        return Guided(denoised.detach(), guided_mean, log_likelihood, normalised, measurement_jacobian, eigenvalues, eigenvectors)

    def _above_network_jacobian(self, t: Tensor | float) -> bool:
        """Whether any time of `t` has s = sigma / alpha above `jacobian_s_max`. The samplers pass t as a
        Python float (`at_time`), so the test runs on the CPU and costs an accelerator no sync."""
        s_max = self.settings.jacobian_s_max
        if math.isinf(s_max):
            return False
        t = torch.as_tensor(t, dtype=torch.float64)
        return bool((self.schedule.sigma(t) / self.schedule.alpha(t)).max() > s_max)

    def _projection(self, x_t: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, likelihood: bool) -> Guided:
        """covariance="projection": D_y = D + r_t^2 A^T C^{-1} (y - A D), C = sigma_y^2 I + r_t^2 A A^T,
        from one forward pass without a graph (see the module docstring)."""
        with torch.no_grad():
            denoised = self.denoiser(x_t.detach(), t)
        self.forward_count += 1
        residual = self.y - self.operator.A(denoised)
        r2 = pigdm_variance(alpha, sigma)
        weighted = self.operator.solve(residual, r2)
        step = per_sample(r2, x_t) * self.settings.guidance_scale
        guided_mean = denoised + step * self.operator.A_adjoint(weighted)
        if self.data_range is not None:
            guided_mean = guided_mean.clamp(*self.data_range)
        log_likelihood, normalised = (self._log_likelihood(residual, weighted, None, None, alpha, sigma)
                                      if likelihood else (None, False))
        return Guided(denoised, guided_mean, log_likelihood, normalised)

    def _log_likelihood(self, residual: Tensor, weighted: Tensor, diagonal: Tensor | None,
                        gram_eigenvalues: Tensor | None, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, bool]:
        """log N(y; A D, C) per sample, (B,), from the residual, C^{-1} residual and what the
        solve or the Tweedie twist already built: the diagonal of C (diagonal covariance) or
        the eigenvalues of A J A^T (B, m) (Tweedie, small y); and whether it is normalised
        (False: up to the log det, which is then the same for every sample)."""
        op = self.operator
        quadratic = (residual * weighted).flatten(1).sum(1)
        m = residual[0].numel()
        if self.covariance == "zero":
            log_det = torch.full_like(quadratic, m * math.log(op.sigma_y**2))
        elif diagonal is not None:  # zero-variance entries carry no information: left out, as in the solve
            logs = torch.where(diagonal > 0, diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny).log(), 0.0)
            log_det = logs.flatten(1).sum(1)
        elif gram_eigenvalues is not None:
            log_det = tweedie_spectrum(gram_eigenvalues, op.sigma_y**2, sigma**2 / alpha).log().sum(-1)
        else:
            log_det = op.log_det(pigdm_variance(alpha, sigma), residual)
            if log_det is None:  # no cheap log det: it is the same for every sample, so leave it out
                return -0.5 * (quadratic + m * math.log(2 * math.pi)), False
        return -0.5 * (quadratic + log_det + m * math.log(2 * math.pi)), True

    def _measurement_jacobian(self, residual: Tensor, vjp) -> tuple[Tensor, Tensor, Tensor]:
        """The rows of A J, (B, m, *x_shape), from m VJPs, and the eigenvalues (B, m) and
        eigenvectors (B, m, m) of A J A^T built from them, in float64 and symmetrised (it is
        symmetric for a true posterior mean, a network's only nearly)."""
        op = self.operator
        rows = []
        for index in range(residual[0].numel()):
            basis = torch.zeros_like(residual).flatten(1)
            basis[:, index] = 1
            rows.append(vjp(op.A_adjoint(basis.reshape(residual.shape))))
        gram = torch.stack([op.A(row).flatten(1) for row in rows], dim=-1).double()  # A J^T A^T
        eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.transpose(1, 2)) / 2)
        return torch.stack(rows, dim=1).detach(), eigenvalues.detach(), eigenvectors.detach()

    def _initial_guess(self, residual: Tensor, isotropic: Tensor | None, t: Tensor, warm: bool) -> Tensor | None:
        """Where the Tweedie CG starts: from the previous call's solution, corrected by the change
        of the isotropic solve, where that call was on the same batch earlier in the run;
        else from the isotropic solve (operators with a closed form), else from 0.

        C_t and y - A D change little from one step to the next, and the isotropic solve P^{-1}
        follows most of the change of the right-hand side: u_prev + P^{-1} r - P^{-1} r_prev.
        `isotropic` is P^{-1} r (None without a closed form), solved once per call by the caller.
        """
        previous = self._warm_start
        if not (warm and previous is not None and previous.shape == residual.shape and previous.t > float(t[0])):
            return isotropic
        if isotropic is None or previous.isotropic is None:
            return previous.solution
        return previous.solution + isotropic - previous.isotropic

    def _apply_inverse_covariance(
        self, residual: Tensor, vjp: Callable[[Tensor], Tensor], t: Tensor, alpha: Tensor, sigma: Tensor, warm: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """C^{-1} (y - A D) per sample for the chosen covariance (shape of the residual); the
        diagonal of C when the covariance is "diagonal"; and the gradient J^T A^T C^{-1} (y - A D)
        where the solve made it on the way (Tweedie), else None. `warm`: the Tweedie solve may
        start from the previous call's solution (see `_initial_guess`)."""
        op = self.operator
        noise_variance = op.sigma_y**2
        if self.covariance == "zero":
            return residual / noise_variance, None, None
        r2 = pigdm_variance(alpha, sigma)
        if self.covariance == "isotropic":
            return op.solve(residual, r2), None, None
        tweedie_scale = sigma**2 / alpha  # V_t = tweedie_scale * J
        if self.covariance == "diagonal":
            ones = torch.ones_like(residual)
            row_sums = per_sample(tweedie_scale, residual) * op.A(vjp(op.A_adjoint(ones)))
            variance = noise_variance + row_sums.clamp_min(0)
            return torch.where(variance > 0, residual / torch.where(variance > 0, variance, 1.0), 0.0), variance, None

        def matvec(u: Tensor) -> tuple[Tensor, Tensor]:
            """(C u, J^T A^T u): the second is the gradient's VJP, so CG hands back J^T A^T C^{-1} r."""
            gradient = vjp(op.A_adjoint(u))
            return noise_variance * u + per_sample(tweedie_scale, u) * op.A(gradient), gradient

        # The isotropic solve approaches the Tweedie one at small t, where V_t ~ (sigma/alpha)^2 I
        # for a smooth data density, and is free where the operator has a closed form: use it as
        # preconditioner there. (CG assumes a symmetric A J A^T, which a network's Jacobian is
        # only nearly.)
        preconditioner = (lambda u: op.solve(u, r2)) if op.has_closed_form_solve else None
        isotropic = preconditioner(residual) if preconditioner else None  # the guess, and the warm start's anchor
        solution, info = conjugate_gradient(
            matvec,
            residual,
            initial_guess=self._initial_guess(residual, isotropic, t, warm),
            preconditioner=preconditioner,
            tol=self.settings.cg_tol,
            atol=self.settings.cg_noise_tol * op.sigma_y * math.sqrt(residual[0].numel()),
            max_iter=self.settings.cg_max_iter,
            with_image=True,
        )
        if warm:
            self._warm_start = WarmStart(residual.shape, float(t[0]), solution, isotropic)
        self.cg_iterations.append(info.iterations)
        self.cg_residuals.append(info.relative_residual.detach())
        self.cg_converged.append(info.converged)
        # info.image is None only if CG made no product (the zero guess was good enough): the caller's VJP then.
        return solution, None, info.image
