import math

import pytest
import torch

from posterior_diff.evaluation import harness as evaluation
from posterior_diff.evaluation.harness import (HELD_OUT, HELD_OUT_PHOTOGRAPHS, SIMULATED_TASKS, TRAINING_PHOTOGRAPHS,
                                               baselines, bicubic_upsample, biharmonic_fill, bm3d_denoise, centre_crop,
                                               has_diverged, load_photograph, measure, posterior_distance, psnr_ssim,
                                               restore_unless_diverged, richardson_lucy_deconvolve, single_precision,
                                               wiener_deconvolve)
from posterior_diff.evaluation.problems import gaussian_image_problems, mixture_problem
from posterior_diff.tasks import TASKS


def smooth_image(size: int = 32) -> torch.Tensor:
    """A smooth colour image (3, size, size) in [0.2, 0.8]: slow sinusoids, different per channel."""
    rows, cols = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([0.5 + 0.3 * torch.sin(2 * rows + phase) * torch.cos(3 * cols - phase) for phase in (0.0, 1.0, 2.0)])


def test_held_out_photographs_load_as_centre_crops_in_unit_range():
    image = load_photograph("astronaut", 64, downscale=4)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.std()) > 0.05
    camera = load_photograph("camera", 32, downscale=8)
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[1], camera[2])  # grey, repeated
    assert load_photograph("coffee", 16, downscale=8, channels=1).shape == (1, 16, 16)
    assert not set(HELD_OUT) & set(TRAINING_PHOTOGRAPHS) and set(HELD_OUT_PHOTOGRAPHS) < set(HELD_OUT)


def test_centre_crop_takes_the_middle_and_refuses_what_does_not_fit():
    image = torch.arange(36.0).reshape(1, 6, 6)
    assert torch.equal(centre_crop(image, 2), image[:, 2:4, 2:4])  # indexing: exact
    with pytest.raises(ValueError, match="smaller than"):
        centre_crop(image, 4, downscale=2)
    with pytest.raises(ValueError, match="no photograph"):
        load_photograph("no_such_photograph", 8)


def test_measurements_follow_the_task_table_and_the_generator():
    truth = smooth_image(32)
    first = measure("random", truth, generator=torch.Generator().manual_seed(3))
    again = measure("random", truth, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.y, again.y) and first.operator.sigma_y == TASKS["random"].sigma_y  # same seed, same computation
    missing = float((first.operator.mask == 0).double().mean())
    assert missing == pytest.approx(0.7, abs=0.5 / 32**2)  # exactly round(0.7 n) of n = 32^2 pixels
    low = measure("sr4", truth, sigma_y=0.0)
    assert low.y.shape == (3, 8, 8) and low.x_shape == (3, 32, 32)
    assert "inpaint" not in SIMULATED_TASKS and "denoise" in SIMULATED_TASKS


def test_bicubic_of_a_constant_image_is_that_constant():
    constant = torch.full((3, 8, 8), 0.3)
    # float32: the kernel's weights sum to 1 up to rounding
    assert torch.allclose(bicubic_upsample(constant, (3, 32, 32)), torch.full((3, 32, 32), 0.3), atol=1e-6)


def test_the_biharmonic_fill_keeps_what_was_observed_and_beats_the_holes():
    truth = smooth_image(32)
    measurement = measure("box", truth, sigma_y=0.0)
    mask = measurement.operator.mask
    filled = biharmonic_fill(measurement.y, mask)
    assert torch.equal(filled[mask == 1], measurement.y[mask == 1])  # observed pixels are copied: exact
    assert psnr_ssim(filled, truth)[0] > psnr_ssim(measurement.y, truth)[0] + 10  # noiseless; measured +72 dB
    # a mask that differs between channels is filled channel by channel
    ragged = mask.clone()
    ragged[1, :4, :4] = 0
    filled = biharmonic_fill(truth * ragged, ragged)
    assert torch.equal(filled[ragged == 1], truth[ragged == 1]) and psnr_ssim(filled, truth)[0] > 30  # measured 62 dB


def test_bm3d_beats_the_noisy_input():
    truth = smooth_image(32)
    measurement = measure("denoise", truth, generator=torch.Generator().manual_seed(0))
    denoised = bm3d_denoise(measurement.y, measurement.operator.sigma_y)
    assert denoised.shape == truth.shape and 0 <= float(denoised.min()) and float(denoised.max()) <= 1
    assert psnr_ssim(denoised, truth)[0] > psnr_ssim(measurement.y.clamp(0, 1), truth)[0] + 5  # +15 dB over 3 noise seeds
    grey = bm3d_denoise(measurement.y[:1], measurement.operator.sigma_y)  # one channel: the grey path
    assert psnr_ssim(grey, truth[:1])[0] > psnr_ssim(measurement.y[:1].clamp(0, 1), truth[:1])[0] + 5  # +15-17 dB


