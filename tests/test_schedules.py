import math

import pytest
import torch

from posterior_diff import DiscreteSchedule, RectifiedFlow, SubVPSchedule, VESchedule, VPSchedule

DOUBLE = torch.float64
# diffusers' default DDPM betas: linear from 1e-4 to 0.02 over 1000 steps.
DDPM_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DOUBLE), 0)

SCHEDULES = {
    "vp": VPSchedule(),
    "ve": VESchedule(),
    "subvp": SubVPSchedule(),
    "rectified-flow": RectifiedFlow(),
    "discrete": DiscreteSchedule(DDPM_ALPHAS_CUMPROD),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_clean_at_zero_and_snr_decreasing(name):
    schedule = SCHEDULES[name]
    zero = torch.zeros((), dtype=DOUBLE)  # closed forms in float64: rounding
    assert float(schedule.alpha(zero)) == pytest.approx(1.0, abs=1e-12)
    assert float(schedule.sigma(zero)) == pytest.approx(0.0, abs=1e-12)
    t = torch.linspace(1e-4, schedule.t_max, 2000, dtype=DOUBLE)
    snr = schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2
    assert bool((snr[1:] < snr[:-1]).all())


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_f_and_g2_follow_from_alpha_and_sigma(name):
    """f = alpha'/alpha and g^2 = alpha^2 d/dt(sigma^2/alpha^2), by central differences."""
    schedule = SCHEDULES[name]
    t = torch.linspace(0.05, 0.95 * schedule.t_max, 37, dtype=DOUBLE)
    t = t[(t * 1000 - (t * 1000).round()).abs() > 0.01]  # away from the discrete schedule's knots
    h = 1e-6
    d_log_alpha = (schedule.alpha(t + h).log() - schedule.alpha(t - h).log()) / (2 * h)
    ratio2 = lambda u: (schedule.sigma(u) / schedule.alpha(u)) ** 2  # noqa: E731
    g2 = schedule.alpha(t) ** 2 * (ratio2(t + h) - ratio2(t - h)) / (2 * h)
    # central differences: truncation ~h^2 = 1e-12, float64 cancellation ~eps / h = 1e-10 relative
    assert torch.allclose(schedule.f(t), d_log_alpha, rtol=1e-5, atol=1e-6)
    assert torch.allclose(schedule.g2(t), g2, rtol=1e-5)


def test_family_relations():
    t = torch.linspace(0, 1, 101, dtype=DOUBLE)
    vp, subvp, ve = VPSchedule(), SubVPSchedule(), VESchedule(0.01, 50.0)  # identities, float64 rounding
    assert torch.allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    assert torch.allclose(subvp.sigma(t), 1 - subvp.alpha(t) ** 2)
    assert torch.allclose(ve.alpha(t), torch.ones_like(t))
    assert float(ve.sigma(torch.tensor(1.0, dtype=DOUBLE))) == pytest.approx(50.0, rel=1e-6)
    assert float(vp.alpha(torch.tensor(1.0, dtype=DOUBLE))) == pytest.approx(math.exp(-0.5 * (0.1 + 0.5 * 19.9)))


def test_discrete_schedule_hits_alphas_cumprod_at_its_timesteps():
    schedule = DiscreteSchedule(DDPM_ALPHAS_CUMPROD)
    n = torch.tensor([0, 1, 499, 999])
    t = (n + 1).to(DOUBLE) / 1000  # the table's entries at its knots, up to float64 rounding
    assert torch.allclose(schedule.alpha(t) ** 2, DDPM_ALPHAS_CUMPROD[n], rtol=1e-12)
    assert torch.allclose(schedule.timestep(t), n.to(DOUBLE))
    # beta(t) = -T log(1 - beta_n) ~= T beta_n on step n (docs/theory.md §1); t = 0.5005 is on step 500.
    beta_500 = float(1 - DDPM_ALPHAS_CUMPROD[500] / DDPM_ALPHAS_CUMPROD[499])
    # the same number in exact arithmetic (inside step 500), float64 rounding of a log and a ratio
    assert float(schedule.g2(torch.tensor(0.5005, dtype=DOUBLE))) == pytest.approx(-1000 * math.log(1 - beta_500), rel=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_forward_sde_reproduces_the_marginal_variance(name, generator):
    """Euler–Maruyama on dx = f x dt + g dw from x_0 ~ N(0, 0.25) gives var alpha^2 0.25 + sigma^2."""
    schedule = SCHEDULES[name]
    end = 0.6 * schedule.t_max
    # Monte Carlo: the sample variance of 80000 Gaussian paths has a relative standard error of
    # sqrt(2 / 80000) = 0.5%; 500 Euler steps add a bias of ~0.5% (measured 0.5% +- 0.5% over 6
    # seeds), so 3% is 5 standard errors. (2000 steps x 20000 paths: the same time, 3 of them.)
    steps, paths, start_variance = 500, 80000, 0.25
    x = math.sqrt(start_variance) * torch.randn(paths, generator=generator, dtype=DOUBLE)
    dt = end / steps
    for i in range(steps):
        t = torch.tensor((i + 0.5) * dt, dtype=DOUBLE)  # midpoint coefficients
        x = x + schedule.f(t) * x * dt + schedule.g2(t).sqrt() * math.sqrt(dt) * torch.randn(paths, generator=generator, dtype=DOUBLE)
    t_end = torch.tensor(end, dtype=DOUBLE)
    expected = float(schedule.alpha(t_end) ** 2 * start_variance + schedule.sigma(t_end) ** 2)
    assert float(x.var()) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_time_for_ratio_inverts_the_noise_ratio(name):
    schedule = SCHEDULES[name]
    t = torch.tensor([0.01, 0.3, 0.7, 0.95 * schedule.t_max], dtype=DOUBLE)
    assert torch.allclose(schedule.time_for_ratio(schedule.ratio(t)), t, atol=1e-9)  # a float64 round trip


def test_bad_schedule_parameters_are_errors():
    with pytest.raises(ValueError):
        VESchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_terminal_kl_bound_is_exact_for_a_point_mass(name):
    # For x_0 = mu the marginal at t_max is N(alpha mu, sigma^2 I): the bound is its KL to the reference.
    schedule, mu = SCHEDULES[name], torch.linspace(-3.0, 5.0, 6, dtype=DOUBLE)
    t = torch.tensor(schedule.t_max, dtype=DOUBLE)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    marginal = torch.distributions.Normal(alpha * mu, sigma)
    reference = torch.distributions.Normal(torch.zeros(6, dtype=DOUBLE), torch.sqrt(alpha**2 + sigma**2))
    exact = float(torch.distributions.kl_divergence(marginal, reference).sum())
    assert schedule.terminal_kl_bound(float(mu @ mu), 6) == pytest.approx(exact, rel=1e-9, abs=1e-12)  # float64 closed forms


def test_terminal_kl_bound_falls_as_the_schedule_reaches_further():
    # The d = 800 MCGdiff mixture has E||x_0||^2 ~ 1e5: nats of mismatch at beta_max = 20, ~1e-2 at 30.
    assert VPSchedule(0.1, 20.0).terminal_kl_bound(1e5, 800) > 1.0 > 0.05 > VPSchedule(0.1, 30.0).terminal_kl_bound(1e5, 800)
    with pytest.raises(ValueError, match="mean_square_norm"):
        VPSchedule().terminal_kl_bound(-1.0, 3)


# The sigma-parametrised time axis (score-SDE VE, EDM) and zero terminal SNR.

from posterior_diff.schedules import GeometricVESchedule  # noqa: E402

GEOMETRIC = {"score-sde": GeometricVESchedule(0.01, 348.0), "edm": GeometricVESchedule(0.002, 80.0)}


def test_geometric_schedule_is_the_score_sde_schedulers_time_axis():
    from diffusers import ScoreSdeVeScheduler

    scheduler = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0)
    scheduler.set_timesteps(50)
    scheduler.set_sigmas(50)
    schedule = GEOMETRIC["score-sde"]
    # diffusers' sigmas are float32 exps of exponents up to log(348 / 0.01) = 10.5: ~1e-6 relative
    assert torch.allclose(schedule.sigma(scheduler.timesteps.double()), scheduler.sigmas.double(), rtol=1e-5)
    ends = torch.tensor([0.0, 1.0], dtype=DOUBLE)  # float64 closed forms and their inverse: rounding
    assert torch.allclose(schedule.sigma(ends), torch.tensor([0.01, 348.0], dtype=DOUBLE))
    assert torch.allclose(schedule.alpha(ends), torch.ones(2, dtype=DOUBLE))
    assert torch.allclose(schedule.time_for_sigma(schedule.sigma(ends)), ends)


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_schedule_coefficients_and_inverse(name):
    schedule = GEOMETRIC[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=DOUBLE)
    h = 1e-6
    g2 = (schedule.sigma(t + h) ** 2 - schedule.sigma(t - h) ** 2) / (2 * h)
    # central differences: truncation ~(h log(sigma_max / sigma_min))^2 = 1e-10, cancellation 1e-10; f = 0 exactly
    assert torch.allclose(schedule.g2(t), g2, rtol=1e-6) and bool((schedule.f(t) == 0).all())
    assert torch.allclose(schedule.time_for_ratio(schedule.ratio(t)), t, atol=1e-9)  # a float64 round trip
    # Euler–Maruyama from x(0) ~ N(0, v0 + sigma_min^2) reproduces the marginal variance v0 + sigma(t)^2.
    # Monte Carlo: 80000 paths, a relative standard error of 0.5% (the midpoint rule's bias at
    # 250 steps is ~1e-4), so 3% is 6 standard errors.
    generator = torch.Generator().manual_seed(0)
    x = math.sqrt(0.25 + schedule.sigma_min**2) * torch.randn(80000, generator=generator, dtype=DOUBLE)
    end, steps = 0.5, 250
    for i in range(steps):
        middle = torch.tensor((i + 0.5) * end / steps, dtype=DOUBLE)
        x = x + schedule.g2(middle).sqrt() * math.sqrt(end / steps) * torch.randn(80000, generator=generator, dtype=DOUBLE)
    expected = 0.25 + float(schedule.sigma(torch.tensor(end, dtype=DOUBLE))) ** 2
    assert float(x.var()) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_grids_end_at_sigma_min_and_start_at_sigma_max(name):
    """The grid ends where the model was trained (sigma_min; s_min=2e-3 where that is larger),
    and the start N(0, (1 + sigma_max^2) I) is diffusers' N(0, sigma_max^2 I) to 1 part in 1e4."""
    from posterior_diff.sampling.time_grids import time_grid

    schedule = GEOMETRIC[name]
    times = time_grid(schedule, 20)
    sigmas = schedule.sigma(times)
    # float64 round trips sigma -> t -> sigma: rounding
    assert float(sigmas[0]) == pytest.approx(schedule.sigma_max) and bool((times[1:] < times[:-1]).all())
    assert float(sigmas[-1]) == pytest.approx(max(2e-3, schedule.sigma_min), rel=1e-6)
    start_std = math.sqrt(1 + schedule.sigma_max**2)
    assert start_std / schedule.sigma_max == pytest.approx(1.0, abs=1e-4)  # 1 + 1 / (2 sigma_max^2): 8e-5 for EDM


def test_the_ve_start_fits_data_in_the_unit_range():
    """Score-SDE data lie in [0, 1], mean about 1/2, not 0: against sigma_max = 348 that offset is
    negligible. For d = 3 x 256 x 256 images (E x^2 <= 1/2) the start-up KL bound is 2e-6 nats
    per entry, a tenth of what the DDPM schedule's start leaves for the same images in [-1, 1]."""
    d = 3 * 256 * 256
    score_sde = GEOMETRIC["score-sde"].terminal_kl_bound(mean_square_norm=0.5 * d, dimension=d)
    ddpm = DiscreteSchedule(DDPM_ALPHAS_CUMPROD).terminal_kl_bound(mean_square_norm=1.0 * d, dimension=d)
    assert score_sde / d < 3e-6 and score_sde < ddpm / 5


def test_zero_terminal_snr_is_clipped_as_diffusers_euler_does():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    scheduler = DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    schedule = DiscreteSchedule(scheduler.alphas_cumprod)
    one = torch.tensor(1.0, dtype=DOUBLE)
    assert schedule.zero_terminal_snr and float(schedule.alpha(one) ** 2) == pytest.approx(2.0**-24)  # float32's clip value
    euler = EulerDiscreteScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    assert float(schedule.alpha(one) ** 2) == pytest.approx(float(euler.alphas_cumprod[-1]))  # the same 2^-24
    t = torch.linspace(1e-3, 1.0, 5000, dtype=DOUBLE)
    assert bool(torch.isfinite(schedule.ratio(t)).all()) and bool((schedule.log_snr(t).diff() < 0).all())
    assert float(schedule.alpha(one) ** 2 + schedule.sigma(one) ** 2) == pytest.approx(1.0)  # start from N(0, I); rounding
    assert not DiscreteSchedule(DDPM_ALPHAS_CUMPROD).zero_terminal_snr
    with pytest.raises(ValueError, match="only the last"):
        DiscreteSchedule(torch.tensor([0.9, 0.0, 0.0], dtype=DOUBLE))
