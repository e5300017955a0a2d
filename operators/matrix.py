"""A dense matrix forward model y = M x + sigma_y * n for vectors x of shape (d,)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import AUTO, LinearOperator, Shape
from .linalg import per_sample


class MatrixOperator(LinearOperator):
    """y = M x + sigma_y * n with a dense (m, d) matrix M, x of shape (B, d), y of shape (B, m).

    The regularised solve (sigma_y^2 I + r M M^T) v = u is exact whatever the structure of M:
    M M^T is factored once into its eigenbasis (`gram_eigen`), so a solve for any r, one number
    or one per sample, is two products.
    """

    def __init__(self, matrix: Tensor, sigma_y: float = 0.0):
        if isinstance(sigma_y, str) and sigma_y == AUTO:
            raise ValueError('sigma_y="auto" is estimated from an image measurement, but a MatrixOperator measures a '
                             "vector y: pass sigma_y as a number")
        super().__init__(sigma_y)
        matrix = torch.as_tensor(matrix)
        if matrix.dim() != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
            raise ValueError(f"matrix must have shape (m, d), got {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            matrix = matrix.to(torch.get_default_dtype())
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix contains non-finite values")
        self.register_buffer("matrix", matrix)

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        if tuple(x_shape) != (self.matrix.shape[1],):
            raise ValueError(f"x must have shape ({self.matrix.shape[1]},) per sample, got {tuple(x_shape)}")
        return (self.matrix.shape[0],)

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        if tuple(y_shape) != (self.matrix.shape[0],):
            raise ValueError(f"y must have shape ({self.matrix.shape[0]},) per sample, got {tuple(y_shape)}")
        return (self.matrix.shape[1],)

    def A(self, x: Tensor) -> Tensor:
        self.y_shape(x.shape[1:])
        return x @ self.matrix.to(x.dtype).T

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.x_shape(y.shape[1:])
        return y @ self.matrix.to(y.dtype)

    def gram_eigen(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The eigendecomposition M M^T = Q diag(lambda) Q^T: lambda (m,) and Q (m, m), in dtype on device.

        M M^T never changes, so it is factored once (in float64, then cast) and cached per
        dtype and device: every solve and log det after that costs two (B, m) x (m, m) products.
        """
        key = (dtype, device, self.matrix.device, self.matrix.data_ptr(), self.matrix._version)
        cache = self.__dict__.setdefault("_gram_eigen", {})
        if key not in cache:
            m = self.matrix.to(torch.float64)
            eigenvalues, eigenvectors = torch.linalg.eigh(m @ m.T)
            # M M^T is positive semi-definite: a negative eigenvalue is rounding of a zero one
            eigenvalues = eigenvalues.clamp_min(0)
            cache[key] = (eigenvalues.to(dtype=dtype, device=device), eigenvectors.to(dtype=dtype, device=device))
        return cache[key]

    def solve(self, u: Tensor, r: Tensor | float, *, tol: float = 1e-6, max_iter: int = 200) -> Tensor:
        """(sigma_y^2 I + r M M^T)^{-1} u for u (B, m), r a float or (B,): exact, in the eigenbasis of M M^T."""
        eigenvalues, eigenvectors = self.gram_eigen(u.dtype, u.device)
        if self.sigma_y == 0 and bool((eigenvalues == 0).any()):
            raise ValueError("sigma_y = 0 with a rank-deficient matrix: sigma_y^2 I + r M M^T is singular")
        variance = self.sigma_y**2 + per_sample(r, u) * eigenvalues  # (m,) or (B, m)
        return ((u @ eigenvectors) / variance) @ eigenvectors.T

    def log_det(self, r: Tensor | float, y_like: Tensor) -> Tensor:
        eigenvalues, _ = self.gram_eigen(y_like.dtype, y_like.device)
        r = torch.as_tensor(r, dtype=y_like.dtype, device=y_like.device).reshape(-1, 1)  # scalar or (B,)
        variance = (self.sigma_y**2 + r * eigenvalues).expand(y_like.shape[0], -1)  # (B, m)
        return variance.clamp_min(torch.finfo(y_like.dtype).tiny).log().sum(1)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.matrix.shape)}, sigma_y={self.sigma_y_setting}"
