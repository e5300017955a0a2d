"""Smoke and unit tests of the benchmark code (the numbers themselves live in docs/)."""

import pytest
import torch

pytest.importorskip("deepinv")

from benchmarks import run_benchmarks  # noqa: E402
from benchmarks.exact_posteriors import interval_coverage  # noqa: E402
from benchmarks.peers import SVDPhysics, decomposable_physics, run_peer  # noqa: E402
from operators import Denoising, MatrixOperator, SuperResolution  # noqa: E402
from posterior_diff.problems import gaussian_image_problems  # noqa: E402


def test_the_quick_run_writes_every_section_and_the_figure(tmp_path):
    out = tmp_path / "benchmarks.md"
    run_benchmarks.main(["--quick", "--out", str(out)])
    report = out.read_text()
    for heading in ("## Verdicts", "## 1. Gaussian", "## 2. Calibration", "## 3. The MCGdiff", "## 4. Images", "## How deepinv"):
        assert heading in report
    for method in ("ours tweedie eta=1", "deepinv mm", "deepinv ddrm", "deepinv diffpir"):
        assert method in report
    assert (tmp_path / "benchmarks_gaussian.png").stat().st_size > 10_000


def test_interval_coverage_is_nominal_for_exact_draws_and_high_for_too_wide_ones():
    mean, cov = torch.zeros(20, dtype=torch.float64), torch.eye(20, dtype=torch.float64)
    exact = torch.randn(4000, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert interval_coverage(exact, mean, cov, 0.9) == pytest.approx(0.9, abs=0.01)
    assert interval_coverage(exact, mean, cov, 0.5) == pytest.approx(0.5, abs=0.02)
    assert interval_coverage(3 * exact, mean, cov, 0.5) > 0.85


def test_ddrm_gets_an_exact_svd_or_a_clear_refusal():
    matrix = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    operator = MatrixOperator(matrix, sigma_y=0.1)
    physics = SVDPhysics(operator, (6,))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(physics.A(x), operator.A(x), atol=1e-5)
    assert type(decomposable_physics(Denoising(0.1), (3, 8, 8))).__name__ == "Denoising"
    with pytest.raises(ValueError, match="SVD"):
        decomposable_physics(SuperResolution(4, 0.05), (3, 128, 128))


def test_peer_runs_are_seeded_and_count_network_evaluations():
    problem = gaussian_image_problems(dtype=torch.float32)[1]
    first = run_peer("mm", problem.prior, problem.operator, problem.y, 8, 6, seed=3)
    again = run_peer("mm", problem.prior, problem.operator, problem.y, 8, 6, seed=3)
    assert first.nfe == 6 and torch.equal(first.samples, again.samples)
    with pytest.raises(ValueError, match="image models only"):
        run_peer("diffpir", problem.prior, problem.operator, problem.y, 2, 4)


def test_the_particle_benchmark_quick_run_writes_all_its_parts(tmp_path):
    from benchmarks import particle_mode

    out = tmp_path / "particle_mode.md"
    particle_mode.main(["--quick", "--out", str(out)])
    report = out.read_text()
    assert "## 1. The MCGdiff mixture" in report and "## 2. Gaussian prior" in report and "## 3. Images" in report
    assert "K=50 / floor" in report and "particles K=2, 3 steps" in report
    assert "## 1b. Why the schedule" in report and "### Weights without resampling" in report


def test_training_curve_windows_and_report(tmp_path):
    from benchmarks import training_curve

    log = [(step, float(step % 2)) for step in range(1, 11)]  # losses 1, 0, 1, 0, ...
    assert training_curve.window_means(log, 4) == [(1, 4, 0.5), (5, 8, 0.5), (9, 12, 0.5)]
    assert training_curve.window_means(log[6:], 2)[0] == (7, 8, 0.5)  # windows start at the first logged step
    out = tmp_path / "curve.md"
    training_curve.main(["--crops", "4", "--window", "3000", "--out", str(out)])
    text = out.read_text()
    assert "| shipped model | 1-3000 |" in text and "shipped: held-out / training" in text
