"""The estimate start (Come-Closer-Diffuse-Faster): classical estimates, the auto rule, the run's start."""

import pytest
import torch
from diffusers import DDPMScheduler

from operators import Blur, Denoising, Inpainting, SuperResolution, box_mask, gaussian_kernel, random_mask
from posterior_diff import GaussianPrior, restore, restore_batch
from posterior_diff.defaults import ESTIMATE_START_LEVEL
from posterior_diff.models.formats import denoiser_from_diffusers
from posterior_diff.restore import Problem, Segment, estimate_start
from posterior_diff.sampling.samplers import NoiseSource
from posterior_diff.start_estimates import (SMALL_GAP, bicubic_upsample, biharmonic_fill, classical_estimate,
                                            has_small_gaps)

from conftest import tiny_unet

SIZE = 16


@pytest.fixture(scope="module")
def model():
    return denoiser_from_diffusers(tiny_unet(), DDPMScheduler(num_train_timesteps=1000))


def smooth_image(size: int = SIZE) -> torch.Tensor:
    """A smooth RGB image in [0, 1] (3, size, size): the classical estimates are accurate on it."""
    grid = torch.linspace(0, 1, size)
    return torch.stack([0.5 + 0.3 * torch.sin(3 * grid)[:, None] * torch.cos(2 * grid)[None, :] * (c + 1) / 3
                        for c in range(3)])


def test_random_holes_are_small_gaps_and_a_box_hole_is_not():
    generator = torch.Generator().manual_seed(0)
    assert has_small_gaps(Inpainting(random_mask((3, 64, 64), 0.7, generator=generator)), (3, 64, 64))
    assert not has_small_gaps(Inpainting(box_mask((3, 64, 64), 16, 16, 32, 32)), (3, 64, 64))
    # a hole just deeper than SMALL_GAP is not small, one as deep is
    for depth, small in ((SMALL_GAP, True), (SMALL_GAP + 1, False)):
        mask = torch.ones(1, 32, 32)
        mask[:, 10:10 + 2 * depth - 1, 10:10 + 2 * depth - 1] = 0
        assert has_small_gaps(Inpainting(mask), (1, 32, 32)) is small
    assert not has_small_gaps(SuperResolution(4), (3, 64, 64))


def test_the_classical_estimates_are_scikit_images_and_keep_what_was_observed():
    truth = smooth_image()
    mask = random_mask(truth.shape, 0.7, generator=torch.Generator().manual_seed(0))
    y = truth * mask
    filled = classical_estimate(y, Inpainting(mask))
    assert torch.equal(filled, biharmonic_fill(y, mask))
    assert torch.allclose(filled[mask.bool()], y[mask.bool()], atol=1e-6)
    # a smooth image is filled well: a small fraction of the zero fill's error (biharmonic interpolation
    # of a smooth function has an error of second order in the gap, here 1-3 pixels out of 16)
    assert (filled - truth).abs().mean() < 0.1 * (y - truth).abs().mean()
    small = SuperResolution(2).A(truth[None])[0]
    assert torch.equal(classical_estimate(small, SuperResolution(2)), bicubic_upsample(small, truth.shape))
    assert torch.equal(classical_estimate(truth, Denoising(0.1)), truth)
    with pytest.raises(ValueError, match='start="estimate" has no classical estimate for Blur'):
        classical_estimate(truth, Blur(gaussian_kernel(1.0)))


def test_the_start_is_the_estimate_noised_to_the_start_level(model):
    """x_hat + s_0 n: centred on the estimate, with standard deviation s_0 (model units), the noise
    drawn from each segment's own generator."""
    point = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    problem = Problem(model, (Denoising(0.1),) * 2, (point, point), (3, 64, 64), True, start_points=(point, point + 1))
    settings = restore_settings(model, s_max=0.6)
    noise = NoiseSource(((torch.Generator().manual_seed(1), 2), (torch.Generator().manual_seed(2), 1)))
    start = estimate_start(problem, settings, (Segment(0, 2), Segment(1, 1)), noise, torch.device("cpu"))
    offsets = start - torch.stack([point, point, point + 1])
    standard_error = 0.6 / (offsets.numel() ** 0.5)
    assert abs(float(offsets.mean())) < 4 * standard_error
    assert abs(float(offsets.std()) - 0.6) < 4 * 0.6 / (2 * offsets.numel()) ** 0.5
    alone = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    # the second segment's noise is its generator's alone (up to float32 rounding of point + noise - point)
    torch.testing.assert_close(offsets[2:], 0.6 * alone, atol=1e-6, rtol=0)


def restore_settings(model, s_max):
    from posterior_diff.restore import RestoreSettings
    from posterior_diff.sampling.guidance import GuidanceSettings
    from posterior_diff.sampling.samplers import SamplerSettings

    return RestoreSettings(1, SamplerSettings(steps=3, s_max=s_max), GuidanceSettings())


def test_auto_starts_from_the_estimate_only_where_every_hole_is_small(model):
    truth = smooth_image()
    generator = torch.Generator().manual_seed(0)
    scattered = Inpainting(random_mask(truth.shape, 0.7, generator=generator), sigma_y=0.01)
    hole = Inpainting(box_mask(truth.shape, 2, 2, 12, 12), sigma_y=0.01)  # 6 pixels deep
    for operator, start in ((scattered, "estimate"), (hole, "prior"), (SuperResolution(2, sigma_y=0.01), "prior")):
        y = operator.measure(truth[None], generator)[0]
        result = restore(y, operator, model, steps=3, num_samples=1, generator=torch.Generator().manual_seed(0))
        assert result.settings.start == start
        expected_ratio = 2 * ESTIMATE_START_LEVEL if start == "estimate" else None  # [-1, 1] model units
        assert result.settings.sampler.s_max == (pytest.approx(expected_ratio) if expected_ratio else None)


