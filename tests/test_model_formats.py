"""The model formats of posterior_diff.models.formats: each call convention, exactly.

Three kinds of test:
- conventions: on the published configs shrunk to a few channels (random weights), each
  Denoiser equals what diffusers' own scheduler makes of the same network output;
- exactness: a network replaced by an analytic Gaussian prior with the format's call signature
  and output convention (sigma in and the score out for score-SDE, 2C output channels for ADM,
  EDM's preconditioning, v prediction on a zero-terminal-SNR schedule), plugged into the very
  Denoiser the loader builds: restore(covariance="tweedie") reproduces the closed-form
  posterior as well as exact samples do;
- real configs: each family saved as a folder loads through `load_model` and restores.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (CMStochasticIterativeScheduler, DDIMScheduler, DDPMScheduler, EDMDPMSolverMultistepScheduler,
                       EDMEulerScheduler, LCMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel)
from torch import nn

from operators import SuperResolution
from posterior_diff import GaussianPrior, ModelLoadError, load_model, restore
from posterior_diff.evaluation.metrics import exact_sample_floor
from posterior_diff.evaluation.problems import squared_exponential_covariance
from posterior_diff.models.formats import (EDMUNetDenoiser, ScoreSdeUNetDenoiser, UNetDenoiser, check_diffusers_pair,
                                          denoiser_from_diffusers)
from posterior_diff.schedules import DiscreteSchedule

from conftest import grouped_floor_ratios

DOUBLE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests make many tiny tensor operations: on a shared CPU one thread is several times
    faster. A count asked for by POSTERIOR_DIFF_TEST_THREADS (conftest) is left as it is, so that
    the suite's runs at 1 and at 2 threads both cover this file."""
    from conftest import requested_threads

    threads = torch.get_num_threads()
    if requested_threads() is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- The published configs, shrunk to a few channels (random weights). ---------------------------


def ncsnpp_unet(channels=3) -> UNet2DModel:
    """google/ncsnpp-celebahq-256's UNet (NCSN++: skip blocks, attention, fourier sigma embedding,
    center_input_sample) at 3 levels of 32 channels instead of 7 of 128-256."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(32, 32, 32),
                       layers_per_block=1, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
                       time_embedding_type="fourier", center_input_sample=True, mid_block_scale_factor=math.sqrt(2),
                       norm_eps=1e-6, norm_num_groups=None, attention_head_dim=None, flip_sin_to_cos=True, freq_shift=1)


def adm_unet(channels=3) -> UNet2DModel:
    """The DPS FFHQ-256 ADM UNet as scripts/convert_adm_to_diffusers.py builds it (2C outputs,
    resnet up/down sampling, scale-shift norm, attention) at 4 levels of 8-16 channels."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=channels, out_channels=2 * channels, layers_per_block=1,
                       block_out_channels=(8, 8, 16, 16), attention_head_dim=8,
                       down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D",
                                         "ResnetDownsampleBlock2D"),
                       up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D",
                                       "ResnetUpsampleBlock2D"),
                       resnet_time_scale_shift="scale_shift", upsample_type="resnet", downsample_type="resnet",
                       norm_eps=1e-6, norm_num_groups=8)


