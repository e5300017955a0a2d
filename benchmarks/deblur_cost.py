"""Deblurring's cost per step: a projection-covariance guidance step with `operators.Blur` against a bare forward.

The projection covariance takes one network forward and no VJP per step; what it adds is the
operator's work: A on the denoised image, the closed-form solve of (sigma_y^2 I + r A A^T) (two
FFTs per plane, `operators.Blur.solve`) and A^T. This times, on a --size x --size RGB crop of a
held-out photograph with the embedded default model (`posterior_diff.default_model()`) and a batch
of --samples images:

- the bare forward: one network call without a graph (as `benchmarks.speed` times it);
- the guidance step: one call of `AveragedLikelihoodGuidance(model, Blur, y, "projection")` at the
  same time and input, y in the model's units as `restore` gives it;

in alternating rounds (the machine's speed drifts), each the median of its rounds, and prints the
ratio per deblurring task (target: at most TARGET_RATIO).

    python -m benchmarks.deblur_cost                 # 128 x 128, 4 samples, 5 rounds of 3
    python -m benchmarks.deblur_cost --rounds 2 --repeats 1 --size 64   # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posterior_diff import default_model
from posterior_diff.evaluation import load_photograph, measure
from posterior_diff.sampling.guidance import AveragedLikelihoodGuidance
from posterior_diff.images import measurement_to_model_units

TASKS = ("deblur", "deblur-motion")
TARGET_RATIO = 1.1
TIME = 0.5  # mid noise, as benchmarks.speed's bare forward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="side of the centre crop in pixels (default 128)")
    parser.add_argument("--samples", type=int, default=4, help="batch of images per call (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of timings (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per round, the median kept (default 3)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def median_seconds(call, repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of `call()` (after one warm-up call)."""
    call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def task_ratio(model, task: str, args: argparse.Namespace) -> dict:
    """Seconds of the bare forward and of the guidance step for one task, and their ratio."""
    truth = load_photograph("astronaut", args.size, downscale=2)
    measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
    y, operator = measurement_to_model_units(measurement.y, measurement.operator, model.data_range)
    guidance = AveragedLikelihoodGuidance(model, operator, y[None], "projection")
    x = torch.randn(args.samples, *measurement.x_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((args.samples,), TIME)

    def bare():
        with torch.no_grad():
            model(x, t)

    forwards, steps = [], []
    for _ in range(args.rounds):
        forwards.append(median_seconds(bare, args.repeats))
        steps.append(median_seconds(lambda: guidance.at_time(x, TIME), args.repeats))
    forward, step = statistics.median(forwards), statistics.median(steps)
    return dict(task=task, kernel=measurement.operator.kernel_size, forward=forward, step=step, ratio=step / forward)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model(torch.float32)
    rows = []
    print(f"{args.size}x{args.size} RGB, batch {args.samples}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds of {args.repeats}")
    for task in args.tasks.split(","):
        row = task_ratio(model, task, args)
        verdict = "within" if row["ratio"] <= TARGET_RATIO else "over"
        print(f"{task} ({row['kernel']}x{row['kernel']} kernel): bare forward {row['forward']:.4f} s, "
              f"projection step {row['step']:.4f} s, ratio {row['ratio']:.3f} ({verdict} the target {TARGET_RATIO})")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
