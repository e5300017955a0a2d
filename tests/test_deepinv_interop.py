import pytest
import torch

deepinv = pytest.importorskip("deepinv")

from conftest import tiny_unet  # noqa: E402
from operators import Denoising, Inpainting, SuperResolution, from_deepinv, random_mask, to_deepinv  # noqa: E402
from posterior_diff import GaussianPrior, denoiser_from_diffusers, restore  # noqa: E402
from posterior_diff.evaluation.problems import squared_exponential_covariance  # noqa: E402

SHAPE = (3, 8, 8)


def gaussian(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def deepinv_physics():
    mask = random_mask(SHAPE, 0.5, generator=torch.Generator().manual_seed(0))
    noise = deepinv.physics.GaussianNoise(sigma=0.05)
    blur = deepinv.physics.functional.blur.gaussian_blur(sigma=1.0)
    return [
        deepinv.physics.Denoising(noise_model=deepinv.physics.GaussianNoise(sigma=0.1)),
        deepinv.physics.Inpainting(img_size=SHAPE, mask=mask, noise_model=noise),
        deepinv.physics.Downsampling(img_size=SHAPE, filter="bicubic", factor=2, noise_model=noise),
        deepinv.physics.BlurFFT(img_size=SHAPE, filter=blur, noise_model=noise),
    ]


@pytest.mark.parametrize("physics", deepinv_physics(), ids=lambda p: type(p).__name__)
def test_from_deepinv_keeps_a_its_adjoint_and_sigma(physics):
    operator = from_deepinv(physics)
    x = gaussian(1, (2, *SHAPE))
    y = physics.A(x)
    assert operator.y_shape(SHAPE) == tuple(y.shape[1:]) and operator.x_shape(tuple(y.shape[1:])) == SHAPE
    assert torch.equal(operator.A(x), y)  # the adapter calls physics.A itself: exact
    v = gaussian(2, y.shape)
    assert torch.equal(operator.A_adjoint(v), physics.A_adjoint(v))
    # float32 sums of <= 384 products (and deepinv's FFTs): measured 4e-7 relative
    assert torch.allclose((operator.A(x) * v).sum(), (x * operator.A_adjoint(v)).sum(), rtol=1e-4)
    assert operator.sigma_y == float(physics.noise_model.sigma)  # read as is, no conversion
    assert to_deepinv(operator) is physics
    # The solve of (sigma^2 I + r A A^T) v = u, by closed form or CG, leaves a small residual: in
    # float32 tol=1e-8 is out of reach, and the residual floor is float32 rounding times the
    # condition number (<= 0.7 / 0.05^2 = 280): <= 2e-5, measured 4e-6 (BlurFFT's CG).
    u = gaussian(3, y.shape)
    v = operator.solve(u, 0.7, tol=1e-8, max_iter=500)
    residual = operator.sigma_y**2 * v + 0.7 * operator.A(operator.A_adjoint(v)) - u
    assert float(residual.norm() / u.norm()) < 1e-4


@pytest.mark.parametrize("operator", [SuperResolution(2, 0.05, kernel="bicubic"), Inpainting(random_mask(SHAPE, 0.3), 0.1),
                                      Denoising(0.2)], ids=lambda o: type(o).__name__)
def test_to_deepinv_keeps_a_its_adjoint_and_sigma(operator):
    physics = operator.to_deepinv()
    assert isinstance(physics, deepinv.physics.LinearPhysics)
    x = gaussian(4, (2, *SHAPE))
    y = operator.A(x)
    assert torch.equal(physics.A(x), y)  # the physics calls our A itself: exact
    v = gaussian(5, y.shape)
    assert torch.equal(physics.A_adjoint(v), operator.A_adjoint(v))
    assert float(physics.noise_model.sigma) == pytest.approx(operator.sigma_y)  # kept in float32: 1e-8 relative
    assert abs(float(physics.adjointness_test(x))) < 1e-4  # deepinv's own check; float32 rounding, measured 6e-7
    back = from_deepinv(physics)  # its A still calls our A: exact; sigma through float32, as above
    assert torch.equal(back.A(x), y) and back.sigma_y == pytest.approx(operator.sigma_y)


def test_only_gaussian_noise_and_linear_physics_are_accepted():
    with pytest.raises(ValueError, match="noise_model"):
        from_deepinv(deepinv.physics.Denoising(noise_model=deepinv.physics.PoissonNoise(gain=0.1)))
    with pytest.raises(TypeError, match="LinearPhysics"):
        from_deepinv(deepinv.physics.Physics(A=lambda x: x**2))
    with pytest.raises(TypeError, match="operator must be"):
        restore(torch.zeros(4), "not an operator", GaussianPrior(torch.zeros(4), torch.eye(4)))


def test_restore_takes_deepinv_physics_and_matches_our_operator():
    mask = random_mask(SHAPE, 0.5, generator=torch.Generator().manual_seed(7))
    physics = deepinv.physics.Inpainting(img_size=SHAPE, mask=mask, noise_model=deepinv.physics.GaussianNoise(sigma=0.05))
    # deepinv keeps sigma_y in float32 (0.05000000075): our operator gets that very number, so the
    # two runs make the same computation (the mask products, the closed-form solve, the CG of the
    # Tweedie covariance) and agree bit for bit. With 0.05 they would agree only to rounding
    # amplified through the network and the CG, whose stopping rule can then end a step apart.
    ours = Inpainting(mask, float(physics.noise_model.sigma))
    y = ours.A(torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(8)))[0]
    model = denoiser_from_diffusers(tiny_unet(), __import__("diffusers").DDPMScheduler())
    results = [restore(y, operator, model, num_samples=2, steps=3, covariance="tweedie", generator=torch.Generator().manual_seed(0))
               for operator in (physics, ours)]
    assert torch.equal(results[0].samples, results[1].samples)
    # scattered holes: both start from the biharmonic fill of the same mask (start="auto")
    assert results[0].settings.start == results[1].settings.start == "estimate"
    assert float(physics.noise_model.sigma) == pytest.approx(0.05)  # the caller's physics is untouched


