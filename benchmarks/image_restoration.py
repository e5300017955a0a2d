"""Image benchmark: the default diffusion prior on held-out photographs, against classical baselines.

Four photographs that ship inside scikit-image and that the embedded default model never saw in
training (astronaut, camera, coffee, chelsea; camera is grey, repeated to three channels) are
shrunk by --downscale (antialiased) and centre-cropped to --size pixels per side. Each is
measured once per task, in [0, 1] units:

| task          | forward model                                   | sigma_y | baseline(s)                          |
|---------------|--------------------------------------------------|---------|--------------------------------------|
| sr4           | super-resolution x4, 4x4 average pooling         | 0.025   | bicubic upsampling of y              |
| sr4-bicubic   | super-resolution x4, antialiased bicubic kernel  | 0.025   | bicubic upsampling of y              |
| box           | inpainting, 32x32 centred hole                   | 0.01    | masked input; biharmonic fill        |
| random        | inpainting, 70% of the pixels missing            | 0.01    | masked input; biharmonic fill        |
| denoise       | denoising                                        | 0.1     | the noisy input                      |

and restored by `posterior_diff.restore` with each averaged-likelihood covariance of
--covariances. Reported per run: PSNR and SSIM (scikit-image, data_range=1) of the reference
baseline (the last of its row above), of the posterior mean and of one posterior sample; the
gain in dB of the mean over the baseline; the calibration of the posterior std, as the fraction
of entries (pixels x channels) with |mean - truth| <= 2 std and the average std; the network
forward evaluations (NFE), vector-Jacobian products (VJPs) and seconds of sampling. A run whose
sampler produces non-finite values is reported as "diverged". A summary averages over images
per task and covariance, and states whether on SR x4 (average) the posterior mean beats bicubic
by at least 1.5 dB on every image. --figure writes a PNG of the sr4 restorations.

With N samples the std is estimated from N draws, so even exact posterior samples do not cover
95% of the truth within 2 std: the header gives the coverage that calibrated samples reach at
this N (Student t with N - 1 degrees of freedom), the number to compare with.

Run from the repository root. The default run (40 runs at 128x128, 4 samples, 50 steps) takes of the
order of two hours on two CPU cores, most of it in the Tweedie runs (about 4x the network work of
the isotropic ones); --quick takes a few seconds.

    PYTHONPATH=. python benchmarks/image_restoration.py                 # writes docs/image_restoration.md
    PYTHONPATH=. python benchmarks/image_restoration.py --figure docs/image_restoration.png
    PYTHONPATH=. python benchmarks/image_restoration.py --quick --out /tmp/image_restoration.md
    PYTHONPATH=. python benchmarks/image_restoration.py --model path/to/ddpm_pipeline_folder
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from skimage import data, metrics, restoration, transform
from torch import Tensor

import posterior_diff
from operators import Denoising, Inpainting, LinearOperator, SuperResolution, box_mask, random_mask
from posterior_diff import Denoiser, NonFiniteSampleError, default_model, load_model, restore
from posterior_diff.images import match_channels, save_panels, to_image_tensor

from benchmarks.reporting import markdown_table

IMAGES = ("astronaut", "camera", "coffee", "chelsea")
TASKS = ("sr4", "sr4-bicubic", "box", "random", "denoise")
TASK_SIGMA = {"sr4": 0.025, "sr4-bicubic": 0.025, "box": 0.01, "random": 0.01, "denoise": 0.1}
TASK_DESCRIPTION = {
    "sr4": "super-resolution x4, 4x4 average pooling",
    "sr4-bicubic": "super-resolution x4, antialiased bicubic kernel",
    "box": "inpainting, 32x32 centred hole",
    "random": "inpainting, 70% of the pixels missing",
    "denoise": "denoising",
}
# The baseline each task's gain is measured against (the strongest of its baselines).
REFERENCE_BASELINE = {
    "sr4": "bicubic", "sr4-bicubic": "bicubic", "box": "biharmonic fill", "random": "biharmonic fill",
    "denoise": "noisy input",
}
SR_FACTOR = 4
BOX_SIDE = 32
MISSING_FRACTION = 0.7
GAIN_TARGET_DB = 1.5
QUICK = dict(size=64, steps=10, samples=2, images=IMAGES[:1], tasks=("sr4", "denoise"), covariances=("isotropic",))
FULL = dict(size=128, steps=50, samples=4, images=IMAGES, tasks=TASKS, covariances=("isotropic", "tweedie"))


@dataclass
class Run:
    """One restore() call on one image and task: its scores, or diverged=True and no scores."""

    image: str
    task: str
    covariance: str
    baseline: str
    baseline_psnr: float
    baseline_ssim: float
    diverged: bool = False
    mean_psnr: float = math.nan
    mean_ssim: float = math.nan
    sample_psnr: float = math.nan
    coverage: float = math.nan
    average_std: float = math.nan
    nfe: int = 0
    vjps: int = 0
    seconds: float = math.nan

    @property
    def gain(self) -> float:
        """dB of the posterior mean over the reference baseline."""
        return self.mean_psnr - self.baseline_psnr


@dataclass
class Figure:
    """The sr4 images of one photograph: truth, measurement, bicubic and, per covariance, (mean, sample, std) or None."""

    truth: Tensor
    y: Tensor
    bicubic: np.ndarray
    restorations: dict[str, tuple[Tensor, Tensor, Tensor] | None]


# -- command line ----------------------------------------------------------------------


def comma_list(choices: tuple[str, ...]):
    """An argparse type: a comma-separated subset of `choices`, as a tuple in the order given."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick fills in the settings that were not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: size 64, 10 steps, 2 samples, astronaut, tasks sr4,denoise, covariance isotropic")
    parser.add_argument("--images", type=comma_list(IMAGES), help=f"subset of {','.join(IMAGES)} (default all)")
    parser.add_argument("--tasks", type=comma_list(TASKS), help=f"subset of {','.join(TASKS)} (default all)")
    parser.add_argument("--covariances", type=comma_list(posterior_diff.COVARIANCES),
                        help="averaged-likelihood covariances, subset of zero,isotropic,diagonal,tweedie (default isotropic,tweedie)")
    parser.add_argument("--samples", type=int, help="posterior samples per run (default 4; at least 2 for a std)")
    parser.add_argument("--steps", type=int, help="sampler steps (default 50)")
    parser.add_argument("--size", type=int, help="side of the centre crop in pixels (default 128; a multiple of 4)")
    parser.add_argument("--downscale", type=float, default=2.0, help="shrink each photograph by this factor before cropping")
    parser.add_argument("--cg-max-iter", type=int, default=10, help="conjugate-gradient cap of the Tweedie covariance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the measurements (noise, random mask) and of the sampler")
    parser.add_argument("--model", type=Path, help="diffusers DDPM pipeline folder (default: the embedded default model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample")
    parser.add_argument("--out", type=Path, default=Path("docs/image_restoration.md"), help="markdown file to write")
    parser.add_argument("--figure", type=Path, help="also write a PNG of the sr4 restorations here")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.samples < 2:
        parser.error("--samples must be >= 2: the posterior std needs at least two samples")
    if args.steps < 1 or args.cg_max_iter < 1:
        parser.error("--steps and --cg-max-iter must be >= 1")
    if args.size % SR_FACTOR or args.size <= BOX_SIDE:
        parser.error(f"--size must be a multiple of {SR_FACTOR} larger than the {BOX_SIDE}-pixel box, got {args.size}")
    if args.downscale < 1:
        parser.error("--downscale must be >= 1")
    if args.figure and "sr4" not in args.tasks:
        parser.error("--figure shows the sr4 task: include sr4 in --tasks")
    return args


