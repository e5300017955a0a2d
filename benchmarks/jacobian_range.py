"""Where a network's Jacobian helps the guidance: writes docs/jacobian_range.md.

Every covariance but "projection" pulls the likelihood gradient back through the network's
Jacobian, one VJP (or a few CG products) per step. At high noise that Jacobian is learned least
well and its errors are amplified by s^2 = (sigma / alpha)^2 (docs/theory.md §5): a step there
throws the guided mean to the clipping bounds. `jacobian_s_max` takes the Jacobian the Gaussian
approximation implies (the projection step, no VJP) above a noise ratio s. Two tables:

1. **The choice, on the validation photographs** (`training_data.VALIDATION_FILES`, kept out of
   training and out of the evaluation): posterior-mean PSNR and VJPs of `restore` for each
   covariance and each jacobian_s_max in --s-max, at the image defaults' steps, for SR x4 and 70%
   random inpainting and a centred box hole a quarter of the side. The default covariance takes the
   value of fewest VJPs within 0.05 dB of the best mean PSNR over the tasks, among those that pass a
   guard on the held-out photographs at the default steps: no task more than 0.1 dB below inf.
2. **The check, on the held-out photographs**: the chosen value against inf (the network's
   Jacobian at every step) for each covariance at --steps, with seconds, including the few-step
   runs where the network's Jacobian at high noise used to wreck the restoration.

    python -m benchmarks.jacobian_range                               # about 20 min on 2 cores
    python -m benchmarks.jacobian_range --quick --out /tmp/jacobian_range.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from posterior_diff import default_model, restore
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import HELD_OUT_PHOTOGRAPHS, load_photograph, measure, psnr_ssim
from posterior_diff.images import match_channels, read_image
from posterior_diff.training.data import VALIDATION_FILES

from .reporting import (TIE_DB, ResultCache, cheapest_of_the_best, comma_numbers, embedded_model, log_row,
                        markdown_table, photograph_cache, write_report)
from .training_curve import centre_crops, shrink_to_short_side

COVARIANCES = ("zero", "isotropic", "diagonal", "tweedie")  # the ones that take VJPs
S_MAX = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
TASKS = ("sr4", "random", "box")
GUARD_DB = 0.1  # how far below inf, on any task of the held-out guard, a chosen value may fall


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one image, 16x16, 2 samples, few values (seconds)")
    parser.add_argument("--size", type=int, default=64, help="side of the centre crops")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--s-max", type=comma_numbers(float), default=S_MAX, help="comma list of jacobian_s_max values")
    parser.add_argument("--steps", type=comma_numbers(int), default=(5, 10, 20), help="comma list of sampler steps of table 2")
    parser.add_argument("--validation", nargs="+", default=VALIDATION_FILES, metavar="FILE",
                        help="the photographs of table 1 (default: training_data.VALIDATION_FILES)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/jacobian_range.md"))
    parser.add_argument("--cache", type=Path, help="JSON cache of finished runs (default: the report's name, .json)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.validation, args.held_out = tuple(args.validation), HELD_OUT_PHOTOGRAPHS
    if args.quick:
        args.size, args.samples, args.s_max, args.steps = 16, 2, (1.0, math.inf), (3,)
        args.validation, args.held_out = args.validation[:1], HELD_OUT_PHOTOGRAPHS[:1]
    if math.inf not in args.s_max:
        parser.error("--s-max must include inf (the network's Jacobian at every step), the reference")
    args.cache = args.cache or args.out.with_suffix(".json")
    return args


def validation_crops(files: tuple[str, ...], size: int) -> dict[str, torch.Tensor]:
    """The validation photographs as training_curve scores them (shrunk, centre crops), (3, size, size) in [0, 1].

    Raises:
        FileNotFoundError: naming the Debian package's file that is not installed here.
    """
    images = []
    for file in files:
        if not Path(file).exists():
            raise FileNotFoundError(f"validation photograph {file} is not installed: `python "
                                    "scripts/train_default_model.py --list-data` installs its Debian package")
        images.append(shrink_to_short_side(match_channels(read_image(file), 3) * 2 - 1))
    return {photograph_name(file): crop for file, crop in zip(files, centre_crops(images, size))}


def held_out_crops(names, size: int) -> dict[str, torch.Tensor]:
    """The held-out photographs `names` as the photograph reports restore them (halved, size x size
    centre crops, `harness.load_photograph`), (3, size, size) in [0, 1]."""
    return {name: load_photograph(name, size, 2.0) for name in names}


def photograph_name(file: str) -> str:
    """A short name: the wallpaper's folder for Plasma's NAME/contents/images/SIZE.jpg, else the file's stem."""
    path = Path(file)
    return path.parents[2].name if path.parent.name == "images" and path.parents[1].name == "contents" else path.stem


