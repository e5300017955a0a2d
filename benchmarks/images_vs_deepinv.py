"""Ours against deepinv on held-out photographs, with the same prior and the same network budget.

Part 4 of `python -m benchmarks.run_benchmarks` (run it alone with `--skip gaussian,mixture`).
Both families use one model (the embedded default unless told otherwise): ours through
`restore()`, deepinv's methods through `Denoiser.to_deepinv()` (see `peers`). Each gets `steps`
network evaluations per sample. The photographs, tasks, noise levels and classical baselines
are those of `posterior_diff.evaluation.harness` (scikit-image photographs held out of the model's
training). Reported per run: PSNR / SSIM of the posterior mean (scikit-image, data_range = 1),
NFE, seconds and peak memory (`reporting.PeakMemory`: CUDA peak allocation, or growth of the
peak resident set on the CPU). A run that diverges (`evaluation.has_diverged`) is a row noted
"diverged".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from posterior_diff import Denoiser
from posterior_diff.evaluation.harness import (DIVERGED, Measurement, baselines, has_diverged, load_photograph, measure,
                                               psnr_ssim, restore_unless_diverged)

from .peers import run_peer
from .reporting import PeakMemory, log_row

IMAGE_PEERS = ("dps", "pigdm", "mm", "diffpir", "ddrm")


@dataclass
class ImageRow:
    """One method (or the classical baseline) on one photograph and task."""

    image: str
    task: str
    method: str
    psnr: float = math.nan  # NaN: diverged or not applicable (see note)
    ssim: float = math.nan
    nfe: int = 0
    vjps: int = 0
    seconds: float = math.nan
    peak_mb: float = math.nan
    note: str = ""


def image_study(model: Denoiser, images: list[str], tasks: list[str], size: int, downscale: float, num_samples: int,
                steps: int, covariances=("isotropic", "tweedie"), peers=IMAGE_PEERS, cg_max_iter: int = 4,
                seed: int = 0, device: str | None = None) -> list[ImageRow]:
    """Every method on every (image, task), after the task's reference classical baseline as a row."""
    rows = []
    for image in images:
        truth = load_photograph(image, size, downscale)
        for task in tasks:
            measurement = measure(task, truth, generator=torch.Generator().manual_seed(seed))
            name, estimate = next(iter(baselines(measurement).items()))
            rows.append(ImageRow(image, task, name, *psnr_ssim(estimate, truth)))
            for covariance in covariances:
                rows.append(ours_row(model, image, covariance, truth, measurement, num_samples, steps, cg_max_iter, seed, device))
            for method in peers:
                rows.append(peer_row(model, image, method, truth, measurement, num_samples, steps, seed))
            for row in rows[-len(covariances) - len(peers):]:
                log_row(image, task, row.method, f"{row.psnr:.2f} dB", row.seconds, row.note)
    return rows


def ours_row(model: Denoiser, image: str, covariance: str, truth: torch.Tensor, measurement: Measurement, num_samples: int,
             steps: int, cg_max_iter: int, seed: int, device: str | None, jacobian_s_max: float | None = None,
             start: str = "prior") -> ImageRow:
    """Our restore() with one covariance on one measurement: PSNR/SSIM of the posterior mean, NFE, seconds, memory.
    `jacobian_s_max` (None: the model's default) and `start`: as in restore. From the prior the guidance is
    compared; any other start is labelled by it ("ours from the measurement"), since the covariance plays
    no part in an unguided run from y."""
    method = f"ours {covariance}" if start == "prior" else f"ours from the {start}"
    row = ImageRow(image, measurement.task.name, method)
    with PeakMemory(device or "cpu") as peak:
        result = restore_unless_diverged(measurement.y, measurement.operator, model, num_samples=num_samples, steps=steps,
                                         covariance=covariance, cg_max_iter=cg_max_iter, start=start,
                                         jacobian_s_max=jacobian_s_max, generator=torch.Generator().manual_seed(seed),
                                         device=device)
    if result is None:
        row.note = DIVERGED
        return row
    row.psnr, row.ssim = psnr_ssim(result.mean.cpu(), truth)
    row.nfe, row.vjps, row.seconds, row.peak_mb = result.nfe, result.vjps, result.seconds, peak.megabytes
    return row


def peer_row(model: Denoiser, image: str, method: str, truth: torch.Tensor, measurement: Measurement, num_samples: int,
             steps: int, seed: int) -> ImageRow:
    """A deepinv method (`peers.run_peer`) on one measurement, with `steps` network evaluations per sample."""
    row = ImageRow(image, measurement.task.name, f"deepinv {method}")
    try:
        with warnings.catch_warnings(), PeakMemory("cpu") as peak:
            warnings.simplefilter("ignore")
            run = run_peer(method, model, measurement.operator, measurement.y, num_samples, steps, seed)
    except ValueError as error:  # e.g. DDRM without an SVD of A
        row.note = f"n/a: {error}"
        return row
    if has_diverged(run.samples):
        row.note = DIVERGED
        return row
    row.psnr, row.ssim = psnr_ssim(run.samples.mean(0).cpu(), truth)
    row.nfe, row.seconds, row.peak_mb = run.nfe, run.seconds, peak.megabytes
    return row
