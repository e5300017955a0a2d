"""The embedded model's training curves and generalisation: writes docs/training_curve.md.

    python -m benchmarks.training_curve
    python -m benchmarks.training_curve --runs outputs/runA outputs/runB      # training runs with snapshots
    python -m benchmarks.training_curve --quick --out /tmp/training_curve.md  # a smoke run: seconds

1. The training objective, averaged over windows of steps: the shipped model's
   `training_log.json` and each `--runs` folder's checkpoint. A min-SNR-weighted objective is
   smaller than the uniform one by its weights, so compare rows within one run, not across.
2. The DSM loss (uniform noise-prediction MSE, the same crops and noise for every model) at fixed
   timesteps, of the shipped model and each run's latest snapshot, on three groups of
   photographs: the training photographs (`posterior_diff.training.data`, crops shrunk as in
   training), the validation photographs (`training_data.VALIDATION_FILES`, kept out of
   training, shrunk to a 256-pixel short side like the evaluation's halved photographs) and the
   four held-out evaluation photographs (halved, 128x128 centre crops, as the image benchmark
   uses them).
3. Posterior-mean PSNR against training steps on the validation photographs (64x64 centre
   crops; SR x4, 70% random inpainting, denoising at sigma_y 0.1; isotropic guidance, few steps
   and samples, so that every snapshot can be scored; the mean of the samples for every task,
   as when the first scores were cached), with the validation DSM loss at the
   timesteps that set fine detail (t <= 400). The recipe is chosen on these columns; the
   held-out photographs are left for the final measurement (benchmarks/image_restoration.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import posterior_diff
from posterior_diff.evaluation.harness import HELD_OUT_PHOTOGRAPHS, load_photograph, measure, psnr_ssim
from posterior_diff.images import match_channels, to_model_range
from posterior_diff.models.formats import denoiser_from_diffusers
from posterior_diff.models.loading import DEFAULT_MODEL_DIR
from posterior_diff.training.score_matching import (CHECKPOINT, SNAPSHOTS, RandomCrops, TrainingConfig, build_scheduler,
                                                    load_checkpoint, load_snapshot, start_model_steps, total_steps)

from .reporting import ResultCache, embedded_model, markdown_table, write_report

TIMESTEPS = [50, 150, 250, 400, 600, 800, 950]  # DDPM training timesteps (of 1000) to evaluate at
DETAIL_TIMESTEPS = [50, 150, 250, 400]  # those that set fine detail: where held-out and training losses part
VALIDATION_TASKS = ("sr4", "random", "denoise")
SHORT_SIDE = 256  # validation photographs are shrunk to this short side, the scale of the halved evaluation photographs


def loss_log(path: Path) -> list[tuple[int, float]]:
    """[(step, loss)] from a training_log.json ("loss") or a training checkpoint ("loss_log")."""
    if path.suffix == ".json":
        entries = json.loads(path.read_text())["loss"]
    else:
        entries = load_checkpoint(path)["loss_log"]
    return [(int(step), float(loss)) for step, loss in entries]


@dataclass(frozen=True)
class Window:
    """The mean training objective of one run over training steps first..last."""

    first: int
    last: int
    mean: float


@dataclass
class GapRow:
    """The DSM loss at one timestep (or "mean" over them): one value per (model, photograph group) column."""

    timestep: str
    losses: list[float]


@dataclass(frozen=True)
class Model:
    """A UNet to evaluate: its label, the training steps behind it, the UNet, its scheduler and
    what tells its weights apart (the key of its cached scores)."""

    label: str
    steps: int
    unet: object
    scheduler: object
    identity: str


def window_means(log: list[tuple[int, float]], window: int) -> list[Window]:
    """The mean loss over consecutive windows of `window` steps, starting at the first logged step."""
    rows = []
    for start in range(log[0][0], log[-1][0] + 1, window):
        values = [loss for step, loss in log if start <= step < start + window]
        if values:
            rows.append(Window(start, start + window - 1, sum(values) / len(values)))
    return rows


# -- photographs -------------------------------------------------------------------------


def held_out_images() -> list[torch.Tensor]:
    """The four held-out photographs as the image benchmark uses them (halved, 128x128 centre
    crops), (3, 128, 128) in [-1, 1]."""
    return [to_model_range(load_photograph(name, 128, 2.0)) for name in HELD_OUT_PHOTOGRAPHS]


def package_photographs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(training, validation) photographs from the installed packages: the training ones as
    uint8 (C, H, W) at full size (C = 1 for grey), the validation ones as float (3, H, W) in
    [-1, 1], shrunk (antialiased) to a SHORT_SIDE short side."""
    from posterior_diff.training.data import as_tensors, gather_photographs, split_validation

    training, validation = split_validation(gather_photographs(install=False))
    return as_tensors(training), validation_tensors(validation)


