"""Speed: what each step costs against a bare network forward, and posterior-mean PSNR per second.

Three tables, written to docs/speed.md, from which `posterior_diff.defaults.IMAGE_DEFAULTS` is chosen:

1. **Cost per step.** With the embedded model at --cost-size (default 128x128) and a batch of
   --samples images: seconds of one bare network forward (no graph), then, for every
   covariance, seconds per sampler step of `restore` (SR x4, --cost-steps steps) divided by
   it, with the VJPs per step. The floor is 1 forward per step; a VJP costs about two. Each
   covariance that takes VJPs is timed at restore's defaults and, where it differs from them, at
   the documented opt-in jacobian_s_max = OPT_IN_S_MAX (no VJP above it); the verdicts compare both
   with its deepinv counterpart (DPS, PiGDM, moment matching). With the defaults' jacobian_s_max =
   inf a row does the work per step of its counterpart, whose last step alone takes no VJP. The same
   for deepinv's DDRM and DiffPIR on the same model, and the bare forward in bfloat16 and
   float16 (the network's dtype; the sampler state stays float32), with the PSNR that the
   bfloat16 network reaches.
2. **Quality per second.** Every covariance x steps in --steps (20, 50, 100) on the held-out
   photographs (`evaluation.HELD_OUT_PHOTOGRAPHS`) and the tasks sr4, random (70% missing) and
   denoise: posterior-mean PSNR of --samples samples and seconds, averaged over the images;
   DDRM and DiffPIR at the same NFE beside them; the task's classical baseline above. Denoising
   also runs restore's own default, from the measurement (DDRM's like-for-like), with a verdict
   against DDRM per steps: PSNR at least DDRM's within 1.1x its seconds.
3. **The choice.** Per covariance and steps, the mean PSNR over the guided tasks (sr4 and
   random) and the seconds a 128x128 restoration with 4 samples takes (table 1's seconds per
   step x steps), and among the settings that fit --budget seconds (default 60) and are no worse
   than isotropic at 50 steps (the defaults before this table) on either task by more than 0.1 dB,
   the fastest whose mean PSNR is within 0.05 dB of the best (a closer race is noise here). Denoising is left out of the choice: table 2 runs it from the
   prior, to compare the guidance modes, but restore's default start="auto" samples it from the
   measurement, unguided, where the covariance plays no part (docs/denoising_start.md).

Every run is cached in a JSON file beside the report (--cache), so an interrupted run picks up
where it stopped. Our settings that table 1 estimates at more than --skip-over seconds (twice
the budget) at 128x128 are left out of table 2 ("not run"): they cannot be the choice. Timings share the machine with whatever else runs on it: --threads sets
torch's threads for table 2 and --cost-threads for table 1 (run it alone, or pinned to its own
cores with taskset). The estimated 128x128 seconds of table 3 come from table 1, so they are
those of --cost-threads threads.

    python -m benchmarks.speed                                  # writes docs/speed.md (about 90 min, 1 thread)
    python -m benchmarks.speed --quick --out /tmp/speed.md      # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

import posterior_diff
from posterior_diff import DEFAULT_MODEL_DIR, Denoiser, default_model, load_model
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import HELD_OUT_PHOTOGRAPHS, baselines, load_photograph, measure, psnr_ssim

from .images_vs_deepinv import ImageRow, ours_row, peer_row
from .peers import peer_vjps, run_peer
from .reporting import (TIE_DB, ResultCache, cheapest_of_the_best, comma_numbers, embedded_model, log_row,
                        markdown_table, write_report)

TASKS = ("sr4", "random", "denoise")
# the tasks that choose the covariance: restore's start="auto" samples denoising from the
# measurement without guidance, so the covariance cannot change a default restore of it
CHOICE_TASKS = ("sr4", "random")
PEERS = ("ddrm", "diffpir")  # table 2's deepinv methods
# Table 2's denoising also runs restore's own default (start="auto" is the measurement there, the covariance
# plays no part): the like-for-like row for DDRM, whose eta_b = 1 sets its state to y plus noise at every
# sigma >= sigma_y (deepinv's ddrm.py), so that it too starts from the measurement in effect.
MEASUREMENT_START = "ours from the measurement"
MAX_DDRM_STEP_RATIO = 1.1  # the seconds per step within which our denoising must match DDRM's PSNR
COST_TASKS = ("sr4", "denoise")
# deepinv's methods closest to each covariance, by likelihood approximation: DPS (zero), PiGDM
# (isotropic), moment matching (Tweedie), DDRM and DiffPIR (Jacobian-free data consistency, as the
# projection). The diagonal covariance (TMPD) has no counterpart in deepinv.
COUNTERPARTS = (("zero", "dps"), ("isotropic", "pigdm"), ("tweedie", "mm"), ("projection", "ddrm"),
                ("projection", "diffpir"))
# Table 1 times each covariance that takes VJPs at restore's defaults and, where it differs from
# them, at the opt-in jacobian_s_max the docs recommend for SR and few steps (docs/jacobian_range.md).
OPT_IN_S_MAX = 2.0
OPT_IN = f"jacobian_s_max {OPT_IN_S_MAX:g}"
STEPS = (20, 50, 100)
REFERENCE = ("isotropic", 50)  # the defaults the choice must at least match (those before this benchmark)
MAX_TASK_LOSS_DB = 0.1  # how far below REFERENCE on one task a choice may fall (the noise of 4-sample means)
SLOW_DTYPE = 5.0
NETWORK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one image, 16x16, 2 steps")
    parser.add_argument("--size", type=int, default=64, help="side of the centre crops of table 2 (default 64)")
    parser.add_argument("--cost-size", type=int, default=128, help="side of the images of table 1 (default 128)")
    parser.add_argument("--downscale", type=float, default=2.0, help="shrink each photograph by this factor before cropping")
    parser.add_argument("--samples", type=int, default=4, help="posterior samples per restoration (default 4)")
    parser.add_argument("--steps", type=comma_numbers(int), default=STEPS, help="sampler steps of table 2")
    parser.add_argument("--cost-steps", type=int, default=10, help="sampler steps timed per mode in table 1")
    parser.add_argument("--cost-repeats", type=int, default=3, help="rounds of table 1's timings (median kept)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds allowed for a 128x128, 4-sample restoration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of table 2's runs (default 1)")
    parser.add_argument("--cost-threads", type=int, default=os.cpu_count(),
                        help="torch threads of table 1's timings and of the choice (default: every core)")
    parser.add_argument("--skip-over", type=float, help="leave out our settings estimated (table 1) to take more "
                        "than this many seconds at --cost-size (default: twice --budget)")
    parser.add_argument("--report-only", action="store_true", help="run no new cell of table 2: report the cache")
    parser.add_argument("--out", type=Path, default=Path("docs/speed.md"))
    parser.add_argument("--cache", type=Path, help="JSON cache of finished runs (default: the report's name, .json)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.images = HELD_OUT_PHOTOGRAPHS
    if args.quick:
        args.images, args.size, args.cost_size, args.steps, args.cost_steps = HELD_OUT_PHOTOGRAPHS[:1], 16, 16, (2,), 2
        args.cost_repeats = 1
    if min(args.steps) < 1 or args.samples < 1 or args.size < 8 or args.cost_steps < 2:
        parser.error("--steps, --samples and --cost-steps must be >= 1 (cost steps >= 2), --size >= 8")
    args.precision_steps = args.cost_steps if args.quick else IMAGE_DEFAULTS.steps
    args.cache = args.cache or args.out.with_suffix(".json")
    args.skip_over = 2 * args.budget if args.skip_over is None else args.skip_over
    return args


# -- table 1: cost per step -------------------------------------------------------------


def bare_forward_seconds(model: Denoiser, batch: int, size: int, repeats: int = 5) -> float:
    """Median seconds of one network forward on a (batch, 3, size, size) input at mid noise, without a graph."""
    x = torch.randn(batch, 3, size, size)
    t = torch.full((batch,), 0.5)
    timings = []
    with torch.no_grad():
        model(x, t)  # warm-up: allocations, kernel choice
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t)
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def cost_rows(model: Denoiser, args: argparse.Namespace) -> list[dict]:
    """Table 1: per task of COST_TASKS, seconds per step of every covariance and of the deepinv
    methods, against the bare forward (a method that does not run on a task is a row marked n/a).

    The machine's speed drifts over minutes, so the methods are timed in turn, --cost-repeats
    rounds of all of them, and each keeps its median: a comparison is never between a method
    timed early and one timed late.
    """
    truth = load_photograph(args.images[0], args.cost_size, args.downscale)
    peers = list(dict.fromkeys(method for _, method in COUNTERPARTS))
    timings: dict[tuple[str, str], list[tuple[float, float]]] = {}
    forwards = []
    for _ in range(args.cost_repeats):
        forwards.append(bare_forward_seconds(model, args.samples, args.cost_size))
        for task in COST_TASKS:
            measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
            for covariance in posterior_diff.COVARIANCES:
                opt_in = covariance != "projection" and OPT_IN_S_MAX != IMAGE_DEFAULTS.jacobian_s_max
                for s_max in (None, OPT_IN_S_MAX) if opt_in else (None,):
                    method = f"ours {covariance}" + (f", {OPT_IN}" if s_max else "")
                    row = ours_row(model, args.images[0], covariance, truth, measurement, args.samples, args.cost_steps,
                                   IMAGE_DEFAULTS.cg_max_iter, 0, None, jacobian_s_max=s_max)
                    timings.setdefault((task, method), []).append((row.seconds, row.vjps))
            for method in peers:
                timings.setdefault((task, f"deepinv {method}"), []).append(_peer_seconds(model, method, measurement, args))
    forward = statistics.median(forwards)
    rows = [dict(task="", method="bare forward", seconds_per_step=forward, ratio=1.0, vjps_per_step=0.0, rounds=[])]
    for (task, method), runs in timings.items():
        rows.append(cost_row(task, method, [s for s, _ in runs], runs[0][1], forward, args.cost_steps))
    for row in rows:
        log_row("cost", row["task"], row["method"], f"{row['seconds_per_step']:.3f} s/step", f"x{row['ratio']:.2f}")
    return rows


def _peer_seconds(model: Denoiser, method: str, measurement, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds, VJPs) of a deepinv method's run of --cost-steps steps: NaN seconds where it does not
    run (DDRM without an SVD of A); VJPs 0 for the Jacobian-free methods, NaN (not counted) for the others."""
    vjps = peer_vjps(method)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_peer(method, model, measurement.operator, measurement.y, args.samples, args.cost_steps)
    except ValueError:
        return math.nan, math.nan
    return run.seconds, vjps


