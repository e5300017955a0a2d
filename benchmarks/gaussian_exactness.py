"""Exactness study: posterior samples on Gaussian priors against their closed-form posteriors.

With a Gaussian prior and a linear operator the posterior N(m, C) is known exactly, and with
the Tweedie covariance the averaged-likelihood guidance is exact too (THEORY section 5): what
remains is the error of the time discretisation and of the conjugate gradient. This script
measures it on the three tasks of `posterior_diff.problems.gaussian_image_problems()` (an 8x8
Gaussian image prior observed by inpainting, 2x super-resolution and denoising).

For N samples from `posterior_diff.restore` it reports, against N(m, C):

- mean error  ||mean - m|| / sqrt(tr C);
- cov error   ||cov - C||_F / ||C||_F;
- W2          the 2-Wasserstein distance between N(mean, cov) of the samples and N(m, C);
- tr ratio    tr cov(samples) / tr C, whether a sampler shrinks (< 1) or inflates (> 1) the spread;

the first three both raw and divided by the exact-sample floor (the same errors for N exact draws from N(m, C),
`posterior_diff.metrics.exact_sample_floor`), so a ratio near 1 means "as good as exact
sampling at this N". Each cell is averaged over `--seeds` sampler seeds. NFE counts denoiser
calls on the batch of N samples, VJPs the vector-Jacobian products the guidance spent on it.

Table 1 crosses the covariance V_t of the averaged likelihood ("zero", "isotropic",
"diagonal", "tweedie") with the noise level eta (0 = probability-flow ODE, 1 = reverse SDE) for
the default solver. Table 2 compares the solvers with the Tweedie covariance over 20, 50 and 100
steps on super-resolution and denoising. A run that produces non-finite values, or samples more than DIVERGENCE_BOUND prior
standard deviations from the prior mean, is reported as "diverged".

Run (from the repository root; the default run takes about eight minutes on two CPU cores):

    PYTHONPATH=. python benchmarks/gaussian_exactness.py              # writes docs/gaussian_exactness.md
    PYTHONPATH=. python benchmarks/gaussian_exactness.py --quick --out /tmp/gaussian_exactness.md
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import posterior_diff
from posterior_diff import NonFiniteSampleError, restore
from posterior_diff.metrics import exact_sample_floor, gaussian_errors, sample_moments
from posterior_diff.problems import GaussianProblem, gaussian_image_problems

from benchmarks.reporting import markdown_table

COVARIANCES = ("zero", "isotropic", "diagonal", "tweedie")
ETAS = (0.0, 0.5, 1.0)
DEFAULT_SOLVER = inspect.signature(restore).parameters["solver"].default
SOLVER_ETAS = {"multistep": (0.0, 1.0), "euler": (0.0, 1.0), "heun": (0.0,), "pc": (0.0, 1.0), "euler_maruyama": (0.0, 1.0)}
# Inpainting is left out of table 2: its Tweedie conjugate gradient costs twice the VJPs of the
# other tasks, and with it the default run would take about 13 minutes on two cores instead of 8.
SOLVER_TASKS = ("super-resolution", "denoising")
SOLVER_STEPS = (20, 50, 100)
QUICK_SOLVER_STEPS = (20,)
DIVERGENCE_BOUND = 100.0
ERROR_KEYS = ("mean_error", "cov_error", "w2")


@dataclass
class Cell:
    """One table cell: errors averaged over seeds, or the number of seeds that diverged."""

    errors: dict[str, float]
    ratios: dict[str, float]
    spread: float
    nfe: float
    vjps: float
    seconds: float
    diverged: int
    seeds: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick fills in the sizes that were not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=200, steps=20, one seed, 20-step solver table")
    parser.add_argument("--samples", type=int, default=None, help="posterior samples N per run (default 2000)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps of table 1 (default 100)")
    parser.add_argument("--seeds", type=int, default=None, help="sampler seeds averaged per cell (default 3)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--out", type=Path, default=Path("docs/gaussian_exactness.md"), help="markdown file to write")
    args = parser.parse_args(argv)
    quick_defaults, full_defaults = dict(samples=200, steps=20, seeds=1), dict(samples=2000, steps=100, seeds=3)
    for name, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    args.solver_steps = QUICK_SOLVER_STEPS if args.quick else SOLVER_STEPS
    return args


def has_diverged(samples: torch.Tensor, problem: GaussianProblem) -> bool:
    """True if samples are non-finite or lie absurdly far (in prior standard deviations) from the prior."""
    if not bool(torch.isfinite(samples).all()):
        return True
    prior_std = float(problem.prior.eigenvalues.max().sqrt())
    distance = (samples - problem.prior.mean).abs().max()
    return float(distance) > DIVERGENCE_BOUND * prior_std


def spread_ratio(samples: torch.Tensor, cov: torch.Tensor) -> float:
    """tr cov(samples) / tr C: below 1 the sampler shrinks the posterior, above 1 it inflates it."""
    _, sample_cov = sample_moments(samples)
    return float(torch.trace(sample_cov) / torch.trace(cov.to(torch.float64)))


def run_cell(problem: GaussianProblem, floor: dict[str, float], args: argparse.Namespace, settings: dict) -> Cell:
    """restore() once per seed with the given settings; average the errors over the seeds."""
    posterior = problem.posterior
    runs, diverged = [], 0
    for seed in range(args.seeds):
        try:
            result = restore(
                problem.y, problem.operator, problem.prior, num_samples=args.samples,
                generator=torch.Generator().manual_seed(seed), **settings,
            )
        except NonFiniteSampleError:
            diverged += 1
            continue
        if has_diverged(result.samples, problem):
            diverged += 1
            continue
        errors = gaussian_errors(result.samples, posterior.mean, posterior.cov)
        errors["spread"] = spread_ratio(result.samples, posterior.cov)
        runs.append((errors, result))
    if diverged:
        return Cell({}, {}, 0.0, 0.0, 0.0, 0.0, diverged, args.seeds)
    errors = {key: sum(e[key] for e, _ in runs) / len(runs) for key in ERROR_KEYS}
    return Cell(
        errors=errors,
        ratios={key: errors[key] / floor[key] for key in ERROR_KEYS},
        spread=sum(e["spread"] for e, _ in runs) / len(runs),
        nfe=sum(r.nfe for _, r in runs) / len(runs),
        vjps=sum(r.vjps for _, r in runs) / len(runs),
        seconds=statistics.median(r.seconds for _, r in runs),  # robust to a stall of a shared machine
        diverged=0,
        seeds=args.seeds,
    )


class Study:
    """The problems, their exact-sample floors and the cells measured so far (a cell shared by both tables runs once)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.problems = gaussian_image_problems(dtype=getattr(torch, args.dtype))
        self.floors = {p.name: exact_sample_floor(p.posterior, args.samples) for p in self.problems}
        self._cells: dict[tuple, Cell] = {}

    def cell(self, problem: GaussianProblem, **settings) -> Cell:
        """The Cell of `problem` sampled with restore(**settings), measured on first request."""
        key = (problem.name, tuple(sorted(settings.items())))
        if key not in self._cells:
            self._cells[key] = run_cell(problem, self.floors[problem.name], self.args, settings)
        return self._cells[key]


