"""Posterior-mean PSNR and DSM loss against the amount of training data: writes docs/data_size.md.

    python -m benchmarks.data_size --runs outputs/ds15 outputs/ds30 outputs/ds52
    python -m benchmarks.data_size --quick --runs RUN RUN --out /tmp/data_size.md   # a smoke run

The runs are trained from scratch by scripts/train_default_model.py with one recipe, seed and
number of steps, on different `--sources` (different sets of photographs); runs whose
configurations differ in anything but their data are refused, so that a row differs from the
next only by what it was trained on. Each run's snapshots at multiples of `--every` steps are
measured as benchmarks/training_curve measures them:

1. posterior-mean PSNR on the validation photographs (`training_data.VALIDATION_FILES`, kept
   out of every run; 64x64 centre crops; SR x4, 70% random inpainting, denoising at sigma_y 0.1;
   isotropic guidance, 20 steps, 2 samples, the samples' mean);
2. the DSM loss at the timesteps that set fine detail (t <= 400) on the validation photographs
   and on the run's own training photographs (crops shrunk as in training). Their ratio is the
   generalisation gap: a run with too few photographs learns its own better than unseen ones.

Last, the slope of the final snapshots' PSNR against log2 of the training megapixels (dB per
doubling of the data), fitted by least squares over all runs and between the two largest, and
what the latter, the slope where the data is largest, extrapolates to.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import posterior_diff
from posterior_diff.training.data import VALIDATION_FILES, as_tensors, gather_photographs, split_validation
from posterior_diff.training.score_matching import CHECKPOINT, TrainingConfig, load_checkpoint

from .reporting import ResultCache, markdown_table, write_report
from .training_curve import (DETAIL_TIMESTEPS, VALIDATION_TASKS, Model, add_scoring_options, centre_crops, dsm_loss,
                             random_crops, scoring_defaults, snapshot_models, validation_psnr, validation_tensors)

TRAINING_DATA = "training_data.json"
TARGET_GAINS = (0.5, 1.0)  # dB: the extrapolated data for these gains over the largest run is reported
MAX_DOUBLINGS = 30  # beyond a billion-fold more data an extrapolation says nothing


@dataclass(frozen=True)
class RunData:
    """What one run trained on: its folder, the `--sources` it was given, its photographs'
    (package, file) pairs and their megapixels, and its training configuration."""

    folder: Path
    sources: str
    files: frozenset[tuple[str, str]]
    megapixels: float
    config: TrainingConfig

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def photographs(self) -> int:
        return len(self.files)


def run_data(run: Path) -> RunData:
    """The training data and configuration of run folder `run` (training_data.json and the checkpoint)."""
    record_path = run / TRAINING_DATA
    if not record_path.is_file() or not (run / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--runs: {run} is not a training run folder (no {TRAINING_DATA} or {CHECKPOINT})")
    record = json.loads(record_path.read_text())
    config = TrainingConfig(**load_checkpoint(run / CHECKPOINT)["config"])
    files = frozenset((p["package"], p["file"]) for p in record["photographs"])
    megapixels = sum(p["size"][0] * p["size"][1] for p in record["photographs"]) / 1e6
    return RunData(run, record["sources"], files, megapixels, config)


def comparable_config(runs: list[RunData]) -> TrainingConfig:
    """The configuration every run shares; raises ValueError naming the first field that differs,
    a run that did not start from scratch (its data would include its start model's) or one that
    trained on the validation photographs."""
    for run in runs:
        if any(file in VALIDATION_FILES for _, file in run.files):
            raise ValueError(f"--runs: {run.name} trained on validation photographs (--include-validation)")
        if run.config.init_from is not None:
            raise ValueError(f"--runs: {run.name} started from {run.config.init_from}; a data-size curve needs runs "
                             "trained from scratch")
    first = vars(runs[0].config)
    for run in runs[1:]:
        for field, value in vars(run.config).items():
            if field != "unet_config" and value != first[field]:  # unet_config follows from the other fields
                raise ValueError(f"--runs: {run.name} differs from {runs[0].name} in {field} ({value!r} against "
                                 f"{first[field]!r}); only the training data may differ")
    return runs[0].config


def training_photographs(run: RunData, photographs) -> list[torch.Tensor]:
    """The run's own training photographs among `photographs` (training_data.Photograph), as
    uint8 (C, H, W) tensors; raises FileNotFoundError if one is not installed here."""
    chosen = [p for p in photographs if (p.package, p.file) in run.files]
    missing = run.files - {(p.package, p.file) for p in chosen}
    if missing:
        raise FileNotFoundError(f"{run.name} trained on photographs not installed here: {sorted(missing)[:3]}")
    return as_tensors(chosen)


def installed_photographs():
    """Every training photograph the installed packages give (training_data.Photograph)."""
    return gather_photographs(install=False)


def doubling_slope(megapixels: list[float], values: list[float]) -> float:
    """Least-squares slope of `values` against log2(megapixels): the change per doubling of data."""
    xs = [math.log2(m) for m in megapixels]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("--runs: a slope needs runs on different amounts of data")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values)) / spread


# -- measurements ------------------------------------------------------------------------


def score(model: Model, own_crops: torch.Tensor, validation_crops: torch.Tensor, truths: list[torch.Tensor],
          args: argparse.Namespace) -> dict:
    """Validation PSNR per task (dB) and the detail-timestep DSM loss on validation and own training crops."""
    def detail(crops):
        return statistics.fmean(dsm_loss(model.unet, model.scheduler, crops, seed=1, timesteps=DETAIL_TIMESTEPS))
    return {"psnr": validation_psnr(model, truths, args), "validation_loss": detail(validation_crops),
            "training_loss": detail(own_crops)}


def run_rows(run: RunData, models: list[Model], scores: list[dict]) -> list[list[str]]:
    rows = []
    for model, scored in zip(models, scores):
        psnr = [scored["psnr"][task] for task in VALIDATION_TASKS]
        rows.append([run.name, run.sources, str(run.photographs), f"{run.megapixels:.1f}", str(model.steps),
                     *(f"{value:.2f}" for value in psnr), f"{statistics.fmean(psnr):.2f}",
                     f"{scored['validation_loss']:.4f}", f"{scored['training_loss']:.4f}",
                     f"{scored['validation_loss'] / scored['training_loss']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def slope_rows(runs: list[RunData], finals: list[dict]) -> list[list[str]]:
    """Per task and for the mean: dB per doubling of megapixels fitted over every run and between
    the two largest runs (the local slope where the data is largest: a curve that saturates has a
    smaller one there than the fit says); then, for each of TARGET_GAINS over the largest run, the
    doublings and megapixels that the local slope needs (n/a where it is not positive, or where
    the data would grow more than 2**MAX_DOUBLINGS-fold)."""
    megapixels = [run.megapixels for run in runs]
    series = {task: [f["psnr"][task] for f in finals] for task in VALIDATION_TASKS}
    series["mean"] = [statistics.fmean(values) for values in zip(*series.values())]
    rows = []
    for name, values in series.items():
        fitted, local = doubling_slope(megapixels, values), doubling_slope(megapixels[-2:], values[-2:])
        doublings = [gain / local if local > 0 else math.inf for gain in TARGET_GAINS]
        needed = [[f"{d:.1f}", f"{megapixels[-1] * 2 ** d:,.0f}"] if d <= MAX_DOUBLINGS else ["n/a", "n/a"]
                  for d in doublings]
        rows.append([name, f"{fitted:+.3f}", f"{local:+.3f}", *(cell for pair in needed for cell in pair)])
    return rows


# -- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="run folders trained from scratch on different --sources, otherwise alike")
    add_scoring_options(parser)
    parser.add_argument("--out", type=Path, default=Path("docs/data_size.md"))
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("--runs: a data-size curve needs at least two runs")
    args.cache = args.out.with_suffix(".json")
    return scoring_defaults(args, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = sorted((run_data(path) for path in args.runs), key=lambda run: run.megapixels)
    config = comparable_config(runs)
    photographs = installed_photographs()
    validation = validation_tensors(split_validation(photographs)[1])[: 1 if args.quick else None]
    if not validation:
        raise FileNotFoundError("the validation photographs (training_data.VALIDATION_FILES) are not installed")
    validation_crops = random_crops(validation, args.crops, 32, seed=0)
    truths = centre_crops(validation, args.size)
    cache = ResultCache(args.cache, dict(size=args.size, steps=args.steps, samples=args.samples, crops=args.crops,
                                         images=len(truths), posterior_diff=posterior_diff.__version__))
    rows, finals = [], []
    for run in runs:
        own_crops = random_crops(training_photographs(run, photographs), args.crops, 32, seed=0,
                                 scale_range=tuple(config.scale_range))
        models = snapshot_models(run.folder, args.every)
        scores = [cache.get(m.identity, lambda m=m: score(m, own_crops, validation_crops, truths, args)) for m in models]
        rows += run_rows(run, models, scores)
        finals.append(scores[-1])
    write_report(args.out, "Restoration quality against the amount of training data", __doc__.split("\n\n", 2)[2], [
        f"## 1. Validation PSNR (dB) and DSM loss against data and steps ({len(truths)} photographs, "
        f"{args.size}x{args.size}, isotropic, {args.steps} steps, {args.samples} samples; recipe: "
        f"{config.block_out_channels} UNet, {config.crop_size}x{config.crop_size} crops, batch {config.batch_size}, "
        f"{config.steps} steps, {config.loss_weighting} weighting, seed {config.seed})",
        markdown_table(["run", "sources", "photographs", "megapixels", "steps", *VALIDATION_TASKS, "mean",
                        "DSM validation t<=400", "DSM own training t<=400", "validation / training"], rows),
        "## 2. Final PSNR per doubling of the training megapixels (the runs' last snapshots: least squares over "
        "all runs, and between the two largest), and the data the local slope extrapolates to for more PSNR than "
        "the largest run's",
        markdown_table(["task", "dB per doubling, all runs", "dB per doubling, two largest",
                        *(f"{what} for +{gain} dB" for gain in TARGET_GAINS for what in ("doublings", "megapixels"))],
                       slope_rows(runs, finals)),
    ], module="benchmarks.data_size", argv=args.argv, minutes=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
