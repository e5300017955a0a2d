"""Exactness study: posterior samples on Gaussian priors against their closed-form posteriors.

With a Gaussian prior and a linear operator the posterior N(m, C) is known exactly, and with
the Tweedie covariance the averaged-likelihood guidance is exact too (THEORY section 5): what
remains is the error of the time discretisation and of the conjugate gradient. This script
measures it on the three tasks of `posterior_diff.evaluation.problems.gaussian_image_problems()` (an 8x8
Gaussian image prior observed by inpainting, 2x super-resolution and denoising).

For N samples from `posterior_diff.restore` it reports, against N(m, C):

- mean error  ||mean - m|| / sqrt(tr C);
- cov error   ||cov - C||_F / ||C||_F;
- W2          the 2-Wasserstein distance between N(mean, cov) of the samples and N(m, C);
- tr ratio    tr cov(samples) / tr C, whether a sampler shrinks (< 1) or inflates (> 1) the spread;

the first three both raw and divided by the exact-sample floor (the same errors for N exact draws from N(m, C),
`posterior_diff.evaluation.metrics.exact_sample_floor`), so a ratio near 1 means "as good as exact
sampling at this N". Each cell is averaged over `--seeds` sampler seeds. NFE counts denoiser
calls on the batch of N samples, VJPs the vector-Jacobian products the guidance spent on it.

Table 1 crosses the covariance V_t of the averaged likelihood ("zero", "isotropic",
"diagonal", "tweedie") with the noise level eta (0 = probability-flow ODE, 1 = reverse SDE) for
the default solver. Table 2 compares the solvers with the Tweedie covariance over 20, 50 and 100
steps on super-resolution and denoising. A cell where any seed diverges (the rule of
`posterior_diff.evaluation.harness.has_diverged`: NonFiniteSampleError, non-finite samples, or samples
beyond DIVERGENCE_BOUND in absolute value) is reported as "diverged".

Run from the repository root (the default run takes about eight minutes on two CPU cores):

    python -m benchmarks.gaussian_exactness                     # writes docs/gaussian_exactness.md
    python -m benchmarks.gaussian_exactness --quick --out /tmp/gaussian_exactness.md
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posterior_diff import COVARIANCES, restore
from posterior_diff.evaluation.harness import DIVERGED, DIVERGENCE_BOUND, restore_unless_diverged
from posterior_diff.evaluation.metrics import ERROR_KEYS, exact_sample_floor, gaussian_errors, trace_ratio
from posterior_diff.evaluation.problems import GaussianProblem, gaussian_image_problems

from .reporting import log_row, markdown_table, write_report

ETAS = (0.0, 0.5, 1.0)
DEFAULT_SOLVER = inspect.signature(restore).parameters["solver"].default
SOLVER_ETAS = {"multistep": (0.0, 1.0), "euler": (0.0, 1.0), "heun": (0.0,), "pc": (0.0, 1.0), "euler_maruyama": (0.0, 1.0)}
# Inpainting is left out of table 2: its Tweedie conjugate gradient costs twice the VJPs of the
# other tasks, and with it the default run would take about 13 minutes on two cores instead of 8.
SOLVER_TASKS = ("super-resolution", "denoising")
SOLVER_STEPS = (20, 50, 100)
QUICK_SOLVER_STEPS = (20,)


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
    args.argv = sys.argv[1:] if argv is None else list(argv)
    quick_defaults, full_defaults = dict(samples=200, steps=20, seeds=1), dict(samples=2000, steps=100, seeds=3)
    for name, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    args.solver_steps = QUICK_SOLVER_STEPS if args.quick else SOLVER_STEPS
    return args


def run_cell(problem: GaussianProblem, floor: dict[str, float], args: argparse.Namespace, settings: dict) -> Cell:
    """restore() once per seed with the given settings; average the errors over the seeds."""
    posterior = problem.posterior
    runs, diverged = [], 0
    for seed in range(args.seeds):
        result = restore_unless_diverged(problem.y, problem.operator, problem.prior, num_samples=args.samples,
                                         generator=torch.Generator().manual_seed(seed), start="prior", **settings)
        if result is None:
            diverged += 1
            continue
        errors = gaussian_errors(result.samples, posterior.mean, posterior.cov)
        errors["spread"] = trace_ratio(result.samples, posterior.cov)
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
        return [f"{DIVERGED} ({cell.diverged}/{cell.seeds} seeds)"] + [""] * (len(CELL_HEADER) - 1)
    raw = [f"{cell.errors[key]:.4f}" for key in ERROR_KEYS]
    ratios = [f"{cell.ratios[key]:.2f}" for key in ERROR_KEYS]
    return raw + ratios + [f"{cell.spread:.3f}", f"{cell.nfe:.0f}", f"{cell.vjps:.0f}", f"{cell.seconds:.2f}"]


@dataclass
class ExactnessRow:
    """One line of tables 1 and 2: a task, the sampler settings and its Cell."""

    task: str
    covariance: str
    solver: str
    eta: float
    steps: int
    cell: Cell


def measured_row(study: Study, problem: GaussianProblem, **settings) -> ExactnessRow:
    """The row of `problem` sampled with restore(**settings), logged to stderr."""
    row = ExactnessRow(problem.name, settings["covariance"], settings["solver"], settings["eta"], settings["steps"],
                       study.cell(problem, **settings))
    log_row(row.task, row.covariance, row.solver, f"eta {row.eta:g}", f"{row.steps} steps", *format_cell(row.cell))
    return row


def covariance_rows(study: Study) -> list[ExactnessRow]:
    """Table 1: covariance x eta for the default solver at --steps steps."""
    return [measured_row(study, problem, steps=study.args.steps, covariance=covariance, eta=eta, solver=DEFAULT_SOLVER)
            for problem in study.problems for covariance in COVARIANCES for eta in ETAS]


def solver_rows(study: Study) -> list[ExactnessRow]:
    """Table 2: solvers x eta x steps with the Tweedie covariance."""
    return [measured_row(study, problem, steps=steps, covariance="tweedie", eta=eta, solver=solver)
            for problem in study.problems if problem.name in SOLVER_TASKS
            for solver, etas in SOLVER_ETAS.items() for eta in etas for steps in study.args.solver_steps]


def covariance_table(rows: list[ExactnessRow]) -> str:
    return markdown_table(["task", "covariance", "eta"] + CELL_HEADER,
                          [[r.task, r.covariance, f"{r.eta:g}"] + format_cell(r.cell) for r in rows])


def solver_table(rows: list[ExactnessRow]) -> str:
    return markdown_table(["task", "solver", "eta", "steps"] + CELL_HEADER,
                          [[r.task, r.solver, f"{r.eta:g}", str(r.steps)] + format_cell(r.cell) for r in rows])


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


def introduction(args: argparse.Namespace) -> str:
    """What was measured and how (the paragraph under the title)."""
    return (
        "Posterior samples from `posterior_diff.restore` on an 8x8 Gaussian image prior "
        "(`posterior_diff.evaluation.problems.gaussian_image_problems()`), compared with the closed-form posterior N(m, C). "
        "mean err = ||mean - m|| / sqrt(tr C); cov err = ||cov - C||_F / ||C||_F; W2 = Gaussian 2-Wasserstein "
        "distance between the samples' moments and N(m, C). The `/floor` columns divide by the same errors of "
        "N exact posterior draws (1 = as good as exact sampling). tr ratio = tr cov(samples) / tr C: below 1 the sampler "
        "shrinks the posterior, above 1 it inflates it (its spread for N exact draws is in the floor table). "
        f"N = {args.samples} samples per run, each cell "
        f"averaged over {args.seeds} sampler seed(s); NFE = denoiser calls on the batch, VJPs = vector-Jacobian "
        "products of the guidance on the batch, s = median seconds per run. \"diverged\" = NonFiniteSampleError, "
        f"non-finite samples or samples beyond {DIVERGENCE_BOUND:g} in absolute value in some seed."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # One thread: the 8x8 problems gain nothing from more, and two OpenMP threads stall badly
    # (x10-x50 per run) whenever another process takes one of the two cores.
    torch.set_num_threads(1)
    start = time.perf_counter()
    study = Study(args)
    covariances, solvers = covariance_rows(study), solver_rows(study)
    write_report(args.out, "Exactness on Gaussian priors", introduction(args), [
        f"## Exact-sample floor (N = {args.samples})",
        floor_table(study),
        f"## 1. Covariance of the averaged likelihood x eta (solver \"{DEFAULT_SOLVER}\", {args.steps} steps)",
        covariance_table(covariances),
        "## 2. Solvers with the Tweedie covariance",
        f"Tasks {', '.join(SOLVER_TASKS)} only: inpainting is left out to keep the default run near ten minutes "
        "on two CPU cores (its conjugate gradient costs twice the VJPs). \"heun\" integrates the probability-flow "
        "ODE, so it runs at eta = 0 only.",
        solver_table(solvers),
    ], module="benchmarks.gaussian_exactness", argv=args.argv, minutes=(time.perf_counter() - start) / 60,
        details=[f"dtype: {args.dtype}"])


if __name__ == "__main__":
    main()
