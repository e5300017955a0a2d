"""Warm or cold Tweedie solves on images, against the number of steps: writes docs/warm_start.md.

The Tweedie covariance solves C u = r (C = sigma_y^2 I + (sigma^2/alpha) A J A^T) by conjugate
gradient at every step, capped at a few iterations for image models. The solve can start from
the previous step's solution, moved by the change of the isotropic solve (warm), or from the
isotropic solve itself (cold); see docs/theory.md §5. On the analytic priors the warm start
halves the VJPs at the same exactness. This table asks what it does on images:

1. Posterior-mean PSNR of `restore` (covariance="tweedie", restore's CG cap, guided from the
   prior, --samples samples) for warm and cold starts at each of --steps, on the held-out
   photographs (64x64 crops) for SR x4 and 70% random inpainting, with VJPs and seconds.
2. What the solves did, on the first image's random inpainting at the largest --steps: per
   stretch of the run (from high noise to low), the fraction of per-sample solves whose
   relative residual ||r - C u|| / ||r|| stayed above 1 (worse than u = 0) and the median
   relative residual.

    python -m benchmarks.warm_start                          # about 30 min on one core
    python -m benchmarks.warm_start --quick --out /tmp/warm_start.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from posterior_diff import default_model, restore
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import HELD_OUT_PHOTOGRAPHS, measure, psnr_ssim
from posterior_diff.images import measurement_to_model_units
from posterior_diff.sampling.guidance import AveragedLikelihoodGuidance, GuidanceSettings
from posterior_diff.sampling.samplers import SamplerSettings, run_sampler

from .jacobian_range import held_out_crops
from .reporting import ResultCache, comma_numbers, embedded_model, log_row, markdown_table, write_report

STARTS = {"warm": True, "cold": False}
STRETCHES = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one image, 16x16, 2 samples, 3 and 6 steps (seconds)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=comma_numbers(int), default=(20, 50, 100), help="comma list of sampler steps")
    parser.add_argument("--tasks", default="sr4,random", help="comma list of tasks (posterior_diff.tasks)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/warm_start.md"))
    parser.add_argument("--cache", type=Path, help="JSON cache of finished runs (default: the report's name, .json)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.tasks = tuple(args.tasks.split(","))
    args.images = HELD_OUT_PHOTOGRAPHS
    if args.quick:
        args.images, args.size, args.samples, args.steps = HELD_OUT_PHOTOGRAPHS[:1], 16, 2, (3, 6)
    args.cache = args.cache or args.out.with_suffix(".json")
    return args


def restore_row(model, truth: torch.Tensor, task: str, steps: int, warm: bool, samples: int) -> dict:
    """PSNR of the posterior mean, VJPs and seconds of one restore."""
    measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
    result = restore(measurement.y, measurement.operator, model, num_samples=samples, steps=steps,
                     covariance="tweedie", warm_start=warm, start="prior", antithetic=False, eta=1.0,
                     generator=torch.Generator().manual_seed(0))
    return dict(psnr=psnr_ssim(result.mean, truth)[0], vjps=result.vjps, seconds=result.seconds)


def solve_record(model, truth: torch.Tensor, task: str, steps: int, warm: bool, samples: int) -> list[list[float]]:
    """Each Tweedie solve's per-sample relative residuals, in the order of the run's steps."""
    measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
    y, operator = measurement_to_model_units(measurement.y, measurement.operator, model.data_range)  # as restore does
    settings = GuidanceSettings("tweedie", cg_max_iter=IMAGE_DEFAULTS.cg_max_iter, warm_start=warm)
    guidance = AveragedLikelihoodGuidance.from_settings(model, operator, y.expand(samples, *y.shape), settings)
    run_sampler(guidance, (samples, *truth.shape), SamplerSettings(steps=steps), generator=torch.Generator().manual_seed(0))
    return [residuals.tolist() for residuals in guidance.cg_residuals]


def stretch_rows(record: list[list[float]]) -> list[list[str]]:
    """STRETCHES equal stretches of the run: fraction of solves worse than u = 0, median residual."""
    rows, size = [], max(1, len(record) // STRETCHES)
    for first in range(0, len(record), size):
        values = [value for solve in record[first:first + size] for value in solve]
        rows.append([f"{first + 1}-{min(first + size, len(record))}", f"{sum(v > 1 for v in values) / len(values):.2f}",
                     f"{statistics.median(values):.3g}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = default_model(torch.float32)
    cache = ResultCache(args.cache, dict(size=args.size, samples=args.samples, images=list(args.images),
                                         model=embedded_model(), cg_max_iter=IMAGE_DEFAULTS.cg_max_iter))
    truths = held_out_crops(args.images, args.size)
    rows = []
    for steps in args.steps:
        for task in args.tasks:
            cells = {}
            for start, warm in STARTS.items():
                runs = [cache.get(f"{steps}|{task}|{image}|{start}",
                                  lambda: restore_row(model, truth, task, steps, warm, args.samples))
                        for image, truth in truths.items()]
                cells[start] = runs
                log_row(steps, task, start, f"{statistics.fmean(r['psnr'] for r in runs):.2f} dB")
            rows.append([task, str(steps), *(f"{statistics.fmean(r['psnr'] for r in cells[s]):.2f}" for s in STARTS),
                         *(f"{statistics.fmean(r['vjps'] for r in cells[s]):.0f}" for s in STARTS),
                         *(f"{statistics.fmean(r['seconds'] for r in cells[s]):.1f}" for s in STARTS)])
    image, steps = args.images[0], max(args.steps)
    diagnostics = {start: stretch_rows(cache.get(f"solves|{steps}|{image}|{start}",
                                                 lambda: solve_record(model, truths[image], "random", steps, warm,
                                                                      args.samples)))
                   for start, warm in STARTS.items()}
    solves = [[w[0], w[1], c[1], w[2], c[2]] for w, c in zip(diagnostics["warm"], diagnostics["cold"])]
    write_report(args.out, "Warm or cold Tweedie solves on images", __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], [
        f"## 1. PSNR against steps\n\n{len(truths)} images, {args.size}x{args.size}, {args.samples} samples, CG cap "
        f"{IMAGE_DEFAULTS.cg_max_iter}; PSNR (dB), VJPs and seconds per restoration, averaged over the images.\n\n"
        + markdown_table(["task", "steps", "warm PSNR", "cold PSNR", "warm VJPs", "cold VJPs", "warm s", "cold s"], rows),
        f"## 2. The solves of one run\n\n{image}, random inpainting, {steps} steps: the steps in {STRETCHES} stretches "
        "from high noise to low; per-sample solves with a relative residual above 1, and the median.\n\n"
        + markdown_table(["steps", "warm: residual > 1", "cold: residual > 1", "warm: median residual",
                          "cold: median residual"], solves),
    ], module="benchmarks.warm_start", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[embedded_model(), f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
