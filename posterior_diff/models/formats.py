r"""The call conventions of diffusers pixel-space UNets, each translated into D = E[x_0 | x_t].

A pretrained UNet2DModel is a Denoiser once three things are known: its time axis (alpha(t),
sigma(t)), what it is called with, and what it returns. The scheduler saved next to it
declares the first two; the UNet's config declares its data range and output channels.

| family | scheduler | schedule | network call | output -> D |
|---|---|---|---|---|
| DDPM, ADM | any with `alphas_cumprod` (DDPM, DDIM, PNDM, Euler, ...) | DiscreteSchedule | unet(x, T t - 1) | eps, v or x0 (1) |
| score-SDE VE | ScoreSdeVeScheduler | GeometricVESchedule | unet(x, sigma) (2) | the score: D = x + sigma^2 score |
| EDM | EDMEulerScheduler, EDMDPMSolverMultistepScheduler | GeometricVESchedule | unet(c_in x, c_noise) | D = c_skip x + c_out F |

(1) docs/theory.md §2; with ADM's learned variance (2C output channels) the first C are read;
    zero-terminal-SNR schedules as DiscreteSchedule describes.
(2) a fourier time embedding; the UNet divides its output by the sigma it is given.

EDM's preconditioning (Karras et al. 2022, as diffusers' `precondition_*` methods), with sigma_d
the scheduler's `sigma_data`:

    c_in = 1 / sqrt(sigma^2 + sigma_d^2),   c_noise = log(sigma) / 4,
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),   c_out = +- sigma sigma_d / sqrt(sigma^2 + sigma_d^2)

(the minus sign for prediction_type "v_prediction"). Data range: a UNet with
`center_input_sample=True` maps its input from [0, 1] to [-1, 1] itself (score-SDE models), so
its data lie in [0, 1]; the others in [-1, 1]. Units change from there in `images` only.

Refused, with the scheduler's name and the reason (`ModelLoadError`): consistency models (their
network returns a sample, not E[x_0 | x_t]), and schedulers that declare no time axis whose
network convention is known.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from operators import per_sample

from posterior_diff.denoisers import PREDICTIONS, ModuleDenoiser, as_time
from posterior_diff.schedules import DiscreteSchedule, GeometricVESchedule

LEARNED_VARIANCE = ("learned", "learned_range")
SIGMA_SCHEDULERS = {"ScoreSdeVeScheduler": "score-sde", "EDMEulerScheduler": "edm", "EDMDPMSolverMultistepScheduler": "edm"}
CONSISTENCY_SCHEDULERS = ("CMStochasticIterativeScheduler", "LCMScheduler", "TCDScheduler", "SCMScheduler",
                          "ConsistencyDecoderScheduler")
CONSISTENCY_REASON = ("it samples a consistency model, whose network maps x_t straight to a sample (an end point of "
                      "the probability-flow ODE), not to the posterior mean E[x_0 | x_t]: Tweedie's formula and the "
                      "posterior guidance built on it do not apply")
UNUSABLE_SCHEDULERS = {
    "ScoreSdeVpScheduler": "no diffusers pipeline defines how its network is called (time input and output scale), "
                           "so no posterior mean can be derived from it; save the model with a DDPMScheduler instead",
    "KarrasVeScheduler": "it is a sampler without a training schedule: its sigma range is the sampler's, not the model's",
}
KNOWN_SCHEDULERS = ("the DDPM family (any scheduler with alphas_cumprod), ScoreSdeVeScheduler, EDMEulerScheduler, "
                    "EDMDPMSolverMultistepScheduler")


class ModelLoadError(ValueError):
    """A model source that cannot be loaded: a bad folder, an unusable scheduler, or a hub id
    with no network or cache."""


def refuse_by_name(name: str) -> None:
    """ModelLoadError for a scheduler class known by its name to define no posterior mean
    (checked on a config's `_class_name` too, before diffusers is asked for the class)."""
    if name in CONSISTENCY_SCHEDULERS:
        raise ModelLoadError(f"{name} cannot define a posterior-mean denoiser: {CONSISTENCY_REASON}")
    if name in UNUSABLE_SCHEDULERS:
        raise ModelLoadError(f"{name} cannot define a posterior-mean denoiser: {UNUSABLE_SCHEDULERS[name]}")


def scheduler_family(scheduler) -> str:
    """"discrete", "score-sde" or "edm" for a diffusers scheduler; ModelLoadError (naming the
    scheduler and the reason) for one that cannot define a posterior-mean denoiser."""
    name = type(scheduler).__name__
    refuse_by_name(name)
    if name in SIGMA_SCHEDULERS:
        return SIGMA_SCHEDULERS[name]
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return "discrete"
    raise ModelLoadError(f"{name} cannot define a posterior-mean denoiser: it has no alphas_cumprod and no known sigma "
                         f"range with a known network convention; supported: {KNOWN_SCHEDULERS}")


def _config(scheduler, key: str, default=None):
    return scheduler.config.get(key, default)


def check_unet_for(family: str, unet, scheduler) -> int:
    """Check that the UNet's config fits the scheduler's family; returns the mean output channels.

    Raises:
        ModelLoadError: a fourier (sigma-input) UNet with a non-score-SDE scheduler or the
            reverse, or output channels that are neither C nor ADM's 2C with learned variance.
    """
    name, config = type(scheduler).__name__, unet.config
    embedding = getattr(config, "time_embedding_type", "positional")
    if (embedding == "fourier") != (family == "score-sde"):
        need = "ScoreSdeVeScheduler" if embedding == "fourier" else "a UNet with time_embedding_type='fourier' (sigma in, score out)"
        raise ModelLoadError(f"{name} does not fit this UNet (time_embedding_type={embedding!r}): it needs {need}")
    channels, out = int(config.in_channels), int(config.out_channels)
    variance = _config(scheduler, "variance_type")
    if out == channels:
        return channels
    if family == "discrete" and out == 2 * channels and variance in LEARNED_VARIANCE:
        return channels  # ADM: [eps, variance interpolation]; the mean channels come first
    raise ModelLoadError(
        f"the UNet returns {out} channels for {channels} input channels with {name}(variance_type={variance!r}): only C, "
        f"or 2C with variance_type 'learned' / 'learned_range' (ADM: the first C are the mean) are understood")


def check_prediction(scheduler, allowed: tuple[str, ...]) -> str:
    """The scheduler's prediction_type, if it is one of `allowed`; ModelLoadError otherwise."""
    prediction = _config(scheduler, "prediction_type", "epsilon")
    if prediction not in allowed:
        raise ModelLoadError(f"{type(scheduler).__name__} has prediction_type={prediction!r}; "
                             f"understood here: {sorted(allowed)}")
    return prediction


def check_class_label(unet, class_label: int | None) -> int | None:
    """The class label, checked against whether the UNet is class-conditional."""
    conditional = getattr(unet, "class_embedding", None) is not None
    if conditional and class_label is None:
        raise ValueError("this UNet is class-conditional: pass class_label=<an int class index>")
    if not conditional and class_label is not None:
        raise ValueError(f"class_label={class_label!r} was given but this UNet is unconditional")
    if class_label is not None and (isinstance(class_label, bool) or not isinstance(class_label, int)):
        raise ValueError(f"class_label must be an int class index, got {class_label!r}")
    return class_label


class DiffusersUNetDenoiser(ModuleDenoiser):
    """What every diffusers UNet2DModel format shares: padding, dtype, class labels, mean channels.

    Args:
        unet: a `diffusers.UNet2DModel` (any dtype; it runs in its own dtype), or a module with
            its call signature `unet(sample, timestep, class_labels=...) -> .sample` and `.config`.
        schedule, prediction, time_input: as in ModuleDenoiser.
        class_label: the class for a class-conditional UNet (required there), else None.
        mean_channels: how many leading output channels hold the prediction (C; ADM returns 2C).

    Images whose height or width is not a multiple of the UNet's downsampling factor are padded
    by reflection and cropped back, so any size works. `data_range` is (0, 1) for a UNet with
    `center_input_sample=True`, else (-1, 1).
    """

    def __init__(self, unet, schedule, prediction: str, time_input, class_label: int | None = None,
                 mean_channels: int | None = None):
        super().__init__(unet.eval().requires_grad_(False), schedule, prediction, time_input)
        config = unet.config
        self.channels = int(config.in_channels)
        self.mean_channels = self.channels if mean_channels is None else int(mean_channels)
        self.data_range = (0.0, 1.0) if getattr(config, "center_input_sample", False) else (-1.0, 1.0)
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)
        self.class_label = check_class_label(unet, class_label)

    def unet_output(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The UNet's raw output at input x (B, C, H, W) and (B,) timesteps: padded, cropped back,
        its mean channels only, in x's dtype."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.downsampling, -width % self.downsampling
        padded = x
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            padded = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        unet_dtype = next(self.module.parameters()).dtype
        labels = None
        if self.class_label is not None:
            labels = torch.full((x.shape[0],), self.class_label, dtype=torch.long, device=x.device)
        output = self.module(padded.to(unet_dtype), timestep.to(unet_dtype), class_labels=labels).sample
        return output[:, : self.mean_channels, :height, :width].to(x.dtype)

    def network_output(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet_output(x_t, self.time_input(t))


class UNetDenoiser(DiffusersUNetDenoiser):
    """A UNet2DModel trained on a discrete DDPM schedule (DDPM, ADM), as a Denoiser.

    Args:
        unet: a `diffusers.UNet2DModel`.
        alphas_cumprod: the training schedule's cumulative alphas (T,), from the scheduler.
        prediction: the scheduler's `prediction_type` ("epsilon", "v_prediction" or "sample").
        class_label: the class for a class-conditional UNet (required there), else None.
        mean_channels: C, or for ADM's learned variance (2C outputs) the C mean channels.

    Continuous t maps to the fractional training timestep T t - 1, passed as a float tensor
    (a Python float would be truncated to an integer by the UNet).
    """

    def __init__(self, unet, alphas_cumprod: Tensor, prediction: str = "epsilon", class_label: int | None = None,
                 mean_channels: int | None = None):
        schedule = DiscreteSchedule(alphas_cumprod)
        super().__init__(unet, schedule, prediction, schedule.timestep, class_label, mean_channels)


class ScoreSdeUNetDenoiser(DiffusersUNetDenoiser):
    """A score-SDE VE UNet (NCSN++: fourier time embedding), called with sigma, returning the score.

    Args:
        unet: a `diffusers.UNet2DModel` with time_embedding_type="fourier".
        sigma_min, sigma_max: the ScoreSdeVeScheduler's noise range; the time axis is
            sigma(t) = sigma_min (sigma_max / sigma_min)^t (GeometricVESchedule), alpha = 1.
        class_label: as for UNetDenoiser.

    D = x + sigma^2 score, in the UNet's data range ([0, 1] with center_input_sample=True).
    """

    def __init__(self, unet, sigma_min: float, sigma_max: float, class_label: int | None = None):
        schedule = GeometricVESchedule(sigma_min, sigma_max)
        super().__init__(unet, schedule, "score", schedule.sigma, class_label)


class EDMUNetDenoiser(DiffusersUNetDenoiser):
    """An EDM-preconditioned UNet: D = c_skip x + c_out F(c_in x, c_noise) (module docstring).

    Args:
        unet: a `diffusers.UNet2DModel` whose timestep input is c_noise = log(sigma) / 4.
        sigma_min, sigma_max: the EDM scheduler's sigma range; time axis GeometricVESchedule.
        sigma_data: the data's standard deviation in model units (0.5 for [-1, 1] images).
        prediction: "epsilon" (c_out > 0, Karras' F) or "v_prediction" (c_out < 0), as diffusers.
        class_label: as for UNetDenoiser.
    """

    def __init__(self, unet, sigma_min: float, sigma_max: float, sigma_data: float = 0.5, prediction: str = "epsilon",
                 class_label: int | None = None):
        if prediction not in ("epsilon", "v_prediction"):
            raise ModelLoadError("EDM preconditioning is defined for prediction_type 'epsilon' or 'v_prediction', "
                                 f"got {prediction!r}")
        if not sigma_data > 0:
            raise ModelLoadError(f"sigma_data must be positive, got {sigma_data}")
        schedule = GeometricVESchedule(sigma_min, sigma_max)
        super().__init__(unet, schedule, prediction, lambda t: 0.25 * torch.log(schedule.sigma(t)), class_label)
        self.sigma_data = float(sigma_data)
        self.output_sign = 1.0 if prediction == "epsilon" else -1.0

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_in, c_skip, c_out) at noise levels sigma (any shape)."""
        scale = torch.sqrt(sigma**2 + self.sigma_data**2)
        return 1 / scale, self.sigma_data**2 / scale**2, self.output_sign * sigma * self.sigma_data / scale

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x_t)
        c_in, c_skip, c_out = self.preconditioning(per_sample(self.schedule.sigma(t), x_t))
        return c_skip * x_t + c_out * self.unet_output(c_in * x_t, self.time_input(t))


def denoiser_from_diffusers(unet, scheduler, class_label: int | None = None) -> DiffusersUNetDenoiser:
    """The Denoiser of a diffusers UNet2DModel and its training scheduler (see the module docstring).

    Raises:
        ModelLoadError: a scheduler that cannot define E[x_0 | x_t] (consistency models, unknown
            ones), or a UNet that does not fit it; the message names the scheduler and the reason.
    """
    family, mean_channels, prediction = diffusers_format(unet, scheduler)
    if family == "score-sde":
        return ScoreSdeUNetDenoiser(unet, _config(scheduler, "sigma_min"), _config(scheduler, "sigma_max"), class_label)
    if family == "edm":
        return EDMUNetDenoiser(unet, _config(scheduler, "sigma_min"), _config(scheduler, "sigma_max"),
                               _config(scheduler, "sigma_data", 0.5), prediction, class_label)
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    return UNetDenoiser(unet, alphas_cumprod, prediction, class_label, mean_channels)


def diffusers_format(unet, scheduler) -> tuple[str, int, str]:
    """(family, mean output channels, prediction type) of a UNet and its scheduler, checked
    without building the denoiser; a ModelLoadError naming the scheduler where they define none."""
    family = scheduler_family(scheduler)
    mean_channels = check_unet_for(family, unet, scheduler)
    if family == "score-sde":
        return family, mean_channels, "score"
    allowed = ("epsilon", "v_prediction") if family == "edm" else tuple(PREDICTIONS)
    return family, mean_channels, check_prediction(scheduler, allowed)


def check_diffusers_pair(unet, scheduler) -> str:
    """Check, without building the denoiser, that a UNet and scheduler define one; returns the family."""
    return diffusers_format(unet, scheduler)[0]

