"""Restoration tasks: one table of forward models and measurement noise levels.

The command line, the demos and the benchmarks all name tasks from this table, so a task means
the same operator and the same default sigma_y everywhere. sigma_y is in [0, 1] image units.

| task          | forward model                                    | sigma_y | classical baseline |
|---------------|--------------------------------------------------|---------|--------------------|
| sr2           | super-resolution x2, 2x2 average pooling         | 0.025   | bicubic            |
| sr4           | super-resolution x4, 4x4 average pooling         | 0.025   | bicubic            |
| sr4-bicubic   | super-resolution x4, antialiased bicubic kernel  | 0.025   | bicubic            |
| inpaint       | inpainting with a given mask (1 = observed)       | 0.01    | biharmonic fill    |
| box           | inpainting, a centred square hole of side 1/4    | 0.01    | biharmonic fill    |
| random        | inpainting, 70% of the pixels missing            | 0.01    | biharmonic fill    |
| denoise       | denoising                                        | 0.1     | BM3D               |
| deblur        | Gaussian blur, std 2 pixels (17 x 17), circular  | 0.01    | unsupervised Wiener |
| deblur-motion | motion blur, 15 x 15, seed 0 (needs deepinv)     | 0.01    | unsupervised Wiener |

"box" and "random" draw their own mask, so they simulate measurements (benchmarks, demos);
"inpaint" takes the mask of a real measurement (the command line). The deblurring tasks'
kernels are named by `operators.kernel_from_spec` ("gaussian:2", "motion:15:0"); a caller may
pass another kernel (the command line's --kernel). Their boundary is circular (`operators.Blur`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from operators import Blur, Denoising, Inpainting, LinearOperator, SuperResolution, box_mask, kernel_from_spec, random_mask

MISSING_FRACTION = 0.7  # of the "random" task
BOX_FRACTION = 0.25  # side of the "box" task's hole, as a fraction of the image side


@dataclass(frozen=True)
class Task:
    """One restoration task: how its forward model is built and its default noise level.

    Attributes:
        name: the key in TASKS.
        description: one line for reports.
        sigma_y: default measurement noise standard deviation, in [0, 1] units.
        baseline: the classical method its restorations are compared with.
        factor, kernel: the super-resolution factor and kernel (None for other tasks).
        mask: None, "given" (the caller passes the mask), "box" or "random" (drawn here).
        blur: the blur kernel of the deblurring tasks as a kernel spec (`operators.kernel_from_spec`,
            e.g. "gaussian:2"); None for other tasks.
    """

    name: str
    description: str
    sigma_y: float
    baseline: str
    factor: int | None = None
    kernel: str = "average"
    mask: str | None = None
    blur: str | None = None

    @property
    def needs_mask(self) -> bool:
        """True for "inpaint", whose mask comes with a real measurement."""
        return self.mask == "given"

    @property
    def draws_mask(self) -> bool:
        """True for the simulated inpainting tasks, whose mask is made by `operator`."""
        return self.mask in ("box", "random")

    def operator(self, x_shape: tuple[int, ...], *, sigma_y: float | None = None, mask: Tensor | None = None,
                 generator: torch.Generator | None = None, kernel: Tensor | None = None) -> LinearOperator:
        """The forward model for images of shape x_shape (C, H, W).

        Args:
            x_shape: the shape of one image.
            sigma_y: the noise level (default: the task's).
            mask: the observed pixels (1) for the "inpaint" task, shape x_shape; refused elsewhere.
            generator: draws the mask of the "random" task.
            kernel: a (k, k) blur kernel in place of the deblurring task's own (`operators.Blur`); refused elsewhere.
        Raises:
            ValueError: a mask or kernel the task does not use, or a blur kernel larger than x_shape's (H, W).
        """
        sigma_y = self.sigma_y if sigma_y is None else sigma_y
        if mask is not None and not self.needs_mask:
            raise ValueError(f"a mask is only used by the inpaint task, not by {self.name!r}")
        if kernel is not None and self.blur is None:
            raise ValueError(f"a blur kernel is only used by the deblurring tasks, not by {self.name!r}")
        if self.blur is not None:
            operator = Blur(kernel_from_spec(self.blur) if kernel is None else kernel, sigma_y)
            operator.y_shape(tuple(x_shape))  # a kernel larger than the image: refused here, before any work
            return operator
        if self.factor is not None:
            return SuperResolution(self.factor, sigma_y, kernel=self.kernel)
        if self.mask is None:
            return Denoising(sigma_y)
        return Inpainting(self._mask(tuple(x_shape), mask, generator), sigma_y)

    def _mask(self, x_shape: tuple[int, ...], mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if self.mask == "random":
            return random_mask(x_shape, MISSING_FRACTION, generator=generator)
        if self.mask == "box":
            height, width = (max(1, round(BOX_FRACTION * side)) for side in x_shape[-2:])
            top, left = (x_shape[-2] - height) // 2, (x_shape[-1] - width) // 2
            return box_mask(x_shape, top, left, height, width)
        if mask is None:
            raise ValueError("the inpaint task needs a mask (1 = observed, 0 = missing) of the image's shape")
        return mask


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("sr2", "super-resolution x2, 2x2 average pooling", 0.025, "bicubic", factor=2),
    Task("sr4", "super-resolution x4, 4x4 average pooling", 0.025, "bicubic", factor=4),
    Task("sr4-bicubic", "super-resolution x4, antialiased bicubic kernel", 0.025, "bicubic", factor=4, kernel="bicubic"),
    Task("inpaint", "inpainting with a given mask (1 = observed)", 0.01, "biharmonic fill", mask="given"),
    Task("box", "inpainting, a centred square hole of side 1/4", 0.01, "biharmonic fill", mask="box"),
    Task("random", "inpainting, 70% of the pixels missing", 0.01, "biharmonic fill", mask="random"),
    Task("denoise", "denoising", 0.1, "BM3D"),
    Task("deblur", "deblurring, Gaussian kernel of std 2 pixels, circular boundary", 0.01, "unsupervised Wiener",
         blur="gaussian:2"),
    Task("deblur-motion", "deblurring, 15x15 motion kernel (seed 0), circular boundary", 0.01, "unsupervised Wiener",
         blur="motion:15:0"),
)}


# The tasks a real measurement can name (the command line), and those a clean image can simulate.
MEASURED_TASKS = tuple(name for name, task in TASKS.items() if not task.draws_mask)
SIMULATED_TASKS = tuple(name for name, task in TASKS.items() if not task.needs_mask)


def get_task(name: str) -> Task:
    """The task called `name`; a ValueError listing the tasks for an unknown one."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
