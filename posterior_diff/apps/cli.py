"""The `posterior-diff` command: `restore` image files or folders, or `train` a model by DSM.

    posterior-diff restore low.png --task sr4 -o restored.png [--sigma-y 0.025|auto] [--samples 4] [--std-map std.png]
                           [--device auto|cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
    posterior-diff restore holes.png --task inpaint --mask mask.png -o filled.png
    posterior-diff restore blurred.png --task deblur --kernel gaussian:1.5 -o sharp.png   (or box:5, motion:15:3, psf.png)
    posterior-diff restore photos/ more/*.png --task sr4 -o restored/ [--batch-size 8] [--reference truth/]
    torchrun --nproc_per_node 8 -m posterior_diff restore photos/ --task sr4 -o restored/
    posterior-diff train --data photos/ --out my_model/ [--steps 20000] [--resume]

Images are ordinary files in [0, 1] (8-bit or 16-bit); sigma_y is in those units. Tasks and
their default sigma_y come from `posterior_diff.tasks`, sampler defaults from
`posterior_diff.defaults.IMAGE_DEFAULTS`. One input file with an output file is a single-file
run; several inputs, a folder or a glob make a dataset run into an output folder
(`posterior_diff.apps.dataset`: resumable, sharded across processes, with a manifest and an optional
PSNR/SSIM report). Each image's generator is seeded from --seed and the image's file name
(`dataset.image_seed`), so an image gets the same result alone, in a folder, in any batch or
process. `restore` never overwrites an existing output unless --force is given. Every user error
(a missing or unreadable file, an unknown task, a mask of the wrong size) prints one line and
exits 2; a dataset run that had to skip unreadable images exits 1 after doing the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from posterior_diff.apps.command_options import (CLI_TASKS, DEBLUR_TASKS, NAMED_MODELS, UsageError, check_dtype,
                                                 check_grey_share, check_task, ladder_elements, load_network,
                                                 pick_device, sigma_y_option, task_operator)
from posterior_diff.defaults import ESTIMATE_START_LEVEL, IMAGE_DEFAULTS
from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE, DEFAULT_SWITCH
from posterior_diff.restore import START_CHOICES
from posterior_diff.tasks import TASKS

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posterior-diff", description="Posterior sampling with diffusion priors.")
    commands = parser.add_subparsers(dest="command", required=True)
    restore = commands.add_parser("restore", help="restore degraded image files (one file, or folders and globs)")
    for add_arguments in (_problem_arguments, _sampler_arguments, _model_arguments, _output_arguments):
        add_arguments(restore)
    _train_arguments(commands.add_parser("train", help="train a noise-prediction UNet by denoising score matching"))
    return parser


def _problem_arguments(restore: argparse.ArgumentParser) -> None:
    """restore's measurements and forward model: inputs, task, mask, blur kernel, sigma_y."""
    restore.add_argument("input", nargs="+", metavar="INPUT",
                         help="the measurements (low-resolution, holed, noisy or blurred images): files, folders or globs; "
                              "with several, a folder or a glob, -o is a folder and the outputs keep their file names")
    restore.add_argument("--task", required=True, help=f"one of {', '.join(CLI_TASKS)}")
    restore.add_argument("--mask", type=Path, help="inpaint: image of the input's size, white = observed, black = missing "
                         "(a dataset run also takes a folder of masks named like the inputs)")
    restore.add_argument("--kernel", help=f"{', '.join(DEBLUR_TASKS)}: the blur kernel, gaussian:STD (pixels), box:SIZE, "
                         "motion:SIZE[:SEED] (needs deepinv) or a grey image file normalised to sum 1; SIZE (and a kernel "
                         "image's side) odd; circular boundary (default: the task's, " +
                         ", ".join(f"{name} {TASKS[name].blur}" for name in DEBLUR_TASKS) + ")")
    restore.add_argument("--sigma-y", dest="sigma_y", type=sigma_y_option,
                         help="measurement noise standard deviation in [0, 1] units, or auto to estimate it from each "
                              "input (docs/usage.md) (default per task: " +
                         ", ".join(f"{name} {TASKS[name].sigma_y}" for name in CLI_TASKS) + ")")