def cost_row(task: str, method: str, rounds: list[float], vjps: int, forward: float, steps: int) -> dict:
    """One row of table 1 from a method's seconds in each round and its VJPs over `steps` steps (NaN VJPs:
    not counted, deepinv's methods that backpropagate through the network): the median's seconds per
    step, and each round's, in round order."""
    per_step = [seconds / steps for seconds in rounds]
    median = statistics.median(per_step)
    return dict(task=task, method=method, seconds_per_step=median, ratio=median / forward, vjps_per_step=vjps / steps,
                rounds=per_step)


def paired_ratio(ours: dict, theirs: dict) -> float:
    """The median over rounds of ours / theirs, each pair timed in the same round (minutes apart at most):
    the machine's drift between rounds, which moves both, cancels in each pair."""
    return statistics.median(a / b for a, b in zip(ours["rounds"], theirs["rounds"]))


def speed_verdict(ours: dict, theirs: dict) -> str:
    """"no slower" where the median per-round ratio is at most 1; "SLOWER" where ours is slower in every
    round (a sign test: 2^-n by chance over n rounds); between the two, a level race within the timing
    noise, said as such with the rounds ours won."""
    if paired_ratio(ours, theirs) <= 1:
        return "no slower"
    won = sum(a <= b for a, b in zip(ours["rounds"], theirs["rounds"]))
    return "SLOWER" if won == 0 else f"level (faster in {won} of {len(ours['rounds'])} rounds)"


