"""Classical estimates of x from y, where `restore(..., start="estimate")` starts its sampler.

Come-Closer-Diffuse-Faster (Chung, Sim & Ye 2022, arXiv:2112.05146): instead of starting the
reverse process from the prior at t_max, start it from a cheap estimate x_hat of x, noised to a
level s_0 well below the top, x_{s_0} / alpha = x_hat + s_0 n. Where x_hat - x is small beside s_0,
that point is close to a draw of the forward process at s_0 given y, so the guided sampler only
has the levels below s_0 left to run: the levels where the data's coarse structure is decided are
taken from the estimate. It generalises the measurement start of denoising (there x_hat = y and
s_0 = sigma_y, exactly the forward process).

The estimates are scikit-image's, on images (C, H, W) in [0, 1]:

| operator             | estimate                                                        |
|----------------------|-----------------------------------------------------------------|
| Inpainting           | biharmonic fill of the holes (`biharmonic_fill`)                |
| deepinv's Inpainting | the same, with its mask (through `operators.DeepinvOperator`)   |
| SuperResolution      | bicubic interpolation of y (`bicubic_upsample`)                 |
| Denoising            | y itself                                                        |

Measured on the validation photographs (docs/start_estimates.md), the estimate start beats the
prior start on 70% random inpainting and loses on SR x4 and a 32 x 32 hole, where the estimate's
error is larger than the start level's noise over whole regions. So `start="auto"` takes it only
for masks whose every hole pixel has an observed pixel within SMALL_GAP pixels (`has_small_gaps`).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage import restoration, transform
from torch import Tensor

from operators import Denoising, Inpainting, LinearOperator, SuperResolution

# The farthest a hole pixel may lie from an observed one (Chebyshev distance, pixels) for the
# biharmonic fill to be a local interpolation, fit to start from: 70% random holes have every
# pixel within 2-3 pixels of an observed one (a 9 x 9 window misses all its 80 neighbours with
# probability 0.7^80 ~ 4e-13), a 32 x 32 box hole has pixels 16 pixels deep.
SMALL_GAP = 4


def to_hwc(image: Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) float64 array, the layout scikit-image works in."""
    return image.detach().cpu().double().numpy().transpose(1, 2, 0)


def to_chw(array: np.ndarray) -> Tensor:
    """(H, W, C) array -> (C, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()


def bicubic_upsample(y: Tensor, x_shape: tuple[int, ...]) -> Tensor:
    """Bicubic interpolation of a low-resolution image (C, h, w) to x_shape (C, H, W), clamped to [0, 1]."""
    upsampled = transform.resize(to_hwc(y), tuple(x_shape[-2:]), order=3, anti_aliasing=False)
    return to_chw(upsampled).clamp(0, 1)


def biharmonic_fill(y: Tensor, mask: Tensor) -> Tensor:
    """Fill the holes (mask == 0) of y (C, H, W) with scikit-image's biharmonic inpainting, clamped to [0, 1].

    Observed entries keep their values. A mask that differs between channels is filled channel by channel.
    """
    image, holes = to_hwc(y), to_hwc(mask) == 0
    if (holes == holes[..., :1]).all():  # one mask for every channel: one solve
        filled = restoration.inpaint_biharmonic(image, holes[..., 0], channel_axis=-1)
    else:
        filled = np.stack([restoration.inpaint_biharmonic(image[..., c], holes[..., c]) for c in range(image.shape[-1])], -1)
    return to_chw(filled).clamp(0, 1)


def inpainting_mask(operator: LinearOperator) -> Tensor | None:
    """The 0/1 mask of an inpainting operator, ours or deepinv's (x_shape, or broadcastable to it), else None."""
    if isinstance(operator, Inpainting):
        return operator.mask
    physics = getattr(operator, "physics", None)  # operators.DeepinvOperator wraps a deepinv physics
    if physics is None:
        return None
    import deepinv

    if not isinstance(physics, deepinv.physics.Inpainting):
        return None
    mask = physics.mask
    return mask[0] if mask.dim() == 4 else mask  # deepinv keeps a batch dimension


def has_large_gaps(operator: LinearOperator, x_shape: tuple[int, ...]) -> bool:
    """Whether `operator` is an inpainting with a hole pixel farther than SMALL_GAP pixels from every
    observed one (a box hole), whose inside only the prior can fill (restore's default eta differs there)."""
    return inpainting_mask(operator) is not None and not has_small_gaps(operator, x_shape)


def has_estimate(operator: LinearOperator) -> bool:
    """Whether `classical_estimate` knows this operator."""
    return inpainting_mask(operator) is not None or isinstance(operator, (SuperResolution, Denoising))


def classical_estimate(y: Tensor, operator: LinearOperator) -> Tensor:
    """The classical estimate of x from one measurement y (y_shape, [0, 1] units), (C, H, W) in [0, 1].

    Raises:
        ValueError: for an operator without one (`has_estimate`), naming it.
    """
    mask = inpainting_mask(operator)
    if mask is not None:
        return biharmonic_fill(y, mask.expand(tuple(y.shape)))
    if isinstance(operator, SuperResolution):
        return bicubic_upsample(y, operator.x_shape(tuple(y.shape)))
    if isinstance(operator, Denoising):
        return y.detach().float().cpu().clamp(0, 1)
    raise ValueError(f'start="estimate" has no classical estimate for {type(operator).__name__}: it knows '
                     'Inpainting, SuperResolution and Denoising; use start="prior"')


def has_small_gaps(operator: LinearOperator, x_shape: tuple[int, ...]) -> bool:
    """Whether `operator` is an inpainting whose every hole pixel has an observed pixel within
    SMALL_GAP pixels (in its own channel), where `start="auto"` starts from the estimate."""
    mask = inpainting_mask(operator)
    if mask is None:
        return False
    observed = mask.expand(x_shape).float().reshape(-1, 1, *x_shape[-2:])
    near = torch.nn.functional.max_pool2d(observed, 2 * SMALL_GAP + 1, stride=1, padding=SMALL_GAP)
    return bool((near > 0).all())
