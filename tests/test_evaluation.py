import math

import pytest
import torch

from posterior_diff import evaluation
from posterior_diff.evaluation import (HELD_OUT, HELD_OUT_PHOTOGRAPHS, SIMULATED_TASKS, TRAINING_PHOTOGRAPHS, baselines,
                                       bicubic_upsample, biharmonic_fill, bm3d_denoise, centre_crop, has_diverged,
                                       load_photograph, measure, posterior_distance, psnr_ssim, restore_unless_diverged,
                                       single_precision)
from posterior_diff.problems import gaussian_image_problems, mixture_problem
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
    assert torch.equal(centre_crop(image, 2), image[:, 2:4, 2:4])
    with pytest.raises(ValueError, match="smaller than"):
        centre_crop(image, 4, downscale=2)
    with pytest.raises(ValueError, match="no photograph"):
        load_photograph("no_such_photograph", 8)


def test_measurements_follow_the_task_table_and_the_generator():
    truth = smooth_image(32)
    first = measure("random", truth, generator=torch.Generator().manual_seed(3))
    again = measure("random", truth, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.y, again.y) and first.operator.sigma_y == TASKS["random"].sigma_y
    missing = float((first.operator.mask == 0).double().mean())
    assert missing == pytest.approx(0.7, abs=0.01)
    low = measure("sr4", truth, sigma_y=0.0)
    assert low.y.shape == (3, 8, 8) and low.x_shape == (3, 32, 32)
    assert "inpaint" not in SIMULATED_TASKS and "denoise" in SIMULATED_TASKS


def test_bicubic_of_a_constant_image_is_that_constant():
    constant = torch.full((3, 8, 8), 0.3)
    assert torch.allclose(bicubic_upsample(constant, (3, 32, 32)), torch.full((3, 32, 32), 0.3), atol=1e-6)


def test_the_biharmonic_fill_keeps_what_was_observed_and_beats_the_holes():
    truth = smooth_image(32)
    measurement = measure("box", truth, sigma_y=0.0)
    mask = measurement.operator.mask
    filled = biharmonic_fill(measurement.y, mask)
    assert torch.equal(filled[mask == 1], measurement.y[mask == 1])
    assert psnr_ssim(filled, truth)[0] > psnr_ssim(measurement.y, truth)[0] + 10
    # a mask that differs between channels is filled channel by channel
    ragged = mask.clone()
    ragged[1, :4, :4] = 0
    filled = biharmonic_fill(truth * ragged, ragged)
    assert torch.equal(filled[ragged == 1], truth[ragged == 1]) and psnr_ssim(filled, truth)[0] > 30


def test_bm3d_beats_the_noisy_input():
    truth = smooth_image(32)
    measurement = measure("denoise", truth, generator=torch.Generator().manual_seed(0))
    denoised = bm3d_denoise(measurement.y, measurement.operator.sigma_y)
    assert denoised.shape == truth.shape and 0 <= float(denoised.min()) and float(denoised.max()) <= 1
    assert psnr_ssim(denoised, truth)[0] > psnr_ssim(measurement.y.clamp(0, 1), truth)[0] + 5
    grey = bm3d_denoise(measurement.y[:1], measurement.operator.sigma_y)  # one channel: the grey path
    assert psnr_ssim(grey, truth[:1])[0] > psnr_ssim(measurement.y[:1].clamp(0, 1), truth[:1])[0] + 5


@pytest.mark.parametrize("task", [name for name in SIMULATED_TASKS if name != "denoise"])
def test_the_reference_baseline_comes_first_and_is_an_image(task):
    measurement = measure(task, smooth_image(32), generator=torch.Generator().manual_seed(0))
    estimates = baselines(measurement)
    assert next(iter(estimates)) == TASKS[task].baseline
    assert all(estimate.shape == (3, 32, 32) for estimate in estimates.values())


def test_psnr_follows_the_mean_square_error():
    truth = smooth_image(16)
    psnr, _ = psnr_ssim(truth + 0.1, truth)
    assert psnr == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    assert psnr_ssim(truth + 0.001, truth)[1] > 0.99 > psnr_ssim(truth + 0.1 * noise, truth)[1]


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
    distance, floor = posterior_distance(problem, 500, seed=0, projections=100)
    exact = problem.posterior.sample(500, torch.Generator().manual_seed(7))
    prior_draws = problem.prior.sample(500, torch.Generator().manual_seed(7))
    assert 0 < floor and distance(exact) < 3 * floor < distance(prior_draws)
