"""The exactness study's three Gaussian problems through a dense `MatrixOperator`: seconds and errors.

A user with a forward model that has no structure writes it as a matrix. This benchmark takes
the three tasks of `posterior_diff.evaluation.problems.gaussian_image_problems()` (8x8 Gaussian image prior;
inpainting, 2x super-resolution, denoising), writes each operator as its dense (m, 64) matrix,
and restores the flattened measurement on the flattened prior with the Tweedie covariance,
N = 2000 samples, 100 steps, from the prior. The structured operator's run is the reference: both
solve (sigma_y^2 I + r A A^T) v = u in closed form, so errors must agree and only the seconds may
differ. Errors are divided by the exact-sample floor (1 = as good as 2000 exact posterior draws).

The peer row is azula's MMPS (`azula.guidance.mmps.MMPSDenoiser`, conjugate gradient with 10
iterations) under its DDPM sampler (`azula.sample.DDPMSampler`, as many steps), on the same dense
problem (same prior, matrix, y and sigma_y) and the same exact denoiser: our GaussianPrior behind
azula's `Denoiser` interface, with an azula `Schedule` that returns our schedule's alpha(t), sigma(t),
so both samplers see the same prior and forward process. azula is optional (the `benchmark` extra):
without it the benchmark says so and skips its rows.

    python -m benchmarks.dense_operators                  # writes docs/dense_operators.md
    python -m benchmarks.dense_operators --quick --out /tmp/dense_operators.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from operators import MatrixOperator
from posterior_diff import GaussianPrior, restore
from posterior_diff.evaluation.metrics import exact_sample_floor, gaussian_errors
from posterior_diff.evaluation.problems import GaussianProblem, gaussian_image_problems

from .reporting import log_row, markdown_table, write_report

OURS = "posterior-diff tweedie"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dense_operators", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 samples, 10 steps")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as gaussian_exactness)")
    parser.add_argument("--azula-iterations", type=int, default=10,
                        help="conjugate-gradient iterations of azula's MMPS (default 10)")
    parser.add_argument("--out", type=Path, default=Path("docs/dense_operators.md"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.samples, args.steps = 200, 10
    if min(args.samples, args.steps, args.threads, args.azula_iterations) < 1:
        parser.error("--samples, --steps, --threads and --azula-iterations must be >= 1")
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


def load_azula():
    """The azula modules this benchmark uses, or None (with a note on stderr) if azula is not installed."""
    try:
        from azula.denoise import Denoiser, DiracPosterior
        from azula.guidance.mmps import MMPSDenoiser
        from azula.linalg.covariance import IsotropicCovariance
        from azula.noise import Schedule
        from azula.sample import DDPMSampler
    except ImportError:
        print("note: azula is not installed (pip install 'azula>=0.11', in the benchmark extra): "
              "skipping its rows", file=sys.stderr, flush=True)
        return None
    return SimpleNamespace(version=importlib.metadata.version("azula"), Denoiser=Denoiser,
                           DiracPosterior=DiracPosterior, MMPSDenoiser=MMPSDenoiser,
                           IsotropicCovariance=IsotropicCovariance, Schedule=Schedule, DDPMSampler=DDPMSampler)


def azula_denoiser(azula, prior: GaussianPrior):
    """`prior` (E[x_0 | x_t] on its schedule) as an azula `Denoiser` whose `Schedule` is our schedule."""

    class OurSchedule(azula.Schedule):
        def __init__(self, schedule):
            self.schedule = schedule

        def __call__(self, t):
            return self.schedule.alpha(t), self.schedule.sigma(t)

    class OurDenoiser(azula.Denoiser):
        def __init__(self):
            super().__init__()
            self.prior = prior
            self.schedule = OurSchedule(prior.schedule)

        def forward(self, x_t, t, **kwargs):
            return azula.DiracPosterior(mean=self.prior(x_t, t))

    denoiser = OurDenoiser()
    generator = torch.Generator().manual_seed(0)
    for t in (0.01, 0.3, 0.7, 1.0):  # the wrapper must be our prior and our forward process, to float precision
        t = torch.tensor(t, dtype=prior.mean.dtype)
        x_t = torch.randn(4, prior.mean.numel(), generator=generator, dtype=prior.mean.dtype)
        alpha, sigma = denoiser.schedule(t)
        if not (torch.allclose(denoiser(x_t, t).mean, prior(x_t, t), rtol=1e-12, atol=1e-12)
                and torch.allclose(alpha, prior.schedule.alpha(t))
                and torch.allclose(sigma, prior.schedule.sigma(t))):
            raise AssertionError(f"azula wrapper disagrees with the prior at t={float(t)}")
    return denoiser


def timed_azula_run(azula, problem: GaussianProblem, args) -> tuple[float, dict[str, float]]:
    """(seconds, errors) of azula's MMPS (CG with `args.azula_iterations` iterations) and DDPM (`args.steps`
    steps) on the dense `problem`, errors as in `timed_run`."""
    prior, operator = problem.prior, problem.operator
    dtype = prior.mean.dtype
    matrix = operator.matrix.to(dtype)
    guided = azula.MMPSDenoiser(azula_denoiser(azula, prior), problem.y.to(dtype), lambda x: x @ matrix.T,
                                azula.IsotropicCovariance(torch.tensor(operator.sigma_y**2, dtype=dtype)),
                                solver="cg", iterations=args.azula_iterations)
    sampler = azula.DDPMSampler(guided, steps=args.steps, silent=True, dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # azula draws from the global generator: seed it, then restore it
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        samples = sampler(sampler.init((args.samples, prior.mean.numel()), dtype=dtype))
        seconds = time.perf_counter() - start
    return seconds, gaussian_errors(samples, problem.posterior.mean.reshape(-1), problem.posterior.cov)


def rows(args, azula=None) -> list[list[str]]:
    """Per task: our structured and dense runs, then azula's dense run if `azula` (from `load_azula`) is given."""
    table = []
    for problem in gaussian_image_problems():
        floor = exact_sample_floor(problem.posterior, args.samples, repeats=10)
        dense = dense_problem(problem)
        runs = [("structured", OURS, type(problem.operator).__name__, lambda: timed_run(problem, args)),
                ("dense matrix", OURS, "MatrixOperator", lambda: timed_run(dense, args))]
        if azula is not None:
            runs.append(("dense matrix", azula_method(args), "MatrixOperator.matrix",
                         lambda: timed_azula_run(azula, dense, args)))
        results = []
        for label, method, operator_class, run in runs:
            seconds, errors = run()
            log_row(problem.name, label, method, seconds)
            results.append((label, method, operator_class, seconds, errors))
        dense_seconds = results[1][3]  # posterior-diff's dense-matrix run
        for label, method, operator_class, seconds, errors in results:
            table.append([problem.name, label, method, operator_class,
                          f"{seconds:.2f}", f"{seconds / dense_seconds:.2f}",
                          f"{errors['mean_error'] / floor['mean_error']:.2f}",
                          f"{errors['cov_error'] / floor['cov_error']:.2f}"])
    return table