def test_an_estimate_start_is_reproducible_and_batches_like_restore(model):
    truth = smooth_image()
    operator = SuperResolution(2, sigma_y=0.02)
    ys = [operator.measure(truth[None], torch.Generator().manual_seed(k))[0] for k in range(2)]
    options = dict(steps=4, num_samples=2, start="estimate", covariance="isotropic")
    alone = [restore(y, operator, model, generator=torch.Generator().manual_seed(10 + k), **options)
             for k, y in enumerate(ys)]
    again = restore(ys[0], operator, model, generator=torch.Generator().manual_seed(10), **options)
    assert torch.equal(alone[0].samples, again.samples)
    batched = restore_batch(ys, operator, model, generator=[torch.Generator().manual_seed(10 + k) for k in range(2)],
                            **options)
    for single, item in zip(alone, batched):
        torch.testing.assert_close(item.samples, single.samples, atol=1e-5, rtol=0)
    prior = restore(ys[0], operator, model, generator=torch.Generator().manual_seed(10), **dict(options, start="prior"))
    assert not torch.allclose(prior.samples, alone[0].samples, atol=1e-3)


@pytest.mark.parametrize("case, message", [
    ("blur", "no classical estimate is known for Blur"),
    ("analytic prior", "the classical estimates are for image models"),
    ("particles", "particle mode"),
])
def test_an_estimate_start_that_cannot_apply_is_a_clear_error(model, case, message):
    truth = smooth_image()
    operator, prior, extra = SuperResolution(2, sigma_y=0.02), model, {}
    y = operator.A(truth[None])[0]
    if case == "blur":
        operator, y = Blur(gaussian_kernel(1.0), sigma_y=0.02), truth
    elif case == "analytic prior":
        prior = GaussianPrior(torch.zeros(3, SIZE, SIZE), torch.eye(3 * SIZE * SIZE))
        operator, y = Denoising(0.1), truth
    elif case == "particles":
        extra = dict(particles=4)
    with pytest.raises(ValueError, match=message):
        restore(y, operator, prior, steps=3, start="estimate", **extra)


def test_start_level_sets_the_estimate_starts_first_noise_level(model):
    truth = smooth_image()
    operator = SuperResolution(2, sigma_y=0.02)
    y = operator.measure(truth[None], torch.Generator().manual_seed(0))[0]
    options = dict(steps=3, num_samples=1, start="estimate", covariance="isotropic")
    chosen = restore(y, operator, model, start_level=0.25, generator=torch.Generator().manual_seed(0), **options)
    default = restore(y, operator, model, generator=torch.Generator().manual_seed(0), **options)
    assert chosen.settings.start_level == 0.25 and default.settings.start_level == ESTIMATE_START_LEVEL
    # the grid starts at s_0 in the model's [-1, 1] units: twice the [0, 1] level
    assert chosen.settings.sampler.s_max == pytest.approx(2 * 0.25)
    assert default.settings.sampler.s_max == pytest.approx(2 * ESTIMATE_START_LEVEL)
    assert not torch.allclose(chosen.samples, default.samples, atol=1e-3)
    batched = restore_batch([y], operator, model, start_level=0.25, generator=[torch.Generator().manual_seed(0)],
                            **options)[0]
    torch.testing.assert_close(batched.samples, chosen.samples, atol=1e-5, rtol=0)
    prior = restore(y, operator, model, steps=3, num_samples=1, start="prior")
    assert prior.settings.start_level is None


@pytest.mark.parametrize("start_level, start, error, message", [
    (0.0, "estimate", ValueError, r"start_level must be in \(0"),
    (float("nan"), "estimate", ValueError, "start_level must be in"),
    ("0.3", "estimate", None, None),  # a number as text is a number
    (True, "estimate", TypeError, "start_level must be a number"),
    (1e6, "estimate", ValueError, r"start level 1e\+06 \(start_level\) is above the model's largest noise level"),
    (0.3, "prior", ValueError, "start_level applies to an estimate start only, and this run starts from the prior"),
    (0.3, "auto", ValueError, "start_level applies to an estimate start only"),  # SR: auto starts from the prior
    (1e6, "auto holes", ValueError, r"an estimate start cannot apply: its start level 1e\+06 \(start_level\) is above"),
])
def test_a_bad_start_level_is_a_clear_error(model, start_level, start, error, message):
    truth = smooth_image()
    operator = SuperResolution(2, sigma_y=0.02)
    if start == "auto holes":  # scattered holes, where auto would take the estimate but for the level
        operator = Inpainting(random_mask(truth.shape, 0.7, generator=torch.Generator().manual_seed(0)), sigma_y=0.01)
        start = "auto"
    y = operator.A(truth[None])[0]
    call = lambda: restore(y, operator, model, steps=2, num_samples=1, start=start, start_level=start_level,
                           covariance="isotropic")
    if error is None:
        assert call().settings.start_level == pytest.approx(0.3)
        return
    with pytest.raises(error, match=message):
        call()
