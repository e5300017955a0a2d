import pytest
import torch

from operators import Denoising, Inpainting, MatrixOperator, SuperResolution, random_mask
from posterior_diff import AveragedLikelihoodGuidance, GaussianPrior, VESchedule, VPSchedule
from posterior_diff.evaluation.problems import squared_exponential_covariance
from posterior_diff.sampling.samplers import grid_points

from conftest import CountingPrior

DOUBLE = torch.float64


def smooth_prior(schedule=None):
    cov = squared_exponential_covariance(6, 1.5) + 1e-4 * torch.eye(36, dtype=DOUBLE)
    return GaussianPrior(torch.full((1, 6, 6), 0.2, dtype=DOUBLE), cov, schedule)


OPERATORS = {
    "inpainting": Inpainting(random_mask((1, 6, 6), 0.5, generator=torch.Generator().manual_seed(0)).to(DOUBLE), 0.1),
    "sr-average": SuperResolution(2, 0.05),
    "sr-bicubic": SuperResolution(2, 0.05, "bicubic"),
    "denoising": Denoising(0.5),
}


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()], ids=["vp", "ve"])
def test_tweedie_guidance_is_the_exact_posterior_denoiser(name, t, schedule, generator):
    """On a Gaussian prior, D + (sigma^2/alpha) grad log l = E[x_0 | x_t, y], the posterior's own denoiser."""
    prior = smooth_prior(schedule)
    operator = OPERATORS[name]
    x_true = prior.sample(1, generator)
    y = operator.measure(x_true, generator)
    guided = AveragedLikelihoodGuidance(prior, operator, y.expand(4, *y.shape[1:]), "tweedie", cg_tol=1e-10, cg_noise_tol=0, cg_max_iter=200)
    x_t = torch.randn(4, 1, 6, 6, generator=generator, dtype=DOUBLE) * 2
    exact = prior.posterior(operator, y[0])
    assert torch.allclose(guided(x_t, t), exact(x_t, t), atol=1e-6)  # float64, CG to 1e-10: rounding of the 36x36 algebra


WHITE_PRIOR_OPERATORS = {
    "denoising": lambda: Denoising(0.3),
    "sr-average": lambda: SuperResolution(2, 0.3),
    "inpainting": lambda: Inpainting(random_mask((1, 4, 4), 0.5, generator=torch.Generator().manual_seed(3)).to(DOUBLE), 0.3),
}


@pytest.mark.parametrize("operator_name", list(WHITE_PRIOR_OPERATORS))
@pytest.mark.parametrize("covariance", ["isotropic", "diagonal", "tweedie", "projection"])
def test_isotropic_and_diagonal_are_exact_for_a_white_unit_prior(covariance, operator_name, generator):
    """With Sigma = I under VP, Cov[x_0 | x_t] = r_t^2 I, so all four choices coincide with Bayes; the
    diagonal one (row sums of A V_t A^T) too, wherever A A^T is diagonal, as for these three operators.
    Float64 on 16 pixels, CG to 1e-12: agreement to rounding, far under 1e-9."""
    prior = GaussianPrior(torch.zeros(1, 4, 4, dtype=DOUBLE), torch.eye(16, dtype=DOUBLE))
    operator = WHITE_PRIOR_OPERATORS[operator_name]()
    y = operator.measure(prior.sample(1, generator), generator)
    guided = AveragedLikelihoodGuidance(prior, operator, y, covariance, cg_tol=1e-12, cg_noise_tol=0)
    x_t = torch.randn(1, 1, 4, 4, generator=generator, dtype=DOUBLE)
    assert torch.allclose(guided(x_t, 0.4), prior.posterior(operator, y[0])(x_t, 0.4), atol=1e-9)


def test_zero_covariance_is_the_plain_residual_gradient(generator):
    prior = smooth_prior()
    operator = SuperResolution(2, 0.2)
    y = operator.measure(prior.sample(1, generator), generator)
    x_t = torch.randn(1, 1, 6, 6, generator=generator, dtype=DOUBLE).requires_grad_(True)
    t = torch.tensor([0.3], dtype=DOUBLE)
    log_likelihood = -((y - operator.A(prior(x_t, t))) ** 2).sum() / (2 * 0.2**2)
    (grad,) = torch.autograd.grad(log_likelihood, x_t)
    alpha, sigma = prior.schedule.alpha(t), prior.schedule.sigma(t)
    expected = prior(x_t.detach(), t) + sigma**2 / alpha * grad
    guided = AveragedLikelihoodGuidance(prior, operator, y, "zero")
    assert torch.allclose(guided(x_t.detach(), t), expected, atol=1e-10)  # the same float64 gradient, taken two ways


