"""What a restoration costs as the image grows: time and peak memory of `restore` from 128x128 to 1024x1024.

Run it as `python -m benchmarks.large_images` (`--quick`: 32 and 64 only); it writes
docs/large_images.md. SR x4 (average pooling, sigma_y 0.025) of a centre crop of a photograph at
each size, with the embedded model at the image defaults (tweedie, 20 steps, CG cap 4) and one
sample, on the CPU. Per size: the sampler's seconds, seconds per megapixel, the peak memory the
run added (`reporting.PeakMemory`: growth of the process's peak resident set), and the memory
check's estimate of one sample's peak (`posterior_diff.memory`, made on fake tensors before the run),
so that the table also says how close that estimate is (`memory.OVERHEAD` is set from this ratio). The image is scikit-image's `rocket`
resized to each size: only the cost is measured here, never a quality, and the cost does not
depend on the content.

A size whose 20 steps would take hours on 2 cores can run fewer (`--steps 1024=2`): the peak memory
is that of one step (each step holds the same tensors), and the seconds of the default steps are
projected from the seconds per step, a lower bound: such a short run spends fewer VJPs per step (its
closing step takes none) than the 3 per step of a full run. `--default-network 1024` also runs that
size whole with restore's default network on this CPU (`models.loading.default_network_dtype`:
bfloat16 where the CPU has it), as a user's `restore` call would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from operators import SuperResolution
from posterior_diff import default_model, restore
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation import photograph
from posterior_diff.memory import peak_bytes_per_row
from posterior_diff.models.loading import default_network_dtype

from .reporting import PeakMemory, ResultCache, embedded_model, log_row, markdown_table, write_report

SIZES = (128, 256, 512, 1024)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="32 and 64 only")
    parser.add_argument("--steps", type=size_steps, nargs="*", default=[],
                        help="SIZE=STEPS: fewer steps than the image defaults' at that size (seconds projected)")
    parser.add_argument("--default-network", type=int, nargs="*", default=[], metavar="SIZE",
                        help="sizes also run at the image defaults with restore's default network precision")
    parser.add_argument("--out", type=Path, default=Path("docs/large_images.md"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.sizes = (32, 64)
    args.steps = dict(args.steps)
    return args


def size_steps(text: str) -> tuple[int, int]:
    """"SIZE=STEPS" as (size, steps)."""
    size, _, steps = text.partition("=")
    if not (size.isdigit() and steps.isdigit() and int(steps) >= 2):
        raise argparse.ArgumentTypeError(f"expected SIZE=STEPS with STEPS >= 2, got {text!r}")
    return int(size), int(steps)


def crop(size: int) -> torch.Tensor:
    """scikit-image's rocket photograph resized to size x size (antialiased bilinear), (3, size, size) in [0, 1]."""
    image = photograph("rocket")[None]
    return torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)


def measure_size(model, size: int, steps: int | None = None) -> dict:
    """One SR x4 restore at size x size (`steps`: None for the image defaults'): seconds, peak MB
    added, the estimate of one sample's peak."""
    operator = SuperResolution(4, sigma_y=0.025)
    y = operator.measure(crop(size)[None], torch.Generator().manual_seed(0))[0]
    estimate = peak_bytes_per_row(model, (3, size, size), needs_vjp=True)
    with PeakMemory("cpu") as peak:
        began = time.perf_counter()
        result = restore(y, operator, model, steps=steps, generator=torch.Generator().manual_seed(0))
        wall = time.perf_counter() - began
    return dict(seconds=result.seconds, wall=wall, peak_mb=peak.megabytes, steps=result.settings.sampler.steps,
                estimate_mb=None if estimate is None else estimate / 2**20, nfe=result.nfe, vjps=result.vjps)


def projected(run: dict) -> dict:
    """A run of fewer steps than the image defaults' with its seconds scaled to theirs (per step, as
    measured: a lower bound, see the module's docstring) and "projected" set; a run at the
    defaults as it is."""
    steps = run.get("steps", IMAGE_DEFAULTS.steps)
    if steps == IMAGE_DEFAULTS.steps:
        return run
    return dict(run, seconds=run["seconds"] * IMAGE_DEFAULTS.steps / steps, projected=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = default_model(torch.float32)
    cache = ResultCache(args.out.with_suffix(".json"), dict(model=embedded_model(), threads=args.threads))
    rows, base = [], None
    default_dtype = str(default_network_dtype()).removeprefix("torch.")
    plan = [(size, args.steps.get(size), "float32") for size in args.sizes]
    plan += [(size, None, default_dtype) for size in args.default_network]
    for size, steps, dtype in plan:
        key = f"sr4|{size}" + ("" if steps is None else f"|{steps} steps") + ("" if dtype == "float32" else f"|{dtype}")
        network = model if dtype == "float32" else default_model()
        run = cache.get(key, lambda size=size, steps=steps, network=network: measure_size(network, size, steps))
        megapixels = size * size / 1e6
        run = projected(run)
        base = base or run
        log_row(f"{size}x{size}", float(run["seconds"]), f"{run['peak_mb']:.0f} MB")
        rows.append([f"{size}x{size}" + ("" if steps is None else f" ({steps} steps run, seconds projected to "
                                                                   f"{IMAGE_DEFAULTS.steps})")
                     + ("" if dtype == "float32" else f", {dtype} network (restore's default here)"),
                     f"{megapixels:.3f}", ("≥ " if run.get("projected") else "") + f"{run['seconds']:.1f}",
                     f"{run['seconds'] / megapixels:.0f}",
                     f"{run['seconds'] / base['seconds']:.1f}", f"{run['peak_mb']:.0f}",
                     "" if run["estimate_mb"] is None else f"{run['estimate_mb']:.0f}", f"{run['nfe']} / {run['vjps']}"])
    write_report(args.out, "Large images: time and memory", __doc__.split("\n\n", 1)[1], [
        f"SR x4, one sample, embedded model at the image defaults, float32 network unless the row says otherwise, "
        f"{args.threads} thread(s):\n\n"
        + markdown_table(["size", "megapixels", "seconds", "s per megapixel", "× the smallest", "peak MB (measured)",
                          "peak MB (estimate)", "NFE / VJPs"], rows),
    ], module="benchmarks.large_images", argv=args.argv, minutes=(time.perf_counter() - began) / 60,
        details=[embedded_model(), f"{args.threads} thread(s)"])


if __name__ == "__main__":
    main()
