"""Particle mode (twisted SMC) against the plain guided sampler: writes docs/particle_mode.md.

    python -m benchmarks.particle_mode                                    # the full run
    python -m benchmarks.particle_mode --quick --out /tmp/particle_mode.md  # a smoke run (seconds)

1. The MCGdiff Gaussian mixture (`problems.mixture_problem`): sliced Wasserstein distance
   (1000 directions) of the returned samples to as many exact posterior draws, divided by the
   floor of two independent exact sets, against the number of particles K; the plain sampler
   (K = none) beside it. Target: within 3x the floor at K = 2000, 100 steps. The problems use
   a VP schedule with beta_max = 30: with the default 20, alpha(1) = 0.0066 and the d = 800
   prior (E||x_0||^2 ~ 1e5) is up to 2.4 nats from the N(0, I) every sampler starts from, so even
   the unconditional sampler weights its modes wrongly; section 1b measures that.
2. A Gaussian prior (`problems.gaussian_image_problems`): errors against the exact posterior
   and the effective sample size, which on a Gaussian prior measures only how far the
   proposal (guided or conditioned) is from the optimal one; also without resampling, where
   the lowest ESS over the run shows it undiluted.
3. Images with the embedded model: PSNR of the posterior mean with small K against the plain
   sampler given the same total network evaluations (K x steps).

A run that diverges (`posterior_diff.evaluation.harness.has_diverged`) is reported as "diverged".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from posterior_diff import GaussianMixturePrior, VPSchedule, default_model, sample
from posterior_diff.evaluation.harness import (DIVERGED, load_photograph, measure, posterior_distance, psnr_ssim,
                                       restore_unless_diverged, single_precision)
from posterior_diff.evaluation.metrics import ERROR_KEYS, exact_sample_floor, gaussian_errors
from posterior_diff.evaluation.problems import gaussian_image_problems, mixture_problem

from .reporting import log_row, markdown_table, number, write_report

FULL = dict(samples=2000, steps=100, particle_counts=[10, 100, 1000, 2000], dimensions=[8, 80, 800], measurement_counts=[1, 2, 4],
            seeds=[0], covariance="tweedie", gaussian_steps=[50, 100, 200], images=["astronaut", "camera", "coffee", "chelsea"],
            image_tasks=["sr4", "random"], image_size=64, image_downscale=4.0, image_particles=[4, 8], image_steps=25,
            repeats=3, ess_particles=500, mixture_schedule=VPSchedule(0.1, 30.0), terminal_cases=[(8, 2), (80, 2), (800, 1), (800, 2)])
QUICK = dict(samples=200, steps=10, particle_counts=[10, 50], dimensions=[8], measurement_counts=[1], seeds=[0],
             covariance="tweedie", gaussian_steps=[10], images=["astronaut"], image_tasks=["sr4"], image_size=32,
             image_downscale=8.0, image_particles=[2], image_steps=3, repeats=2, ess_particles=20, mixture_schedule=VPSchedule(0.1, 30.0),
             terminal_cases=[(8, 1)])
TARGET_FLOOR_RATIO = 3.0


# -- 1. the mixture -----------------------------------------------------------------------


@dataclass
class ParticleCell:
    """One sampler on one mixture problem: SW / floor per sampler seed (None: diverged), cost of the last run."""

    particles: int | None
    proposal: str
    ratios: list[float] | None
    seconds: float
    ess_min: float | None

    @property
    def median(self) -> float | None:
        return None if self.ratios is None else statistics.median(self.ratios)


@dataclass
class MixtureParticleRow:
    """One mixture problem: its floor, the schedule's terminal KL bound (nats) and a cell per sampler."""

    dimension: int
    measurements: int
    seed: int
    floor: float
    kl_bound: float
    cells: list[ParticleCell]


