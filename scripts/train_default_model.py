"""Reproduce the embedded default model: DSM training on scikit-image's sample photographs.

The photographs ship inside scikit-image (no download): `posterior_diff.evaluation.TRAINING_PHOTOGRAPHS`.
The evaluation images are held out (`evaluation.HELD_OUT`): astronaut, camera, coffee and
chelsea (and `cat`, which is the same photograph as chelsea).
Grey photographs are repeated to three channels. The run writes a diffusers pipeline folder;
`--install` then copies its UNet weights (float16 safetensors) and configs into
`posterior_diff/default_model/`, where `restore(y, operator)` finds them.

    python scripts/train_default_model.py --out outputs/default_model --install
    python scripts/train_default_model.py --out outputs/default_model --resume   # after an interruption
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

# The photographs (training ones and held-out ones) are listed in one place, the evaluation module.
from posterior_diff.evaluation import training_images
from posterior_diff.training import CHECKPOINT, TrainingConfig, build_scheduler, build_unet, load_checkpoint, train

PACKAGE_MODEL = Path(__file__).resolve().parents[1] / "posterior_diff" / "default_model"


def export_checkpoint(run: Path, destination: Path) -> None:
    """Save the EMA weights of `run`'s latest checkpoint as a diffusers pipeline in `destination`
    (for a run that was stopped before its last step)."""
    from diffusers import DDPMPipeline

    state = load_checkpoint(run / CHECKPOINT)  # weights_only=True: the file cannot run code
    config = TrainingConfig(**state["config"])
    unet = build_unet(config)
    unet.load_state_dict(state["ema"])
    DDPMPipeline(unet=unet, scheduler=build_scheduler(config)).save_pretrained(destination)
    (destination / "training_log.json").write_text(json.dumps({"stopped_at_step": state["step"], "loss": state["loss_log"]}))


def install(run: Path) -> None:
    """Copy the trained pipeline into the package, UNet weights in float16 to keep it small."""
    from diffusers import UNet2DModel

    if PACKAGE_MODEL.exists():
        shutil.rmtree(PACKAGE_MODEL)
    unet = UNet2DModel.from_pretrained(run / "unet")
    unet.to(torch.float16).save_pretrained(PACKAGE_MODEL / "unet", safe_serialization=True)
    shutil.copytree(run / "scheduler", PACKAGE_MODEL / "scheduler")
    shutil.copy(run / "model_index.json", PACKAGE_MODEL / "model_index.json")
    shutil.copy(run / "training_log.json", PACKAGE_MODEL / "training_log.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/default_model"))
    parser.add_argument("--steps", type=int, default=6000, help="total optimiser steps (also on --resume)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--install", action="store_true", help="copy the result into posterior_diff/default_model")
    parser.add_argument("--export-checkpoint", type=Path, metavar="DIR",
                        help="only save the latest checkpoint's EMA weights of --out as a pipeline in DIR (no training)")
    args = parser.parse_args()
    if args.export_checkpoint is not None:
        export_checkpoint(args.out, args.export_checkpoint)
        print(f"exported {args.out / CHECKPOINT} to {args.export_checkpoint}")
        return
    config = TrainingConfig(steps=args.steps, crop_size=32, batch_size=32, block_out_channels=(32, 64, 128), checkpoint_every=250)
    train(training_images(), args.out, config, resume=args.resume)
    if args.install:
        install(args.out)
        print(f"installed into {PACKAGE_MODEL}")


if __name__ == "__main__":
    main()
