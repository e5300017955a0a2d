import pytest
import torch

deepinv = pytest.importorskip("deepinv")

from operators import SuperResolution, from_deepinv  # noqa: E402
from posterior_diff import DeepinvPrior, GaussianPrior, GeometricVESchedule, from_deepinv_denoiser, restore  # noqa: E402
from posterior_diff.evaluation.metrics import exact_sample_floor, gaussian_errors  # noqa: E402
from posterior_diff.evaluation.problems import squared_exponential_covariance  # noqa: E402
from posterior_diff.images import from_model_range, to_model_range  # noqa: E402
from posterior_diff.models.deepinv_prior import is_deepinv_denoiser, is_deepinv_object  # noqa: E402
from posterior_diff.models.loading import load_model  # noqa: E402
from conftest import grouped_floor_ratios  # noqa: E402

DOUBLE = torch.float64
SIZE = 6  # (1, 6, 6) images: d = 36, y of 9 entries under 2x super-resolution


class ExactGaussianDenoiser(deepinv.models.Denoiser):
    """deepinv's contract, exactly: D(x, sigma) = E[x_0 | x_0 + sigma n = x] for x_0 ~ N(mean, cov),
    in [0, 1] units. `sigma_scale` != 1 is a deliberately wrong reading of sigma."""

    def __init__(self, mean, cov, sigma_scale=1.0):
        super().__init__()
        values, vectors = torch.linalg.eigh(cov)
        self.register_buffer("mean", mean)
        self.register_buffer("values", values.clamp_min(0))
        self.register_buffer("vectors", vectors)
        self.sigma_scale = sigma_scale

    def forward(self, x, sigma, **kwargs):
        sigma = self._handle_sigma(sigma, batch_size=x.shape[0], device=x.device, dtype=x.dtype) * self.sigma_scale
        gain = self.values / (self.values + sigma[:, None] ** 2)
        coordinates = ((x - self.mean).flatten(1) @ self.vectors) * gain
        return self.mean + (coordinates @ self.vectors.T).reshape(x.shape)


def image_prior(size=SIZE, std=0.05):
    """N(0.5, std^2 K) on (1, size, size) images, K a smooth kernel: 10 std inside [0, 1]."""
    cov = squared_exponential_covariance(size, 2.0, variance=std**2) + 1e-8 * torch.eye(size * size, dtype=DOUBLE)
    return torch.full((1, size, size), 0.5, dtype=DOUBLE), cov


