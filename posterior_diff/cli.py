"""The `posterior-diff` command: `restore` an image file, or `train` a model by DSM.

    posterior-diff restore low.png --task sr4 -o restored.png [--sigma-y 0.025] [--samples 4] [--std-map std.png]
                           [--device auto|cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
    posterior-diff restore holes.png --task inpaint --mask mask.png -o filled.png
    posterior-diff train --data photos/ --out my_model/ [--steps 20000] [--resume]

Images are ordinary files in [0, 1] (8-bit or 16-bit); sigma_y is in those units. Tasks and
their default sigma_y come from `posterior_diff.tasks`, sampler defaults from
`posterior_diff.defaults.IMAGE_DEFAULTS`. `restore`
never overwrites an existing output unless --force is given. Every user error (a missing or
unreadable file, an unknown task, a mask of the wrong size) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .defaults import IMAGE_DEFAULTS
from .tasks import MEASURED_TASKS as CLI_TASKS
from .tasks import TASKS
NETWORK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posterior-diff", description="Posterior sampling with diffusion priors.")
    commands = parser.add_subparsers(dest="command", required=True)

    restore = commands.add_parser("restore", help="restore a degraded image file")
    restore.add_argument("input", type=Path, help="the measurement: low-resolution, holed or noisy image")
    restore.add_argument("--task", required=True, help=f"one of {', '.join(CLI_TASKS)}")
    restore.add_argument("--mask", type=Path, help="inpaint: image of the input's size, white = observed, black = missing")
    restore.add_argument("--sigma-y", dest="sigma_y", type=float,
                         help="measurement noise standard deviation in [0, 1] units (default per task: " +
                         ", ".join(f"{name} {TASKS[name].sigma_y}" for name in CLI_TASKS) + ")")
    restore.add_argument("--samples", type=int, default=4, help="posterior samples to average (default 4)")
    restore.add_argument("--steps", type=int, default=IMAGE_DEFAULTS.steps,
                         help=f"sampler steps (default {IMAGE_DEFAULTS.steps})")
    restore.add_argument("--covariance", default=IMAGE_DEFAULTS.covariance,
                         help=f"isotropic, tweedie (more exact, costs --cg-max-iter more network backward passes per "
                              f"step), diagonal, zero, or projection (no backward pass) (default {IMAGE_DEFAULTS.covariance})")
    restore.add_argument("--cg-max-iter", type=int, default=IMAGE_DEFAULTS.cg_max_iter,
                         help=f"conjugate-gradient cap per step for tweedie (default {IMAGE_DEFAULTS.cg_max_iter})")
    restore.add_argument("--particles", type=int, help="particle mode with this many particles (twisted SMC; "
                         "--samples draws are taken from the weighted cloud)")
    restore.add_argument("--model", help="a diffusers model folder or hub id org/name (default: the embedded model)")
    restore.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N")
    restore.add_argument("--dtype", default="float32", choices=tuple(NETWORK_DTYPES),
                         help="the network's dtype (the sampler state stays float32; default float32)")
    restore.add_argument("--seed", type=int, default=0)
    restore.add_argument("-o", "--output", type=Path, required=True, help="where to write the posterior mean")
    restore.add_argument("--std-map", type=Path, help="also write the posterior standard deviation (scaled to its maximum)")
    restore.add_argument("--force", action="store_true", help="overwrite existing output files")

    train = commands.add_parser("train", help="train a noise-prediction UNet by denoising score matching")
    train.add_argument("--data", type=Path, required=True, help="folder of training images")
    train.add_argument("--out", type=Path, required=True, help="output folder (diffusers pipeline layout)")
    train.add_argument("--steps", type=int, default=20000)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--crop-size", type=int, default=32)
    train.add_argument("--channels", type=int, default=3, choices=(1, 3))
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return parser


def _operator(task_name: str, sigma_y: float | None, image: torch.Tensor, mask_path: Path | None):
    from .images import match_channels, read_image

    if task_name not in CLI_TASKS:
        raise UsageError(f"unknown task {task_name!r}; choose one of {', '.join(CLI_TASKS)}")
    task = TASKS[task_name]
    if mask_path is not None and not task.needs_mask:
        raise UsageError("--mask is only used with --task inpaint")
    if not task.needs_mask:
        return task.operator(tuple(image.shape), sigma_y=sigma_y)
    if mask_path is None:
        raise UsageError("--task inpaint needs --mask FILE (white = observed, black = missing)")
    mask = read_image(mask_path)
    if mask.shape[-2:] != image.shape[-2:]:
        raise UsageError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the input is {image.shape[-1]}x{image.shape[-2]}")
    observed = (match_channels(mask, 1) > 0.5).float().expand_as(image).clone()
    return task.operator(tuple(image.shape), sigma_y=sigma_y, mask=observed)


def _device(name: str) -> torch.device:
    """The device `--device` names: auto means CUDA when present, else the CPU."""
    if not DEVICE.match(name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} available)")
    return device


def _restore(args) -> None:
    from . import restore
    from .images import match_channels, read_image, write_image
    from .models import DEFAULT_MODEL_DIR, default_model, load_model

    for path in (args.output, args.std_map):
        if path is not None and path.exists() and not args.force:
            raise UsageError(f"{path} exists; pass --force to overwrite it")
    device = _device(args.device)
    image = read_image(args.input)
    if args.dtype == "float32":
        model = load_model(args.model) if args.model is not None else default_model()
    else:  # the embedded model is a folder too; a half-precision copy leaves the cached one alone
        model = load_model(args.model or DEFAULT_MODEL_DIR, torch_dtype=NETWORK_DTYPES[args.dtype])
    channels = image.shape[0]
    image = match_channels(image, model.channels)  # a grey file runs through a colour model and back
    operator = _operator(args.task, args.sigma_y, image, args.mask)
    result = restore(image, operator, model, num_samples=args.samples, steps=args.steps, covariance=args.covariance,
                     cg_max_iter=args.cg_max_iter, generator=torch.Generator().manual_seed(args.seed), progress=True,
                     particles=args.particles, device=device)
    write_image(match_channels(result.mean, channels), args.output)
    message = f"wrote {args.output} ({result.nfe} network evaluations, {result.seconds:.1f} s)"
    if args.std_map is not None:
        std = match_channels(result.std, channels)
        scale = float(std.max()) or 1.0
        write_image(std / scale, args.std_map)
        message += f"; {args.std_map} (white = std {scale:.3f})"
    print(message)


def _train(args) -> None:
    from .training import TrainingConfig, train

    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, channels=args.channels)
    out = train(args.data, args.out, config, resume=args.resume)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        (_restore if args.command == "restore" else _train)(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        print(f"posterior-diff {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
