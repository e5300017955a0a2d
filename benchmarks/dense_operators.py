"""The exactness study's three Gaussian problems through a dense `MatrixOperator`: seconds and errors.

A user with a forward model that has no structure writes it as a matrix. This benchmark takes
the three tasks of `posterior_diff.problems.gaussian_image_problems()` (8x8 Gaussian image prior;
inpainting, 2x super-resolution, denoising), writes each operator as its dense (m, 64) matrix,
and restores the flattened measurement on the flattened prior with the Tweedie covariance,
N = 2000 samples, 100 steps, from the prior. The structured operator's run is the reference: both
solve (sigma_y^2 I + r A A^T) v = u in closed form, so errors must agree and only the seconds may
differ. Errors are divided by the exact-sample floor (1 = as good as 2000 exact posterior draws).

    python -m benchmarks.dense_operators                  # writes docs/dense_operators.md
    python -m benchmarks.dense_operators --quick --out /tmp/dense_operators.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from operators import MatrixOperator
from posterior_diff import GaussianPrior, restore
from posterior_diff.metrics import exact_sample_floor, gaussian_errors
from posterior_diff.problems import GaussianProblem, gaussian_image_problems

from .reporting import log_row, markdown_table, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dense_operators", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 samples, 10 steps")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as gaussian_exactness)")
    parser.add_argument("--out", type=Path, default=Path("docs/dense_operators.md"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.samples, args.steps = 200, 10
    if min(args.samples, args.steps, args.threads) < 1:
        parser.error("--samples, --steps and --threads must be >= 1")
    return args


def dense_problem(problem: GaussianProblem) -> GaussianProblem:
    """The same problem on flattened vectors: a prior on (d,) and A as its (m, d) matrix."""
    prior = problem.prior
    d = prior.mean.numel()
    basis = torch.eye(d, dtype=prior.mean.dtype).reshape(d, *prior.mean.shape)
    matrix = problem.operator.A(basis).reshape(d, -1).T  # column j = A e_j
    operator = MatrixOperator(matrix, problem.operator.sigma_y)
    flat_prior = GaussianPrior(prior.mean.reshape(d), prior.cov, prior.schedule)
    y = problem.y.reshape(-1)
    return GaussianProblem(problem.name, flat_prior, operator, problem.x_true.reshape(d), y,
                           flat_prior.posterior(operator, y))


def timed_run(problem: GaussianProblem, args) -> tuple[float, dict[str, float]]:
    """(seconds, errors) of one Tweedie restore of `problem`, errors on flattened samples."""
    start = time.perf_counter()
    result = restore(problem.y, problem.operator, problem.prior, num_samples=args.samples, steps=args.steps,
                     covariance="tweedie", start="prior", generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - start
    samples = result.samples.reshape(args.samples, -1)
    return seconds, gaussian_errors(samples, problem.posterior.mean.reshape(-1), problem.posterior.cov)


def rows(args) -> list[list[str]]:
    table = []
    for problem in gaussian_image_problems():
        floor = exact_sample_floor(problem.posterior, args.samples, repeats=10)
        for label, version in (("structured", problem), ("dense matrix", dense_problem(problem))):
            seconds, errors = timed_run(version, args)
            log_row(problem.name, label, seconds)
            table.append([problem.name, label, type(version.operator).__name__, f"{seconds:.2f}",
                          f"{errors['mean_error'] / floor['mean_error']:.2f}",
                          f"{errors['cov_error'] / floor['cov_error']:.2f}"])
    return table


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        table = rows(args)
        intro = (f"Tweedie restores of the Gaussian exactness problems, N = {args.samples} samples, {args.steps} steps, "
                 f"sampler seed {args.seed}, through the structured operator and through its dense matrix "
                 "(`MatrixOperator`, solved in the eigenbasis of M M^T, factored once). s = seconds per run; "
                 "mean/floor and cov/floor = errors against the closed-form posterior over those of as many exact draws.")
        return write_report(args.out, "Dense matrix operators on the Gaussian problems", intro, [
            markdown_table(["task", "operator", "class", "s", "mean/floor", "cov/floor"], table)],
            module="benchmarks.dense_operators", argv=args.argv, minutes=(time.perf_counter() - start) / 60)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