def edm_unet(channels=3) -> UNet2DModel:
    """A pixel EDM (DDPM++-style) UNet: positional embedding of c_noise, attention, 2 levels."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


ADM_SCHEDULER = dict(variance_type="learned_range", beta_schedule="linear", num_train_timesteps=1000, clip_sample=False)
VE_SCHEDULER = dict(sigma_min=0.01, sigma_max=348.0)  # google/ncsnpp-celebahq-256's sigma range


def test_score_sde_calls_the_unet_with_sigma_and_reads_the_score():
    unet, scheduler = ncsnpp_unet(), ScoreSdeVeScheduler(**VE_SCHEDULER)
    model = denoiser_from_diffusers(unet, scheduler)
    assert isinstance(model, ScoreSdeUNetDenoiser) and model.data_range == (0.0, 1.0)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.7], dtype=torch.float32)
    sigma = 0.01 * (348.0 / 0.01) ** t
    with torch.no_grad():
        score = unet(x, sigma).sample  # diffusers' ScoreSdeVePipeline passes sigma; the UNet divides by it
        # float32, outputs up to ~20 (sigma^2 x score at sigma = 15): sigma computed in another
        # order rounds differently, measured 2e-6 (1 ulp); 1e-4 leaves ~50x
        assert torch.allclose(model(x, t), x + sigma[:, None, None, None] ** 2 * score, rtol=1e-4, atol=1e-4)


def test_adm_keeps_the_mean_channels_as_the_scheduler_does():
    unet, scheduler = adm_unet(), DDPMScheduler(**ADM_SCHEDULER)
    model = denoiser_from_diffusers(unet, scheduler)
    assert isinstance(model, UNetDenoiser) and model.mean_channels == 3 and model.data_range == (-1.0, 1.0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    n = 400
    with torch.no_grad():
        output = unet(x, torch.full((2,), float(n))).sample  # (2, 6, 16, 16)
        expected = scheduler.step(output, n, x).pred_original_sample
        # float32, |x_0| up to 10 (divided by sqrt(alpha_bar)): a few ulps, measured 1e-6
        assert torch.allclose(model(x, (n + 1) / 1000), expected, atol=1e-4)


@pytest.mark.parametrize("scheduler_class", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_preconditioning_is_the_schedulers_own(scheduler_class, prediction):
    unet, scheduler = edm_unet(), scheduler_class(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type=prediction)
    model = denoiser_from_diffusers(unet, scheduler)
    assert isinstance(model, EDMUNetDenoiser) and model.data_range == (-1.0, 1.0)
    x = 3 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 3.0])
    t = model.schedule.time_for_sigma(sigma.double()).float()
    with torch.no_grad():
        raw = unet(scheduler.precondition_inputs(x, sigma[:, None, None, None]), scheduler.precondition_noise(sigma)).sample
        expected = scheduler.precondition_outputs(x, raw, sigma[:, None, None, None])
        # float32, outputs up to ~12; t -> sigma round-trips through float64: measured 2e-6 (1 ulp)
        assert torch.allclose(model(x, t), expected, rtol=1e-4, atol=1e-4)


# --- Exactness behind every interface: analytic Gaussian networks. --------------------------------


def gaussian_denoise(prior: GaussianPrior, x, alpha, sigma):
    """E[x_0 | x] for x = alpha x_0 + sigma eps, x_0 ~ prior; alpha, sigma of shape (B,)."""
    alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
    offset = (x - alpha.reshape(-1, 1, 1, 1) * prior.mean).flatten(1)
    gain = alpha * prior.eigenvalues / (alpha**2 * prior.eigenvalues + sigma**2)
    return prior.mean + (((offset @ prior.eigenvectors) * gain) @ prior.eigenvectors.T).reshape(x.shape)


class GaussianNetwork(nn.Module):
    """An exact 'network' for a Gaussian prior in the model's units, with UNet2DModel's call
    signature `(sample, timestep, class_labels=None) -> .sample` and the `.config` the loader reads."""

    def __init__(self, prior, out_channels=1, fourier=False, centred=False):
        super().__init__()
        self.prior = prior
        self.anchor = nn.Parameter(torch.zeros((), dtype=DOUBLE))  # decides the dtype the network runs in
        self.config = SimpleNamespace(in_channels=1, out_channels=out_channels, block_out_channels=(8,),
                                      time_embedding_type="fourier" if fourier else "positional",
                                      center_input_sample=centred)
        self.class_embedding = None


class ScoreNetwork(GaussianNetwork):
    """Score-SDE VE: timestep = sigma, output = the score grad log p_sigma(x), data in [0, 1]."""

    def __init__(self, prior, sigma_scale=1.0):
        super().__init__(prior, fourier=True, centred=True)
        self.sigma_scale = sigma_scale  # 1: the true convention; else a deliberately wrong sigma

    def forward(self, sample, timestep, class_labels=None):
        sigma = self.sigma_scale * timestep
        denoised = gaussian_denoise(self.prior, sample, torch.ones_like(sigma), sigma)
        return SimpleNamespace(sample=-(sample - denoised) / sigma.reshape(-1, 1, 1, 1) ** 2)


class DiscreteNetwork(GaussianNetwork):
    """DDPM family: timestep = n (fractional), output eps (ADM: [eps, anything], 2C channels) or v."""

    def __init__(self, prior, alphas_cumprod, prediction="epsilon", learned_variance=False):
        super().__init__(prior, out_channels=2 if learned_variance else 1)
        self.schedule, self.prediction, self.learned_variance = DiscreteSchedule(alphas_cumprod), prediction, learned_variance

    def forward(self, sample, timestep, class_labels=None):
        t = (timestep + 1) / self.schedule.num_train_timesteps
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        denoised = gaussian_denoise(self.prior, sample, alpha, sigma)
        alpha, sigma = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        eps = (sample - alpha * denoised) / sigma
        output = alpha * eps - sigma * denoised if self.prediction == "v_prediction" else eps
        if self.learned_variance:  # ADM's second half: the variance interpolation, to be ignored
            output = torch.cat([output, torch.full_like(output, 7.0)], dim=1)
        return SimpleNamespace(sample=output)


class EDMNetwork(GaussianNetwork):
    """EDM: called with (c_in x, c_noise), returns F with c_skip x + c_out F = E[x_0 | x]."""

    sigma_data = 0.5

    def forward(self, sample, timestep, class_labels=None):
        sigma = torch.exp(4 * timestep)
        scale = torch.sqrt(sigma**2 + self.sigma_data**2).reshape(-1, 1, 1, 1)
        x = sample * scale
        denoised = gaussian_denoise(self.prior, x, torch.ones_like(sigma), sigma)
        c_skip, c_out = self.sigma_data**2 / scale**2, sigma.reshape(-1, 1, 1, 1) * self.sigma_data / scale
        return SimpleNamespace(sample=(denoised - c_skip * x) / c_out)


SIZE, NUM_SAMPLES, GROUPS = 4, 250, 24


@pytest.fixture(scope="module")
def problem():
    """A Gaussian prior on 4 x 4 images in [0, 1] units (mean 1/2, std 0.1: well inside [0, 1],
    where `restore` clamps), observed by 2x super-resolution with sigma_y = 0.05, its exact
    posterior and the errors of NUM_SAMPLES exact samples (averaged over 200 draws: a standard
    error of ~2%); the same prior in [-1, 1] units too."""
    cov = 0.01 * squared_exponential_covariance(SIZE, 1.0, dtype=DOUBLE) + 1e-8 * torch.eye(SIZE * SIZE, dtype=DOUBLE)
    unit = GaussianPrior(torch.full((1, SIZE, SIZE), 0.5, dtype=DOUBLE), cov)
    centred = GaussianPrior(torch.zeros((1, SIZE, SIZE), dtype=DOUBLE), 4 * cov)  # x -> 2 x - 1
    operator, generator = SuperResolution(2, sigma_y=0.05), torch.Generator().manual_seed(0)
    y = operator.measure(unit.sample(1, generator), generator)[0]
    posterior = unit.posterior(operator, y)
    return SimpleNamespace(unit=unit, centred=centred, operator=operator, y=y, posterior=posterior,
                           floor=exact_sample_floor(posterior, NUM_SAMPLES, repeats=200))


def exact_network_model(family: str, problem):
    """The loader's Denoiser around the analytic network of `family`."""
    if family == "score-sde":  # the published sigma range of google/ncsnpp-celebahq-256
        return denoiser_from_diffusers(ScoreNetwork(problem.unit), ScoreSdeVeScheduler(**VE_SCHEDULER))
    if family == "adm":
        scheduler = DDPMScheduler(**ADM_SCHEDULER)
        network = DiscreteNetwork(problem.centred, scheduler.alphas_cumprod, learned_variance=True)
        return denoiser_from_diffusers(network, scheduler)
    if family == "edm":
        return denoiser_from_diffusers(EDMNetwork(problem.centred), EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0))
    scheduler = DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", prediction_type="v_prediction")
    network = DiscreteNetwork(problem.centred, scheduler.alphas_cumprod, "v_prediction")
    return denoiser_from_diffusers(network, scheduler)


