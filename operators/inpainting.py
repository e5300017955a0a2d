"""Inpainting: keep the pixels where the mask is 1, y = mask * (x + sigma_y * n).

The measurement keeps the full image shape with zeros in the holes (as deepinv does), so
A = diag(mask) and A A^T = diag(mask): the identity on the kept pixels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, NoiseView, Shape


class Inpainting(LinearOperator):
    """Observe x where `mask` is 1, with noise of standard deviation `sigma_y` there.

    Args:
        mask: 0/1 tensor (or bool) of shape x_shape, one per image (no batch): 1 = observed.
        sigma_y: measurement noise standard deviation, >= 0, or "auto" (estimated by `restore`
            from the observed pixels of y).
    """

    def __init__(self, mask: Tensor, sigma_y: float | str = 0.0):
        super().__init__(sigma_y)
        mask = torch.as_tensor(mask)
        if mask.dim() == 0:
            raise ValueError("mask must have the shape of one image (e.g. (C, H, W)), got a scalar")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0 (missing) and 1 (observed)")
        dtype = mask.dtype if mask.is_floating_point() else torch.get_default_dtype()
        self.register_buffer("mask", mask.to(dtype))

    @property
    def mask_shape(self) -> Shape:
        """The shape of the mask: the one x_shape this operator acts on."""
        return tuple(self.mask.shape)

    def _check(self, shape: Sequence[int], what: str) -> None:
        if tuple(shape) != self.mask_shape:
            raise ValueError(f"{what} has shape {tuple(shape)} per sample but the mask has shape {self.mask_shape}")

    def A(self, x: Tensor) -> Tensor:
        self._check(x.shape[1:], "x")
        return x * self.mask.to(x.dtype)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check(y.shape[1:], "y")
        return y * self.mask.to(y.dtype)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Noise lives on the observed pixels only: the holes carry no measurement.
        clean = x + self.sigma_y * self.noise_like(x, generator) if self.sigma_y > 0 else x
        return self.A(clean)

    def noise_view(self, y: Tensor) -> NoiseView:
        """y (C, H, W) with the mask: only the observed pixels carry noise (the holes are 0)."""
        self._check(y.shape, "y")
        if y.dim() != 3:
            return super().noise_view(y)  # not an image: refused there
        return NoiseView(y, self.mask.to(y.dtype))

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        self._check(x_shape, "x")
        return self.mask_shape

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        self._check(y_shape, "y")
        return self.mask_shape

    def gram_diagonal(self, y_like: Tensor) -> Tensor:
        return self.mask.to(y_like.dtype)

    def extra_repr(self) -> str:
        return f"x_shape={self.mask_shape}, observed={self.mask.mean().item():.3f}, sigma_y={self.sigma_y_setting}"


def box_mask(shape: Sequence[int], top: int, left: int, height: int, width: int) -> Tensor:
    """A mask of `shape` (..., H, W) that is 1 everywhere but a height x width box of 0s.

    The box starts at row `top`, column `left` and covers every leading (channel) index.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least two (H, W) dimensions, got {shape}")
    H, W = shape[-2:]
    if height < 1 or width < 1:
        raise ValueError(f"the box must be at least 1x1, got {height}x{width}")
    if not (0 <= top and top + height <= H and 0 <= left and left + width <= W):
        raise ValueError(f"box rows {top}..{top + height} and columns {left}..{left + width} do not fit in {H}x{W}")
    mask = torch.ones(shape)
    mask[..., top : top + height, left : left + width] = 0
    return mask


def random_mask(
    shape: Sequence[int],
    missing_fraction: float,
    *,
    generator: torch.Generator | None = None,
    per_pixel: bool = True,
) -> Tensor:
    """A mask of `shape` with exactly round(missing_fraction * n) entries set to 0 at random.

    Args:
        shape: x_shape, e.g. (C, H, W) or (d,).
        missing_fraction: in [0, 1], the fraction of pixels removed.
        generator: torch.Generator for reproducibility.
        per_pixel: with a (C, H, W) shape, remove whole pixels (all channels together);
            otherwise entries are drawn independently.
    """
    shape = tuple(int(s) for s in shape)
    if not 0.0 <= missing_fraction <= 1.0:
        raise ValueError(f"missing_fraction must be in [0, 1], got {missing_fraction}")
    grid = shape[1:] if per_pixel and len(shape) == 3 else shape
    n = math.prod(grid)
    n_missing = int(round(missing_fraction * n))
    device = generator.device if generator is not None else None
    order = torch.randperm(n, generator=generator, device=device).cpu()
    flat = torch.ones(n)
    flat[order[:n_missing]] = 0
    return flat.reshape(grid).expand(shape).clone()
