"""Super-resolution of image patches with a Gaussian prior fitted to a photograph.

Until a trained image model exists, an analytic prior stands in for it: the empirical mean and
covariance of the 16x16 patches (stride 4) of scikit-image's `camera` photograph (grayscale, values in
[0, 1]) define `GaussianPrior(mean, cov)`. Held-out 16x16 patches of a different photograph
(`astronaut`, converted to grayscale) are measured as in the sr2 (or sr4) task of
`posterior_diff.tasks` (2x2 or 4x4 average pooling), with noise sigma_y = 0.02, and restored with
`posterior_diff.restore` (its exact defaults for analytic priors, `posterior_diff.defaults`). Because prior and operator are Gaussian and linear,
`prior.posterior(operator, y)` is the exact answer, so the demo shows both what posterior
sampling buys over bicubic upsampling and how close the sampler gets to the exact posterior.

Per patch it prints the PSNR of bicubic upsampling (clipped to [0, 1]), of our posterior mean and of the exact
posterior mean; the RMS difference between our mean and the exact one (next to the Monte-Carlo
error sqrt(mean diag C / N) expected from N samples); and the average posterior standard
deviation, ours against the exact sqrt(diag C) (with N = 16 the sample std runs about 2% low
by itself; the exact one is the same for every patch, as a Gaussian posterior covariance does
not depend on y). It writes a figure with one row per patch:

    low-res (nearest) | bicubic | posterior mean | one sample | posterior std | exact mean | ground truth

(the std panel is scaled so its largest value is white). Run from the repository root:

    python demos/gaussian_super_resolution.py
    python demos/gaussian_super_resolution.py --factor 4 --patches 6 --seed 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from skimage.color import rgb2gray
from skimage.util import view_as_windows

from operators import SuperResolution
from posterior_diff import GaussianPrior, restore
from posterior_diff.defaults import EXACT_DEFAULTS
from posterior_diff.evaluation.harness import bicubic_upsample, nearest_upsample, photograph, psnr_ssim
from posterior_diff.images import save_panels
from posterior_diff.tasks import get_task

PATCH = 16
SIGMA_Y = 0.02
JITTER = 1e-4
MIN_PATCH_STD = 0.05  # held-out patches flatter than this show nothing worth super-resolving
PANEL_TITLES = ("low-res", "bicubic", "post. mean", "sample", "post. std", "exact mean", "truth")
ZOOM = 8  # display pixels per image pixel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch choice, the measurement noise and the sampler")
    parser.add_argument("--patches", type=int, default=4, help="number of held-out patches")
    parser.add_argument("--factor", type=int, choices=(2, 4), default=2, help="average-pooling factor")
    parser.add_argument("--samples", type=int, default=16, help="posterior samples per patch")
    parser.add_argument("--steps", type=int, default=EXACT_DEFAULTS.steps, help="sampler steps")
    parser.add_argument("--out", type=Path, default=Path("outputs/gaussian_super_resolution.png"), help="figure to write")
    return parser.parse_args()


def fit_patch_prior(image: np.ndarray, stride: int = 4) -> GaussianPrior:
    """GaussianPrior (float64, event shape (1, 16, 16)) from the mean and covariance of the patches of `image`."""
    patches = view_as_windows(image, (PATCH, PATCH), step=stride).reshape(-1, PATCH * PATCH)
    mean = patches.mean(axis=0)
    cov = np.cov(patches, rowvar=False) + JITTER * np.eye(PATCH * PATCH)
    return GaussianPrior(torch.from_numpy(mean).reshape(1, PATCH, PATCH), torch.from_numpy(cov))


def held_out_patches(image: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[tuple[int, int], np.ndarray]]:
    """`count` random 16x16 patches of `image` with some texture, as ((row, col), patch) pairs."""
    chosen = []
    while len(chosen) < count:
        row, col = rng.integers(0, image.shape[0] - PATCH + 1), rng.integers(0, image.shape[1] - PATCH + 1)
        patch = image[row : row + PATCH, col : col + PATCH]
        if patch.std() > MIN_PATCH_STD:
            chosen.append(((int(row), int(col)), patch))
    return chosen


def psnr(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR in dB of a (1, 16, 16) estimate against the truth, for images in [0, 1] (the estimate is not clipped)."""
    return psnr_ssim(estimate, truth)[0]


