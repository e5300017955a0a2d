"""Linear forward models y = A x + sigma_y * n, n ~ N(0, I).

Tensors are batch-first: x has shape (B, *x_shape) and y = A x has shape (B, *y_shape).
An operator is a torch Module so `.to(device)` moves its buffers (masks, matrices).

Besides A and its adjoint, an operator offers the solve the averaged likelihood needs,

    (sigma_y^2 I + r A A^T) v = u,

in closed form where A A^T is diagonal (denoising, inpainting, average-pool
super-resolution, dense matrices) and by conjugate gradient otherwise.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .linalg import conjugate_gradient, per_sample

Shape = tuple[int, ...]
AUTO = "auto"  # sigma_y="auto": estimated from the measurement (posterior_diff.noise_estimate)


def check_sigma_y(sigma_y: float | str, *, auto: bool = False) -> float | str:
    """Validate a measurement noise level sigma_y (>= 0, finite) and return it as float; with
    `auto`, the string "auto" (sigma_y estimated from y later) is accepted and returned as it is."""
    if auto and isinstance(sigma_y, str) and sigma_y == AUTO:
        return AUTO
    either = ' or "auto"' if auto else ""
    try:
        value = float(sigma_y)
    except (TypeError, ValueError):
        raise TypeError(f"sigma_y must be a non-negative number{either}, got {sigma_y!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0{either}, got {sigma_y!r}")
    return value


class NoiseView(NamedTuple):
    """Where a measurement shows its noise: the image a noise estimator reads
    (`posterior_diff.noise_estimate`), and which of its entries carry the noise.

    Attributes:
        image: (C, h, w), entries A x + sigma_y n, in the units of y.
        observed: (C, h, w) of 0/1, 1 where the entry carries the measurement noise (inpainting:
            the observed pixels); None where every entry does.
    """

    image: Tensor
    observed: Tensor | None = None


class LinearOperator(nn.Module):
    """A linear forward model with Gaussian noise of standard deviation `sigma_y`.

    sigma_y may be "auto": `restore` then estimates it from y before sampling
    (`posterior_diff.noise_estimate`, from the entries `noise_view` names); until then the
    operator cannot measure, solve or convert, and says so.

    Subclasses implement `A`, `A_adjoint` and `y_shape`/`x_shape`; they override
    `solve` when (sigma_y^2 I + r A A^T) has a closed-form inverse and `gram_diagonal` is
    not enough.
    """

    def __init__(self, sigma_y: float | str = 0.0):
        super().__init__()
        self.sigma_y = check_sigma_y(sigma_y, auto=True)

    # -- the noise level ----------------------------------------------------------------
    @property
    def sigma_y(self) -> float:
        """The measurement noise standard deviation, in the units of y. An operator built with
        sigma_y="auto" has none until it is estimated: reading it raises a ValueError that says how."""
        value = self.__dict__["_sigma_y"]
        if isinstance(value, str) and value == AUTO:
            raise ValueError(f"{type(self).__name__} has sigma_y='auto', a noise level to be estimated from a "
                             "measurement: pass the operator to restore (which estimates sigma_y from y before "
                             "sampling), or estimate it with posterior_diff.estimate_sigma_y(y, operator) and use "
                             "operator.with_sigma_y(value)")
        return value

    @sigma_y.setter
    def sigma_y(self, value: float | str) -> None:
        # Stored as given: restore checks it again (an attribute set after construction too).
        self.__dict__["_sigma_y"] = value

    @property
    def sigma_y_setting(self) -> float | str:
        """sigma_y as it was set: a number, or "auto" before estimation (never raises)."""
        return self.__dict__["_sigma_y"]

    def noise_view(self, y: Tensor) -> NoiseView:
        """The part of one measurement y (y_shape, no batch) where its noise can be seen, for
        estimating sigma_y (`posterior_diff.noise_estimate`).

        By default y itself, as an image (C, h, w) (an (h, w) y gets one channel): the noise is
        added after A, so every entry of y carries it (denoising: y; super-resolution: the small
        image; a blur: the blurred image). Operators whose y has entries without noise override
        this (inpainting: the holes); a y that is no image is a ValueError naming sigma_y.
        """
        if y.dim() == 2:
            return NoiseView(y[None])
        if y.dim() == 3:
            return NoiseView(y)
        raise ValueError(f"sigma_y='auto' is estimated from an image measurement (C, h, w) or (h, w), but "
                         f"{type(self).__name__} gives y of shape {tuple(y.shape)}: pass sigma_y as a number")

    # -- the forward model ------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        """Apply A to x of shape (B, *x_shape); returns (B, *y_shape)."""
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Apply A^T to y of shape (B, *y_shape); returns (B, *x_shape)."""
        raise NotImplementedError

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        """y_shape for one x of shape `x_shape` (no batch); ValueError if A cannot act on it."""
        raise NotImplementedError

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        """x_shape that produces one measurement of shape `y_shape` (no batch)."""
        raise NotImplementedError

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw y = A x + sigma_y * n for x of shape (B, *x_shape)."""
        clean = self.A(x)
        if self.sigma_y == 0:
            return clean
        return clean + self.sigma_y * self.noise_like(clean, generator)

    def noise_like(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise in measurement space, shape of y (drawn on the generator's device)."""
        device = generator.device if generator is not None else y.device
        noise = torch.randn(y.shape, generator=generator, device=device, dtype=y.dtype)
        return noise.to(y.device)

    # -- the solve the averaged likelihood needs --------------------------------------
    def gram_diagonal(self, y_like: Tensor) -> Tensor | None:
        """The diagonal of A A^T as a tensor broadcastable to y, when A A^T is diagonal; else None.

        Operators whose A A^T is diagonal return it here and inherit a closed-form `solve`.
        """
        return None

    def log_det(self, r: Tensor | float, y_like: Tensor) -> Tensor | None:
        """log det(sigma_y^2 I + r A A^T) per sample, shape (B,), where it is cheap (A A^T diagonal);
        None otherwise. y_like: (B, *y_shape). Entries of zero variance are left out, as in `solve`."""
        gram = self.gram_diagonal(y_like)
        if gram is None:
            return None
        variance = (self.sigma_y**2 + per_sample(r, y_like) * gram).expand_as(y_like)
        logs = torch.where(variance > 0, variance.clamp_min(torch.finfo(variance.dtype).tiny).log(), 0.0)
        return logs.flatten(1).sum(1)

    @property
    def is_identity(self) -> bool:
        """Whether A is the identity (pure denoising): y = x + sigma_y n is then itself a point
        of the diffusion's forward process, which `restore` can start from (`start`)."""
        return False

    @property
    def has_closed_form_solve(self) -> bool:
        """True when `solve` is exact and costs no iterations (A A^T diagonal, or overridden)."""
        overridden = type(self).solve is not LinearOperator.solve
        return overridden or self.gram_diagonal(torch.zeros(1)) is not None

    def solve(self, u: Tensor, r: Tensor | float, *, tol: float = 1e-6, max_iter: int = 200) -> Tensor:
        """Solve (sigma_y^2 I + r A A^T) v = u for v.

        Args:
            u: right-hand side in measurement space, shape (B, *y_shape).
            r: scalar or per-sample tensor of shape (B,), r >= 0.
            tol, max_iter: conjugate-gradient settings, used only without a closed form.
        Returns:
            v, shape (B, *y_shape). Components where sigma_y^2 + r (A A^T)_ii = 0 carry no
            information (for example the holes of an inpainting mask) and get v = 0.
        """
        gram = self.gram_diagonal(u)
        if gram is None:
            return self.solve_cg(u, r, tol=tol, max_iter=max_iter)
        denominator = self.sigma_y**2 + per_sample(r, u) * gram
        return torch.where(denominator > 0, u / torch.where(denominator > 0, denominator, 1.0), 0.0)

    def solve_cg(self, u: Tensor, r: Tensor | float, *, tol: float = 1e-6, max_iter: int = 200) -> Tensor:
        """Solve (sigma_y^2 I + r A A^T) v = u by conjugate gradient (any operator)."""
        r_b = per_sample(r, u)

        def matvec(v: Tensor) -> Tensor:
            return self.sigma_y**2 * v + r_b * self.A(self.A_adjoint(v))

        solution, _ = conjugate_gradient(matvec, u, tol=tol, max_iter=max_iter)
        return solution

    def with_sigma_y(self, sigma_y: float | str) -> "LinearOperator":
        """The same forward model with noise level `sigma_y` (a number, or "auto"); this operator
        is not modified.

        The copy shares the tensors of A (masks, matrices) instead of duplicating them: both
        keep their own buffer tables, so moving either with `.to()` leaves the other where it
        was. Operators with submodules are copied whole.
        """
        if self._modules:
            clone = copy.deepcopy(self)
        else:
            clone = copy.copy(self)
            for table in ("_parameters", "_buffers"):
                clone.__dict__[table] = dict(self.__dict__[table])
        clone.sigma_y = check_sigma_y(sigma_y, auto=True)
        return clone

    def to_deepinv(self):
        """This operator as a `deepinv.physics.LinearPhysics` calling its A and A^T, with Gaussian
        noise sigma_y (needs deepinv). An operator that wraps a physics (`DeepinvOperator`) gives
        that physics back."""
        import deepinv

        return deepinv.physics.LinearPhysics(A=self.A, A_adjoint=self.A_adjoint,
                                             noise_model=deepinv.physics.GaussianNoise(sigma=self.sigma_y))

    # -- helpers ------------------------------------------------------------------------
    def to_matrix(self, x_shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense matrix of A for inputs of shape `x_shape`: (prod y_shape, prod x_shape)."""
        x_shape = tuple(x_shape)
        d = math.prod(x_shape)
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        basis = torch.eye(d, dtype=dtype, device=device).reshape(d, *x_shape)
        return self.A(basis).reshape(d, -1).T

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise ValueError naming `name` unless x of shape (B, *x_shape) fits this operator."""
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch dimension, got a scalar")
        self.y_shape(tuple(x.shape[1:]))

    def extra_repr(self) -> str:
        return f"sigma_y={self.sigma_y_setting}"
