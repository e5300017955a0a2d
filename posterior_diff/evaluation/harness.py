"""What the benchmarks and the demos measure with: photographs, measurements, classical baselines, scores.

Images are (C, H, W) tensors in [0, 1], and sigma_y is in those units, as everywhere in the
package's public API.

- Photographs: `load_photograph(name, size, downscale)`, a centre crop of a photograph that
  ships inside scikit-image (no download). The embedded model never saw HELD_OUT_PHOTOGRAPHS
  (astronaut, camera, coffee, chelsea; `cat` is chelsea again, so HELD_OUT lists it too).
  TRAINING_PHOTOGRAPHS are scikit-image's other photographs, one of the training sources of
  `posterior_diff.training.data`.
- Measurements: `measure(task, truth)` builds the forward model of a task of
  `posterior_diff.tasks` and draws y = A x + sigma_y n from one generator (mask, then noise).
- Classical baselines: bicubic upsampling (super-resolution), scikit-image's biharmonic fill
  (inpainting), BM3D (denoising; the `bm3d` package of the `benchmark` extra), and scikit-image's
  unsupervised Wiener filter and Richardson-Lucy (deblurring).
  `baselines(measurement)` returns the task's reference baseline (`Task.baseline`) first.
- Display: `nearest_upsample` of a low-resolution measurement, `display_std` of a posterior std.
- Scores: `psnr_ssim`; the calibration scores of `posterior_diff.evaluation.metrics`
  (`coverage_within_two_std`, `calibrated_coverage`) are re-exported here.
- Divergence, one rule for every benchmark: a run whose sampler raises
  `NonFiniteSampleError`, or returns non-finite samples or samples beyond DIVERGENCE_BOUND in
  absolute value, is reported as DIVERGED (`restore_unless_diverged`, `has_diverged`).
- Problems with exact posteriors (`posterior_diff.evaluation.problems`): `single_precision` copies of a
  problem to sample in float32, and `posterior_distance`, the sliced Wasserstein distance to
  exact posterior draws.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from skimage import data, metrics, restoration, transform
from torch import Tensor

from operators import LinearOperator

from posterior_diff.evaluation.metrics import calibrated_coverage, coverage_within_two_std, sliced_wasserstein
from posterior_diff.images import match_channels, to_image_tensor
from posterior_diff.models.priors import GaussianMixturePrior, GaussianPrior
from posterior_diff.restore import Restoration, restore
from posterior_diff.sampling.samplers import NonFiniteSampleError
from posterior_diff.start_estimates import bicubic_upsample, biharmonic_fill, to_chw, to_hwc
from posterior_diff.tasks import SIMULATED_TASKS, Task, get_task

__all__ = [
    "HELD_OUT_PHOTOGRAPHS", "HELD_OUT", "TRAINING_PHOTOGRAPHS", "SIMULATED_TASKS", "DIVERGED", "DIVERGENCE_BOUND",
    "photograph", "centre_crop", "load_photograph", "Measurement", "measure",
    "bicubic_upsample", "biharmonic_fill", "bm3d_denoise", "wiener_deconvolve", "richardson_lucy_deconvolve",
    "RICHARDSON_LUCY_ITERATIONS", "baselines", "nearest_upsample", "display_std", "psnr_ssim", "coverage_within_two_std",
    "calibrated_coverage", "has_diverged", "restore_unless_diverged", "single_precision", "posterior_distance",
]

HELD_OUT_PHOTOGRAPHS = ("astronaut", "camera", "coffee", "chelsea")
HELD_OUT = HELD_OUT_PHOTOGRAPHS + ("cat",)  # cat is the chelsea photograph
TRAINING_PHOTOGRAPHS = ("rocket", "coins", "clock", "moon", "brick", "grass", "gravel", "cell",
                        "hubble_deep_field", "immunohistochemistry", "retina", "page", "text")
DIVERGED = "diverged"
DIVERGENCE_BOUND = 1e4  # |x| beyond this counts as diverged: the priors here have scales from ~1 to ~20
# Richardson-Lucy's iterations: its estimate sharpens with every one and amplifies the noise more with each.
# On the deblur task (astronaut, 128 px, sigma_y = 0.01) 10 / 30 / 100 give 22.2 / 23.1 / 23.8 dB and SSIM
# 0.77 / 0.80 / 0.80: 30 has the SSIM of 100 at a third of the cost.
RICHARDSON_LUCY_ITERATIONS = 30


# -- photographs ------------------------------------------------------------------------


def photograph(name: str) -> Tensor:
    """The scikit-image photograph `name` (e.g. "astronaut"), (C, H, W) in [0, 1]; C = 1 for grey ones."""
    loader = getattr(data, name, None)
    if name.startswith("_") or not callable(loader):
        raise ValueError(f"scikit-image has no photograph {name!r}; the held-out ones are {', '.join(HELD_OUT_PHOTOGRAPHS)}")
    return to_image_tensor(np.asarray(loader()), name)


def centre_crop(image: Tensor, size: int, downscale: float = 1.0) -> Tensor:
    """Shrink an image (C, H, W) by `downscale` (antialiased) and cut its centre size x size crop.

    Raises:
        ValueError: if the shrunk image is smaller than `size`.
    """
    if downscale < 1:
        raise ValueError(f"downscale must be >= 1, got {downscale:g}")
    array = to_hwc(image)
    height, width = (round(side / downscale) for side in array.shape[:2])
    if min(height, width) < size:
        raise ValueError(f"the image is {width}x{height} after shrinking by {downscale:g}, smaller than {size}x{size}")
    if downscale != 1:
        array = transform.resize(array, (height, width), anti_aliasing=True)
    top, left = (height - size) // 2, (width - size) // 2
    return to_chw(array[top : top + size, left : left + size])


def load_photograph(name: str, size: int, downscale: float = 1.0, channels: int = 3) -> Tensor:
    """A centre crop of a scikit-image photograph, shrunk first by `downscale`: (channels, size, size) in [0, 1].

    Grey photographs (camera) are repeated to three channels, colour ones averaged for one.
    """
    return match_channels(centre_crop(photograph(name), size, downscale), channels)


# -- measurements -----------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One simulated measurement of a clean image.

    Attributes:
        task: the task of `posterior_diff.tasks` it simulates.
        operator: its forward model A with the noise level sigma_y (in [0, 1] units).
        y: the measurement A x + sigma_y n, shape y_shape (no batch dimension).
        x_shape: the shape (C, H, W) of the clean image.
    """

    task: Task
    operator: LinearOperator
    y: Tensor
    x_shape: tuple[int, ...]