# -- data, operators, baselines ----------------------------------------------------------


def load_photograph(name: str, size: int, downscale: float) -> Tensor:
    """The scikit-image photograph `name`, shrunk by `downscale` and centre-cropped: (3, size, size) in [0, 1]."""
    array = getattr(data, name)()
    height, width = (round(side / downscale) for side in array.shape[:2])
    if min(height, width) < size:
        raise ValueError(f"{name} is {height}x{width} after --downscale {downscale:g}, smaller than --size {size}")
    array = transform.resize(array, (height, width), anti_aliasing=True)  # floats in [0, 1]
    top, left = (height - size) // 2, (width - size) // 2
    image = to_image_tensor(array[top : top + size, left : left + size])
    return match_channels(image, 3)


def make_operator(task: str, shape: tuple[int, ...], generator: torch.Generator) -> LinearOperator:
    """The forward model of `task` for images of `shape` (C, H, W), noise level TASK_SIGMA[task]."""
    sigma = TASK_SIGMA[task]
    if task == "sr4":
        return SuperResolution(SR_FACTOR, sigma, kernel="average")
    if task == "sr4-bicubic":
        return SuperResolution(SR_FACTOR, sigma, kernel="bicubic")
    if task == "box":
        top, left = (shape[1] - BOX_SIDE) // 2, (shape[2] - BOX_SIDE) // 2
        return Inpainting(box_mask(shape, top, left, BOX_SIDE, BOX_SIDE), sigma)
    if task == "random":
        return Inpainting(random_mask(shape, MISSING_FRACTION, generator=generator), sigma)
    return Denoising(sigma)