def particle_cell(problem, distance, floor: float, particles: int | None, proposal: str, seeds: list[int],
                  settings: dict) -> ParticleCell:
    """SW / floor of one sampler over `seeds` (float32 sampling, float64 references)."""
    prior, operator, y = single_precision(problem.prior, problem.operator, problem.y)
    ratios, result = [], None
    for sampler_seed in seeds:
        result = restore_unless_diverged(y, operator, prior, num_samples=settings["samples"], steps=settings["steps"],
                                         covariance=settings["covariance"], particles=particles, proposal=proposal,
                                         generator=torch.Generator().manual_seed(sampler_seed))
        if result is None:
            return ParticleCell(particles, proposal, None, 0.0, None)
        ratios.append(distance(result.samples) / floor)
        log_row(problem.name, f"K={particles}", proposal, f"seed {sampler_seed}", f"SW/floor {ratios[-1]:.2f}", result.seconds)
    return ParticleCell(particles, proposal, ratios, result.seconds, None if particles is None else min(result.ess))


def mixture_rows(settings: dict) -> list[MixtureParticleRow]:
    """SW / floor against K on each mixture problem.

    At the largest K each proposal runs with `repeats` sampler seeds: one SW of 2000 samples
    against a floor that is itself one SW is noisy (a factor of 2-3 between seeds where the floor
    is small), so the cell gives the median and the range, and the verdict uses the median.
    """
    rows, largest = [], max(settings["particle_counts"])
    runs = [(None, "auto")] + [(k, "auto") for k in settings["particle_counts"]] + [(largest, "guided")]
    for dimension in settings["dimensions"]:
        for measurements in settings["measurement_counts"]:
            for seed in settings["seeds"]:
                problem = mixture_problem(dimension, measurements, seed, schedule=settings["mixture_schedule"])
                distance, floor = posterior_distance(problem, settings["samples"], seed)
                bound = problem.prior.schedule.terminal_kl_bound(problem.prior.mean_square_norm(), dimension)
                cells = [particle_cell(problem, distance, floor, particles, proposal,
                                       [seed + 1000 * r for r in range(settings["repeats"] if particles == largest else 1)], settings)
                         for particles, proposal in runs]
                rows.append(MixtureParticleRow(dimension, measurements, seed, floor, bound, cells))
    return rows


def cell_text(cell: ParticleCell) -> str:
    """median [range] (seconds, ESS min) of one cell."""
    if cell.ratios is None:
        return DIVERGED
    spread = f" [{min(cell.ratios):.2f}-{max(cell.ratios):.2f}]" if len(cell.ratios) > 1 else ""
    ess = "" if cell.ess_min is None else f", ESS min {cell.ess_min:.2f}"
    return f"{cell.median:.2f}{spread} ({cell.seconds:.1f} s{ess})"


def mixture_report(rows: list[MixtureParticleRow], settings: dict) -> list[str]:
    """Section 1: the table and one verdict per proposal at the largest K."""
    largest = max(settings["particle_counts"])
    header = ["d", "d_y", "seed", "floor SW", "terminal KL bound (nats)", "plain / floor"] \
        + [f"K={k} / floor" for k in settings["particle_counts"]] + [f"K={largest}, guided proposal / floor"]
    table = [[str(r.dimension), str(r.measurements), str(r.seed), f"{r.floor:.3f}", f"{r.kl_bound:.2g}"]
             + [cell_text(cell) for cell in r.cells] for r in rows]
    verdicts = []
    for row in rows:
        for cell in (c for c in row.cells if c.particles == largest):
            proposal = "default" if cell.proposal == "auto" else cell.proposal
            if cell.ratios is None:
                verdicts.append(f"- d={row.dimension}, d_y={row.measurements}, seed {row.seed}, {proposal} proposal: {DIVERGED}")
                continue
            within = "within" if cell.median <= TARGET_FLOOR_RATIO else "NOT within"
            verdicts.append(f"- d={row.dimension}, d_y={row.measurements}, seed {row.seed}, {proposal} proposal: SW/floor "
                            f"{cell.median:.2f} (median of {len(cell.ratios)} sampler seeds, largest {max(cell.ratios):.2f}) "
                            f"at K={largest} ({within} {TARGET_FLOOR_RATIO:g}x)")
    return ["## 1. The MCGdiff mixture: SW / floor against the number of particles",
            f"{settings['samples']} returned samples (drawn from the weighted cloud), {settings['steps']} steps, "
            f"covariance {settings['covariance']!r} for guidance and twist, the default proposal (conditioned where "
            "available) and, in the last column, the guided one; seconds and the lowest ESS / K (of the last run) in "
            f"brackets. At the largest K: the median [range] over {settings['repeats']} sampler seeds.",
            markdown_table(header, table), "\n".join(verdicts)]


