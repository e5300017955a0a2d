"""Linear forward models y = A x + sigma_y * n for posterior sampling (batch-first tensors)."""

from .base import AUTO, LinearOperator, NoiseView
from .blur import Blur, box_kernel, gaussian_kernel, kernel_from_spec, motion_kernel
from .deepinv_interop import DeepinvOperator, as_operator, from_deepinv, to_deepinv
from .denoising import Denoising
from .inpainting import Inpainting, box_mask, random_mask
from .linalg import CGInfo, conjugate_gradient, per_sample
from .matrix import MatrixOperator
from .stacked import StackedOperator, stack_operators
from .super_resolution import SuperResolution

__all__ = [
    "LinearOperator",
    "NoiseView",
    "AUTO",
    "Denoising",
    "SuperResolution",
    "Inpainting",
    "Blur",
    "gaussian_kernel",
    "box_kernel",
    "motion_kernel",
    "kernel_from_spec",
    "MatrixOperator",
    "StackedOperator",
    "stack_operators",
    "box_mask",
    "random_mask",
    "conjugate_gradient",
    "CGInfo",
    "per_sample",
    "from_deepinv",
    "to_deepinv",
    "as_operator",
    "DeepinvOperator",
]
