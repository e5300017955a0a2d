"""`restore(y, operator, model)`: posterior samples of x given one measurement y = A x + noise.

The one-call API. It checks every argument before any work (a clear ValueError or
TypeError naming the argument), repeats y for `num_samples` samples, wraps the model in
the averaged-likelihood guidance and runs a reverse-time sampler; it returns the samples
with their mean, standard deviation, the network work done and the wall-clock time.

Units: image models (those with a `data_range`, such as the default model) take y and
sigma_y in [0, 1] and return images in [0, 1], clamped; the conversion to the model's
[-1, 1] happens in `posterior_diff.images`, and nowhere else. Analytic priors (Gaussian,
mixture) have no image range: y and the samples stay in the prior's own units.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from operators import LinearOperator, as_operator

from .denoisers import Denoiser
from .images import from_model_range, measurement_to_model_units, to_image_tensor
from .models import default_model, load_model
from .guidance import COVARIANCES, AveragedLikelihoodGuidance
from .particles import check_particle_settings, choose_proposal, particle_sample
from .samplers import SOLVERS, check_eta, sample
from .time_grids import GRIDS


@dataclass
class Restoration:
    """The result of `restore`.

    Attributes:
        samples: posterior samples, shape (num_samples, *x_shape).
        mean: their mean, shape x_shape (the posterior-mean estimate; in particle mode the
            weighted mean of the whole cloud).
        std: their standard deviation per entry, shape x_shape (zeros for one sample; in
            particle mode the weighted standard deviation of the cloud).
        nfe: network (denoiser) forward evaluations per sample batch.
        vjps: vector-Jacobian products the guidance spent.
        seconds: wall-clock time of the sampling.
        settings: the sampler settings used.
        ess, resampled, log_evidence: particle mode only (see `posterior_diff.particles`):
            ESS / K after each reweighting, the steps after which the cloud was resampled, and
            the estimate of log p(y) in the model's units (NaN where the twist has no log det).
            nfe and vjps are then per particle chain and for the whole cloud respectively.
    """

    samples: Tensor
    mean: Tensor
    std: Tensor
    nfe: int
    vjps: int
    seconds: float
    settings: dict = field(default_factory=dict)
    ess: list[float] | None = None
    resampled: list[int] | None = None
    log_evidence: float | None = None


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _choice(value, options, name: str) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def _as_measurement(y, image_model: bool) -> Tensor:
    if image_model and (isinstance(y, np.ndarray) or isinstance(y, Image.Image)):
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


def restore(
    y,
    operator: LinearOperator,
    model: Denoiser | str | None = None,
    *,
    num_samples: int = 1,
    steps: int = 100,
    covariance: str = "tweedie",
    eta: float = 1.0,
    solver: str = "multistep",
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool | Callable[[int], Any] = False,
    grid: str = "log-snr",
    cg_tol: float = 1e-4,
    cg_max_iter: int = 50,
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
            folder holding a diffusers model, a Hugging Face hub id ("org/name", see
            `load_model`), or None for the embedded default image model.
        num_samples: how many posterior samples to draw.
        steps: grid times of the sampler (network evaluations for the default solver).
        covariance: V_t in the averaged likelihood: "zero", "isotropic", "diagonal", "tweedie".
        eta: noise level in [0, 1]; 1 = reverse SDE, 0 = probability-flow ODE.
        solver: "multistep" (second order, default), "euler", "heun" (eta=0), "pc", "euler_maruyama".
        guidance_scale: multiplier on the likelihood gradient (1 = Bayes' rule).
        generator: torch.Generator for reproducible draws.
        device: where to sample; default: where the model lives. The model is moved there.
        progress: True shows a tqdm progress bar; a callable `progress(total)` returning a bar
            (e.g. a diffusers pipeline's `progress_bar`) shows that one.
        grid: time grid, "log-snr" (default), "uniform" or "karras".
        cg_tol, cg_max_iter: stopping rule of the Tweedie conjugate gradient.
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
    if model is None:
        model = default_model()
    elif isinstance(model, (str, Path)):
        model = load_model(model)
    if not isinstance(model, Denoiser):
        raise TypeError(f"model must be a posterior_diff.Denoiser, a model folder, a hub id or None, got {type(model).__name__}")
    image_model = model.data_range is not None
    operator = as_operator(operator)  # a deepinv LinearPhysics is adapted here
    num_samples = _positive_int(num_samples, "num_samples")
    steps = _positive_int(steps, "steps")
    chunk_size = None if batch_size is None else _positive_int(batch_size, "batch_size")
    batch_size = num_samples if batch_size is None else chunk_size
    _choice(covariance, COVARIANCES, "covariance")
    _choice(solver, SOLVERS, "solver")
    _choice(grid, GRIDS, "grid")
    eta = check_eta(eta, solver)
    if particles is not None:
        check_particle_settings(particles, eta, solver, ess_threshold, operator.sigma_y)
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    y = _as_measurement(y, image_model)
    channels = model.channels
    if channels is not None and y.dim() == 3 and y.shape[0] != channels:
        raise ValueError(
            f"y has {y.shape[0]} channel(s) but the model takes {channels}; convert the image first "
            "(posterior_diff.images.match_channels)"
        )
    try:
        x_shape = operator.x_shape(tuple(y.shape))
        expected = operator.y_shape(x_shape)
    except ValueError as error:
        raise ValueError(f"y of shape {tuple(y.shape)} does not fit the operator: {error}") from None
    if expected != tuple(y.shape):
        raise ValueError(f"y has shape {tuple(y.shape)} but the operator produces {expected}")
    if model.x_shape is not None and tuple(model.x_shape) != x_shape:
        raise ValueError(f"y implies images of shape {x_shape} but the model takes {tuple(model.x_shape)}")

    reference = model.reference_tensor()
    device = torch.device(device) if device is not None else (reference.device if reference is not None else y.device)
    dtype = model.sampling_dtype()
    model.to(device)
    # Operators are small: work on a copy so the caller's stays where it was.
    operator = copy.deepcopy(operator).to(device)
    y = y.to(device=device, dtype=dtype)
    if image_model:
        y, operator = measurement_to_model_units(y, operator)

    settings = dict(steps=steps, covariance=covariance, eta=eta, solver=solver, grid=grid,
                    guidance_scale=guidance_scale, cg_tol=cg_tol, cg_max_iter=cg_max_iter)
    start = time.perf_counter()
    if particles is None:
        samples, nfe, vjps = _sample_in_batches(model, operator, y, x_shape, num_samples, batch_size, settings,
                                                generator, device, dtype, progress)
        cloud = None
    else:
        settings.update(particles=particles, ess_threshold=ess_threshold,
                        proposal=choose_proposal(proposal, covariance, y.numel()))
        cloud = particle_sample(model, operator, y, x_shape, num_samples=num_samples, chunk_size=chunk_size,
                                generator=generator, device=device, dtype=dtype, progress=progress, **settings)
        samples, nfe, vjps = cloud.samples, cloud.nfe, cloud.vjps
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    def to_output(x: Tensor) -> Tensor:
        return from_model_range(x).clamp(0, 1) if image_model else x

    samples = to_output(samples)
    if cloud is None:
        std = samples.std(dim=0) if num_samples > 1 else torch.zeros_like(samples[0])
        return Restoration(samples, samples.mean(dim=0), std, nfe, vjps, seconds, settings)
    # Mean and std from the whole weighted cloud: the SMC estimates, free of the extra noise of
    # drawing `num_samples` from it.
    cloud_x0 = to_output(cloud.particles)
    weights = cloud.weights.reshape(-1, *[1] * (cloud_x0.dim() - 1))
    mean = (weights * cloud_x0).sum(0)
    std = (weights * (cloud_x0 - mean).square()).sum(0).sqrt()
    return Restoration(samples, mean, std, nfe, vjps, seconds, settings, cloud.ess, cloud.resampled, cloud.log_evidence)


def _sample_in_batches(model, operator, y, x_shape, num_samples, batch_size, settings, generator, device, dtype,
                       progress) -> tuple[Tensor, int, int]:
    """The plain guided sampler, `batch_size` samples at a time: (samples, NFE, VJPs) in model units."""
    chunks, nfe, vjps = [], 0, 0
    for first in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - first)
        guided = AveragedLikelihoodGuidance(model, operator, y.expand(count, *y.shape), settings["covariance"],
                                            settings["guidance_scale"], settings["cg_tol"], settings["cg_max_iter"])
        samples, evaluations = sample(guided, (count, *x_shape), steps=settings["steps"], eta=settings["eta"],
                                      solver=settings["solver"], grid=settings["grid"], generator=generator,
                                      device=device, dtype=dtype, progress=progress)
        chunks.append(samples)
        nfe += evaluations
        vjps += guided.vjp_count
    return torch.cat(chunks), nfe, vjps