def super_resolve(
    patch: np.ndarray, prior: GaussianPrior, operator: SuperResolution, args: argparse.Namespace, generator: torch.Generator
) -> dict:
    """Measure one patch, restore it, and collect every image (1, 16, 16) and number the table and figure need."""
    truth = torch.from_numpy(patch).reshape(1, PATCH, PATCH)
    y = operator.measure(truth[None], generator)[0]
    result = restore(y, operator, prior, num_samples=args.samples, steps=args.steps, generator=generator)
    exact = prior.posterior(operator, y)
    exact_std = exact.cov.diagonal().sqrt().reshape(1, PATCH, PATCH)
    images = {
        "low-res": nearest_upsample(y, tuple(truth.shape)),
        "bicubic": bicubic_upsample(y, tuple(truth.shape)).double(),
        "post. mean": result.mean,
        "sample": result.samples[0],
        "post. std": result.std,
        "exact mean": exact.mean,
        "truth": truth,
    }
    return {
        "images": images,
        "psnr_bicubic": psnr(images["bicubic"], truth),
        "psnr_ours": psnr(images["post. mean"], truth),
        "psnr_exact": psnr(images["exact mean"], truth),
        "rms_to_exact": float((images["post. mean"] - images["exact mean"]).square().mean().sqrt()),
        "monte_carlo_rms": float((exact_std.square().mean() / args.samples).sqrt()),
        "std_ours": float(images["post. std"].mean()),
        "std_exact": float(exact_std.mean()),
        "seconds": result.seconds,
    }


TABLE_COLUMNS = {
    "psnr_bicubic": "PSNR bicubic", "psnr_ours": "PSNR ours", "psnr_exact": "PSNR exact",
    "rms_to_exact": "RMS ours-exact", "monte_carlo_rms": "MC error", "std_ours": "std ours", "std_exact": "std exact",
}


def table_row(label: str, values: dict) -> str:
    """A markdown row: PSNRs in dB with 2 decimals, the other columns (in [0, 1] units) with 4."""
    cells = [f"{values[key]:.2f}" if key.startswith("psnr") else f"{values[key]:.4f}" for key in TABLE_COLUMNS]
    return f"| {label} | " + " | ".join(cells) + " |"


def print_table(rows: list[tuple[tuple[int, int], dict]]) -> None:
    """One markdown row per patch, and the averages."""
    print("| patch (row, col) | " + " | ".join(TABLE_COLUMNS.values()) + " |")
    print("|---" * (len(TABLE_COLUMNS) + 1) + "|")
    for position, result in rows:
        print(table_row(str(position), result))
    print(table_row("mean", {key: np.mean([result[key] for _, result in rows]) for key in TABLE_COLUMNS}))


def write_figure(rows: list[tuple[tuple[int, int], dict]], path: Path) -> None:
    """One row of panels per patch; the std panel is scaled so its largest value is white."""

    def panel(image: torch.Tensor, title: str) -> torch.Tensor:
        if title == "post. std":
            image = image / max(float(image.max()), 1e-12)
        return image.float()

    grid = [[panel(result["images"][title], title) for title in PANEL_TITLES] for _, result in rows]
    save_panels(grid, list(PANEL_TITLES), path, zoom=ZOOM)


def main() -> None:
    args = parse_args()
    # One thread: a 16x16 problem gains nothing from more, and on a small shared machine extra
    # OpenMP threads stall whenever another process holds a core (30x slower on two cores).
    torch.set_num_threads(1)
    start = time.perf_counter()
    prior = fit_patch_prior(photograph("camera")[0].double().numpy())
    operator = get_task(f"sr{args.factor}").operator((1, PATCH, PATCH), sigma_y=SIGMA_Y)
    generator = torch.Generator().manual_seed(args.seed)
    astronaut = rgb2gray(photograph("astronaut").double().numpy().transpose(1, 2, 0))
    patches = held_out_patches(astronaut, args.patches, np.random.default_rng(args.seed))
    rows = [(position, super_resolve(patch, prior, operator, args, generator)) for position, patch in patches]
    print(f"x{args.factor} super-resolution (average pooling, sigma_y = {SIGMA_Y}) of {args.patches} astronaut patches "
          f"with a Gaussian prior fitted to camera patches; {args.samples} samples, {args.steps} steps.\n")
    print_table(rows)
    write_figure(rows, args.out)
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.1f} s in all, "
          f"{sum(r['seconds'] for _, r in rows):.1f} s sampling)")


if __name__ == "__main__":
    main()
