import pytest
import torch
from torch.func import jacrev, vmap

from operators import SuperResolution
from posterior_diff import GaussianMixturePrior, GaussianPrior, SubVPSchedule, VESchedule, VPSchedule
from posterior_diff.evaluation.metrics import sample_moments

DOUBLE = torch.float64


def random_cov(d, generator, jitter=0.1):
    root = torch.randn(d, d, generator=generator, dtype=DOUBLE)
    return root @ root.T / d + jitter * torch.eye(d, dtype=DOUBLE)


@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(), SubVPSchedule()], ids=["vp", "ve", "subvp"])
def test_gaussian_denoiser_and_tweedie_covariance_are_exact(schedule, generator):
    d = 5
    cov = random_cov(d, generator)
    mean = torch.randn(d, generator=generator, dtype=DOUBLE)
    prior = GaussianPrior(mean, cov, schedule)
    t = torch.tensor(0.4, dtype=DOUBLE)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x = torch.randn(3, d, generator=generator, dtype=DOUBLE)
    marginal = alpha**2 * cov + sigma**2 * torch.eye(d, dtype=DOUBLE)
    expected = mean + (alpha * cov @ torch.linalg.solve(marginal, (x - alpha * mean).T)).T
    # float64, d = 5, well-conditioned (jitter 0.1): rounding, measured 3e-15 here and below
    assert torch.allclose(prior(x, t), expected, atol=1e-10)
    # Second-order Tweedie: (sigma^2 / alpha) dD/dx = Cov[x_0 | x_t].
    jacobian = vmap(jacrev(lambda xi: prior(xi[None], t)[0]))(x)
    posterior_cov = cov - alpha**2 * cov @ torch.linalg.solve(marginal, cov)
    assert torch.allclose(sigma**2 / alpha * jacobian[0], posterior_cov, atol=1e-10)


def test_mixture_denoiser_is_tweedie_of_the_exact_marginal(generator):
    """D(x) = (x + sigma^2 grad log p_t(x)) / alpha with p_t the noised mixture density."""
    K, d = 3, 2
    means = 2 * torch.randn(K, d, generator=generator, dtype=DOUBLE)
    covs = torch.stack([random_cov(d, generator) for _ in range(K)])
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=DOUBLE)
    prior = GaussianMixturePrior(weights, means, covs)
    t = torch.tensor(0.3, dtype=DOUBLE)
    alpha, sigma = prior.schedule.alpha(t), prior.schedule.sigma(t)
    components = torch.distributions.MultivariateNormal(alpha * means, alpha**2 * covs + sigma**2 * torch.eye(d, dtype=DOUBLE))

    def log_density(x):
        return torch.logsumexp(components.log_prob(x[:, None, :]) + weights.log(), dim=1).sum()

    x = torch.randn(7, d, generator=generator, dtype=DOUBLE).requires_grad_(True)
    (score,) = torch.autograd.grad(log_density(x), x)
    assert torch.allclose(prior(x.detach(), t), (x.detach() + sigma**2 * score) / alpha, atol=1e-10)  # float64: 1e-15


def test_one_component_mixture_equals_the_gaussian(generator):
    cov = random_cov(4, generator)
    mean = torch.randn(1, 2, 2, generator=generator, dtype=DOUBLE)
    gaussian = GaussianPrior(mean, cov)
    mixture = GaussianMixturePrior(torch.ones(1), mean[None], cov[None])
    x = torch.randn(3, 1, 2, 2, generator=generator, dtype=DOUBLE)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=DOUBLE)
    assert torch.allclose(mixture(x, t), gaussian(x, t), atol=1e-10)  # float64 rounding


def test_prior_samples_have_the_prior_moments(generator):
    cov = random_cov(3, generator)
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0, 1], [1.0, 1, 0]], dtype=DOUBLE), torch.stack([cov, 2 * cov]))
    draws = prior.sample(40000, generator)
    mean, _ = sample_moments(draws)
    # Monte Carlo: 40000 draws of sd <= 2.2, standard error <= 0.011; over 31 seeds 0.017 at worst
    assert torch.allclose(mean, 0.3 * prior.means[0] + 0.7 * prior.means[1], atol=0.05)
    assert draws.shape == (40000, 3)
    # E||x||^2 in closed form, with weights given unnormalised (x10) to check they are normalised
    unnormalised = GaussianMixturePrior(10 * prior.weights, prior.means, prior.covs)
    # Monte Carlo: relative standard error 0.003 (31 seeds: 0.005 at worst)
    assert unnormalised.mean_square_norm() == pytest.approx(float((draws**2).sum(1).mean()), rel=0.02)
    single = GaussianPrior(prior.means[1], 2 * cov)
    # the closed form itself, in float64
    assert single.mean_square_norm() == pytest.approx(float(prior.means[1] @ prior.means[1] + 2 * cov.trace()), rel=1e-12)


