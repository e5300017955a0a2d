"""Deblurring: y = k * x + sigma_y * n, the circular convolution of each (H, W) plane with a kernel k.

The kernel is a (k, k) tensor, k odd, non-negative and summing to 1, the same for every
channel; its centre is the entry (k // 2, k // 2), and `*` is a true convolution (the kernel
is flipped, as deepinv's and scikit-image's are), not the cross-correlation of torch's conv2d.

Boundary: circular. The image is taken to repeat periodically, so a pixel near the right edge
is blurred with the pixels near the left edge. A is then diagonalised by the 2-D discrete
Fourier transform: A = F^-1 diag(K) F with K the transform of the kernel centred at the
origin, A^T = F^-1 diag(conj K) F, and A A^T = F^-1 diag(|K|^2) F. The regularised solve
the averaged likelihood needs,

    (sigma_y^2 I + r A A^T) v = u   =>   v = F^-1 [ F u / (sigma_y^2 + r |K|^2) ],

and its log det, sum_f log(sigma_y^2 + r |K_f|^2) per plane, are closed form: no conjugate
gradient, two FFTs per solve. deepinv's `BlurFFT` (and `Blur(padding="circular")`) is the same
operator (`Blur.to_deepinv`).

Kernels: `gaussian_kernel(std)`, `box_kernel(size)`, `motion_kernel(size, seed)` (deepinv's
`MotionBlurGenerator`; needs the deepinv extra), and `kernel_from_spec("gaussian:2")` for the
command line's and the task table's kernel names.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, Shape
from .linalg import per_sample

KERNEL_SPECS = "gaussian:STD, box:SIZE or motion:SIZE[:SEED]"
# Spectra kept per operator: one per image size, dtype and device met (a dataset run meets a few sizes).
SPECTRUM_CACHE_SIZE = 8


def check_kernel(kernel) -> Tensor:
    """`kernel` as a floating (k, k) tensor, k odd, finite, non-negative and summing to 1; a ValueError
    naming `kernel` otherwise. Integer tensors become the default dtype."""
    kernel = torch.as_tensor(kernel)
    if not kernel.is_floating_point():
        kernel = kernel.to(torch.get_default_dtype())
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"kernel must be a square (k, k) tensor with k odd (its centre is the entry (k // 2, k // 2)), "
                         f"got shape {tuple(kernel.shape)}")
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError("kernel contains non-finite values")
    if bool((kernel < 0).any()):
        raise ValueError(f"kernel must be non-negative, got a smallest entry of {float(kernel.min()):.3g}")
    total = float(kernel.double().sum())
    # A kernel normalised by its own sum in float32 (a PNG, a numpy array, one of the functions below
    # cast to float32) is off from 1 by the rounding of that sum: at most (n - 1) eps for n entries
    # summed one after the other (Higham, Accuracy and Stability, §4.2), 1e-4 for 31 x 31. An
    # unnormalised kernel is off by far more (a 3 x 3 box of ones by 8).
    tolerance = kernel.numel() * torch.finfo(torch.float32).eps
    if not abs(total - 1) <= tolerance:
        raise ValueError(f"kernel must sum to 1 (a blur keeps the mean brightness), got a sum of {total:.9g}; "
                         "divide it by its sum")
    return kernel


class Blur(LinearOperator):
    """Circular convolution of every (H, W) plane of x with one kernel (see the module docstring).

    Args:
        kernel: (k, k) tensor, k odd, entries >= 0 summing to 1 (to float32 rounding); the same
            for every channel. Its centre is the entry (k // 2, k // 2).
        sigma_y: measurement noise standard deviation, >= 0, in the units of x, or "auto" (estimated by
            `restore` from y, all of which carries noise: see `noise_view`).

    x has shape (B, *lead, H, W) with H, W >= k, and y = A x has the same shape. The boundary is
    circular: the image repeats periodically, so A is diagonal in the 2-D Fourier basis and the
    solve of (sigma_y^2 I + r A A^T) and its log det are closed form.

    Raises:
        ValueError: a bad kernel (at construction), or an image smaller than the kernel (when the
            operator first meets its shape: `restore` asks `x_shape` / `y_shape` before any work).
    """

    def __init__(self, kernel: Tensor, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        self.register_buffer("kernel", check_kernel(kernel))

    @property
    def kernel_size(self) -> int:
        """k, the side of the (k, k) kernel."""
        return int(self.kernel.shape[-1])

    # -- shapes -----------------------------------------------------------------------
    def _check(self, shape: Sequence[int], what: str) -> Shape:
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"{what} must have at least two (H, W) dimensions per sample, got shape {shape}")
        k = self.kernel_size
        if shape[-2] < k or shape[-1] < k:
            raise ValueError(f"{what} has size {shape[-2]}x{shape[-1]}, smaller than the {k}x{k} blur kernel: a circular "
                             "convolution would wrap the kernel onto itself; use a smaller kernel or a larger image")
        return shape

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        return self._check(x_shape, "x")

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        return self._check(y_shape, "y")

    # -- the Fourier transform of the kernel ------------------------------------------
    def spectrum(self, size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(K, |K|^2) for images of `size` (H, W): K the real-input 2-D transform (torch.fft.rfft2) of the
        kernel centred at the origin, (H, W // 2 + 1) complex, and |K|^2 on the full (H, W) grid, real.

        Both are computed once per size, dtype and device (in float64, then cast) and cached; an
        in-place change of the kernel is seen. `dtype` is the real dtype of the images.
        """
        kernel = self.kernel
        key = (size, dtype, device, kernel.device, kernel.data_ptr(), kernel._version)
        cache = self.__dict__.setdefault("_spectra", {})
        if key not in cache:
            k, (H, W) = self.kernel_size, size
            padded = torch.zeros(H, W, dtype=torch.float64, device=kernel.device)
            padded[:k, :k] = kernel.double()
            centred = torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(0, 1))  # centre at (0, 0)
            half = torch.fft.rfft2(centred)
            power = torch.fft.fft2(centred).abs().square()
            complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
            if len(cache) >= SPECTRUM_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = (half.to(device=device, dtype=complex_dtype), power.to(device=device, dtype=dtype))
        return cache[key]

    def _filter(self, x: Tensor, adjoint: bool) -> Tensor:
        """F^-1 [K F x] (or conj K for the adjoint) on the last two dimensions of x."""
        size = tuple(x.shape[-2:])
        work = _fft_dtype(x.dtype)
        half, _ = self.spectrum(size, work, x.device)
        transfer = half.conj() if adjoint else half
        return torch.fft.irfft2(torch.fft.rfft2(x.to(work)) * transfer, s=size).to(x.dtype)

    # -- the forward model ------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        self.y_shape(x.shape[1:])
        return self._filter(x, adjoint=False)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.x_shape(y.shape[1:])
        return self._filter(y, adjoint=True)

    # -- the solve the averaged likelihood needs --------------------------------------
    def solve(self, u: Tensor, r: Tensor | float, *, tol: float = 1e-6, max_iter: int = 200) -> Tensor:
        """(sigma_y^2 I + r A A^T)^{-1} u in the Fourier basis, exact (tol and max_iter are unused).

        Args:
            u: (B, *lead, H, W); r: a float or one value per sample, (B,), >= 0.
        Returns:
            v, the shape of u. Frequencies where sigma_y^2 + r |K_f|^2 = 0 (sigma_y = 0 and a kernel
            whose transform vanishes there, e.g. a box) carry no information and get v = 0 there,
            as the zero-variance entries of the other operators' solves do.
        """
        self.x_shape(u.shape[1:])
        size, work = tuple(u.shape[-2:]), _fft_dtype(u.dtype)
        half, _ = self.spectrum(size, work, u.device)
        denominator = self.sigma_y**2 + per_sample(r, u) * half.abs().square()
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        weighted = torch.where(denominator > 0, torch.fft.rfft2(u.to(work)) / safe, 0)
        return torch.fft.irfft2(weighted, s=size).to(u.dtype)

    def log_det(self, r: Tensor | float, y_like: Tensor) -> Tensor:
        """log det(sigma_y^2 I + r A A^T) per sample, (B,): every plane (channel) adds
        sum_f log(sigma_y^2 + r |K_f|^2) over the H x W frequencies. Frequencies of zero variance
        are left out, as in `solve`."""
        self.x_shape(y_like.shape[1:])
        _, power = self.spectrum(tuple(y_like.shape[-2:]), _fft_dtype(y_like.dtype), y_like.device)
        r = torch.as_tensor(r, dtype=power.dtype, device=power.device).reshape(-1, 1, 1)  # scalar or (B,)
        variance = self.sigma_y**2 + r * power  # (1 or B, H, W)
        logs = torch.where(variance > 0, variance.clamp_min(torch.finfo(power.dtype).tiny).log(), 0.0)
        planes = math.prod(y_like.shape[1:-2])
        return (planes * logs.flatten(1).sum(1)).expand(y_like.shape[0]).to(y_like.dtype)

    # -- deepinv ----------------------------------------------------------------------
    def to_deepinv(self, x_shape: Sequence[int] | None = None):
        """This operator as a deepinv physics with the same kernel and sigma_y (needs deepinv).

        With `x_shape` (C, H, W): `deepinv.physics.BlurFFT(img_size=x_shape)`, deepinv's FFT blur,
        circular like ours. Without: `deepinv.physics.Blur(padding="circular")`, which works on any
        image size. Both are true convolutions centred at (k // 2, k // 2), so their A equals ours.
        """
        import deepinv

        noise = deepinv.physics.GaussianNoise(sigma=self.sigma_y)
        kernel = self.kernel[None, None]
        if x_shape is None:
            return deepinv.physics.Blur(filter=kernel, padding="circular", noise_model=noise, device=kernel.device)
        x_shape = self.y_shape(x_shape)
        if len(x_shape) != 3:
            raise ValueError(f"x_shape must be (C, H, W) for deepinv's BlurFFT, got {x_shape}")
        return deepinv.physics.BlurFFT(img_size=x_shape, filter=kernel, noise_model=noise, device=kernel.device)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_size}x{self.kernel_size}, boundary='circular', sigma_y={self.sigma_y}"


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the FFTs run in: float64 stays, anything else (half precision included,
    which torch's CPU FFT does not take) runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- kernels ------------------------------------------------------------------------------


def _check_size(size, name: str = "size") -> int:
    """An odd integer >= 1 (the kernels are centred on their middle entry); a ValueError naming `name`."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 1 (the kernel's centre is its middle entry), got {size!r}")
    return size


def gaussian_kernel(std: float, size: int | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The isotropic Gaussian kernel exp(-(i^2 + j^2) / (2 std^2)), sampled at integer offsets and normalised.

    Args:
        std: standard deviation in pixels, > 0.
        size: odd side of the kernel; default 2 ceil(4 std) + 1, which keeps all but 6e-5 of the
            continuous Gaussian's mass and lowers its variance by 0.1% (the tails beyond 4 std).
        dtype: of the result (computed in float64).
    Returns:
        (size, size) tensor summing to 1, symmetric under flips and transposition.
    """
    std = float(std)
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"std must be a finite number > 0 (pixels), got {std!r}")
    size = 2 * math.ceil(4 * std) + 1 if size is None else _check_size(size)
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    line = torch.exp(-offsets.square() / (2 * std**2))
    kernel = torch.outer(line, line)
    return (kernel / kernel.sum()).to(dtype)


