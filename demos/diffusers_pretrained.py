"""x4 super-resolution with a pretrained diffusers model through `PosteriorSamplingPipeline`.

Any pixel-space diffusers DDPM-family model works: a hub id for users with internet, or a
local folder (a pipeline folder, or a UNet folder with its scheduler config). Offline, with no
argument, it uses the folder of the embedded default model, which is a diffusers pipeline too.

    python demos/diffusers_pretrained.py                                         # offline
    python demos/diffusers_pretrained.py --model google/ddpm-celebahq-256 --image face.png --size 256
    python demos/diffusers_pretrained.py --model path/to/saved/pipeline --steps 100 --samples 8

On a GPU the UNet runs in float16 (the sampler state stays float32). It prints PSNR/SSIM of
bicubic and of the posterior mean, the time per image, and writes a figure:

    low resolution | bicubic | posterior mean | one sample | posterior std | ground truth
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from posterior_diff import DEFAULT_MODEL_DIR, PosteriorSamplingPipeline
from posterior_diff.models.loading import ModelLoadError, resolve_model_folder

from super_resolution import add_experiment_arguments, report, x4_measurement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="hub id 'org/name' or local folder (default: embedded model)")
    parser.add_argument("--local-files-only", action="store_true", help="use the Hugging Face cache only, never the network")
    parser.add_argument("--image", type=Path, help="ground-truth image file (default: scikit-image astronaut)")
    add_experiment_arguments(parser, "outputs/diffusers_pretrained.png")
    args = parser.parse_args()

    try:
        folder = resolve_model_folder(args.model, local_files_only=args.local_files_only)
    except ModelLoadError as error:  # offline and not cached: one line saying what to do
        raise SystemExit(str(error)) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = PosteriorSamplingPipeline.from_pretrained(folder, dtype=dtype).to(device)

    truth, operator, generator, low, bicubic = x4_measurement(args, pipe.unet.config.in_channels)

    start = time.perf_counter()
    samples = pipe(low, operator, num_inference_steps=args.steps, num_samples=args.samples, covariance=args.covariance,
                   generator=generator, output_type="pt").images.cpu()
    seconds = time.perf_counter() - start
    mean, std = samples.mean(0), samples.std(0)
    print(f"\n{args.model}: x4 SR of a {args.size}x{args.size} crop, {args.samples} samples, {args.steps} steps, "
          f"covariance {args.covariance!r}, {device} ({dtype}): {seconds:.1f} s\n")
    report(truth, low, bicubic, mean, samples[0], std, args.out)


if __name__ == "__main__":
    main()
