"""Image benchmark: the default diffusion prior on held-out photographs, against classical baselines.

The four scikit-image photographs the embedded model never saw in training
(`posterior_diff.evaluation.harness.HELD_OUT_PHOTOGRAPHS`: astronaut, camera, coffee, chelsea; camera is
grey, repeated to three channels) are shrunk by --downscale (antialiased) and centre-cropped to
--size pixels per side. Each is measured once per task of `posterior_diff.tasks` (sr4, sr4-bicubic,
box, random, denoise by default; the task table gives each forward model and sigma_y, in
[0, 1] units) and restored by `posterior_diff.restore` with each averaged-likelihood covariance of
--covariances.

Reported per run: PSNR and SSIM (scikit-image, data_range=1) of the task's reference baseline
(`Task.baseline`: bicubic upsampling, the biharmonic fill, BM3D; `posterior_diff.evaluation.harness`),
of the posterior mean and of one posterior sample; the gain in dB of the mean over the baseline;
the calibration of the posterior std, as the fraction of entries (pixels x channels) with
|mean - truth| <= 2 std and the average std; the network forward evaluations (NFE),
vector-Jacobian products (VJPs) and seconds of sampling. A run that diverges
(`evaluation.has_diverged`) is reported as "diverged". A summary averages over images per task
and covariance, and states whether on SR x4 (average) the posterior mean beats bicubic by at
least 1.5 dB on every image. The baseline table adds the inputs themselves (masked, noisy).
--figure writes a PNG of the sr4 restorations.

With N samples the std is estimated from N draws, so even exact posterior samples do not cover
95% of the truth within 2 std: the report gives the coverage that calibrated samples reach at
this N (`metrics.calibrated_coverage`, Student t with N - 1 degrees of freedom).

Run from the repository root. The default run (40 runs at 128x128, 4 samples, 50 steps) takes of
the order of an hour on two CPU cores, most of it in the Tweedie runs; --quick takes seconds.

    python -m benchmarks.image_restoration --figure docs/image_restoration.png   # writes docs/image_restoration.md
    python -m benchmarks.image_restoration --quick --out /tmp/image_restoration.md
    python -m benchmarks.image_restoration --model path/to/ddpm_pipeline_folder --tasks sr4,denoise
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import posterior_diff
from posterior_diff import Denoiser, default_model, load_model
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import (DIVERGED, DIVERGENCE_BOUND, HELD_OUT_PHOTOGRAPHS, SIMULATED_TASKS,
                                               Measurement, baselines, display_std, load_photograph, measure,
                                               nearest_upsample, psnr_ssim, restore_unless_diverged)
from posterior_diff.evaluation.metrics import calibrated_coverage, coverage_within_two_std
from posterior_diff.images import save_panels
from posterior_diff.tasks import get_task

from .reporting import embedded_model, markdown_table, write_report

TASKS = ("sr4", "sr4-bicubic", "box", "random", "denoise")  # the default tasks, those of docs/image_restoration.md
GAIN_TARGET_DB = 1.5
QUICK = dict(size=64, steps=10, samples=2, images=HELD_OUT_PHOTOGRAPHS[:1], tasks=("sr4", "denoise"), covariances=("isotropic",))
FULL = dict(size=128, steps=IMAGE_DEFAULTS.steps, samples=4, images=HELD_OUT_PHOTOGRAPHS, tasks=TASKS,
            covariances=("isotropic", "tweedie"))


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
class BaselineRow:
    """One classical estimate (or an input) on one image and task."""

    image: str
    task: str
    name: str
    psnr: float
    ssim: float


@dataclass
class Figure:
    """The sr4 images of one photograph: truth, measurement, bicubic and, per covariance, (mean, sample, std) or None."""

    truth: Tensor
    y: Tensor
    bicubic: Tensor
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
    parser.add_argument("--images", type=comma_list(HELD_OUT_PHOTOGRAPHS), help="subset of the held-out photographs (default all)")
    parser.add_argument("--tasks", type=comma_list(SIMULATED_TASKS), help=f"subset of {','.join(SIMULATED_TASKS)} (default {','.join(TASKS)})")
    parser.add_argument("--covariances", type=comma_list(posterior_diff.COVARIANCES),
                        help=f"averaged-likelihood covariances, subset of {','.join(posterior_diff.COVARIANCES)} (default isotropic,tweedie)")
    parser.add_argument("--samples", type=int, help="posterior samples per run (default 4; at least 2 for a std)")
    parser.add_argument("--steps", type=int, help=f"sampler steps (default {IMAGE_DEFAULTS.steps})")
    parser.add_argument("--size", type=int, help="side of the centre crop in pixels (default 128)")
    parser.add_argument("--downscale", type=float, default=2.0, help="shrink each photograph by this factor before cropping")
    parser.add_argument("--cg-max-iter", type=int, default=IMAGE_DEFAULTS.cg_max_iter, help="conjugate-gradient cap of the Tweedie covariance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the measurements (noise, random mask) and of the sampler")
    parser.add_argument("--model", type=Path, help="diffusers DDPM pipeline folder (default: the embedded default model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads stall 20x whenever "
                             "another process holds a core; 2 is faster on an idle one)")
    parser.add_argument("--out", type=Path, default=Path("docs/image_restoration.md"), help="markdown file to write")
    parser.add_argument("--figure", type=Path, help="also write a PNG of the sr4 restorations here")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for settings that cannot run."""
    if args.samples < 2:
        parser.error("--samples must be >= 2: the posterior std needs at least two samples")
    if args.steps < 1 or args.cg_max_iter < 1:
        parser.error("--steps and --cg-max-iter must be >= 1")
    factor = math.lcm(*(get_task(task).factor or 1 for task in args.tasks))
    if args.size % factor:
        parser.error(f"--size must be a multiple of {factor} for the super-resolution tasks, got {args.size}")
    if args.downscale < 1:
        parser.error("--downscale must be >= 1")
    if args.figure and "sr4" not in args.tasks:
        parser.error("--figure shows the sr4 task: include sr4 in --tasks")