def to_array(image: Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) float64 array."""
    return image.detach().cpu().double().numpy().transpose(1, 2, 0)


def baselines(task: str, y: Tensor, operator: LinearOperator, size: int) -> dict[str, np.ndarray]:
    """The classical estimates of the truth from one measurement y, as (H, W, C) arrays clipped to [0, 1]."""
    measured = to_array(y)
    if task.startswith("sr4"):
        upsampled = transform.resize(measured, (size, size), order=3, anti_aliasing=False)
        return {"bicubic": np.clip(upsampled, 0, 1)}
    if task in ("box", "random"):
        hole = to_array(operator.mask)[:, :, 0] == 0
        filled = restoration.inpaint_biharmonic(measured, hole, channel_axis=-1)
        return {"masked input": np.clip(measured, 0, 1), "biharmonic fill": np.clip(filled, 0, 1)}
    return {"noisy input": np.clip(measured, 0, 1)}


# -- scores ------------------------------------------------------------------------------


def psnr_ssim(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of an (H, W, C) estimate in [0, 1] against the truth."""
    psnr = metrics.peak_signal_noise_ratio(truth, estimate, data_range=1)
    ssim = metrics.structural_similarity(truth, estimate, data_range=1, channel_axis=-1)
    return float(psnr), float(ssim)


def coverage_within_two_std(mean: Tensor, std: Tensor, truth: Tensor) -> float:
    """Fraction of entries with |mean - truth| <= 2 std."""
    return float(((mean - truth).abs() <= 2 * std).double().mean())


def calibrated_coverage(num_samples: int) -> float:
    """The coverage within 2 std that exact Gaussian posterior samples reach when mean and std come from N draws.

    truth - mean ~ N(0, s^2 (1 + 1/N)) and the sample std has N - 1 degrees of freedom, so the
    ratio is Student t: P(|T_{N-1}| <= 2 / sqrt(1 + 1/N)); 0.954 only as N grows.
    """
    bound = 2 / math.sqrt(1 + 1 / num_samples)
    return float(2 * stats.t.cdf(bound, df=num_samples - 1) - 1)


# -- the study -------------------------------------------------------------------------


def run_restoration(model: Denoiser, image: str, task: str, covariance: str, truth: Tensor, y: Tensor,
                    operator: LinearOperator, baseline: tuple[str, float, float], args: argparse.Namespace):
    """restore() once; returns the Run and the (mean, sample, std) images, or None if the sampler diverged."""
    run = Run(image, task, covariance, *baseline)
    try:
        result = restore(
            y, operator, model, num_samples=args.samples, steps=args.steps, covariance=covariance,
            generator=torch.Generator().manual_seed(args.seed), cg_max_iter=args.cg_max_iter, device=args.device,
        )
    except NonFiniteSampleError:
        run.diverged = True
        return run, None
    mean, sample, std = (tensor.cpu() for tensor in (result.mean, result.samples[0], result.std))
    run.mean_psnr, run.mean_ssim = psnr_ssim(to_array(mean), to_array(truth))
    run.sample_psnr, _ = psnr_ssim(to_array(sample), to_array(truth))
    run.coverage = coverage_within_two_std(mean, std, truth)
    run.average_std = float(std.mean())
    run.nfe, run.vjps, run.seconds = result.nfe, result.vjps, result.seconds
    return run, (mean, sample, std)


RUN_HEADER = ["image", "task", "covariance", "baseline", "base PSNR", "base SSIM", "mean PSNR", "mean SSIM",
              "sample PSNR", "gain dB", "cover 2 std", "avg std", "NFE", "VJPs", "s"]


def format_run(run: Run) -> list[str]:
    """The RUN_HEADER columns of one run."""
    names = [run.image, run.task, run.covariance, run.baseline, f"{run.baseline_psnr:.2f}", f"{run.baseline_ssim:.3f}"]
    if run.diverged:
        return names + ["diverged"] + [""] * (len(RUN_HEADER) - len(names) - 1)
    return names + [
        f"{run.mean_psnr:.2f}", f"{run.mean_ssim:.3f}", f"{run.sample_psnr:.2f}", f"{run.gain:+.2f}",
        f"{run.coverage:.3f}", f"{run.average_std:.4f}", str(run.nfe), str(run.vjps), f"{run.seconds:.1f}",
    ]