def test_each_sample_is_guided_by_its_own_measurement(generator):
    prior = smooth_prior()
    operator = Inpainting(random_mask((1, 6, 6), 0.3, generator=generator).to(DOUBLE), 0.1)
    y = operator.measure(prior.sample(3, generator), generator)
    x_t = torch.randn(3, 1, 6, 6, generator=generator, dtype=DOUBLE)
    for covariance in ["zero", "isotropic", "diagonal", "tweedie"]:
        batched = AveragedLikelihoodGuidance(prior, operator, y, covariance, cg_tol=1e-10, cg_noise_tol=0)(x_t, 0.6)
        for i in range(3):
            single = AveragedLikelihoodGuidance(prior, operator, y[i : i + 1], covariance, cg_tol=1e-10, cg_noise_tol=0)(x_t[i : i + 1], 0.6)
            assert torch.allclose(batched[i : i + 1], single, atol=1e-8), covariance  # float64, CG to 1e-10


def test_guidance_scale_interpolates_between_prior_and_posterior(generator):
    prior = smooth_prior()
    operator = Denoising(0.3)
    y = operator.measure(prior.sample(1, generator), generator)
    x_t = torch.randn(1, 1, 6, 6, generator=generator, dtype=DOUBLE)
    unguided = AveragedLikelihoodGuidance(prior, operator, y, guidance_scale=0.0)(x_t, 0.5)
    full = AveragedLikelihoodGuidance(prior, operator, y, guidance_scale=1.0, cg_tol=1e-12, cg_noise_tol=0)(x_t, 0.5)
    double = AveragedLikelihoodGuidance(prior, operator, y, guidance_scale=2.0, cg_tol=1e-12, cg_noise_tol=0)(x_t, 0.5)
    assert torch.allclose(unguided, prior(x_t, 0.5))
    assert torch.allclose(double - full, full - unguided, atol=1e-9)  # linear in the scale; CG to 1e-12 in float64


def test_one_network_forward_per_call_whatever_the_cg_iterations(generator):
    cov = squared_exponential_covariance(8, 1.0) + 1e-3 * torch.eye(64, dtype=DOUBLE)
    prior = CountingPrior(torch.zeros(1, 8, 8, dtype=DOUBLE), cov)
    operator = SuperResolution(2, 0.05, "bicubic")
    y = operator.measure(prior.sample(2, generator), generator)
    guided = AveragedLikelihoodGuidance(prior, operator, y, "tweedie", cg_tol=1e-8, cg_noise_tol=0)
    CountingPrior.calls = 0
    guided(torch.randn(2, 1, 8, 8, generator=generator, dtype=DOUBLE), 0.7)
    assert CountingPrior.calls == 1 and guided.forward_count == 1
    assert guided.cg_iterations[0] > 3  # a real iterative solve, not a fixed handful
    # The gradient J^T A^T C^{-1} r is accumulated from the CG products: no VJP beyond them.
    assert guided.vjp_count == guided.cg_iterations[0]
    # each solve's per-sample relative residual is kept, and it met the tolerance asked for
    assert guided.cg_residuals[0].shape == (2,) and bool((guided.cg_residuals[0] <= 1e-8).all())


def test_cg_iterations_adapt_to_the_tolerance(generator):
    prior = smooth_prior()
    operator = MatrixOperator(torch.randn(10, 36, generator=generator, dtype=DOUBLE), 0.05)
    y = operator.measure(prior.sample(1, generator).flatten(1), generator)
    flat_prior = GaussianPrior(prior.mean.flatten(), prior.cov)
    x_t = torch.randn(1, 36, generator=generator, dtype=DOUBLE)
    loose = AveragedLikelihoodGuidance(flat_prior, operator, y, cg_tol=1e-2, cg_max_iter=100)
    tight = AveragedLikelihoodGuidance(flat_prior, operator, y, cg_tol=1e-10, cg_noise_tol=0, cg_max_iter=100)
    loose(x_t, 0.9), tight(x_t, 0.9)
    assert loose.cg_iterations[0] < tight.cg_iterations[0] <= 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(covariance="full"), "covariance must be one of"),
        (dict(covariance="zero", operator=Denoising(0.0)), "sigma_y > 0"),
        (dict(cg_tol=0.0), "cg_tol"),
        (dict(cg_noise_tol=-0.1), "cg_noise_tol"),
        (dict(jacobian_s_max=0.0), "jacobian_s_max"),
        (dict(jacobian_s_max=float("nan")), "jacobian_s_max"),
    ],
)
def test_bad_guidance_settings_are_clear_errors(kwargs, message):
    operator = kwargs.pop("operator", Denoising(0.1))
    with pytest.raises(ValueError, match=message):
        AveragedLikelihoodGuidance(smooth_prior(), operator, torch.zeros(1, 1, 6, 6, dtype=DOUBLE), **kwargs)