# -- 1b. the terminal mismatch ---------------------------------------------------------------


@dataclass
class TerminalRow:
    """One mixture problem under one schedule: its terminal gap and the samplers' SW / floor and mode TV."""

    dimension: int
    measurements: int
    beta_max: float
    alpha_one: float
    kl_bound: float
    unconditional_tv: float
    plain: tuple[float, float] | None  # (SW / floor, mode TV); None: diverged
    particle: tuple[float, float] | None


def mode_masses(samples: Tensor, prior: GaussianMixturePrior) -> Tensor:
    """Fraction of samples nearest to each component mean, shape (components,)."""
    nearest = torch.cdist(samples.double().flatten(1), prior.means.double().flatten(1)).argmin(1)
    return torch.bincount(nearest, minlength=len(prior.means)).double() / len(samples)


def mode_tv(samples: Tensor, prior: GaussianMixturePrior, weights: Tensor) -> float:
    """Total variation between the samples' mode masses and component weights (normalised here)."""
    return 0.5 * float((mode_masses(samples, prior) - weights / weights.sum()).abs().sum())


def terminal_row(dimension: int, measurements: int, schedule: VPSchedule, settings: dict) -> TerminalRow:
    """The schedule's terminal mismatch, and what it does to the unconditional, plain and particle samplers."""
    problem = mixture_problem(dimension, measurements, 0, schedule=schedule)
    prior, operator, y = single_precision(problem.prior, problem.operator, problem.y)
    unconditional, _ = sample(prior, (settings["samples"], dimension), steps=settings["steps"],
                              generator=torch.Generator().manual_seed(0))
    distance, floor = posterior_distance(problem, settings["samples"], 0)
    scores = []
    for particles in (None, max(settings["particle_counts"])):
        result = restore_unless_diverged(y, operator, prior, num_samples=settings["samples"], steps=settings["steps"],
                                         covariance=settings["covariance"], particles=particles,
                                         generator=torch.Generator().manual_seed(0))
        scores.append(None if result is None else
                      (distance(result.samples) / floor, mode_tv(result.samples, prior, problem.posterior.weights)))
    bound = schedule.terminal_kl_bound(problem.prior.mean_square_norm(), dimension)
    row = TerminalRow(dimension, measurements, schedule.beta_max, float(schedule.alpha(torch.tensor(1.0))), bound,
                      mode_tv(unconditional, prior, problem.prior.weights), *scores)
    log_row(problem.name, f"beta_max {schedule.beta_max:g}", f"KL bound {bound:.2g}", f"plain {row.plain}", f"K {row.particle}")
    return row


def terminal_report(rows: list[TerminalRow], settings: dict) -> list[str]:
    """Section 1b."""
    largest = max(settings["particle_counts"])

    def pair(score: tuple[float, float] | None) -> list[str]:
        return [DIVERGED, ""] if score is None else [f"{score[0]:.2f}", f"{score[1]:.3f}"]

    table = [[str(r.dimension), str(r.measurements), f"{r.beta_max:g}", f"{r.alpha_one:.1e}", f"{r.kl_bound:.2g}",
              f"{r.unconditional_tv:.3f}", *pair(r.plain), *pair(r.particle)] for r in rows]
    header = ["d", "d_y", "beta_max", "alpha(1)", "terminal KL bound", "unconditional mode TV", "plain SW / floor",
              "plain mode TV", f"K={largest} SW / floor", f"K={largest} mode TV"]
    return ["## 1b. Why the schedule reaches beta_max = 30: the terminal mismatch",
            "Every sampler starts at t = 1 from N(0, I), not from the true marginal there. `Schedule.terminal_kl_bound` "
            "bounds the gap in nats; mode TV is the total-variation distance between the fraction of samples nearest "
            f"each component and the exact component weights (prior weights for {settings['samples']} unconditional "
            f"draws, posterior weights for the posterior samplers); K = {largest} particles, {settings['steps']} steps.",
            markdown_table(header, table)]


