r"""Reverse-time samplers for the eta-family of docs/theory.md §3, driven by a Denoiser.

For a noise level h = eta * g, eta >= 0,

    dx = [f x - 1/2 (1 + eta^2) g^2 score(x, t)] dt + eta g dw_bar,     t from 1 down to 0,

runs the forward marginals backwards: eta = 1 is the reverse SDE, eta = 0 the
probability-flow ODE, and eta above 1 adds a Langevin pull toward each time's marginal (the
same marginals; with an approximate posterior score it corrects what earlier steps carried
forward, docs/eta.md). With score = -(x - alpha D) / sigma^2 the drift is linear in x once D
is frozen, which the exponential solvers integrate exactly over a step. Writing
s = sigma / alpha, rho = s_next / s and eps_hat = (x - alpha D) / sigma, one such step is

    x_next = alpha_next D + sigma_next (rho^(eta^2) eps_hat + sqrt(1 - rho^(2 eta^2)) z),

which is DDPM ancestral sampling at eta = 1 and DDIM at eta = 0.

A solver is one step from grid point `now` to `nxt`, with one signature for all of them:
`solver.step(x, now, nxt, denoise, noise)`. The Gaussian solvers ("euler", "multistep") also
expose the step's `transition(x, D, now, nxt)`: the mean and noise std of x_next given x,
which particle mode needs for its weights. Each run ends with a denoising step x_0 = D(x, t_min)
(`Denoiser.final_estimate`: the guidance takes it without a backward pass, docs/theory.md §5).

A run draws its start sample and then each step's noise from a torch.Generator, or from a
`NoiseSource` that draws each block of rows from a generator of its own (so that a block's
samples do not depend on the other rows of its batch; `restore_batch` relies on it).

| solver            | step                                                         | NFE            |
|-------------------|--------------------------------------------------------------|----------------|
| "multistep"       | exponential step with D extrapolated from the previous step: second order (DPM-Solver++(2M), its SDE form for eta > 0). The default. | steps          |
| "euler"           | the exponential step above with D frozen at the current time (DDPM / DDIM): first order | steps |
| "heun"            | Heun's method on dz/ds = (z - D)/s, z = x / alpha (EDM); eta = 0 only | 2 steps - 1 |
| "pc"              | "multistep" predictor + one Langevin corrector step at each new time (Song et al. 2021) | 2 steps - 1 |
| "euler_maruyama"  | the textbook step x - [f x - 1/2 (1 + eta^2) g^2 score] dt + eta g sqrt(dt) z | steps |

The first-order steps shrink a Gaussian posterior's covariance measurably more than
"multistep" at the same step count (docs/gaussian_exactness.md), hence the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from posterior_diff.checks import choice, number_in, positive_int
from posterior_diff.denoisers import Denoiser, randn
from posterior_diff.sampling.antithetic import paired_rows
from posterior_diff.sampling.time_grids import GRIDS, time_grid

SOLVERS = ("multistep", "euler", "heun", "pc", "euler_maruyama")
GAUSSIAN_SOLVERS = ("multistep", "euler")  # a Gaussian transition given D: particle mode can weight them


class NonFiniteSampleError(FloatingPointError):
    """A sampler produced NaN or infinite values; the message names the step and time."""


def check_eta(eta: float) -> float:
    """eta (1 = reverse SDE, 0 = probability-flow ODE, above 1 more mixing) as a finite float >= 0;
    a TypeError or ValueError naming `eta` otherwise. Which solvers take which eta is
    `SamplerSettings`' check."""
    eta = number_in(eta, "eta", 0.0)
    if math.isinf(eta):
        raise ValueError("eta must be finite (a large eta, e.g. 10, already draws each step's noise afresh), got inf")
    return eta