# -- the study -------------------------------------------------------------------------


def run_restoration(model: Denoiser, image: str, covariance: str, truth: Tensor, measurement: Measurement,
                    baseline: tuple[str, float, float], args: argparse.Namespace):
    """restore() once; returns the Run and the (mean, sample, std) images, or None if the sampler diverged."""
    run = Run(image, measurement.task.name, covariance, *baseline)
    result = restore_unless_diverged(
        measurement.y, measurement.operator, model, num_samples=args.samples, steps=args.steps, covariance=covariance,
        generator=torch.Generator().manual_seed(args.seed), cg_max_iter=args.cg_max_iter, device=args.device,
    )
    if result is None:
        run.diverged = True
        return run, None
    mean, sample, std = (tensor.cpu() for tensor in (result.mean, result.samples[0], result.std))
    run.mean_psnr, run.mean_ssim = psnr_ssim(mean, truth)
    run.sample_psnr, _ = psnr_ssim(sample, truth)
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
        return names + [DIVERGED] + [""] * (len(RUN_HEADER) - len(names) - 1)
    return names + [
        f"{run.mean_psnr:.2f}", f"{run.mean_ssim:.3f}", f"{run.sample_psnr:.2f}", f"{run.gain:+.2f}",
        f"{run.coverage:.3f}", f"{run.average_std:.4f}", str(run.nfe), str(run.vjps), f"{run.seconds:.1f}",
    ]


