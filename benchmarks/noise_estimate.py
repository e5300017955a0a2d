"""How well sigma_y="auto" finds the noise level: writes docs/noise_estimate.md.

`restore` estimates sigma_y from y where an operator has sigma_y="auto" (posterior_diff.noise_estimate).
Three parts, on the held-out photographs (128x128 centre crops, halved), one measurement each
(`evaluation.measure`, generator seed 0), for denoising, SR x4 (the 32x32 y) and 70% of the
pixels missing at random (the observed pixels), plus a centred box hole:

1. **The estimators**: the relative error (estimate / true sigma_y - 1) of scikit-image's
   `estimate_sigma` (wavelet MAD of the HH band, averaged over channels), deepinv's
   `WaveletNoiseEstimator` (needs ptwt) and `PatchCovarianceNoiseEstimator` at deepinv's default
   patches (8x8, stride 3) and at the chosen ones (4x4, stride 1; runs of 3 observed pixels where y
   has holes: `noise_estimate.estimate`), at true sigma_y in --sigmas. The wavelet estimators and
   the default patches see y with its holes at 0, as an image; the chosen one the observed pixels only.
   The choice: the smallest worst error over the tasks at sigma_y >= 0.025.
2. **How small a y**: the chosen estimator on random crops of each size (32 per size), whole and with
   70% missing, at sigma_y = 0.05: where too few patches make it read low (noise_estimate.MIN_PATCHES_PER_ENTRY).
3. **Restoration with "auto"**: posterior-mean PSNR of `restore` (the embedded model, restore's defaults,
   --samples samples, seed 0) with sigma_y="auto" and with the true sigma_y, at --restore-sigma.

    python -m benchmarks.noise_estimate                    # parts 1-2 in seconds; part 3 about 10 min on 2 cores
    python -m benchmarks.noise_estimate --skip-restore     # parts 1-2 only
    python -m benchmarks.noise_estimate --quick --out /tmp/noise_estimate.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from operators import NoiseView, random_mask
from posterior_diff import default_model, restore
from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS, load_photograph, measure, psnr_ssim
from posterior_diff.noise_estimate import (MIN_PATCHES_PER_ENTRY, estimate, minimum_patches, patch_covariance,
                                           patch_count, patch_image)

from .reporting import ResultCache, comma_numbers, embedded_model, log_row, markdown_table, write_report

TASKS = ("denoise", "sr4", "random", "box")
SIGMAS = (0.01, 0.025, 0.05, 0.1, 0.2)
TARGET = 0.15  # relative error the chosen estimator should stay within at sigma_y >= TARGET_FROM
TARGET_FROM = 0.025
CHOSEN = "deepinv patch covariance 4x4, stride 1; 3-pixel runs with holes (noise_estimate)"


def scikit_image(view: NoiseView) -> float:
    """scikit-image's wavelet estimator on the view's image, channels averaged."""
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(view.image.permute(1, 2, 0).double().numpy(), average_sigmas=True, channel_axis=-1))


def deepinv_wavelet(view: NoiseView) -> float | None:
    """deepinv's WaveletNoiseEstimator (db8 details, MAD); None without ptwt."""
    try:
        import ptwt  # noqa: F401
    except ImportError:
        return None
    from deepinv.models import WaveletNoiseEstimator

    return float(WaveletNoiseEstimator()(view.image[None].float()).mean())


def deepinv_default_patches(view: NoiseView) -> float:
    """deepinv's PatchCovarianceNoiseEstimator at its default 8x8 patches, stride 3 (NaN where it fails)."""
    from deepinv.models import PatchCovarianceNoiseEstimator

    try:
        return float(PatchCovarianceNoiseEstimator()(view.image[None].float()).mean())
    except RuntimeError:
        return float("nan")


def chosen(view: NoiseView) -> float | None:
    """The estimator of sigma_y="auto" (noise_estimate), None where it refuses."""
    image, patch_size, _ = patch_image(view)
    if patch_count(image, patch_size) < minimum_patches(image, patch_size):
        return None
    return patch_covariance(image, patch_size)