def _sampler_arguments(restore: argparse.ArgumentParser) -> None:
    """restore's sampler: samples, steps, covariance and its solve, particles, start."""
    restore.add_argument("--samples", type=int, default=4, help="posterior samples to average (default 4)")
    restore.add_argument("--steps", type=int, default=IMAGE_DEFAULTS.steps,
                         help=f"sampler steps (default {IMAGE_DEFAULTS.steps})")
    restore.add_argument("--covariance", default=IMAGE_DEFAULTS.covariance,
                         help="tweedie (costs up to --cg-max-iter network backward passes per step), isotropic or "
                              "diagonal (one or two), zero, or projection (no backward pass) "
                              f"(default {IMAGE_DEFAULTS.covariance}; docs/speed.md)")
    restore.add_argument("--cg-max-iter", type=int, default=IMAGE_DEFAULTS.cg_max_iter,
                         help=f"conjugate-gradient cap per step for tweedie (default {IMAGE_DEFAULTS.cg_max_iter})")
    restore.add_argument("--jacobian-s-max", dest="jacobian_s_max", type=float, default=IMAGE_DEFAULTS.jacobian_s_max,
                         help="noise ratio sigma/alpha above which the guidance takes no backward pass (the projection "
                              f"step), inf for the network's Jacobian at every step (default {IMAGE_DEFAULTS.jacobian_s_max:g}; "
                              "docs/jacobian_range.md)")
    restore.add_argument("--eta", type=float,
                         help="the sampler's noise: 1 the reverse SDE, above 1 more mixing toward each noise level's "
                              f"marginal (default {IMAGE_DEFAULTS.eta:g}; {IMAGE_DEFAULTS.large_hole_eta:g} where the "
                              "mask leaves holes wider than a few pixels, 1 from the measurement for denoising; "
                              "docs/eta.md)")
    restore.add_argument("--mean-level", dest="mean_level", type=float,
                         help="the output is the average over the samples of the guided means E[x | x_t, y] at the first "
                              "step at or below this noise level in [0, 1] units; 0: the samples' own mean (default "
                              f"{IMAGE_DEFAULTS.mean_level:g} for image models; docs/mean_level.md)")
    restore.add_argument("--independent-samples", dest="antithetic", action="store_const", const=False,
                         help="draw independent samples instead of antithetic pairs (the image models' default "
                              "for an even --samples; docs/antithetic.md)")
    restore.add_argument("--particles", type=int, help="particle mode with this many particles (twisted SMC; "
                         "--samples draws are taken from the weighted cloud)")
    restore.add_argument("--start", default="auto", choices=START_CHOICES,
                         help="where the sampler starts: prior, measurement (denoising), estimate (a classical "
                              "estimate noised to --start-level: Come-Closer-Diffuse-Faster) or auto (default: "
                              "measurement for denoising, estimate for scattered holes, else prior; docs/usage.md)")
    restore.add_argument("--start-level", dest="start_level", type=float,
                         help=f"--start estimate: the noise level in [0, 1] units it starts at (default "
                              f"{ESTIMATE_START_LEVEL:g}; docs/start_estimates.md)")


def _model_arguments(restore: argparse.ArgumentParser) -> None:
    """restore's prior and where it runs: model, ladder switch and elements, extrapolation, device, dtype."""
    restore.add_argument("--model", help="a diffusers model folder or hub id org/name, or a named prior: " +
                         ", ".join(f"{name} ({what})" for name, what in NAMED_MODELS.items()) +
                         " (default: the embedded model)")
    restore.add_argument("--ladder-switch", dest="ladder_switch", type=float, default=DEFAULT_SWITCH,
                         help="--model ladder: the noise level in [0, 1] units below which FFDNet is asked "
                              f"(default {DEFAULT_SWITCH:g}; docs/ffdnet.md)")
    restore.add_argument("--ladder-elements", dest="ladder_elements", default=str(DEFAULT_ELEMENTS_PER_CALL).lower(),
                         help="--model ladder: flips and quarter turns each call of FFDNet's RGB network averages "
                              "over: 1, 2, 4 or 8 (that many times its cost; 1 costs nothing extra), or none "
                              f"(default {DEFAULT_ELEMENTS_PER_CALL}; docs/ffdnet.md)")
    restore.add_argument("--ladder-grey-share", dest="ladder_grey_share", type=float, default=DEFAULT_GREY_SHARE,
                         help="--model ladder: the weight in [0, 1) of FFDNet's grey network, asked channel by channel "
                              f"and mixed into the RGB one; 0: the RGB network alone (default {DEFAULT_GREY_SHARE:g}; "
                              "docs/ffdnet.md)")
    restore.add_argument("--allow-extrapolation", dest="allow_extrapolation", action="store_true",
                         help="run even where the sampler would ask the model about noise levels outside its declared "
                              "sigma_range (refused by default)")
    restore.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU; under torchrun or "
                         "accelerate launch cuda:LOCAL_RANK), cpu, cuda or cuda:N")
    restore.add_argument("--dtype", default="auto",
                         help="the network's dtype: auto, float32, bfloat16 or float16 (the sampler state stays float32; "
                              "default auto: the embedded model in bfloat16 on a CPU with native bfloat16, else float32)")


