"""The embedded model's training curve and its generalisation gap: writes docs/training_curve.md.

    PYTHONPATH=. python -m benchmarks.training_curve
    PYTHONPATH=. python -m benchmarks.training_curve --continued outputs/default_model/checkpoint.pt --compare outputs/model_10k

1. The DSM loss (noise-prediction MSE, one random timestep per crop) averaged over windows of
   training steps, from the shipped `training_log.json` and, with `--continued`, from a
   checkpoint of a longer run that resumed from it (its `loss_log` past the shipped steps).
2. The same loss of the shipped UNet (and, with `--compare`, another model folder's) on random crops of the training photographs and of the
   four held-out evaluation photographs (as the image benchmark crops them), at fixed
   timesteps with the same noise for both.
   Both losses falling together with more steps says the model is still learning what
   transfers; the held-out / training ratio is what the 15 training photographs (all that
   scikit-image ships besides the held-out ones) leave unlearnt at this size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from posterior_diff.images import to_model_range
from posterior_diff.models import DEFAULT_MODEL_DIR
from posterior_diff.training import RandomCrops, load_checkpoint
from scripts.train_default_model import HELD_OUT, training_images

from .image_restoration import load_photograph
from .reporting import markdown_table, provenance

TIMESTEPS = [50, 150, 250, 400, 600, 800, 950]  # DDPM training timesteps (of 1000) to evaluate at


def loss_log(path: Path) -> list[tuple[int, float]]:
    """[(step, loss)] from a training_log.json ("loss") or a training checkpoint ("loss_log")."""
    if path.suffix == ".json":
        entries = json.loads(path.read_text())["loss"]
    else:
        entries = load_checkpoint(path)["loss_log"]
    return [(int(step), float(loss)) for step, loss in entries]


def window_means(log: list[tuple[int, float]], window: int) -> list[tuple[int, int, float]]:
    """(first step, last step, mean loss) over consecutive windows of `window` steps."""
    rows = []
    for start in range(log[0][0], log[-1][0] + 1, window):
        values = [loss for step, loss in log if start <= step < start + window]
        if values:
            rows.append((start, start + window - 1, sum(values) / len(values)))
    return rows


def held_out_images() -> list[torch.Tensor]:
    """The four evaluation photographs as the image benchmark uses them (halved, 128x128 centre
    crops), (3, 128, 128) in [-1, 1]."""
    return [to_model_range(load_photograph(name, 128, 2.0)) for name in HELD_OUT if name != "cat"]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--continued", type=Path, help="a checkpoint (or training_log.json) of a longer run")
    parser.add_argument("--compare", type=Path, help="another model folder (e.g. the continued run's) to evaluate beside the shipped one")
    parser.add_argument("--crops", type=int, default=512)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("docs/training_curve.md"))
    args = parser.parse_args(argv)
    from diffusers import DDPMScheduler, UNet2DModel

    torch.set_num_threads(1)
    start = time.perf_counter()
    shipped = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())
    crop_size = shipped["config"]["crop_size"]
    logs = {"shipped model": loss_log(DEFAULT_MODEL_DIR / "training_log.json")}
    if args.continued:
        shipped_steps = logs["shipped model"][-1][0]
        logs[f"continued run ({args.continued.name})"] = [e for e in loss_log(args.continued) if e[0] > shipped_steps]
    curve_rows = [[name, f"{first}-{last}", f"{mean:.4f}"] for name, log in logs.items()
                  for first, last, mean in window_means(log, args.window)]

    groups = {"training photographs": training_images(), "held-out photographs": held_out_images()}
    models = {"shipped": DEFAULT_MODEL_DIR} | ({args.compare.name: args.compare} if args.compare else {})
    header, columns = ["timestep"], []
    for label, folder in models.items():
        unet = UNet2DModel.from_pretrained(folder / "unet").float().eval()
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        losses = [dsm_loss(unet, scheduler, images, args.crops, crop_size, seed=0) for images in groups.values()]
        losses.append([held / seen for seen, held in zip(*losses)])
        columns += [values + [sum(values) / len(values)] for values in losses]
        header += [f"{label}: {name}" for name in groups] + [f"{label}: held-out / training"]
    gap_rows = [[str(t), *(f"{column[i]:.4f}" for column in columns)] for i, t in enumerate([*TIMESTEPS, "mean"])]
    for row in gap_rows:
        print(" | ".join(row))

    minutes = (time.perf_counter() - start) / 60
    text = "\n\n".join([
        "# Training curve and generalisation of the embedded model",
        __doc__.split("\n\n", 2)[2].strip(),
        "\n".join(provenance(["-m", "benchmarks.training_curve"], minutes)),
        f"## 1. DSM loss against training steps (mean over windows of {args.window} steps)",
        markdown_table(["run", "steps", "mean loss"], curve_rows),
        f"## 2. DSM loss of the shipped UNet: training against held-out photographs ({args.crops} random "
        f"{crop_size}x{crop_size} crops each, same noise)",
        markdown_table(header, gap_rows),
    ]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