def run_study(model: Denoiser, args: argparse.Namespace) -> tuple[list[Run], list[BaselineRow], dict[str, Figure]]:
    """Every image x task x covariance; prints each run's row as it completes.

    Returns the runs, the baseline rows and the sr4 figures per image. Each (image, task) is
    measured once, so every covariance restores the same y.
    """
    runs, baseline_rows, figures = [], [], {}
    print("| " + " | ".join(RUN_HEADER) + " |", flush=True)
    for image in args.images:
        truth = load_photograph(image, args.size, args.downscale)
        for task in args.tasks:
            measurement = measure(task, truth, generator=torch.Generator().manual_seed(args.seed))
            estimates = baselines(measurement)
            scores = {name: psnr_ssim(estimate, truth) for name, estimate in estimates.items()}
            baseline_rows += [BaselineRow(image, task, name, *score) for name, score in scores.items()]
            reference = measurement.task.baseline
            if task == "sr4":
                figures[image] = Figure(truth, measurement.y, estimates[reference], {})
            for covariance in args.covariances:
                run, images = run_restoration(model, image, covariance, truth, measurement, (reference, *scores[reference]), args)
                runs.append(run)
                if task == "sr4":
                    figures[image].restorations[covariance] = images
                print("| " + " | ".join(format_run(run)) + " |", flush=True)
    return runs, baseline_rows, figures


# -- the report --------------------------------------------------------------------------


SUMMARY_HEADER = ["task", "covariance", "images", "diverged", "base PSNR", "mean PSNR", "mean SSIM", "sample PSNR",
                  "gain dB", "min gain dB", "cover 2 std", "avg std", "NFE", "VJPs", "s"]


def summary_row(task: str, covariance: str, group: list[Run]) -> list[str]:
    """The SUMMARY_HEADER columns of one task and covariance: averages over the runs that did not diverge."""
    done = [run for run in group if not run.diverged]
    row = [task, covariance, str(len(group)), str(len(group) - len(done))]
    if not done:
        return row + [""] * (len(SUMMARY_HEADER) - len(row))

    def average(field: str) -> float:
        return statistics.fmean(getattr(run, field) for run in done)

    return row + [
        f"{average('baseline_psnr'):.2f}", f"{average('mean_psnr'):.2f}", f"{average('mean_ssim'):.3f}",
        f"{average('sample_psnr'):.2f}", f"{average('gain'):+.2f}", f"{min(run.gain for run in done):+.2f}",
        f"{average('coverage'):.3f}", f"{average('average_std'):.4f}", f"{average('nfe'):.0f}",
        f"{average('vjps'):.0f}", f"{average('seconds'):.1f}",
    ]


def summary_table(runs: list[Run], args: argparse.Namespace) -> str:
    """Averages over the images per task and covariance (diverged runs are counted, not averaged)."""
    rows = [summary_row(task, covariance, [run for run in runs if run.task == task and run.covariance == covariance])
            for task in args.tasks for covariance in args.covariances]
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
            verdict = f"no ({DIVERGED} on {', '.join(diverged)})"
        else:
            worst = min(group, key=lambda run: run.gain)
            met = "yes" if worst.gain >= GAIN_TARGET_DB else "no"
            verdict = f"{met} (smallest gain {worst.gain:+.2f} dB, on {worst.image})"
        lines.append(f"- SR x4 (average), covariance {covariance}: posterior-mean PSNR at least {GAIN_TARGET_DB} dB "
                     f"above bicubic on every image ({len(group)}): **{verdict}**")
    return lines