def test_gaussian_posterior_is_bayes_rule(generator):
    cov = random_cov(16, generator)
    prior = GaussianPrior(torch.zeros(1, 4, 4, dtype=DOUBLE), cov)
    operator = SuperResolution(2, 0.1)
    y = torch.randn(1, 2, 2, generator=generator, dtype=DOUBLE)
    posterior = prior.posterior(operator, y)
    A = operator.to_matrix((1, 4, 4))
    precision = torch.linalg.inv(cov) + A.T @ A / 0.01  # float64, d = 16, condition ~90: rounding, measured 8e-15
    assert torch.allclose(posterior.cov, torch.linalg.inv(precision), atol=1e-9)
    assert torch.allclose(posterior.mean.flatten(), torch.linalg.solve(precision, A.T @ y.flatten() / 0.01), atol=1e-9)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GaussianPrior(torch.zeros(3), torch.eye(2)), "cov must have shape"),
        (lambda: GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 2.0], [0.0, 1.0]])), "symmetric"),
        (lambda: GaussianPrior(torch.zeros(2), -torch.eye(2)), "positive semi-definite"),
        (lambda: GaussianPrior(torch.zeros(2), torch.full((2, 2), float("nan"))), "non-finite"),
        (lambda: GaussianMixturePrior(torch.ones(2), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2)), "means must have shape"),
        (lambda: GaussianMixturePrior(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2)), "non-negative"),
    ],
)
def test_bad_priors_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mixture_posterior_is_prior_times_likelihood():
    from operators import MatrixOperator

    covs = torch.stack([torch.tensor([[1.0, 0.3], [0.3, 0.5]]), 0.7 * torch.eye(2), torch.tensor([[0.4, -0.1], [-0.1, 2.0]])]).double()
    prior = GaussianMixturePrior(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([[-2.0, 1.0], [3.0, 0.0], [0.0, -3.0]], dtype=DOUBLE), covs)
    operator = MatrixOperator(torch.tensor([[1.0, 0.5]], dtype=DOUBLE), sigma_y=0.4)
    y = torch.tensor([0.7], dtype=DOUBLE)
    posterior = prior.posterior(operator, y)
    x = 3 * torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=DOUBLE)
    log_likelihood = -0.5 * ((operator.A(x) - y) ** 2).sum(-1) / operator.sigma_y**2
    difference = posterior.log_prob(x) - prior.log_prob(x) - log_likelihood
    assert float(difference.max() - difference.min()) < 1e-9  # equal up to the evidence; float64 on terms up to 330: 2e-13
    # and it integrates to one: the normalising constant is the evidence p(y)
    grid = torch.stack(torch.meshgrid(torch.linspace(-12, 12, 601, dtype=DOUBLE), torch.linspace(-12, 12, 601, dtype=DOUBLE), indexing="ij"), -1)
    mass = posterior.log_prob(grid.reshape(-1, 2)).exp().sum() * (24 / 600) ** 2
    # a Riemann sum of a smooth density (component sd >= 0.3, 25 points per sd) is spectrally
    # accurate and the tails beyond +-12 are > 8 sd out: only rounding is left, measured 7e-16
    assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_the_mcgdiff_mixture_problem_has_its_published_structure():
    from posterior_diff.evaluation.problems import mixture_problem

    problem = mixture_problem(8, 2, seed=3)
    # the 2-D grid of means repeated along the dimensions: copies, exact
    assert problem.prior.means.shape == (25, 8) and torch.equal(problem.prior.means[:, :2], problem.prior.means[:, 2:4])
    assert set(problem.prior.means[:, 0].tolist()) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    singular = torch.linalg.svdvals(problem.operator.matrix)
    assert bool((singular > 0).all() and (singular < 1).all()) and 0 < problem.operator.sigma_y <= float(singular.max())
    assert problem.y.shape == (2,) and problem.posterior.weights.shape == (25,)
    with pytest.raises(ValueError, match="even dimension"):
        mixture_problem(7, 2)


def reference_mixture_denoiser(prior: GaussianMixturePrior, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x_t] of a mixture from its definition: the components' exact Gaussian denoisers
    weighted by pi_k N(x_t; alpha mu_k, alpha^2 S_k + sigma^2 I), one sample at a time."""
    rows = []
    for x_i, t_i in zip(x, t):
        alpha, sigma = prior.schedule.alpha(t_i), prior.schedule.sigma(t_i)
        log_weights, estimates = [], []
        for weight, mean, cov in zip(prior.weights, prior.means, prior.covs):
            marginal = torch.distributions.MultivariateNormal(alpha * mean, alpha**2 * cov + sigma**2 * torch.eye(len(mean), dtype=DOUBLE))
            log_weights.append(weight.log() + marginal.log_prob(x_i))
            estimates.append(GaussianPrior(mean, cov, prior.schedule)(x_i[None], t_i[None])[0])
        rows.append((torch.softmax(torch.stack(log_weights), 0)[:, None] * torch.stack(estimates)).sum(0))
    return torch.stack(rows)


def test_isotropic_mixtures_take_the_fast_path_with_the_same_answer():
    means = 4 * torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=DOUBLE)
    covs = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3], dtype=DOUBLE)[:, None, None] * torch.eye(6, dtype=DOUBLE)
    fast = GaussianMixturePrior(torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=DOUBLE), means, covs)
    general = GaussianMixturePrior(torch.ones(1, dtype=DOUBLE), means[:1], (covs[0] + 0.1 * torch.diag(torch.arange(6.0, dtype=DOUBLE)))[None])
    assert fast.isotropic and not general.isotropic
    x = 5 * torch.randn(7, 6, generator=torch.Generator().manual_seed(3), dtype=DOUBLE)
    t = torch.linspace(0.05, 0.95, 7, dtype=DOUBLE)
    # Both paths against the mixture's definition, so neither is checked only against the other
    # (float64, d = 6: rounding, measured 4e-14).
    assert torch.allclose(fast(x, t), reference_mixture_denoiser(fast, x, t), atol=1e-10)
    assert torch.allclose(general(x, t), reference_mixture_denoiser(general, x, t), atol=1e-10)