def restore_row(model, truth: torch.Tensor, task: str, covariance: str, s_max: float, steps: int, samples: int) -> dict:
    """PSNR of the posterior mean, VJPs and seconds of one guided restore (from the prior)."""
    measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
    result = restore(measurement.y, measurement.operator, model, num_samples=samples, steps=steps, covariance=covariance,
                     jacobian_s_max=s_max, start="prior", antithetic=False, eta=1.0,
                     generator=torch.Generator().manual_seed(0))
    return dict(psnr=psnr_ssim(result.mean, truth)[0], vjps=result.vjps, seconds=result.seconds)


def label(s_max: float) -> str:
    """A value of jacobian_s_max as the tables show it (∞: the network's Jacobian at every step)."""
    return "∞" if math.isinf(s_max) else f"{s_max:g}"


def mean_of(runs: list[dict], field: str) -> float:
    return statistics.fmean(run[field] for run in runs)


def table_cells(cache: ResultCache, model, truths: dict[str, torch.Tensor], label: str, covariance: str,
                s_max: float, steps: int, samples: int) -> dict[str, list[dict]]:
    """Per task, the runs over `truths` of one setting (cached under `label`)."""
    cells = {}
    for task in TASKS:
        cells[task] = [cache.get(f"{label}|{task}|{image}|{covariance}|{s_max}|{steps}",
                                 lambda truth=truth: restore_row(model, truth, task, covariance, s_max, steps, samples))
                       for image, truth in truths.items()]
        log_row(label, task, covariance, f"s_max {s_max}", f"{steps} steps", f"{mean_of(cells[task], 'psnr'):.2f} dB")
    return cells


def choose(scores: dict[float, tuple[float, float]], allowed: set[float] | None = None) -> float:
    """Among the `allowed` values (default: all), the fewest VJPs within TIE_DB of their best mean PSNR.
    `scores`: value -> (mean PSNR over the tasks, VJPs)."""
    candidates = [value for value in scores if allowed is None or value in allowed]
    return cheapest_of_the_best(candidates, lambda value: scores[value][0], lambda value: scores[value][1])


def guard(psnrs: dict[float, dict[str, float]]) -> set[float]:
    """The values no worse than inf by more than GUARD_DB on any task. `psnrs`: value -> task -> PSNR."""
    reference = psnrs[math.inf]
    return {value for value, tasks in psnrs.items()
            if all(tasks[task] >= reference[task] - GUARD_DB for task in reference)}


def choice_table(cache: ResultCache, model, validation: dict, args) -> tuple[list[list[str]], dict]:
    """Table 1's rows (per covariance and value: PSNR per task, their mean, VJPs) on the validation
    photographs, and the default covariance's scores: value -> (mean PSNR, VJPs)."""
    rows, scores = [], {}
    for covariance in COVARIANCES:
        for s_max in args.s_max:
            cells = table_cells(cache, model, validation, "validation", covariance, s_max, IMAGE_DEFAULTS.steps,
                                args.samples)
            psnrs = [mean_of(cells[task], "psnr") for task in TASKS]
            vjps = statistics.fmean(mean_of(cells[task], "vjps") for task in TASKS)
            if covariance == IMAGE_DEFAULTS.covariance:
                scores[s_max] = (statistics.fmean(psnrs), vjps)
            rows.append([f"{covariance}, {label(s_max)}", *(f"{p:.2f}" for p in psnrs), f"{statistics.fmean(psnrs):.2f}",
                         f"{vjps:.0f}"])
    return rows, scores


