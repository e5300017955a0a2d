"""deepinv 0.5's diffusion posterior samplers, run on our problems with our priors.

The prior reaches deepinv through `Denoiser.to_deepinv()` (its variance-exploding contract, in
[0, 1] units for image models), the forward model through `LinearOperator.to_deepinv()`. Each
method is run as deepinv's documentation runs it:

| method    | deepinv                                                                                  |
|-----------|------------------------------------------------------------------------------------------|
| dps       | PosteriorDiffusion + DPSDataFidelity(guidance="annealed", weight 1)                      |
| pigdm     | PosteriorDiffusion + PiGDMDataFidelity (CG cap 3, its default)                            |
| mm        | PosteriorDiffusion + MomentMatchingDataFidelity (CG cap 3, its default)                   |
| mm-cg     | the same with CG run to convergence (cap = measurement size, at most 100; tol 1e-6)       |
| ddrm      | DDRM on an SVD of A (deepinv's Denoising / Inpainting, else a dense SVD for small problems); sigmas log-spaced from sigma_max to 1e-3, then 0 |
| diffpir   | DiffPIR with its default zeta and lambda (images only: it clamps x_0 to [0, 1])           |
| dpir      | `run_dpir`: DPIR (half-quadratic splitting, plug-and-play), a point estimate; its own 8 iterations |

PosteriorDiffusion uses the variance-exploding SDE (sigma_max 80, reverse SDE, alpha = 1) and
Euler–Maruyama on a uniform grid ending at t = 1e-3. Every method is given the same number of
network evaluations (NFE) as ours: `steps - 1` Euler steps plus the final denoising, or
`steps` DDRM / DiffPIR iterations. NFE is counted, not assumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import deepinv
import numpy as np
import torch
from deepinv.optim import DPIR
from deepinv.sampling import (DDRM, DiffPIR, DPSDataFidelity, EulerSolver, MomentMatchingDataFidelity,
                              PiGDMDataFidelity, PosteriorDiffusion, VarianceExplodingDiffusion)
from torch import Tensor

from operators import Denoising, Inpainting, LinearOperator
from posterior_diff import Denoiser

PEER_METHODS = ("dps", "pigdm", "mm", "mm-cg", "ddrm", "diffpir")
# deepinv methods without a backward pass (0 VJPs); the others take one or more VJPs per step, not counted here
JACOBIAN_FREE_METHODS = ("ddrm", "diffpir", "dpir")
SIGMA_MAX = 80.0
SIGMA_MIN = 1e-3
MAX_DENSE_SVD = 4096  # unknowns up to which DDRM gets a dense SVD of A


def peer_vjps(method: str) -> float:
    """A deepinv method's VJPs per run: 0 for the Jacobian-free ones, NaN (not counted) for the others."""
    return 0 if method in JACOBIAN_FREE_METHODS else math.nan


@dataclass
class PeerRun:
    """Samples (N, *x_shape) in the units of y, network forward evaluations per batch, seconds."""

    samples: Tensor
    nfe: int
    seconds: float


class CountingDenoiser(deepinv.models.Denoiser):
    """Counts the forward evaluations of a deepinv denoiser (each is one network evaluation)."""

    def __init__(self, denoiser: deepinv.models.Denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.calls = 0

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma)


class SVDPhysics(deepinv.physics.DecomposablePhysics):
    """A = U diag(s) V^T from the dense matrix of a small operator, for DDRM (x of any shape)."""

    def __init__(self, operator: LinearOperator, x_shape: tuple[int, ...]):
        matrix = operator.to_matrix(x_shape, dtype=torch.float64)
        left, singular, right_t = torch.linalg.svd(matrix, full_matrices=True)
        m, d = matrix.shape
        rank = min(m, d)
        mask = torch.zeros(1, d, dtype=torch.float32)
        mask[0, :rank] = singular[:rank].float()
        super().__init__(mask=mask.reshape(1, *x_shape), noise_model=deepinv.physics.GaussianNoise(sigma=operator.sigma_y))
        self.x_shape, self.y_shape, self.m, self.d = x_shape, operator.y_shape(x_shape), m, d
        self.register_buffer("left", left.float())
        self.register_buffer("right", right_t.T.float())

    def V_adjoint(self, x: Tensor) -> Tensor:
        return (x.flatten(1) @ self.right.to(x.dtype)).reshape(x.shape[0], *self.x_shape)

    def V(self, z: Tensor, **kwargs) -> Tensor:
        return (z.flatten(1) @ self.right.to(z.dtype).T).reshape(z.shape[0], *self.x_shape)

    def U(self, z: Tensor) -> Tensor:
        return (z.flatten(1)[:, : self.m] @ self.left.to(z.dtype).T).reshape(z.shape[0], *self.y_shape)

    def U_adjoint(self, y: Tensor, **kwargs) -> Tensor:
        z = y.flatten(1) @ self.left.to(y.dtype)
        z = torch.cat([z, z.new_zeros(z.shape[0], self.d - z.shape[1])], dim=1) if self.d > z.shape[1] else z[:, : self.d]
        return z.reshape(y.shape[0], *self.x_shape)


