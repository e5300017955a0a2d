import math

import pytest
import torch

from operators import Denoising, Inpainting, MatrixOperator, SuperResolution, box_mask
from posterior_diff import GaussianPrior, NonFiniteSampleError, restore
from posterior_diff.evaluation.metrics import exact_sample_floor, gaussian_errors
from posterior_diff.evaluation.problems import gaussian_image_problems
from posterior_diff.sampling.samplers import grid_points

from conftest import CountingPrior, exactness_bounds

DOUBLE = torch.float64


@pytest.fixture(scope="module")
def problems():
    return {problem.name: problem for problem in gaussian_image_problems()}


@pytest.mark.parametrize("task", ["inpainting", "super-resolution", "denoising"])
def test_posterior_samples_are_as_exact_as_exact_samples(problems, task):
    """The spec's study at full size: 2000 samples, 100 steps, default solver and eta,
    covariance="tweedie". Mean and covariance errors against the closed-form posterior,
    averaged over 2 seeds, are within what 2000 exact samples achieve (conftest.exactness_bounds:
    their floor with the 100-step allowance, plus their Monte Carlo spread)."""
    problem = problems[task]
    num_samples = 2000
    bounds = exactness_bounds(problem.posterior, num_samples, seeds=2)
    errors = {"mean_error": 0.0, "cov_error": 0.0}
    for seed in (11, 12):
        result = restore(problem.y, problem.operator, problem.prior, num_samples=num_samples, steps=100,
                         covariance="tweedie", generator=torch.Generator().manual_seed(seed), start="prior")
        measured = gaussian_errors(result.samples, problem.posterior.mean, problem.posterior.cov)
        for key in errors:
            errors[key] += measured[key] / 2
    for key in errors:
        assert errors[key] <= bounds[key], (key, errors[key], bounds[key])


@pytest.mark.parametrize("task", ["inpainting", "denoising"])
def test_warm_started_tweedie_is_as_exact_as_cold_for_far_fewer_products(problems, task):
    """The default stopping rule (warm start, relative 1e-3, a tenth of the noise's norm) keeps
    the exactness of a cold solve to 1e-4 (both within conftest.exactness_bounds) at under half its VJPs."""
    problem = problems[task]
    bounds = exactness_bounds(problem.posterior, 2000, seeds=1)
    runs = {}
    for name, rule in (("warm", {}), ("cold", dict(warm_start=False, cg_tol=1e-4, cg_noise_tol=0))):
        result = restore(problem.y, problem.operator, problem.prior, num_samples=2000, steps=100, covariance="tweedie",
                         generator=torch.Generator().manual_seed(13), start="prior", **rule)
        runs[name] = result.vjps, gaussian_errors(result.samples, problem.posterior.mean, problem.posterior.cov)
    assert runs["warm"][0] < 0.5 * runs["cold"][0]
    for key in ("mean_error", "cov_error"):
        assert runs["warm"][1][key] <= bounds[key] and runs["cold"][1][key] <= bounds[key], (key, runs, bounds)


def test_a_denoising_measurement_start_samples_the_exact_posterior_without_guidance(problems):
    """For A = I, y is the forward process at sigma / alpha = sigma_y: started there from alpha y,
    the unguided reverse SDE reproduces the closed-form posterior to the noise floor of exact
    samples (2 seeds of 2000 samples, 100 steps), with no VJP whatever the covariance asked for."""
    problem = problems["denoising"]
    bounds, floor = exactness_bounds(problem.posterior, 2000, seeds=2), exact_sample_floor(problem.posterior, 2000, 30)
    errors = {"mean_error": 0.0, "cov_error": 0.0}
    for seed in (1, 2):
        result = restore(problem.y, problem.operator, problem.prior, num_samples=2000, steps=100, covariance="tweedie",
                         generator=torch.Generator().manual_seed(seed))
        assert result.settings.start == "measurement" and result.settings.sampler.s_max == problem.operator.sigma_y
        assert result.vjps == 0 and result.nfe == 100  # the exact mean is the first step's forward: no extra NFE
        measured = gaussian_errors(result.samples, problem.posterior.mean, problem.posterior.cov)
        for key in errors:
            errors[key] += measured[key] / 2
    for key in errors:
        assert errors[key] <= bounds[key], (key, errors[key], bounds[key])
    # The same yardstick fails the probability-flow ODE from that one point: a deterministic map of y.
    ode = restore(problem.y, problem.operator, problem.prior, num_samples=200, steps=100, eta=0.0,
                  generator=torch.Generator().manual_seed(1))
    assert float(ode.std.max()) < 1e-6
    assert gaussian_errors(ode.samples, problem.posterior.mean, problem.posterior.cov)["cov_error"] > 5 * floor["cov_error"]