def run_study(model: Denoiser, args: argparse.Namespace) -> tuple[list[Run], list[list[str]], dict[str, Figure]]:
    """Every image x task x covariance; prints each run's row as it completes.

    Returns the runs, the rows of the baseline table and the sr4 figures per image. Each
    (image, task) is measured once, so every covariance restores the same y.
    """
    runs, baseline_rows, figures = [], [], {}
    print("| " + " | ".join(RUN_HEADER) + " |", flush=True)
    for image in args.images:
        truth = load_photograph(image, args.size, args.downscale)
        truth_array = to_array(truth)
        for task in args.tasks:
            generator = torch.Generator().manual_seed(args.seed)
            operator = make_operator(task, tuple(truth.shape), generator)
            y = operator.measure(truth[None], generator)[0]
            estimates = baselines(task, y, operator, args.size)
            scores = {name: psnr_ssim(estimate, truth_array) for name, estimate in estimates.items()}
            baseline_rows += [[image, task, name, f"{psnr:.2f}", f"{ssim:.3f}"] for name, (psnr, ssim) in scores.items()]
            reference = REFERENCE_BASELINE[task]
            if task == "sr4":
                figures[image] = Figure(truth, y, estimates["bicubic"], {})
            for covariance in args.covariances:
                run, images = run_restoration(model, image, task, covariance, truth, y, operator,
                                              (reference, *scores[reference]), args)
                runs.append(run)
                if task == "sr4":
                    figures[image].restorations[covariance] = images
                print("| " + " | ".join(format_run(run)) + " |", flush=True)
    return runs, baseline_rows, figures


# -- the report --------------------------------------------------------------------------


SUMMARY_HEADER = ["task", "covariance", "images", "diverged", "base PSNR", "mean PSNR", "mean SSIM", "sample PSNR",
                  "gain dB", "min gain dB", "cover 2 std", "avg std", "NFE", "VJPs", "s"]


def summary_table(runs: list[Run], args: argparse.Namespace) -> str:
    """Averages over the images per task and covariance (diverged runs are counted, not averaged)."""
    rows = []
    for task in args.tasks:
        for covariance in args.covariances:
            group = [run for run in runs if run.task == task and run.covariance == covariance]
            done = [run for run in group if not run.diverged]
            row = [task, covariance, str(len(group)), str(len(group) - len(done))]
            if not done:
                rows.append(row + [""] * (len(SUMMARY_HEADER) - len(row)))
                continue

            def average(field: str) -> float:
                return statistics.fmean(getattr(run, field) for run in done)

            rows.append(row + [
                f"{average('baseline_psnr'):.2f}", f"{average('mean_psnr'):.2f}", f"{average('mean_ssim'):.3f}",
                f"{average('sample_psnr'):.2f}", f"{average('gain'):+.2f}", f"{min(run.gain for run in done):+.2f}",
                f"{average('coverage'):.3f}", f"{average('average_std'):.4f}", f"{average('nfe'):.0f}",
                f"{average('vjps'):.0f}", f"{average('seconds'):.1f}",
            ])
    return markdown_table(SUMMARY_HEADER, rows)


def super_resolution_verdicts(runs: list[Run], args: argparse.Namespace) -> list[str]:
    """One line per covariance: does the posterior mean beat bicubic by GAIN_TARGET_DB on every image for sr4?"""
    lines = []
    for covariance in args.covariances:
        group = [run for run in runs if run.task == "sr4" and run.covariance == covariance]
        if not group:
            continue
        diverged = [run.image for run in group if run.diverged]
        if diverged:
            verdict = f"no (diverged on {', '.join(diverged)})"
        else:
            worst = min(group, key=lambda run: run.gain)
            met = "yes" if worst.gain >= GAIN_TARGET_DB else "no"
            verdict = f"{met} (smallest gain {worst.gain:+.2f} dB, on {worst.image})"
        lines.append(f"- SR x4 (average), covariance {covariance}: posterior-mean PSNR at least {GAIN_TARGET_DB} dB "
                     f"above bicubic on every image ({len(group)}): **{verdict}**")
    return lines


def count_parameters(model: Denoiser) -> int:
    """Number of entries in the model's parameters."""
    return sum(parameter.numel() for parameter in model.parameters())


