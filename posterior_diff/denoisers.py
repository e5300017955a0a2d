r"""The denoiser contract: (x_t, t) -> D(x_t, t) = E[x_0 | x_t], in the model's own units.

A network may predict the noise, the velocity, the clean signal or the score; they are
exact conversions of one another (docs/theory.md §2):

    score   = -(x - alpha D) / sigma^2
    eps     = (x - alpha D) / sigma               (diffusers "epsilon")
    D       = (x - sigma eps) / alpha             (diffusers "sample")
    v       = alpha eps - sigma D,  D = (alpha x - sigma v) / (alpha^2 + sigma^2)   ("v_prediction")

Every sampler and the guidance only ever ask a Denoiser for D; the score follows from it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from operators import per_sample

from posterior_diff.images import from_model_range, noise_from_model_units, to_model_range
from posterior_diff.schedules import DiscreteSchedule, Schedule

PREDICTIONS = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "sample": "sample",
    "x0": "sample",
    "score": "score",
}


def as_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Times as a (B,) tensor on x's device and dtype, from a float, a 0-d or a (B,) tensor."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def x0_from_epsilon(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - sigma * eps) / alpha


def x0_from_v(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (alpha * x - sigma * v) / (alpha**2 + sigma**2)


def x0_from_score(x: Tensor, score: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x + sigma**2 * score) / alpha


def epsilon_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - alpha * x0) / sigma


def v_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * epsilon_from_x0(x, x0, alpha, sigma) - sigma * x0


def score_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return -(x - alpha * x0) / sigma**2


_TO_X0 = {
    "epsilon": x0_from_epsilon,
    "v_prediction": x0_from_v,
    "sample": lambda x, out, alpha, sigma: out,
    "score": x0_from_score,
}


def prediction_to_x0(prediction: str, x: Tensor, output: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert a network output of the given prediction type to D = E[x_0 | x_t]."""
    return _TO_X0[canonical_prediction(prediction)](x, output, alpha, sigma)


def canonical_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {sorted(set(PREDICTIONS))}, got {prediction!r}")
    return PREDICTIONS[prediction]


def schedule_sigma_range(schedule: Schedule, data_range: tuple[float, float] | None) -> tuple[float, float]:
    """The noise ratios s = sigma / alpha a schedule spans, s(t_min) to s(t_max), in [0, 1] image units
    for a model with `data_range` (s_model / (high - low), `images.noise_from_model_units`), else as they are."""
    ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
    low, high = (float(noise_from_model_units(s, data_range)) for s in schedule.ratio(ends).tolist())
    return low, high


