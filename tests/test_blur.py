"""Deblurring: the circular-convolution operator, its Fourier solve, its kernels and its errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from operators import Blur, LinearOperator, box_kernel, gaussian_kernel, kernel_from_spec, motion_kernel

DOUBLE = torch.float64


def random_kernel(size: int, generator: torch.Generator) -> torch.Tensor:
    """A (size, size) float64 kernel with positive random entries summing to 1: no symmetry to hide a flip."""
    kernel = torch.rand(size, size, dtype=DOUBLE, generator=generator) + 0.01
    return kernel / kernel.sum()


def circular_conv2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The convolution of every (H, W) plane of x with `kernel` centred at (k // 2, k // 2), the image
    wrapped around: torch's conv2d (a cross-correlation) with the flipped kernel on a circularly padded x."""
    radius = kernel.shape[-1] // 2
    planes = x.reshape(-1, 1, *x.shape[-2:])
    padded = F.pad(planes, (radius,) * 4, mode="circular")
    return F.conv2d(padded, kernel.flip(0, 1)[None, None]).reshape(x.shape)


def test_the_boundary_is_circular():
    """A equals conv2d on the circularly padded image (float64 FFT vs direct sums: rounding, measured 3e-16),
    and a point at the corner spreads onto the three other corners."""
    generator = torch.Generator().manual_seed(0)
    kernel = random_kernel(5, generator)
    x = torch.randn(2, 3, 9, 12, dtype=DOUBLE, generator=generator)
    torch.testing.assert_close(Blur(kernel).A(x), circular_conv2d(x, kernel), rtol=0, atol=1e-12)
    point = torch.zeros(1, 1, 9, 12, dtype=DOUBLE)
    point[..., 0, 0] = 1
    blurred = Blur(kernel).A(point)[0, 0]
    # the kernel itself, centred on the corner pixel and wrapped: entry (i, j) lands at (i - 2, j - 2) mod (9, 12)
    torch.testing.assert_close(blurred.roll((2, 2), (0, 1))[:5, :5], kernel, rtol=0, atol=1e-12)
    assert float(blurred[-1, -1]) > 0 and float(blurred[0, -1]) > 0 and float(blurred[-1, 0]) > 0


def test_the_matrix_is_circulant_and_keeps_constants():
    """Block-circulant with circulant blocks: each row is the one before shifted by one pixel, with wrap
    (the same numbers up to float64 FFT rounding: measured 8e-17)."""
    kernel = random_kernel(3, torch.Generator().manual_seed(1))
    matrix = Blur(kernel).to_matrix((1, 5, 6)).reshape(5, 6, 5, 6)  # (output pixel, input pixel)
    for row in range(5):
        for column in range(6):
            torch.testing.assert_close(matrix[row, column], matrix[0, 0].roll((row, column), (0, 1)), rtol=0, atol=1e-14)
    # a kernel that sums to 1 keeps a constant image: every row of A sums to 1
    torch.testing.assert_close(matrix.reshape(30, 30).sum(1), torch.ones(30, dtype=DOUBLE), rtol=0, atol=1e-14)


@pytest.mark.parametrize("sigma_y", [0.05, 0.0])
def test_the_fourier_solve_and_log_det_are_the_dense_ones(sigma_y):
    """float64 on 2 x 6 x 7 (84 unknowns): the closed form against torch.linalg.solve / logdet on the
    dense matrix, for a scalar r and one r per sample. Both are float64 rounding times the condition
    number, here <= 1000 (this kernel's |K|^2 spans 1000x): 1e-10 relative leaves 1e3 of room
    (measured 1e-14 for the solve, 7e-16 for the log det)."""
    generator = torch.Generator().manual_seed(2)
    operator = Blur(random_kernel(3, generator), sigma_y)
    x_shape = (2, 6, 7)
    matrix = operator.to_matrix(x_shape)
    u = operator.A(torch.randn(3, *x_shape, dtype=DOUBLE, generator=generator))
    r = torch.tensor([0.5, 1.0, 4.0], dtype=DOUBLE)
    for rs in (r, 0.7):
        solved, log_det = operator.solve(u, rs), operator.log_det(rs, u)
        assert solved.shape == u.shape and log_det.shape == (3,)
        for i in range(3):
            r_i = float(rs[i]) if isinstance(rs, torch.Tensor) else rs
            system = sigma_y**2 * torch.eye(84, dtype=DOUBLE) + r_i * matrix @ matrix.T
            dense = torch.linalg.solve(system, u[i].flatten())
            torch.testing.assert_close(solved[i].flatten(), dense, rtol=0, atol=1e-10 * float(dense.abs().max()))
            assert log_det[i].item() == pytest.approx(torch.logdet(system).item(), rel=1e-12)
    assert operator.has_closed_form_solve and operator.gram_diagonal(u) is None