ESTIMATORS = {
    "scikit-image estimate_sigma (wavelet MAD)": scikit_image,
    "deepinv WaveletNoiseEstimator": deepinv_wavelet,
    "deepinv patch covariance 8x8, stride 3 (its default)": deepinv_default_patches,
    CHOSEN: chosen,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one image, 64x64, two noise levels, 2-step restores")
    parser.add_argument("--size", type=int, default=128, help="side of the centre crops")
    parser.add_argument("--sigmas", type=comma_numbers(float), default=SIGMAS)
    parser.add_argument("--restore-sigma", type=float, default=0.05, help="true sigma_y of part 3")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, help="sampler steps of part 3 (default: restore's)")
    parser.add_argument("--skip-restore", action="store_true", help="parts 1 and 2 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/noise_estimate.md"))
    parser.add_argument("--cache", type=Path, help="JSON cache of part 3's restores (default: the report's name, .json)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.photographs, args.crops = HELD_OUT_PHOTOGRAPHS, 32
    if args.quick:
        args.size, args.sigmas, args.samples, args.steps = 64, (0.05, 0.1), 1, 2
        args.photographs, args.crops = HELD_OUT_PHOTOGRAPHS[:1], 2
    args.cache = args.cache or args.out.with_suffix(".json")
    return args


def view_of(task: str, truth: torch.Tensor, sigma_y: float) -> tuple[NoiseView, NoiseView]:
    """One measurement's views: what the chosen estimator reads (the observed pixels), and y as an image."""
    measured = measure(task, truth, sigma_y=sigma_y, generator=torch.Generator().manual_seed(0))
    return measured.operator.noise_view(measured.y), NoiseView(measured.y)


def relative_errors(truths: dict[str, torch.Tensor], sigmas) -> dict[tuple[str, str, float], list[float | None]]:
    """Part 1: (estimator, task, sigma_y) -> the relative error per photograph (None: refused or n/a)."""
    errors = {}
    for task in TASKS:
        for sigma_y in sigmas:
            views = [view_of(task, truth, sigma_y) for truth in truths.values()]
            for name, estimator in ESTIMATORS.items():
                values = [estimator(masked if estimator is chosen else whole) for masked, whole in views]
                errors[name, task, sigma_y] = [None if v is None or v != v else v / sigma_y - 1 for v in values]
            log_row("estimators", task, f"sigma_y {sigma_y}")
    return errors


def mean_error(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    return f"{100 * statistics.fmean(kept):+.1f}" if len(kept) == len(values) else "n/a"


def worst_error(values: list[float | None]) -> str:
    kept = [abs(v) for v in values if v is not None]
    return f"{100 * max(kept):.1f}" if len(kept) == len(values) else "n/a"


def choose(errors: dict, sigmas) -> tuple[str, dict[str, float]]:
    """The estimator with the smallest worst relative error over the tasks at sigma_y >= TARGET_FROM
    (one that fails or refuses there counts as infinitely bad); and each estimator's worst error."""
    worst = {}
    for name in ESTIMATORS:
        values = [v for (n, task, s), vs in errors.items() if n == name and s >= TARGET_FROM for v in vs]
        worst[name] = max((abs(v) for v in values), default=float("inf")) if None not in values else float("inf")
    return min(worst, key=worst.get), worst


def small_crops(truths: dict[str, torch.Tensor], crops: int) -> list[list[str]]:
    """Part 2: the chosen estimator on `crops` random crops per size, whole and 70% missing, at sigma_y = 0.05."""
    sigma_y, rows = 0.05, []
    for kind, sizes in (("whole", (10, 13, 16, 24, 32)), ("70% missing", (16, 24, 32, 48, 64))):
        for size in sizes:
            errors, counts, needed = [], [], 0
            for truth in truths.values():
                for seed in range(crops // len(truths)):
                    generator = torch.Generator().manual_seed(seed)
                    top, left = torch.randint(0, truth.shape[-1] - size + 1, (2,), generator=generator).tolist()
                    crop = truth[:, top : top + size, left : left + size]
                    mask = random_mask(crop.shape, 0.7, generator=generator) if kind != "whole" else None
                    noisy = crop + sigma_y * torch.randn(crop.shape, generator=generator)
                    view = NoiseView(noisy, None) if mask is None else NoiseView(mask * noisy, mask)
                    image, patch_size, _ = patch_image(view)
                    counts.append(patch_count(image, patch_size))
                    needed = minimum_patches(image, patch_size)
                    value = patch_covariance(image, patch_size)
                    errors.append(value / sigma_y - 1 if value == value else -1.0)  # a failure reads -100%
            rows.append([kind, f"{size}x{size}", f"{min(counts)}-{max(counts)}", f"{statistics.fmean(counts) / needed * MIN_PATCHES_PER_ENTRY:.1f}",
                         f"{100 * statistics.fmean(errors):+.1f}", f"{100 * statistics.stdev(errors):.1f}",
                         f"{100 * max(map(abs, errors)):.1f}", "yes" if statistics.fmean(counts) >= needed else "no"])
            log_row("small crops", kind, size)
    return rows


def restore_psnr(model, truth: torch.Tensor, task: str, sigma_y: float, auto: bool, args) -> dict:
    """Part 3: PSNR of the posterior mean with sigma_y="auto" or the true one, and the sigma_y used."""
    measured = measure(task, truth, sigma_y=sigma_y, generator=torch.Generator().manual_seed(0))
    operator = measured.operator.with_sigma_y("auto") if auto else measured.operator
    try:
        result = restore(measured.y, operator, model, num_samples=args.samples, steps=args.steps, antithetic=False, eta=1.0,
                         generator=torch.Generator().manual_seed(0))
    except ValueError as error:  # the estimate refused (a y too small in --quick)
        return dict(psnr=None, sigma_y=None, seconds=None, refused=str(error))
    return dict(psnr=psnr_ssim(result.mean, truth)[0], sigma_y=result.sigma_y, seconds=result.seconds)


def restore_rows(truths: dict[str, torch.Tensor], args) -> list[list[str]]:
    """Part 3's rows: per task and photograph, sigma_y found, PSNR with it and with the true one."""
    model = default_model(torch.float32)
    cache = ResultCache(args.cache, dict(size=args.size, samples=args.samples, steps=args.steps, model=embedded_model(),
                                         sigma_y=args.restore_sigma))
    rows = []
    for task in ("denoise", "sr4", "random"):
        differences = []
        for name, truth in truths.items():
            runs = {auto: cache.get(f"{task}|{name}|{'auto' if auto else 'true'}",
                                    lambda auto=auto: restore_psnr(model, truth, task, args.restore_sigma, auto, args))
                    for auto in (True, False)}
            auto, true = runs[True], runs[False]
            if auto["psnr"] is None:
                rows.append([task, name, "n/a", "n/a", f"{true['psnr']:.2f}", "n/a"])
                continue
            differences.append(auto["psnr"] - true["psnr"])
            rows.append([task, name, f"{auto['sigma_y']:.4f}", f"{auto['psnr']:.2f}", f"{true['psnr']:.2f}",
                         f"{differences[-1]:+.2f}"])
            log_row("restore", task, name, f"{differences[-1]:+.2f} dB")
        if differences:
            rows.append([task, "mean", "", "", "", f"{statistics.fmean(differences):+.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    truths = {name: load_photograph(name, args.size, 2.0) for name in args.photographs}
    errors = relative_errors(truths, args.sigmas)
    best, worst = choose(errors, args.sigmas)
    header = ["estimator", "task", *(f"σ_y {s:g}" for s in args.sigmas)]
    mean_rows = [[name, task, *(mean_error(errors[name, task, s]) for s in args.sigmas)]
                 for name in ESTIMATORS for task in TASKS]
    worst_rows = [[name, task, *(worst_error(errors[name, task, s]) for s in args.sigmas)]
                  for name in ESTIMATORS for task in TASKS]
    chosen_rows = [[task, f"{s:g}", *(f"{100 * v:+.1f}" if v is not None else "n/a" for v in errors[CHOSEN, task, s])]
                   for task in TASKS for s in args.sigmas]
    within = all(v is not None and abs(v) <= TARGET for (n, task, s), vs in errors.items()
                 if n == CHOSEN and s >= TARGET_FROM for v in vs)
    sections = [
        f"## 1. The estimators\n\n{len(truths)} held-out photographs ({', '.join(truths)}), {args.size}x{args.size}; "
        "relative error of the estimate, 100 (estimate / true σ_y − 1) in %, **mean over the photographs** "
        "(n/a: the estimator failed or refused on some photograph; WaveletNoiseEstimator: n/a without ptwt). "
        "random and box: the wavelet estimators and the default patches read y with its holes at 0.\n\n"
        + markdown_table(header, mean_rows)
        + "\n\nThe **worst** |relative error| over the photographs, in %:\n\n" + markdown_table(header, worst_rows)
        + f"\n\nWorst |error| over the tasks at σ_y ≥ {TARGET_FROM:g}: "
        + ", ".join(f"{name} {100 * value:.0f}%" if value < float("inf") else f"{name} fails on some task"
                    for name, value in worst.items())
        + f". Chosen (smallest): **{best}**. The chosen estimator per photograph ({', '.join(truths)}), in %:\n\n"
        + markdown_table(["task", "σ_y", *truths], chosen_rows)
        + f"\n\nTarget: within {100 * TARGET:.0f}% wherever σ_y ≥ {TARGET_FROM:g}: "
        + ("**met** on every task and photograph." if within else "**not met** everywhere (see the table)."),
        f"## 2. How small a y\n\nThe chosen estimator on {args.crops} random crops per size of the photographs, "
        "σ_y = 0.05, whole or with 70% of the pixels missing at random; patches per entry of a patch (C·4·4 = 48 "
        f"whole, C·3 = 9 runs of 3 pixels); restore refuses below {MIN_PATCHES_PER_ENTRY} per entry. Error in %.\n\n"
        + markdown_table(["y", "size", "patches", "per entry", "mean error", "std", "worst abs. error", "estimated"],
                         small_crops(truths, args.crops)),
    ]
    if not args.skip_restore:
        sections.append(
            f"## 3. Restoration with sigma_y=\"auto\"\n\nThe embedded model, restore's defaults"
            f"{'' if args.steps is None else f' but {args.steps} steps'}, {args.samples} samples, seed 0; true σ_y = "
            f"{args.restore_sigma:g}; PSNR of the posterior mean (dB) with the estimated σ_y and with the true one.\n\n"
            + markdown_table(["task", "photograph", "σ_y found", "auto (dB)", "true σ_y (dB)", "auto − true (dB)"],
                             restore_rows(truths, args)))
    write_report(args.out, "sigma_y=\"auto\": the noise level estimated from y", __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
                 sections, module="benchmarks.noise_estimate", argv=args.argv,
                 minutes=(time.perf_counter() - began) / 60, details=[embedded_model(), f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