def counterpart_verdicts(cost: list[dict]) -> list[str]:
    """Per task and covariance: ours (at the defaults, and at the opt-in OPT_IN_S_MAX where it takes
    VJPs) against its deepinv counterpart (COUNTERPARTS), seconds per step, as the median of the
    per-round ratios (`paired_ratio`), with `speed_verdict`."""
    rows = {(r["task"], r["method"]): r for r in cost}
    lines = []
    for task in COST_TASKS:
        for covariance, method in COUNTERPARTS:
            theirs = rows[task, f"deepinv {method}"]
            ours_methods = [m for (t, m) in rows if t == task and m.split(",")[0] == f"ours {covariance}"]
            for ours_method in ours_methods if math.isfinite(theirs["seconds_per_step"]) else ():
                ours = rows[task, ours_method]
                ratio = paired_ratio(ours, theirs)
                verdict = speed_verdict(ours, theirs)
                lines.append(f"- {task}: {ours_method} {ours['seconds_per_step']:.3f} s/step vs deepinv {method} "
                             f"{theirs['seconds_per_step']:.3f} (per-round ratio {ratio:.2f}x): {verdict}")
    return lines


def precision_rows(args: argparse.Namespace) -> list[dict]:
    """The bare forward in each network dtype, and the posterior-mean PSNR (sr4, isotropic, the image
    defaults' steps: at table 1's few steps no dtype restores anything to compare) it reaches (not
    restored where the forward is over SLOW_DTYPE times float32's: it cannot pay)."""
    truth = load_photograph(args.images[0], args.cost_size, args.downscale)
    measurement = measure("sr4", truth, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, dtype in NETWORK_DTYPES.items():
        model = default_model() if dtype == torch.float32 else load_model(DEFAULT_MODEL_DIR, torch_dtype=dtype)
        forward = bare_forward_seconds(model, args.samples, args.cost_size)
        if rows and forward > SLOW_DTYPE * rows[0]["forward"]:  # float16 on a CPU: no fast kernels
            rows.append(dict(dtype=name, forward=forward, seconds_per_step=math.nan, psnr=math.nan))
            continue
        row = ours_row(model, args.images[0], "isotropic", truth, measurement, args.samples, args.precision_steps,
                       IMAGE_DEFAULTS.cg_max_iter, 0, None)
        rows.append(dict(dtype=name, forward=forward, seconds_per_step=row.seconds / args.precision_steps, psnr=row.psnr))
        log_row("precision", name, f"{rows[-1]['forward']:.3f} s forward", f"{row.psnr:.2f} dB")
    return rows


# -- table 2: quality per second --------------------------------------------------------


def skipped(method: str, steps: int, cost: list[dict], args: argparse.Namespace) -> str:
    """Why a cell of table 2 is not run ("" if it is): with --report-only, any cell not in the
    cache; else ours at a setting whose 128x128 estimate (table 1) is over --skip-over seconds."""
    if args.report_only:
        return "not run"
    per_step = [r["seconds_per_step"] for r in cost if r["method"] == method]
    estimate = statistics.mean(per_step) * steps if per_step and method.startswith("ours") else 0.0
    return f"not run: about {estimate:.0f} s at {args.cost_size}²" if estimate > args.skip_over else ""


def task_methods(task: str) -> list[str]:
    """Table 2's methods on one task: every covariance from the prior, restore's measurement start
    on denoising, then the deepinv peers."""
    measurement_start = [MEASUREMENT_START] if task == "denoise" else []
    return [f"ours {c}" for c in posterior_diff.COVARIANCES] + measurement_start + [f"deepinv {p}" for p in PEERS]


def denoising_verdicts(summary: dict, args: argparse.Namespace) -> list[str]:
    """Per steps: restore's default denoising (from the measurement, projection covariance) and the
    projection from the prior against DDRM at the same NFE, posterior-mean PSNR and seconds per image
    (the same steps, so their ratio is that of the seconds per step)."""
    lines = []
    for steps in args.steps:
        ddrm = summary[("denoise", "deepinv ddrm", steps)]
        for method in (MEASUREMENT_START, "ours projection"):
            ours = summary[("denoise", method, steps)]
            ratio = ours["seconds"] / ddrm["seconds"]
            verdict = ("BELOW" if ours["psnr"] < ddrm["psnr"] else "SLOWER" if ratio > MAX_DDRM_STEP_RATIO
                       else f"at least matches, within {MAX_DDRM_STEP_RATIO:g}x per step")
            lines.append(f"- denoise, {steps} steps: {method} {value(ours['psnr'])} dB at {value(ours['seconds'], '.1f')} s "
                         f"vs deepinv ddrm {value(ddrm['psnr'])} dB at {value(ddrm['seconds'], '.1f')} s "
                         f"(seconds ratio {ratio:.2f}x): {verdict}")
    return lines


def quality_cell(model: Denoiser, method: str, image: str, truth: torch.Tensor, measurement, steps: int,
                 args: argparse.Namespace) -> ImageRow:
    """One method of table 2 on one measurement: ours from the prior with its covariance, ours from the
    measurement (MEASUREMENT_START, the projection covariance, which plays no part there) or a deepinv peer."""
    kind, which = method.split()[:2]
    if kind == "deepinv":
        return peer_row(model, image, which, truth, measurement, args.samples, steps, 0)
    covariance, start = ("projection", "measurement") if method == MEASUREMENT_START else (which, "prior")
    return ours_row(model, image, covariance, truth, measurement, args.samples, steps, IMAGE_DEFAULTS.cg_max_iter, 0,
                    None, start=start)


def quality_rows(model: Denoiser, args: argparse.Namespace, cache: ResultCache, cost: list[dict]) -> list[dict]:
    """Table 2's runs: per steps, image and task, the baseline, every covariance and every peer
    (a cell that `skipped` names is a row without numbers)."""
    rows = []
    for steps in args.steps:  # cheap settings first: an interrupted run has all of them
        for image in args.images:
            truth = load_photograph(image, args.size, args.downscale)
            for task in TASKS:
                measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
                name, estimate = next(iter(baselines(measurement).items()))
                baseline_psnr = psnr_ssim(estimate, truth)[0]
                for method in task_methods(task):
                    def compute(method=method):
                        row = quality_cell(model, method, image, truth, measurement, steps, args)
                        log_row(steps, image, task, method, f"{row.psnr:.2f} dB", row.seconds, row.note)
                        return asdict(row)
                    key, reason = f"{steps}|{image}|{task}|{method}", skipped(method, steps, cost, args)
                    run = (asdict(ImageRow(image, task, method, note=reason)) if reason and key not in cache.runs
                           else cache.get(key, compute))
                    rows.append(dict(run, steps=steps, baseline=name, baseline_psnr=baseline_psnr))
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Per (task, method, steps): mean PSNR, mean gain over the baseline and mean seconds over images
    (NaN PSNR where any image diverged or the method does not apply)."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"], row["steps"]), []).append(row)
    return {key: dict(psnr=statistics.mean(r["psnr"] for r in group),
                      gain=statistics.mean(r["psnr"] - r["baseline_psnr"] for r in group),
                      seconds=statistics.mean(r["seconds"] for r in group), note=group[0]["note"])  # NaN if any is
            for key, group in groups.items()}


