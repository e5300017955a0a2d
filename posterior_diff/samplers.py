r"""Reverse-time samplers for the family of THEORY section 3, driven by a Denoiser.

For a noise level h = eta * g, eta in [0, 1],

    dx = [f x - 1/2 (1 + eta^2) g^2 score(x, t)] dt + eta g dw_bar,     t from 1 down to 0,

runs the forward marginals backwards: eta = 1 is the reverse SDE, eta = 0 the
probability-flow ODE. With score = -(x - alpha D) / sigma^2 the drift is linear in x once D
is frozen, which the exponential solvers integrate exactly over a step. Writing
s = sigma / alpha, rho = s_next / s and eps_hat = (x - alpha D) / sigma, one such step is

    x_next = alpha_next D + sigma_next (rho^(eta^2) eps_hat + sqrt(1 - rho^(2 eta^2)) z),

which is DDPM ancestral sampling at eta = 1 and DDIM at eta = 0.

Solvers (`steps` grid times, then a final denoising step x_0 = D(x, t_min)):

| solver            | step                                                         | NFE            |
|-------------------|--------------------------------------------------------------|----------------|
| "multistep"       | exponential step with D extrapolated from the previous step: second order (DPM-Solver++(2M), its SDE form for eta > 0). The default. | steps          |
| "euler"           | the exponential (Euler–Maruyama in the data-prediction form) step above: first order | steps |
| "heun"            | Heun's method on dz/ds = (z - D)/s, z = x / alpha (EDM); eta = 0 only | 2 steps - 1 |
| "pc"              | "multistep" predictor + one Langevin corrector step at each new time (Song et al. 2021) | 2 steps - 1 |
| "euler_maruyama"  | the textbook step x - [f x - 1/2 (1 + eta^2) g^2 score] dt + eta g sqrt(dt) z | steps |

On a Gaussian prior the first-order steps shrink the covariance by 5-13% at 100 steps while
"multistep" is within 1% (benchmarks/gaussian_exactness.py), hence the default.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoisers import Denoiser, randn
from .time_grids import time_grid

SOLVERS = ("multistep", "euler", "heun", "pc", "euler_maruyama")


class NonFiniteSampleError(FloatingPointError):
    """A sampler produced NaN or infinite values; the message names the step and time."""


def check_eta(eta: float, solver: str) -> float:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise TypeError(f"eta must be a number in [0, 1], got {eta!r}") from None
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (1 = reverse SDE, 0 = probability-flow ODE), got {eta}")
    if solver == "heun" and eta != 0:
        raise ValueError(f'solver="heun" integrates the probability-flow ODE and needs eta=0, got eta={eta}')
    return eta


class _Coefficients:
    """alpha, sigma, f, g^2 of a schedule at one time t, as Python floats."""

    def __init__(self, schedule, t: float):
        time = torch.tensor(t, dtype=torch.float64)
        self.t = t
        self.alpha = float(schedule.alpha(time))
        self.sigma = float(schedule.sigma(time))
        self.f = float(schedule.f(time))
        self.g2 = float(schedule.g2(time))
        self.log_ratio = math.log(self.sigma / self.alpha)


def progress_bar(progress: bool | Callable[[int], Any], total: int, description: str):
    """A bar with update(n) / close(): `progress(total)` if it is callable, else tqdm (hidden when False)."""
    return progress(total) if callable(progress) else tqdm(total=total, disable=not progress, desc=description)


def _kept_noise_fraction(now: _Coefficients, nxt: _Coefficients, eta: float) -> float:
    """How much of the current noise estimate a step keeps: (s' / s)^(eta^2), s = sigma / alpha."""
    return ((nxt.sigma * now.alpha) / (now.sigma * nxt.alpha)) ** (eta**2)


def transition_std(now: _Coefficients, nxt: _Coefficients, eta: float) -> float:
    """Standard deviation of the fresh noise in one `exponential_step` (0 for eta = 0)."""
    return nxt.sigma * math.sqrt(max(0.0, 1.0 - _kept_noise_fraction(now, nxt, eta) ** 2))


def exponential_step(x: Tensor, x0: Tensor, now: _Coefficients, nxt: _Coefficients, eta: float, noise: Tensor | None) -> Tensor:
    """One step of the eta-family from `now` to `nxt` with D frozen at x0 (exact linear part):
    x_next = alpha' x0 + sigma' keep eps_hat + transition_std(now, nxt, eta) * noise."""
    eps_hat = (x - now.alpha * x0) / now.sigma
    out = nxt.alpha * x0 + nxt.sigma * _kept_noise_fraction(now, nxt, eta) * eps_hat
    std = transition_std(now, nxt, eta)
    return out + std * noise if std > 0 and noise is not None else out


def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    *,
    steps: int = 100,
    eta: float = 1.0,
    solver: str = "multistep",
    grid: str = "log-snr",
    s_min: float = 2e-3,
    snr: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | Callable[[int], Any] = False,
) -> tuple[Tensor, int]:
    """Draw samples x_0 by integrating the reverse-time dynamics from t_max to t_min.

    Args:
        denoiser: gives D(x_t, t); wrap it in AveragedLikelihoodGuidance to sample a posterior.
        shape: (B, *x_shape), the batch of samples to draw.
        steps: number of grid times (network evaluations for the one-evaluation solvers).
        eta: noise level in [0, 1]: 1 = reverse SDE, 0 = probability-flow ODE.
        solver: one of SOLVERS (see the module docstring).
        grid: "log-snr", "uniform" or "karras" (see time_grids).
        s_min: noise ratio sigma / alpha at the last grid time.
        snr: signal-to-noise ratio of the Langevin corrector ("pc" only; Song et al. 2021 use
            0.16 with a first-order predictor; 0.05 measured best here with the multistep one).
        generator: torch.Generator making the draw reproducible.
        device, dtype: where to sample; default: those of the denoiser's tensors.
        progress: True shows a tqdm progress bar; a callable `progress(total)` returning a bar
            (an object with `update(n)` and `close()`, e.g. a diffusers pipeline's
            `progress_bar`) shows that one.

    Returns:
        (x_0 samples of the given shape, number of denoiser evaluations).

    Raises:
        NonFiniteSampleError: as soon as a step yields a non-finite value.
    """
    eta = check_eta(eta, solver)
    reference = denoiser.reference_tensor()
    device = torch.device(device) if device is not None else (reference.device if reference is not None else torch.device("cpu"))
    dtype = dtype or denoiser.sampling_dtype()
    times = time_grid(denoiser.schedule, steps, grid, s_min).tolist()
    coefficients = [_Coefficients(denoiser.schedule, t) for t in times]
    evaluations = 0

    def denoise(x: Tensor, c: _Coefficients, step: int) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        x0 = denoiser(x, torch.full((x.shape[0],), c.t, dtype=dtype, device=device))
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteSampleError(f"the denoiser returned non-finite values at step {step} (t={c.t:.4g})")
        return x0

    # Start from the forward marginal at t_max for data of unit variance.
    start = coefficients[0]
    x = math.sqrt(start.alpha**2 + start.sigma**2) * randn(shape, generator, device, dtype)
    previous_x0, previous_h = None, None
    bar = progress_bar(progress, len(times), f"sampling ({solver})")
    for step, (now, nxt) in enumerate(zip(coefficients[:-1], coefficients[1:])):
        x0 = denoise(x, now, step)
        noise = randn(x.shape, generator, device, dtype) if eta > 0 else None
        if solver in ("multistep", "pc"):
            h = now.log_ratio - nxt.log_ratio  # step in log(sigma / alpha)
            x0_extrapolated = x0 if previous_x0 is None else x0 + (x0 - previous_x0) * (h / (2 * previous_h))
            x = exponential_step(x, x0_extrapolated, now, nxt, eta, noise)
            previous_x0, previous_h = x0, h
            if solver == "pc":
                x = _langevin_correct(x, denoise(x, nxt, step), nxt, snr, randn(x.shape, generator, device, dtype))
        elif solver == "euler":
            x = exponential_step(x, x0, now, nxt, eta, noise)
        elif solver == "heun":
            x = _heun_step(x, x0, now, nxt, lambda z: denoise(z, nxt, step))
        else:
            x = _euler_maruyama_step(x, x0, now, nxt, eta, noise)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteSampleError(f"the {solver} sampler produced non-finite values at step {step} (t={nxt.t:.4g})")
        bar.update(1)
    x0 = denoise(x, coefficients[-1], len(times) - 1)  # final denoising step
    bar.update(1)
    bar.close()
    return x0, evaluations


