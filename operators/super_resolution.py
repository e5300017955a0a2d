"""Super-resolution: y = downsample_s(x) + sigma_y * n on the last two (H, W) dimensions.

kernel="average": the mean over s x s blocks. Its adjoint spreads each value over its
block divided by s^2, so A A^T = I / s^2 and the regularised solve is closed form.

kernel="bicubic": antialiased bicubic downsampling (Keys kernel, a = -0.5, stretched by s
as MATLAB's imresize does), borders replicated. A A^T is a general filter, so solves use
conjugate gradient. The adjoint runs the three stages backwards: transposed strided
convolutions, then the replicated border folded back onto the edge pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, Shape

KERNELS = ("average", "bicubic")


def keys_cubic(u: Tensor, a: float = -0.5) -> Tensor:
    """The Keys cubic convolution kernel at offsets u (in pixels of the coarse grid)."""
    u = u.abs()
    near = ((a + 2) * u - (a + 3)) * u * u + 1
    far = ((a * u - 5 * a) * u + 8 * a) * u - 4 * a
    return torch.where(u <= 1, near, torch.where(u < 2, far, torch.zeros_like(u)))


def bicubic_taps(factor: int) -> Tensor:
    """1-D antialiased bicubic weights for downsampling by `factor` (sum to 1).

    The taps sit at the fine-pixel offsets from a coarse pixel's centre: half-integers for
    even factors, integers for odd ones, covering the kernel support of 2 coarse pixels.
    """
    size = 4 * factor if factor % 2 == 0 else 4 * factor + 1
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = keys_cubic(offsets / factor)
    return weights / weights.sum()


class SuperResolution(LinearOperator):
    """Downsampling by an integer `factor` on the last two dimensions of x.

    Args:
        factor: integer s >= 1; H and W of x must be multiples of s.
        sigma_y: measurement noise standard deviation, >= 0, or "auto" (estimated by `restore`
            from the small image y, where the noise is added).
        kernel: "average" (block mean) or "bicubic" (antialiased bicubic).

    x has shape (B, *lead, H, W) and y has shape (B, *lead, H / s, W / s).
    """

    def __init__(self, factor: int, sigma_y: float | str = 0.0, kernel: str = "average"):
        super().__init__(sigma_y)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.factor = factor
        self.kernel = kernel
        self.register_buffer("taps", bicubic_taps(factor).float(), persistent=False)

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        shape = tuple(x_shape)
        if len(shape) < 2:
            raise ValueError(f"x must have at least two (H, W) dimensions per sample, got shape {shape}")
        H, W = shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"x has size {H}x{W}, which is not a multiple of the factor {self.factor}")
        return (*shape[:-2], H // self.factor, W // self.factor)

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        shape = tuple(y_shape)
        if len(shape) < 2:
            raise ValueError(f"y must have at least two (H, W) dimensions per sample, got shape {shape}")
        return (*shape[:-2], shape[-2] * self.factor, shape[-1] * self.factor)

    def A(self, x: Tensor) -> Tensor:
        y_shape = self.y_shape(x.shape[1:])
        planes = x.reshape(-1, 1, *x.shape[-2:])
        if self.kernel == "average":
            low = F.avg_pool2d(planes, self.factor)
        else:
            low = self._bicubic(planes)
        return low.reshape(x.shape[0], *y_shape)

    def _pad(self) -> int:
        # Kernel length K = s + 2 pad, so H + 2 pad - K is a multiple of s: no pixel is left over.
        return (self.taps.numel() - self.factor) // 2

    def _bicubic(self, planes: Tensor) -> Tensor:
        taps = self.taps.to(planes.dtype)
        pad = self._pad()
        padded = F.pad(planes, (pad, pad, pad, pad), mode="replicate")
        rows = F.conv2d(padded, taps.reshape(1, 1, -1, 1), stride=(self.factor, 1))
        return F.conv2d(rows, taps.reshape(1, 1, 1, -1), stride=(1, self.factor))

    def _bicubic_adjoint(self, planes: Tensor) -> Tensor:
        taps = self.taps.to(planes.dtype)
        pad = self._pad()
        rows = F.conv_transpose2d(planes, taps.reshape(1, 1, 1, -1), stride=(1, self.factor))
        padded = F.conv_transpose2d(rows, taps.reshape(1, 1, -1, 1), stride=(self.factor, 1))
        return _fold_replicated_border(padded, pad)

    def A_adjoint(self, y: Tensor) -> Tensor:
        x_shape = self.x_shape(y.shape[1:])
        if self.kernel == "average":
            s = self.factor
            return y.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1) / s**2
        planes = y.reshape(-1, 1, *y.shape[-2:])
        return self._bicubic_adjoint(planes).reshape(y.shape[0], *x_shape)

    def gram_diagonal(self, y_like: Tensor) -> Tensor | None:
        if self.kernel == "average":
            return torch.full((), 1.0 / self.factor**2, dtype=y_like.dtype, device=y_like.device)
        return None

    def extra_repr(self) -> str:
        return f"factor={self.factor}, kernel={self.kernel!r}, sigma_y={self.sigma_y_setting}"


def _fold_replicated_border(padded: Tensor, pad: int) -> Tensor:
    """Adjoint of replicate padding by `pad` on (N, 1, H + 2 pad, W + 2 pad): the border is
    added back onto the edge row or column it copied."""
    if pad == 0:
        return padded
    columns = padded[..., pad:-pad].clone()
    columns[..., 0] += padded[..., :pad].sum(-1)
    columns[..., -1] += padded[..., -pad:].sum(-1)
    image = columns[..., pad:-pad, :].clone()
    image[..., 0, :] += columns[..., :pad, :].sum(-2)
    image[..., -1, :] += columns[..., -pad:, :].sum(-2)
    return image