CELL_HEADER = ["mean err", "cov err", "W2", "mean/floor", "cov/floor", "W2/floor", "tr ratio", "NFE", "VJPs", "s"]


def format_cell(cell: Cell) -> list[str]:
    """The CELL_HEADER columns of one cell ("diverged" and blanks if any seed diverged)."""
    if cell.diverged:
        return [f"diverged ({cell.diverged}/{cell.seeds} seeds)"] + [""] * (len(CELL_HEADER) - 1)
    raw = [f"{cell.errors[key]:.4f}" for key in ERROR_KEYS]
    ratios = [f"{cell.ratios[key]:.2f}" for key in ERROR_KEYS]
    return raw + ratios + [f"{cell.spread:.3f}", f"{cell.nfe:.0f}", f"{cell.vjps:.0f}", f"{cell.seconds:.2f}"]


def covariance_table(study: Study) -> str:
    """Table 1: covariance x eta for the default solver at --steps steps."""
    rows = []
    for problem in study.problems:
        for covariance in COVARIANCES:
            for eta in ETAS:
                cell = study.cell(problem, steps=study.args.steps, covariance=covariance, eta=eta, solver=DEFAULT_SOLVER)
                rows.append([problem.name, covariance, f"{eta:g}"] + format_cell(cell))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return markdown_table(["task", "covariance", "eta"] + CELL_HEADER, rows)