# -- 2. the Gaussian prior ----------------------------------------------------------------------


@dataclass
class GaussianRow:
    """One sampler on one Gaussian task: errors / floor (None: diverged), lowest ESS / K and resamplings."""

    task: str
    steps: int
    sampler: str
    ratios: dict[str, float] | None
    ess_min: float | None
    resamplings: int | None
    seconds: float


def gaussian_rows(settings: dict) -> list[GaussianRow]:
    """Errors / floor and ESS on the Gaussian tasks, K = samples particles, both proposals, against steps."""
    rows, count = [], settings["samples"]
    for problem in gaussian_image_problems():
        floor = exact_sample_floor(problem.posterior, count, repeats=5)
        prior, operator, y = single_precision(problem.prior, problem.operator, problem.y)
        for steps in settings["gaussian_steps"]:
            for particles, proposal in ((None, "auto"), (count, "guided"), (count, "conditioned")):
                result = restore_unless_diverged(y, operator, prior, num_samples=count, steps=steps, particles=particles,
                                                 proposal=proposal, generator=torch.Generator().manual_seed(0))
                sampler = "plain" if particles is None else f"K={particles}, {proposal}"
                if result is None:
                    rows.append(GaussianRow(problem.name, steps, sampler, None, None, None, 0.0))
                    continue
                errors = gaussian_errors(result.samples, problem.posterior.mean, problem.posterior.cov)
                rows.append(GaussianRow(problem.name, steps, sampler, {k: errors[k] / floor[k] for k in ERROR_KEYS},
                                        None if particles is None else min(result.ess),
                                        None if particles is None else len(result.resampled), result.seconds))
                log_row(problem.name, steps, sampler, rows[-1].ratios)
    return rows


@dataclass
class WeightRow:
    """Lowest ESS / K without resampling, per proposal (None: diverged), and seconds."""

    task: str
    steps: int
    ess_min: dict[str, float | None]
    seconds: dict[str, float]


def weight_rows(settings: dict) -> list[WeightRow]:
    """Lowest ESS / K without resampling on the Gaussian tasks (float64): how far each proposal is from the optimal one."""
    rows = []
    for problem in gaussian_image_problems():
        for steps in settings["gaussian_steps"]:
            row = WeightRow(problem.name, steps, {}, {})
            for proposal in ("guided", "conditioned"):
                result = restore_unless_diverged(problem.y, problem.operator, problem.prior, num_samples=1, steps=steps,
                                                 particles=settings["ess_particles"], ess_threshold=0.0, proposal=proposal,
                                                 generator=torch.Generator().manual_seed(4))
                row.ess_min[proposal] = None if result is None else min(result.ess)
                row.seconds[proposal] = 0.0 if result is None else result.seconds
            rows.append(row)
            log_row(problem.name, steps, "ESS min guided / conditioned", row.ess_min)
    return rows


def gaussian_report(rows: list[GaussianRow], weights: list[WeightRow], settings: dict) -> list[str]:
    """Section 2 and its weights subsection."""
    table = [[r.task, str(r.steps), r.sampler, *(number(r.ratios and r.ratios[k]) for k in ERROR_KEYS),
              "" if r.ess_min is None else f"{r.ess_min:.2f} / {r.resamplings}", f"{r.seconds:.1f}"] for r in rows]
    weight_table = [[w.task, str(w.steps)] + [cell for proposal in ("guided", "conditioned")
                                              for cell in (number(w.ess_min[proposal], ".3f"), f"{w.seconds[proposal]:.1f}")]
                    for w in weights]
    return ["## 2. Gaussian prior: exactness and weights",
            f"Errors / exact-sample floor of {settings['samples']} samples; K = {settings['samples']} particles, "
            "tweedie covariance; ESS: lowest ESS / K over the run, and how many times the cloud was resampled "
            "(threshold 0.5).",
            markdown_table(["task", "steps", "sampler", "mean/floor", "cov/floor", "W2/floor", "ESS min / resamplings", "s"], table),
            "### Weights without resampling",
            f"The lowest ESS / K over the run with resampling switched off (ess_threshold = 0), "
            f"K = {settings['ess_particles']}, float64: 1 would mean the proposal is the optimal one. What the "
            "conditioned proposal leaves comes from the discretised reverse kernel, whose covariance ignores V_t.",
            markdown_table(["task", "steps", "guided ESS / K", "guided s", "conditioned ESS / K", "conditioned s"], weight_table)]