def header(args: argparse.Namespace, model_name: str, model: Denoiser, minutes: float) -> str:
    """What was measured, how, when and where."""
    command = "PYTHONPATH=. python " + shlex.join(["benchmarks/image_restoration.py"] + sys.argv[1:])
    tasks = "; ".join(f"{task}: {TASK_DESCRIPTION[task]}, sigma_y = {TASK_SIGMA[task]:g}" for task in args.tasks)
    return "\n".join([
        "# Image restoration with the default diffusion prior",
        "",
        f"Posterior sampling with `posterior_diff.restore` on held-out scikit-image photographs ({', '.join(args.images)}), "
        f"each shrunk by {args.downscale:g} and centre-cropped to {args.size}x{args.size}, in [0, 1] units. "
        f"Tasks: {tasks}. Each (image, task) is measured once (seed {args.seed}) and restored with every covariance "
        f"of the averaged likelihood; {args.samples} samples per run, {args.steps} steps of the default sampler, "
        f"Tweedie conjugate gradient capped at {args.cg_max_iter} iterations. PSNR (dB) and SSIM from "
        "`skimage.metrics` with data_range = 1. `baseline` is the classical estimate the gain is measured against "
        "(bicubic upsampling of y for super-resolution, a biharmonic fill of the holes for inpainting, the noisy "
        "input for denoising; all clipped to [0, 1]). `mean` is the posterior mean, `sample` the first posterior "
        "sample. `cover 2 std` is the fraction of entries with |mean - truth| <= 2 std, `avg std` the average "
        f"posterior std; calibrated posterior samples reach a coverage of {calibrated_coverage(args.samples):.3f} "
        f"with {args.samples} samples (Student t with {args.samples - 1} degrees of freedom; 0.954 only for many "
        "samples). NFE = denoiser evaluations and VJPs = vector-Jacobian products per run (on the batch of "
        "samples), s = seconds of sampling per run. \"diverged\" = the sampler produced non-finite values.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; total run time {minutes:.1f} min",
        f"- model: {model_name}, {count_parameters(model):,} parameters",
        f"- posterior-diff {posterior_diff.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {args.device}, {os.cpu_count()} CPU cores",
    ])


def write_figure(figures: dict[str, Figure], covariances: tuple[str, ...], path: Path) -> None:
    """A PNG with one row per image: low-res (nearest), bicubic, (mean, sample, std) per covariance, truth.

    The std is averaged over the channels and divided by its maximum; a diverged run leaves grey tiles.
    """
    titles = ["low-res", "bicubic"] + [f"{kind} {covariance}" for covariance in covariances for kind in ("mean", "sample", "std")] + ["truth"]
    rows = []
    for figure in figures.values():
        bicubic = torch.from_numpy(np.ascontiguousarray(figure.bicubic.transpose(2, 0, 1))).float()
        tiles = [figure.y.repeat_interleave(SR_FACTOR, -2).repeat_interleave(SR_FACTOR, -1), bicubic]
        for covariance in covariances:
            restored = figure.restorations.get(covariance)
            if restored is None:
                tiles += [torch.full_like(bicubic, 0.5)] * 3
                continue
            mean, sample, std = restored
            spread = std.mean(0, keepdim=True)
            tiles += [mean, sample, spread / spread.max() if float(spread.max()) > 0 else spread]
        rows.append(tiles + [figure.truth])
    save_panels(rows, titles, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None:
        model, model_name = default_model(), "the embedded default model (`posterior_diff/default_model`)"
    else:
        model, model_name = load_model(args.model), f"`{args.model}`"
    start = time.perf_counter()
    runs, baseline_rows, figures = run_study(model, args)
    minutes = (time.perf_counter() - start) / 60
    sections = [
        header(args, model_name, model, minutes),
        "## Per image",
        markdown_table(RUN_HEADER, [format_run(run) for run in runs]),
        "## Summary (averaged over images)",
        summary_table(runs, args),
        "\n".join(super_resolution_verdicts(runs, args)),
        "## Baselines",
        markdown_table(["image", "task", "baseline", "PSNR", "SSIM"], baseline_rows),
    ]
    if args.figure:
        write_figure(figures, args.covariances, args.figure)
        sections.append(f"Figure `{args.figure}`: sr4, one row per image ({', '.join(figures)}); columns: low-res "
                        "(nearest upsampling), bicubic, then posterior mean, one sample and std (normalised) per "
                        "covariance, truth.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(section for section in sections if section) + "\n")
    print(f"wrote {args.out}" + (f" and {args.figure}" if args.figure else ""), flush=True)


if __name__ == "__main__":
    main()
