"""sigma_y="auto": the estimate from y (posterior_diff.noise_estimate) and how restore uses it.

Tolerance of an estimate on a smooth image plus Gaussian noise of known sigma_y. The estimator
takes sigma_y^2 as the mean of the bulk of the eigenvalues of the sample covariance of n patches of
d entries. For noise alone those eigenvalues spread over sigma_y^2 (1 -+ sqrt(d/n))^2
(Marchenko-Pastur), and the estimator's balance rule drops the largest ones, so the estimate can
sit up to sqrt(d/n) below sigma_y; and a mean of at least n independent squared normals has a
relative standard deviation of sqrt(2/n) for sigma_y^2, 1/sqrt(2n) for sigma_y. A smooth image lives
in a few patch directions and adds nothing to the small eigenvalues. So
|estimate / sigma_y - 1| < sqrt(d/n) + 4 / sqrt(2n): 11% for a 64x64 grey y (d = 16, n = 3721),
16% for runs of 3 observed pixels of a 128x128 grey image with 70% missing (d = 3, n ~ 850).
Over 20 seeds the errors stayed within -4.9..+1.6% and -6.5..+3.8%.
"""

import math

import pytest
import torch

from operators import Blur, Denoising, Inpainting, gaussian_kernel, MatrixOperator, StackedOperator, SuperResolution, random_mask
from posterior_diff import GaussianPrior, estimate_sigma_y, restore, restore_batch
from posterior_diff.noise_estimate import estimate, patch_image

from conftest import CountingPrior

pytest.importorskip("deepinv")

SIGMA_Y = 0.05


def smooth(height: int, width: int) -> torch.Tensor:
    """A smooth grey image (1, height, width) in [0.2, 0.8]."""
    rows, cols = torch.linspace(0, 1, height)[:, None], torch.linspace(0, 1, width)[None]
    return (0.5 + 0.3 * torch.sin(3 * rows + 2 * cols) * torch.cos(2 * cols))[None]


def tolerance(y: torch.Tensor, operator) -> float:
    """sqrt(d/n) + 4/sqrt(2n) for the estimate's patches (see the module's docstring)."""
    image, patch_size, _ = patch_image(operator.noise_view(y))
    entries = image.shape[1] * patch_size[0] * patch_size[1]
    patches = estimate(y, operator).patches
    return math.sqrt(entries / patches) + 4 / math.sqrt(2 * patches)


@pytest.mark.parametrize("name, operator, x_shape", [
    ("denoising", Denoising("auto"), (64, 64)),
    ("super-resolution", SuperResolution(4, "auto"), (256, 256)),  # y is 64x64
    ("inpainting", Inpainting(random_mask((1, 128, 128), 0.7, generator=torch.Generator().manual_seed(0)), "auto"),
     (128, 128)),
    ("deblurring", Blur(gaussian_kernel(2.0), "auto"), (64, 64)),  # y after the blur: all of it noisy
])
def test_the_estimate_is_within_its_statistical_error(name, operator, x_shape):
    x = smooth(*x_shape)
    y = operator.with_sigma_y(SIGMA_Y).measure(x[None], torch.Generator().manual_seed(1))[0]
    found = estimate_sigma_y(y, operator)
    assert abs(found / SIGMA_Y - 1) < tolerance(y, operator), (name, found)


def test_inpainting_reads_only_the_observed_pixels():
    """The holes (0 in y) would read as huge detail: the estimate must not see them."""
    mask = random_mask((1, 128, 128), 0.7, generator=torch.Generator().manual_seed(0))
    operator = Inpainting(mask, "auto")
    y = operator.with_sigma_y(SIGMA_Y).measure(smooth(128, 128)[None], torch.Generator().manual_seed(1))[0]
    assert abs(estimate_sigma_y(y, operator) / SIGMA_Y - 1) < tolerance(y, operator)
    assert abs(estimate_sigma_y(y, Denoising("auto")) / SIGMA_Y - 1) > 1  # the same y read whole