def solver_table(study: Study) -> str:
    """Table 2: solvers x eta x steps with the Tweedie covariance."""
    rows = []
    for problem in (p for p in study.problems if p.name in SOLVER_TASKS):
        for solver, etas in SOLVER_ETAS.items():
            for eta in etas:
                for steps in study.args.solver_steps:
                    cell = study.cell(problem, steps=steps, covariance="tweedie", eta=eta, solver=solver)
                    rows.append([problem.name, solver, f"{eta:g}", str(steps)] + format_cell(cell))
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return markdown_table(["task", "solver", "eta", "steps"] + CELL_HEADER, rows)


def exact_spread_deviation(cov: torch.Tensor, num_samples: int) -> float:
    """Standard deviation of the tr ratio for N exact Gaussian draws: sqrt(2 tr C^2 / (N - 1)) / tr C."""
    cov = cov.to(torch.float64)
    return float(torch.sqrt(2 * torch.trace(cov @ cov) / (num_samples - 1)) / torch.trace(cov))


def floor_table(study: Study) -> str:
    """The exact-sample floor of each task: the errors of N exact posterior draws, and their tr ratio spread."""
    rows = [
        [p.name, type(p.operator).__name__, f"{p.operator.sigma_y:g}"]
        + [f"{study.floors[p.name][k]:.4f}" for k in ERROR_KEYS]
        + [f"1 +- {exact_spread_deviation(p.posterior.cov, study.args.samples):.3f}"]
        for p in study.problems
    ]
    return markdown_table(["task", "operator", "sigma_y", "mean err", "cov err", "W2", "tr ratio"], rows)


def header(args: argparse.Namespace, minutes: float) -> str:
    """What was measured, how, when and where."""
    command = "PYTHONPATH=. python " + shlex.join(["benchmarks/gaussian_exactness.py"] + sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    return "\n".join([
        "# Exactness on Gaussian priors",
        "",
        "Posterior samples from `posterior_diff.restore` on an 8x8 Gaussian image prior "
        "(`posterior_diff.problems.gaussian_image_problems()`), compared with the closed-form posterior N(m, C). "
        "mean err = ||mean - m|| / sqrt(tr C); cov err = ||cov - C||_F / ||C||_F; W2 = Gaussian 2-Wasserstein "
        "distance between the samples' moments and N(m, C). The `/floor` columns divide by the same errors of "
        "N exact posterior draws (1 = as good as exact sampling). tr ratio = tr cov(samples) / tr C: below 1 the sampler "
        "shrinks the posterior, above 1 it inflates it (its spread for N exact draws is in the floor table). "
        f"N = {args.samples} samples per run, each cell "
        f"averaged over {args.seeds} sampler seed(s); NFE = denoiser calls on the batch, VJPs = vector-Jacobian "
        "products of the guidance on the batch, s = median seconds per run. \"diverged\" = non-finite samples or samples "
        f"more than {DIVERGENCE_BOUND:g} prior standard deviations from the prior mean in some seed.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; total run time {minutes:.1f} min",
        f"- posterior-diff {posterior_diff.__version__}, torch {torch.__version__} ({torch.get_num_threads()} thread, set by the script), dtype {args.dtype}",
        f"- machine: {machine}",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # One thread: the 8x8 problems gain nothing from more, and two OpenMP threads stall badly
    # (x10-x50 per run) whenever another process takes one of the two cores.
    torch.set_num_threads(1)
    start = time.perf_counter()
    study = Study(args)
    covariances = covariance_table(study)
    solvers = solver_table(study)
    minutes = (time.perf_counter() - start) / 60
    document = "\n\n".join([
        header(args, minutes),
        f"## Exact-sample floor (N = {args.samples})",
        floor_table(study),
        f"## 1. Covariance of the averaged likelihood x eta (solver \"{DEFAULT_SOLVER}\", {args.steps} steps)",
        covariances,
        "## 2. Solvers with the Tweedie covariance",
        f"Tasks {', '.join(SOLVER_TASKS)} only: inpainting is left out to keep the default run near ten minutes "
        "on two CPU cores (its conjugate gradient costs twice the VJPs). \"heun\" integrates the probability-flow "
        "ODE, so it runs at eta = 0 only.",
        solvers,
    ]) + "\n"
    print(document)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
