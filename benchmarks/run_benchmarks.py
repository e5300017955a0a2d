"""Ours beside deepinv, side by side: writes docs/benchmarks.md and its figure. Run from the repository root:

    python -m benchmarks.run_benchmarks                      # the full run (see docs/benchmarks.md for its time)
    python -m benchmarks.run_benchmarks --quick --out /tmp/posterior-diff-benchmarks/benchmarks.md   # seconds
    python -m benchmarks.run_benchmarks --skip gaussian,mixture   # the images part alone

Parts (each can be skipped): Gaussian priors with exact posteriors and calibration, the MCGdiff
Gaussian mixture (both measured by `exact_posteriors.py`), images with the embedded model
(`images_vs_deepinv.py`). `peers.py` says how deepinv's methods are run. A run that diverges
(`posterior_diff.evaluation.harness.has_diverged`) is reported as "diverged".
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from posterior_diff import default_model, load_model
from posterior_diff.evaluation.harness import DIVERGED
from posterior_diff.evaluation.metrics import ERROR_KEYS

from .exact_posteriors import GaussianRow, Method, MixtureRow, gaussian_study, mixture_study
from .images_vs_deepinv import ImageRow, image_study
from .reporting import markdown_table, number, write_report

FULL = dict(gaussian_samples=2000, gaussian_steps=[20, 50, 100, 200], etas=[0.0, 0.5, 1.0], tasks=None,
            mixture_samples=2000, mixture_steps=100, dimensions=[8, 80, 800], measurement_counts=[1, 2, 4], seeds=[0, 1],
            images=["astronaut", "camera", "coffee", "chelsea"], image_tasks=["sr4", "denoise", "random"], image_size=64,
            image_downscale=4.0, image_samples=2, image_steps=50)
QUICK = dict(gaussian_samples=200, gaussian_steps=[10, 20], etas=[1.0], tasks=["super-resolution"],
             mixture_samples=200, mixture_steps=10, dimensions=[8], measurement_counts=[1], seeds=[0],
             images=["astronaut"], image_tasks=["sr4"], image_size=32, image_downscale=8.0, image_samples=1, image_steps=4)
REFERENCE_STEPS = 100  # the step count of the headline tables (the closest one run)
TARGET_COV_RATIO = 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part, in seconds")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="the report; figures go beside it")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: gaussian, mixture, images")
    parser.add_argument("--model", help="image model folder or hub id (default: the embedded model)")
    parser.add_argument("--device", help="where our sampler runs the image model (deepinv's runs stay on the CPU)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.settings = QUICK if args.quick else FULL
    args.skip = {part for part in args.skip.split(",") if part}
    unknown = args.skip - {"gaussian", "mixture", "images"}
    if unknown:
        parser.error(f"--skip takes gaussian, mixture, images; got {sorted(unknown)}")
    return args


def closest(values: list[int], target: int) -> int:
    return min(values, key=lambda value: abs(value - target))


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# -- Gaussian ---------------------------------------------------------------------------------


def gaussian_headline(rows: list[GaussianRow], steps: int) -> str:
    table = []
    for row in rows:
        if row.steps != steps or (row.method.family == "ours" and row.method.eta != 1.0):
            continue
        ratios = row.ratios or {}
        table.append([row.task, row.method.label] + [number(ratios.get(k)) for k in ERROR_KEYS]
                     + [str(row.nfe), f"{row.seconds:.2f}"])
    return markdown_table(["task", "method", "mean/floor", "cov/floor", "W2/floor", "NFE", "s"], table)


def gaussian_sweep(rows: list[GaussianRow], steps_list: list[int]) -> str:
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for row in rows:
        cells.setdefault((row.task, row.method.label), {})[row.steps] = number(row.ratios and row.ratios["cov_error"])
    table = [[task, label] + [values.get(steps, "") for steps in steps_list] for (task, label), values in cells.items()]
    return markdown_table(["task", "method"] + [f"{steps} steps" for steps in steps_list], table)


def calibration_table(rows: list[GaussianRow], exact: dict[str, tuple[float, float]], steps: int) -> str:
    table = [[task, "exact posterior draws", f"{c50:.3f}", f"{c90:.3f}"] for task, (c50, c90) in exact.items()]
    for row in rows:
        if row.steps == steps and (row.method.family == "deepinv" or row.method.eta == 1.0):
            cover = (DIVERGED, "") if row.coverage is None else (f"{row.coverage[0]:.3f}", f"{row.coverage[1]:.3f}")
            table.append([row.task, row.method.label, *cover])
    return markdown_table(["task", "method", "50% interval (nominal 0.500)", "90% interval (nominal 0.900)"], table)


def gaussian_verdicts(rows: list[GaussianRow], steps: int) -> list[str]:
    lines = []
    for task in dict.fromkeys(row.task for row in rows):
        ours = next(r for r in rows if r.task == task and r.steps == steps and r.method == Method("ours", "tweedie", 1.0))
        ratio = ours.ratios["cov_error"] if ours.ratios else math.inf
        peers = [r for r in rows if r.task == task and r.steps == steps and r.method.family == "deepinv" and r.ratios]
        best = min(peers, key=lambda r: r.ratios["w2"], default=None)
        line = (f"- {task}: ours (tweedie, eta=1, {steps} steps) cov/floor {ratio:.2f} "
                f"({'meets' if ratio <= TARGET_COV_RATIO else 'misses'} the {TARGET_COV_RATIO} target)")
        if best is not None:
            verdict = "ahead" if ours.ratios and ours.ratios["w2"] <= best.ratios["w2"] else "BEHIND"
            line += (f"; W2/floor {ours.ratios['w2'] if ours.ratios else math.inf:.2f} in {ours.seconds:.2f} s vs the best deepinv "
                     f"method ({best.method.name}) {best.ratios['w2']:.2f} in {best.seconds:.2f} s: {verdict}")
        lines.append(line)
    return lines


def quality_figure(rows: list[GaussianRow], path: Path) -> None:
    """W2/floor (geometric mean over tasks) against NFE and against seconds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = dict.fromkeys(r.method.label for r in rows if r.method.family == "deepinv" or r.method.eta == 1.0)
    for label in labels:
        points = []
        for steps in sorted({r.steps for r in rows}):
            chosen = [r for r in rows if r.method.label == label and r.steps == steps]
            if chosen and all(r.ratios for r in chosen):  # no point where a task diverged
                points.append((statistics.mean(r.nfe for r in chosen), statistics.mean(r.seconds for r in chosen),
                               geometric_mean([r.ratios["w2"] for r in chosen])))
        if points:
            style = "-o" if label.startswith("ours") else "--s"
            axes[0].plot([p[0] for p in points], [p[2] for p in points], style, label=label)
            axes[1].plot([p[1] for p in points], [p[2] for p in points], style, label=label)
    for axis, xlabel in zip(axes, ("network evaluations per sample", "seconds per run")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("W2 / exact-sample floor (geometric mean over tasks)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.suptitle("Gaussian priors with exact posteriors: quality against cost (lower is better; 1 = exact sampling)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- mixture ----------------------------------------------------------------------------------


def mixture_table(rows: list[MixtureRow]) -> tuple[str, list[str]]:
    problems = list(dict.fromkeys((r.dimension, r.measurements) for r in rows))
    methods = [m for m in dict.fromkeys(r.method for r in rows) if m not in ("exact", "prior")]
    table = []
    for dimension, measurements in problems:
        chosen = [r for r in rows if (r.dimension, r.measurements) == (dimension, measurements)]
        floor = statistics.mean(r.sw for r in chosen if r.method == "exact")
        prior = statistics.mean(r.sw for r in chosen if r.method == "prior")
        cells = []
        for method in methods:
            runs = [r for r in chosen if r.method == method]
            if any(r.sw is None for r in runs):
                cells.append(DIVERGED)
            else:
                cells.append(f"{statistics.mean(r.sw for r in runs) / floor:.2f} ({statistics.mean(r.seconds for r in runs):.1f} s)")
        table.append([str(dimension), str(measurements), f"{floor:.3f}", f"{prior / floor:.1f}"] + cells)
    header = ["d", "d_y", "floor SW", "prior / floor"] + [f"{m} / floor (s)" for m in methods]
    verdicts = []
    for challenger in ("deepinv mm", "deepinv mm-cg"):
        if challenger not in methods:
            continue
        ours_runs = [r for r in rows if r.method == "ours tweedie eta=1"]
        peer_runs = {(r.dimension, r.measurements, r.seed): r for r in rows if r.method == challenger}
        pairs = [(r, peer_runs[(r.dimension, r.measurements, r.seed)]) for r in ours_runs]
        wins = sum(1 for o, p in pairs if o.sw is not None and (p.sw is None or o.sw <= p.sw))
        faster = sum(1 for o, p in pairs if o.seconds <= p.seconds)
        verdicts.append(f"- ours (tweedie) vs {challenger} at equal steps: SW no worse on {wins}/{len(pairs)} problems, "
                        f"no slower on {faster}/{len(pairs)}")
    return markdown_table(header, table), verdicts


# -- images -----------------------------------------------------------------------------------


def image_table(rows: list[ImageRow]) -> tuple[str, list[str]]:
    table, verdicts = [], []
    for task in dict.fromkeys(r.task for r in rows):
        chosen = [r for r in rows if r.task == task]
        summary = {}
        for method in dict.fromkeys(r.method for r in chosen):
            runs = [r for r in chosen if r.method == method]
            notes = {r.note for r in runs if r.note}
            if notes:
                table.append([task, method, "; ".join(sorted(notes)), "", "", "", "", ""])
                continue
            psnr, ssim = statistics.mean(r.psnr for r in runs), statistics.mean(r.ssim for r in runs)
            nfe, seconds = statistics.mean(r.nfe for r in runs), statistics.mean(r.seconds for r in runs)
            per_step = seconds / nfe if nfe and math.isfinite(seconds) else math.nan
            peak = statistics.mean(r.peak_mb for r in runs)
            summary[method] = (psnr, per_step)
            table.append([task, method, f"{psnr:.2f}", f"{ssim:.3f}", f"{nfe:.0f}" if nfe else "",
                          "" if math.isnan(seconds) else f"{seconds:.1f}", "" if math.isnan(per_step) else f"{per_step:.3f}",
                          "" if math.isnan(peak) else f"{peak:.0f}"])
        ours = {m: v for m, v in summary.items() if m.startswith("ours")}
        peers = {m: v for m, v in summary.items() if m.startswith("deepinv")}
        if ours and peers:
            best_ours, best_peer = max(ours, key=lambda m: ours[m][0]), max(peers, key=lambda m: peers[m][0])
            verdict = "ahead" if ours[best_ours][0] >= peers[best_peer][0] else "BEHIND"
            verdicts.append(f"- {task}: best of ours ({best_ours}) {ours[best_ours][0]:.2f} dB at {ours[best_ours][1]:.3f} s/step; "
                            f"best of deepinv ({best_peer}) {peers[best_peer][0]:.2f} dB at {peers[best_peer][1]:.3f} s/step: {verdict}")
    return markdown_table(["task", "method", "mean PSNR", "mean SSIM", "NFE", "s", "s / NFE", "peak MB"], table), verdicts


# -- the report -------------------------------------------------------------------------------


def gaussian_part(settings: dict, out: Path) -> tuple[list[str], list[str]]:
    """Sections 1 and 2 (and the figure beside `out`): (sections, verdicts)."""
    rows, floors, exact_coverage = gaussian_study(settings["gaussian_samples"], settings["gaussian_steps"], settings["etas"],
                                                  settings["tasks"])
    steps = closest(settings["gaussian_steps"], REFERENCE_STEPS)
    figure = out.with_name(out.stem + "_gaussian.png")
    quality_figure(rows, figure)
    verdicts = gaussian_verdicts(rows, steps)
    floor_rows = [[task, *(f"{floor[k]:.4f}" for k in ERROR_KEYS)] for task, floor in floors.items()]
    return [
        "## 1. Gaussian priors with exact posteriors",
        f"The three tasks of `posterior_diff.evaluation.problems.gaussian_image_problems()` (8x8 Gaussian image prior), "
        f"{settings['gaussian_samples']} samples per run, sampled in float32 by both families. Errors are divided by those of "
        "as many exact posterior draws (the floor; 1.00 = as good as exact sampling). Ours: `restore()` with the default "
        "solver; deepinv: see the method list below.",
        markdown_table(["task", "floor: mean err", "cov err", "W2"], floor_rows),
        f"### At {steps} steps (ours at eta = 1)",
        gaussian_headline(rows, steps),
        "\n".join(verdicts),
        "### Covariance error / floor against steps (every eta of ours)",
        gaussian_sweep(rows, settings["gaussian_steps"]),
        f"![quality against NFE and seconds]({figure.name})",
        "## 2. Calibration",
        f"Exact posterior mass inside each coordinate's central 50% and 90% interval of the samples, averaged over "
        f"coordinates, at {steps} steps. Calibrated samples give 0.50 and 0.90 (up to the spread of finite samples, "
        "shown by the exact-draw rows).",
        calibration_table(rows, exact_coverage, steps),
    ], verdicts


def mixture_part(settings: dict) -> tuple[list[str], list[str]]:
    """Section 3: (sections, verdicts)."""
    rows = mixture_study(settings["mixture_samples"], settings["mixture_steps"], settings["dimensions"],
                         settings["measurement_counts"], settings["seeds"])
    table, verdicts = mixture_table(rows)
    return [
        "## 3. The MCGdiff Gaussian mixture",
        f"`posterior_diff.evaluation.problems.mixture_problem(d, d_y, seed)` (Cardoso et al. 2023): 25 components, "
        f"{settings['mixture_samples']} samples, {settings['mixture_steps']} steps, seeds {settings['seeds']}. Sliced "
        "Wasserstein distance (1000 directions) to as many exact posterior draws, divided by the floor (the distance "
        "between two independent exact sets), averaged over seeds; seconds per run in brackets. The prior column is "
        "what ignoring y achieves.",
        table,
        "\n".join(verdicts),
    ], verdicts


def image_part(settings: dict, model_name: str | None, device: str | None) -> tuple[list[str], list[str]]:
    """Section 4: (sections, verdicts)."""
    model = load_model(model_name) if model_name else default_model(torch.float32)
    rows = image_study(model, settings["images"], settings["image_tasks"], settings["image_size"],
                       settings["image_downscale"], settings["image_samples"], settings["image_steps"], device=device)
    table, verdicts = image_table(rows)
    return [
        "## 4. Images with the embedded model",
        f"Held-out photographs {', '.join(settings['images'])} (shrunk by {settings['image_downscale']:g}, "
        f"{settings['image_size']}x{settings['image_size']} centre crops), tasks {', '.join(settings['image_tasks'])} "
        f"(`posterior_diff.evaluation.harness`, as in `image_restoration.py`); posterior mean of {settings['image_samples']} "
        f"samples, {settings['image_steps']} network evaluations per sample for every method, the same model for all "
        "(deepinv's through `Denoiser.to_deepinv()`). Averages over the photographs; the first row of each task is its "
        "reference classical baseline (`Task.baseline`). peak MB: growth of peak resident memory during the run (CPU) "
        "or peak CUDA allocation.",
        table,
        "\n".join(verdicts),
    ], verdicts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # small problems gain nothing from more; 2 threads stall when the other core is busy
    settings, start = args.settings, time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the figure goes there before the report
    parts = {"gaussian": lambda: gaussian_part(settings, args.out), "mixture": lambda: mixture_part(settings),
             "images": lambda: image_part(settings, args.model, args.device)}
    sections, summary = [], []
    for name, part in parts.items():
        if name not in args.skip:
            part_sections, verdicts = part()
            sections += part_sections
            summary += verdicts
    peer_doc = (Path(__file__).with_name("peers.py")).read_text().split('"""')[1].strip()
    write_report(args.out, "Benchmarks: posterior-diff beside deepinv",
                 "Regenerate with `python -m benchmarks.run_benchmarks` (add `--quick` for a smoke run).",
                 ["## Verdicts", "\n".join(summary) or "(no part run)", *sections, "## How deepinv is run", peer_doc],
                 module="benchmarks.run_benchmarks", argv=args.argv, minutes=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
