r"""The posterior mean from the sampler's own trajectory (Rao–Blackwellisation).

A sampler run computes, at every grid time t, the guided mean D_y(x_t, t): the averaged
likelihood's estimate of E[x_0 | x_t, y] (docs/theory.md §2). By the tower rule

    E[x_0 | y] = E[ E[x_0 | x_t, y] | y ]      for every t,

so the average over the samples of D_y(x_t, t) estimates the posterior mean as the average of the
samples x_0 does, and with less spread: Var(E[x_0 | x_t, y] | y) = Var(x_0 | y) - E[Var(x_0 | x_t, y) | y].
With N samples the samples' own mean carries the whole posterior variance / N; the trajectory's
mean at a level t only what the remaining noise has not yet decided. The higher the level, the
smaller that variance, but the further D_y rests on the Gaussian approximation of p(x_0 | x_t): the
level is chosen by measurement (`defaults.SamplerDefaults.mean_level`, docs/mean_level.md). It
costs nothing: D_y is what each step computes anyway. A measurement start (denoising) is the
exact case: its first D is E[x_0 | y] itself (`restore`'s `start`).

`mean_step` picks the grid step of a level (`step_at_level`); `TrajectoryMeans` is the sampler's observer
(`run_sampler(observe=...)`) that keeps that step's D_y and shows every step's to a caller's callback.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from torch import Tensor

from posterior_diff.checks import number_in
from posterior_diff.images import noise_from_model_units
from posterior_diff.sampling.samplers import GridPoint, SamplerSettings, grid_points

# callback(step, noise_level, estimates): a grid step's index, its noise level ([0, 1] image units)
# and the run's guided means there (rows, *x_shape, in the caller's units).
StepCallback = Callable[[int, float, Tensor], None]


def check_mean_level(level) -> float:
    """`mean_level` as a float >= 0 (0: the samples' own mean); a TypeError or ValueError naming it."""
    return number_in(level, "mean_level", 0.0, math.inf)


def noise_level(point: GridPoint, data_range) -> float:
    """A grid point's noise level s = sigma / alpha in [0, 1] image units (the prior's own units
    without a data range)."""
    return float(noise_from_model_units(point.sigma / point.alpha, data_range))


def mean_step(schedule, data_range, sampler: SamplerSettings, level: float) -> int | None:
    """The grid step whose guided means average into the posterior mean (`step_at_level` on the
    sampler's grid). No network call: `grid_points` is the sampler's grid."""
    points = grid_points(schedule, sampler.steps, sampler.grid, sampler.s_min, sampler.s_max)
    return step_at_level(((point.index, noise_level(point, data_range)) for point in points), level)


def step_at_level(step_levels: Iterable[tuple[int, float]], level: float) -> int | None:
    """The first step, in the run's order (highest noise first), whose noise level is at most
    `level`, from (step, noise level) pairs. None where `level` is 0 or below every step's level:
    the mean is then the samples' own."""
    if level == 0:
        return None
    # 1 + 1e-9: a level named at a grid time picks that time despite round-off
    return next((step for step, step_level in step_levels if step_level <= level * (1 + 1e-9)), None)


class TrajectoryMeans:
    """A sampler run's observer (`run_sampler(observe=...)`).

    Keeps the denoiser's output at grid step `step` (the last one computed there, detached; model
    units, (rows, *x_shape)) and shows the output of every step to `callback`, converted by
    `to_output` to the caller's units, with its noise level in [0, 1] image units.
    """

    def __init__(self, step: int | None, data_range, callback: StepCallback | None = None,
                 to_output: Callable[[Tensor], Tensor] | None = None):
        self.step, self.data_range = step, data_range
        self.callback, self.to_output = callback, to_output or (lambda x: x)
        self.kept: Tensor | None = None

    def __call__(self, point: GridPoint, denoised: Tensor) -> None:
        if point.index == self.step:
            self.kept = denoised.detach()
        if self.callback is not None:
            self.callback(point.index, noise_level(point, self.data_range), self.to_output(denoised.detach()))
