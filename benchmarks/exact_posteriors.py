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

Every function returns plain rows; `run_benchmarks.py` turns them into docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from posterior_diff import GaussianMixturePrior, GaussianPrior, NonFiniteSampleError, restore
from posterior_diff.metrics import exact_sample_floor, gaussian_errors, sliced_wasserstein
from posterior_diff.problems import gaussian_image_problems, mixture_problem

from .peers import run_peer

OUR_COVARIANCES = ("tweedie", "isotropic", "diagonal", "zero")
GAUSSIAN_PEERS = ("dps", "pigdm", "mm", "mm-cg", "ddrm")
ERROR_KEYS = ("mean_error", "cov_error", "w2")
DIVERGENCE_BOUND = 1e4  # |x| beyond this (priors of scale ~1 to ~20) counts as diverged


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
    """Run one sampler on one measurement; non-finite or exploded output counts as diverged."""
    start = time.perf_counter()
    try:
        if method.family == "ours":
            result = restore(y, operator, prior, num_samples=num_samples, steps=steps, covariance=method.name,
                             eta=method.eta, generator=torch.Generator().manual_seed(seed))
            samples, nfe, seconds = result.samples, result.nfe, result.seconds
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deepinv's notes on seeds and solvers
                run = run_peer(method.name, prior, operator, y, num_samples, steps, seed)
            samples, nfe, seconds = run.samples, run.nfe, run.seconds
    except NonFiniteSampleError:
        return Draw(None, 0, time.perf_counter() - start)
    if not bool(torch.isfinite(samples).all()) or float(samples.abs().max()) > DIVERGENCE_BOUND:
        return Draw(None, nfe, seconds)
    return Draw(samples, nfe, seconds)


def normal_mass(lower: Tensor, upper: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """P(lower <= X <= upper) for X ~ N(mean, std^2), elementwise."""
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
    return standard.cdf((upper - mean) / std) - standard.cdf((lower - mean) / std)


def interval_coverage(samples: Tensor, mean: Tensor, cov: Tensor, level: float) -> float:
    """Exact posterior mass inside each coordinate's central `level` sample interval, averaged."""
    flat = samples.flatten(1).to(torch.float64)
    quantiles = torch.quantile(flat, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64), dim=0)
    std = cov.to(torch.float64).diagonal().clamp_min(1e-300).sqrt()
    return float(normal_mass(quantiles[0], quantiles[1], mean.flatten().to(torch.float64), std).mean())


@dataclass
class GaussianRow:
    task: str
    method: Method
    steps: int
    ratios: dict[str, float] | None  # error / floor, None when diverged
    coverage: tuple[float, float] | None  # (50%, 90%)
    nfe: int
    seconds: float


def gaussian_study(num_samples: int, steps_list: list[int], etas: list[float], tasks: list[str] | None = None,
                   covariances=OUR_COVARIANCES, peers=GAUSSIAN_PEERS, seed: int = 0) -> tuple[list[GaussianRow], dict[str, dict[str, float]], dict[str, tuple[float, float]]]:
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
        single = in_float32(problem.prior, problem.operator, problem.y)  # built once: restore() copies what it changes
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


def in_float32(prior, operator, y: Tensor):
    """Single-precision copies of a problem's prior, operator and measurement, for sampling.

    The problems and their exact posteriors are built in double precision; both families sample
    in single precision, as they would on images (deepinv calls its denoiser in float32).
    """
    if isinstance(prior, GaussianMixturePrior):
        prior32 = GaussianMixturePrior(prior.weights.float(), prior.means.float(), prior.covs.float(), prior.schedule)
    else:
        prior32 = GaussianPrior(prior.mean.float(), prior.cov.float(), prior.schedule)
    return prior32, copy.deepcopy(operator).float(), y.float()


@dataclass
class MixtureRow:
    dimension: int
    measurements: int
    seed: int
    method: str
    sw: float | None  # None when diverged
    nfe: int
    seconds: float


def posterior_distance(problem, num_samples: int, seed: int, projections: int = 1000):
    """(distance, floor) for a problem with an exact posterior: `distance(samples)` is the sliced
    Wasserstein distance to `num_samples` exact posterior draws, on the same projection directions
    for every sample set; `floor` is that distance for another `num_samples` exact draws."""
    generator = torch.Generator().manual_seed(1000 + seed)
    reference = problem.posterior.sample(num_samples, generator)

    def distance(samples: Tensor) -> float:
        return sliced_wasserstein(samples.cpu().double(), reference, projections, generator=torch.Generator().manual_seed(2000 + seed))

    return distance, distance(problem.posterior.sample(num_samples, generator))


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
                single = in_float32(problem.prior, problem.operator, problem.y)  # once per problem, not per method
                prior_draws = problem.prior.sample(num_samples, torch.Generator().manual_seed(3000 + seed))
                rows.append(MixtureRow(dimension, measurements, seed, "exact", floor, 0, 0.0))
                rows.append(MixtureRow(dimension, measurements, seed, "prior", distance(prior_draws), 0, 0.0))
                for method in methods:
                    result = draw(method, *single, num_samples, steps, seed)
                    sw = None if result.samples is None else distance(result.samples)
                    rows.append(MixtureRow(dimension, measurements, seed, method.label, sw, result.nfe, result.seconds))
                    log_row(f"mixture d={dimension} d_y={measurements} seed={seed}", method.label, steps,
                         "diverged" if sw is None else f"SW {sw:.3f}", result.seconds)
    return rows


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def log_row(*fields) -> None:
    """One progress line on stderr: fields joined by " | ", floats as seconds."""
    print(" | ".join(f"{f:.1f} s" if isinstance(f, float) else str(f) for f in fields), file=sys.stderr, flush=True)
