r"""Noise schedules: x_t = alpha(t) x_0 + sigma(t) eps on continuous time t in [0, 1].

Every schedule gives alpha(t) and sigma(t) with alpha(0) = 1, sigma(0) = 0 and a
signal-to-noise ratio alpha^2 / sigma^2 that decreases in t, and the coefficients of the
linear SDE whose marginals they are (docs/theory.md §1):

    dx = f(t) x dt + g(t) dw,    f = alpha' / alpha,    g^2 = alpha^2 d/dt (sigma^2 / alpha^2).

Samplers work with the noise ratio s(t) = sigma(t) / alpha(t) (the VE form of any
schedule); `time_for_ratio` inverts it.

| schedule            | alpha                     | sigma                                   |
|---------------------|---------------------------|-----------------------------------------|
| VPSchedule          | exp(-1/2 int_0^t beta)    | sqrt(1 - alpha^2)                        |
| VESchedule          | 1                         | sigma_min sqrt((sigma_max / sigma_min)^(2t) - 1) |
| SubVPSchedule       | exp(-1/2 int_0^t beta)    | 1 - alpha^2                              |
| RectifiedFlow       | 1 - t                     | t                                        |
| DiscreteSchedule    | from alphas_cumprod       | sqrt(1 - alpha^2)                        |
| GeometricVESchedule | 1                         | sigma_min (sigma_max / sigma_min)^t      |

GeometricVESchedule is the time axis of the sigma-parametrised networks (score-SDE VE, EDM):
there sigma(0) = sigma_min > 0 is the smallest noise the network was trained on, not clean
data, and samplers end there with a denoising step x_0 = D(x, t_min = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Schedule:
    """Base class: subclasses define alpha, sigma, f and g2 as functions of a tensor t.

    Attributes:
        t_max: the latest time samplers start from (1, or just under 1 where alpha(1) = 0).
        t_min: the earliest time a model knows (0, or a discrete schedule's first step).
    """

    t_max: float = 1.0
    t_min: float = 0.0

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t), same shape as t."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t), same shape as t."""
        raise NotImplementedError

    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient f(t) = alpha'(t) / alpha(t)."""
        raise NotImplementedError

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient g(t)^2 = alpha^2 d/dt (sigma^2 / alpha^2)."""
        raise NotImplementedError

    def ratio(self, t: Tensor) -> Tensor:
        """Noise ratio s(t) = sigma(t) / alpha(t), increasing from 0 at t = 0."""
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2), decreasing in t."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def terminal_kl_bound(self, mean_square_norm: float, dimension: int) -> float:
        """Upper bound, in nats, on KL(p_{t_max} || reference) for data with E||x_0||^2 = mean_square_norm.

        Samplers start from the reference N(0, (alpha^2 + sigma^2) I) at t_max, not from the
        true marginal p_{t_max} = E N(alpha x_0, sigma^2 I); by convexity of KL the mismatch is
        at most the average over x_0 of KL(N(alpha x_0, sigma^2 I) || N(0, s^2 I)), s^2 = alpha^2 + sigma^2:

            1/2 [alpha^2 E||x_0||^2 / s^2 + d (sigma^2 / s^2 - 1 + log(s^2 / sigma^2))].

        Every sampler built on the schedule (posterior samplers included) inherits this error;
        it matters for data far from the origin in many dimensions, e.g. the d = 800 MCGdiff
        mixture, whose E||x_0||^2 is about 10^5.
        """
        if mean_square_norm < 0 or dimension < 1:
            raise ValueError(f"need mean_square_norm >= 0 and dimension >= 1, got {mean_square_norm}, {dimension}")
        t = torch.tensor(self.t_max, dtype=torch.float64)
        alpha2, sigma2 = float(self.alpha(t)) ** 2, float(self.sigma(t)) ** 2
        total = alpha2 + sigma2
        spread = dimension * (sigma2 / total - 1 + math.log(total / sigma2))
        return 0.5 * (alpha2 * mean_square_norm / total + spread)

    def time_for_ratio(self, s: Tensor, iterations: int = 64) -> Tensor:
        """The time t in [0, t_max] with s(t) = s, by bisection (s is monotone in t)."""
        s = torch.as_tensor(s, dtype=torch.float64)
        low = torch.zeros_like(s)
        high = torch.full_like(s, self.t_max)
        for _ in range(iterations):
            middle = (low + high) / 2
            above = self.ratio(middle) > s
            high = torch.where(above, middle, high)
            low = torch.where(above, low, middle)
        return (low + high) / 2

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _LinearBeta(Schedule):
    """Shared part of VP and sub-VP: beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max and beta_max > 0, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """int_0^t beta(u) du."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)


class VPSchedule(_LinearBeta):
    """Variance preserving (DDPM): alpha^2 + sigma^2 = 1, dx = -1/2 beta x dt + sqrt(beta) dw."""

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)


class SubVPSchedule(_LinearBeta):
    """Sub-VP: sigma = 1 - alpha^2, g^2 = beta (1 - alpha^4)."""

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.integrated_beta(t))

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t))


class _SigmaRange(Schedule):
    """Shared part of the variance-exploding schedules: alpha = 1, f = 0, sigma set by a range
    sigma_min < sigma_max."""

    def __init__(self, sigma_min: float, sigma_max: float):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)


class VESchedule(_SigmaRange):
    """Variance exploding (SMLD): alpha = 1, sigma geometric between sigma_min and sigma_max.

    sigma(t)^2 = sigma_min^2 ((sigma_max / sigma_min)^(2t) - 1) is the variance that
    dx = sigma_min (sigma_max / sigma_min)^t sqrt(2 log(sigma_max / sigma_min)) dw
    accumulates from t = 0, so sigma(0) = 0 exactly and sigma ~ sigma_max at t = 1.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        super().__init__(sigma_min, sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.sqrt(torch.expm1(2 * t * self._log_ratio()))

    def g2(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio() * self.sigma_min**2 * torch.exp(2 * t * self._log_ratio())


class GeometricVESchedule(_SigmaRange):
    """Variance exploding with sigma log-linear in t: sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    The time axis of diffusers' ScoreSdeVeScheduler (its `sigmas` at its continuous timesteps t)
    and of EDM's sigma range [sigma_min, sigma_max]. alpha = 1, f = 0 and
    g^2 = d sigma^2 / dt = 2 log(sigma_max / sigma_min) sigma(t)^2.

    Unlike VESchedule, sigma(0) = sigma_min > 0: t = 0 is the least noisy level the network
    knows, so t_min = 0 and samplers finish with D there (time grids end at sigma = max(s_min,
    sigma_min)). They start from N(0, (1 + sigma_max^2) I), within a factor 1 + 1/(2 sigma_max^2)
    of the N(0, sigma_max^2 I) of diffusers' samplers; data in [0, 1] (mean 1/2) or [-1, 1] is
    negligible against sigma_max (see Schedule.terminal_kl_bound).
    """

    t_min = 0.0

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 348.0):
        super().__init__(sigma_min, sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio())

    def g2(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio() * self.sigma(t) ** 2

    def time_for_sigma(self, sigma: Tensor) -> Tensor:
        """The time t with sigma(t) = sigma, in closed form (sigma within [sigma_min, sigma_max])."""
        return torch.log(torch.as_tensor(sigma, dtype=torch.float64) / self.sigma_min) / self._log_ratio()


class RectifiedFlow(Schedule):
    """Rectified flow: alpha = 1 - t, sigma = t. alpha(1) = 0, so samplers start at t_max < 1."""

    def __init__(self, t_max: float = 0.999):
        if not 0 < t_max < 1:
            raise ValueError(f"t_max must be in (0, 1), got {t_max}")
        self.t_max = float(t_max)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def f(self, t: Tensor) -> Tensor:
        return -1 / (1 - t)

    def g2(self, t: Tensor) -> Tensor:
        return 2 * t / (1 - t)


class DiscreteSchedule(Schedule):
    """A VP schedule from a discrete DDPM `alphas_cumprod` (what diffusers schedulers expose).

    With T training steps, timestep n sits at t_n = (n + 1) / T, so t = 0 is the clean data
    (alpha = 1) and t = 1 the last training step. log alpha^2 is interpolated linearly in t
    between the knots, which makes beta(t) = -d/dt log alpha^2 piecewise constant and equal
    to T * (-log(1 - beta_n)) ~= T * beta_n on step n (docs/theory.md §1).

    Zero terminal SNR (`rescale_betas_zero_snr=True`: alphas_cumprod[-1] = 0, or below 2^-24)
    is accepted: the last value is set to 2^-24 (or half the one before, if that is smaller), as diffusers'
    EulerDiscreteScheduler does, so alpha(1) = 2^-12 > 0 and s(1) = sigma / alpha ~ 4096 stay
    finite. Samplers then start at t = 1 from N(0, I), which is that marginal up to 2^-24.
    D at the last step is well defined for v and x0 prediction (eps prediction divides by alpha).
    """

    TERMINAL_FLOOR = 2.0**-24

    def __init__(self, alphas_cumprod: Tensor):
        values = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().clone()
        if values.numel() < 2:
            raise ValueError("alphas_cumprod needs at least two entries")
        self.zero_terminal_snr = bool(0 <= values[-1] < self.TERMINAL_FLOOR) and bool(values[-2] > 0)
        if self.zero_terminal_snr:
            previous = float(values[-2])
            values[-1] = self.TERMINAL_FLOOR if self.TERMINAL_FLOOR < previous else previous / 2
        if not bool(((values > 0) & (values <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1] (only the last entry may be 0: zero terminal SNR)")
        if not bool((values[1:] < values[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.num_train_timesteps = values.numel()
        self.t_min = 1.0 / self.num_train_timesteps  # training timestep 0
        # Knots at t = 0, 1/T, ..., 1 holding log alpha^2 (0 at t = 0).
        self._log_alpha2 = torch.cat([torch.zeros(1, dtype=torch.float64), values.log()])

    def _interpolate(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log alpha^2 at t and its slope d/dt log alpha^2."""
        knots = self._log_alpha2.to(t.device)
        position = t.to(torch.float64).clamp(0, 1) * self.num_train_timesteps
        index = position.floor().clamp(max=self.num_train_timesteps - 1).long()
        slope = (knots[index + 1] - knots[index]) * self.num_train_timesteps
        value = knots[index] + (position - index) * (knots[index + 1] - knots[index])
        return value.to(t.dtype), slope.to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._interpolate(t)[0])

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._interpolate(t)[0]))

    def f(self, t: Tensor) -> Tensor:
        return 0.5 * self._interpolate(t)[1]

    def g2(self, t: Tensor) -> Tensor:
        return -self._interpolate(t)[1]

    def timestep(self, t: Tensor) -> Tensor:
        """The model's (fractional) training timestep n = T t - 1 at time t, as a float tensor."""
        return t * self.num_train_timesteps - 1

    def __repr__(self) -> str:
        return f"DiscreteSchedule(num_train_timesteps={self.num_train_timesteps})"