def error_ratios(model, problem, groups=GROUPS, steps=100, seed=1) -> dict[str, float]:
    """Mean and covariance errors of restore's samples over the exact-sample floor, averaged over
    `groups` groups of NUM_SAMPLES samples drawn in one run (conftest.grouped_floor_ratios): over
    24 groups of 250 a correct model gives 1.01-1.02 +- 0.05-0.06 (mean error) and 1.01-1.03 +-
    0.02 (covariance error), measured over 8 seeds per family (3 seeds of 2000 samples averaged
    1.15 +- 0.13: about 1 seed triple in 8 broke 1.3).
    """
    # independent samples (an image model's default pairs them): the floor is that of independent exact samples
    result = restore(problem.y, problem.operator, model, num_samples=groups * NUM_SAMPLES, steps=steps,
                     covariance="tweedie", cg_max_iter=50, antithetic=False, generator=torch.Generator().manual_seed(seed))
    return grouped_floor_ratios(result.samples, problem.posterior, NUM_SAMPLES, problem.floor)


@pytest.mark.parametrize("family", ["score-sde", "adm", "edm", "zero-snr-v"])
def test_each_interface_reproduces_the_closed_form_posterior(problem, family):
    """Units ([0, 1] for score-SDE, [-1, 1] otherwise), the time axis and the output convention
    together: errors within 1.3x of exact samples', averaged over 24 groups of 250 samples (Monte
    Carlo: 1.3 is over 4 standard deviations above every family's mean ratio). With sigma_min = 0.01
    the score-SDE samples are D at sigma_min, which shrinks the covariance by ~sigma_min^2 per
    direction: 1.5% of it here, well inside the bound."""
    model = exact_network_model(family, problem)
    assert model.data_range == ((0.0, 1.0) if family == "score-sde" else (-1.0, 1.0))
    ratios = error_ratios(model, problem)
    assert all(ratio <= 1.3 for ratio in ratios.values()), (family, ratios)


