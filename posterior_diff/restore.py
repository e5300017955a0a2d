"""`restore(y, operator, model)` and `restore_batch(measurements, operator, model)`: posterior
samples of x given measurements y = A x + noise.

`restore` is the one-measurement call; `restore_batch` restores several measurements at once,
drawing the samples of all of them in shared sampler runs with batched network calls. Both go
through the same four stages (`restore` is a batch of one):

1. check: every argument, once, before any work (a ValueError or TypeError naming it), and the
   sampler's noise levels against the model's `sigma_range` (unless allow_extrapolation);
2. convert: the model and the operators to the sampling device (the caller's are never
   modified), and the measurements and sigma_y to the model's units;
3. sample: the guided sampler (`samplers.run_sampler` on `AveragedLikelihoodGuidance`) in runs
   of at most `batch_size` rows (`plan_runs`), a run holding samples of one or several
   measurements (`sample_in_batches`); or particle mode (`particles.particle_sample`),
   measurement by measurement;
4. summarise: one Restoration per measurement, samples, mean and std back in the caller's
   units, with the network work done.

In a run that holds several measurements, row k of the batch is guided by its own measurement
and measured by its own operator (a `operators.StackedOperator` where the measurements have
operators of their own). Every step of the guidance is per row (the Tweedie conjugate gradient
has per-row step lengths, stopping and warm starts), and with a list of generators every row's
noise comes from its own measurement's generator (`samplers.NoiseSource`), so a measurement's
samples do not depend on which others share its runs.

Units: image models (those with a `data_range`, such as the default model) take y and
sigma_y in [0, 1] and return images in [0, 1], clamped; the conversion to the model's own
range ([-1, 1] or [0, 1]) happens in `posterior_diff.images`, and nowhere else. Analytic priors (Gaussian,
mixture) have no image range: y and the samples stay in the prior's own units.

Defaults: steps, covariance, the CG cap and the warm start left as None come from `defaults.defaults_for(model)`
(exact settings for analytic priors, faster ones for image models; see `posterior_diff.defaults`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from operators import LinearOperator, as_operator, stack_operators
from operators.base import AUTO, check_sigma_y

from posterior_diff.checks import choice, number_in, positive_int
from posterior_diff.defaults import ESTIMATE_START_LEVEL, SamplerDefaults, defaults_for
from posterior_diff.denoisers import Denoiser
from posterior_diff.images import (from_model_range, measurement_to_model_units, noise_from_model_units,
                                   noise_to_model_units, to_image_tensor, to_model_range)
from posterior_diff.memory import plan_memory
from posterior_diff.models.deepinv_prior import (from_deepinv_denoiser, is_deepinv_denoiser, is_deepinv_object,
                                                 not_a_deepinv_denoiser)
from posterior_diff.models.loading import default_model, load_model
from posterior_diff.noise_estimate import SigmaYEstimate, resolve_auto
from posterior_diff.sampling.guidance import AveragedLikelihoodGuidance, CGTruncatedWarning, GuidanceSettings
from posterior_diff.sampling.antithetic import paired_std
from posterior_diff.sampling.mean_estimates import StepCallback, TrajectoryMeans, check_mean_level, mean_step
from posterior_diff.sampling.particles import ParticleResult, ParticleSettings, check_particle_settings, particle_sample
from posterior_diff.sampling.samplers import NoiseSource, SamplerSettings, run_sampler
from posterior_diff.sampling.time_grids import time_grid
from posterior_diff.start_estimates import classical_estimate, has_estimate, has_large_gaps, has_small_gaps

# A checked generator argument: one generator (or None) for every measurement, or a tuple
# with one per measurement.
Generators = Union[torch.Generator, None, tuple[torch.Generator, ...]]


@dataclass(frozen=True)
class RestoreSettings:
    """The checked settings of one `restore` or `restore_batch` call; each result keeps them
    as its record.

    Attributes:
        num_samples: posterior samples returned per measurement.
        sampler: time grid, steps, eta and solver.
        guidance: the averaged likelihood's covariance and its solve.
        batch_size: rows per sampler run (None: all at once); in particle mode see `particles`.
        particles: particle mode's settings, or None for the plain guided sampler.
        start: "prior", "measurement" or "estimate" (resolved from "auto"; see `restore`). A
            measurement start's noise ratio sigma_y (model units) is sampler.s_max, an estimate
            start's `start_level` in model units.
        start_level: an estimate start's noise level s_0 ([0, 1] image units; the caller's or
            `ESTIMATE_START_LEVEL`), None for the other starts.
        memory_limited: batch_size was set by the memory check (`posterior_diff.memory`): the caller
            left it None, and all the rows at once would not fit in the CPU's memory.
        sigma_y: the measurement noise level used, in the units of y: the operator's, or the
            estimate where it was built with sigma_y="auto".
        sigma_y_estimate: how that estimate was made (`noise_estimate.SigmaYEstimate`: value,
            estimator, patches), or None where sigma_y was given.
        mean_level: the noise level ([0, 1] image units; the prior's own without a data range)
            whose guided means make `Restoration.mean` (`sampling.mean_estimates`); 0: the samples'
            own mean.
        mean_step: the grid step of that level (`mean_estimates.mean_step`; 0 for a measurement
            start, whose first step gives the exact mean), or None for the samples' own mean (and
            in particle mode).
        antithetic: whether the samples were drawn in antithetic pairs, rows 2i and 2i + 1
            (`sampling.antithetic`); their std is then `antithetic.paired_std`.
        network_dtype: the precision the prior's network ran in ("float32", "bfloat16", ...; a
            ladder whose pieces differ names each, comma-separated; "" for a prior without
            parameters). The embedded model's is `models.loading.default_network_dtype()`.
        cap_unasked: the caller named the covariance but left cg_max_iter to the model's default,
            so a Tweedie solve stopped by that cap was not their choice: the call then warns
            (`CGTruncatedWarning`). A default call (covariance and cap from `defaults_for`, both
            documented) or a cap the caller set only counts them in `Restoration.cg_truncated`.
    """

    num_samples: int
    sampler: SamplerSettings
    guidance: GuidanceSettings
    batch_size: int | None = None
    particles: ParticleSettings | None = None
    start: str = "prior"
    start_level: float | None = None
    cap_unasked: bool = False
    memory_limited: bool = False
    sigma_y: float | None = None
    sigma_y_estimate: SigmaYEstimate | None = None
    network_dtype: str = ""
    mean_level: float = 0.0
    mean_step: int | None = None
    antithetic: bool = False


@dataclass
class Restoration:
    """The result of `restore`, or of one measurement of `restore_batch`.

    Attributes:
        samples: posterior samples, shape (num_samples, *x_shape).
        mean: the posterior-mean estimate, shape x_shape: the average over the samples of the
            guided mean E[x | x_t, y] at the grid step of `settings.mean_level` (Rao–Blackwellised,
            `sampling.mean_estimates`: the same expectation as the samples' mean, with less
            sampling noise, from forwards the run makes anyway); the samples' own mean where that
            level is 0 (`samples.mean(0)` always is); from a measurement start (denoising) the
            model's posterior mean itself, Tweedie's E[x | y] = D(alpha(t*) y, t*), the run's
            first forward; in particle mode the weighted mean of the whole cloud.
        std: their standard deviation per entry, shape x_shape (zeros for one sample; for
            antithetic pairs read by pairs, `antithetic.paired_std`; in particle mode the weighted
            standard deviation of the cloud).
        nfe: network forward calls, each on a batch of samples (or a chunk of particles):
            `steps` per sampler run for the one-evaluation solvers, summed over the runs that
            drew these samples.
        vjps: vector-Jacobian products the guidance spent, each on one such batch.
        seconds: wall-clock time of those sampler runs.
        settings: the checked settings used.
        ess, resampled, log_evidence: particle mode only (see `posterior_diff.sampling.particles`):
            ESS / K after each reweighting, the steps after which the cloud was resampled, and
            the estimate of log p(y) in the model's units (NaN where the twist has no log det).
        cg_truncated: Tweedie conjugate-gradient solves that stopped at the cap
            `settings.guidance.cg_max_iter` with some sample's residual still above the stopping
            rule (`cg_tol`, `cg_noise_tol`): solves whose Tweedie covariance was only
            approximate. 0 when every solve met the rule, or when no CG ran (other covariances,
            a measurement start). The call warns (`CGTruncatedWarning`) when it is not 0 and the
            caller named the covariance but not the cap (`RestoreSettings.cap_unasked`).

    In `restore_batch` a sampler run may hold the samples of several measurements: nfe, vjps,
    cg_truncated and seconds are then those of the shared runs this measurement took part in, the same
    numbers for every measurement of a run (do not add them up over a batch; the work of the
    whole call is that of its distinct runs). In particle mode each measurement has runs of
    its own.
    """

    samples: Tensor
    mean: Tensor
    std: Tensor
    nfe: int
    vjps: int
    seconds: float
    settings: RestoreSettings | None = None
    ess: list[float] | None = None
    resampled: list[int] | None = None
    log_evidence: float | None = None
    cg_truncated: int = 0

    @property
    def sigma_y(self) -> float | None:
        """The measurement noise level used (estimated where the operator had sigma_y="auto";
        see `settings.sigma_y_estimate`); None without settings."""
        return None if self.settings is None else self.settings.sigma_y


@dataclass
class Problem:
    """The checked inputs of a batch of restorations (one for `restore`), in the model's units
    once converted.

    Attributes:
        model: the prior.
        operators: A with sigma_y, one per measurement; where the measurements share one
            operator it is the same object each time. All have the same sigma_y.
        measurements: the measurements y, each of shape y_shape (the same for all).
        x_shape: the shape of one x (the same for all); image_model: whether the model has
            an image data range.
        estimates: per measurement, how its sigma_y was estimated (sigma_y="auto"), or None.
        start_points: per measurement, the classical estimate of x an "estimate" start begins
            from (`start_estimates.classical_estimate`, x_shape; [0, 1] units until `convert`
            puts it in the model's), or () for the other starts.
    """

    model: Denoiser
    operators: tuple[LinearOperator, ...]
    measurements: tuple[Tensor, ...]
    x_shape: tuple[int, ...]
    image_model: bool
    estimates: tuple[SigmaYEstimate | None, ...] = ()
    start_points: tuple[Tensor, ...] = ()

    @property
    def count(self) -> int:
        """The number of measurements."""
        return len(self.measurements)

    @property
    def sigma_y(self) -> float:
        """The measurement noise level every operator shares."""
        return self.operators[0].sigma_y

    def noise_groups(self) -> list[tuple[int, ...]]:
        """The measurements by noise level: one group when sigma_y was given (every operator
        shares it), one per distinct estimate where it was estimated (sigma_y="auto")."""
        groups: dict[tuple, list[int]] = {}
        for index, (operator, found) in enumerate(zip(self.operators, self.estimates or [None] * self.count)):
            groups.setdefault((operator.sigma_y, found), []).append(index)
        return [tuple(group) for group in groups.values()]

    def subset(self, indices: Sequence[int]) -> "Problem":
        """The problem of the measurements at `indices` (in that order)."""
        estimates = tuple(self.estimates[i] for i in indices) if self.estimates else ()
        points = tuple(self.start_points[i] for i in indices) if self.start_points else ()
        return Problem(self.model, tuple(self.operators[i] for i in indices),
                       tuple(self.measurements[i] for i in indices), self.x_shape, self.image_model, estimates, points)


@dataclass
class Draws:
    """One measurement's samples in the model's units and the work of the runs that drew them
    (`cloud`: the particle run's result in particle mode; `step_means`: each sample's guided mean at
    `RestoreSettings.mean_step`, in the samples' order and units, or None where the mean is the
    samples' own; `cg_truncated`: those runs' Tweedie solves stopped by the cap before their
    stopping rule)."""

    samples: Tensor
    nfe: int
    vjps: int
    seconds: float
    cloud: ParticleResult | None = None
    step_means: Tensor | None = None
    cg_truncated: int = 0


@dataclass
class CGTally:
    """The Tweedie conjugate-gradient solves of a whole call, each run counted once: those the
    cap stopped before their stopping rule, and all of them."""

    truncated: int = 0
    solves: int = 0

    def add(self, truncated: int, solves: int) -> None:
        self.truncated += truncated
        self.solves += solves


def restore(
    y,
    operator: LinearOperator,
    model: Denoiser | str | None = None,
    *,
    num_samples: int = 1,
    steps: int | None = None,
    covariance: str | None = None,
    eta: float | None = None,
    solver: str = "multistep",
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool | Callable[[int], Any] = False,
    grid: str = "log-snr",
    cg_tol: float = 1e-3,
    cg_max_iter: int | None = None,
    cg_noise_tol: float = 0.1,
    warm_start: bool | None = None,
    jacobian_s_max: float | None = None,
    batch_size: int | None = None,
    particles: int | None = None,
    ess_threshold: float = 0.5,
    proposal: str = "auto",
    start: str = "auto",
    start_level: float | None = None,
    allow_extrapolation: bool = False,
    mean_level: float | None = None,
    antithetic: bool | None = None,
    callback: StepCallback | None = None,
) -> Restoration:
    """Draw posterior samples of x from one measurement y = A x + sigma_y n.

    Args:
        y: one measurement (no batch dimension). For image models an image in [0, 1]: a
            tensor (C, h, w), a numpy array (h, w[, C]) or a PIL image; for analytic priors a
            tensor or array of shape y_shape in the prior's units.
        operator: the forward model A with its noise level: an `operators.LinearOperator` or a
            deepinv `LinearPhysics` with Gaussian noise; sigma_y in the units of y. An operator
            with sigma_y="auto" gets it estimated from y here, before any sampling
            (`posterior_diff.noise_estimate`; a ValueError where y shows too little of its noise);
            `result.sigma_y` is the value used and `result.settings.sigma_y_estimate` how it was found.
        model: the prior: a Denoiser (GaussianPrior, ModuleDenoiser, UNetDenoiser, ...), a
            deepinv.models.Denoiser (adapted by `from_deepinv_denoiser`), a folder holding a
            diffusers model, a Hugging Face hub id ("org/name", see `load_model`), or None for
            the embedded default image model.
        num_samples: how many posterior samples to draw.
        steps: grid times of the sampler (network evaluations for the default solver);
            None: the model's default (`defaults.defaults_for`).
        covariance: V_t in the averaged likelihood: "zero", "isotropic", "diagonal", "tweedie",
            or the Jacobian-free "projection"; None: the model's default.
        eta: the sampler's noise (`sampling.samplers`): 1 = reverse SDE, 0 = probability-flow ODE,
            above 1 more mixing toward each time's marginal (the same marginals; the exponential
            solvers only). None: the model's default (`defaults.defaults_for`; for image models
            `large_hole_eta` where the operator leaves holes wider than a few pixels, a box hole),
            but 1 from the measurement and in particle mode, 0 for "heun", at most 1 for "euler_maruyama".
        solver: "multistep" (second order, default), "euler", "heun" (eta=0), "pc", "euler_maruyama".
        guidance_scale: multiplier on the likelihood gradient (1 = Bayes' rule).
        generator: torch.Generator for reproducible draws.
        device: where to sample; default: where the model lives. A model or operator that
            lives elsewhere is copied there; the caller's stay where they were. A CUDA device
            that this machine does not have is a ValueError before any work.
        progress: True shows a tqdm progress bar; a callable `progress(total)` returning a bar
            (e.g. a diffusers pipeline's `progress_bar`) shows that one.
        grid: time grid, "log-snr" (default), "uniform" or "karras".
        cg_tol, cg_max_iter, cg_noise_tol: stopping rule of the Tweedie conjugate gradient: a
            relative residual, a cap (None: the model's default), and a residual norm in units
            of the noise's norm sigma_y sqrt(m); it stops at whichever comes first. The cap is a
            safeguard: a solve it stops before either tolerance is met is truncated (counted in
            `Restoration.cg_truncated`; where the covariance was named and the cap left to the
            default, the call warns with `CGTruncatedWarning`).
        warm_start: start each step's Tweedie solve from the previous step's solution (None:
            the model's default; off for image models, see `posterior_diff.defaults`).
        jacobian_s_max: the noise ratio sigma / alpha above which every covariance pulls the likelihood
            gradient back through the Jacobian its Gaussian approximation implies (the projection step,
            no VJP) instead of the network's (None: the model's default, inf: the network's Jacobian at
            every step). At high noise a network's Jacobian misleads the guidance: 2 gives SR x4 and
            scattered missing pixels the same PSNR for half the VJPs and keeps runs of 5-10 steps from
            collapsing, but loses 2 dB on large holes (docs/jacobian_range.md).
        batch_size: samples drawn per sampler run (all at once by default); in particle mode,
            particles denoised per network call.
        particles: K > 0 runs twisted sequential Monte Carlo with K particles (particle mode,
            asymptotically exact as K grows; needs eta > 0, solver "multistep" or "euler", and
            sigma_y > 0) and returns `num_samples` draws from the final weighted cloud.
        ess_threshold: particle mode resamples when ESS < ess_threshold * K.
        proposal: particle mode's proposal: "guided" (the guided step), "conditioned" (the
            unguided step conditioned on the linearised twist; Tweedie covariance, y of at most
            64 entries) or "auto" (conditioned wherever available; see `particles.choose_proposal`).
        start: where the sampler starts. "prior": at t_max, from the reference distribution,
            guided all the way down. "measurement": for denoising (an operator whose A is the
            identity, `is_identity`, with sigma_y > 0) y = x + sigma_y n is itself the forward
            process at the time t* where sigma / alpha = sigma_y, so p(x | y) = p(x_0 | x_t* =
            alpha y): the run starts there from alpha(t*) y and needs no guidance (no VJP, any
            covariance; exact with eta=1, the `steps` spread from t* down), and the mean it
            returns is the exact E[x | y] (see `Restoration.mean`). "estimate" (image models;
            inpainting, super-resolution and denoising): Come-Closer-Diffuse-Faster, the run starts
            from a classical estimate of x (biharmonic fill, bicubic; `start_estimates`) noised
            to `start_level`, guided from there down. "auto" (default):
            "measurement" where it applies (identity operator, sigma_y below the schedule's
            largest noise ratio, not particle mode); else "estimate" for an inpainting whose
            every hole pixel has an observed one within `start_estimates.SMALL_GAP` pixels
            (scattered missing pixels, where it measured better: docs/start_estimates.md);
            else "prior".
        start_level: an estimate start's noise level s_0 ([0, 1] image units, > 0, below the
            model's top): CCDF's t_0. None (default): `ESTIMATE_START_LEVEL` (0.6, chosen in
            docs/start_estimates.md). Lower trusts the estimate more and runs fewer levels'
            worth of the prior; a ValueError where the start is not "estimate".
        allow_extrapolation: run even where the sampler's grid of noise levels (from its start,
            the schedule's top or sigma_y, down to its last time) leaves the model's declared
            `sigma_range`, asking it about levels it was not trained on. False (default): such a
            run is refused before any work, with a ValueError naming the range and the levels;
            the remedy is a ladder of priors (`posterior_diff.ladder`) covering them.
        mean_level: where `result.mean` comes from: the average over the samples of the guided
            mean E[x | x_t, y] at the first grid time whose noise level ([0, 1] image units; the
            prior's own units without a data range) is at most this (Rao–Blackwellised, free:
            `sampling.mean_estimates`); 0: the samples' own mean. None: the model's default
            (`defaults.defaults_for`; chosen in docs/mean_level.md). A measurement start's mean is
            its exact E[x | y] whatever the level; particle mode's is the weighted cloud's, and a
            level set there is a ValueError.
        antithetic: draw the samples in antithetic pairs: the second sample of each pair is made
            from the first one's noise negated (`sampling.antithetic`). Every sample keeps the
            sampler's law, while the pairs' sampling noise cancels in the mean (exactly so where
            the sampler is affine in its noise, as on a Gaussian prior), and `result.std` reads
            the pairs without bias (`antithetic.paired_std`). None: the model's default
            (`defaults.defaults_for`; on for image models, docs/antithetic.md) where num_samples and
            batch_size are even, independent samples otherwise. True needs them even, and is a
            ValueError in particle mode.
        callback: `callback(step, noise_level, estimates)` after every network evaluation of the
            sampler: the grid step (0 = the first), its noise level ([0, 1] image units) and the
            run's guided means E[x | x_t, y] there, (rows, *x_shape) in y's units (clamped to [0, 1]
            for image models), e.g. to watch a restoration form. With `batch_size` each sampler
            run calls it in turn; not in particle mode (a ValueError).

    Returns:
        A Restoration with samples (num_samples, *x_shape), mean, std, nfe, vjps, seconds,
        settings and cg_truncated.

    `restore(y, operator, model, generator=g, ...)` is `restore_batch([y], operator, model,
    generator=[g], ...)[0]`: the same stages, the same numbers.
    """
    problem = check_problem([y], [operator], model, ["y"], ["operator"])
    settings = check_settings(problem, num_samples, steps, covariance, eta, solver, guidance_scale, grid, cg_tol,
                              cg_max_iter, cg_noise_tol, warm_start, jacobian_s_max, batch_size, particles, ess_threshold,
                              proposal, start, allow_extrapolation, mean_level, antithetic, start_level)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    check_callback(callback, particles)
    tally = CGTally()
    result = run_stages(problem, settings, generator, check_device(device), progress, tally, callback)[0]
    warn_if_truncated(tally, settings)
    return result


def restore_batch(
    measurements,
    operator,
    model: Denoiser | str | None = None,
    *,
    num_samples: int = 1,
    steps: int | None = None,
    covariance: str | None = None,
    eta: float | None = None,
    solver: str = "multistep",
    guidance_scale: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress: bool | Callable[[int], Any] = False,
    grid: str = "log-snr",
    cg_tol: float = 1e-3,
    cg_max_iter: int | None = None,
    cg_noise_tol: float = 0.1,
    warm_start: bool | None = None,
    jacobian_s_max: float | None = None,
    batch_size: int | None = None,
    particles: int | None = None,
    ess_threshold: float = 0.5,
    proposal: str = "auto",
    start: str = "auto",
    start_level: float | None = None,
    allow_extrapolation: bool = False,
    mean_level: float | None = None,
    antithetic: bool | None = None,
) -> list[Restoration]:
    """Posterior samples for several measurements at once: `num_samples` for each of them,
    drawn together in shared sampler runs (batched network calls).

    Args:
        measurements: a list of measurements, each as `restore` takes one (for image models a
            tensor (C, h, w), a numpy array (h, w[, C]) or a PIL image in [0, 1]; else a tensor
            or array of shape y_shape), all of one shape; or a tensor (B, *y_shape).
        operator: one operator for every measurement, or a list with one per measurement
            (e.g. inpainting with a mask per image). The operators must map one x_shape to the
            measurements' shape and share one sigma_y: the measurements are sampled in one
            batch, whose guidance and conjugate-gradient stopping rule take one noise level.
            (Mixing operators with and without a closed-form solve drops the Tweedie CG's
            preconditioner for the run, so those items match restore to the CG's tolerance.)
            Operators with sigma_y="auto" are estimated per measurement, as `restore` does, and
            the measurements then run in groups of one estimated noise level (each group in shared
            sampler runs), so item i still equals restore on item i.
        model: the prior, as in `restore`.
        num_samples: posterior samples per measurement.
        generator: None, one torch.Generator for the whole batch (reproducible for the same
            batch and batch_size), or a list with one per measurement (the diffusers
            convention). With a list, measurement i's samples depend on generator[i] alone:
            they equal `restore(measurements[i], operator_i, model, generator=generator[i],
            ...)` with the same settings, whichever other measurements share the batch, up to
            round-off: batched linear algebra rounds a row slightly differently in batches of
            different sizes, and a Tweedie conjugate gradient stopped at `cg_tol` can magnify
            that round-off up to the level of its own tolerance (solved tightly, or with a
            CG-free covariance, the items agree to float precision).
        batch_size: the most rows (samples) in one sampler run, over all measurements (memory);
            None: every sample of every measurement in one run. With a list of generators each
            measurement's samples are cut into runs as `restore` with this batch_size cuts
            them, and such pieces share runs where they fit. In particle mode: particles per
            network call.
        steps, covariance, eta, solver, guidance_scale, device, progress, grid, cg_tol,
        cg_max_iter, cg_noise_tol, warm_start, jacobian_s_max, particles, ess_threshold, proposal, start,
        start_level, allow_extrapolation, mean_level, antithetic: as in `restore`.

    Returns:
        One Restoration per measurement, in order: samples (num_samples, *x_shape), mean, std,
        and nfe / vjps / cg_truncated / seconds of the sampler runs it took part in (shared with
        the other measurements of those runs; see `Restoration`). One warning for the whole call
        where a Tweedie solve was truncated by a cap the caller did not set (as in `restore`).

    Particle mode (`particles=K`) runs the measurements one after the other: each measurement
    needs a weighted cloud of its own, reweighted by its own likelihood and resampled when its
    own ESS drops (with its own evidence and solver histories), so one shared cloud would be
    wrong and a batch of clouds would need per-cloud resampling throughout `particles`.
    Measurement i's particle run is then exactly restore's with generator[i].
    """
    items = as_measurement_list(measurements)
    operators, operator_names = as_operator_list(operator, len(items))
    problem = check_problem(items, operators, model, [f"measurements[{i}]" for i in range(len(items))], operator_names)
    # Measurements whose sigma_y was estimated run in groups of one noise level, so that each
    # gets what restore gives it (one group, the whole batch, where sigma_y was given).
    groups = problem.noise_groups()
    settings = [check_settings(problem.subset(group), num_samples, steps, covariance, eta, solver, guidance_scale,
                               grid, cg_tol, cg_max_iter, cg_noise_tol, warm_start, jacobian_s_max, batch_size,
                               particles, ess_threshold, proposal, start, allow_extrapolation, mean_level,
                               antithetic, start_level)
                for group in groups]
    generators = check_generators(generator, len(items))
    device = check_device(device)
    tally = CGTally()  # every group's solves: one warning for the whole call
    results: list[Restoration | None] = [None] * problem.count
    for group, group_settings in zip(groups, settings):
        group_problem = problem if len(groups) == 1 else problem.subset(group)
        group_generators = tuple(generators[i] for i in group) if isinstance(generators, tuple) else generators
        for index, result in zip(group, run_stages(group_problem, group_settings, group_generators, device, progress,
                                                   tally)):
            results[index] = result
    warn_if_truncated(tally, settings[0])
    return results


def run_stages(problem: Problem, settings: RestoreSettings, generators: Generators, device,
               progress, tally: CGTally, callback: StepCallback | None = None) -> list[Restoration]:
    """Stages 2 to 4 for checked arguments: convert, sample, summarise (one Restoration per
    measurement); the Tweedie solves are added to `tally`, which the caller reports once;
    `callback` sees every step's guided means (see `restore`)."""
    if settings.start == "estimate":
        points = tuple(classical_estimate(y, operator) for y, operator in zip(problem.measurements, problem.operators))
        problem = dataclasses.replace(problem, start_points=points)
    problem, device = convert(problem, device)
    settings = fit_in_memory(problem, settings, device)
    if settings.particles is None:
        draws = sample_in_batches(problem, settings, generators, device, progress, tally, callback)
    else:
        draws = sample_particles(problem, settings, generators, device, progress, tally)
    return [summarise(problem, item, settings) for item in draws]


def fit_in_memory(problem: Problem, settings: RestoreSettings, device: torch.device) -> RestoreSettings:
    """The settings with the batch size the memory check allows (`memory.plan_memory`): unchanged
    where the run fits; a smaller batch where the caller left it None; a MemoryEstimateError where
    even one row, or the caller's batch_size, cannot fit. Particle mode is not checked (its batch
    size cuts the particles' network calls, not the cloud)."""
    if settings.particles is not None:
        return settings
    needs_vjp = settings.start != "measurement" and settings.guidance.covariance != "projection"
    plan = plan_memory(problem.model, problem.x_shape, problem.count * settings.num_samples, settings.batch_size,
                       device, needs_vjp)
    if plan.batch_size == settings.batch_size:
        return settings
    batch_size, antithetic = plan.batch_size, settings.antithetic
    if antithetic and batch_size == 1:  # one row at a time: no pair fits in a run
        antithetic = False
    elif antithetic:
        batch_size -= batch_size % 2  # a pair never straddles two runs
    return dataclasses.replace(settings, batch_size=batch_size, memory_limited=True, antithetic=antithetic)


def warn_if_truncated(tally: CGTally, settings: RestoreSettings) -> None:
    """Say, once per call, that Tweedie solves stopped at a cap the caller did not set
    (`RestoreSettings.cap_unasked`): the covariance they asked for was applied only approximately.
    Called by `restore` and `restore_batch` themselves, so the warning points at their caller."""
    if not (tally.truncated and settings.cap_unasked):
        return
    guidance = settings.guidance
    warnings.warn(
        f"{tally.truncated} of {tally.solves} Tweedie conjugate-gradient solves stopped at "
        f"cg_max_iter={guidance.cg_max_iter} before meeting their stopping rule (cg_tol={guidance.cg_tol:g}, "
        f"cg_noise_tol={guidance.cg_noise_tol:g}), so the Tweedie covariance was only approximate; pass a "
        f"larger cg_max_iter (e.g. 50) for the exact one (see result.cg_truncated)",
        CGTruncatedWarning, stacklevel=3)


# -- 1. check ---------------------------------------------------------------------------------
def as_measurement_list(measurements) -> list:
    """`restore_batch`'s measurements as a non-empty list (a (B, *y_shape) tensor split into rows)."""
    if isinstance(measurements, Tensor):
        if measurements.dim() < 2:
            raise ValueError(f"measurements as a tensor must have shape (B, *y_shape), got shape "
                             f"{tuple(measurements.shape)}; pass a single measurement as [y] (or use restore)")
        measurements = list(measurements.unbind(0))
    elif isinstance(measurements, (list, tuple)):
        measurements = list(measurements)
    else:
        raise TypeError(f"measurements must be a list of measurements or a tensor (B, *y_shape), got "
                        f"{type(measurements).__name__}")
    if not measurements:
        raise ValueError("measurements is empty: give at least one measurement")
    return measurements


def as_operator_list(operator, count: int) -> tuple[list, list[str]]:
    """One operator per measurement (the shared one repeated) and the name to report each by."""
    if isinstance(operator, (list, tuple)):
        if len(operator) != count:
            raise ValueError(f"operator is a list of {len(operator)} operators for {count} measurements: give one "
                             "per measurement, or a single operator for all")
        return list(operator), [f"operator[{i}]" for i in range(count)]
    return [operator] * count, ["operator"] * count


def check_model(model) -> Denoiser:
    """The model as a Denoiser: loaded if named by a folder or hub id, adapted if deepinv's, the
    embedded default for None; a TypeError naming `model` otherwise."""
    if model is None:
        return default_model()
    if isinstance(model, (str, Path)):
        model = load_model(model)
    elif is_deepinv_denoiser(model):
        model = from_deepinv_denoiser(model)  # deepinv's D(x, sigma): VE, in [0, 1] units
    elif is_deepinv_object(model):
        raise TypeError(not_a_deepinv_denoiser(model, "model"))
    if not isinstance(model, Denoiser):
        raise TypeError(f"model must be a posterior_diff.Denoiser, a deepinv.models.Denoiser, a model folder, a hub id "
                        f"or None, got {type(model).__name__}")
    return model


def check_operators(operators: Sequence, names: Sequence[str]) -> tuple[LinearOperator, ...]:
    """The operators as LinearOperators (a deepinv physics adapted once, however often it is
    repeated), each sigma_y checked, all sigma_y given as numbers equal ("auto" is estimated
    later, per measurement); errors name the operator."""
    adapted: dict[int, LinearOperator] = {}
    for operator, name in zip(operators, names):
        if id(operator) in adapted:
            continue
        try:
            result = as_operator(operator)  # a deepinv LinearPhysics is adapted here
        except TypeError:
            raise TypeError(f"{name} must be an operators.LinearOperator or a deepinv LinearPhysics, got "
                            f"{type(operator).__name__}") from None
        try:
            check_sigma_y(result.sigma_y_setting, auto=True)  # an attribute set after construction is checked too
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: {error}") from None
        adapted[id(operator)] = result
    checked = tuple(adapted[id(operator)] for operator in operators)
    given = [(operator, name) for operator, name in zip(checked, names) if operator.sigma_y_setting != AUTO]
    for operator, name in given:
        first, first_name = given[0]
        if operator.sigma_y != first.sigma_y:
            raise ValueError(f"{name} has sigma_y={operator.sigma_y} but {first_name} has sigma_y={first.sigma_y}: "
                             "the measurements of one batch must share one noise level, because their samples are "
                             "drawn in one sampler run whose guidance and conjugate-gradient stopping rule take one "
                             "sigma_y; restore measurements of different noise levels in separate calls")
    return checked


def check_problem(measurements: Sequence, operators: Sequence, model, names: Sequence[str],
                  operator_names: Sequence[str]) -> Problem:
    """The model (loaded if named), the operators (adapted if deepinv's) and the measurements,
    checked against each other; a ValueError or TypeError naming the argument that does not fit.
    An operator with sigma_y="auto" is replaced by a copy with sigma_y estimated from its
    measurement (`noise_estimate.resolve_auto`), before the model runs.

    Args:
        measurements: the measurements, one per restoration; operators: one per measurement.
        model: as `restore` takes it.
        names, operator_names: how errors name each measurement and operator ("y" and
            "operator" for `restore`, "measurements[i]" and "operator[i]" for `restore_batch`).
    """
    model = check_model(model)
    image_model = model.data_range is not None
    operators = check_operators(operators, operator_names)
    checked, x_shapes = [], []
    for y, operator, name, operator_name in zip(measurements, operators, names, operator_names):
        y = as_measurement(y, image_model, name)
        x_shapes.append(check_fit(y, operator, model, name, operator_name))
        checked.append(y)
    for y, x_shape, name in zip(checked, x_shapes, names):
        if y.shape != checked[0].shape:
            raise ValueError(f"{name} has shape {tuple(y.shape)} but {names[0]} has shape {tuple(checked[0].shape)}: "
                             "the measurements of one batch must share one shape; restore them in separate calls")
        if x_shape != x_shapes[0]:
            raise ValueError(f"{name} implies x of shape {x_shape} but {names[0]} implies {x_shapes[0]}: the "
                             "measurements of one batch must share one x_shape")
    operators, estimates = resolve_auto(checked, operators, names, operator_names)
    return Problem(model, operators, tuple(checked), x_shapes[0], image_model, estimates)


def check_device(device) -> torch.device | None:
    """`device` as a torch.device (None: where the model lives); a ValueError naming it where it is
    no device name, or a CUDA device this machine lacks (rather than torch's driver error later)."""
    if device is None:
        return None
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if checked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (checked.index or 0) >= count:
            raise ValueError(f"device={device!r}, but this machine has {count} CUDA device(s): use device='cpu' "
                             "(or leave device=None to sample where the model lives)")
    return checked


def check_fit(y: Tensor, operator: LinearOperator, model: Denoiser, name: str, operator_name: str) -> tuple[int, ...]:
    """The x_shape that y implies through the operator, checked against the model's channels
    and x_shape; a ValueError naming y (as `name`) otherwise."""
    if model.channels is not None and y.dim() == 4:
        batch_call = "restore_batch takes several" if name == "y" else "pass each as (C, h, w)"
        raise ValueError(f"{name} has shape {tuple(y.shape)}, a batch: one image measurement is (C, h, w); {batch_call} "
                         "(a list, or a (B, C, h, w) tensor to restore_batch)")
    if model.channels is not None and y.dim() == 3 and y.shape[0] != model.channels:
        raise ValueError(f"{name} has {y.shape[0]} channel(s) but the model takes {model.channels}; convert the image "
                         "first (posterior_diff.images.match_channels)")
    try:
        x_shape = operator.x_shape(tuple(y.shape))
        expected = operator.y_shape(x_shape)
    except ValueError as error:
        raise ValueError(f"{name} of shape {tuple(y.shape)} does not fit {operator_name}: {error}") from None
    if expected != tuple(y.shape):
        raise ValueError(f"{name} has shape {tuple(y.shape)} but {operator_name} produces {expected}")
    if model.x_shape is not None and tuple(model.x_shape) != x_shape:
        raise ValueError(f"{name} implies images of shape {x_shape} but the model takes {tuple(model.x_shape)}")
    return x_shape


def as_measurement(y, image_model: bool, name: str = "y") -> Tensor:
    """y as a floating-point tensor of shape y_shape, checked finite; images through
    `to_image_tensor`. Errors name the measurement as `name`."""
    if image_model and isinstance(y, (np.ndarray, Image.Image)):
        return to_image_tensor(y, name)  # numpy (H, W[, C]) and PIL images, in [0, 1]
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(y).__name__}")
    if not y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    if y.dim() == 0:
        raise ValueError(f"{name} must be one measurement of shape y_shape (no batch dimension), got a scalar")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return y


def check_settings(problem: Problem, num_samples, steps, covariance, eta, solver, guidance_scale, grid, cg_tol,
                   cg_max_iter, cg_noise_tol, warm_start, jacobian_s_max, batch_size, particles, ess_threshold,
                   proposal, start="prior", allow_extrapolation=False, mean_level=None,
                   antithetic=None, start_level=None) -> RestoreSettings:
    """The frozen settings of a call (each dataclass checks its own fields once); steps,
    covariance, the CG cap, the warm start, jacobian_s_max, mean_level and antithetic left as None
    come from the model's defaults. The sampler's noise levels are checked against the model's `sigma_range`
    (`check_noise_levels`)."""
    defaults = defaults_for(problem.model)
    level_asked = start_level is not None
    level = number_in(start_level, "start_level", 0.0, math.inf, open_low=True) if level_asked else ESTIMATE_START_LEVEL
    start = resolve_start(problem, start, particles, level)
    start_level = resolve_start_level(problem, particles, start, level, level_asked)
    s_max = start_ratio(problem, start, start_level)
    sampler = SamplerSettings(defaults.steps if steps is None else steps,
                              resolve_eta(problem, defaults, eta, solver, particles, start), solver, grid,
                              s_max=s_max)
    if not isinstance(allow_extrapolation, bool):
        raise TypeError(f"allow_extrapolation must be True or False, got {allow_extrapolation!r}")
    if not allow_extrapolation:
        check_noise_levels(problem.model, sampler)
    guidance = GuidanceSettings(defaults.covariance if covariance is None else covariance, guidance_scale, cg_tol,
                                defaults.cg_max_iter if cg_max_iter is None else cg_max_iter, cg_noise_tol,
                                defaults.warm_start if warm_start is None else warm_start,
                                defaults.jacobian_s_max if jacobian_s_max is None else jacobian_s_max)
    batch_size = None if batch_size is None else positive_int(batch_size, "batch_size")
    particle_settings = None if particles is None else check_particle_settings(
        particles, ess_threshold, proposal, batch_size, sampler, guidance.covariance, problem.sigma_y,
        problem.measurements[0].numel())
    level, step = resolve_mean_level(problem, sampler, start, mean_level, particles)
    num_samples = positive_int(num_samples, "num_samples")
    pairs = resolve_antithetic(problem, antithetic, num_samples, batch_size, particles)
    return RestoreSettings(num_samples, sampler, guidance, batch_size, particle_settings,
                           start, start_level, cap_unasked=covariance is not None and cg_max_iter is None,
                           sigma_y=problem.sigma_y, sigma_y_estimate=problem.estimates[0] if problem.estimates else None,
                           network_dtype=", ".join(problem.model.network_dtypes()), mean_level=level, mean_step=step,
                           antithetic=pairs)


def resolve_eta(problem: Problem, defaults: SamplerDefaults, eta, solver: str, particles, start: str) -> float:
    """The sampler's eta: the caller's, else the model's default (`large_hole_eta` where an operator
    leaves holes wider than SMALL_GAP, `has_large_gaps`), but 1 (the reverse SDE) from the measurement
    (only the reverse SDE keeps the joint law that makes that start exact, theory.md) and in particle
    mode (the eta its weights were measured with), 0 for "heun" (the ODE) and at most 1 for
    "euler_maruyama" (whose explicit drift step overshoots above it). `problem` is one run's
    measurements (restore_batch's noise group): large holes in any of them decide for the run."""
    if eta is not None:
        return eta
    if solver == "heun":
        return 0.0
    if particles is not None or start == "measurement":
        return 1.0
    large_holes = any(has_large_gaps(operator, problem.x_shape) for operator in problem.operators)
    default = defaults.large_hole_eta if large_holes else defaults.eta
    return min(default, 1.0) if solver == "euler_maruyama" else default


def resolve_antithetic(problem: Problem, antithetic, num_samples: int, batch_size: int | None, particles) -> bool:
    """Whether the samples come in antithetic pairs (see `RestoreSettings`): the model's default
    where None, if num_samples and batch_size are even (a run's pairs never straddle two runs or
    two measurements) and not in particle mode; True where any of those fails is a ValueError."""
    even = num_samples % 2 == 0 and (batch_size is None or batch_size % 2 == 0)
    if antithetic is None:
        return defaults_for(problem.model).antithetic and particles is None and even
    if not isinstance(antithetic, bool):
        raise TypeError(f"antithetic must be True, False or None, got {antithetic!r}")
    if antithetic and particles is not None:
        raise ValueError("antithetic pairs do not apply in particle mode, whose resampling couples the particles "
                         "anyway; leave antithetic None")
    if antithetic and not even:
        raise ValueError(f"antithetic=True draws the samples in pairs: num_samples ({num_samples}) and batch_size "
                         f"({batch_size}) must be even")
    return antithetic


def resolve_mean_level(problem: Problem, sampler: SamplerSettings, start: str, mean_level,
                       particles) -> tuple[float, int | None]:
    """(mean_level, its grid step; see `RestoreSettings`): the model's default where None. A
    measurement start keeps its first step (the exact mean) and particle mode its weighted cloud,
    where a level set by the caller is a ValueError."""
    if particles is not None:
        if mean_level is not None:
            raise ValueError("mean_level does not apply in particle mode, whose mean is the weighted cloud's; "
                             "leave it None")
        return 0.0, None
    level = defaults_for(problem.model).mean_level if mean_level is None else check_mean_level(mean_level)
    if start == "measurement":
        return level, 0
    return level, mean_step(problem.model.schedule, problem.model.data_range, sampler, level)


def check_callback(callback, particles) -> None:
    """A TypeError unless `callback` is None or callable; a ValueError with particle mode."""
    if callback is None:
        return
    if not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, noise_level, estimates), got {callback!r}")
    if particles is not None:
        raise ValueError("callback is not available in particle mode; leave it None")


START_CHOICES = ("auto", "prior", "measurement", "estimate")


def resolve_start_level(problem: Problem, particles, start: str, level: float, level_asked: bool) -> float | None:
    """An estimate start's s_0 ([0, 1] units): `level` (the caller's, else `ESTIMATE_START_LEVEL`);
    None for the other starts, where a level the caller set is a ValueError (it would be ignored)
    that says why the estimate start does not apply."""
    if start == "estimate":
        return level
    if level_asked:
        reasons = estimate_start_reasons(problem, particles, level)
        why = ("an estimate start cannot apply: " + "; ".join(reasons) if reasons
               else 'start="auto" takes the estimate for scattered holes only; pass start="estimate"')
        raise ValueError(f"start_level applies to an estimate start only, and this run starts from the {start} "
                         f"({why}); or leave start_level None")
    return None


def start_ratio(problem: Problem, start: str, start_level: float | None) -> float | None:
    """The noise ratio (model units) the sampler's grid starts at: sigma_y for a measurement
    start, `start_level` for an estimate start, None (the schedule's top) from the prior."""
    if start == "measurement":
        return measurement_ratio(problem)
    if start == "estimate":
        return noise_to_model_units(start_level, problem.model.data_range)
    return None


def measurement_ratio(problem: Problem) -> float:
    """sigma_y in the model's units: the noise ratio sigma / alpha at which y is the forward process."""
    return noise_to_model_units(problem.sigma_y, problem.model.data_range)


RANGE_TOLERANCE = 1e-6  # relative: grid ends computed by bisection may pass a range's end by round-off


def grid_noise_levels(model: Denoiser, sampler: SamplerSettings) -> tuple[float, float]:
    """(lowest, highest) noise level s = sigma / alpha the sampler's grid asks the model about, in
    [0, 1] image units (the prior's units without a data range): the grid's last time and its
    start (the schedule's t_max, or s_max for a measurement start). Every solver evaluates the
    model at grid times only, and so does particle mode, so these bound every level of the run.
    No network call: `time_grid` is the sampler's own grid."""
    times = time_grid(model.schedule, sampler.steps, sampler.grid, sampler.s_min, s_max=sampler.s_max)
    ratios = model.schedule.ratio(times[[-1, 0]]).tolist()
    low, high = (float(noise_from_model_units(s, model.data_range)) for s in ratios)
    return low, high


PRIOR_START_KL = 0.01  # nats per entry: the most start-up mismatch a prior start may leave (image models)


def check_prior_start(model: Denoiser, top: float) -> None:
    """A ValueError where an image model's schedule starts the sampler from the prior at a noise
    level that does not hide the data: the reference N(0, (alpha^2 + sigma^2) I) then stands in for
    a marginal it is far from. Measured by `Schedule.terminal_kl_bound` per entry for data filling the
    model's range (E x^2 <= max(low^2, high^2)): above PRIOR_START_KL nats. A model trained on low
    noise levels only (FFDNet, top 75/255: 1.3 nats per entry) cannot start a run from the prior; a
    diffusion model (the embedded one: 4e-5) can."""
    low, high = model.data_range
    mismatch = model.schedule.terminal_kl_bound(max(low**2, high**2), 1)
    if mismatch > PRIOR_START_KL:
        raise ValueError(f"this run starts from the prior at the model's top noise level {top:.4g} ([0, 1] image units), "
                         f"which does not hide the data (start-up mismatch up to {mismatch:.3g} nats per entry, "
                         f"Schedule.terminal_kl_bound): a model trained on low noise levels only is no prior to start "
                         "from. Use a ladder with a model covering the higher levels (posterior_diff.ladder), start "
                         "from a denoising measurement inside its range, or pass allow_extrapolation=True")


def check_noise_levels(model: Denoiser, sampler: SamplerSettings) -> None:
    """A ValueError, before any work, where the sampler's grid leaves the model's `sigma_range`:
    it names the range, the levels asked for and the remedies."""
    low, high = model.sigma_range
    asked_low, asked_high = grid_noise_levels(model, sampler)
    if sampler.s_max is None and model.data_range is not None:
        check_prior_start(model, asked_high)
    above = asked_high > high * (1 + RANGE_TOLERANCE)
    below = asked_low < low * (1 - RANGE_TOLERANCE)
    if not (above or below):
        return
    units = "[0, 1] image units" if model.data_range is not None else "the prior's units"
    start = "the schedule's top" if sampler.s_max is None else "the start's noise level"
    side = (f"{asked_high:.4g} lies above it: use a ladder with a model covering the higher levels"
            if above else f"{asked_low:.4g} lies below it: use a ladder with a model covering the lower levels")
    raise ValueError(f"the model was trained for noise levels sigma in [{low:.4g}, {high:.4g}] ({units}, its "
                     f"sigma_range), but this run's sampler grid asks it about levels from {asked_high:.4g} "
                     f"({start}) down to {asked_low:.4g}, and {side} (posterior_diff.ladder), or pass "
                     "allow_extrapolation=True to run it outside its range anyway")


def resolve_start(problem: Problem, start, particles, start_level: float) -> str:
    """`start` checked and "auto" resolved to "measurement", "estimate" or "prior" (see `restore`);
    a ValueError naming `start` where "measurement" or "estimate" (at `start_level`, [0, 1]
    units) is asked for and cannot apply."""
    choice(start, START_CHOICES, "start")
    unfit = {"measurement": measurement_start_reasons(problem, particles),
             "estimate": estimate_start_reasons(problem, particles, start_level)}
    if start == "auto":
        if not unfit["measurement"]:
            return "measurement"
        small_gaps = all(has_small_gaps(operator, problem.x_shape) for operator in problem.operators)
        return "estimate" if small_gaps and not unfit["estimate"] else "prior"
    if start in unfit and unfit[start]:
        raise ValueError(f'start="{start}" cannot apply: {"; ".join(unfit[start])}; use start="prior"')
    return start


def measurement_start_reasons(problem: Problem, particles) -> list[str]:
    """Why a measurement start cannot apply to this problem (empty where it can)."""
    reasons = []
    if not all(operator.is_identity for operator in problem.operators):
        reasons.append("its operator is not the identity (only a denoising y is a point of the forward process)")
    if problem.sigma_y <= 0:
        reasons.append("sigma_y is 0 (y is x itself)")
    elif measurement_ratio(problem) <= SamplerSettings.s_min:
        reasons.append(f"sigma_y is below the sampler's last noise level ({SamplerSettings.s_min:g} in model units)")
    elif measurement_ratio(problem) >= top_ratio(problem.model):
        reasons.append("sigma_y is above the model's largest noise level")
    if particles is not None:
        reasons.append("particle mode guides its particles from t_max")
    return reasons


def estimate_start_reasons(problem: Problem, particles, start_level: float) -> list[str]:
    """Why an estimate start at `start_level` ([0, 1] units) cannot apply to this problem (empty where it can)."""
    reasons = []
    if not problem.image_model:
        reasons.append("the classical estimates are for image models (a data range in [0, 1] units)")
    elif noise_to_model_units(start_level, problem.model.data_range) >= top_ratio(problem.model):
        reasons.append(f"its start level {start_level:.4g} (start_level) is above the model's largest noise level")
    unknown = sorted({type(operator).__name__ for operator in problem.operators if not has_estimate(operator)})
    if unknown:
        reasons.append(f"no classical estimate is known for {', '.join(unknown)} (only Inpainting, "
                       "SuperResolution and Denoising)")
    if particles is not None:
        reasons.append("particle mode guides its particles from t_max")
    return reasons


def top_ratio(model: Denoiser) -> float:
    """The model's largest noise ratio sigma / alpha (its schedule's t_max), in model units."""
    return float(model.schedule.ratio(torch.tensor(model.schedule.t_max, dtype=torch.float64)))


def check_generators(generator, count: int) -> Generators:
    """`restore_batch`'s generator: None or one torch.Generator as they are, a list as a tuple
    of `count` distinct generators; a TypeError or ValueError naming `generator` otherwise."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not isinstance(generator, (list, tuple)):
        raise TypeError(f"generator must be a torch.Generator, a list with one per measurement, or None, got "
                        f"{type(generator).__name__}")
    if len(generator) != count:
        raise ValueError(f"generator is a list of {len(generator)} generators for {count} measurements: give one per "
                         "measurement, or a single generator for all")
    first_use: dict[int, int] = {}
    for index, item in enumerate(generator):
        if not isinstance(item, torch.Generator):
            raise TypeError(f"generator[{index}] must be a torch.Generator, got {type(item).__name__}")
        if id(item) in first_use:
            # Two measurements drawing from one generator would interleave their draws, so
            # neither would get what restore with that generator gives it.
            raise ValueError(f"generator[{index}] is the same generator as generator[{first_use[id(item)]}]: give "
                             "each measurement a generator of its own, or a single generator for all")
        first_use[id(item)] = index
    return tuple(generator)


# -- 2. convert -------------------------------------------------------------------------------
def placed(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` itself if its tensors are on `device` already, else a copy moved there."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(tensor.device == device for tensor in tensors):
        return module
    return copy.deepcopy(module).to(device)


def convert(problem: Problem, device) -> tuple[Problem, torch.device]:
    """The problem on the sampling device (default: where the model lives), the measurements in
    the sampler's dtype, and the measurements and sigma_y in the model's units. Model and
    operators are handled alike: moved copies where they live elsewhere, so the caller's are
    never modified. An operator shared by several measurements is converted once and stays shared."""
    model = problem.model
    reference = model.reference_tensor()
    device = torch.device(device) if device is not None else (
        reference.device if reference is not None else problem.measurements[0].device)
    model = placed(model, device)
    moved: dict[int, LinearOperator] = {}  # by the caller's operator: on the device
    converted: dict[int, LinearOperator] = {}  # by the caller's operator: on the device, in model units
    measurements = []
    for y, operator in zip(problem.measurements, problem.operators):
        if id(operator) not in moved:
            moved[id(operator)] = placed(operator, device)
        on_device = moved[id(operator)]
        y = y.to(device=device, dtype=model.sampling_dtype())
        in_units = on_device
        if problem.image_model:
            y, in_units = measurement_to_model_units(y, on_device, model.data_range)
        converted.setdefault(id(operator), in_units)
        measurements.append(y)
    operators = tuple(converted[id(operator)] for operator in problem.operators)
    points = tuple(to_model_range(point.to(device=device, dtype=model.sampling_dtype()), model.data_range)
                   for point in problem.start_points)
    return Problem(model, operators, tuple(measurements), problem.x_shape, problem.image_model,
                   problem.estimates, points), device


# -- 3. sample --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """`rows` consecutive rows of a sampler run that hold samples of measurement `item`."""

    item: int
    rows: int


def plan_runs(count: int, num_samples: int, batch_size: int | None, per_item: bool) -> list[tuple[Segment, ...]]:
    """The sampler runs of a batch of `count` measurements with `num_samples` each: for each run,
    which rows hold which measurement's samples. No run has more than `batch_size` rows.

    Without per-item generators all the rows, measurement after measurement, are cut into runs
    of `batch_size` rows.

    per_item (a generator per measurement): each measurement's samples are cut into pieces of
    `batch_size` as `restore` cuts them (b, b, ..., the rest), and a piece is never split, so its
    generator makes the very draws restore makes, in the same order. Pieces are packed first-fit,
    the first pieces of every measurement, then the second ones, and so on, each into the first
    run with room that comes after the run of its measurement's previous piece: the runs are
    sampled in order, so each generator still meets its pieces in restore's order, and no run
    holds two pieces of one measurement (their draws would interleave).
    """
    capacity = batch_size or count * num_samples
    if not per_item:
        return [segments_of_rows(first, min(first + capacity, count * num_samples), num_samples)
                for first in range(0, count * num_samples, capacity)]
    runs: list[list[Segment]] = []
    used: list[int] = []
    last_run = [-1] * count  # the run of each measurement's latest piece
    for first in range(0, num_samples, capacity):
        rows = min(capacity, num_samples - first)
        for item in range(count):
            run = next((k for k in range(last_run[item] + 1, len(runs)) if used[k] + rows <= capacity), len(runs))
            if run == len(runs):
                runs.append([])
                used.append(0)
            runs[run].append(Segment(item, rows))
            used[run] += rows
            last_run[item] = run
    return [tuple(run) for run in runs]


def segments_of_rows(first: int, last: int, num_samples: int) -> tuple[Segment, ...]:
    """The rows [first, last) of all the measurements' samples laid end to end, as segments."""
    segments, row = [], first
    while row < last:
        item = row // num_samples
        end = min(last, (item + 1) * num_samples)
        segments.append(Segment(item, end - row))
        row = end
    return tuple(segments)


def run_noise(segments: Sequence[Segment], generators: Generators, antithetic: bool = False) -> NoiseSource:
    """Where a run's noise comes from: each segment from its measurement's generator, or the
    whole run from the one generator; in antithetic pairs with `antithetic` (every segment then
    has an even number of rows, so each pair lies within one measurement's samples)."""
    if isinstance(generators, tuple):
        return NoiseSource(tuple((generators[segment.item], segment.rows) for segment in segments), antithetic)
    return NoiseSource(((generators, sum(segment.rows for segment in segments)),), antithetic)


def run_measurements(problem: Problem, segments: Sequence[Segment]) -> Tensor:
    """y for every row of a run, (rows, *y_shape): each segment's measurement repeated."""
    parts = [problem.measurements[s.item].expand(s.rows, *problem.measurements[s.item].shape) for s in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times are the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SamplerRun(NamedTuple):
    """What one sampler run over several segments gave: the samples in model units (rows, *x_shape),
    its network forwards and VJPs (each on the whole batch of rows), its seconds, each row's guided
    mean at the grid step `RestoreSettings.mean_step` (rows, *x_shape; None without one), and its
    Tweedie CG solves stopped by the cap before their stopping rule, and all of them."""

    samples: Tensor
    nfe: int
    vjps: int
    seconds: float
    step_means: Tensor | None
    cg_truncated: int = 0
    cg_solves: int = 0


def sample_run(problem: Problem, settings: RestoreSettings, segments: Sequence[Segment], generators: Generators,
               device: torch.device, progress, callback: StepCallback | None = None) -> SamplerRun:
    """One sampler run over the rows of `segments`. Row k is guided by its own measurement and
    measured by its own operator (stacked where the segments' operators differ)."""
    rows = sum(segment.rows for segment in segments)
    measurements = run_measurements(problem, segments)
    noise = run_noise(segments, generators, settings.antithetic)
    if settings.start == "measurement":
        # y = x_0 + sigma_y n is the forward process at ratio sigma_y (x_t* / alpha = y): unguided
        # from there, and the first step's D is the exact E[x | y] (mean_step 0).
        denoiser, start = problem.model, measurements
    else:
        operator = stack_operators([problem.operators[s.item] for s in segments], [s.rows for s in segments])
        denoiser = AveragedLikelihoodGuidance.from_settings(problem.model, operator, measurements, settings.guidance)
        start = estimate_start(problem, settings, segments, noise, device) if settings.start == "estimate" else None
    means = TrajectoryMeans(settings.mean_step, problem.model.data_range, callback,
                            lambda x: to_output(problem, x))
    began = time.perf_counter()
    samples, evaluations = run_sampler(denoiser, (rows, *problem.x_shape), settings.sampler,
                                       generator=noise, device=device, dtype=problem.model.sampling_dtype(),
                                       progress=progress, start=start, observe=means)
    synchronize(device)
    seconds = time.perf_counter() - began
    if isinstance(denoiser, AveragedLikelihoodGuidance):
        return SamplerRun(samples, evaluations, denoiser.vjp_count, seconds, means.kept, denoiser.cg_truncated,
                          len(denoiser.cg_iterations))
    return SamplerRun(samples, evaluations, 0, seconds, means.kept)


def estimate_start(problem: Problem, settings: RestoreSettings, segments: Sequence[Segment], noise: NoiseSource,
                   device: torch.device) -> Tensor:
    """An estimate start's points x_hat + s_0 n for every row of a run (rows, *x_shape), model
    units: each segment's classical estimate, noised to the grid's first level s_0 with the
    run's own generators (drawn before the sampler's, so a run stays reproducible)."""
    points = torch.cat([problem.start_points[s.item].expand(s.rows, *problem.x_shape) for s in segments])
    return points + settings.sampler.s_max * noise.randn(tuple(points.shape), device, points.dtype)


def sample_in_batches(problem: Problem, settings: RestoreSettings, generators: Generators, device: torch.device,
                      progress, tally: CGTally, callback: StepCallback | None = None) -> list[Draws]:
    """The plain guided sampler for every measurement, in the runs of `plan_runs`: one Draws per
    measurement, its samples and their guided means at `settings.mean_step` in model units, with the
    work of the runs that drew them (every run's Tweedie solves added to `tally`, once)."""
    runs = plan_runs(problem.count, settings.num_samples, settings.batch_size, isinstance(generators, tuple))
    chunks: list[list[Tensor]] = [[] for _ in range(problem.count)]
    nfe, vjps, seconds = [0] * problem.count, [0] * problem.count, [0.0] * problem.count
    truncated = [0] * problem.count
    step_chunks: list[list[Tensor]] = [[] for _ in range(problem.count)]
    for segments in runs:
        run = sample_run(problem, settings, segments, generators, device, progress, callback)
        tally.add(run.cg_truncated, run.cg_solves)
        rows = [s.rows for s in segments]
        step_means = run.step_means.split(rows) if run.step_means is not None else [None] * len(segments)
        # A run holds at most one segment of each measurement (see plan_runs): its work counts once.
        for segment, part, step_mean in zip(segments, run.samples.split(rows), step_means):
            chunks[segment.item].append(part)
            if step_mean is not None:
                step_chunks[segment.item].append(step_mean)
            nfe[segment.item] += run.nfe
            vjps[segment.item] += run.vjps
            truncated[segment.item] += run.cg_truncated
            seconds[segment.item] += run.seconds
    return [Draws(torch.cat(chunks[i]), nfe[i], vjps[i], seconds[i],
                  step_means=torch.cat(step_chunks[i]) if step_chunks[i] else None, cg_truncated=truncated[i])
            for i in range(problem.count)]


def sample_particles(problem: Problem, settings: RestoreSettings, generators: Generators, device: torch.device,
                     progress, tally: CGTally) -> list[Draws]:
    """Particle mode, measurement after measurement: each has its own cloud, weights and
    resampling (see `restore_batch`), drawn from its own generator (or the shared one, in turn)."""
    draws = []
    for item in range(problem.count):
        generator = generators[item] if isinstance(generators, tuple) else generators
        start = time.perf_counter()
        cloud = particle_sample(problem.model, problem.operators[item], problem.measurements[item], problem.x_shape,
                                settings.particles, settings.sampler, settings.guidance,
                                num_samples=settings.num_samples, generator=generator, device=device, progress=progress)
        synchronize(device)
        draws.append(Draws(cloud.samples, cloud.nfe, cloud.vjps, time.perf_counter() - start, cloud,
                           cg_truncated=cloud.cg_truncated))
        tally.add(cloud.cg_truncated, cloud.cg_solves)
    return draws


# -- 4. summarise -----------------------------------------------------------------------------
def sample_std(samples: Tensor, antithetic: bool) -> Tensor:
    """The posterior std per entry from the samples (n, *x_shape): read by pairs where they are
    antithetic, the plain sample std otherwise (zeros for one sample)."""
    if antithetic:
        return paired_std(samples)
    return samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0])