def azula_method(args) -> str:
    return f"azula MMPS (CG {args.azula_iterations})"


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        azula = load_azula()
        table = rows(args, azula)
        intro = (f"Tweedie restores of the Gaussian exactness problems, N = {args.samples} samples, {args.steps} steps, "
                 f"sampler seed {args.seed}, through the structured operator and through its dense matrix "
                 "(`MatrixOperator`, solved in the eigenbasis of M M^T, factored once). s = seconds per run; "
                 "s / dense = its seconds over those of posterior-diff's dense-matrix run of the task; "
                 "mean/floor and cov/floor = errors against the closed-form posterior over those of as many exact draws.")
        if azula is not None:
            intro += (f"\n\nPeer: {azula_method(args)} = azula's `MMPSDenoiser` (conjugate gradient, "
                      f"{args.azula_iterations} iterations) under its `DDPMSampler` ({args.steps} steps, azula's "
                      "uniform grid in t from 1 to 0), from azula's initial N(0, I), on the same dense problem (the "
                      "matrix as `x @ M.T`, isotropic noise covariance sigma_y^2) around the same exact denoiser: our "
                      "GaussianPrior behind azula's `Denoiser` interface with an azula `Schedule` returning our "
                      "alpha(t), sigma(t) (checked against the prior at four times before each run), float64, "
                      "global generator seeded with the sampler seed, timed around the whole sampler call on the "
                      "same torch threads.")
        else:
            intro += ("\n\nazula is not installed (`pip install 'azula>=0.11'`, in the benchmark extra): "
                      "its rows are skipped.")
        details = [f"azula: {azula.version}" if azula is not None else "azula: not installed"]
        return write_report(args.out, "Dense matrix operators on the Gaussian problems", intro, [
            markdown_table(["task", "operator", "method", "class", "s", "s / dense", "mean/floor", "cov/floor"],
                           table)],
            module="benchmarks.dense_operators", argv=args.argv, minutes=(time.perf_counter() - start) / 60,
            details=details)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