def test_a_frequency_the_kernel_removes_gets_no_weight_without_noise():
    """A 3 x 3 box removes the frequency 1/3 in each direction: with sigma_y = 0 that component of u is
    unobservable and the solve gives 0 there (the pseudo-inverse), as the other operators' zero-variance
    entries do; the log det leaves it out. Float64 rounding."""
    operator = Blur(box_kernel(3, dtype=DOUBLE), 0.0)
    columns = torch.arange(6, dtype=DOUBLE)
    removed = torch.cos(2 * math.pi * columns / 3).expand(1, 1, 6, 6)  # period 3: the box sums it to 0
    assert float(operator.A(removed).abs().max()) < 1e-14
    kept = torch.ones(1, 1, 6, 6, dtype=DOUBLE)
    torch.testing.assert_close(operator.solve(removed + kept, 2.0), kept / 2, rtol=0, atol=1e-14)
    _, power = operator.spectrum((6, 6), DOUBLE, torch.device("cpu"))
    nonzero = power > 1e-20
    assert operator.log_det(2.0, kept).item() == pytest.approx(float((2 * power[nonzero]).log().sum()), rel=1e-12)


def test_float32_solves_follow_the_float64_ones():
    """Images run in float32: the solve is the float64 one to float32 rounding times the condition
    number, (sigma_y^2 + r) / sigma_y^2 <= 1 + 0.02 / 0.01^2 = 201: 2e-5 relative (measured 1.6e-7)."""
    generator = torch.Generator().manual_seed(3)
    kernel = gaussian_kernel(1.5, dtype=DOUBLE)
    u = torch.randn(2, 3, 16, 16, dtype=DOUBLE, generator=generator)
    exact = Blur(kernel, 0.01).solve(u, 0.02)
    single = Blur(kernel.float(), 0.01).solve(u.float(), 0.02)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=2e-5 * float(exact.abs().max()))