def measure(task: str | Task, truth: Tensor, *, sigma_y: float | None = None,
            generator: torch.Generator | None = None) -> Measurement:
    """Simulate a task's measurement of `truth` (C, H, W) in [0, 1].

    Args:
        task: a Task or its name in TASKS ("sr4", "box", "denoise", ...; not "inpaint", which needs a real mask).
        sigma_y: the noise level (default: the task's).
        generator: draws the mask of the "random" task, then the noise, in that order.
    """
    task = get_task(task) if isinstance(task, str) else task
    x_shape = tuple(truth.shape)
    operator = task.operator(x_shape, sigma_y=sigma_y, generator=generator)
    return Measurement(task, operator, operator.measure(truth[None], generator)[0], x_shape)


# -- classical baselines ------------------------------------------------------------------


def bm3d_denoise(y: Tensor, sigma_y: float) -> Tensor:
    """BM3D (Dabov et al. 2007, the `bm3d` package) of a noisy image y (C, H, W) with noise std sigma_y, clamped to [0, 1].

    Three channels are denoised together in BM3D's colour mode, others one by one.
    """
    try:
        import bm3d  # lazily: an optional dependency (the benchmark and test extras)
    except ImportError as error:
        raise ImportError("the BM3D baseline needs the bm3d package: pip install 'posterior-diff[benchmark]'") from error
    image = to_hwc(y)
    if image.shape[-1] == 3:
        denoised = bm3d.bm3d_rgb(image, sigma_y)
    else:
        denoised = np.stack([bm3d.bm3d(image[..., c], sigma_y) for c in range(image.shape[-1])], -1)
    return to_chw(np.asarray(denoised)).clamp(0, 1)


