"""A dense matrix forward model y = M x + sigma_y * n for vectors x of shape (d,)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, Shape
from .linalg import per_sample


class MatrixOperator(LinearOperator):
    """y = M x + sigma_y * n with a dense (m, d) matrix M, x of shape (B, d), y of shape (B, m).

    The regularised solve (sigma_y^2 I + r M M^T) v = u is done directly (m x m systems), so it
    is exact whatever the structure of M.
    """

    def __init__(self, matrix: Tensor, sigma_y: float = 0.0):
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

    def solve(self, u: Tensor, r: Tensor | float, *, tol: float = 1e-6, max_iter: int = 200) -> Tensor:
        m = self.matrix.to(u.dtype)
        gram = m @ m.T
        eye = torch.eye(gram.shape[0], dtype=u.dtype, device=u.device)
        systems = self.sigma_y**2 * eye + per_sample(r, u)[..., None] * gram if isinstance(r, Tensor) and r.dim() > 0 \
            else self.sigma_y**2 * eye + r * gram
        return torch.linalg.solve(systems, u.unsqueeze(-1)).squeeze(-1)

    def log_det(self, r: Tensor | float, y_like: Tensor) -> Tensor:
        m = self.matrix.to(y_like.dtype)
        eigenvalues = torch.linalg.eigvalsh(m @ m.T)  # (m,)
        r = torch.as_tensor(r, dtype=y_like.dtype, device=y_like.device).reshape(-1, 1)  # scalar or (B,)
        variance = (self.sigma_y**2 + r * eigenvalues).expand(y_like.shape[0], -1)  # (B, m)
        return variance.clamp_min(torch.finfo(y_like.dtype).tiny).log().sum(1)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.matrix.shape)}, sigma_y={self.sigma_y}"