@dataclass(frozen=True)
class SamplerSettings:
    """The settings of one sampler run, checked when built (a ValueError naming the argument).

    Attributes:
        steps: number of grid times (network evaluations for the one-evaluation solvers).
        eta: noise level >= 0: 1 = reverse SDE, 0 = probability-flow ODE, above 1 more mixing
            (not with "euler_maruyama", whose explicit drift step overshoots).
        solver: one of SOLVERS (see the module docstring).
        grid: "log-snr", "uniform" or "karras" (see time_grids).
        s_min: noise ratio sigma / alpha at the last grid time.
        s_max: noise ratio at the first grid time; None: the schedule's t_max. A run that starts
            below t_max needs its start sample (`run_sampler(start=...)`).
        snr: signal-to-noise ratio of the Langevin corrector ("pc" only; Song et al. 2021 use
            0.16 with a first-order predictor; with the multistep predictor a smaller one is better).
    """

    steps: int = 100
    eta: float = 1.0
    solver: str = "multistep"
    grid: str = "log-snr"
    s_min: float = 2e-3
    snr: float = 0.05
    s_max: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "steps", positive_int(self.steps, "steps"))
        choice(self.solver, SOLVERS, "solver")
        choice(self.grid, GRIDS, "grid")
        object.__setattr__(self, "eta", check_eta(self.eta))
        if self.solver == "heun" and self.eta != 0:
            raise ValueError(f'solver="heun" integrates the probability-flow ODE and needs eta=0, got eta={self.eta}')
        if self.solver == "euler_maruyama" and self.eta > 1:
            # its explicit drift step grows with (1 + eta^2) / 2 and overshoots; the exponential
            # solvers integrate that linear drift exactly for any eta
            raise ValueError(f'solver="euler_maruyama" takes eta in [0, 1], got eta={self.eta}; eta above 1 needs '
                             f'an exponential solver ("multistep", "euler" or "pc")')
        number_in(self.s_min, "s_min", 0.0, open_low=True)
        number_in(self.snr, "snr", 0.0, open_low=True)
        if self.s_max is not None and not number_in(self.s_max, "s_max", 0.0, open_low=True) > self.s_min:
            raise ValueError(f"s_max must exceed s_min={self.s_min}, got {self.s_max}")


@dataclass(frozen=True)
class GridPoint:
    """One time of the sampler's grid and the schedule's coefficients there, as Python floats.

    Attributes:
        index: position in the grid (0 = t_max).
        t: the time; alpha, sigma: the schedule at t; f, g2: the SDE coefficients at t.
    """

    index: int
    t: float
    alpha: float
    sigma: float
    f: float
    g2: float

    @property
    def log_ratio(self) -> float:
        """log s = log(sigma / alpha): the exponential solvers' time variable."""
        return math.log(self.sigma / self.alpha)


def grid_points(schedule, steps: int, grid: str = "log-snr", s_min: float = 2e-3,
                s_max: float | None = None) -> list[GridPoint]:
    """The `steps` decreasing grid times of `time_grid` with their coefficients."""
    points = []
    for index, t in enumerate(time_grid(schedule, steps, grid, s_min, s_max=s_max).tolist()):
        time = torch.tensor(t, dtype=torch.float64)
        points.append(GridPoint(index, t, float(schedule.alpha(time)), float(schedule.sigma(time)),
                                float(schedule.f(time)), float(schedule.g2(time))))
    return points


