"""Denoising from the measurement: the exact start against guided sampling and DDRM; writes docs/denoising_start.md.

For denoising (A = I) the measurement y = x + sigma_y n is the diffusion's forward process at
the time t* where sigma / alpha = sigma_y, so p(x | y) = p(x_0 | x_t* = alpha(t*) y) and the
unguided reverse SDE from there samples the posterior exactly (`restore(start="measurement")`,
what start="auto" picks for denoising). This table puts it beside the guided sampler started
from the prior (start="prior": projection and isotropic covariances) and deepinv's DDRM, on the
four held-out photographs (shrunk by 2, centre crops of --size, sigma_y 0.1 as in
`posterior_diff.tasks`), with --samples samples and the embedded model:

- samples' mean PSNR: of the mean of the samples, averaged over the images;
- restore's mean PSNR: of `Restoration.mean`, which from the measurement is Tweedie's
  E[x | y] = D(alpha(t*) y, t*) itself (the run's first forward, whatever eta and steps), elsewhere the
  samples' mean;
- cover 2 std: the fraction of pixels with |samples' mean - truth| <= 2 std, against what exact
  posterior samples reach at this N (`metrics.calibrated_coverage`): below it the samples are too alike;
- avg std: the average posterior std; NFE and VJPs per sample batch; seconds per image.

eta < 1 makes the run from the one point alpha y more and more deterministic (eta = 0: every
sample the same), which raises the PSNR of a small-N mean while its std stops meaning anything.
One step at eta = 0 is Tweedie's formula at t*: D(alpha(t*) y, t*) = E[x | y] under the model,
the posterior mean itself (not a sample), in one network forward. That is why restore returns it
as the mean of every run from y: exact samples for the std (eta 1) and the exact mean beside them,
where the samples' own mean would pay the (1 + 1/N) factor and more.

    python -m benchmarks.denoising_start                      # about 5 min on one core
    python -m benchmarks.denoising_start --quick --out /tmp/denoising_start.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from posterior_diff import default_model, restore
from posterior_diff.evaluation.harness import HELD_OUT_PHOTOGRAPHS, baselines, measure, psnr_ssim
from posterior_diff.evaluation.metrics import calibrated_coverage, coverage_within_two_std

from .jacobian_range import held_out_crops
from .peers import run_peer
from .reporting import embedded_model, log_row, markdown_table, write_report

STEPS = (1, 5, 10, 20, 50)
ETAS = (1.0, 0.5, 0.0)
PRIOR_START = (("projection", 20), ("projection", 50), ("isotropic", 20), ("isotropic", 50))
DDRM_STEPS = (20, 50)


@dataclass
class Setting:
    """One row of the table: who samples, from where, and how."""

    method: str
    start: str
    eta: float | None
    steps: int


@dataclass
class Scores:
    psnr: float
    restore_psnr: float
    coverage: float
    std: float
    nfe: int
    vjps: int
    seconds: float


def settings(args: argparse.Namespace) -> list[Setting]:
    rows = [Setting("ours", "measurement", eta, steps) for eta in ETAS for steps in args.steps]
    rows += [Setting(f"ours {covariance}", "prior", 1.0, steps) for covariance, steps in args.prior_start]
    rows += [Setting("deepinv ddrm", "", None, steps) for steps in args.ddrm_steps]
    return rows


def run_one(model, setting: Setting, measurement, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int, int, float]:
    """(samples (N, C, H, W) in [0, 1], the returned mean (C, H, W), NFE, VJPs, seconds) of one
    setting on one measurement; DDRM's mean is its samples' mean."""
    if setting.method == "deepinv ddrm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_peer("ddrm", model, measurement.operator, measurement.y, args.samples, setting.steps)
        samples = run.samples.clamp(0, 1)
        return samples, samples.mean(0), run.nfe, 0, run.seconds
    covariance = setting.method.split()[1] if " " in setting.method else "projection"
    result = restore(measurement.y, measurement.operator, model, num_samples=args.samples, steps=setting.steps,
                     covariance=covariance, eta=setting.eta, start=setting.start, antithetic=False,
                     generator=torch.Generator().manual_seed(0))
    return result.samples, result.mean, result.nfe, result.vjps, result.seconds


def score(model, setting: Setting, truths: dict[str, torch.Tensor], args: argparse.Namespace) -> Scores:
    """The setting's scores averaged over the images."""
    per_image = []
    for image, truth in truths.items():
        measurement = measure("denoise", truth, generator=torch.Generator().manual_seed(0))
        samples, restored_mean, nfe, vjps, seconds = run_one(model, setting, measurement, args)
        mean, std = samples.mean(0), samples.std(0)
        per_image.append(Scores(psnr_ssim(mean, truth)[0], psnr_ssim(restored_mean, truth)[0],
                                coverage_within_two_std(mean, std, truth), float(std.mean()), nfe, vjps, seconds))
        log_row(image, setting.method, setting.start, f"eta {setting.eta}", f"{setting.steps} steps",
                f"{per_image[-1].psnr:.2f} dB", seconds)
    return Scores(*(statistics.fmean(getattr(s, field) for s in per_image)
                    for field in ("psnr", "restore_psnr", "coverage", "std")),
                  per_image[0].nfe, per_image[0].vjps, statistics.fmean(s.seconds for s in per_image))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one image, 16x16, 2 samples, few settings (seconds)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/denoising_start.md")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.images, args.steps, args.prior_start, args.ddrm_steps = HELD_OUT_PHOTOGRAPHS, STEPS, PRIOR_START, DDRM_STEPS
    if args.quick:
        args.images, args.size, args.samples = HELD_OUT_PHOTOGRAPHS[:1], 16, 2
        args.steps, args.prior_start, args.ddrm_steps = (3,), (("projection", 3),), (3,)
    return args


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = default_model(torch.float32)
    truths = held_out_crops(args.images, args.size)
    bm3d = statistics.fmean(psnr_ssim(next(iter(baselines(measure("denoise", truth, generator=torch.Generator()
                                                                    .manual_seed(0))).values())), truth)[0]
                            for truth in truths.values())
    rows = []
    for setting in settings(args):
        s = score(model, setting, truths, args)
        rows.append([setting.method, setting.start, "" if setting.eta is None else f"{setting.eta:g}", str(setting.steps),
                     str(s.nfe), str(s.vjps), f"{s.psnr:.2f}", f"{s.restore_psnr:.2f}", f"{s.coverage:.3f}", f"{s.std:.4f}",
                     f"{s.seconds:.1f}"])
    write_report(Path(args.out), "Denoising from the measurement", __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], [
        f"BM3D (given the true sigma_y): {bm3d:.2f} dB. Exact posterior samples cover {calibrated_coverage(args.samples):.3f} "
        f"of the pixels within 2 std at N = {args.samples}. DDRM runs with deepinv's defaults (eta 0.85, eta_b 1).",
        markdown_table(["method", "start", "eta", "steps", "NFE", "VJPs", "samples' mean PSNR (dB)",
                        "restore's mean PSNR (dB)", "cover 2 std", "avg std",
                        "s per image"], rows),
    ], module="benchmarks.denoising_start", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[embedded_model(), f"{len(truths)} images, {args.size}x{args.size}, {args.samples} samples, {args.threads} thread(s)"])


if __name__ == "__main__":
    main()