def _output_arguments(restore: argparse.ArgumentParser) -> None:
    """restore's seeds and outputs: seed, output, std map, batches, references, force."""
    restore.add_argument("--seed", type=int, default=0,
                         help="each image's generator is seeded from this and the image's file name (default 0)")
    restore.add_argument("-o", "--output", type=Path, required=True,
                         help="where to write the posterior mean: a file, or a folder for a dataset run")
    restore.add_argument("--std-map", type=Path, help="also write the posterior standard deviation (scaled to its "
                         "maximum): a file, or a folder for a dataset run")
    restore.add_argument("--batch-size", type=int, default=1,
                         help="dataset run: images per sampler run, images of one size together (default 1)")
    restore.add_argument("--reference", type=Path, help="dataset run: folder of ground-truth images named like the "
                         "inputs; writes metrics.csv (PSNR, SSIM per image) and summary.txt into the output folder")
    restore.add_argument("--force", action="store_true",
                         help="overwrite existing outputs (a dataset run otherwise skips the finished ones)")



def _train_arguments(train: argparse.ArgumentParser) -> None:
    """The train command's arguments."""
    train.add_argument("--data", type=Path, required=True, help="folder of training images")
    train.add_argument("--out", type=Path, required=True, help="output folder (diffusers pipeline layout)")
    train.add_argument("--steps", type=int, default=20000)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--crop-size", type=int, default=32)
    train.add_argument("--channels", type=int, default=3, choices=(1, 3))
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _restore(args) -> int:
    """A single-file run, or a dataset run (`dataset.run_dataset`) for folders, globs and several inputs."""
    from posterior_diff.apps.dataset import is_single_file, run_dataset, terminate_cleanly

    check_dtype(args.dtype)
    args.ladder_elements = ladder_elements(args.ladder_elements)
    check_grey_share(args.ladder_grey_share)
    pick_device(args.device)  # both named wrongly: one line before any file is read
    check_task(args.task, args.mask, args.kernel)  # and the task, its mask and its kernel: before the model loads
    if not args.jacobian_s_max > 0:  # NaN too
        raise UsageError(f"--jacobian-s-max must be a number > 0 (inf: the network's Jacobian at every step), "
                         f"got {args.jacobian_s_max}")
    with terminate_cleanly():  # SIGTERM, too, leaves no temporary file behind
        return _restore_file(args) if is_single_file(args.input, args.output) else run_dataset(args)


def _restore_file(args) -> int:
    """Restore one file into the file -o (and --std-map); refuse to overwrite either without --force."""
    from posterior_diff.apps.dataset import image_seed, needs_folder, write_image_atomic
    from posterior_diff.images import match_channels, read_image
    from posterior_diff.restore import restore

    source = Path(args.input[0])
    if args.reference is not None:
        raise UsageError("--reference writes a report for a dataset run; give -o an existing folder")
    for path in (args.output, args.std_map):
        if path is not None and path.exists() and not args.force:
            raise UsageError(f"{path} exists; pass --force to overwrite it")
        if path is not None:
            needs_folder(path.parent, f"the folder of {path}")
    device = pick_device(args.device)
    image = read_image(source)
    model = load_network(args.model, args.dtype, args.ladder_switch, args.ladder_elements, args.ladder_grey_share)
    channels = image.shape[0]
    image = match_channels(image, model.channels)  # a grey file runs through a colour model and back
    operator = task_operator(args.task, args.sigma_y, image, args.mask, args.kernel)
    generator = torch.Generator().manual_seed(image_seed(args.seed, source.name))
    result = restore(image, operator, model, num_samples=args.samples, steps=args.steps, covariance=args.covariance,
                     cg_max_iter=args.cg_max_iter, jacobian_s_max=args.jacobian_s_max, eta=args.eta,
                     generator=generator, progress=True, particles=args.particles, device=device,
                     allow_extrapolation=args.allow_extrapolation, mean_level=args.mean_level,
                     antithetic=args.antithetic, start=args.start, start_level=args.start_level)
    write_image_atomic(match_channels(result.mean, channels), args.output)
    message = f"wrote {args.output} ({result.nfe} network evaluations, {result.seconds:.1f} s)"
    if result.settings.sigma_y_estimate is not None:
        message += f"; sigma_y {result.sigma_y:.4g} estimated from the input"
    if args.std_map is not None:
        std = match_channels(result.std, channels)
        scale = float(std.max()) or 1.0
        write_image_atomic(std / scale, args.std_map)
        message += f"; {args.std_map} (white = std {scale:.3f})"
    print(message)
    return 0


def _train(args) -> int:
    from posterior_diff.training.score_matching import TrainingConfig, train

    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, channels=args.channels)
    out = train(args.data, args.out, config, resume=args.resume)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 2 for a user error, 1 for a dataset run that skipped images."""
    args = _parser().parse_args(argv)
    try:
        return (_restore if args.command == "restore" else _train)(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        print(f"posterior-diff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