def wiener_deconvolve(y: Tensor, kernel: Tensor, *, seed: int = 0) -> Tensor:
    """scikit-image's unsupervised Wiener-Hunt deconvolution (Orieux et al. 2010) of a blurred image y
    (C, H, W), channel by channel, clamped to [0, 1].

    Its blur model is the circular convolution of `operators.Blur` (scikit-image's transfer function is
    the FFT of the kernel centred on its middle entry), so it sees the tasks' measurements as they were
    made. It estimates the noise and the image's smoothness itself (a Gibbs sampler, seeded by `seed`)
    and returns their posterior mean under a Laplacian smoothness prior.
    """
    psf = kernel.detach().cpu().double().numpy()
    image = to_hwc(y)
    channels = [restoration.unsupervised_wiener(image[..., c], psf, rng=seed)[0] for c in range(image.shape[-1])]
    return to_chw(np.stack(channels, -1)).clamp(0, 1)


def richardson_lucy_deconvolve(y: Tensor, kernel: Tensor, iterations: int = RICHARDSON_LUCY_ITERATIONS) -> Tensor:
    """scikit-image's Richardson-Lucy deconvolution of a blurred image y (C, H, W), channel by channel,
    `iterations` of them (RICHARDSON_LUCY_ITERATIONS by default), clamped to [0, 1].

    Boundary: scikit-image's Richardson-Lucy convolves with zeros outside the image, where the tasks'
    blur is circular. To give it the circular neighbours, the image is wrapped around by the kernel's
    side on every edge first and cropped back after, so only that margin sees its zero boundary. Its
    noise model is Poisson and it needs y >= 0: y is clamped to [0, 1] first.
    """
    psf = kernel.detach().cpu().double().numpy()
    margin = psf.shape[0]
    image = np.pad(np.clip(to_hwc(y), 0, 1), ((margin, margin), (margin, margin), (0, 0)), mode="wrap")
    channels = [restoration.richardson_lucy(image[..., c], psf, num_iter=iterations) for c in range(image.shape[-1])]
    return to_chw(np.stack(channels, -1)[margin:-margin, margin:-margin]).clamp(0, 1)


def _reference_baseline(measurement: Measurement) -> Tensor:
    """The estimate of the task's reference baseline, `measurement.task.baseline`."""
    methods: dict[str, Callable[[], Tensor]] = {
        "bicubic": lambda: bicubic_upsample(measurement.y, measurement.x_shape),
        "biharmonic fill": lambda: biharmonic_fill(measurement.y, measurement.operator.mask),
        "BM3D": lambda: bm3d_denoise(measurement.y, measurement.operator.sigma_y),
        "unsupervised Wiener": lambda: wiener_deconvolve(measurement.y, measurement.operator.kernel),
    }
    return methods[measurement.task.baseline]()


def baselines(measurement: Measurement) -> dict[str, Tensor]:
    """Classical estimates of the truth, (C, H, W) in [0, 1], by name; the first is the reference (`Task.baseline`).

    Deblurring also gets Richardson-Lucy. Inpainting, denoising and deblurring also show their input
    (clamped): "masked input", "noisy input" and "blurred input".
    """
    estimates = {measurement.task.baseline: _reference_baseline(measurement)}
    if measurement.task.blur is not None:
        estimates["Richardson-Lucy"] = richardson_lucy_deconvolve(measurement.y, measurement.operator.kernel)
        estimates["blurred input"] = measurement.y.clamp(0, 1)
    elif measurement.task.mask is not None:
        estimates["masked input"] = measurement.y.clamp(0, 1)
    elif measurement.task.factor is None:
        estimates["noisy input"] = measurement.y.clamp(0, 1)
    return estimates