def box_kernel(size: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The uniform (size, size) kernel, every entry 1 / size^2 (size odd)."""
    size = _check_size(size)
    return torch.full((size, size), 1.0 / size**2, dtype=torch.float64).to(dtype)


def motion_kernel(size: int, seed: int = 0, *, length_scale: float = 0.3, sigma: float = 0.25,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """A random camera-shake kernel from deepinv's `MotionBlurGenerator` (Schuler et al. 2015), renormalised.

    The trajectory's x and y coordinates are Gaussian processes with a Matérn covariance of
    `length_scale` and standard deviation `sigma` (in units of half the kernel's side), binned
    into a (size, size) histogram. The same `seed` gives the same kernel (for a given deepinv version).

    Args:
        size: odd side of the kernel in pixels.
        seed: seeds the trajectory (a generator of its own: torch's global state is left alone).
        length_scale, sigma: MotionBlurGenerator's `l` and `sigma`.
        dtype: of the result (renormalised in float64: deepinv's kernel sums to 1 - 1e-6 / its mass).
    Raises:
        ImportError: deepinv is not installed (`pip install "posterior-diff[deepinv]"`).
    """
    size = _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    try:
        from deepinv.physics.generator import MotionBlurGenerator
    except ImportError as error:  # deepinv is optional: the deepinv, test and benchmark extras
        raise ImportError('motion_kernel needs deepinv: pip install "posterior-diff[deepinv]"') from error
    generator = MotionBlurGenerator((size, size), rng=torch.Generator().manual_seed(seed), l=length_scale, sigma=sigma)
    kernel = generator.step(batch_size=1, seed=seed)["filter"][0, 0].double()
    total = float(kernel.sum())
    if not total > 0:
        raise ValueError(f"the motion trajectory of seed {seed} left the {size}x{size} kernel; try another seed or a smaller sigma")
    return (kernel / total).to(dtype)


def kernel_from_spec(spec: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The kernel a short name gives: "gaussian:STD", "box:SIZE" or "motion:SIZE[:SEED]" (seed 0 by default).

    E.g. "gaussian:2" (std 2 pixels, 17 x 17), "box:5", "motion:15:3". A ValueError naming the spec otherwise.
    """
    name, _, rest = str(spec).partition(":")
    values = rest.split(":") if rest else []
    try:
        if name == "gaussian" and len(values) == 1:
            return gaussian_kernel(float(values[0]), dtype=dtype)
        if name == "box" and len(values) == 1:
            return box_kernel(int(values[0]), dtype=dtype)
        if name == "motion" and len(values) in (1, 2):
            return motion_kernel(int(values[0]), int(values[1]) if len(values) == 2 else 0, dtype=dtype)
    except ValueError as error:
        raise ValueError(f"kernel spec {spec!r}: {error}") from None
    raise ValueError(f"kernel spec must be {KERNEL_SPECS}, got {spec!r}")
