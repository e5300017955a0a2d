"""Denoising: A = I, so y = x + sigma_y * n and A A^T = I."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, Shape


class Denoising(LinearOperator):
    """The identity forward model with Gaussian noise of standard deviation `sigma_y`.

    Acts on x of any shape (B, *x_shape); y has the same shape. sigma_y may be "auto"
    (estimated by `restore` from all of y).
    """

    @property
    def is_identity(self) -> bool:
        return True

    def A(self, x: Tensor) -> Tensor:
        return x

    def A_adjoint(self, y: Tensor) -> Tensor:
        return y

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        return tuple(x_shape)

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        return tuple(y_shape)

    def gram_diagonal(self, y_like: Tensor) -> Tensor:
        return torch.ones((), dtype=y_like.dtype, device=y_like.device)