def validation_tensors(photographs) -> list[torch.Tensor]:
    """Validation photographs (training_data.Photograph) as float (3, H, W) in [-1, 1], shrunk
    (antialiased) to a SHORT_SIDE short side."""
    from posterior_diff.training.data import as_tensors

    return [shrink_to_short_side(match_channels(image.float() / 127.5 - 1, 3)) for image in as_tensors(photographs)]


def shrink_to_short_side(image: torch.Tensor) -> torch.Tensor:
    """An image (C, H, W) in [-1, 1] resized (antialiased) to a SHORT_SIDE short side, as validation scores it."""
    scale = SHORT_SIDE / min(image.shape[-2:])
    size = [round(side * scale) for side in image.shape[-2:]]
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1)


def centre_crops(images: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """size x size centre crops of (3, H, W) images, in [0, 1] (the range the tasks measure in)."""
    crops = []
    for image in images:
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        crops.append((image[:, top : top + size, left : left + size] + 1) / 2)
    return crops


# -- models ------------------------------------------------------------------------------


def shipped_model() -> Model:
    from diffusers import DDPMScheduler, UNet2DModel

    steps = total_steps(DEFAULT_MODEL_DIR)
    unet = UNet2DModel.from_pretrained(DEFAULT_MODEL_DIR / "unet").float().eval()
    return Model("shipped", steps, unet, DDPMScheduler.from_pretrained(DEFAULT_MODEL_DIR / "scheduler"), embedded_model())


def snapshot_models(run: Path, every: int) -> list[Model]:
    """The snapshots of training run `run` whose step is a multiple of `every`, and its latest one.

    Steps are counted in total: a run started --init-from a model adds that model's steps."""
    state = load_checkpoint(run / CHECKPOINT)
    config = TrainingConfig(**state["config"])
    offset = start_model_steps(run, config.init_from)
    paths = sorted((run / SNAPSHOTS).glob("step_*.safetensors"))
    chosen = [p for p in paths if int(p.stem.split("_")[1]) % every == 0 or p == paths[-1]]
    scheduler = build_scheduler(config)
    return [Model(run.name, offset + int(p.stem.split("_")[1]), load_snapshot(run, p), scheduler,
                  f"snapshot {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}") for p in chosen]


# -- measurements ------------------------------------------------------------------------


@torch.no_grad()
def dsm_loss(unet, scheduler, crops: torch.Tensor, seed: int, timesteps=TIMESTEPS) -> list[float]:
    """Noise-prediction MSE per timestep on `crops` (N, 3, s, s), the same noise for every call with `seed`."""
    noise = torch.randn(crops.shape, generator=torch.Generator().manual_seed(seed))
    losses = []
    for timestep in timesteps:
        x_t = scheduler.add_noise(crops, noise, torch.full((crops.shape[0],), timestep))
        predicted = torch.cat([unet(chunk, torch.full((chunk.shape[0],), timestep)).sample for chunk in x_t.split(128)])
        losses.append(float((predicted - noise).square().mean()))
    return losses


def random_crops(images: list[torch.Tensor], count: int, size: int, seed: int,
                 scale_range: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """`count` random size x size crops (N, 3, size, size) in [-1, 1] of images (uint8, or float in
    [-1, 1]), the same for every call with `seed`."""
    return RandomCrops(images, size, torch.Generator().manual_seed(seed), scale_range=scale_range, channels=3).batch(count)


def gap_rows(models: list[Model], groups: dict[str, torch.Tensor]) -> tuple[list[str], list[GapRow]]:
    """The DSM loss per timestep of each model on each group of crops, and held-out / training.

    Returns the column names and one row per timestep of TIMESTEPS, then their mean.
    """
    names, columns = [], []
    for model in models:
        losses = [dsm_loss(model.unet, model.scheduler, crops, seed=0) for crops in groups.values()]
        losses.append([held / seen for seen, held in zip(losses[0], losses[-1])])
        columns += [values + [sum(values) / len(values)] for values in losses]
        names += [f"{model.label}: {name}" for name in groups] + [f"{model.label}: held-out / training"]
    rows = [GapRow(str(t), [column[i] for column in columns]) for i, t in enumerate([*TIMESTEPS, "mean"])]
    return names, rows


def validation_psnr(model: Model, truths: list[torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    """Mean PSNR (dB) of the samples' mean per task over `truths` (3, s, s) in [0, 1], isotropic
    guidance. The samples' mean, not `Restoration.mean`: for denoising that is now the exact
    posterior mean, and the curve must stay comparable with the scores cached before it was; for
    the same reason the guidance takes the network's Jacobian at every step (jacobian_s_max=inf)."""
    from posterior_diff import restore

    denoiser = denoiser_from_diffusers(model.unet, model.scheduler)
    scores = {}
    for task in VALIDATION_TASKS:
        values = []
        for index, truth in enumerate(truths):
            measurement = measure(task, truth, generator=torch.Generator().manual_seed(index))
            result = restore(measurement.y, measurement.operator, denoiser, num_samples=args.samples, steps=args.steps,
                             covariance="isotropic", jacobian_s_max=math.inf, antithetic=False, eta=1.0,
                             generator=torch.Generator().manual_seed(index))
            values.append(psnr_ssim(result.samples.mean(0), truth)[0])
        scores[task] = statistics.fmean(values)
    return scores


def validation_rows(models: list[Model], truths: list[torch.Tensor], detail_crops: torch.Tensor,
                    args: argparse.Namespace, cache: ResultCache) -> list[list[str]]:
    """One row per model: label, total steps, PSNR per task and their mean, detail-timestep DSM
    loss. A model's scores come from `cache` where its weights were scored before."""
    rows = []
    for model in models:
        def compute(model=model):
            detail = dsm_loss(model.unet, model.scheduler, detail_crops, seed=1, timesteps=DETAIL_TIMESTEPS)
            return {"psnr": validation_psnr(model, truths, args), "detail_loss": statistics.fmean(detail)}
        scored = cache.get(model.identity, compute)
        rows.append([model.label, str(model.steps), *(f"{scored['psnr'][task]:.2f}" for task in VALIDATION_TASKS),
                     f"{statistics.fmean(scored['psnr'].values()):.2f}", f"{scored['detail_loss']:.4f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


# -- command line ------------------------------------------------------------------------


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """The options of how snapshots are scored, shared with benchmarks.data_size (see scoring_defaults)."""
    parser.add_argument("--quick", action="store_true", help="a smoke run: few crops, 1 validation image, 2 steps")
    parser.add_argument("--every", type=int, default=1000, help="score the snapshots at multiples of this many steps")
    parser.add_argument("--crops", type=int, help="random 32x32 crops per photograph group (default 512; 4 with --quick)")
    parser.add_argument("--steps", type=int, help="sampler steps of the validation restorations (default 20)")
    parser.add_argument("--samples", type=int, default=2, help="posterior samples per validation restoration")
    parser.add_argument("--size", type=int, default=64, help="side of the validation crops, pixels")


def scoring_defaults(args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """`args` with the scoring options' defaults filled in (they depend on --quick) and the argv recorded."""
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.crops = args.crops or (4 if args.quick else 512)
    args.steps = args.steps or (2 if args.quick else 20)
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scoring_options(parser)
    parser.add_argument("--runs", type=Path, nargs="*", default=[],
                        help="training run folders (scripts/train_default_model.py --out, with --snapshot-every)")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("docs/training_curve.md"))
    parser.add_argument("--cache", type=Path, help="JSON cache of the validation scores per model (default: the "
                        "report's name, .json), so that a rerun scores only new snapshots")
    args = parser.parse_args(argv)
    args.cache = args.cache or args.out.with_suffix(".json")
    return scoring_defaults(args, argv)


def curve_rows(runs: list[Path], window: int) -> list[list[str]]:
    logs = {"shipped": loss_log(DEFAULT_MODEL_DIR / "training_log.json")}
    logs |= {run.name: loss_log(run / CHECKPOINT) for run in runs}
    return [[name, f"{w.first}-{w.last}", f"{w.mean:.4f}"] for name, log in logs.items() for w in window_means(log, window)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    training, validation = package_photographs()
    if args.quick:
        validation = validation[:1]
    groups = {"training photographs": random_crops(training, args.crops, 32, seed=0, scale_range=(1.0, 8.0)),
              "validation photographs": random_crops(validation, args.crops, 32, seed=0),
              "held-out photographs": random_crops(held_out_images(), args.crops, 32, seed=0)}
    shipped = shipped_model()
    snapshots = {run.name: snapshot_models(run, args.every) for run in args.runs}
    latest = [shipped] + [models[-1] for models in snapshots.values()]
    names, gap = gap_rows(latest, groups)
    gap_table = [[row.timestep, *(f"{loss:.4f}" for loss in row.losses)] for row in gap]
    truths = centre_crops(validation, args.size)
    settings = dict(size=args.size, steps=args.steps, samples=args.samples, crops=args.crops, images=len(truths),
                    posterior_diff=posterior_diff.__version__)
    scored = validation_rows([shipped, *(m for models in snapshots.values() for m in models)], truths,
                             groups["validation photographs"], args, ResultCache(args.cache, settings))
    write_report(args.out, "Training curves and generalisation of the embedded model", __doc__.split("\n\n", 2)[2], [
        f"## 1. Training objective against steps (mean over windows of {args.window} steps)",
        markdown_table(["run", "steps", "mean objective"], curve_rows(args.runs, args.window)),
        f"## 2. DSM loss at fixed timesteps: training, validation and held-out photographs ({args.crops} random 32x32 "
        "crops each, same noise for every model)",
        markdown_table(["timestep", *names], gap_table),
        f"## 3. Validation posterior-mean PSNR (dB) against total training steps ({len(truths)} photographs, "
        f"{args.size}x{args.size}, isotropic, {args.steps} steps, {args.samples} samples)",
        markdown_table(["model", "total steps", *VALIDATION_TASKS, "mean", "DSM loss t<=400"], scored),
    ], module="benchmarks.training_curve", argv=args.argv, minutes=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
