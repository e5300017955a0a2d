"""sigma_y="auto": the measurement noise level estimated from y itself.

A photograph rarely comes with its noise level. An operator built with sigma_y="auto"
(`operators.Denoising("auto")`, `SuperResolution(4, "auto")`, `Inpainting(mask, "auto")`, or the
command line's `--sigma-y auto`) gets one here, from the measurement, in `restore`'s check stage:
before the model runs.

    sigma_y = estimate_sigma_y(y, operator)              # a float, in the units of y
    operator = operator.with_sigma_y(sigma_y)            # or let restore do both

Where the noise can be seen is the operator's to say (`LinearOperator.noise_view`): every entry
of y for denoising and super-resolution (the noise is added to the small image), the observed
pixels only for inpainting; an operator of its own (a blur) overrides `noise_view`.

The estimator is deepinv's `PatchCovarianceNoiseEstimator` (Chen, Zhu and Heng, "An efficient
statistical method for image noise level estimation", ICCV 2015): image patches live near a
low-dimensional subspace, so the small eigenvalues of their covariance are the noise's, and
sigma_y^2 is their mean. It was chosen over scikit-image's wavelet estimator (the median absolute
HH detail, Donoho and Johnstone 1994) and deepinv's `WaveletNoiseEstimator` by its relative error on
the held-out photographs (docs/noise_estimate.md, `python -m benchmarks.noise_estimate`): the
wavelet estimators take a textured photograph's detail for noise (+12 to +21% for denoising and
+35 to +83% for SR x4 at sigma_y = 0.025), the patch covariance does not (within 8%).

- Whole images (denoising, super-resolution): 4x4 patches at stride 1. deepinv's default, 8x8 at
  stride 3, leaves a 32x32 y (SR x4 of 128x128) 81 patches for a 192-dimensional covariance:
  rank-deficient, and the estimate fails; on whole images it is 5-14% low.
- Images with holes (inpainting): the patches must be noise everywhere, and with 70% of the
  pixels missing at random a 4x4 patch is fully observed with probability 0.3^16. So the patches
  are runs of RUN observed pixels in a row or a column (probability 0.3^3 each), laid side by side as
  the columns of an image of height RUN, whose (RUN x 1) patches the same estimator reads.

It refuses (a ValueError naming sigma_y) rather than guesses where too few patches carry the noise
(MIN_PATCHES_PER_ENTRY) and where the estimator finds no noise subspace. Below sigma_y = 0.025 a
textured photograph's detail does read as noise: the estimate is then high (up to +41% at 0.01),
an upper bound rather than a refusal, since no estimator here tells texture from noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from operators import AUTO, LinearOperator, NoiseView

PATCH = 4  # side of the square patches of a whole image
RUN = 3  # pixels per patch where the image has holes: runs along rows and columns
# The fewest patches an estimate may rest on, per entry of a patch (C x 4 x 4, or C x 3 for runs). With
# few patches the sample covariance's small eigenvalues spread below sigma_y^2 (Marchenko-Pastur), and
# the estimate reads low. Measured on 32 random crops of the held-out photographs at sigma_y = 0.05
# (benchmarks.noise_estimate, "How small a y"): 4x4 RGB patches (48 entries) read 32% low on average
# from 100 patches (13x13 crops, 2 per entry), 19% from 169 (16x16, 3.5 per entry), 2% from 441
# (24x24, 9 per entry); runs of 3 RGB pixels (9 entries) read 10% low from 19-37 runs, 2-3% from
# 32-127. So 8 per entry: a whole RGB y of at least 23x23, an RGB y with 70% missing at random of
# about 40x40.
MIN_PATCHES_PER_ENTRY = 8
ESTIMATOR = "deepinv.models.PatchCovarianceNoiseEstimator"


@dataclass(frozen=True)
class SigmaYEstimate:
    """How sigma_y="auto" was resolved: `restore` records it in `result.settings.sigma_y_estimate`.

    Attributes:
        value: the estimated sigma_y, in the units of y.
        estimator: what estimated it ("deepinv.models.PatchCovarianceNoiseEstimator, 4x4 patches").
        patches: how many patches, each all noise-carrying entries, it rests on.
    """

    value: float
    estimator: str
    patches: int


def estimate_sigma_y(y: Tensor, operator: LinearOperator) -> float:
    """The noise level sigma_y of one measurement y (y_shape, no batch) of `operator`, in the
    units of y, from the entries where `operator.noise_view` says the noise can be seen.

    Raises:
        ValueError: naming sigma_y, where the estimate would be a guess: too few noise-carrying
            patches (an RGB y smaller than 23x23, or few observed pixels), or no noise subspace found.
        ImportError: deepinv is not installed (`pip install posterior-diff[deepinv]`).
    """
    return estimate(y, operator).value


def estimate(y: Tensor, operator: LinearOperator) -> SigmaYEstimate:
    """`estimate_sigma_y` with its record: the value, the estimator and the patches it rests on."""
    view = operator.noise_view(torch.as_tensor(y).detach())
    patches, patch_size, shape = patch_image(view)
    count, needed = patch_count(patches, patch_size), minimum_patches(patches, patch_size)
    if count < needed:
        raise ValueError(f"sigma_y='auto' cannot be estimated from this measurement: only {count} {shape} patches of "
                         f"y carry its noise, and an estimate from fewer than {needed} ({MIN_PATCHES_PER_ENTRY} per "
                         "entry of a patch) reads low (docs/noise_estimate.md); pass sigma_y as a number")
    value = patch_covariance(patches, patch_size)
    if not value > 0:  # NaN too
        raise ValueError(f"sigma_y='auto': the patch covariance of y has no noise subspace (estimate {value}), so y "
                         "shows no measurement noise to estimate; pass sigma_y as a number")
    return SigmaYEstimate(value, f"{ESTIMATOR}, {shape} patches", count)


def patch_image(view: NoiseView) -> tuple[Tensor, tuple[int, int], str]:
    """The image whose every patch is noise everywhere, (1, C, h, w) in float32, its patch size,
    and the patches' name: the image itself with PATCH x PATCH patches, or, where it has holes,
    its runs of RUN observed pixels (`observed_runs`) with RUN x 1 patches."""
    image = view.image.detach().float().cpu()
    if view.observed is None or bool((view.observed != 0).all()):
        return image[None], (PATCH, PATCH), f"{PATCH}x{PATCH}"
    return observed_runs(image, view.observed.cpu() != 0, RUN)[None], (RUN, 1), f"{RUN}-pixel run"


def observed_runs(image: Tensor, observed: Tensor, length: int) -> Tensor:
    """Every run of `length` consecutive pixels of `image` (C, H, W) that are observed in all
    channels, along rows and along columns, as the columns of a (C, length, N) image."""
    pixels = observed.all(0)  # (H, W): a patch spans all channels
    columns = []
    for plane, seen in ((image, pixels), (image.transpose(-1, -2), pixels.T)):
        width = plane.shape[-1] - length + 1
        if width < 1:
            continue
        starts = torch.stack([seen[:, k : k + width] for k in range(length)]).all(0)  # (H, width)
        columns.append(torch.stack([plane[:, :, k : k + width][:, starts] for k in range(length)], 1))
    return torch.cat(columns, -1) if columns else image.new_zeros(image.shape[0], length, 0)


def patch_count(image: Tensor, patch_size: tuple[int, int]) -> int:
    """How many patches of `patch_size` at stride 1 the image (1, C, h, w) has."""
    rows, cols = (max(0, side - size + 1) for side, size in zip(image.shape[-2:], patch_size))
    return rows * cols


def minimum_patches(image: Tensor, patch_size: tuple[int, int]) -> int:
    """The fewest patches an estimate may rest on: MIN_PATCHES_PER_ENTRY per entry of a patch (C x h x w)."""
    return MIN_PATCHES_PER_ENTRY * image.shape[1] * patch_size[0] * patch_size[1]


def patch_covariance(image: Tensor, patch_size: tuple[int, int]) -> float:
    """deepinv's PatchCovarianceNoiseEstimator on (1, C, h, w) with `patch_size` at stride 1;
    NaN where it finds no noise subspace."""
    try:
        from deepinv.models import PatchCovarianceNoiseEstimator
    except ImportError:
        raise ImportError('sigma_y="auto" estimates the noise with deepinv: pip install posterior-diff[deepinv]') from None
    try:
        return float(PatchCovarianceNoiseEstimator.estimate_noise(image, patch_size=patch_size, stride=(1, 1)))
    except RuntimeError:  # "Noise level estimation failed."
        return float("nan")


def resolve_auto(measurements: Sequence[Tensor], operators: Sequence[LinearOperator], names: Sequence[str],
                 operator_names: Sequence[str]) -> tuple[tuple[LinearOperator, ...], tuple[SigmaYEstimate | None, ...]]:
    """Each operator with sigma_y="auto" replaced by a copy with sigma_y estimated from its own
    measurement (an operator shared by several measurements gets one copy per measurement), and
    the estimates (None where sigma_y was given). Errors name the measurement and the operator."""
    resolved, estimates = [], []
    for y, operator, name, operator_name in zip(measurements, operators, names, operator_names):
        if not (isinstance(operator.sigma_y_setting, str) and operator.sigma_y_setting == AUTO):
            resolved.append(operator)
            estimates.append(None)
            continue
        try:
            found = estimate(y, operator)
        except ValueError as error:
            raise ValueError(f"{operator_name} with {name}: {error}") from None
        resolved.append(operator.with_sigma_y(found.value))
        estimates.append(found)
    return tuple(resolved), tuple(estimates)