def test_the_exactness_test_rejects_a_wrong_sigma_scaling(problem):
    """The same yardstick fails a network whose sigma input is off by a factor 2 (as a [-1, 1]
    sigma fed to a [0, 1] network would be), 4 groups being enough: its covariance error is ~30x
    the floor's (a bias, not a Monte Carlo spread)."""
    model = denoiser_from_diffusers(ScoreNetwork(problem.unit, sigma_scale=2.0), ScoreSdeVeScheduler(**VE_SCHEDULER))
    ratios = error_ratios(model, problem, groups=4, steps=30)
    assert max(ratios.values()) > 2, ratios


# --- Real configs saved as folders: load, restore, finite and in [0, 1]. ------------------------


def save_family(family: str, folder):
    """Save a shrunk published config of `family` with random weights, as a folder."""
    if family == "score-sde":
        ScoreSdeVePipeline(unet=ncsnpp_unet(), scheduler=ScoreSdeVeScheduler(**VE_SCHEDULER, snr=0.075)).save_pretrained(folder)
    elif family == "adm":
        adm_unet().save_pretrained(folder / "unet")
        DDPMScheduler(**ADM_SCHEDULER).save_pretrained(folder / "scheduler")
    else:  # an EDM UNet folder with its scheduler_config.json beside config.json
        edm_unet().save_pretrained(folder)
        EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(folder)


@pytest.mark.parametrize("family, denoiser_class", [("score-sde", ScoreSdeUNetDenoiser), ("adm", UNetDenoiser),
                                                    ("edm", EDMUNetDenoiser)])
def test_published_configs_load_from_folders_and_restore(tmp_path, family, denoiser_class):
    save_family(family, tmp_path / family)
    model = load_model(tmp_path / family)
    assert type(model) is denoiser_class and model.channels == 3
    y = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = restore(y, SuperResolution(2, sigma_y=0.05), model, num_samples=2, steps=3,
                     generator=torch.Generator().manual_seed(0))
    samples = result.samples
    assert samples.shape == (2, 3, 8, 8) and bool(torch.isfinite(samples).all())
    assert float(samples.min()) >= 0 and float(samples.max()) <= 1


def test_a_zero_terminal_snr_v_prediction_folder_restores(tmp_path):
    from conftest import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    scheduler = DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", prediction_type="v_prediction")
    scheduler.save_pretrained(tmp_path / "scheduler")
    model = load_model(tmp_path)
    assert model.schedule.zero_terminal_snr and model.prediction == "v_prediction"
    result = restore(torch.rand(3, 4, 4), SuperResolution(2, 0.05), model, num_samples=2, steps=3,
                     generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(result.samples).all()) and 0 <= float(result.samples.min()) <= float(result.samples.max()) <= 1


# --- Pairs that define no posterior mean: one clear error naming the scheduler and the reason. ----


@pytest.mark.parametrize("scheduler, message", [
    (CMStochasticIterativeScheduler(), r"CMStochasticIterativeScheduler cannot define a posterior-mean denoiser: .*consistency.*E\[x_0 \| x_t\]"),
    (LCMScheduler(), r"LCMScheduler cannot define a posterior-mean denoiser: .*consistency"),
    (DDPMScheduler(prediction_type="flow_prediction"), r"DDPMScheduler has prediction_type='flow_prediction'"),
])
def test_schedulers_without_a_posterior_mean_are_refused(scheduler, message):
    from conftest import tiny_unet

    for check in (check_diffusers_pair, denoiser_from_diffusers):
        with pytest.raises(ModelLoadError, match=message):
            check(tiny_unet(), scheduler)


def test_unets_that_do_not_fit_their_scheduler_are_refused():
    from conftest import tiny_unet

    with pytest.raises(ModelLoadError, match="DDPMScheduler does not fit this UNet.*ScoreSdeVeScheduler"):
        denoiser_from_diffusers(ncsnpp_unet(), DDPMScheduler())
    with pytest.raises(ModelLoadError, match="ScoreSdeVeScheduler does not fit this UNet.*fourier"):
        denoiser_from_diffusers(tiny_unet(), ScoreSdeVeScheduler())
    with pytest.raises(ModelLoadError, match="6 channels for 3 input channels.*fixed_small"):
        denoiser_from_diffusers(adm_unet(), DDPMScheduler(variance_type="fixed_small"))
