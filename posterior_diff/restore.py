"""`restore(y, operator, model)`: posterior samples of x given one measurement y = A x + noise.

The one-call API, in four stages:

1. check: every argument, once, before any work (a ValueError or TypeError naming it);
2. convert: the model and the operator to the sampling device (the caller's are never
   modified), and y and sigma_y to the model's units;
3. sample: the guided sampler (`samplers.run_sampler` on `AveragedLikelihoodGuidance`),
   `batch_size` samples at a time, or particle mode (`particles.particle_sample`);
4. summarise: samples, mean and std back in the caller's units, with the network work done.

Units: image models (those with a `data_range`, such as the default model) take y and
sigma_y in [0, 1] and return images in [0, 1], clamped; the conversion to the model's own
range ([-1, 1] or [0, 1]) happens in `posterior_diff.images`, and nowhere else. Analytic priors (Gaussian,
mixture) have no image range: y and the samples stay in the prior's own units.

Defaults: steps, covariance and the CG cap left as None come from `defaults.defaults_for(model)`
(exact settings for analytic priors, faster ones for image models; see `posterior_diff.defaults`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from operators import LinearOperator, as_operator
from operators.base import check_sigma_y

from .checks import positive_int
from .defaults import defaults_for
from .deepinv_prior import from_deepinv_denoiser, is_deepinv_denoiser, is_deepinv_object, not_a_deepinv_denoiser
from .denoisers import Denoiser
from .guidance import AveragedLikelihoodGuidance, GuidanceSettings
from .images import from_model_range, measurement_to_model_units, to_image_tensor
from .models import default_model, load_model
from .particles import ParticleSettings, check_particle_settings, particle_sample
from .samplers import SamplerSettings, run_sampler


@dataclass(frozen=True)
class RestoreSettings:
    """The checked settings of one `restore` call; the result keeps them as its record.

    Attributes:
        num_samples: posterior samples returned.
        sampler: time grid, steps, eta and solver.
        guidance: the averaged likelihood's covariance and its solve.
        batch_size: samples per sampler run (None: all at once); in particle mode see `particles`.
        particles: particle mode's settings, or None for the plain guided sampler.
    """

    num_samples: int
    sampler: SamplerSettings
    guidance: GuidanceSettings
    batch_size: int | None = None
    particles: ParticleSettings | None = None


@dataclass
class Restoration:
    """The result of `restore`.

    Attributes:
        samples: posterior samples, shape (num_samples, *x_shape).
        mean: their mean, shape x_shape (the posterior-mean estimate; in particle mode the
            weighted mean of the whole cloud).
        std: their standard deviation per entry, shape x_shape (zeros for one sample; in
            particle mode the weighted standard deviation of the cloud).
        nfe: network forward calls, each on a batch of samples (or a chunk of particles):
            `steps` per sampler run for the one-evaluation solvers, summed over the runs.
        vjps: vector-Jacobian products the guidance spent, each on one such batch.
        seconds: wall-clock time of the sampling.
        settings: the checked settings used.
        ess, resampled, log_evidence: particle mode only (see `posterior_diff.particles`):
            ESS / K after each reweighting, the steps after which the cloud was resampled, and
            the estimate of log p(y) in the model's units (NaN where the twist has no log det).
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


@dataclass
class Problem:
    """The checked inputs of one restoration, in the model's units once converted.

    Attributes:
        model: the prior; operator: A with sigma_y; y: one measurement, shape y_shape.
        x_shape: the shape of one x; image_model: whether the model has an image data range.
    """

    model: Denoiser
    operator: LinearOperator
    y: Tensor
    x_shape: tuple[int, ...]
    image_model: bool