@pytest.mark.parametrize("y, operator, message", [
    (torch.rand(1, 10, 10), Denoising("auto"), "only 49 4x4 patches"),  # too small a y
    (torch.rand(3, 10, 10), SuperResolution(4, "auto"), "only 49 4x4 patches"),  # the 10x10 y of a 40x40 x
    (torch.rand(1, 16, 16), Inpainting(random_mask((1, 16, 16), 0.7, generator=torch.Generator().manual_seed(0)),
                                       "auto"), "3-pixel run patches"),  # too few observed
    (torch.full((1, 32, 32), 0.5), Denoising("auto"), "no noise subspace"),  # no noise at all
])
def test_an_unreliable_estimate_is_refused(y, operator, message):
    if isinstance(operator, Inpainting):
        y = y * operator.mask
    with pytest.raises(ValueError, match=message) as error:
        estimate_sigma_y(y, operator)
    assert "sigma_y" in str(error.value) and "pass sigma_y as a number" in str(error.value)


def test_operators_that_cannot_show_their_noise_say_so():
    with pytest.raises(ValueError, match="MatrixOperator measures a vector"):
        MatrixOperator(torch.eye(3), "auto")
    stacked = StackedOperator([Denoising("auto"), Denoising("auto")], [1, 1])
    assert stacked.sigma_y_setting == "auto"
    with pytest.raises(ValueError, match="each part's own measurement"):
        estimate_sigma_y(torch.rand(1, 32, 32), stacked)
    with pytest.raises(ValueError, match="image measurement"):
        estimate_sigma_y(torch.rand(5, 2, 3, 4), Denoising("auto"))


def prior_and_measurement(seed: int = 0, scale: float = 1.0):
    """A Gaussian prior on (1, 16, 16) images and a denoising y of a smooth image with noise
    SIGMA_Y * scale: 169 patches of 16 entries, 128 needed."""
    prior = GaussianPrior(torch.full((1, 16, 16), 0.5), 0.05 * torch.eye(256))
    y = smooth(16, 16) + SIGMA_Y * scale * torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return prior, y


def test_restore_with_auto_reports_the_estimate_and_equals_restore_with_that_value():
    prior, y = prior_and_measurement()
    options = dict(steps=4, covariance="isotropic", num_samples=2, start="prior")
    auto = restore(y, Denoising("auto"), prior, generator=torch.Generator().manual_seed(3), **options)
    found = estimate(y, Denoising("auto"))
    assert auto.sigma_y == found.value == auto.settings.sigma_y
    assert auto.settings.sigma_y_estimate == found and "PatchCovariance" in found.estimator
    given = restore(y, Denoising(found.value), prior, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(auto.samples, given.samples)
    assert given.sigma_y == found.value and given.settings.sigma_y_estimate is None


def test_restore_batch_estimates_each_measurement_as_restore_does():
    prior, first = prior_and_measurement(0)
    _, second = prior_and_measurement(1, scale=2.0)
    options = dict(steps=3, covariance="isotropic", num_samples=2, start="prior")
    batch = restore_batch([first, second], Denoising("auto"), prior,
                          generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **options)
    for y, result, seed in zip((first, second), batch, (5, 6)):
        alone = restore(y, Denoising("auto"), prior, generator=torch.Generator().manual_seed(seed), **options)
        assert result.sigma_y == alone.sigma_y and torch.equal(result.samples, alone.samples)
    assert batch[1].sigma_y > 1.5 * batch[0].sigma_y  # two noise levels, two groups


def test_an_unreliable_estimate_stops_restore_before_any_work():
    prior, _ = prior_and_measurement()
    CountingPrior.calls = 0
    counting = CountingPrior(prior.mean[:, :8, :8], 0.05 * torch.eye(64), prior.schedule)
    with pytest.raises(ValueError, match=r"operator with y: sigma_y='auto' cannot be estimated"):
        restore(torch.rand(1, 8, 8), Denoising("auto"), counting, steps=3)
    assert CountingPrior.calls == 0