def test_a_warm_start_spends_fewer_products_on_the_next_steps_for_as_good_an_answer(generator):
    """Three nearby times on one batch, solved to a relative 1e-3: the solves after the first
    start from the previous one and need fewer CG products than cold ones, to the same accuracy."""
    cov = squared_exponential_covariance(8, 1.0) + 1e-3 * torch.eye(64, dtype=DOUBLE)
    prior = GaussianPrior(torch.zeros(1, 8, 8, dtype=DOUBLE), cov)
    operator = SuperResolution(2, 0.05)
    y = operator.measure(prior.sample(1, generator), generator)
    x_t = torch.randn(1, 1, 8, 8, generator=generator, dtype=DOUBLE)
    exact = prior.posterior(operator, y[0])
    runs = {}
    for warm in (True, False):
        guided = AveragedLikelihoodGuidance(prior, operator, y, "tweedie", cg_tol=1e-3, cg_noise_tol=0, warm_start=warm)
        for t in (0.50, 0.49, 0.48):
            assert (guided(x_t, t) - exact(x_t, t)).abs().max() < 5e-3
        runs[warm] = guided.cg_iterations
    assert runs[True][0] == runs[False][0]
    assert all(warm < cold for warm, cold in zip(runs[True][1:], runs[False][1:])), runs
    with pytest.raises(TypeError, match="warm_start"):
        AveragedLikelihoodGuidance(prior, operator, y, warm_start="yes")


def posterior_covariance_at(prior, t: float) -> torch.Tensor:
    """Cov(x_0 | x_t) of a Gaussian prior: Sigma - alpha^2 Sigma (alpha^2 Sigma + sigma^2 I)^-1 Sigma."""
    time = torch.tensor(t, dtype=DOUBLE)
    alpha, sigma = float(prior.schedule.alpha(time)), float(prior.schedule.sigma(time))
    cov = prior.cov
    eye = torch.eye(cov.shape[0], dtype=DOUBLE)
    return cov - alpha**2 * cov @ torch.linalg.solve(alpha**2 * cov + sigma**2 * eye, cov)


def test_the_twist_is_the_exact_log_likelihood_on_a_gaussian_prior(generator):
    prior, operator = smooth_prior(), SuperResolution(2, 0.05)
    y = operator.measure(prior.sample(1, generator), generator)
    x_t = torch.randn(1, 1, 6, 6, generator=generator, dtype=DOUBLE)
    result = AveragedLikelihoodGuidance(prior, operator, y, "tweedie", cg_tol=1e-12, cg_noise_tol=0).guide(x_t, 0.5, likelihood=True)
    matrix = operator.to_matrix((1, 6, 6))
    covariance = matrix @ posterior_covariance_at(prior, 0.5) @ matrix.T + 0.05**2 * torch.eye(9, dtype=DOUBLE)
    exact = torch.distributions.MultivariateNormal(matrix @ result.denoised.flatten(), covariance)
    # float64, CG to 1e-12; the log det comes from an eigendecomposition of the 9x9 covariance
    assert result.normalised and torch.allclose(result.log_likelihood, exact.log_prob(y.flatten()), atol=1e-6)


def test_the_diagonal_twist_reuses_the_diagonal_of_the_solve(generator):
    prior, operator = smooth_prior(), SuperResolution(2, 0.05)
    y = operator.measure(prior.sample(1, generator), generator)
    guided = AveragedLikelihoodGuidance(prior, operator, y, "diagonal")
    x_t = torch.randn(1, 1, 6, 6, generator=generator, dtype=DOUBLE)
    result = guided.guide(x_t, 0.5, likelihood=True)
    assert guided.vjp_count == 2  # row sums + the gradient: the log det costs no third one
    matrix = operator.to_matrix((1, 6, 6))
    # TMPD's diagonal: row sums of A V_t A^T, V_t the exact Cov(x_0 | x_t) of a Gaussian prior
    variance = 0.05**2 + (matrix @ posterior_covariance_at(prior, 0.5) @ matrix.T).sum(1)
    exact = torch.distributions.Normal(matrix @ result.denoised.flatten(), variance.sqrt())
    assert torch.allclose(result.log_likelihood, exact.log_prob(y.flatten()).sum(), atol=1e-8)  # float64, no solver