def _exact_ve_denoiser(mean, covariance, x, s):
    """E[x_0 | x_0 + s n] for x_0 ~ N(mean, covariance), flattened."""
    d = covariance.shape[0]
    gain = covariance @ torch.linalg.inv(covariance + s**2 * torch.eye(d, dtype=covariance.dtype))
    return mean + (x - mean) @ gain.T


def test_our_denoisers_follow_deepinvs_ve_contract_in_unit_range():
    covariance = squared_exponential_covariance(4, 2.0)
    mean = 0.1 * torch.ones(16, dtype=torch.float64)
    prior = GaussianPrior(mean.reshape(1, 4, 4), covariance)
    x = gaussian(9, (3, 1, 4, 4)).double()
    sigma = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    wrapped = prior.to_deepinv()
    assert isinstance(wrapped, deepinv.models.Denoiser)
    with torch.no_grad():
        for index, s in enumerate(sigma):
            expected = _exact_ve_denoiser(mean, covariance, x[index].flatten(), s)
            # float64, d = 16, cond(cov + s^2 I) <= 4e3 (s = 0.05): rounding, measured 6e-14
            assert torch.allclose(wrapped(x[index : index + 1], s).flatten(), expected, atol=1e-10)
        assert torch.allclose(wrapped(x, sigma).flatten(1)[1], _exact_ve_denoiser(mean, covariance, x[1].flatten(), 0.3), atol=1e-10)
    # As an image model (data in [-1, 1], deepinv's [0, 1]): the prior of (x_model + 1) / 2 is
    # N((mean + 1) / 2, covariance / 4), and a deepinv sigma of s is 2 s in model units.
    prior.data_range = (-1.0, 1.0)
    with torch.no_grad():
        expected = _exact_ve_denoiser((mean + 1) / 2, covariance / 4, x[0].flatten(), 0.2)
        assert torch.allclose(prior.to_deepinv(clip=False)(x[:1], 0.2).flatten(), expected, atol=1e-10)  # as above
        clipped = prior.to_deepinv()(x[:1], 0.2).flatten()  # by default an image estimate stays in [0, 1]
        assert torch.allclose(clipped, expected.clamp(0, 1), atol=1e-10) and not torch.allclose(clipped, expected)