@dataclass(frozen=True)
class NoiseSource:
    """Where a batch's standard normal draws come from: consecutive blocks of rows, each drawn
    from its own generator.

    A sampler run draws its start sample and then each step's noise, every draw of the whole
    batch's shape. With blocks ((g_1, n_1), (g_2, n_2), ...) each such draw is n_1 rows from
    g_1, then n_2 rows from g_2, and so on, so the numbers of block k depend on g_k alone:
    a block gets exactly what a run of its n_k rows alone with generator g_k would get,
    whatever other blocks share the batch (`restore_batch` relies on this for a list of
    generators). One block of all the rows is the plain single-generator draw.

    With `antithetic`, each block draws ceil(n_k / 2) rows and gives them as pairs, the second
    row of each pair the first one negated (`antithetic.paired_rows`): every row keeps the
    standard normal law, and a pair's samples are coupled to cancel each other's sampling noise.

    Attributes:
        blocks: ((generator or None, rows), ...) in row order; None draws from torch's global
            generator. Drawn on each generator's own device (see `denoisers.randn`).
        antithetic: whether rows 2i and 2i + 1 of each block are antithetic pairs.
    """

    blocks: tuple[tuple[torch.Generator | None, int], ...]
    antithetic: bool = False

    @property
    def rows(self) -> int:
        """The batch size the source draws for: the sum of the blocks' rows."""
        return sum(rows for _, rows in self.blocks)

    def randn(self, shape: tuple[int, ...], device, dtype) -> Tensor:
        """Standard normal draws of `shape` = (rows, *x_shape), block by block, on `device`."""
        if shape[0] != self.rows:
            raise ValueError(f"the noise source draws {self.rows} rows, asked for shape {tuple(shape)}")
        blocks = [self.block(generator, (rows, *shape[1:]), device, dtype) for generator, rows in self.blocks]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def block(self, generator: torch.Generator | None, shape: tuple[int, ...], device, dtype) -> Tensor:
        """One block's draws of `shape` from `generator`: plain, or antithetic pairs."""
        if not self.antithetic:
            return randn(tuple(shape), generator, device, dtype)
        rows = shape[0]
        return paired_rows(randn(((rows + 1) // 2, *shape[1:]), generator, device, dtype), rows)


def as_noise_source(generator: torch.Generator | NoiseSource | None, rows: int) -> NoiseSource:
    """`generator` as a NoiseSource for a batch of `rows`: one block, unless it is a source already."""
    if isinstance(generator, NoiseSource):
        if generator.rows != rows:
            raise ValueError(f"the noise source has blocks of {generator.rows} rows in all for a batch of {rows}")
        return generator
    return NoiseSource(((generator, rows),))


def start_sample(point: GridPoint, shape: tuple[int, ...], generator: torch.Generator | NoiseSource | None,
                 device, dtype) -> Tensor:
    """x at t_max drawn from the reference N(0, (alpha^2 + sigma^2) I): the forward marginal of
    data of unit variance (see Schedule.terminal_kl_bound for the mismatch this leaves).
    `generator`: a torch.Generator, None, or a NoiseSource (one generator per block of rows)."""
    noise = as_noise_source(generator, shape[0]).randn(shape, device, dtype)
    return math.sqrt(point.alpha**2 + point.sigma**2) * noise


@dataclass
class Transition:
    """x_next ~ N(mean, std^2 I): one step of a Gaussian solver given x (std = 0 for eta = 0)."""

    mean: Tensor
    std: float

    def draw(self, noise: Tensor | None) -> Tensor:
        """mean + std * noise (the mean where there is no noise to add)."""
        return self.mean + self.std * noise if self.std > 0 and noise is not None else self.mean


def kept_noise_fraction(now: GridPoint, nxt: GridPoint, eta: float) -> float:
    """How much of the current noise estimate a step keeps: (s' / s)^(eta^2), s = sigma / alpha."""
    return ((nxt.sigma * now.alpha) / (now.sigma * nxt.alpha)) ** (eta**2)


def exponential_transition(x: Tensor, denoised: Tensor, now: GridPoint, nxt: GridPoint, eta: float) -> Transition:
    """One step of the eta-family from `now` to `nxt` with D frozen at `denoised` (exact linear part):
    mean alpha' D + sigma' rho^(eta^2) eps_hat, noise std sigma' sqrt(1 - rho^(2 eta^2))."""
    kept = kept_noise_fraction(now, nxt, eta)
    eps_hat = (x - now.alpha * denoised) / now.sigma
    mean = nxt.alpha * denoised + nxt.sigma * kept * eps_hat
    return Transition(mean, nxt.sigma * math.sqrt(max(0.0, 1.0 - kept**2)))


Denoise = Callable[[Tensor, GridPoint], Tensor]  # D(x, t) at a grid point
Noise = Callable[[], Tensor]  # a fresh standard normal draw of x's shape


class Solver:
    """One reverse step x(now) -> x(nxt); subclasses implement `step`.

    `step(x, now, nxt, denoise, noise)` gets D through `denoise(x, point)` (one network call
    each) and fresh noise through `noise()`. A solver may keep a history across the steps of
    one run (the multistep one does), so each run takes a new solver from `make_solver`.
    """

    def __init__(self, eta: float):
        self.eta = eta

    def step(self, x: Tensor, now: GridPoint, nxt: GridPoint, denoise: Denoise, noise: Noise) -> Tensor:
        raise NotImplementedError

    def select(self, indices: Tensor) -> None:
        """Keep the history of the samples `indices` only (particle resampling)."""


class EulerSolver(Solver):
    """The exponential step with D frozen at x(now): first order."""

    def transition(self, x: Tensor, denoised: Tensor, now: GridPoint, nxt: GridPoint) -> Transition:
        """Mean and noise std of x(nxt) given x(now) and D(x(now))."""
        return exponential_transition(x, denoised, now, nxt, self.eta)

    def step(self, x, now, nxt, denoise, noise):
        denoised = denoise(x, now)
        fresh = noise() if self.eta > 0 else None
        return self.transition(x, denoised, now, nxt).draw(fresh)


class MultistepSolver(EulerSolver):
    """The exponential step with D extrapolated linearly in log s from the previous step's D:
    D + (D - D_prev) h / (2 h_prev), h = log s_now - log s_next (DPM-Solver++(2M))."""

    def __init__(self, eta: float):
        super().__init__(eta)
        self.previous: tuple[Tensor, float] | None = None  # the last step's D and h

    def transition(self, x, denoised, now, nxt):
        h = now.log_ratio - nxt.log_ratio
        extrapolated = denoised
        if self.previous is not None:
            previous_denoised, previous_h = self.previous
            extrapolated = denoised + (denoised - previous_denoised) * (h / (2 * previous_h))
        self.previous = (denoised, h)
        return exponential_transition(x, extrapolated, now, nxt, self.eta)

    def select(self, indices):
        if self.previous is not None:
            self.previous = (self.previous[0][indices], self.previous[1])


class PredictorCorrector(MultistepSolver):
    """The multistep step, then one Langevin step on p(nxt) with e = 2 (snr sigma)^2.

    That is Song et al.'s SNR rule e = 2 (snr ||z|| / ||score||)^2 with the score's norm at
    its noise-level value sqrt(d) / sigma: the same for every sample and independent of the
    batch (the per-sample norm can be near zero for a sample near a mode, and the batch
    average couples samples).
    """

    def __init__(self, eta: float, snr: float):
        super().__init__(eta)
        self.snr = snr

    def step(self, x, now, nxt, denoise, noise):
        x = super().step(x, now, nxt, denoise, noise)
        score = -(x - nxt.alpha * denoise(x, nxt)) / nxt.sigma**2
        size = 2 * (self.snr * nxt.sigma) ** 2
        return x + size * score + math.sqrt(2 * size) * noise()


class HeunSolver(Solver):
    """Heun on dz/ds = (z - D)/s with z = x / alpha, s = sigma / alpha (EDM); eta = 0 only."""

    def step(self, x, now, nxt, denoise, noise):
        s, s_next = now.sigma / now.alpha, nxt.sigma / nxt.alpha
        z = x / now.alpha
        slope = (z - denoise(x, now)) / s
        z_euler = z + (s_next - s) * slope
        slope_next = (z_euler - denoise(nxt.alpha * z_euler, nxt)) / s_next
        return nxt.alpha * (z + (s_next - s) * (slope + slope_next) / 2)


class EulerMaruyamaSolver(Solver):
    """Textbook Euler–Maruyama on the eta-family SDE in (x, t) (docs/theory.md §3)."""

    def step(self, x, now, nxt, denoise, noise):
        dt = now.t - nxt.t
        score = -(x - now.alpha * denoise(x, now)) / now.sigma**2
        fresh = noise() if self.eta > 0 else None
        x_next = x - (now.f * x - 0.5 * (1 + self.eta**2) * now.g2 * score) * dt
        return x_next if fresh is None else x_next + self.eta * math.sqrt(now.g2 * dt) * fresh


def make_solver(settings: SamplerSettings) -> Solver:
    """A fresh solver (with an empty history) for one run with these settings."""
    if settings.solver == "pc":
        return PredictorCorrector(settings.eta, settings.snr)
    classes = {"multistep": MultistepSolver, "euler": EulerSolver, "heun": HeunSolver,
               "euler_maruyama": EulerMaruyamaSolver}
    return classes[settings.solver](settings.eta)


Observer = Callable[[GridPoint, Tensor], None]  # sees each D(x, t) the sampler computes, with its grid point


class CheckedDenoiser:
    """D(x, t) at grid points for a batch: counts the calls (NFE), stops on non-finite output
    (through a FiniteGuard, which on an accelerator reads its verdict back only now and then)
    and shows each output to the run's observer, if it has one."""

    def __init__(self, denoiser: Denoiser, guard: "FiniteGuard", observe: Observer | None = None):
        self.denoiser, self.guard, self.observe = denoiser, guard, observe
        self.calls = 0

    def __call__(self, x: Tensor, point: GridPoint, final: bool = False) -> Tensor:
        """D(x, t) at `point`; `final`: the run's closing estimate (`Denoiser.final_estimate`)."""
        self.calls += 1
        denoised = self.denoiser.final_estimate(x, point.t) if final else self.denoiser.at_time(x, point.t)
        self.guard.observe(denoised, "the denoiser returned", point)
        if self.observe is not None:
            self.observe(point, denoised)
        return denoised


FINITE_CHECK_EVERY = 10  # steps between reads of the finiteness flag on an accelerator


class FiniteGuard:
    """Stops a run on non-finite values at little cost.

    Reading a value back from a GPU waits for its queue to drain, so a check at every step would
    stall the pipeline twice per step (after the denoiser and after the solver step). On an
    accelerator the checks are therefore and-ed into a flag on the device, read every
    FINITE_CHECK_EVERY steps and at the end: a diverging run stops at most that many steps late,
    naming the steps in between. On the CPU a read costs nothing and every check is read at once.
    """

    def __init__(self, device: torch.device, every: int = FINITE_CHECK_EVERY):
        self.every = 1 if device.type == "cpu" else every
        self.flag: Tensor | None = None
        self.first: GridPoint | None = None  # the first step since the last read
        self.what = ""

    def observe(self, x: Tensor, what: str, point: GridPoint) -> None:
        finite = torch.isfinite(x).all()
        self.flag = finite if self.flag is None else self.flag & finite
        self.first = self.first or point
        self.what = what
        if self.every == 1 or point.index % self.every == 0:
            self.read(point)

    def read(self, point: GridPoint) -> None:
        """Raise NonFiniteSampleError if any value observed since the last read was non-finite."""
        if self.flag is None:
            return
        finite, first = bool(self.flag), self.first
        self.flag, self.first = None, None
        if finite:
            return
        if first.index == point.index:
            raise NonFiniteSampleError(f"{self.what} non-finite values at step {point.index} (t={point.t:.4g})")
        raise NonFiniteSampleError(f"non-finite values appeared between step {first.index} (t={first.t:.4g}) "
                                   f"and step {point.index} (t={point.t:.4g})")


def progress_bar(progress: bool | Callable[[int], Any], total: int, description: str):
    """A bar with update(n) / close(): `progress(total)` if it is callable, else tqdm (hidden when False)."""
    return progress(total) if callable(progress) else tqdm(total=total, disable=not progress, desc=description)


def placement(denoiser: Denoiser, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype to sample: the given ones, else those of the denoiser's tensors."""
    reference = denoiser.reference_tensor()
    if device is None:
        device = reference.device if reference is not None else torch.device("cpu")
    return torch.device(device), dtype or denoiser.sampling_dtype()


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
    generator: torch.Generator | NoiseSource | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | Callable[[int], Any] = False,
) -> tuple[Tensor, int]:
    """Draw samples x_0 by integrating the reverse-time dynamics from t_max to t_min.

    Args:
        denoiser: gives D(x_t, t); wrap it in AveragedLikelihoodGuidance to sample a posterior.
        shape: (B, *x_shape), the batch of samples to draw.
        steps, eta, solver, grid, s_min, snr: the sampler, as in `SamplerSettings`.
        generator: torch.Generator making the draw reproducible, or a NoiseSource drawing
            each block of rows from its own generator.
        device, dtype: where to sample; default: those of the denoiser's tensors.
        progress: True shows a tqdm progress bar; a callable `progress(total)` returning a bar
            (an object with `update(n)` and `close()`, e.g. a diffusers pipeline's
            `progress_bar`) shows that one.

    Returns:
        (x_0 samples of the given shape, number of denoiser evaluations).

    Raises:
        NonFiniteSampleError: as soon as a step yields a non-finite value.
    """
    settings = SamplerSettings(steps, eta, solver, grid, s_min, snr)
    return run_sampler(denoiser, shape, settings, generator=generator, device=device, dtype=dtype, progress=progress)


def run_sampler(denoiser: Denoiser, shape: tuple[int, ...], settings: SamplerSettings, *,
                generator: torch.Generator | NoiseSource | None = None, device=None, dtype=None,
                progress: bool | Callable[[int], Any] = False, start: Tensor | None = None,
                observe: Observer | None = None) -> tuple[Tensor, int]:
    """`sample` with settings checked already (see `sample` for the other arguments).

    `start`: x_t / alpha at the first grid time (the variance-exploding point z, e.g. a denoising
    measurement at noise ratio s_max), of `shape`; needed where settings.s_max starts the grid
    below t_max. None draws x from the reference distribution at t_max.
    `observe(point, denoised)`: called after every denoiser evaluation with its grid point and
    its output D (shape `shape`, model units; detach before keeping it). Solvers with two
    evaluations per step ("heun", "pc") show it a grid point twice, the point the next step
    starts from last."""
    device, dtype = placement(denoiser, device, dtype)
    if (start is None) != (settings.s_max is None):
        raise ValueError("a run starting below t_max (s_max) needs its start sample, and only such a run takes one")
    if start is not None and tuple(start.shape) != tuple(shape):
        raise ValueError(f"start must have the batch's shape {tuple(shape)}, got {tuple(start.shape)}")
    points = grid_points(denoiser.schedule, settings.steps, settings.grid, settings.s_min, settings.s_max)
    solver = make_solver(settings)
    guard = FiniteGuard(device)
    denoise = CheckedDenoiser(denoiser, guard, observe)
    source = as_noise_source(generator, shape[0])

    def noise() -> Tensor:
        return source.randn(shape, device, dtype)

    if start is None:
        x = start_sample(points[0], shape, source, device, dtype)
    else:
        x = points[0].alpha * start.to(device, dtype)
    bar = progress_bar(progress, len(points), f"sampling ({settings.solver})")
    for now, nxt in zip(points[:-1], points[1:]):
        x = solver.step(x, now, nxt, denoise, noise)
        guard.observe(x, f"the {settings.solver} sampler produced", nxt)
        bar.update(1)
    x0 = denoise(x, points[-1], final=True)  # the final denoising step
    guard.read(points[-1])
    bar.update(1)
    bar.close()
    return x0, denoise.calls
