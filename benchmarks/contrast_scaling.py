"""FFDNet asked above its trained range through contrast scaling, against the embedded diffusion model, and
averaged over flips and quarter turns.

Run it as `python -m benchmarks.contrast_scaling` (`--quick` for a smoke run); it needs the `ffdnet`
extra and writes docs/contrast_scaling.md in under a minute.

`models.contrast.contrast_scaled` asks a denoiser trained up to the level `top` about a level sigma above
it on the image at contrast c = top / sigma: exact if photographs at contrast c are as likely as at full
contrast. This report measures how good that assumption is where it matters, as a denoiser, one
network forward per level: the PSNR of D(x_0 + sigma n, sigma) against x_0 on the validation photographs
(`training_data.VALIDATION_FILES`, 128 x 128 centre crops as the other photograph reports take them, one
noise draw, seed 0), for FFDNet (the IPOL weights; contrast-scaled above 75/255) and for the embedded
model, at levels from inside FFDNet's range to far above it. Both are asked through one `ladder` on a
variance-exploding axis in [0, 1] units, the one place that converts time axes and units. Where the
scaled FFDNet is the better denoiser it is the better prior to ask there; which levels the default
ladder gives it is chosen on whole restorations (docs/pretrained_priors.md).

Beside them, the same FFDNet averaged over the 8 flips and quarter turns of the image
(`models.equivariance`, the Reynolds average): its gain over FFDNet as it is measures the part of
FFDNet's error that depends on the image's orientation, which the default ladder averages away
(how many elements per call it pays for is chosen on whole restorations too).
"""

from __future__ import annotations

import statistics
import time

import torch

from posterior_diff import GeometricVESchedule, default_model, ffdnet, ladder
from posterior_diff.evaluation import psnr_ssim
from posterior_diff.models.contrast import contrast_scaled
from posterior_diff.models.equivariance import dihedral_equivariant
from posterior_diff.models.ffdnet_prior import FFDNET_SIGMA_MAX
from posterior_diff.training.data import VALIDATION_FILES

from .jacobian_range import validation_crops
from .reporting import embedded_model, log_row, markdown_table, parse_photograph_run, photograph_run_parser, write_report

LEVELS = (0.02, 0.05, 0.1, 0.2, FFDNET_SIGMA_MAX, 0.35, 0.45, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)  # [0, 1] units
TOP = 80.0  # the asking axis' top level ([0, 1] units), above every level asked


def on_image_axis(model) -> ladder:
    """`model` as a one-piece ladder on a variance-exploding axis in [0, 1] units: asked at time t, it
    denoises x_0 + sigma(t) n (sigma in [0, 1] units) and answers in [0, 1] units."""
    return ladder(model, schedule=GeometricVESchedule(0.002, TOP), data_range=(0.0, 1.0))


def denoising_psnrs(model, truths: torch.Tensor, noise: torch.Tensor, level: float) -> list[float]:
    """PSNR (dB) per image of the one-step denoiser estimate at `level` ([0, 1] units)."""
    time_at = model.schedule.time_for_sigma(torch.tensor(level, dtype=torch.float64))
    with torch.no_grad():
        estimate = model(truths + level * noise, float(time_at)).clamp(0, 1)
    return [psnr_ssim(image, truth)[0] for image, truth in zip(estimate, truths)]


def main(argv: list[str] | None = None) -> None:
    args = parse_photograph_run(photograph_run_parser("benchmarks.contrast_scaling", __doc__,
                                                      "docs/contrast_scaling.md"), argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    files = VALIDATION_FILES[:1] if args.quick else VALIDATION_FILES
    crops = validation_crops(files, args.size)
    truths = torch.stack(list(crops.values()))
    noise = torch.randn(truths.shape, generator=torch.Generator().manual_seed(0))
    scaled = contrast_scaled(ffdnet(), max(LEVELS))
    models = {"FFDNet (contrast-scaled above 75/255)": on_image_axis(scaled),
              "embedded model": on_image_axis(default_model(torch.float32)),
              "FFDNet averaged over 8 flips and turns": on_image_axis(dihedral_equivariant(scaled, 8))}
    rows = []
    for level in LEVELS:
        psnrs = {name: denoising_psnrs(model, truths, noise, level) for name, model in models.items()}
        ours, embedded, averaged = psnrs.values()
        rows.append([f"{level:.4g}", f"{min(1.0, FFDNET_SIGMA_MAX / level):.3f}",
                     *(f"{statistics.fmean(values):.2f}" for values in psnrs.values()),
                     f"{statistics.fmean(ours) - statistics.fmean(embedded):+.2f}",
                     " ".join(f"{a - b:+.2f}" for a, b in zip(ours, embedded)),
                     f"{statistics.fmean(averaged) - statistics.fmean(ours):+.2f}"])
        log_row("level", f"{level:.4g}", *(f"{statistics.fmean(v):.2f} dB" for v in psnrs.values()))
    header = ["level", "contrast c", *(f"{name} (dB)" for name in models), "FFDNet - embedded (dB)",
              "FFDNet - embedded per photograph (dB)", "gain of the average (dB)"]
    write_report(args.out, "FFDNet above its range, by contrast scaling, and averaged over flips and turns", __doc__.split("\n\n", 1)[1], [
        f"## One-step denoising on the validation photographs\n\n{len(crops)} validation photographs "
        f"({', '.join(crops)}), {args.size}x{args.size}; mean PSNR of the denoised estimate, clamped to [0, 1]. "
        "Contrast c: the scaling applied to FFDNet's input (1 inside its range). The gain of the average: FFDNet "
        "averaged over the 8 flips and turns minus FFDNet as it is.\n\n" + markdown_table(header, rows),
    ], module="benchmarks.contrast_scaling", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[embedded_model(), "FFDNet: IPOL weights from the ffdnet package", f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