def to_output(problem: Problem, x: Tensor) -> Tensor:
    """x in the caller's units: [0, 1] (clamped) for image models, the prior's own otherwise."""
    return from_model_range(x, problem.model.data_range).clamp(0, 1) if problem.image_model else x


def summarise(problem: Problem, draws: Draws, settings: RestoreSettings) -> Restoration:
    """One measurement's Restoration in the caller's units: the plain samples' std and their
    mean, or the average of their guided means at `settings.mean_step` (`Draws.step_means`, each
    converted as a sample is, so that the mean is what `restore`'s callback shows there), or in
    particle mode those of the whole weighted cloud (the SMC estimates, free of the extra noise
    of drawing `num_samples` from it)."""
    samples = to_output(problem, draws.samples)
    cloud = draws.cloud
    if cloud is None:
        std = sample_std(samples, settings.antithetic)
        mean = (samples if draws.step_means is None else to_output(problem, draws.step_means)).mean(dim=0)
        return Restoration(samples, mean, std, draws.nfe, draws.vjps, draws.seconds, settings,
                           cg_truncated=draws.cg_truncated)
    particles = to_output(problem, cloud.particles)
    weights = cloud.weights.reshape(-1, *[1] * (particles.dim() - 1))
    mean = (weights * particles).sum(0)
    std = (weights * (particles - mean).square()).sum(0).sqrt()
    return Restoration(samples, mean, std, draws.nfe, draws.vjps, draws.seconds, settings, cloud.ess, cloud.resampled,
                       cloud.log_evidence, draws.cg_truncated)
