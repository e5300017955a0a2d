r"""Our denoisers as `deepinv.models.Denoiser`s, so deepinv's samplers can run on our priors.

deepinv's contract is variance-exploding and in [0, 1] image units:

    x = x_0 + s n,   D(x, s) = E[x_0 | x],   x and the output in [0, 1], s a float or (B,) tensor.

Ours is x_t = alpha_t x_0 + sigma_t n in the model's units (its `data_range`, e.g. [-1, 1]).
With x_model = low + w x, w = high - low, the deepinv input is x_model + w s n, a noise ratio
sigma_t / alpha_t = w s (= s for analytic priors, which have no image range). So the adapter
finds the time t with sigma_t / alpha_t = w s, scales x_t = alpha_t x_model, and maps
E[x_0 | x_t] back to [0, 1].
Noise ratios outside the schedule's range are clamped to its ends (t_min, t_max). For image
models the estimate is clamped to [0, 1] (`clip=True`): E[x_0 | x] of images in [0, 1] lies in
[0, 1], and our own guidance projects its corrected mean onto the data range the same way.
"""

from __future__ import annotations

import deepinv
import torch
from torch import Tensor

from .denoisers import Denoiser
from .images import from_model_range, to_model_range


class DeepinvDenoiser(deepinv.models.Denoiser):
    """A posterior_diff Denoiser behind deepinv's `D(x, sigma)` interface.

    Args:
        model: any Denoiser (the embedded model, a UNetDenoiser, GaussianPrior, ...).
        clip: clamp an image model's estimate to [0, 1].
    """

    def __init__(self, model: Denoiser, clip: bool = True):
        super().__init__()
        self.model = model
        self.image_model = model.data_range is not None
        self.width = model.data_range[1] - model.data_range[0] if self.image_model else 1.0
        self.clip = clip and self.image_model
        self._t_range = (float(model.schedule.t_min), float(model.schedule.t_max))

    def forward(self, x: Tensor, sigma: float | Tensor, **kwargs) -> Tensor:
        """E[x_0 | x] for x = x_0 + sigma n: x of shape (B, *event), sigma a float or (B,)."""
        sigma = self._handle_sigma(sigma, batch_size=x.shape[0], device=x.device, dtype=torch.float64).flatten()
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        ratio = self.width * sigma
        schedule = self.model.schedule
        t = schedule.time_for_ratio(ratio.cpu()).clamp(*self._t_range).to(device=x.device, dtype=x.dtype)
        alpha = schedule.alpha(t).reshape(-1, *[1] * (x.dim() - 1))
        # deepinv hands over float32; analytic priors may be float64: compute in the model's dtype.
        dtype = self.model.sampling_dtype()
        x_model = (to_model_range(x, self.model.data_range) if self.image_model else x).to(dtype)
        denoised = self.model(alpha.to(dtype) * x_model, t.to(dtype))
        if not self.image_model:
            return denoised.to(x.dtype)
        denoised = from_model_range(denoised, self.model.data_range)
        return (denoised.clamp(0, 1) if self.clip else denoised).to(x.dtype)
