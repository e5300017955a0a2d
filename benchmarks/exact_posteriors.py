"""Ours against deepinv on problems whose posterior is known exactly.

1. The three Gaussian tasks of the exactness study (`problems.gaussian_image_problems`: 8x8
   Gaussian image prior; inpainting, 2x2 super-resolution, denoising). Ours with each
   covariance mode at steps x eta; deepinv's methods (see `peers`) at the same steps. Errors of
   the samples' mean, covariance and Gaussian W2 against the exact posterior, each divided by
   the same error of as many exact posterior draws (the floor: 1.00 = as good as exact).
2. Calibration on the same tasks: the exact posterior mass inside each coordinate's central
   50% and 90% sample interval, averaged over coordinates (nominal: 0.50 and 0.90).
3. The MCGdiff Gaussian-mixture benchmark (`problems.mixture_problem`, Cardoso et al. 2023):
   sliced Wasserstein distance (1000 directions) of N samples against N exact posterior
   draws, beside the floor (two independent exact sets) and the prior.

Every study returns rows (dataclasses); `python -m benchmarks.run_benchmarks` runs them and
turns them into docs/benchmarks.md. A run that diverges (the rule of
`posterior_diff.evaluation.harness.has_diverged`) is a row without errors.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from posterior_diff import COVARIANCES, NonFiniteSampleError
from posterior_diff.evaluation.harness import (DIVERGED, has_diverged, posterior_distance, restore_unless_diverged,
                                               single_precision)
from posterior_diff.evaluation.metrics import ERROR_KEYS, exact_sample_floor, gaussian_errors, interval_coverage
from posterior_diff.evaluation.problems import gaussian_image_problems, mixture_problem

from .peers import run_peer
from .reporting import log_row

GAUSSIAN_PEERS = ("dps", "pigdm", "mm", "mm-cg", "ddrm")


@dataclass(frozen=True)
class Method:
    """One sampler: ours ("ours", covariance, eta) or a deepinv method ("deepinv", name)."""

    family: str
    name: str
    eta: float | None = None

    @property
    def label(self) -> str:
        return f"ours {self.name} eta={self.eta:g}" if self.family == "ours" else f"deepinv {self.name}"


@dataclass
class Draw:
    """Samples (N, *x_shape) or None when the sampler diverged, with its cost."""

    samples: Tensor | None
    nfe: int
    seconds: float


def draw(method: Method, prior, operator, y: Tensor, num_samples: int, steps: int, seed: int) -> Draw:
    """Run one sampler on one measurement; a diverged run (`evaluation.has_diverged`) has samples None."""
    start = time.perf_counter()
    if method.family == "ours":
        result = restore_unless_diverged(y, operator, prior, num_samples=num_samples, steps=steps, covariance=method.name,
                                         eta=method.eta, generator=torch.Generator().manual_seed(seed), start="prior")
        if result is None:
            return Draw(None, 0, time.perf_counter() - start)
        return Draw(result.samples, result.nfe, result.seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deepinv's notes on seeds and solvers
            run = run_peer(method.name, prior, operator, y, num_samples, steps, seed)
    except NonFiniteSampleError:
        return Draw(None, 0, time.perf_counter() - start)
    return Draw(None if has_diverged(run.samples) else run.samples, run.nfe, run.seconds)


@dataclass
class GaussianRow:
    """One sampler at one step count on one Gaussian task: errors / floor and the 50% / 90% coverage."""

    task: str
    method: Method
    steps: int
    ratios: dict[str, float] | None  # error / floor, None when diverged
    coverage: tuple[float, float] | None  # (50%, 90%)
    nfe: int
    seconds: float


def gaussian_study(num_samples: int, steps_list: list[int], etas: list[float], tasks: list[str] | None = None,
                   covariances=COVARIANCES, peers=GAUSSIAN_PEERS, seed: int = 0) -> tuple[list[GaussianRow], dict[str, dict[str, float]], dict[str, tuple[float, float]]]:
    """The Gaussian comparison.

    Returns:
        rows, the exact-sample floor per task (errors of N exact draws), and the coverage of
        N exact draws per task (the calibration yardstick).
    """
    problems = [p for p in gaussian_image_problems() if tasks is None or p.name in tasks]
    methods = [Method("ours", c, eta) for c in covariances for eta in etas] + [Method("deepinv", p) for p in peers]
    rows, floors, exact_coverage = [], {}, {}
    for problem in problems:
        posterior = problem.posterior
        mean, cov = posterior.mean, posterior.cov
        floors[problem.name] = exact_sample_floor(posterior, num_samples, repeats=10, seed=seed)
        exact = posterior.sample(num_samples, torch.Generator().manual_seed(seed + 1))
        exact_coverage[problem.name] = (interval_coverage(exact, mean, cov, 0.5), interval_coverage(exact, mean, cov, 0.9))
        single = single_precision(problem.prior, problem.operator, problem.y)  # built once: restore() copies what it changes
        for method in methods:
            for steps in steps_list:
                result = draw(method, *single, num_samples, steps, seed)
                ratios = coverage = None
                if result.samples is not None:
                    errors = gaussian_errors(result.samples.cpu(), mean, cov)
                    ratios = {key: errors[key] / floors[problem.name][key] for key in ERROR_KEYS}
                    coverage = (interval_coverage(result.samples, mean, cov, 0.5), interval_coverage(result.samples, mean, cov, 0.9))
                rows.append(GaussianRow(problem.name, method, steps, ratios, coverage, result.nfe, result.seconds))
                log_row(problem.name, method.label, steps, ratios and f"W2/floor {ratios['w2']:.2f}", result.seconds)
    return rows, floors, exact_coverage


@dataclass
class MixtureRow:
    """One sampler (or "exact", "prior") on one mixture problem: its sliced Wasserstein distance."""

    dimension: int
    measurements: int
    seed: int
    method: str
    sw: float | None  # None when diverged
    nfe: int
    seconds: float


def mixture_study(num_samples: int, steps: int, dimensions: list[int], measurement_counts: list[int], seeds: list[int],
                  covariances=("tweedie", "isotropic", "diagonal"), peers=GAUSSIAN_PEERS,
                  projections: int = 1000) -> list[MixtureRow]:
    """SW of each sampler on each MCGdiff problem, plus the "exact" (floor) and "prior" rows."""
    methods = [Method("ours", c, 1.0) for c in covariances] + [Method("deepinv", p) for p in peers]
    rows = []
    for dimension in dimensions:
        for measurements in measurement_counts:
            for seed in seeds:
                problem = mixture_problem(dimension, measurements, seed)
                distance, floor = posterior_distance(problem, num_samples, seed, projections)
                single = single_precision(problem.prior, problem.operator, problem.y)  # once per problem, not per method
                prior_draws = problem.prior.sample(num_samples, torch.Generator().manual_seed(3000 + seed))
                rows.append(MixtureRow(dimension, measurements, seed, "exact", floor, 0, 0.0))
                rows.append(MixtureRow(dimension, measurements, seed, "prior", distance(prior_draws), 0, 0.0))
                for method in methods:
                    result = draw(method, *single, num_samples, steps, seed)
                    sw = None if result.samples is None else distance(result.samples)
                    rows.append(MixtureRow(dimension, measurements, seed, method.label, sw, result.nfe, result.seconds))
                    log_row(f"mixture d={dimension} d_y={measurements} seed={seed}", method.label, steps,
                            DIVERGED if sw is None else f"SW {sw:.3f}", result.seconds)
    return rows