def test_a_measurement_start_returns_the_exact_posterior_mean(problems):
    """From y, restore's mean is Tweedie's D(alpha(t*) y, t*): for a Gaussian prior the closed-form
    posterior mean to float precision, where the mean of 4 samples is off by the posterior std / 2."""
    problem = problems["denoising"]
    result = restore(problem.y, problem.operator, problem.prior, num_samples=4, steps=10,
                     generator=torch.Generator().manual_seed(0))
    exact = problem.posterior.mean.reshape(result.mean.shape)
    error = (result.mean.to(DOUBLE) - exact).abs().max()
    sample_error = (result.samples.mean(0).to(DOUBLE) - exact).abs().max()
    assert error < 1e-4 and sample_error > 100 * error, (error, sample_error)
    assert result.nfe == 10  # the first step's forward, not one more


def test_start_auto_takes_the_measurement_only_where_it_applies(problems):
    started = {name: restore(p.y, p.operator, p.prior, steps=3).settings.start for name, p in problems.items()}
    assert started == {"inpainting": "prior", "super-resolution": "prior", "denoising": "measurement"}
    denoising = problems["denoising"]
    in_particle_mode = restore(denoising.y, denoising.operator, denoising.prior, steps=3, particles=4, covariance="tweedie")
    assert in_particle_mode.settings.start == "prior"
    too_noisy = restore(denoising.y, Denoising(1e3), denoising.prior, steps=3)  # beyond the schedule's noise levels
    assert too_noisy.settings.start == "prior"
    guided = restore(denoising.y, denoising.operator, denoising.prior, steps=3, covariance="isotropic", start="prior")
    assert guided.settings.start == "prior" and guided.vjps == 2  # the closing estimate takes no VJP


def test_jacobian_s_max_spends_vjps_only_on_the_steps_at_or_below_it(problems):
    """isotropic: one VJP per step whose noise ratio s is at most jacobian_s_max, none above it
    and none at the closing estimate; inf (the analytic priors' default) spends one on every step."""
    problem = problems["super-resolution"]
    points = grid_points(problem.prior.schedule, 12)
    ratios = [p.sigma / p.alpha for p in points[:-1]]
    for s_max in (0.05, 1.0, math.inf):
        result = restore(problem.y, problem.operator, problem.prior, steps=12, covariance="isotropic", jacobian_s_max=s_max)
        assert result.settings.guidance.jacobian_s_max == s_max
        assert result.vjps == sum(s <= s_max for s in ratios)
    assert 0 < sum(s <= 1.0 for s in ratios) < 11


@pytest.mark.parametrize("name, changes, message", [
    ("inpainting", dict(start="measurement"), "its operator is not the identity"),
    ("denoising", dict(start="measurement", particles=4, covariance="tweedie"), "particle mode"),
    ("denoising", dict(start="measurement", operator=Denoising(0.0)), "sigma_y is 0"),
    ("denoising", dict(start="measurement", operator=Denoising(1e3)), "above the model's largest noise level"),
    ("denoising", dict(start="y"), "start"),
])
def test_a_start_that_cannot_apply_is_a_clear_error(problems, name, changes, message):
    problem = problems[name]
    operator = changes.pop("operator", problem.operator)
    model = counting_copy(problem.prior)
    with pytest.raises(ValueError, match=message):
        restore(problem.y, operator, model, steps=3, **changes)
    assert CountingPrior.calls == 0


def test_the_exactness_study_can_fail(problems):
    """The same yardstick rejects a crude covariance: the isotropic approximation is biased here."""
    problem = problems["super-resolution"]
    bound = exactness_bounds(problem.posterior, 2000, seeds=1)["mean_error"]
    result = restore(problem.y, problem.operator, problem.prior, num_samples=2000, covariance="isotropic",
                     generator=torch.Generator().manual_seed(11))
    assert gaussian_errors(result.samples, problem.posterior.mean, problem.posterior.cov)["mean_error"] > 3 * bound