def ve_posterior_mean(mean, cov, x, sigma):
    """E[x_0 | x_0 + sigma n = x] per sample, x (B, *shape), sigma (B,)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    rows = [mean.flatten() + cov @ torch.linalg.solve(cov + s**2 * eye, (xi.flatten() - mean.flatten())) for xi, s in zip(x, sigma)]
    return torch.stack(rows).reshape(x.shape)


def noisy(x0, sigma, seed):
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)
    return x0 + sigma.reshape(-1, *[1] * (x0.dim() - 1)) * noise


def test_the_adapter_is_a_ve_denoiser_in_unit_range():
    mean, cov = image_prior()
    prior = from_deepinv_denoiser(ExactGaussianDenoiser(mean, cov), sigma_min=0.005, sigma_max=50.0)
    assert isinstance(prior, DeepinvPrior) and isinstance(prior.schedule, GeometricVESchedule)
    assert prior.data_range == (0.0, 1.0) and prior.channels is None and prior.x_shape is None
    schedule = prior.schedule
    # float64 exp/log of the geometric schedule: exact to ~1e-15 (measured 9e-16)
    assert float(schedule.sigma(torch.tensor(schedule.t_min, dtype=DOUBLE))) == pytest.approx(0.005)
    assert float(schedule.sigma(torch.tensor(1.0, dtype=DOUBLE))) == pytest.approx(50.0, rel=1e-6)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=DOUBLE)  # one time per sample
    sigma = schedule.sigma(t)
    x = noisy(mean.expand(3, 1, SIZE, SIZE), sigma, seed=1)
    # float64, d = 36: eigenbasis against a dense solve of cov + sigma^2 I (cond <= 40): ~1e-14
    assert torch.allclose(prior(x, t), ve_posterior_mean(mean, cov, x, sigma), atol=1e-10)
    assert torch.allclose(prior(x[:1], 0.5), ve_posterior_mean(mean, cov, x[:1], sigma[1:2]), atol=1e-10)
    # differentiable in x_t: the guidance's VJP J^T w, with J = cov (cov + sigma^2 I)^{-1} (symmetric)
    x = x[1:2].clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=DOUBLE)
    (vjp,) = torch.autograd.grad(prior(x, 0.5), x, grad_outputs=w)
    expected = cov @ torch.linalg.solve(cov + sigma[1] ** 2 * torch.eye(SIZE * SIZE, dtype=DOUBLE), w.flatten())
    assert torch.allclose(vjp.flatten(), expected, atol=1e-10)  # float64 rounding, as above
    # the deepinv module is a registered submodule: .to() moves it, and it decides the sampling dtype
    assert prior.sampling_dtype() == DOUBLE
    prior.to(torch.float32)
    assert prior.denoiser.mean.dtype == torch.float32 and prior.sampling_dtype() == torch.float32


def test_round_trip_through_to_deepinv_keeps_a_gaussian_posterior_mean():
    """GaussianPrior (VP, no image range) -> deepinv -> ours: E[x_0 | x_0 + sigma(t) n] exactly."""
    mean, cov = image_prior(4, std=0.3)
    back = from_deepinv_denoiser(GaussianPrior(mean, cov).to_deepinv())
    t = torch.tensor([0.3, 0.45, 0.6], dtype=DOUBLE)  # sigma(t) from about 0.04 to 1
    sigma = back.schedule.sigma(t)
    x = noisy(mean.expand(3, 1, 4, 4), sigma, seed=3)
    with torch.no_grad():  # float64 throughout, d = 16: rounding, measured 1e-15
        assert torch.allclose(back(x, t), ve_posterior_mean(mean, cov, x, sigma), atol=1e-10)


def test_round_trip_through_to_deepinv_keeps_an_image_models_estimate(pipeline_folder):
    """A diffusers model in [-1, 1] -> deepinv -> ours gives the model's E[x_0 | x_t] in [0, 1]
    units: at sigma in [0, 1] units the model sees the noise ratio 2 sigma, at x_t = alpha (2 x - 1)."""
    model = load_model(pipeline_folder)
    back = from_deepinv_denoiser(model.to_deepinv(), channels=3)
    assert back.channels == 3 and back.data_range == (0.0, 1.0)
    sigma = torch.tensor([0.05, 0.3, 2.0], dtype=DOUBLE)
    t = back.schedule.time_for_ratio(sigma).float()
    x = noisy(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)), sigma.float(), seed=5)
    model_t = model.schedule.time_for_ratio(2 * back.schedule.sigma(t.double())).float()
    alpha = model.schedule.alpha(model_t).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        expected = from_model_range(model(alpha * to_model_range(x), model_t)).clamp(0, 1)
        # float32 network; the adapter's times and scalings are re-derived here in its own order
        # (bit-equal today); 1e-5 allows float32 rounding of t and alpha amplified by 1 / alpha ~ 4
        assert torch.allclose(back(x, t), expected, atol=1e-5)


def test_channels_are_read_from_the_denoiser_or_given():
    mean, cov = image_prior(4)
    denoiser = ExactGaussianDenoiser(mean, cov)
    assert from_deepinv_denoiser(denoiser).channels is None
    assert from_deepinv_denoiser(denoiser, channels=1).channels == 1
    denoiser.out_channels = 1
    assert from_deepinv_denoiser(denoiser).channels == 1
    denoiser.in_channels = 3  # in_channels wins (DiffUNet's out_channels is 6)
    assert from_deepinv_denoiser(denoiser).channels == 3
    with pytest.raises(ValueError, match="channels"):
        from_deepinv_denoiser(denoiser, channels=0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        from_deepinv_denoiser(denoiser, sigma_min=1.0, sigma_max=0.5)


def sr_problem():
    mean, cov = image_prior()
    prior = GaussianPrior(mean, cov)
    generator = torch.Generator().manual_seed(0)
    operator = SuperResolution(2, sigma_y=0.01)
    y = operator.measure(prior.sample(1, generator), generator)[0]
    assert 0 < float(y.min()) and float(y.max()) < 1
    return mean, cov, operator, y, prior.posterior(operator, y)


def averaged_errors(model, operator, y, posterior, seeds):
    errors = {"mean_error": 0.0, "cov_error": 0.0}
    for seed in seeds:
        result = restore(y, operator, model=model, covariance="tweedie", steps=100, num_samples=2000, cg_max_iter=50,
                         antithetic=False, generator=torch.Generator().manual_seed(seed))
        measured = gaussian_errors(result.samples, posterior.mean, posterior.cov)
        for key in errors:
            errors[key] += measured[key] / len(seeds)
    return errors


def grouped_error_ratios(model, operator, y, posterior, groups=12, group_size=500, seed=10):
    """Mean and covariance errors over the exact-sample floor (200 draws of `group_size`: a 1%
    standard error), averaged over `groups` groups of `group_size` samples drawn in one run
    (conftest.grouped_floor_ratios: 12 groups narrow one group's ~20 % scatter to ~6 %)."""
    floor = exact_sample_floor(posterior, group_size, repeats=200)
    # independent samples (an image model's default pairs them): the floor is that of independent exact samples
    result = restore(y, operator, model=model, covariance="tweedie", steps=100, num_samples=groups * group_size,
                     cg_max_iter=50, antithetic=False, generator=torch.Generator().manual_seed(seed))
    return grouped_floor_ratios(result.samples, posterior, group_size, floor)


def test_posterior_samples_through_the_deepinv_interface_are_as_exact_as_exact_samples():
    """The deepinv interface loses nothing: a deepinv denoiser returning the exact Gaussian
    E[x_0 | x_0 + sigma n], adapted, gives posterior samples whose mean and covariance errors
    (100 steps, Tweedie covariance, 12 groups of 500 samples) are within 1.3x of exact samples'.
    Monte Carlo: over 6 seeds the ratios were 1.04 +- 0.06 (mean error) and 1.00 +- 0.03
    (covariance error), so 1.3 is over 4 standard deviations away."""
    mean, cov, operator, y, posterior = sr_problem()
    ratios = grouped_error_ratios(from_deepinv_denoiser(ExactGaussianDenoiser(mean, cov)), operator, y, posterior)
    for key in ratios:
        assert ratios[key] <= 1.3, (key, ratios[key])


def test_the_exactness_study_rejects_wrong_sigma_units():
    """The yardstick can fail: a denoiser that reads sigma twice too large (a units slip) is far off.
    A bias, not a Monte Carlo spread: 24.6-24.9x and 6.4-6.5x the floor over 6 seeds."""
    mean, cov, operator, y, posterior = sr_problem()
    floor = exact_sample_floor(posterior, 2000, repeats=10)
    errors = averaged_errors(from_deepinv_denoiser(ExactGaussianDenoiser(mean, cov, sigma_scale=2.0)), operator, y,
                             posterior, (10,))
    assert errors["mean_error"] > 5 * floor["mean_error"] and errors["cov_error"] > 2 * floor["cov_error"], errors


def test_restore_takes_a_deepinv_denoiser_directly():
    mean, cov, operator, y, _ = sr_problem()
    denoiser = ExactGaussianDenoiser(mean, cov)
    direct, adapted = (restore(y, operator, model=model, num_samples=3, steps=6, covariance="tweedie",
                               generator=torch.Generator().manual_seed(0))
                       for model in (denoiser, from_deepinv_denoiser(denoiser)))
    assert torch.equal(direct.samples, adapted.samples) and direct.nfe == 6  # restore adapts it alike: same computation


def test_a_real_deepinv_network_with_a_deepinv_physics():
    """deepinv end to end: a (small, untrained) DRUNet as the prior and a deepinv physics as the operator."""
    drunet = deepinv.models.DRUNet(in_channels=3, out_channels=3, nc=(8, 8, 8, 8), nb=1, pretrained=None)
    prior = from_deepinv_denoiser(drunet, channels=3)
    assert prior.denoiser is drunet and not drunet.training  # eval mode, and moved with the prior
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), requires_grad=True)
    (gradient,) = torch.autograd.grad(prior(x, torch.tensor([0.3, 0.6])).sum(), x)
    assert float(gradient.abs().sum()) > 0
    physics = deepinv.physics.Downsampling(img_size=(3, 8, 8), filter="bicubic", factor=2,
                                           noise_model=deepinv.physics.GaussianNoise(sigma=0.05))
    y = physics.A(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(7)))[0]
    result = restore(y, physics, model=drunet, num_samples=2, steps=3, covariance="tweedie", cg_max_iter=2,
                     generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (2, 3, 8, 8) and result.nfe == 3 and result.vjps > result.nfe
    assert bool(torch.isfinite(result.samples).all()) and 0 <= float(result.samples.min()) <= float(result.samples.max()) <= 1
    assert from_deepinv(physics).sigma_y == pytest.approx(0.05)  # deepinv stores sigma in float32: 1.5e-8 off


@pytest.mark.parametrize("model, message", [
    (deepinv.physics.Denoising(noise_model=deepinv.physics.GaussianNoise(sigma=0.1)),
     "model must be a deepinv.models.Denoiser.*physics.*operator"),
    (deepinv.models.ArtifactRemoval(torch.nn.Identity()), "model must be a deepinv.models.Denoiser.*model ArtifactRemoval"),
], ids=["physics", "reconstructor"])
def test_a_deepinv_object_that_is_not_a_denoiser_is_a_type_error_naming_model(model, message):
    mean, cov, operator, y, _ = sr_problem()
    with pytest.raises(TypeError, match=message):
        restore(y, operator, model=model)
    with pytest.raises(TypeError, match="denoiser must be a deepinv.models.Denoiser"):
        from_deepinv_denoiser(model)


def test_deepinv_objects_are_recognised_by_their_classes_alone():
    with pytest.raises(TypeError, match="denoiser must be a deepinv.models.Denoiser, got Identity"):
        from_deepinv_denoiser(torch.nn.Identity())
    # a class that only claims deepinv's module: recognised without deepinv's own isinstance
    imitation = type("Denoiser", (torch.nn.Module,), {"__module__": "deepinv.models.base"})
    subclass = type("Mine", (imitation,), {"__module__": "my_project"})
    assert is_deepinv_denoiser(subclass()) and is_deepinv_object(subclass())
    assert not is_deepinv_object(torch.nn.Identity()) and not is_deepinv_denoiser(deepinv.physics.Denoising())