# -- display --------------------------------------------------------------------------


def nearest_upsample(y: Tensor, x_shape: tuple[int, ...]) -> Tensor:
    """A low-resolution image (C, h, w) shown at x_shape (C, H, W) by pixel repetition (H, W multiples of h, w)."""
    rows, columns = x_shape[-2] // y.shape[-2], x_shape[-1] // y.shape[-1]
    return y.repeat_interleave(rows, -2).repeat_interleave(columns, -1)


def display_std(std: Tensor) -> Tensor:
    """A posterior std (C, H, W) as one grey panel (1, H, W): averaged over channels, its largest value white."""
    spread = std.mean(0, keepdim=True)
    return spread / max(float(spread.max()), 1e-12)


# -- scores -----------------------------------------------------------------------------


def psnr_ssim(estimate: Tensor, truth: Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM (scikit-image, data_range = 1) of an estimate (C, H, W) in [0, 1] against the truth.

    SSIM's 7-pixel window shrinks to fit images smaller than that; under 3 pixels a side SSIM is
    undefined (NaN). Identical images have an infinite PSNR.
    """
    estimate_array, truth_array = to_hwc(estimate), to_hwc(truth)
    window = min(7, *truth_array.shape[:2])
    window -= 1 - window % 2  # odd
    with np.errstate(divide="ignore"):
        psnr = float(metrics.peak_signal_noise_ratio(truth_array, estimate_array, data_range=1))
    if window < 3:
        return psnr, float("nan")
    return psnr, float(metrics.structural_similarity(truth_array, estimate_array, data_range=1, channel_axis=-1,
                                                     win_size=window))


# -- divergence -------------------------------------------------------------------------


def has_diverged(samples: Tensor) -> bool:
    """True if samples (N, *x_shape) hold non-finite values or values beyond DIVERGENCE_BOUND in absolute value."""
    return not bool(torch.isfinite(samples).all()) or float(samples.abs().max()) > DIVERGENCE_BOUND


def restore_unless_diverged(y, operator, model, **options) -> Restoration | None:
    """`restore(y, operator, model, **options)`, or None where the run diverged (see `has_diverged`)."""
    try:
        result = restore(y, operator, model, **options)
    except NonFiniteSampleError:
        return None
    return None if has_diverged(result.samples) else result


# -- problems with exact posteriors -------------------------------------------------------


def single_precision(prior: GaussianPrior | GaussianMixturePrior, operator: LinearOperator, y: Tensor):
    """(prior, operator, y) copied to float32 for sampling.

    The problems of `posterior_diff.evaluation.problems` and their exact posteriors are built in float64;
    the samplers are measured in float32, as they run on images.
    """
    if isinstance(prior, GaussianMixturePrior):
        prior32 = GaussianMixturePrior(prior.weights.float(), prior.means.float(), prior.covs.float(), prior.schedule)
    else:
        prior32 = GaussianPrior(prior.mean.float(), prior.cov.float(), prior.schedule)
    return prior32, copy.deepcopy(operator).float(), y.float()


def posterior_distance(problem, num_samples: int, seed: int, projections: int = 1000) -> tuple[Callable[[Tensor], float], float]:
    """(distance, floor) for a problem with an exact posterior (`problem.posterior`).

    `distance(samples)` is the sliced Wasserstein distance of samples (N, d) to `num_samples`
    exact posterior draws, on the same `projections` directions for every sample set; `floor`
    is that distance for another `num_samples` exact draws (what exact sampling achieves).
    """
    generator = torch.Generator().manual_seed(1000 + seed)
    reference = problem.posterior.sample(num_samples, generator)

    def distance(samples: Tensor) -> float:
        directions = torch.Generator().manual_seed(2000 + seed)
        return sliced_wasserstein(samples.cpu().double(), reference, projections, generator=directions)

    return distance, distance(problem.posterior.sample(num_samples, generator))