@pytest.mark.parametrize("task", [name for name in SIMULATED_TASKS if name != "denoise"])
def test_the_reference_baseline_comes_first_and_is_an_image(task):
    measurement = measure(task, smooth_image(32), generator=torch.Generator().manual_seed(0))
    estimates = baselines(measurement)
    assert next(iter(estimates)) == TASKS[task].baseline
    assert all(estimate.shape == (3, 32, 32) for estimate in estimates.values())


@pytest.mark.parametrize("task", ["deblur", "deblur-motion"])
def test_the_deblurring_baselines_beat_the_blurred_input(task):
    """Both baselines sharpen the blurred, noisy image (sigma_y = 0.01): over 3 noise seeds on this 48 px crop,
    Wiener gains 2.9-3.0 dB (Gaussian) and 10.7-11.0 dB (motion), Richardson-Lucy 2.6-2.7 and 7.5-7.6 dB;
    a baseline that undid nothing would gain 0. They come in `baselines` with the blurred input."""
    pytest.importorskip("deepinv")  # the motion kernel
    truth = load_photograph("astronaut", 48, downscale=4)
    measurement = measure(task, truth, generator=torch.Generator().manual_seed(0))
    estimates = baselines(measurement)
    assert list(estimates) == ["unsupervised Wiener", "Richardson-Lucy", "blurred input"]
    blurred = psnr_ssim(estimates["blurred input"], truth)[0]
    kernel = measurement.operator.kernel
    assert torch.equal(estimates["unsupervised Wiener"], wiener_deconvolve(measurement.y, kernel))  # seeded: same
    assert psnr_ssim(estimates["unsupervised Wiener"], truth)[0] > blurred + 1
    assert psnr_ssim(richardson_lucy_deconvolve(measurement.y, kernel), truth)[0] > blurred + 1


def test_psnr_follows_the_mean_square_error():
    truth = smooth_image(16)
    psnr, _ = psnr_ssim(truth + 0.1, truth)
    # 10 log10(1 / 0.01); float32 makes the offset 0.1 to 1e-6 relative: 1e-5 dB (measured 1.5e-6)
    assert psnr == pytest.approx(20.0, abs=1e-4)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    assert psnr_ssim(truth + 0.001, truth)[1] > 0.99 > psnr_ssim(truth + 0.1 * noise, truth)[1]  # 0.999998 and 0.25


def test_one_divergence_rule(monkeypatch):
    assert not has_diverged(torch.ones(2, 3))
    assert has_diverged(torch.tensor([[1.0, math.nan]])) and has_diverged(torch.tensor([[2e4]]))
    problem = gaussian_image_problems()[2]

    def raises(*args, **kwargs):
        raise evaluation.NonFiniteSampleError("step 3 of 10")

    monkeypatch.setattr(evaluation, "restore", raises)
    assert restore_unless_diverged(problem.y, problem.operator, problem.prior, steps=10) is None
    monkeypatch.undo()
    result = restore_unless_diverged(problem.y, problem.operator, problem.prior, num_samples=4, steps=5)
    assert result is not None and result.samples.shape == (4, *problem.prior.mean.shape)


def test_exact_problems_in_single_precision_and_their_distance_floor():
    problem = mixture_problem(8, 1, seed=0)
    prior, operator, y = single_precision(problem.prior, problem.operator, problem.y)
    assert prior.means.dtype == torch.float32 and y.dtype == torch.float32 and problem.y.dtype == torch.float64
    # Monte Carlo: the floor is one exact draw's distance, and the ratio of two such distances
    # scatters widely (1.07 +- 0.46 over 40 seeds at 500 samples, up to 2.9; prior draws down to
    # 3.0x): average 5 seeds of 1000 samples. Exact draws then give 1.01 +- 0.14 of the floor (1.33
    # at worst in 30 repetitions), prior draws 6.5 +- 0.9 (5.1 at worst): 2.5 is over 4 sd from both.
    floors, exact, prior_draws = [], [], []
    for seed in range(5):
        distance, one_floor = posterior_distance(problem, 1000, seed=seed, projections=100)
        floors.append(one_floor)
        exact.append(distance(problem.posterior.sample(1000, torch.Generator().manual_seed(7 + seed))))
        prior_draws.append(distance(problem.prior.sample(1000, torch.Generator().manual_seed(7 + seed))))
    floor = sum(floors) / 5
    assert 0 < floor and sum(exact) / 5 < 2.5 * floor < sum(prior_draws) / 5
