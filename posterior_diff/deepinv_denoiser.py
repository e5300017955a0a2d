r"""Our denoisers as `deepinv.models.Denoiser`s, so deepinv's samplers can run on our priors.

deepinv's contract is variance-exploding and in [0, 1] image units:

    x = x_0 + s n,   D(x, s) = E[x_0 | x],   x and the output in [0, 1], s a float or (B,) tensor.

That view of a Denoiser is part of its contract (`Denoiser.at_noise_level`: the time with the
same noise ratio, the scaling, the units and the clamp to [0, 1] are worked out there); this
module is only deepinv's base class around it, so it is the one place that needs deepinv, and it
imports nothing else of the package (`Denoiser.to_deepinv` builds it).
"""

from __future__ import annotations

import deepinv
import torch
from torch import Tensor


class DeepinvDenoiser(deepinv.models.Denoiser):
    """A posterior_diff Denoiser behind deepinv's `D(x, sigma)` interface.

    Args:
        model: any Denoiser (the embedded model, a UNetDenoiser, GaussianPrior, ...).
        clip: clamp an image model's estimate to [0, 1].
    """

    def __init__(self, model, clip: bool = True):
        super().__init__()
        self.model = model
        self.clip = clip and model.data_range is not None

    def forward(self, x: Tensor, sigma: float | Tensor, **kwargs) -> Tensor:
        """E[x_0 | x] for x = x_0 + sigma n: x of shape (B, *event), sigma a float or (B,)."""
        sigma = self._handle_sigma(sigma, batch_size=x.shape[0], device=x.device, dtype=torch.float64).flatten()
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        return self.model.at_noise_level(x, sigma, clip=self.clip)
