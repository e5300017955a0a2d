r"""Time grids for the reverse-time samplers: `steps` decreasing times from t_max to t_min.

Samplers step between consecutive grid times and finish with a denoising step at the
last one, so the grid has exactly `steps` points. The kinds:

- "uniform":  equally spaced in t.
- "log-snr":  equally spaced in log s, s = sigma / alpha (equal steps of the log
  signal-to-noise ratio). Dense near t = 0, where the posterior's fine detail is decided;
  the exponential integrators' error is uniform on it. The default.
- "karras":   s_i^(1/rho) equally spaced with rho = 7 (Karras et al., EDM).

The ends: t_max is the schedule's latest start time and t_min the time where the noise
ratio s = sigma / alpha falls to `s_min` (2e-3 by default: a quarter of a grey level in
[-1, 1] units), but never before the schedule's own t_min (a discrete model's first
training step: no network is asked about noise levels it was not trained on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posterior_diff.checks import choice, positive_int
from posterior_diff.schedules import Schedule

GRIDS = ("log-snr", "uniform", "karras")


def time_grid(schedule: Schedule, steps: int, kind: str = "log-snr", s_min: float = 2e-3, rho: float = 7.0,
              s_max: float | None = None) -> Tensor:
    """Decreasing times (float64, shape (steps,)) from schedule.t_max (or, given `s_max`, from
    the time whose noise ratio sigma / alpha is s_max) down to t(s_min)."""
    steps = positive_int(steps, "steps")
    choice(kind, GRIDS, "grid")
    if not s_min > 0:
        raise ValueError(f"s_min must be positive, got {s_min}")
    t_max = torch.tensor(schedule.t_max, dtype=torch.float64)
    if s_max is not None:
        if not float(s_max) < float(schedule.ratio(t_max)):
            raise ValueError(f"s_max={s_max} must be below the noise ratio {float(schedule.ratio(t_max)):.3g} at t_max")
        t_max = schedule.time_for_ratio(torch.tensor(float(s_max), dtype=torch.float64))
    s_max = schedule.ratio(t_max)
    if not s_min < float(s_max):
        raise ValueError(f"s_min={s_min} must be below the noise ratio {float(s_max):.3g} at t_max")
    t_min = schedule.time_for_ratio(torch.tensor(s_min, dtype=torch.float64)).clamp_min(schedule.t_min)
    s_min = float(schedule.ratio(t_min))
    if steps == 1:
        return t_max.reshape(1)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    if kind == "uniform":
        return t_max + u * (t_min - t_max)
    if kind == "log-snr":
        ratios = torch.exp(torch.log(s_max) + u * (torch.log(torch.tensor(s_min, dtype=torch.float64)) - torch.log(s_max)))
    else:
        ratios = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    times = schedule.time_for_ratio(ratios)
    times[0] = t_max  # exact ends, free of bisection round-off
    times[-1] = t_min
    return times