def test_to_deepinv_is_the_same_operator():
    """deepinv's BlurFFT (given the image size) and Blur(padding="circular") apply our A and A^T
    (float64: FFT and direct-sum rounding, measured 5e-16), and carry sigma_y."""
    deepinv = pytest.importorskip("deepinv")
    generator = torch.Generator().manual_seed(4)
    operator = Blur(random_kernel(5, generator), 0.03)
    x = torch.randn(2, 3, 11, 10, dtype=DOUBLE, generator=generator)
    for physics in (operator.to_deepinv((3, 11, 10)), operator.to_deepinv()):
        assert isinstance(physics, (deepinv.physics.BlurFFT, deepinv.physics.Blur))
        torch.testing.assert_close(physics.A(x), operator.A(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(physics.A_adjoint(x), operator.A_adjoint(x), rtol=0, atol=1e-12)
        assert float(physics.noise_model.sigma) == float(torch.tensor(0.03))  # deepinv keeps it in float32
    from operators import to_deepinv

    assert isinstance(to_deepinv(operator), deepinv.physics.Blur)  # the module's function gives the same mapping
    with pytest.raises(ValueError, match="smaller than the 5x5 blur kernel"):
        operator.to_deepinv((3, 4, 10))


@pytest.mark.parametrize("std", [0.8, 2.0, 3.5])
def test_gaussian_kernels_are_normalised_symmetric_and_have_their_std(std):
    kernel = gaussian_kernel(std, dtype=DOUBLE)
    assert kernel.shape == (2 * math.ceil(4 * std) + 1,) * 2
    assert float(kernel.sum()) == pytest.approx(1, abs=1e-14)  # float64 sum of <= 900 terms
    assert torch.equal(kernel, kernel.flip(0)) and torch.equal(kernel, kernel.T)
    offsets = torch.arange(kernel.shape[0], dtype=DOUBLE) - kernel.shape[0] // 2
    variance = float((kernel.sum(1) * offsets.square()).sum())  # along one axis
    # Both departures from std^2 lower the variance. Sampling at the integers: by Poisson summation the
    # discrete Gaussian's variance is std^2 (1 - 8 pi^2 std^2 exp(-2 pi^2 std^2)) to first order (1.7e-4 at
    # std 0.8). Cutting the tails at radius ceil(4 std) >= 4 std removes at most 2 (4 phi(4) + Q(4)) = 1.1e-3.
    aliasing = 8 * math.pi**2 * std**2 * math.exp(-2 * math.pi**2 * std**2)
    tails = 2 * (4 * math.exp(-8) / math.sqrt(2 * math.pi) + 3.17e-5)
    assert std**2 * (1 - 1.01 * aliasing - tails) <= variance <= std**2 * (1 + 1e-12)  # 1.01: the second order
    assert gaussian_kernel(std, size=5).shape == (5, 5) and gaussian_kernel(std).dtype == torch.float32


def test_box_and_motion_kernels():
    torch.testing.assert_close(box_kernel(3, dtype=DOUBLE), torch.full((3, 3), 1 / 9, dtype=DOUBLE), rtol=0, atol=0)
    pytest.importorskip("deepinv")
    kernel = motion_kernel(15, seed=3, dtype=DOUBLE)
    assert kernel.shape == (15, 15) and float(kernel.sum()) == pytest.approx(1, abs=1e-14)  # float64 sum
    assert bool((kernel >= 0).all()) and int((kernel > 0).sum()) > 3  # a path, not a point
    assert torch.equal(motion_kernel(15, seed=3, dtype=DOUBLE), kernel)  # same seed, same computation
    assert not torch.equal(motion_kernel(15, seed=4, dtype=DOUBLE), kernel)
    assert torch.equal(kernel_from_spec("motion:15:3", dtype=DOUBLE), kernel)


def test_kernel_specs():
    assert torch.equal(kernel_from_spec("gaussian:2"), gaussian_kernel(2.0))
    assert torch.equal(kernel_from_spec("box:5"), box_kernel(5))
    for spec, message in [("gauss:2", "kernel spec must be gaussian:STD"), ("box", "kernel spec must be"),
                          ("box:4", "odd integer"), ("box:x", "invalid literal"), ("gaussian:-1", "std must be"),
                          ("motion:15:1:2", "kernel spec must be")]:
        with pytest.raises(ValueError, match=message):
            kernel_from_spec(spec)


@pytest.mark.parametrize("make, message", [
    (lambda: Blur(torch.ones(3, 3)), "kernel must sum to 1"),
    (lambda: Blur(box_kernel(3) * 1.001), "kernel must sum to 1"),
    (lambda: Blur(torch.ones(9)), r"square \(k, k\) tensor with k odd"),
    (lambda: Blur(torch.ones(3, 5) / 15), r"square \(k, k\)"),
    (lambda: Blur(torch.ones(4, 4) / 16), "k odd"),
    (lambda: Blur(torch.tensor([[0.0, 0.5, 0.0], [0.5, 1.0, -0.5], [0.0, -0.5, 0.0]])), "non-negative"),
    (lambda: Blur(torch.tensor([[float("nan")]])), "non-finite"),
    (lambda: Blur(box_kernel(3), sigma_y=-1), "sigma_y"),
    (lambda: gaussian_kernel(0.0), "std must be"),
    (lambda: gaussian_kernel(1.0, size=4), "size must be an odd integer"),
    (lambda: box_kernel(0), "size must be an odd integer"),
    (lambda: motion_kernel(15, seed=1.5), "seed must be an integer"),
])
def test_bad_kernels_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_sum_tolerance_is_float32_rounding():
    """A kernel normalised in float32 passes (its sum is off by float32 rounding); an integer kernel becomes
    floating; one summing to 1 + 1e-3 does not."""
    raw = torch.rand(31, 31, generator=torch.Generator().manual_seed(5))
    assert Blur(raw / raw.sum()).kernel.dtype == torch.float32
    assert Blur(torch.ones(1, 1, dtype=torch.int64)).kernel.is_floating_point()
    with pytest.raises(ValueError, match="sum of 1.001"):
        Blur(raw / raw.sum() * 1.001)


def test_an_image_smaller_than_the_kernel_is_refused_before_any_work():
    """The operator refuses the shape when it first meets it: `restore` asks x_shape / y_shape in its
    checks, so the error comes before the model is called."""
    from conftest import CountingPrior
    from posterior_diff import restore

    operator = Blur(gaussian_kernel(2.0), 0.01)  # 17 x 17
    with pytest.raises(ValueError, match="smaller than the 17x17 blur kernel"):
        operator.A(torch.zeros(1, 3, 16, 32))
    with pytest.raises(ValueError, match="at least two"):
        operator.y_shape((5,))
    CountingPrior.calls = 0
    prior = CountingPrior(torch.zeros(1, 8, 8), torch.eye(64))
    with pytest.raises(ValueError, match=r"y of shape \(1, 8, 8\) does not fit operator: y has size 8x8, smaller than"):
        restore(torch.zeros(1, 8, 8), operator, prior, steps=3)
    assert CountingPrior.calls == 0


def test_sigma_y_copies_and_devices_share_the_kernel():
    operator = Blur(box_kernel(3), 0.1)
    noisier = operator.with_sigma_y(0.2)
    assert noisier.sigma_y == 0.2 and operator.sigma_y == 0.1 and noisier.kernel is operator.kernel
    assert operator.to(DOUBLE).kernel.dtype == DOUBLE
    assert "circular" in repr(operator) and isinstance(operator, LinearOperator)


def test_projection_guidance_with_blur_is_bayes_rule_on_a_white_prior():
    """covariance="projection" is exact for N(mu, I) (docs/theory.md §5): through the Fourier solve the guided
    mean is the exact E[x_0 | x_t, y] (closed forms in float64: rounding, measured 1e-15)."""
    from posterior_diff import GaussianPrior
    from posterior_diff.sampling.guidance import AveragedLikelihoodGuidance

    generator = torch.Generator().manual_seed(6)
    operator = Blur(gaussian_kernel(1.0, size=3, dtype=DOUBLE), 0.05)
    white = GaussianPrior(torch.full((1, 6, 6), 0.3, dtype=DOUBLE), torch.eye(36, dtype=DOUBLE))
    y = operator.measure(white.sample(1, generator), generator)
    x_t = torch.randn(3, 1, 6, 6, generator=generator, dtype=DOUBLE)
    guided = AveragedLikelihoodGuidance(white, operator, y, "projection")
    torch.testing.assert_close(guided(x_t, 0.6), white.posterior(operator, y[0])(x_t, 0.6), rtol=0, atol=1e-10)
    assert guided.vjp_count == 0


def test_restore_deblurs_a_gaussian_image_as_exactly_as_exact_samples():
    """restore on a deblurring problem with a smooth Gaussian prior on 8 x 8 images: 1000 samples, 100 steps,
    the Tweedie covariance (exact for Gaussian priors), solved by CG preconditioned with the Fourier solve.
    Mean and covariance errors against the closed-form posterior stay within what 1000 exact draws achieve
    (conftest.exactness_bounds: their floor with the 100-step allowance plus 4 standard deviations of their
    Monte Carlo spread, one seed): measured 0.038 and 0.14 against bounds of 0.057 and 0.20, where the
    isotropic covariance's mean error is 0.20."""
    from conftest import exactness_bounds
    from posterior_diff import GaussianPrior, restore
    from posterior_diff.evaluation.metrics import gaussian_errors
    from posterior_diff.evaluation.problems import squared_exponential_covariance

    generator = torch.Generator().manual_seed(7)
    covariance = squared_exponential_covariance(8, 2.0) + 1e-6 * torch.eye(64, dtype=DOUBLE)
    prior = GaussianPrior(torch.zeros(1, 8, 8, dtype=DOUBLE), covariance)
    operator = Blur(gaussian_kernel(1.0, size=3, dtype=DOUBLE), 0.05)
    y = operator.measure(prior.sample(1, generator), generator)[0]
    posterior = prior.posterior(operator, y)
    bounds = exactness_bounds(posterior, 1000, seeds=1)
    result = restore(y, operator, prior, num_samples=1000, steps=100, covariance="tweedie", start="prior",
                     generator=torch.Generator().manual_seed(8))
    errors = gaussian_errors(result.samples, posterior.mean, posterior.cov)
    for key in ("mean_error", "cov_error"):
        assert errors[key] <= bounds[key], (key, errors[key], bounds[key])
    # and the posterior moved: the prior mean (0) is many times further from the posterior mean
    assert gaussian_errors(prior.sample(1000, generator), posterior.mean, posterior.cov)["mean_error"] > 3 * bounds["mean_error"]