def introduction(args: argparse.Namespace) -> str:
    """What was measured and how (the paragraph under the title)."""
    tasks = "; ".join(f"{task}: {get_task(task).description}, sigma_y = {get_task(task).sigma_y:g}" for task in args.tasks)
    return (
        f"Posterior sampling with `posterior_diff.restore` on held-out scikit-image photographs ({', '.join(args.images)}), "
        f"each shrunk by {args.downscale:g} and centre-cropped to {args.size}x{args.size}, in [0, 1] units. "
        f"Tasks: {tasks}. Each (image, task) is measured once (seed {args.seed}) and restored with every covariance "
        f"of the averaged likelihood; {args.samples} samples per run, {args.steps} steps of the default sampler, "
        f"Tweedie conjugate gradient capped at {args.cg_max_iter} iterations. PSNR (dB) and SSIM from "
        "`skimage.metrics` with data_range = 1. `baseline` is the task's reference classical estimate the gain is "
        "measured against (`posterior_diff.evaluation.harness.baselines`: bicubic upsampling of y for super-resolution, a "
        "biharmonic fill of the holes for inpainting, BM3D for denoising; all clipped to [0, 1]). `mean` is the "
        "posterior mean, `sample` the first posterior sample. `cover 2 std` is the fraction of entries with "
        f"|mean - truth| <= 2 std, `avg std` the average posterior std; calibrated posterior samples reach a coverage of "
        f"{calibrated_coverage(args.samples):.3f} with {args.samples} samples (Student t with {args.samples - 1} degrees "
        "of freedom; 0.954 only for many samples); for denoising, sampled from y, restore's mean is the exact "
        f"posterior mean (Tweedie's E[x | y], the run's first forward) and calibrated samples reach "
        f"{calibrated_coverage(args.samples, exact_mean=True):.3f}. NFE = denoiser evaluations and VJPs = vector-Jacobian products per "
        "run (on the batch of samples), s = seconds of sampling per run. \"diverged\" = the sampler raised "
        f"NonFiniteSampleError or returned non-finite samples or samples beyond {DIVERGENCE_BOUND:g} "
        "(`posterior_diff.evaluation.harness.has_diverged`)."
    )


def write_figure(figures: dict[str, Figure], covariances: tuple[str, ...], path: Path) -> None:
    """A PNG with one row per image: low-res (nearest), bicubic, (mean, sample, std) per covariance, truth.

    The std is averaged over the channels and divided by its maximum; a diverged run leaves grey tiles.
    """
    titles = ["low-res", "bicubic"] + [f"{kind} {covariance}" for covariance in covariances for kind in ("mean", "sample", "std")] + ["truth"]
    rows = []
    for figure in figures.values():
        tiles = [nearest_upsample(figure.y, tuple(figure.truth.shape)), figure.bicubic]
        for covariance in covariances:
            restored = figure.restorations.get(covariance)
            if restored is None:
                tiles += [torch.full_like(figure.bicubic, 0.5)] * 3
                continue
            mean, sample, std = restored
            tiles += [mean, sample, display_std(std)]
        rows.append(tiles + [figure.truth])
    save_panels(rows, titles, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        model, model_name = default_model(torch.float32), f"the embedded default model (`posterior_diff/models/default_model`: {embedded_model()})"
    else:
        model, model_name = load_model(args.model), f"`{args.model}`"
    start = time.perf_counter()
    runs, baseline_rows, figures = run_study(model, args)
    sections = [
        "## Per image",
        markdown_table(RUN_HEADER, [format_run(run) for run in runs]),
        "## Summary (averaged over images)",
        summary_table(runs, args),
        "\n".join(super_resolution_verdicts(runs, args)),
        "## Baselines",
        "The first row of each (image, task) is the reference baseline; the inputs themselves follow.",
        markdown_table(["image", "task", "baseline", "PSNR", "SSIM"],
                       [[row.image, row.task, row.name, f"{row.psnr:.2f}", f"{row.ssim:.3f}"] for row in baseline_rows]),
    ]
    if args.figure:
        write_figure(figures, args.covariances, args.figure)
        sections.append(f"Figure `{args.figure}`: sr4, one row per image ({', '.join(figures)}); columns: low-res "
                        "(nearest upsampling), bicubic, then posterior mean, one sample and std (normalised) per "
                        "covariance, truth.")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    write_report(args.out, "Image restoration with the default diffusion prior", introduction(args), sections,
                 module="benchmarks.image_restoration", argv=args.argv, minutes=(time.perf_counter() - start) / 60,
                 details=[f"model: {model_name}, {parameters:,} parameters", f"device: {args.device}"])


if __name__ == "__main__":
    main()