def decomposable_physics(operator: LinearOperator, x_shape: tuple[int, ...]):
    """The operator as a deepinv DecomposablePhysics (what DDRM needs): deepinv's own Denoising and
    Inpainting, or a dense SVD for small problems.

    Raises:
        ValueError: for large operators without a known SVD (e.g. super-resolution of an image).
    """
    noise = deepinv.physics.GaussianNoise(sigma=operator.sigma_y)
    if isinstance(operator, Denoising):
        return deepinv.physics.Denoising(noise_model=noise)
    if isinstance(operator, Inpainting):
        return deepinv.physics.Inpainting(img_size=x_shape, mask=operator.mask.float(), noise_model=noise)
    if math.prod(x_shape) > MAX_DENSE_SVD:
        raise ValueError(f"ddrm needs an SVD of A; none is known for {type(operator).__name__} at {math.prod(x_shape)} unknowns")
    return SVDPhysics(operator, x_shape)


def _fidelity(method: str, measurement_size: int):
    if method == "dps":
        return DPSDataFidelity(guidance="annealed")
    if method == "pigdm":
        return PiGDMDataFidelity()
    if method == "mm":
        return MomentMatchingDataFidelity()
    return MomentMatchingDataFidelity(cg_max_iter=min(measurement_size, 100), cg_tol=1e-6)


def run_peer(method: str, model: Denoiser, operator: LinearOperator, y: Tensor, num_samples: int, steps: int,
             seed: int = 0) -> PeerRun:
    """Draw `num_samples` posterior samples of x given one y with a deepinv method.

    Args:
        method: one of PEER_METHODS.
        model: our prior (any Denoiser); image models take y in [0, 1].
        operator: the forward model, sigma_y in the units of y.
        y: one measurement, shape y_shape.
        steps: network evaluations per sample (the same budget as ours).
        seed: seeds deepinv's solver generator (PosteriorDiffusion) or the global RNG (DDRM, DiffPIR).
    """
    if method not in PEER_METHODS:
        raise ValueError(f"method must be one of {PEER_METHODS}, got {method!r}")
    image_model = model.data_range is not None
    if method == "diffpir" and not image_model:
        raise ValueError("diffpir clamps x_0 to [0, 1]: it is run on image models only")
    x_shape = operator.x_shape(tuple(y.shape))
    denoiser = CountingDenoiser(model.to_deepinv())
    y_batch = y.float().expand(num_samples, *y.shape).contiguous()
    start = time.perf_counter()
    if method == "ddrm":
        sigmas = np.concatenate([np.geomspace(SIGMA_MAX / (1 if image_model else 2), SIGMA_MIN, steps - 1), [0.0]])
        physics = decomposable_physics(operator, x_shape)
        torch.manual_seed(seed)
        with torch.no_grad():
            samples = DDRM(denoiser, sigmas=sigmas)(y_batch, physics)
    elif method == "diffpir":
        torch.manual_seed(seed)
        sampler = DiffPIR(denoiser, deepinv.optim.L2(), sigma=max(operator.sigma_y, 1e-3), max_iter=steps)
        samples = sampler(y_batch, operator.to_deepinv())
    else:
        physics = operator.to_deepinv()
        timesteps = torch.linspace(1.0, SIGMA_MIN, steps, dtype=torch.float64)  # steps - 1 Euler steps
        solver = EulerSolver(timesteps=timesteps, rng=torch.Generator().manual_seed(seed))
        sde = VarianceExplodingDiffusion(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, alpha=1.0, dtype=torch.float64)
        sampler = PosteriorDiffusion(data_fidelity=_fidelity(method, math.prod(y.shape)), denoiser=denoiser, sde=sde,
                                     solver=solver, dtype=torch.float64, minus_one_one=image_model)
        samples = sampler(y_batch, physics, x_init=(num_samples, *x_shape), seed=seed)
    seconds = time.perf_counter() - start
    samples = samples.detach().to(y.dtype)
    if image_model:
        samples = samples.clamp(0, 1)
    return PeerRun(samples, denoiser.calls, seconds)


def run_dpir(model: Denoiser, operator: LinearOperator, y: Tensor) -> PeerRun:
    """deepinv's DPIR with `model` as its denoiser (through `Denoiser.to_deepinv()`): a point estimate.

    DPIR sets its own schedule from sigma_y: 8 half-quadratic-splitting iterations whose denoiser
    levels fall geometrically from 49/255 to sigma_y (deepinv's `get_DPIR_params`), each one network
    evaluation. Its estimate is returned as one "sample" (1, *x_shape), clamped to [0, 1].
    """
    if model.data_range is None:
        raise ValueError("dpir is run on image models only")
    denoiser = CountingDenoiser(model.to_deepinv())
    start = time.perf_counter()
    with torch.no_grad():
        estimate = DPIR(sigma=max(operator.sigma_y, 1e-3), denoiser=denoiser)(y.float()[None], operator.to_deepinv())
    return PeerRun(estimate.detach().to(y.dtype).clamp(0, 1), denoiser.calls, time.perf_counter() - start)
