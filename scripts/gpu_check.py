"""The checks that need a CUDA GPU, in one script: run it wherever one is available.

    python scripts/gpu_check.py                 # writes docs/gpu.md
    python scripts/gpu_check.py --quick --skip-tests --out /tmp/gpu.md   # a 64x64 smoke run

It does three things and writes what it measured to docs/gpu.md:

1. Runs the whole test suite (`pytest -m "slow or not slow"`) on the GPU machine, so that the
   CUDA-only tests (skipped on CPU machines) run too, and reports the pytest summary line.
2. Times a 256x256 super-resolution x4 restoration (4 samples, --steps steps) in every
   covariance mode with a UNet the size of google/ddpm-celebahq-256 (random weights: no model
   download), against a bare network forward on the same batch, in float32 and bfloat16
   network precision. CUDA is asynchronous: every timing synchronises the device first.
3. Times the embedded default model at 128x128 in every mode (the CPU's table in docs/speed.md).

No hub access is needed; the script refuses to run without CUDA (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from benchmarks.model_families import DDPM_CELEBAHQ_256, quick_config  # noqa: E402
from benchmarks.reporting import markdown_table, write_report  # noqa: E402
from operators import SuperResolution  # noqa: E402
from posterior_diff import COVARIANCES, NonFiniteSampleError, default_model, restore  # noqa: E402
from posterior_diff.models.formats import denoiser_from_diffusers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64 UNet of the same structure, 3 steps")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the test-suite run")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per timed restoration (default 20)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "docs" / "gpu.md")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.steps = 3
    return args


def run_tests() -> str:
    """The test suite's summary line (the last line pytest prints)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow or not slow"], cwd=REPOSITORY,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return (lines[-1] if lines else done.stderr.strip()[-500:]) + f" (exit status {done.returncode})"


def synchronised_seconds(device: torch.device, run) -> float:
    """Wall seconds of run(), with the device's queue drained before and after (CUDA is asynchronous)."""
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    synchronise(device)
    start = time.perf_counter()
    run()
    synchronise(device)
    return time.perf_counter() - start


def time_modes(model, size: int, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Rows: mode, seconds per step, ratio to a bare forward, VJPs per step, for one model."""
    x = torch.randn(args.samples, 3, size, size, device=device)
    t = torch.full((args.samples,), 0.5, device=device)
    with torch.no_grad():
        model(x, t)
        forward = min(synchronised_seconds(device, lambda: model(x, t)) for _ in range(5))
    y = torch.rand(3, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    rows = [["bare forward", f"{forward:.4f}", "1.00", "0"]]
    for covariance in COVARIANCES:
        def run():
            return restore(y, SuperResolution(4, sigma_y=0.025), model, num_samples=args.samples, steps=args.steps,
                           covariance=covariance, device=device, generator=torch.Generator(device=device).manual_seed(0))
        try:
            run()  # warm-up
            result = run()
        except NonFiniteSampleError:  # random weights can diverge; the timing is what is asked for
            rows.append([covariance, "diverged", "", ""])
            continue
        per_step = result.seconds / args.steps
        rows.append([covariance, f"{per_step:.4f}", f"{per_step / forward:.2f}", f"{result.vjps / args.steps:.1f}"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run this script on a machine with a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    start = time.perf_counter()
    from diffusers import DDPMScheduler, UNet2DModel

    sections = []
    if not args.skip_tests:
        sections.append(f"## Test suite on {torch.cuda.get_device_name(device)}\n\n    {run_tests()}")
    config = quick_config(DDPM_CELEBAHQ_256) if args.quick else DDPM_CELEBAHQ_256
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    for dtype in (torch.float32, torch.bfloat16):
        model = denoiser_from_diffusers(unet.to(dtype), DDPMScheduler(num_train_timesteps=1000)).to(device)
        rows = time_modes(model, config["sample_size"], args, device)
        sections.append(f"## SR x4 at {config['sample_size']}², UNet of google/ddpm-celebahq-256's size, network in "
                        f"{str(dtype).removeprefix('torch.')}\n\n"
                        + markdown_table(["covariance", "s / step", "x bare forward", "VJPs / step"], rows))
    embedded = default_model().to(device)
    sections.append("## The embedded model at 128², float32\n\n" + markdown_table(
        ["covariance", "s / step", "x bare forward", "VJPs / step"], time_modes(embedded, 128, args, device)))
    intro = (f"{args.samples} samples per restoration, {args.steps} steps, random weights for the large UNet "
             "(the timing does not depend on them). Ratios are seconds per sampler step over one bare forward "
             "of the same batch.")
    write_report(args.out, "GPU check", intro, sections, module="scripts.gpu_check", argv=args.argv,
                 minutes=(time.perf_counter() - start) / 60,
                 details=[f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
