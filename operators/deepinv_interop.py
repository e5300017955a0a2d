"""deepinv physics <-> our operators.

deepinv's `LinearPhysics` has the same vocabulary as `LinearOperator` (`A`, `A_adjoint`, a
Gaussian `noise_model.sigma`) and the same units: images in [0, 1], sigma_y in those units.
So the adapters convert nothing; they only re-wrap:

    operator = from_deepinv(physics)     # a LinearOperator calling physics.A / physics.A_adjoint
    physics = operator.to_deepinv()      # a deepinv LinearPhysics calling operator.A / A_adjoint

`restore()` accepts a deepinv physics directly (it calls `as_operator`). deepinv is imported
only when one of its objects is met or asked for.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, Shape


def deepinv_classes(obj) -> list[type]:
    """The classes in type(obj)'s MRO that deepinv defines (checked without importing deepinv)."""
    return [cls for cls in type(obj).__mro__ if cls.__module__ == "deepinv" or cls.__module__.startswith("deepinv.")]


def is_deepinv_physics(obj) -> bool:
    """True for a deepinv Physics object (checked without importing deepinv)."""
    return any(cls.__name__ == "Physics" for cls in deepinv_classes(obj))


class DeepinvOperator(LinearOperator):
    """A deepinv `LinearPhysics` with Gaussian noise as a LinearOperator.

    Args:
        physics: a `deepinv.physics.LinearPhysics` (Denoising, Inpainting, Downsampling, Blur,
            a custom LinearPhysics, ...) whose noise model is `GaussianNoise` with a scalar sigma_y
            (or no noise model: sigma_y = 0).

    Shapes are found by applying A (or A^T) to zeros, so any deepinv linear operator works.
    Denoising and Inpainting keep their closed-form solve (A A^T is diagonal); the others use
    conjugate gradient.
    """

    def __init__(self, physics):
        import deepinv

        if not isinstance(physics, deepinv.physics.LinearPhysics):
            raise TypeError(f"physics must be a deepinv.physics.LinearPhysics, got {type(physics).__name__}")
        noise = getattr(physics, "noise_model", None)
        if isinstance(noise, deepinv.physics.GaussianNoise):
            sigma_y = torch.as_tensor(noise.sigma).detach().flatten()
            if sigma_y.numel() != 1:
                raise ValueError(f"physics.noise_model.sigma must be one number, got {sigma_y.numel()} values")
            sigma_y = float(sigma_y)
        elif noise is None or type(noise).__name__ == "ZeroNoise":
            sigma_y = 0.0
        else:
            raise ValueError(f"physics.noise_model must be deepinv.physics.GaussianNoise, got {type(noise).__name__}")
        super().__init__(sigma_y)
        self.physics = physics

    def A(self, x: Tensor) -> Tensor:
        return self.physics.A(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.physics.A_adjoint(y)

    def _probe(self, function, shape: Sequence[int], name: str) -> Shape:
        reference = next((t for t in self.physics.buffers() if t.is_floating_point()), None)
        zeros = torch.zeros((1, *shape), device=reference.device if reference is not None else None)
        try:
            return tuple(function(zeros).shape[1:])
        except (RuntimeError, ValueError, IndexError) as error:
            raise ValueError(f"{name} of shape {tuple(shape)} does not fit {type(self.physics).__name__}: {error}") from None

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        return self._probe(self.physics.A, x_shape, "x")

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        return self._probe(self.physics.A_adjoint, y_shape, "y")

    def gram_diagonal(self, y_like: Tensor) -> Tensor | None:
        import deepinv

        if isinstance(self.physics, deepinv.physics.Inpainting):
            return self.physics.mask.to(y_like) ** 2
        if isinstance(self.physics, deepinv.physics.Denoising):
            return torch.ones((), dtype=y_like.dtype, device=y_like.device)
        return None

    def to_deepinv(self):
        return self.physics


def from_deepinv(physics) -> DeepinvOperator:
    """A LinearOperator from a deepinv LinearPhysics with Gaussian noise (see DeepinvOperator)."""
    return DeepinvOperator(physics)


def to_deepinv(operator: LinearOperator):
    """A deepinv `LinearPhysics` with A, A^T and Gaussian noise sigma_y taken from `operator`
    (`LinearOperator.to_deepinv`; the wrapped physics itself for a `DeepinvOperator`)."""
    return operator.to_deepinv()


def as_operator(operator) -> LinearOperator:
    """`operator` itself if it is a LinearOperator, adapted if it is a deepinv physics."""
    if isinstance(operator, LinearOperator):
        return operator
    if is_deepinv_physics(operator):
        return from_deepinv(operator)
    raise TypeError(f"operator must be an operators.LinearOperator or a deepinv LinearPhysics, got {type(operator).__name__}")
