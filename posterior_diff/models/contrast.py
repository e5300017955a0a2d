r"""A denoiser asked above its trained noise range through contrast scaling.

A deepinv-style denoiser D(x, sigma) (x, D and sigma in [0, 1] image units) trained for sigma <= top
is asked about a level sigma > top on the same image at reduced contrast, c = top / sigma, about the
middle grey m = 1/2:

    x' = m + c (x - m) = x_0' + top n,   x_0' = m + c (x_0 - m)
    D_c(x, sigma) = m + (D(x', top) - m) / c

If D is the MMSE denoiser of the contrast-reduced images x_0' at its top level, D_c is exactly the MMSE
denoiser E[x_0 | x_0 + sigma n = x] of the original ones: the map x_0 -> x_0' is affine and invertible, and
it takes noise of std sigma to noise of std top. So D_c is as good a prior as the assumption that a
photograph at contrast c is as likely as one at full contrast, i.e. that natural images are (nearly)
contrast-invariant: photographs come at every contrast, so a denoiser trained on them has seen
low-contrast ones. It is an assumption, not training, and it is measured: on the validation photographs
FFDNet asked this way denoises 1.1 to 2.1 dB better than the embedded diffusion model at levels 0.35 to 1
and 0.8 dB better at 2 to 5 (docs/contrast_scaling.md). At and below `top` the denoiser is asked
unchanged, bit for bit.

The Jacobian follows: dD_c/dx = (dD/dx')(x') (the c and 1/c cancel), so the Tweedie covariance
sigma^2 dD_c/dx of a contrast-scaled level is (sigma / top)^2 times the network's own at x', a
differentiable torch op the guidance's VJPs run through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posterior_diff.checks import number_in
from posterior_diff.models.deepinv_prior import DeepinvPrior, check_deepinv_prior
from posterior_diff.schedules import GeometricVESchedule

MIDDLE_GREY = 0.5  # m: the centre of [0, 1], so that the scaled image stays inside the range the network saw


class ContrastScaling(nn.Module):
    """`network(x, sigma)` (the deepinv contract, [0, 1] units) asked at min(sigma, top) on the image
    scaled to contrast c = min(1, top / sigma) about the middle grey, and scaled back (module docstring).

    Args:
        network: the denoiser, called as `network(x, sigma)` with sigma a (B,) tensor.
        top: the highest level the network was trained for, in [0, 1] units (75/255 for FFDNet).
    """

    def __init__(self, network: nn.Module, top: float):
        super().__init__()
        self.network = network
        self.top = number_in(top, "top", 0.0, open_low=True)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        above = sigma > self.top  # no branch on it: that would sync a GPU with the host on every call
        contrast = torch.where(above, self.top / sigma, torch.ones_like(sigma))  # (B,) or (1,)
        scale, scaled_rows = (value.reshape(-1, *([1] * (x.dim() - 1))) for value in (contrast, above))
        # rows inside the trained range pass bit for bit: x = m + 1 (x - m) would round differently
        scaled = torch.where(scaled_rows, MIDDLE_GREY + scale * (x - MIDDLE_GREY), x)
        denoised = self.network(scaled, sigma * contrast)
        return torch.where(scaled_rows, MIDDLE_GREY + (denoised - MIDDLE_GREY) / scale, denoised)

    def extra_repr(self) -> str:
        return f"top={self.top:.4g}"


def contrast_scaled(prior: DeepinvPrior, sigma_max: float) -> DeepinvPrior:
    """`prior` asked up to the level `sigma_max` ([0, 1] units): above its own top level through
    contrast scaling (module docstring), at and below it unchanged.

    Args:
        prior: a DeepinvPrior (e.g. `ffdnet()`), whose `sigma_range` top is the highest level its
            network was trained for.
        sigma_max: the new top level, above the prior's own.

    Returns:
        A DeepinvPrior on the same network, schedule GeometricVESchedule(prior's sigma_min, sigma_max),
        sigma_range (the prior's low, sigma_max); eval mode, parameters frozen as the prior's.

    Raises:
        TypeError: prior is not a DeepinvPrior.
        ValueError: sigma_max is not above the prior's top level.
    """
    low, top = check_deepinv_prior(prior).sigma_range
    sigma_max = number_in(sigma_max, "sigma_max", top, open_low=True)
    return prior.wrapping(ContrastScaling(prior.denoiser, top), GeometricVESchedule(prior.schedule.sigma_min, sigma_max),
                          sigma_range=(low, sigma_max))