def test_result_shapes_and_bookkeeping(problems):
    problem = problems["inpainting"]
    result = restore(problem.y, problem.operator, problem.prior, num_samples=5, steps=10, batch_size=2,
                     generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (5, 1, 8, 8)
    assert result.mean.shape == result.std.shape == (1, 8, 8)
    assert torch.allclose(result.mean, result.samples.mean(0)) and bool((result.std > 0).all())  # the same float64 mean
    assert result.nfe == 3 * 10  # three sampler runs (batches of 2, 2, 1) of 10 evaluations
    assert result.vjps > result.nfe and result.seconds > 0
    single = restore(problem.y, problem.operator, problem.prior, steps=5)
    assert single.samples.shape == (1, 1, 8, 8) and bool((single.std == 0).all())


def test_reproducible_with_a_generator_and_numpy_measurements(problems):
    problem = problems["super-resolution"]
    first = restore(problem.y, problem.operator, problem.prior, num_samples=3, steps=8, generator=torch.Generator().manual_seed(4))
    again = restore(problem.y.numpy(), problem.operator, problem.prior, num_samples=3, steps=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.samples, again.samples)


def test_vector_problem_with_a_matrix_operator():
    generator = torch.Generator().manual_seed(0)
    prior = GaussianPrior(torch.zeros(6, dtype=DOUBLE), torch.eye(6, dtype=DOUBLE) + 0.5)
    operator = MatrixOperator(torch.randn(3, 6, generator=generator, dtype=DOUBLE), 0.1)
    y = operator.measure(prior.sample(1, generator), generator)[0]
    result = restore(y, operator, prior, num_samples=4000, steps=50, generator=generator)
    posterior = prior.posterior(operator, y)
    # Each coordinate of the mean of N exact draws is off by its posterior std / sqrt(N) (a standard
    # error); seeds 0-5 stay within 2.3 of them here. 5 standard errors leave room for 6 coordinates
    # and the 50 steps' discretisation; a wrong guidance moves the mean by tens of them.
    standard_errors = (torch.diagonal(posterior.cov) / 4000).sqrt()
    assert bool(((result.mean - posterior.mean).abs() <= 5 * standard_errors).all())


def test_the_callers_operator_is_left_untouched(problems):
    problem = problems["inpainting"]
    mask_before = problem.operator.mask.clone()
    restore(problem.y, problem.operator, problem.prior, steps=3)
    assert torch.equal(problem.operator.mask, mask_before) and problem.operator.mask.device.type == "cpu"


def counting_copy(prior: GaussianPrior) -> CountingPrior:
    CountingPrior.calls = 0
    return CountingPrior(prior.mean, prior.cov, prior.schedule)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(y=torch.zeros(16)), ValueError, "y of shape"),
        (dict(y=torch.zeros(1, 5, 4)), ValueError, "implies images of shape"),
        (dict(y=torch.full((1, 4, 4), float("nan"))), ValueError, "NaN or infinite"),
        (dict(y="image.png"), TypeError, "y must be"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(covariance="full"), ValueError, "covariance"),
        (dict(solver="rk45"), ValueError, "solver"),
        (dict(eta=-0.1), ValueError, "eta"),
        (dict(solver="heun", eta=1.0), ValueError, "eta=0"),
        (dict(solver="euler_maruyama", eta=2.0), ValueError, "euler_maruyama"),
        (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
        (dict(model="/nonexistent/model"), ValueError, "model must be"),
        (dict(model=torch.nn.Identity()), TypeError, "Denoiser"),
        (dict(operator="sr4"), TypeError, "operator"),
        (dict(operator=SuperResolution(4, 0.05)), ValueError, "implies images of shape"),
        (dict(generator=0), TypeError, "generator"),
    ],
)
def test_bad_input_is_a_clear_error_raised_before_any_work(problems, change, error, message):
    problem = problems["super-resolution"]
    arguments = dict(y=problem.y, operator=problem.operator, model=counting_copy(problem.prior))
    options = {k: v for k, v in change.items() if k not in arguments}
    arguments.update({k: v for k, v in change.items() if k in arguments})
    with pytest.raises(error, match=message):
        restore(arguments.pop("y"), arguments.pop("operator"), arguments.pop("model"), **options)
    assert CountingPrior.calls == 0


def test_the_result_reports_the_sigma_y_it_used(problems):
    problem = problems["super-resolution"]
    result = restore(problem.y, problem.operator, problem.prior, steps=2, covariance="isotropic")
    assert result.sigma_y == problem.operator.sigma_y and result.settings.sigma_y_estimate is None


def test_the_counting_model_does_count(problems):
    """The yardstick of the test above can fail: a valid call reaches the denoiser."""
    problem = problems["super-resolution"]
    restore(problem.y, problem.operator, counting_copy(problem.prior), steps=3, covariance="isotropic")
    assert CountingPrior.calls == 3


def test_wrong_mask_and_negative_sigma_y():
    prior = counting_copy(GaussianPrior(torch.zeros(1, 4, 4), torch.eye(16)))
    with pytest.raises(ValueError, match="mask has shape"):
        restore(torch.zeros(1, 4, 4), Inpainting(torch.ones(1, 4, 5), 0.1), prior)
    operator = Denoising(0.1)
    operator.sigma_y = -1.0  # set after construction, so that restore's own check is what raises
    with pytest.raises(ValueError, match="sigma_y"):
        restore(torch.zeros(1, 4, 4), operator, prior)
    assert CountingPrior.calls == 0
    with pytest.raises(ValueError, match="sigma_y"):
        Denoising(-1.0)