def restore(
    y,
    operator: LinearOperator,
    model: Denoiser | str | None = None,
    *,
    num_samples: int = 1,
    steps: int | None = None,
    covariance: str | None = None,
    eta: float = 1.0,
    solver: str = "multistep",
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool | Callable[[int], Any] = False,
    grid: str = "log-snr",
    cg_tol: float = 1e-3,
    cg_max_iter: int | None = None,
    cg_noise_tol: float = 0.1,
    warm_start: bool = True,
    batch_size: int | None = None,
    particles: int | None = None,
    ess_threshold: float = 0.5,
    proposal: str = "auto",
) -> Restoration:
    """Draw posterior samples of x from one measurement y = A x + sigma_y n.

    Args:
        y: one measurement (no batch dimension). For image models an image in [0, 1]: a
            tensor (C, h, w), a numpy array (h, w[, C]) or a PIL image; for analytic priors a
            tensor or array of shape y_shape in the prior's units.
        operator: the forward model A with its noise level: an `operators.LinearOperator` or a
            deepinv `LinearPhysics` with Gaussian noise; sigma_y in the units of y.
        model: the prior: a Denoiser (GaussianPrior, ModuleDenoiser, UNetDenoiser, ...), a
            deepinv.models.Denoiser (adapted by `from_deepinv_denoiser`), a folder holding a
            diffusers model, a Hugging Face hub id ("org/name", see `load_model`), or None for
            the embedded default image model.
        num_samples: how many posterior samples to draw.
        steps: grid times of the sampler (network evaluations for the default solver);
            None: the model's default (`defaults.defaults_for`).
        covariance: V_t in the averaged likelihood: "zero", "isotropic", "diagonal", "tweedie",
            or the Jacobian-free "projection"; None: the model's default.
        eta: noise level in [0, 1]; 1 = reverse SDE, 0 = probability-flow ODE.
        solver: "multistep" (second order, default), "euler", "heun" (eta=0), "pc", "euler_maruyama".
        guidance_scale: multiplier on the likelihood gradient (1 = Bayes' rule).
        generator: torch.Generator for reproducible draws.
        device: where to sample; default: where the model lives. A model or operator that
            lives elsewhere is copied there; the caller's stay where they were.
        progress: True shows a tqdm progress bar; a callable `progress(total)` returning a bar
            (e.g. a diffusers pipeline's `progress_bar`) shows that one.
        grid: time grid, "log-snr" (default), "uniform" or "karras".
        cg_tol, cg_max_iter, cg_noise_tol: stopping rule of the Tweedie conjugate gradient: a
            relative residual, a cap (None: the model's default), and a residual norm in units
            of the noise's norm sigma_y sqrt(m); it stops at whichever comes first.
        warm_start: start each step's Tweedie solve from the previous step's solution.
        batch_size: samples drawn per sampler run (all at once by default); in particle mode,
            particles denoised per network call.
        particles: K > 0 runs twisted sequential Monte Carlo with K particles (particle mode,
            asymptotically exact as K grows; needs eta > 0, solver "multistep" or "euler", and
            sigma_y > 0) and returns `num_samples` draws from the final weighted cloud.
        ess_threshold: particle mode resamples when ESS < ess_threshold * K.
        proposal: particle mode's proposal: "guided" (the guided step), "conditioned" (the
            unguided step conditioned on the linearised twist; Tweedie covariance, y of at most
            64 entries) or "auto" (conditioned wherever available; see `particles.choose_proposal`).

    Returns:
        A Restoration with samples (num_samples, *x_shape), mean, std, nfe, vjps, seconds.
    """
    # 1. Check.
    problem = check_problem(y, operator, model)
    defaults = defaults_for(problem.model)
    sampler = SamplerSettings(defaults.steps if steps is None else steps, eta, solver, grid)
    guidance = GuidanceSettings(defaults.covariance if covariance is None else covariance, guidance_scale, cg_tol,
                                defaults.cg_max_iter if cg_max_iter is None else cg_max_iter, cg_noise_tol, warm_start)
    batch_size = None if batch_size is None else positive_int(batch_size, "batch_size")
    particle_settings = None if particles is None else check_particle_settings(
        particles, ess_threshold, proposal, batch_size, sampler, guidance.covariance, problem.operator.sigma_y,
        problem.y.numel())
    settings = RestoreSettings(positive_int(num_samples, "num_samples"), sampler, guidance, batch_size, particle_settings)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    # 2. Convert.
    problem, device = convert(problem, device)
    # 3. Sample.
    start = time.perf_counter()
    if settings.particles is None:
        samples, nfe, vjps = sample_in_batches(problem, settings, generator, device, progress)
        cloud = None
    else:
        cloud = particle_sample(problem.model, problem.operator, problem.y, problem.x_shape, settings.particles,
                                sampler, guidance, num_samples=settings.num_samples, generator=generator,
                                device=device, progress=progress)
        samples, nfe, vjps = cloud.samples, cloud.nfe, cloud.vjps
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    # 4. Summarise.
    return summarise(problem, samples, cloud, nfe, vjps, seconds, settings)


