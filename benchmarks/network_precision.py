"""The embedded model's network in bfloat16 against float32, on every task and every covariance.

Run it as `python -m benchmarks.network_precision` (`--quick` for a smoke run); it writes
docs/network_precision.md and picks up where it stopped (`--cache`).

A bfloat16 forward of the embedded UNet takes half the seconds of a float32 one on a CPU with
native bfloat16 (AVX512-BF16 / AMX; docs/speed.md); the sampler state, the guidance's solves and the
measurement stay float32 (`Denoiser.sampling_dtype`). Whether that precision costs quality is
checked here on the validation photographs (`training_data.VALIDATION_FILES`, never the held-out
ones): the posterior mean's PSNR of `restore` at the image defaults (4 samples, 20 steps) with the
float32 and the bfloat16 copy of the embedded model, the same seeds, for each task of `tasks.py`
that simulates its own measurement and each covariance. Denoising runs twice: from the measurement
(restore's default, one network forward, no covariance) and from the prior, where the covariance
matters. "Holds" means the bfloat16 mean PSNR is at most HOLD_DB below float32's. Where it is
further below at seed 0, both precisions run again at the seeds in RECHECK_SEEDS: the samples of a
large hole differ from seed to seed by more than that, and a bfloat16 network that perturbs the run
draws other samples. The row then holds where the mean difference over all seeds is at most HOLD_DB
below zero or within two standard errors of it (no loss that the seeds can tell from sampling noise).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posterior_diff.models.loading import default_model
from posterior_diff.sampling.guidance import COVARIANCES
from posterior_diff.training.data import VALIDATION_FILES

from .jacobian_range import validation_crops
from .pretrained_priors import mean_over, restore_row
from .reporting import (ResultCache, embedded_model, log_row, markdown_table, parse_photograph_run, photograph_cache,
                        photograph_run_parser, write_report)

# (row name, task, restore's start): denoising from the measurement does not use the covariance
TASKS = (("denoise, from the measurement", "denoise", "measurement"), ("denoise, from the prior", "denoise", "prior"),
         ("sr4", "sr4", "auto"), ("random", "random", "auto"), ("box", "box", "auto"),
         ("deblur", "deblur", "auto"), ("deblur-motion", "deblur-motion", "auto"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The most a bfloat16 network may lose, in mean PSNR over the photographs, for its quality to hold:
# twice the reports' tie (`reporting.TIE_DB`), below what a 4-image mean can tell apart.
HOLD_DB = 0.1
RECHECK_SEEDS = (1, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = photograph_run_parser("benchmarks.network_precision", __doc__, "docs/network_precision.md", size=64)
    args = parse_photograph_run(parser, argv)
    args.validation = VALIDATION_FILES[:1] if args.quick else VALIDATION_FILES
    return args


def covariances_of(start: str) -> tuple[str | None, ...]:
    return (None,) if start == "measurement" else COVARIANCES


def run_all(cache: ResultCache, args, models: dict) -> dict:
    """{(row, covariance): {dtype: [run per photograph and seed]}}: seed 0, and RECHECK_SEEDS where
    bfloat16 is more than HOLD_DB below float32 at seed 0."""
    crops = validation_crops(args.validation, args.size)
    table = {}
    for row, task, start in TASKS:
        for covariance in covariances_of(start):
            cell = table.setdefault((row, covariance), {})
            settings = dict(start=start) if covariance is None else dict(start=start, covariance=covariance)
            for seed in (0, *RECHECK_SEEDS):
                if seed and mean_over(cell["bfloat16"], "psnr") >= mean_over(cell["float32"], "psnr") - HOLD_DB:
                    break
                for dtype, model in models.items():
                    suffix = f"|seed {seed}" if seed else ""
                    cell.setdefault(dtype, []).extend(
                        cache.get(f"{row}|{covariance}|{dtype}|{image}{suffix}",
                                  lambda truth=truth, model=model: restore_row(model, truth, task, args.samples, seed,
                                                                               antithetic=False, eta=1.0, **settings))
                        for image, truth in crops.items())
                    log_row(row, covariance or "-", dtype, f"seed {seed}", f"{mean_over(cell[dtype], 'psnr'):.2f} dB",
                            mean_over(cell[dtype], "seconds"))
    return table


def rows_of(table: dict) -> tuple[list[list[str]], list[str]]:
    """A table row per (task, covariance) and the names of those where bfloat16 does not hold."""
    rows, failures = [], []
    for (row, covariance), cell in table.items():
        full, half = (mean_over(cell[d], "psnr") for d in DTYPES)
        differences = [h["psnr"] - f["psnr"] for f, h in zip(cell["float32"], cell["bfloat16"])]
        seconds = [mean_over(cell[d], "seconds") for d in DTYPES]
        standard_error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else 0.0
        holds = half - full >= -max(HOLD_DB, 2 * standard_error)
        if not holds:
            failures.append(f"{row}, {covariance}")
        runs = len(cell["float32"])
        rows.append([row, covariance or "-", str(runs), f"{full:.2f}", f"{half:.2f}", f"{half - full:+.2f} ± {standard_error:.2f}",
                     f"{min(differences):+.2f}", f"{seconds[0]:.1f}", f"{seconds[1]:.1f}", f"{seconds[1] / seconds[0]:.2f}",
                     "yes" if holds else "**no**"])
    return rows, failures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    models = {name: default_model(dtype) for name, dtype in DTYPES.items()}
    cache = photograph_cache(args)
    rows, failures = rows_of(run_all(cache, args, models))
    seconds_ratio = statistics.fmean(float(row[-2]) for row in rows)
    verdict = (f"bfloat16 holds on every task and covariance (at most {HOLD_DB} dB below float32, or within two "
               "standard errors of it over the seeds); its restorations "
               f"take {seconds_ratio:.2f}x float32's seconds on average." if not failures else
               f"bfloat16 does not hold on: {'; '.join(failures)}.")
    header = ["task", "covariance", "runs", "float32 (dB)", "bfloat16 (dB)", "difference ± s.e. (dB)", "worst run (dB)",
              "float32 s", "bfloat16 s", "s ratio", "holds"]
    write_report(args.out, "bfloat16 against float32: the embedded model's network precision",
                 __doc__.split("\n\n", 1)[1],
                 [f"## Validation photographs\n\n{len(args.validation)} validation photographs, {args.size}x{args.size} "
                  f"centre crops, {args.samples} samples, restore's image defaults and the same seeds for both "
                  f"precisions; seconds per restoration on {args.threads} thread(s). runs: photographs times "
                  "seeds (the seeds of RECHECK_SEEDS added where seed 0 showed a loss beyond HOLD_DB).\n\n"
                  + markdown_table(header, rows) + f"\n\n{verdict}"],
                 module="benchmarks.network_precision", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
                 details=[embedded_model(), f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
