r"""Several denoisers of the same noise levels as one: a weighted mean of their estimates, and a grey
denoiser asked about a colour image channel by channel.

**A weighted mean.** For denoisers D_k(x, sigma) (the deepinv contract, [0, 1] units) and weights
w_k > 0 with sum_k w_k = 1,

    D(x, sigma) = sum_k w_k D_k(x, sigma)

is again a denoiser of that contract. Each D_k is x + sigma^2 grad log p_k(x; sigma) by Tweedie's formula
(docs/theory.md), so D is x + sigma^2 grad log prod_k p_k^{w_k}: at every level, the Tweedie denoiser of
the (normalised) geometric mean of the pieces' noisy densities, a product of experts. It stays a valid
prior level by level, as the ladder does (docs/theory.md, "A ladder of priors"), and its Jacobian, the
Tweedie covariance's, is the same mean of the pieces' Jacobians, so the guidance's VJPs run through it.
Why it helps: two trained networks approximate one MMSE denoiser E[x_0 | x] with errors that are partly
independent, so their mean has a smaller squared error than either when they are about as good.

**A grey denoiser per channel.** A denoiser of grey images asked about each colour channel on its own is
the exact MMSE denoiser of the prior under which the channels are independent grey images. That prior is
worse than a colour one, since it ignores how the channels move together, but its errors differ from a
colour network's. FFDNet's published grey weights (`ffdnet(1)`) mixed into its RGB network this way
denoise better than the RGB network averaged over twice as many flips and turns, at about the same
seconds (docs/ffdnet.md), which is how `default_ladder` uses them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from posterior_diff.checks import number_in, positive_int
from posterior_diff.models.deepinv_prior import DeepinvPrior, check_deepinv_prior

WEIGHT_SUM_TOLERANCE = 1e-9  # weights given as decimals (0.7, 0.3) sum to 1 up to float round-off


class PerChannel(nn.Module):
    """`network(x, sigma)`, a denoiser of one-channel images (the deepinv contract, [0, 1] units), asked
    about each channel of x (B, C, H, W) as its own grey image, in one call on (B C, 1, H, W)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        batch, channels = x.shape[:2]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
        grey = self.network(x.reshape(batch * channels, 1, *x.shape[2:]), sigma.repeat_interleave(channels))
        return grey.reshape(x.shape)


class WeightedMean(nn.Module):
    """`sum_k weights[k] * networks[k](x, sigma)`: networks of the deepinv contract, weights summing to 1."""

    def __init__(self, networks: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.weights = tuple(float(weight) for weight in weights)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return sum(weight * network(x, sigma) for weight, network in zip(self.weights, self.networks))

    def extra_repr(self) -> str:
        return "weights=(" + ", ".join(f"{weight:.4g}" for weight in self.weights) + ")"


def per_channel(prior: DeepinvPrior, channels: int = 3) -> DeepinvPrior:
    """A one-channel DeepinvPrior (e.g. `ffdnet(1)`) asked about `channels`-channel images channel by
    channel (module docstring): the same network, schedule, sigma_range and train/eval mode.

    Raises:
        TypeError: prior is not a DeepinvPrior.
        ValueError: prior declares other than one channel, or channels is not a positive integer.
    """
    check_deepinv_prior(prior)
    channels = positive_int(channels, "channels")
    if prior.channels != 1:
        raise ValueError(f"prior must be a one-channel (grey) prior, e.g. ffdnet(1); it declares {prior.channels} "
                         "channels")
    x_shape = None if prior.x_shape is None else (channels, *prior.x_shape[1:])
    wrapped = DeepinvPrior(PerChannel(prior.denoiser), prior.schedule, channels, x_shape, prior.declared_sigma_range)
    return wrapped.train(prior.training)


def weighted_mean(priors: Sequence[DeepinvPrior], weights: Sequence[float]) -> DeepinvPrior:
    """The weighted mean of the priors' estimates as one DeepinvPrior (module docstring), on the first
    prior's schedule; the pieces must agree on channels, sigma_range and schedule, so that each is asked
    about the noise levels it declares.

    Args:
        priors: two or more DeepinvPriors (e.g. `ffdnet()` and `per_channel(ffdnet(1))`).
        weights: one per prior, each > 0, summing to 1 (a convex combination: a mean of estimates of
            the clean image is one too).

    Raises:
        TypeError: a prior is not a DeepinvPrior.
        ValueError: fewer than two priors, a weight per prior missing, a weight not > 0, weights not
            summing to 1, or pieces that differ in channels, sigma_range or schedule.
    """
    priors = [check_deepinv_prior(prior, f"priors[{i}]") for i, prior in enumerate(priors)]
    if len(priors) < 2:
        raise ValueError(f"priors must hold at least two priors to mix, got {len(priors)}")
    if len(weights) != len(priors):
        raise ValueError(f"weights must hold one weight per prior ({len(priors)}), got {len(weights)}")
    weights = [number_in(weight, f"weights[{i}]", 0.0, open_low=True) for i, weight in enumerate(weights)]
    if not math.isclose(sum(weights), 1.0, rel_tol=0.0, abs_tol=WEIGHT_SUM_TOLERANCE):
        raise ValueError(f"weights must sum to 1, got {weights} (sum {sum(weights):.12g})")
    first = priors[0]
    for i, prior in enumerate(priors[1:], start=1):
        for what, mine, theirs in (("channels", prior.channels, first.channels),
                                   ("sigma_range", prior.sigma_range, first.sigma_range),
                                   ("schedule", schedule_ends(prior), schedule_ends(first))):
            if mine != theirs:
                raise ValueError(f"priors[{i}] has {what} {mine}, priors[0] {theirs}: the mixed priors must agree")
    return first.wrapping(WeightedMean([prior.denoiser for prior in priors], weights))


def schedule_ends(prior: DeepinvPrior) -> tuple:
    """The prior's schedule as (class name, sigma_min, sigma_max): what two VE schedules must share to be one."""
    schedule = prior.schedule
    return type(schedule).__name__, float(schedule.sigma_min), float(schedule.sigma_max)