def check_problem(y, operator, model) -> Problem:
    """The model (loaded if named), the operator (adapted if deepinv's) and y, checked against
    each other; a ValueError or TypeError naming the argument that does not fit."""
    if model is None:
        model = default_model()
    elif isinstance(model, (str, Path)):
        model = load_model(model)
    elif is_deepinv_denoiser(model):
        model = from_deepinv_denoiser(model)  # deepinv's D(x, sigma): VE, in [0, 1] units
    elif is_deepinv_object(model):
        raise TypeError(not_a_deepinv_denoiser(model, "model"))
    if not isinstance(model, Denoiser):
        raise TypeError(f"model must be a posterior_diff.Denoiser, a deepinv.models.Denoiser, a model folder, a hub id "
                        f"or None, got {type(model).__name__}")
    image_model = model.data_range is not None
    operator = as_operator(operator)  # a deepinv LinearPhysics is adapted here
    check_sigma_y(operator.sigma_y)  # an attribute set after construction is checked too
    y = as_measurement(y, image_model)
    if model.channels is not None and y.dim() == 3 and y.shape[0] != model.channels:
        raise ValueError(f"y has {y.shape[0]} channel(s) but the model takes {model.channels}; convert the image first "
                         "(posterior_diff.images.match_channels)")
    try:
        x_shape = operator.x_shape(tuple(y.shape))
        expected = operator.y_shape(x_shape)
    except ValueError as error:
        raise ValueError(f"y of shape {tuple(y.shape)} does not fit the operator: {error}") from None
    if expected != tuple(y.shape):
        raise ValueError(f"y has shape {tuple(y.shape)} but the operator produces {expected}")
    if model.x_shape is not None and tuple(model.x_shape) != x_shape:
        raise ValueError(f"y implies images of shape {x_shape} but the model takes {tuple(model.x_shape)}")
    return Problem(model, operator, y, x_shape, image_model)


def as_measurement(y, image_model: bool) -> Tensor:
    """y as a floating-point tensor of shape y_shape, checked finite; images through `to_image_tensor`."""
    if image_model and isinstance(y, (np.ndarray, Image.Image)):
        return to_image_tensor(y, "y")  # numpy (H, W[, C]) and PIL images, in [0, 1]
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor or numpy array, got {type(y).__name__}")
    if not y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    if y.dim() == 0:
        raise ValueError("y must be one measurement of shape y_shape (no batch dimension), got a scalar")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or infinite values")
    return y


def placed(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` itself if its tensors are on `device` already, else a copy moved there."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(tensor.device == device for tensor in tensors):
        return module
    return copy.deepcopy(module).to(device)


def convert(problem: Problem, device) -> tuple[Problem, torch.device]:
    """The problem on the sampling device (default: where the model lives), y in the sampler's
    dtype, and y and sigma_y in the model's units. Model and operator are handled alike: moved
    copies where they live elsewhere, so the caller's are never modified."""
    model = problem.model
    reference = model.reference_tensor()
    device = torch.device(device) if device is not None else (reference.device if reference is not None else problem.y.device)
    model, operator = placed(model, device), placed(problem.operator, device)
    y = problem.y.to(device=device, dtype=model.sampling_dtype())
    if problem.image_model:
        y, operator = measurement_to_model_units(y, operator, model.data_range)
    return Problem(model, operator, y, problem.x_shape, problem.image_model), device


def sample_in_batches(problem: Problem, settings: RestoreSettings, generator, device: torch.device,
                      progress) -> tuple[Tensor, int, int]:
    """The plain guided sampler, `batch_size` samples at a time: (samples, NFE, VJPs) in model units."""
    batch_size = settings.batch_size or settings.num_samples
    chunks, nfe, vjps = [], 0, 0
    for first in range(0, settings.num_samples, batch_size):
        count = min(batch_size, settings.num_samples - first)
        guided = AveragedLikelihoodGuidance.from_settings(problem.model, problem.operator,
                                                          problem.y.expand(count, *problem.y.shape), settings.guidance)
        samples, evaluations = run_sampler(guided, (count, *problem.x_shape), settings.sampler, generator=generator,
                                           device=device, dtype=problem.model.sampling_dtype(), progress=progress)
        chunks.append(samples)
        nfe += evaluations
        vjps += guided.vjp_count
    return torch.cat(chunks), nfe, vjps


def summarise(problem: Problem, samples: Tensor, cloud, nfe: int, vjps: int, seconds: float,
              settings: RestoreSettings) -> Restoration:
    """The Restoration in the caller's units: plain samples' mean and std, or in particle mode
    those of the whole weighted cloud (the SMC estimates, free of the extra noise of drawing
    `num_samples` from it)."""

    def to_output(x: Tensor) -> Tensor:
        return from_model_range(x, problem.model.data_range).clamp(0, 1) if problem.image_model else x

    samples = to_output(samples)
    if cloud is None:
        std = samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0])
        return Restoration(samples, samples.mean(dim=0), std, nfe, vjps, seconds, settings)
    particles = to_output(cloud.particles)
    weights = cloud.weights.reshape(-1, *[1] * (particles.dim() - 1))
    mean = (weights * particles).sum(0)
    std = (weights * (particles - mean).square()).sum(0).sqrt()
    return Restoration(samples, mean, std, nfe, vjps, seconds, settings, cloud.ess, cloud.resampled, cloud.log_evidence)