# -- 3. images -----------------------------------------------------------------------------------


@dataclass
class ImageRow:
    """One sampler on one photograph and task: PSNR / SSIM of the mean (NaN: diverged), network evaluations."""

    image: str
    task: str
    sampler: str
    psnr: float | None
    ssim: float | None
    evaluations: int
    seconds: float


def image_rows(settings: dict) -> list[ImageRow]:
    """PSNR of the posterior mean: K particles x steps vs the plain sampler with K x steps steps."""
    model, rows, steps = default_model(torch.float32), [], settings["image_steps"]
    for image in settings["images"]:
        truth = load_photograph(image, settings["image_size"], settings["image_downscale"])
        for task in settings["image_tasks"]:
            measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
            for particles in settings["image_particles"]:
                runs = {
                    f"particles K={particles}, {steps} steps": dict(particles=particles, steps=steps, num_samples=particles),
                    f"plain, {particles} samples, {steps} steps": dict(steps=steps, num_samples=particles),
                    f"plain, 1 sample, {particles * steps} steps": dict(steps=particles * steps, num_samples=1),
                }
                for label, options in runs.items():
                    result = restore_unless_diverged(measurement.y, measurement.operator, model, covariance="isotropic",
                                                     generator=torch.Generator().manual_seed(0), **options)
                    if result is None:
                        rows.append(ImageRow(image, task, label, None, None, 0, 0.0))
                        continue
                    psnr, ssim = psnr_ssim(result.mean, truth)
                    total = result.nfe * options["num_samples"]  # single-image evaluations, all chains
                    rows.append(ImageRow(image, task, label, psnr, ssim, total, result.seconds))
                    log_row(image, task, label, f"{psnr:.2f} dB")
    return rows


def image_report(rows: list[ImageRow], settings: dict) -> list[str]:
    """Section 3."""
    table = [[r.image, r.task, r.sampler, number(r.psnr), number(r.ssim, ".3f"), str(r.evaluations), f"{r.seconds:.1f}"]
             for r in rows]
    return ["## 3. Images: a few particles against the plain sampler at equal network evaluations",
            f"Embedded model, {settings['image_size']}x{settings['image_size']} crops, isotropic covariance; "
            "PSNR / SSIM of the posterior mean (for particles: the weighted mean of the cloud).",
            markdown_table(["image", "task", "sampler", "PSNR", "SSIM", "network evaluations", "s"], table)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part, in seconds")
    parser.add_argument("--out", type=Path, default=Path("docs/particle_mode.md"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: mixture, gaussian, images")
    args = parser.parse_args(argv)
    settings, skip = (QUICK if args.quick else FULL), set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    start, sections = time.perf_counter(), []
    if "mixture" not in skip:
        sections += mixture_report(mixture_rows(settings), settings)
        rows = [terminal_row(d, m, schedule, settings) for d, m in settings["terminal_cases"]
                for schedule in (VPSchedule(), settings["mixture_schedule"])]
        sections += terminal_report(rows, settings)
    if "gaussian" not in skip:
        sections += gaussian_report(gaussian_rows(settings), weight_rows(settings), settings)
    if "images" not in skip:
        sections += image_report(image_rows(settings), settings)
    write_report(args.out, "Particle mode (twisted SMC)", __doc__.split("\n\n")[2], sections, module="benchmarks.particle_mode",
                 argv=sys.argv[1:] if argv is None else list(argv), minutes=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