def guard_psnrs(cache: ResultCache, model, held_out: dict, args) -> dict[float, dict[str, float]]:
    """The guard's runs: the default covariance at the default steps on the held-out photographs,
    value -> task -> mean PSNR."""
    psnrs = {}
    for s_max in args.s_max:
        cells = table_cells(cache, model, held_out, "held-out", IMAGE_DEFAULTS.covariance, s_max, IMAGE_DEFAULTS.steps,
                            args.samples)
        psnrs[s_max] = {task: mean_of(cells[task], "psnr") for task in TASKS}
    return psnrs


def check_table(cache: ResultCache, model, held_out: dict, chosen: float, args) -> list[list[str]]:
    """Table 2's rows: per covariance and --steps, the chosen value and inf side by side (PSNR per
    task, VJPs, seconds) on the held-out photographs."""
    rows = []
    for covariance in COVARIANCES:
        for steps in args.steps:
            row = [covariance, str(steps)]
            for s_max in (chosen, math.inf):
                cells = table_cells(cache, model, held_out, "held-out", covariance, s_max, steps, args.samples)
                row += [*(f"{mean_of(cells[task], 'psnr'):.2f}" for task in TASKS),
                        f"{statistics.fmean(mean_of(cells[task], 'vjps') for task in TASKS):.0f}",
                        f"{statistics.fmean(mean_of(cells[task], 'seconds') for task in TASKS):.1f}"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = default_model(torch.float32)
    cache = photograph_cache(args, cg_max_iter=IMAGE_DEFAULTS.cg_max_iter, default_steps=IMAGE_DEFAULTS.steps)
    validation = validation_crops(args.validation, args.size)
    choice_rows, scores = choice_table(cache, model, validation, args)
    held_out = held_out_crops(args.held_out, args.size)
    guarded = guard_psnrs(cache, model, held_out, args)
    allowed = guard(guarded)
    chosen = choose(scores, allowed)
    guard_rows = [[label(s_max), *(f"{guarded[s_max][task]:.2f}" for task in TASKS),
                   "yes" if s_max in allowed else "no"] for s_max in args.s_max]
    check_rows = check_table(cache, model, held_out, chosen, args)
    per_setting = [f"{task} (dB)" for task in TASKS] + ["VJPs", "s"]
    write_report(args.out, "Where a network's Jacobian helps the guidance", __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], [
        f"## 1. The choice: validation photographs\n\n{len(validation)} validation photographs ({', '.join(validation)}), "
        f"{args.size}x{args.size} centre crops, {args.samples} samples, {IMAGE_DEFAULTS.steps} steps, CG cap "
        f"{IMAGE_DEFAULTS.cg_max_iter}; PSNR of the posterior mean and VJPs per restoration, averaged over the images.\n\n"
        + markdown_table(["covariance, jacobian_s_max", *(f"{task} (dB)" for task in TASKS), "mean (dB)", "VJPs"],
                         choice_rows)
        + f"\n\nThe guard, on the held-out photographs ({IMAGE_DEFAULTS.covariance}, {IMAGE_DEFAULTS.steps} steps): "
        f"a value passes if it is no worse than ∞ by more than {GUARD_DB} dB on any task. The validation photographs "
        "(wallpapers) are too easy to show what a large hole needs: there every value fills the box alike.\n\n"
        + markdown_table(["jacobian_s_max", *(f"held-out {task} (dB)" for task in TASKS), "passes"], guard_rows)
        + f"\n\nChosen for {IMAGE_DEFAULTS.covariance} among the values that pass (fewest VJPs within {TIE_DB} dB "
        f"of their best mean PSNR on the validation photographs): **jacobian_s_max = {label(chosen)}**.",
        f"## 2. The check: held-out photographs\n\n{len(held_out)} held-out photographs ({', '.join(held_out)}), halved, "
        f"{args.size}x{args.size} centre crops, {args.samples} samples; seconds per restoration on {args.threads} "
        f"thread(s).\n\n"
        + markdown_table(["covariance", "steps", *(f"s_max {label(chosen)}: {h}" for h in per_setting),
                          *(f"s_max ∞: {h}" for h in per_setting)], check_rows),
    ], module="benchmarks.jacobian_range", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[embedded_model(), f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