class Denoiser(nn.Module):
    """(x_t, t) -> E[x_0 | x_t]. Subclasses implement `forward`.

    Attributes:
        schedule: the Schedule giving alpha(t), sigma(t) for this model.
        x_shape: the shape of one x (no batch), or None if the model takes any shape.
        data_range: (low, high) of the data for image models, which then take and return
            images in [0, 1] through `restore`; None for models without one (analytic priors).
        channels: the number of image channels the model takes, or None.
        sigma_range: (low, high), the noise levels s = sigma / alpha the model may be asked about,
            in [0, 1] image units (the std of the noise in x_0 + s n for x_0 in [0, 1]); for
            analytic priors (no data range) in the prior's own units. By default its schedule's
            whole range, s(t_min) to s(t_max), converted from the model's units
            (`schedule_sigma_range`); a model trained on fewer levels declares them (FFDNet:
            (0, 75/255)). `restore` refuses a run whose time grid leaves it (allow_extrapolation).
    """

    schedule: Schedule
    x_shape: tuple[int, ...] | None = None
    data_range: tuple[float, float] | None = None
    channels: int | None = None

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(low, high) noise levels the model may be asked about, in [0, 1] image units (the prior's
        own units without a data range): here the schedule's whole range; subclasses may declare less."""
        return schedule_sigma_range(self.schedule, self.data_range)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """D(x_t, t) for x_t of shape (B, *event) and t a float or a (B,) tensor in [0, 1]."""
        raise NotImplementedError

    def at_time(self, x_t: Tensor, t: float) -> Tensor:
        """D(x_t, t) with every sample at one time t, a Python float, as the samplers ask for it: here
        the time goes to `forward` as a (B,) tensor on x_t's device. (A wrapper that branches on the
        time, as the guidance does on `jacobian_s_max`, reads the float and costs no device sync.)"""
        return self(x_t, torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device))

    def final_estimate(self, x_t: Tensor, t: float) -> Tensor:
        """The x_0 a sampler returns from its last grid time t_min: `at_time` here. A wrapper whose
        D is costly may take a cheaper estimate that agrees with it as t -> 0 (the guidance does)."""
        return self.at_time(x_t, t)

    def score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """grad_x log p_t(x_t) = -(x_t - alpha D) / sigma^2, shape of x_t."""
        t = as_time(t, x_t)
        alpha = per_sample(self.schedule.alpha(t), x_t)
        sigma = per_sample(self.schedule.sigma(t), x_t)
        return score_from_x0(x_t, self(x_t, t), alpha, sigma)

    def at_noise_level(self, x: Tensor, sigma: Tensor, clip: bool = True) -> Tensor:
        """E[x_0 | x] for x = x_0 + sigma n, the variance-exploding view deepinv's denoisers take:
        x of shape (B, *event) and the estimate in [0, 1] image units for an image model (clamped
        to [0, 1] when `clip`), in the prior's own units otherwise; sigma a (B,) tensor in those units.

        With x_model = low + w x, w = high - low, the noisy point is x_model + w sigma n, a noise
        ratio sigma_t / alpha_t = w sigma (= sigma without a data range). So this finds the time t
        with that ratio (clamped to the schedule's ends t_min, t_max), scales x_t = alpha_t x_model,
        and maps E[x_0 | x_t] back to [0, 1]. E[x_0 | x] of images in [0, 1] lies in [0, 1], and
        the guidance projects its corrected mean onto the data range the same way.
        """
        image_model = self.data_range is not None
        width = self.data_range[1] - self.data_range[0] if image_model else 1.0
        schedule = self.schedule
        t = schedule.time_for_ratio((width * sigma).cpu()).clamp(float(schedule.t_min), float(schedule.t_max))
        t = t.to(device=x.device, dtype=x.dtype)
        alpha = schedule.alpha(t).reshape(-1, *[1] * (x.dim() - 1))
        # deepinv hands over float32; analytic priors may be float64: compute in the model's dtype.
        dtype = self.sampling_dtype()
        x_model = (to_model_range(x, self.data_range) if image_model else x).to(dtype)
        denoised = self(alpha.to(dtype) * x_model, t.to(dtype))
        if not image_model:
            return denoised.to(x.dtype)
        denoised = from_model_range(denoised, self.data_range)
        return (denoised.clamp(0, 1) if clip else denoised).to(x.dtype)

    def to_deepinv(self, clip: bool = True):
        """This denoiser as a `deepinv.models.Denoiser` (VE noise, [0, 1] units for image models,
        clamped to [0, 1] when `clip`): `at_noise_level` behind deepinv's `D(x, sigma)`
        (posterior_diff.deepinv_denoiser). Needs deepinv."""
        from posterior_diff.deepinv_denoiser import DeepinvDenoiser

        return DeepinvDenoiser(self, clip)

    def sampling_dtype(self) -> torch.dtype:
        """The dtype of the sampler state: the model's own, but float32 for a half-precision
        network (the network still runs in half precision; the sampler and CG need float32)."""
        reference = self.reference_tensor()
        if reference is None:
            return torch.get_default_dtype()
        return reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float32

    def network_dtypes(self) -> tuple[str, ...]:
        """The dtypes the model's floating-point parameters and buffers are held in, sorted
        ("bfloat16", "float32", ...): one for a plain network, one per precision in a ladder whose
        pieces differ; () for a model without any (an analytic prior computes in the input's dtype)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}))

    def reference_tensor(self) -> Tensor | None:
        """A parameter or buffer of the model: where it lives decides device and dtype."""
        for tensor in list(self.parameters()) + list(self.buffers()):
            if tensor.is_floating_point():
                return tensor
        return None


class ModuleDenoiser(Denoiser):
    """Wrap a torch module that predicts eps, v, x0 or the score into a Denoiser.

    Args:
        module: called as `module(x_t, time_input)`; may return a tensor or an object with
            a `.sample` tensor (diffusers models).
        schedule: the schedule the module was trained with.
        prediction: "epsilon" (or "eps"), "v_prediction" ("v"), "sample" ("x0") or "score".
        time_input: maps the (B,) continuous times to what the module expects. Defaults to
            the training timestep T t - 1 for a DiscreteSchedule and to t itself otherwise.
        x_shape: the shape of one x, if the module only accepts one.
    """

    def __init__(
        self,
        module: nn.Module,
        schedule: Schedule,
        prediction: str = "epsilon",
        time_input: Callable[[Tensor], Tensor] | None = None,
        x_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.module = module
        self.schedule = schedule
        self.prediction = canonical_prediction(prediction)
        if time_input is None:
            time_input = schedule.timestep if isinstance(schedule, DiscreteSchedule) else (lambda t: t)
        self.time_input = time_input
        self.x_shape = None if x_shape is None else tuple(x_shape)

    def network_output(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The module's raw prediction (eps, v, x0 or score) at x_t and (B,) times t."""
        output = self.module(x_t, self.time_input(t))
        return getattr(output, "sample", output)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x_t)
        output = self.network_output(x_t, t)
        alpha = per_sample(self.schedule.alpha(t), x_t)
        sigma = per_sample(self.schedule.sigma(t), x_t)
        return prediction_to_x0(self.prediction, x_t, output, alpha, sigma)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal draws of `shape`, returned on `device` in `dtype`.

    Drawn on the generator's own device, so a CPU generator reproduces the same numbers
    whether sampling runs on the CPU or a GPU.
    """
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)