# -- table 3: the choice ----------------------------------------------------------------


def choice_rows(summary: dict, cost: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per covariance and steps: PSNR per task and its mean over tasks, and the estimated 128x128
    seconds (table 1's seconds per step, averaged over its tasks, times the steps)."""
    per_step = {method: statistics.mean(r["seconds_per_step"] for r in cost if r["method"] == method)
                for method in {r["method"] for r in cost}}
    rows = []
    for covariance in posterior_diff.COVARIANCES:
        for steps in args.steps:
            psnrs = {task: summary[(task, f"ours {covariance}", steps)]["psnr"] for task in CHOICE_TASKS}
            rows.append(dict(covariance=covariance, steps=steps, tasks=psnrs, psnr=statistics.mean(psnrs.values()),
                             seconds=per_step[f"ours {covariance}"] * steps))
    return rows


def best_choice(rows: list[dict], budget: float) -> dict | None:
    """Among the settings within the budget that are no worse than REFERENCE on any task (by more than
    MAX_TASK_LOSS_DB: a default must not trade one task for another), the fastest of those within TIE_DB
    of the highest mean PSNR."""
    reference = next((r for r in rows if (r["covariance"], r["steps"]) == REFERENCE), None)

    def no_worse(row: dict) -> bool:
        return reference is None or all(row["tasks"][task] >= reference["tasks"][task] - MAX_TASK_LOSS_DB
                                        for task in row["tasks"])

    fitting = [r for r in rows if r["seconds"] <= budget and math.isfinite(r["psnr"]) and no_worse(r)]
    if not fitting:
        return None
    return cheapest_of_the_best(fitting, lambda r: r["psnr"], lambda r: r["seconds"])


# -- report -----------------------------------------------------------------------------


def value(number: float, spec: str = ".2f") -> str:
    """A table cell: the number, or "n/a" where there is none (a method that does not apply)."""
    return format(number, spec) if math.isfinite(number) else "n/a"



def report(args, cost, precision, rows, summary, choices, best, minutes: float) -> str:
    cost_table = markdown_table(
        ["method", "task", "s / step", "x bare forward", "VJPs / step"],
        [[r["method"], r["task"], value(r["seconds_per_step"], ".3f"), value(r["ratio"]), value(r["vjps_per_step"], ".1f")]
         for r in cost])
    precision_table = markdown_table(
        ["network dtype", "bare forward s", "x float32", "isotropic s / step",
         f"sr4 PSNR at {args.precision_steps} steps (dB)"],
        [[r["dtype"], f"{r['forward']:.3f}", f"{r['forward'] / precision[0]['forward']:.2f}",
          value(r['seconds_per_step'], '.3f'), value(r["psnr"])] for r in precision])
    quality_sections = []
    for task in TASKS:
        methods = task_methods(task)
        baseline = next(r for r in rows if r["task"] == task)
        lines = [[baseline["baseline"], "", value(statistics.mean(
            r["baseline_psnr"] for r in rows if r["task"] == task and r["method"] == methods[0]
            and r["steps"] == args.steps[0])), "", ""]]
        for method in methods:
            for steps in args.steps:
                cell = summary[(task, method, steps)]
                lines.append([method, str(steps), value(cell["psnr"]), value(cell["gain"], "+.2f"),
                              value(cell["seconds"], ".1f") if math.isfinite(cell["seconds"]) or not cell["note"]
                              else cell["note"].split(":")[0] if cell["note"].startswith("n/a") else cell["note"]])
        quality_sections.append(f"### {task}\n\n" + markdown_table(
            ["method", "steps", "mean PSNR (dB)", "vs baseline (dB)", "s per image"], lines))
    quality_sections[-1] += (
        f"\n\n{MEASUREMENT_START}: restore's default denoising (start=\"auto\"), whose mean is Tweedie's E[x | y] "
        "under the model (docs/denoising_start.md). DDRM's eta_b = 1 sets its state to y plus noise at every "
        "sigma >= sigma_y, the same coupling: it is the like-for-like row.\n\n" + "\n".join(denoising_verdicts(summary, args)))
    choice_table = markdown_table(
        ["covariance", "steps", *(f"{task} (dB)" for task in CHOICE_TASKS), "mean over tasks (dB)",
         f"s at {args.cost_size}² ({args.samples} samples)"],
        [[r["covariance"], str(r["steps"]), *(value(r["tasks"][task]) for task in CHOICE_TASKS), value(r["psnr"]),
          f"{r['seconds']:.0f}"] for r in choices])
    verdict = (f"Within {args.budget:g} s and no worse than {REFERENCE[0]} at {REFERENCE[1]} steps on any task "
               f"(by more than {MAX_TASK_LOSS_DB:g} dB), the fastest within {TIE_DB:g} dB of the best mean: "
               f"**{best['covariance']}, {best['steps']} steps** "
               f"({best['psnr']:.2f} dB on average, about {best['seconds']:.0f} s)."
               if best else f"No setting fits {args.budget:g} s while no worse than {REFERENCE[0]} at {REFERENCE[1]} "
               "steps on every task.")
    sections = [
        "## 1. Cost per step against a bare network forward\n\n"
        f"SR x4 and denoising of a {args.cost_size}x{args.cost_size} crop of {args.images[0]}, {args.samples} samples per batch, "
        f"{args.cost_steps} steps, {args.cost_threads} thread(s), median of {args.cost_repeats} rounds of every method "
        "in turn. The floor is one forward per step; a VJP (backward pass) "
        "costs about two forwards.\n\n" + cost_table + "\n\n" + "\n".join(counterpart_verdicts(cost)),
        "### Network precision\n\n" + precision_table,
        f"## 2. Posterior-mean PSNR against seconds\n\n{len(args.images)} held-out photographs "
        f"({', '.join(args.images)}), shrunk by {args.downscale:g}, centre crops of {args.size}x{args.size}, "
        f"{args.samples} samples, mean over the images, {args.threads} thread(s) per run; ours tweedie with restore's "
        f"CG cap ({IMAGE_DEFAULTS.cg_max_iter}) and {'warm' if IMAGE_DEFAULTS.warm_start else 'cold'} start "
        "(posterior_diff.defaults); deepinv's methods with the "
        "same model and NFE. DDRM needs an SVD of A: it runs on denoising and inpainting, not on SR x4 at this size.\n\n"
        + "\n\n".join(quality_sections),
        "## 3. The choice of image defaults\n\nOn the guided tasks: restore's defaults sample denoising from the "
        "measurement, where the covariance plays no part (docs/denoising_start.md).\n\n" + choice_table + "\n\n" + verdict,
    ]
    return write_report(args.out, "Speed: cost per step and quality per second", __doc__.split("\n\n")[1], sections,
                        module="benchmarks.speed", argv=args.argv, minutes=minutes,
                        details=[embedded_model(), f"image defaults' jacobian_s_max {IMAGE_DEFAULTS.jacobian_s_max:g}"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = default_model(torch.float32)
    settings = dict(size=args.size, downscale=args.downscale, samples=args.samples, images=list(args.images),
                    posterior_diff=posterior_diff.__version__, model=embedded_model(),
                    jacobian_s_max=IMAGE_DEFAULTS.jacobian_s_max)
    cache = ResultCache(args.cache, settings)
    torch.set_num_threads(args.cost_threads)
    timing = f"{args.cost_size}|{args.cost_steps}|{args.cost_threads}"  # table 1 is cached too, per setting
    cost = cache.get(f"cost|{timing}|{args.cost_repeats}|rounds", lambda: cost_rows(model, args))
    precision = cache.get(f"precision|{timing}|{args.precision_steps}", lambda: precision_rows(args))
    torch.set_num_threads(args.threads)
    rows = quality_rows(model, args, cache, cost)
    summary = summarise(rows)
    choices = choice_rows(summary, cost, args)
    best = best_choice(choices, args.budget)
    report(args, cost, precision, rows, summary, choices, best, (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
