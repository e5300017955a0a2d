"""x4 super-resolution of a held-out photograph with any diffusers model folder.

Loads the model with `posterior_diff.load_model`, whichever family it is (DDPM, ADM with learned
variance, score-SDE VE, EDM; see posterior_diff/models/formats.py), says what the loader read
(family, data range, time axis), simulates the "sr4" measurement y = A x + sigma_y n of a
centre crop of a scikit-image photograph held out of the embedded model's training (4x4
average pooling, sigma_y = 0.025 in [0, 1] units), restores it and prints the PSNR of bicubic
upsampling and of the posterior mean against the ground truth.

Offline by default, on the embedded model's folder (posterior_diff.DEFAULT_MODEL_DIR):

    python demos/restore_any_model.py                                  # one to three minutes on 2 CPU cores
    python demos/restore_any_model.py --model path/to/ncsnpp-celebahq-256 --size 256
    python demos/restore_any_model.py --model google/ddpm-celebahq-256 --variant fp16 --size 256
"""

from __future__ import annotations

import argparse
import time

import torch

from posterior_diff import DEFAULT_MODEL_DIR, ModelLoadError, load_model, restore
from posterior_diff.evaluation.harness import (HELD_OUT_PHOTOGRAPHS, bicubic_upsample, load_photograph, measure,
                                               psnr_ssim)
from posterior_diff.tasks import get_task

TASK = get_task("sr4")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model folder or hub id (default: the embedded model)")
    parser.add_argument("--variant", help="weights variant, e.g. fp16 (default: the plain weights, else the only variant)")
    parser.add_argument("--local-files-only", action="store_true", help="hub ids: the local cache only, never the network")
    parser.add_argument("--photograph", default="astronaut", choices=HELD_OUT_PHOTOGRAPHS)
    parser.add_argument("--size", type=int, default=64, help=f"side of the restored crop, a multiple of {TASK.factor}")
    parser.add_argument("--downscale", type=float, default=4.0, help="shrink the photograph first by this factor")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: posterior_diff.defaults)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size % TASK.factor:
        parser.error(f"--size must be a multiple of {TASK.factor}, got {args.size}")
    return args


def describe(model) -> str:
    """One line: the Denoiser class the loader built, its data range and its time axis."""
    return f"{type(model).__name__}, data range {model.data_range}, {model.schedule!r}, {model.channels} channel(s)"


def main() -> None:
    args = parse_args()
    try:
        model = load_model(args.model, variant=args.variant, local_files_only=args.local_files_only)
    except ModelLoadError as error:  # a folder that cannot be read, or no network: one line saying why
        raise SystemExit(str(error)) from None
    print(f"{args.model}: {describe(model)}")
    try:
        truth = load_photograph(args.photograph, args.size, args.downscale, model.channels)
    except ValueError as error:
        raise SystemExit(f"{error}; choose a smaller --size or --downscale") from None
    generator = torch.Generator().manual_seed(args.seed)
    measurement = measure(TASK, truth, generator=generator)
    start = time.perf_counter()
    result = restore(measurement.y, measurement.operator, model, num_samples=args.samples, steps=args.steps,
                     generator=generator, progress=True)
    print(f"\nx4 super-resolution of a {args.size}x{args.size} crop of {args.photograph!r}, sigma_y = {TASK.sigma_y}: "
          f"{args.samples} samples, {result.nfe} network evaluations, {time.perf_counter() - start:.0f} s\n")
    print("| estimate | PSNR (dB) |\n|---|---|")
    for name, estimate in [("bicubic", bicubic_upsample(measurement.y, measurement.x_shape)), ("posterior mean", result.mean)]:
        print(f"| {name} | {psnr_ssim(estimate, truth)[0]:.2f} |")


if __name__ == "__main__":
    main()
