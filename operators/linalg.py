"""Batched conjugate gradient for symmetric positive-definite systems.

Solves M v = b independently for every sample of a batch: b has shape (B, *), M acts
sample-wise (its action on sample i depends on sample i only), and every inner product,
step length and stopping test is taken per sample. A sample stops changing once its
relative residual ||b - M v|| / ||b|| falls under `tol` (or its residual norm under `atol`);
the loop stops when every sample has, or after `max_iter` iterations.

A learned M (a network's Jacobian inside it) is only nearly symmetric and positive definite,
and there CG's residual can grow by orders of magnitude instead of shrinking. The residual
b - M v stays exact for any linear M, so the solve keeps, per sample, the iterate with the
smallest residual norm met so far, returns that one, and stops a sample whose residual has
grown past DIVERGENCE_FACTOR times its smallest: for a symmetric positive-definite M that is
the last iterate but in rare bumps, and elsewhere never worse than the starting guess.

A caller whose matrix-vector product passes through a cheaper linear map G on its way
(M = sigma^2 I + A G, say) can have G v carried along: with `with_image=True` the matvec
returns the pair (M v, G v), and the solve also returns G v for the solution v, accumulated
from the products it made, at no extra application of G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
# A residual norm this many times the smallest one met means the iteration diverges (CG's
# residual on an ill-conditioned symmetric positive-definite system bumps up by tens, not thousands).
DIVERGENCE_FACTOR = 1e3


@dataclass
class CGInfo:
    """What a conjugate-gradient solve did.

    iterations: matrix-vector products spent (one per iteration, shared by the batch).
    relative_residual: ||b - M v|| / ||b|| per sample, shape (B,).
    image: G v for the solution v when the solve ran `with_image` (None otherwise, and None
        when no product was made: v = 0 then, and so is G v).
    converged: per sample, shape (B,), whether the returned v meets the stopping rule
        (||b - M v|| <= max(tol ||b||, atol), the very test the loop stops on). False where the
        cap, the curvature test or the divergence guard stopped the sample first.
    """

    iterations: int
    relative_residual: Tensor
    image: Tensor | None = None
    converged: Tensor | None = None


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product <a_i, b_i> of two (B, *) tensors, shape (B,)."""
    return (a * b).flatten(1).sum(dim=1)


def per_sample(values: Tensor | float, like: Tensor) -> Tensor | float:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so it broadcasts against `like` of shape (B, *).

    Floats and 0-d tensors pass through unchanged.
    """
    if isinstance(values, Tensor) and values.dim() > 0:
        if values.shape[0] != like.shape[0]:
            raise ValueError(f"got {values.shape[0]} per-sample values for a batch of {like.shape[0]}")
        return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
    return values


def conjugate_gradient(
    matvec: MatVec,
    b: Tensor,
    *,
    initial_guess: Tensor | None = None,
    preconditioner: MatVec | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int = 100,
    with_image: bool = False,
) -> tuple[Tensor, CGInfo]:
    """Solve M v = b per sample by (preconditioned) conjugate gradient.

    Args:
        matvec: v -> M v for a (B, *) tensor; M symmetric positive definite per sample. With
            `with_image`, v -> (M v, G v) for a linear map G (see the module docstring).
        b: right-hand side, shape (B, *).
        initial_guess: starting guess, shape (B, *); zeros when None. It costs one product.
        preconditioner: u -> P^{-1} u with P symmetric positive definite, or None.
        tol: relative residual ||b - M v|| / ||b|| at which a sample is done.
        atol: residual norm ||b - M v|| at which a sample is done (0: the relative rule only).
        max_iter: cap on matrix-vector products, the initial guess's included.
        with_image: carry G v along (returned as `CGInfo.image`).

    Returns:
        v of shape (B, *), the iterate with the smallest residual norm, and a CGInfo. A sample
        whose curvature p^T M p is not positive (M not positive definite along p, possible for
        a learned Jacobian), or whose residual grows past DIVERGENCE_FACTOR times its smallest,
        stops rather than diverging.
    """
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    precond = preconditioner if preconditioner is not None else (lambda u: u)
    product = matvec if with_image else (lambda v: (matvec(v), None))
    b_norm = batch_dot(b, b).sqrt()
    # A zero right-hand side is solved by zero: treat its norm as 1 to avoid 0/0.
    scale = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    threshold = torch.clamp(tol * scale, min=atol)

    def norm_of(residual: Tensor) -> Tensor:
        return batch_dot(residual, residual).sqrt()

    if initial_guess is None:
        x, residual, image, iterations = torch.zeros_like(b), b.clone(), None, 0
    else:
        x = initial_guess.clone()
        m_x, image = product(x)
        residual, iterations = b - m_x, 1
    residual_norm = norm_of(residual)  # one per iteration: the guard and the stopping test share it
    best = _Best(x, residual_norm, image)
    z = precond(residual)
    direction = z.clone()
    rz = batch_dot(residual, z)
    active = residual_norm > threshold
    while bool(active.any()) and iterations < max_iter:
        m_dir, g_dir = product(direction)
        iterations += 1
        curvature = batch_dot(direction, m_dir)
        active = active & (curvature > 0)
        step = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
        x = x + per_sample(step, x) * direction
        if with_image:
            image = per_sample(step, g_dir) * g_dir + (0 if image is None else image)
        residual = residual - per_sample(step, x) * m_dir
        residual_norm = norm_of(residual)
        active = active & best.update(x, residual_norm, image)
        z = precond(residual)
        rz_new = batch_dot(residual, z)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), 0.0)
        direction = z + per_sample(beta, x) * direction
        rz = rz_new
        active = active & (residual_norm > threshold)
    # A sample leaves the loop through the rule once its residual norm is <= threshold, and its
    # best norm is then <= threshold too; a sample stopped otherwise never met it (or it would
    # have stopped there), so this is the loop's own test (a NaN residual, which also ends the
    # loop, counts as not converged).
    converged = best.norm <= threshold
    return best.x, CGInfo(iterations=iterations, relative_residual=best.norm / scale, image=best.image,
                          converged=converged)


class _Best:
    """Per sample, the iterate v (and G v) with the smallest residual norm ||b - M v|| met so far."""

    def __init__(self, x: Tensor, norm: Tensor, image: Tensor | None):
        self.x, self.norm, self.image = x, norm, image

    def update(self, x: Tensor, norm: Tensor, image: Tensor | None) -> Tensor:
        """Keep the new iterate where its residual norm `norm` (B,) is smaller; returns, per
        sample, whether the iteration may go on (under DIVERGENCE_FACTOR times the smallest)."""
        better = norm < self.norm
        self.x = torch.where(per_sample(better, x), x, self.x)
        if image is not None:  # a None image is that of v = 0: zeros
            kept = torch.zeros_like(image) if self.image is None else self.image
            self.image = torch.where(per_sample(better, image), image, kept)
        self.norm = torch.minimum(norm, self.norm)
        return norm <= DIVERGENCE_FACTOR * self.norm