def _heun_step(x: Tensor, x0: Tensor, now: _Coefficients, nxt: _Coefficients, denoise_next) -> Tensor:
    """Heun on dz/ds = (z - D)/s with z = x / alpha, s = sigma / alpha (EDM, Karras et al. 2022)."""
    s, s_next = now.sigma / now.alpha, nxt.sigma / nxt.alpha
    z = x / now.alpha
    slope = (z - x0) / s
    z_euler = z + (s_next - s) * slope
    slope_next = (z_euler - denoise_next(nxt.alpha * z_euler)) / s_next
    return nxt.alpha * (z + (s_next - s) * (slope + slope_next) / 2)


def _langevin_correct(x: Tensor, x0: Tensor, c: _Coefficients, snr: float, noise: Tensor) -> Tensor:
    """One Langevin step x + e score + sqrt(2 e) z on p_t, with e = 2 (snr sigma_t)^2.

    That is Song et al.'s SNR rule e = 2 (snr ||z|| / ||score||)^2 with the score's norm at
    its noise-level value sqrt(d) / sigma_t: the same for every sample and independent of the
    batch. (The per-sample norm can be near zero for a sample near a mode, and the batch
    average couples samples.)
    """
    score = -(x - c.alpha * x0) / c.sigma**2
    step = 2 * (snr * c.sigma) ** 2
    return x + step * score + math.sqrt(2 * step) * noise


def _euler_maruyama_step(x: Tensor, x0: Tensor, now: _Coefficients, nxt: _Coefficients, eta: float, noise: Tensor | None) -> Tensor:
    """Textbook Euler–Maruyama on the eta-family SDE in (x, t) (THEORY section 3)."""
    dt = now.t - nxt.t
    score = -(x - now.alpha * x0) / now.sigma**2
    drift = now.f * x - 0.5 * (1 + eta**2) * now.g2 * score
    x_next = x - drift * dt
    return x_next if noise is None else x_next + eta * math.sqrt(now.g2 * dt) * noise
