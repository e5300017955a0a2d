"""Ours against deepinv on held-out photographs, with the same prior and the same network budget.

Both families use one model (the embedded default unless told otherwise): ours through
`restore()`, deepinv's methods through `Denoiser.to_deepinv()` (see `peers`). Each gets `steps`
network evaluations per sample. The photographs, tasks and noise levels are those of
`image_restoration.py` (scikit-image photographs held out of the model's training). Reported
per run: PSNR / SSIM of the posterior mean (scikit-image, data_range = 1), NFE, seconds and
peak memory (`reporting.PeakMemory`: CUDA peak allocation, or growth of the peak resident set
on the CPU).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import torch

from posterior_diff import Denoiser, NonFiniteSampleError, restore

from .image_restoration import baselines, load_photograph, make_operator, psnr_ssim, to_array
from .peers import run_peer
from .reporting import PeakMemory

IMAGE_PEERS = ("dps", "pigdm", "mm", "diffpir", "ddrm")


@dataclass
class ImageRow:
    image: str
    task: str
    method: str
    psnr: float = math.nan  # NaN: diverged or not applicable (see note)
    ssim: float = math.nan
    nfe: int = 0
    seconds: float = math.nan
    peak_mb: float = math.nan
    note: str = ""


def image_study(model: Denoiser, images: list[str], tasks: list[str], size: int, downscale: float, num_samples: int,
                steps: int, covariances=("isotropic", "tweedie"), peers=IMAGE_PEERS, cg_max_iter: int = 4,
                seed: int = 0, device: str | None = None) -> list[ImageRow]:
    """Every method on every (image, task), plus the task's classical baseline as a row."""
    rows = []
    for image in images:
        truth = load_photograph(image, size, downscale)
        for task in tasks:
            generator = torch.Generator().manual_seed(seed)
            operator = make_operator(task, tuple(truth.shape), generator)
            y = operator.measure(truth[None], generator)[0]
            name, estimate = list(baselines(task, y, operator, size).items())[-1]
            rows.append(ImageRow(image, task, name, *psnr_ssim(estimate, to_array(truth))))
            for covariance in covariances:
                rows.append(_ours(model, image, task, covariance, truth, y, operator, num_samples, steps, cg_max_iter, seed, device))
            for method in peers:
                rows.append(_peer(model, image, task, method, truth, y, operator, num_samples, steps, seed))
            for row in rows[-len(covariances) - len(peers):]:
                print(f"{image} | {task} | {row.method} | {row.psnr:.2f} dB | {row.seconds:.1f} s {row.note}", file=sys.stderr, flush=True)
    return rows


def _ours(model, image, task, covariance, truth, y, operator, num_samples, steps, cg_max_iter, seed, device) -> ImageRow:
    row = ImageRow(image, task, f"ours {covariance}")
    try:
        with PeakMemory(device or "cpu") as peak:
            result = restore(y, operator, model, num_samples=num_samples, steps=steps, covariance=covariance,
                             cg_max_iter=cg_max_iter, generator=torch.Generator().manual_seed(seed), device=device)
    except NonFiniteSampleError:
        row.note = "diverged"
        return row
    row.psnr, row.ssim = psnr_ssim(to_array(result.mean.cpu()), to_array(truth))
    row.nfe, row.seconds, row.peak_mb = result.nfe, result.seconds, peak.megabytes
    return row


def _peer(model, image, task, method, truth, y, operator, num_samples, steps, seed) -> ImageRow:
    row = ImageRow(image, task, f"deepinv {method}")
    try:
        with warnings.catch_warnings(), PeakMemory("cpu") as peak:
            warnings.simplefilter("ignore")
            run = run_peer(method, model, operator, y, num_samples, steps, seed)
    except ValueError as error:  # e.g. DDRM without an SVD of A
        row.note = f"n/a: {error}"
        return row
    if not bool(torch.isfinite(run.samples).all()):
        row.note = "diverged"
        return row
    row.psnr, row.ssim = psnr_ssim(to_array(run.samples.mean(0).cpu()), to_array(truth))
    row.nfe, row.seconds, row.peak_mb = run.nfe, run.seconds, peak.megabytes
    return row