def test_a_diverging_run_raises_instead_of_returning_nan():
    """DPS-like guidance without covariance overshoots at small sigma_y; in float32 it
    overflows and the sampler stops with an error naming the step."""
    problem = gaussian_image_problems(dtype=torch.float32)[1]
    with pytest.raises(NonFiniteSampleError, match="step"):
        restore(problem.y, problem.operator, problem.prior, num_samples=4, covariance="zero", generator=torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_follows_the_device_argument(problems):
    problem = problems["denoising"]
    result = restore(problem.y, problem.operator, problem.prior, num_samples=8, steps=10, device="cuda",
                     generator=torch.Generator(device="cuda").manual_seed(0))
    assert result.samples.device.type == "cuda" and bool(torch.isfinite(result.samples).all())


def test_projection_samples_a_white_unit_prior_exactly_without_jacobian_products():
    """The Jacobian-free mode reproduces the closed-form posterior of N(mu, I) to the noise floor of
    exact samples (2 seeds of 2000 samples, 100 steps), and spends no VJP."""
    generator = torch.Generator().manual_seed(0)
    prior = GaussianPrior(torch.full((1, 8, 8), 0.3, dtype=DOUBLE), torch.eye(64, dtype=DOUBLE))
    operator = SuperResolution(2, 0.1)
    y = operator.measure(prior.sample(1, generator), generator)[0]
    posterior = prior.posterior(operator, y)
    bounds = exactness_bounds(posterior, 2000, seeds=2)
    errors = {"mean_error": 0.0, "cov_error": 0.0}
    for seed in (1, 2):
        result = restore(y, operator, prior, num_samples=2000, steps=100, covariance="projection",
                         generator=torch.Generator().manual_seed(seed))
        assert result.vjps == 0
        measured = gaussian_errors(result.samples, posterior.mean, posterior.cov)
        for key in errors:
            errors[key] += measured[key] / 2
    for key in errors:
        assert errors[key] <= bounds[key], (key, errors[key], bounds[key])


def test_a_batched_image_measurement_points_to_restore_batch(pipeline_folder):
    """(1, C, h, w) is a batch: refused by name before sampling, not a conv2d error deep in torch."""
    with pytest.raises(ValueError, match=r"y has shape \(1, 3, 4, 4\), a batch.*restore_batch takes several"):
        restore(torch.rand(1, 3, 4, 4), SuperResolution(2, 0.05), str(pipeline_folder), steps=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_this_machine_lacks_is_refused_before_any_work(problems):
    problem = problems["denoising"]
    prior = CountingPrior(problem.prior.mean, problem.prior.cov)
    CountingPrior.calls = 0
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=r"this machine has 0 CUDA device\(s\): use device='cpu'"):
            restore(problem.y, problem.operator, prior, steps=3, device=device)
    with pytest.raises(ValueError, match="device must be a torch device"):
        restore(problem.y, problem.operator, prior, steps=3, device="gpu")
    assert CountingPrior.calls == 0


@pytest.mark.parametrize("options, expected", [
    (dict(), "image default"),
    (dict(eta=0.5), 0.5),  # the caller's, as given
    (dict(operator=Denoising(0.1)), 1.0),  # from the measurement: only the reverse SDE is exact there
    (dict(particles=2), 1.0),  # particle mode: the eta its weights were measured with
    (dict(solver="heun"), 0.0),  # the ODE
    (dict(solver="euler_maruyama"), "at most 1"),
    (dict(operator=Inpainting(box_mask((3, 24, 24), 4, 4, 16, 16), 0.01)), "large holes"),  # 8 pixels deep
    (dict(operator=Inpainting(box_mask((3, 24, 24), 4, 4, 8, 8), 0.01)), "image default"),  # 4: a small gap
])
def test_eta_left_to_the_defaults_follows_the_model_the_start_the_holes_and_the_solver(pipeline_folder, options,
                                                                                         expected):
    from posterior_diff.defaults import IMAGE_DEFAULTS

    operator = options.pop("operator", SuperResolution(2, 0.05))
    shape = {Denoising: (3, 8, 8), Inpainting: (3, 24, 24)}.get(type(operator), (3, 4, 4))
    result = restore(torch.rand(shape), operator, str(pipeline_folder), num_samples=2, steps=3,
                     generator=torch.Generator().manual_seed(0), **options)
    expected = {"image default": IMAGE_DEFAULTS.eta, "at most 1": min(IMAGE_DEFAULTS.eta, 1.0),
                "large holes": IMAGE_DEFAULTS.large_hole_eta}.get(expected, expected)
    assert result.settings.sampler.eta == expected


def test_analytic_priors_keep_the_reverse_sde(problems):
    problem = problems["super-resolution"]
    result = restore(problem.y, problem.operator, problem.prior, num_samples=2, steps=5,
                     generator=torch.Generator().manual_seed(0))
    assert result.settings.sampler.eta == 1.0
