"""The embedded model's training curve and its generalisation gap: writes docs/training_curve.md.

    python -m benchmarks.training_curve
    python -m benchmarks.training_curve --continued outputs/default_model/checkpoint.pt --compare outputs/model_10k
    python -m benchmarks.training_curve --quick --out /tmp/training_curve.md     # 4 crops: seconds

1. The DSM loss (noise-prediction MSE, one random timestep per crop) averaged over windows of
   training steps, from the shipped `training_log.json` and, with `--continued`, from a
   checkpoint of a longer run that resumed from it (its `loss_log` past the shipped steps).
2. The same loss of the shipped UNet (and, with `--compare`, another model folder's) on random crops of the training photographs and of the
   four held-out evaluation photographs (`posterior_diff.evaluation`), at fixed
   timesteps with the same noise for both.
   Both losses falling together with more steps says the model is still learning what
   transfers; the held-out / training ratio is what the 15 training photographs (all that
   scikit-image ships besides the held-out ones) leave unlearnt at this size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posterior_diff.evaluation import HELD_OUT_PHOTOGRAPHS, load_photograph, training_images
from posterior_diff.images import to_model_range
from posterior_diff.models import DEFAULT_MODEL_DIR
from posterior_diff.training import RandomCrops, load_checkpoint

from .reporting import markdown_table, write_report

TIMESTEPS = [50, 150, 250, 400, 600, 800, 950]  # DDPM training timesteps (of 1000) to evaluate at


def loss_log(path: Path) -> list[tuple[int, float]]:
    """[(step, loss)] from a training_log.json ("loss") or a training checkpoint ("loss_log")."""
    if path.suffix == ".json":
        entries = json.loads(path.read_text())["loss"]
    else:
        entries = load_checkpoint(path)["loss_log"]
    return [(int(step), float(loss)) for step, loss in entries]


@dataclass(frozen=True)
class Window:
    """The mean DSM loss of one run over training steps first..last."""

    first: int
    last: int
    mean: float


@dataclass
class GapRow:
    """The DSM loss at one timestep (or "mean" over them): one value per (model, photograph group) column."""

    timestep: str
    losses: list[float]


def window_means(log: list[tuple[int, float]], window: int) -> list[Window]:
    """The mean loss over consecutive windows of `window` steps, starting at the first logged step."""
    rows = []
    for start in range(log[0][0], log[-1][0] + 1, window):
        values = [loss for step, loss in log if start <= step < start + window]
        if values:
            rows.append(Window(start, start + window - 1, sum(values) / len(values)))
    return rows


def held_out_images() -> list[torch.Tensor]:
    """The four held-out photographs as the image benchmark uses them (halved, 128x128 centre
    crops), (3, 128, 128) in [-1, 1]."""
    return [to_model_range(load_photograph(name, 128, 2.0)) for name in HELD_OUT_PHOTOGRAPHS]


@torch.no_grad()
def dsm_loss(unet, scheduler, images: list[torch.Tensor], crops: int, crop_size: int, seed: int) -> list[float]:
    """Noise-prediction MSE per timestep in TIMESTEPS on `crops` random crops (same seed, same noise)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = RandomCrops(images, crop_size, generator).batch(crops)
    noise = torch.randn(x0.shape, generator=generator)
    losses = []
    for timestep in TIMESTEPS:
        x_t = scheduler.add_noise(x0, noise, torch.full((x0.shape[0],), timestep))
        predicted = torch.cat([unet(chunk, torch.full((chunk.shape[0],), timestep)).sample for chunk in x_t.split(128)])
        losses.append(float((predicted - noise).square().mean()))
    return losses


def gap_rows(models: dict[str, Path], groups: dict[str, list[torch.Tensor]], crops: int,
             crop_size: int) -> tuple[list[str], list[GapRow]]:
    """The DSM loss per timestep of each model on each photograph group, and held-out / training.

    Returns the column names and one row per timestep of TIMESTEPS, then their mean.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    names, columns = [], []
    for label, folder in models.items():
        unet = UNet2DModel.from_pretrained(folder / "unet").float().eval()
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        losses = [dsm_loss(unet, scheduler, images, crops, crop_size, seed=0) for images in groups.values()]
        losses.append([held / seen for seen, held in zip(*losses)])
        columns += [values + [sum(values) / len(values)] for values in losses]
        names += [f"{label}: {name}" for name in groups] + [f"{label}: held-out / training"]
    rows = [GapRow(str(t), [column[i] for column in columns]) for i, t in enumerate([*TIMESTEPS, "mean"])]
    return names, rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 crops per group (seconds)")
    parser.add_argument("--continued", type=Path, help="a checkpoint (or training_log.json) of a longer run")
    parser.add_argument("--compare", type=Path, help="another model folder (e.g. the continued run's) to evaluate beside the shipped one")
    parser.add_argument("--crops", type=int, help="random crops per photograph group (default 512; 4 with --quick)")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("docs/training_curve.md"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.crops is None:
        args.crops = 4 if args.quick else 512
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    shipped = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())
    crop_size = shipped["config"]["crop_size"]
    logs = {"shipped model": loss_log(DEFAULT_MODEL_DIR / "training_log.json")}
    if args.continued:
        shipped_steps = logs["shipped model"][-1][0]
        logs[f"continued run ({args.continued.name})"] = [e for e in loss_log(args.continued) if e[0] > shipped_steps]
    curve = [[name, f"{w.first}-{w.last}", f"{w.mean:.4f}"] for name, log in logs.items() for w in window_means(log, args.window)]

    groups = {"training photographs": training_images(), "held-out photographs": held_out_images()}
    models = {"shipped": DEFAULT_MODEL_DIR} | ({args.compare.name: args.compare} if args.compare else {})
    names, rows = gap_rows(models, groups, args.crops, crop_size)
    gap = [[row.timestep, *(f"{loss:.4f}" for loss in row.losses)] for row in rows]
    for row in gap:
        print(" | ".join(row))
    write_report(args.out, "Training curve and generalisation of the embedded model", __doc__.split("\n\n", 2)[2], [
        f"## 1. DSM loss against training steps (mean over windows of {args.window} steps)",
        markdown_table(["run", "steps", "mean loss"], curve),
        f"## 2. DSM loss of the shipped UNet: training against held-out photographs ({args.crops} random "
        f"{crop_size}x{crop_size} crops each, same noise)",
        markdown_table(["timestep", *names], gap),
    ], module="benchmarks.training_curve", argv=args.argv, minutes=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