def test_projection_is_jacobian_free_and_exact_only_where_its_covariance_is():
    """covariance="projection" costs one forward and no VJP; on a white unit prior it is Bayes'
    rule, on a smooth prior (whose Cov[x_0 | x_t] is not r_t^2 I) it is not."""
    generator = torch.Generator().manual_seed(3)
    operator = SuperResolution(2, 0.1)
    x_t = torch.randn(3, 1, 6, 6, generator=generator, dtype=DOUBLE)
    white = GaussianPrior(torch.full((1, 6, 6), 0.3, dtype=DOUBLE), torch.eye(36, dtype=DOUBLE))
    y = operator.measure(white.sample(1, generator), generator)
    guided = AveragedLikelihoodGuidance(white, operator, y, "projection")
    assert torch.allclose(guided(x_t, 0.6), white.posterior(operator, y[0])(x_t, 0.6), atol=1e-10)  # closed forms, float64
    assert guided.vjp_count == 0 and guided.forward_count == 1
    smooth = smooth_prior()
    off = AveragedLikelihoodGuidance(smooth, operator, y, "projection")(x_t, 0.6)
    assert (off - smooth.posterior(operator, y[0])(x_t, 0.6)).abs().max() > 1e-2


@pytest.mark.parametrize("covariance", ["zero", "isotropic", "diagonal", "tweedie"])
def test_the_final_estimate_spends_no_vjp_and_keeps_bayes_at_t_min(covariance, generator):
    """The sampler's closing x_0 is guided Jacobian-free: one forward, no VJP, and at the grid's
    t_min (s = 2e-3) within 1 % of the exact correction E[x_0 | x_t, y] - D of a smooth prior."""
    prior = smooth_prior()
    operator = Inpainting(random_mask((1, 6, 6), 0.5, generator=torch.Generator().manual_seed(0)).to(DOUBLE), 0.01)
    y = operator.measure(prior.sample(1, generator), generator)
    t = grid_points(prior.schedule, 10)[-1].t
    alpha, sigma = prior.schedule.alpha(torch.tensor(t)), prior.schedule.sigma(torch.tensor(t))
    x_t = alpha * prior.sample(4, generator) + sigma * torch.randn(4, 1, 6, 6, generator=generator, dtype=DOUBLE)
    guided = AveragedLikelihoodGuidance(prior, operator, y, covariance)
    final = guided.final_estimate(x_t, t)
    assert guided.vjp_count == 0 and guided.forward_count == 1
    exact, unguided = prior.posterior(operator, y[0])(x_t, t), prior(x_t, t)
    assert (final - exact).abs().max() < 0.01 * (exact - unguided).abs().max()


@pytest.mark.parametrize("covariance", ["zero", "isotropic", "diagonal", "tweedie"])
def test_above_jacobian_s_max_every_covariance_takes_the_projection_step(covariance, generator):
    """Above s = sigma / alpha = jacobian_s_max the guided mean is the projection's, with no VJP;
    at or below it the covariance's own (VJPs on the network's Jacobian)."""
    prior, operator = smooth_prior(), SuperResolution(2, 0.1)
    y = operator.measure(prior.sample(1, generator), generator)
    x_t = torch.randn(2, 1, 6, 6, generator=generator, dtype=DOUBLE)
    points = grid_points(prior.schedule, 10)
    high, low = points[2], points[-3]  # s about 20 and 0.02
    switched = AveragedLikelihoodGuidance(prior, operator, y, covariance, jacobian_s_max=1.0)
    projection = AveragedLikelihoodGuidance(prior, operator, y, "projection")
    assert torch.equal(switched.at_time(x_t, high.t), projection.at_time(x_t, high.t))  # the same code path
    assert switched.vjp_count == 0
    network = AveragedLikelihoodGuidance(prior, operator, y, covariance)
    assert torch.allclose(switched.at_time(x_t, low.t), network.at_time(x_t, low.t), atol=1e-12)  # the same solve, float64
    assert switched.vjp_count == network.vjp_count > 0
