r"""Denoising score matching (docs/theory.md §4): train a diffusers UNet2DModel to predict noise.

    L(theta) = E_{n, x_0, eps} w(n) || eps_theta(alpha_n x_0 + sigma_n eps, n) - eps ||^2,

over uniformly drawn DDPM timesteps n, with x_0 random crops (flipped and rotated by
multiples of 90 degrees, and with `scale_range` shrunk by a random factor first, antialiased,
so one photograph is seen at many scales) of training images in [-1, 1]. The weight w(n) is 1
(`loss_weighting="uniform"`) or min-SNR-gamma (Hang et al. 2023, "min_snr"):
w(n) = min(SNR_n, gamma) / SNR_n with SNR_n = alpha_n^2 / sigma_n^2, which for epsilon
prediction down-weights the low-noise steps whose gradients conflict with the others. The
optimum is eps_theta = -sigma * score either way, so the trained network is a Denoiser through
ModuleDenoiser. The logged loss is the unweighted noise-prediction MSE, comparable across recipes.

The recipe (TrainingConfig): Adam with a linear warm-up then a constant or cosine learning rate,
optional gradient clipping, an exponential moving average (EMA) of the weights, the UNet's width,
depth, self-attention levels and dropout, crop size and scales, bf16 autocast on a GPU. A run can
start from trained weights (`init_from`: the package's model folder, a diffusers pipeline folder or
a UNet folder; its architecture and noise schedule are taken over, the optimiser is fresh and the
warm-up runs again) and can train on a CUDA GPU (`train(..., device="cuda")`); checkpoints and the
saved model are on the CPU either way, so `posterior_diff.load_model(OUT)` reads them anywhere.

Training writes a checkpoint (model, EMA, optimiser, random-number states, step) every
`checkpoint_every` steps to `OUT/checkpoint.pt`, atomically (a temporary file renamed over the
old one), and also when it is stopped by `stop_after` steps, `stop_after_seconds` or SIGTERM,
so an interrupted run resumes from the last checkpoint and loses at most the steps since. A
checkpoint holds only tensors, numbers, strings, bools, None, tuples, lists and dicts, and
`load_checkpoint` reads it with `torch.load(..., weights_only=True)`, which refuses pickled
objects of any other kind, so a checkpoint from an untrusted source cannot run code. At the
end the EMA weights are saved in the diffusers pipeline layout (`DDPMPipeline.save_pretrained`),
which both `diffusers.DDPMPipeline.from_pretrained(OUT)` and `posterior_diff.load_model(OUT)` read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from posterior_diff.files import atomic_write
from posterior_diff.images import load_image_folder

CHECKPOINT = "checkpoint.pt"
LOSS_WEIGHTINGS = ("uniform", "min_snr")
LR_SCHEDULES = ("constant", "cosine")
IMAGE_WEIGHTINGS = ("area", "sqrt_area", "equal")
MIXED_PRECISIONS = ("no", "bf16")


@dataclass
class TrainingConfig:
    """Everything that defines a training run (saved with every checkpoint).

    steps: optimiser steps. batch_size: crops per step. crop_size: crop side in pixels.
    scale_range: (low, high) factors by which an image is shrunk (antialiased) before a crop is
        cut, drawn log-uniformly per crop (and at most what the image's size allows); (1, 1)
        crops at the photographs' own resolution.
    image_weighting: how often each image is drawn: "area" (every pixel equally likely),
        "sqrt_area" or "equal" (every photograph equally likely).
    channels: 3 (colour; grey images are repeated) or 1 (grey; colour images averaged).
    block_out_channels, layers_per_block: the UNet's width per resolution and depth.
    attention_levels: resolutions (0 = full, 1 = half, ...) whose down and up blocks have
        self-attention; mid_attention: self-attention in the middle block (diffusers' default);
        attention_head_dim: channels per attention head. dropout: in the ResNet blocks.
    learning_rate: Adam step after a linear warm-up of `warmup_steps`; then constant or, with
        lr_schedule="cosine", a half cosine down to learning_rate * final_lr_fraction at `steps`.
    max_grad_norm: gradient-norm clipping (0: none). ema_decay: EMA factor.
    loss_weighting: "uniform" or "min_snr" (weight min(SNR, min_snr_gamma) / SNR per timestep).
    num_train_timesteps, beta_start, beta_end: the DDPM (linear-beta) noise schedule.
    mixed_precision: "no" or "bf16" (autocast of the UNet's forward pass; for GPUs).
    init_from: a model folder whose UNet weights the run starts from (architecture and noise
        schedule are then the folder's, recorded in unet_config and the schedule fields).
    unet_config: the UNet2DModel config to build instead of the one the fields above describe.
    checkpoint_every: steps between checkpoints. seed: initialisation, crops and noise.
    """

    steps: int = 20000
    batch_size: int = 32
    crop_size: int = 32
    scale_range: tuple[float, float] = (1.0, 1.0)
    image_weighting: str = "area"
    channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    attention_head_dim: int = 8
    dropout: float = 0.0
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    lr_schedule: str = "constant"
    final_lr_fraction: float = 0.0
    max_grad_norm: float = 0.0
    ema_decay: float = 0.999
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mixed_precision: str = "no"
    init_from: str | None = None
    unet_config: dict | None = None
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(sorted({int(level) for level in self.attention_levels}))
        self.scale_range = tuple(float(s) for s in self.scale_range)
        if self.init_from is not None:
            self.init_from = str(self.init_from)
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.crop_size % factor:
            raise ValueError(f"crop_size must be a multiple of {factor} (the UNet's downsampling), got {self.crop_size}")
        if len(self.scale_range) != 2 or not 1.0 <= self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 1 <= low <= high, got {self.scale_range}")
        if any(not 0 <= level < len(self.block_out_channels) for level in self.attention_levels):
            raise ValueError(f"attention_levels must lie in 0..{len(self.block_out_channels) - 1}, got {self.attention_levels}")
        for name, value, allowed in (("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("image_weighting", self.image_weighting, IMAGE_WEIGHTINGS),
                                     ("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction}")


def unet_kwargs(config: TrainingConfig) -> dict:
    """The UNet2DModel config for `config` (its unet_config when set)."""
    if config.unet_config is not None:
        return dict(config.unet_config)
    depth = len(config.block_out_channels)
    attention = set(config.attention_levels)
    return dict(
        sample_size=config.crop_size,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if level in attention else "DownBlock2D" for level in range(depth)),
        up_block_types=tuple("AttnUpBlock2D" if level in attention else "UpBlock2D" for level in reversed(range(depth))),
        norm_num_groups=_norm_groups(config.block_out_channels),
        add_attention=config.mid_attention,
        attention_head_dim=config.attention_head_dim,
        dropout=config.dropout,
    )


def _norm_groups(widths: Sequence[int]) -> int:
    """The most GroupNorm groups (at most 32) that divide every width: 32 for (32, 64, 128), 24 for (48, 96)."""
    common = math.gcd(*widths)
    return max(groups for groups in range(1, 33) if common % groups == 0)


def build_unet(config: TrainingConfig):
    """A noise-predicting diffusers UNet2DModel of the configured width, depth and attention."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_kwargs(config))


def build_scheduler(config: TrainingConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,  # for diffusers samplers (DDPMPipeline) on the saved folder; DSM training never clips
    )


def parameter_count(config: TrainingConfig) -> int:
    """The UNet's number of parameters (its float16 safetensors file is about twice that in bytes)."""
    return sum(parameter.numel() for parameter in build_unet(config).parameters())


# -- starting from trained weights ------------------------------------------------------


def find_unet_folder(folder: str | Path) -> Path:
    """The diffusers UNet2DModel folder in `folder`: `folder/unet` of a pipeline (such as the
    package's `posterior_diff/models/default_model`) or `folder` itself.

    Raises:
        FileNotFoundError: neither holds a UNet2DModel config.json.
    """
    folder = Path(folder)
    for candidate in (folder / "unet", folder):
        path = candidate / "config.json"
        if path.is_file() and json.loads(path.read_text()).get("_class_name") == "UNet2DModel":
            return candidate
    raise FileNotFoundError(f"{folder} holds no diffusers UNet2DModel (no unet/config.json or config.json of a UNet2DModel)")


def config_from_init(config: TrainingConfig) -> TrainingConfig:
    """`config` with the architecture and noise schedule of the model in `config.init_from`.

    The UNet's config becomes `unet_config` (its widths, depth, attention, channels and dropout
    also fill the corresponding fields, sample_size becomes the crop size); a scheduler folder
    beside it (`scheduler/scheduler_config.json` of a pipeline) gives the linear-beta schedule.

    Raises:
        FileNotFoundError: no UNet in the folder. ValueError: a UNet that does not predict noise
            for its input channels, or a scheduler other than linear-beta epsilon prediction.
    """
    unet_folder = find_unet_folder(config.init_from)
    unet_config = {key: value for key, value in json.loads((unet_folder / "config.json").read_text()).items()
                   if not key.startswith("_")}
    if unet_config.get("in_channels") != unet_config.get("out_channels") or unet_config.get("in_channels") not in (1, 3):
        raise ValueError(f"{unet_folder}: in_channels and out_channels must be equal, 1 or 3, to predict noise; "
                         f"got {unet_config.get('in_channels')} and {unet_config.get('out_channels')}")
    unet_config["sample_size"] = config.crop_size
    down = list(unet_config.get("down_block_types", ()))
    changes = dict(
        unet_config=unet_config, channels=unet_config["in_channels"],
        block_out_channels=tuple(unet_config["block_out_channels"]), layers_per_block=unet_config["layers_per_block"],
        attention_levels=tuple(level for level, kind in enumerate(down) if kind.startswith("Attn")),
        mid_attention=bool(unet_config.get("add_attention", True)),
        attention_head_dim=unet_config.get("attention_head_dim") or config.attention_head_dim,
        dropout=float(unet_config.get("dropout", 0.0)),
    )
    scheduler_path = unet_folder.parent / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():
        scheduler = json.loads(scheduler_path.read_text())
        if (scheduler.get("beta_schedule", "linear") != "linear" or scheduler.get("trained_betas") is not None
                or scheduler.get("prediction_type", "epsilon") != "epsilon"):
            raise ValueError(f"{scheduler_path}: training continues only linear-beta epsilon-prediction DDPM models; got "
                             f"beta_schedule={scheduler.get('beta_schedule')!r}, prediction_type={scheduler.get('prediction_type')!r}")
        changes.update(num_train_timesteps=int(scheduler["num_train_timesteps"]), beta_start=float(scheduler["beta_start"]),
                       beta_end=float(scheduler["beta_end"]))
    return dataclasses.replace(config, **changes)


def load_init_weights(folder: str | Path) -> dict[str, Tensor]:
    """The float32 state dict of the UNet in `folder` (see find_unet_folder)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(find_unet_folder(folder))
    return {key: value.detach().float().clone() for key, value in unet.state_dict().items()}


# -- crops ------------------------------------------------------------------------------


def _to_model_range(crop: Tensor) -> Tensor:
    """A crop of a uint8 image (0..255) or a float image ([-1, 1]) as float32 in [-1, 1]."""
    if crop.dtype == torch.uint8:
        return crop.float() / 127.5 - 1
    return crop.float()


def _halve(image: Tensor) -> Tensor:
    """An image (C, H, W) shrunk to half its size, antialiased, in its own dtype."""
    height, width = image.shape[-2] // 2, image.shape[-1] // 2
    small = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    if image.dtype == torch.uint8:
        return small.round_().clamp_(0, 255).to(torch.uint8)
    return small.to(image.dtype)


def _match_channels(crop: Tensor, channels: int | None) -> Tensor:
    if channels is None or crop.shape[0] == channels:
        return crop
    if crop.shape[0] == 1 and channels == 3:
        return crop.expand(3, *crop.shape[1:])
    if crop.shape[0] == 3 and channels == 1:
        return crop.mean(0, keepdim=True)
    raise ValueError(f"cannot convert a {crop.shape[0]}-channel image to {channels} channels")


class RandomCrops:
    """Batches of random square crops of images, in [-1, 1], randomly flipped and rotated.

    Images are (C, H, W) tensors: float in [-1, 1], or uint8 in 0..255 (a quarter of the memory
    for large photographs). With `scale_range` (low, high) other than (1, 1) each crop is cut
    from the image shrunk by a factor s drawn log-uniformly from [low, min(high, side / crop_size)]
    with antialiasing (a cached pyramid of halvings, then an antialiased bilinear resize of the
    crop's region by the remaining factor in [1, 2)), so one photograph gives crops at many scales.

    Images are drawn in proportion to their area ("area": every pixel equally likely), to its
    square root ("sqrt_area") or equally often ("equal"). `channels` converts every crop to 1
    or 3 channels (grey repeated, colour averaged); None leaves them as they are.
    """

    def __init__(self, images: Sequence[Tensor], crop_size: int, generator: torch.Generator, *,
                 scale_range: tuple[float, float] = (1.0, 1.0), weighting: str = "area", channels: int | None = None):
        low, high = (float(s) for s in scale_range)
        if not 1.0 <= low <= high:
            raise ValueError(f"scale_range must be (low, high) with 1 <= low <= high, got {scale_range}")
        if weighting not in IMAGE_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(IMAGE_WEIGHTINGS)}; got {weighting!r}")
        smallest = round(crop_size * low)
        usable = [image for image in images if min(image.shape[-2:]) >= smallest]
        if not usable:
            raise ValueError(f"no training image is at least {smallest}x{smallest} pixels")
        self.images = usable
        self.crop_size = crop_size
        self.generator = generator
        self.scale_range = (low, high)
        self.channels = channels
        self.multiscale = high > 1.0
        areas = torch.tensor([float(image.shape[-2] * image.shape[-1]) for image in usable])
        weights = {"area": areas, "sqrt_area": areas.sqrt(), "equal": torch.ones_like(areas)}[weighting]
        self.weights = weights / weights.sum()
        self._pyramids: list[list[Tensor]] = [[image] for image in usable]

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _level(self, index: int, level: int) -> Tensor:
        pyramid = self._pyramids[index]
        while len(pyramid) <= level:
            pyramid.append(_halve(pyramid[-1]))
        return pyramid[level]

    def draw_scale(self, image: Tensor) -> float:
        """A shrink factor for one crop of `image`, log-uniform in [low, min(high, side / crop_size)]."""
        low, high = self.scale_range
        high = max(low, min(high, min(image.shape[-2:]) / self.crop_size))
        u = float(torch.rand((1,), generator=self.generator))
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))

    def _scaled_crop(self, index: int) -> Tensor:
        image = self.images[index]
        scale = self.draw_scale(image)
        level = max(0, int(math.floor(math.log2(scale) + 1e-9)))
        while level > 0 and min(self._level(index, level).shape[-2:]) < self.crop_size:
            level -= 1
        source = self._level(index, level)
        region = min(max(self.crop_size, round(self.crop_size * scale / 2**level)), *source.shape[-2:])
        top = self._randint(source.shape[-2] - region + 1)
        left = self._randint(source.shape[-1] - region + 1)
        crop = _to_model_range(source[:, top : top + region, left : left + region])
        if region != self.crop_size:
            crop = F.interpolate(crop[None], size=(self.crop_size, self.crop_size), mode="bilinear",
                                 antialias=True, align_corners=False)[0]
        return crop

    def _plain_crop(self, index: int) -> Tensor:
        image = self.images[index]
        top = self._randint(image.shape[-2] - self.crop_size + 1)
        left = self._randint(image.shape[-1] - self.crop_size + 1)
        return _to_model_range(image[:, top : top + self.crop_size, left : left + self.crop_size])

    def batch(self, size: int) -> Tensor:
        chosen = torch.multinomial(self.weights, size, replacement=True, generator=self.generator)
        crops = []
        for index in chosen.tolist():
            crop = self._scaled_crop(index) if self.multiscale else self._plain_crop(index)
            if self._randint(2):
                crop = crop.flip(-1)
            crop = torch.rot90(crop, self._randint(4), dims=(-2, -1))
            crops.append(_match_channels(crop, self.channels))
        return torch.stack(crops)


# -- the recipe -------------------------------------------------------------------------


def min_snr_weights(alphas_cumprod: Tensor, timesteps: Tensor, gamma: float) -> Tensor:
    """min(SNR_t, gamma) / SNR_t with SNR_t = alpha_bar_t / (1 - alpha_bar_t): min-SNR-gamma
    loss weights for epsilon prediction (Hang et al. 2023)."""
    alpha_bar = alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return (snr.clamp(max=gamma) / snr).float()


def loss_weights(config: TrainingConfig, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor | None:
    """The per-sample loss weights of config.loss_weighting (None for uniform)."""
    if config.loss_weighting == "min_snr":
        return min_snr_weights(alphas_cumprod, timesteps, config.min_snr_gamma)
    return None


def learning_rate(config: TrainingConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warm-up, then constant or cosine."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "constant":
        return config.learning_rate * warm
    progress = min(1.0, max(0.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)))
    floor = config.final_lr_fraction
    return config.learning_rate * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# -- checkpoints ------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint onto the CPU without running any code it might carry.

    Uses `torch.load(path, map_location="cpu", weights_only=True)`: only tensors, numbers,
    strings, bools, None, tuples, lists and dicts are rebuilt; anything else pickled in the
    file (a class instance, a function call) is refused before it is imported or called.

    Returns:
        The checkpoint dict: "config" (TrainingConfig fields), "model" and "ema" (state dicts),
        "optimizer" (Adam state dict), "generator" (ByteTensor), "step" (int), "loss_log"
        ([step, loss] per step).

    Raises:
        ValueError: the file holds objects of other kinds.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        # torch reports a refused object as UnpicklingError (RuntimeError in older releases),
        # both starting "Weights only load failed"; other failures (a truncated file) pass through.
        if "Weights only load failed" not in str(error):
            raise
        raise ValueError(
            f"{path} holds objects other than tensors, numbers, strings, lists and dicts; "
            "pickled code is refused, so a checkpoint from an untrusted source cannot run code"
        ) from error


def _save_atomically(state: dict, path: Path) -> None:
    atomic_write(path, lambda temporary: torch.save(state, temporary))  # a reader sees the old or the new file


def _to_cpu(value):
    """Tensors (in nested dicts, lists and tuples) moved to the CPU, so checkpoints load anywhere."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
            ema_parameter.lerp_(parameter, 1 - decay)


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; a one-line ValueError for a CUDA device where there is none."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is available (torch {torch.__version__}, {build}); "
                         "use device 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class TrainingRun:
    """The state of one training run: what a checkpoint holds, and one optimiser step.

    Attributes:
        config: the run's settings; model: the UNet being trained; ema: its moving average;
        optimizer, scheduler: Adam and the DDPM scheduler; generator: crops, timesteps, noise
        (on the CPU whatever the device, so a run draws the same numbers on a GPU);
        step: optimiser steps done; loss_log: [step, loss] per step, kept across resumes;
        device: where the model trains.
    """

    config: TrainingConfig
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    step: int = 0
    loss_log: list = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def start(cls, config: TrainingConfig, state: dict | None = None, device: str | torch.device = "cpu") -> "TrainingRun":
        """A fresh run for `config` (from `config.init_from`'s weights if set), or the one a
        checkpoint `state` holds, on `device`."""
        device = resolve_device(device)
        if config.init_from is not None and config.unet_config is None and not state:
            config = config_from_init(config)  # the architecture of the weights it starts from
        torch.manual_seed(config.seed)
        model = build_unet(config)
        if config.init_from is not None and not state:
            model.load_state_dict(load_init_weights(config.init_from))
        model.to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        run = cls(config, model, ema, optimizer, build_scheduler(config), torch.Generator().manual_seed(config.seed),
                  device=device)
        if state:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            run.generator.set_state(state["generator"])
            run.step, run.loss_log = state["step"], state["loss_log"]
        return run

    def save_checkpoint(self, path: Path) -> None:
        # Only tensors, numbers, strings, tuples, lists and dicts, so load_checkpoint's
        # weights_only=True reads it back (tests check the format with torch.load directly).
        _save_atomically(
            {"config": asdict(self.config), "model": _to_cpu(self.model.state_dict()), "ema": _to_cpu(self.ema.state_dict()),
             "optimizer": _to_cpu(self.optimizer.state_dict()), "generator": self.generator.get_state(), "step": self.step,
             "loss_log": self.loss_log},
            path,
        )

    def _autocast(self):
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def optimise(self, x0: Tensor) -> float:
        """One DSM step on the crops x0 (B, C, H, W) in [-1, 1]; returns the (unweighted) noise-prediction MSE."""
        config = self.config
        timesteps = torch.randint(config.num_train_timesteps, (x0.shape[0],), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        alphas_cumprod = self.scheduler.alphas_cumprod
        alpha_bar = alphas_cumprod.float()[timesteps].reshape(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        weights = loss_weights(config, alphas_cumprod, timesteps)
        x_t, noise, device_timesteps = (tensor.to(self.device, non_blocking=True) for tensor in (x_t, noise, timesteps))
        with self._autocast():
            predicted = self.model(x_t, device_timesteps).sample
        predicted = predicted.float()
        if weights is None:
            loss = F.mse_loss(predicted, noise)
            mse = loss
        else:
            per_sample = (predicted - noise).square().mean(dim=tuple(range(1, predicted.dim())))
            loss = (weights.to(self.device) * per_sample).mean()
            mse = per_sample.mean()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        self.optimizer.step()
        # EMA with a warm-up of its own, so early averages are not dominated by the initialisation.
        _ema_update(self.ema, self.model, min(config.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        self.loss_log.append([self.step, mse.item()])
        return self.loss_log[-1][1]


def _previous_state(checkpoint_path: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from (None for a new run); refuses to start over an existing run."""
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{checkpoint_path.parent} already holds a training run; pass resume=True (--resume) to continue it")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"nothing to resume: {checkpoint_path} does not exist")
    return load_checkpoint(checkpoint_path) if resume else None


def _run_config(config: TrainingConfig | None, state: dict | None) -> TrainingConfig:
    """The checkpoint's own config on resume (a given config's `steps` replacing its total), else
    `config`, with the architecture and schedule of `init_from` when that is set."""
    if not state:
        config = config or TrainingConfig()
        return config_from_init(config) if config.init_from is not None else config
    saved = TrainingConfig(**state["config"])
    if config is not None:
        saved.steps = config.steps
    return saved


@contextmanager
def _stop_on_sigterm():
    """A dict whose "signal" is set when SIGTERM arrives (main thread only), so the loop can
    checkpoint and return instead of dying between checkpoints."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signal"] = signum

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(
    images: Sequence[Tensor] | str | Path,
    out: str | Path,
    config: TrainingConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    stop_after_seconds: float | None = None,
    snapshot_every: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train a noise-predicting UNet by denoising score matching and save it to `out`.

    Args:
        images: tensors (C, H, W), float in [-1, 1] or uint8 in 0..255 (grey or colour: each
            crop is converted to config.channels), or a folder of image files.
        out: output folder. It must not hold a run already unless `resume` is set.
        config: the run's settings. On resume the checkpoint's own config is used, except
            that a given config's `steps` replaces the total (to extend or shorten a run).
            With config.init_from the run starts from that model's weights (fresh optimiser,
            warm-up from step 0) and takes its architecture and noise schedule.
        resume: continue from `out/checkpoint.pt`, read by `load_checkpoint` (weights_only=True:
            a checkpoint carrying other pickled objects raises ValueError and runs no code).
        progress: show a tqdm bar with the loss.
        stop_after: stop (after checkpointing) once this many steps have run in this call,
            to split long runs; the final model is written only when config.steps is reached.
        stop_after_seconds: likewise, once this much wall time has passed in this call.
            SIGTERM (e.g. from `timeout`) also checkpoints and returns.
        snapshot_every: also keep the EMA weights every this many steps, as
            `out/snapshots/step_NNNNNN.safetensors` (float32; for curves of quality against steps,
            read by `load_snapshot`). The checkpoint itself holds only the latest step.
        device: "cpu", "cuda" or "cuda:N" (ValueError at once if there is no CUDA GPU). The
            checkpoint and the saved model hold CPU tensors either way.

    Returns:
        The output folder. When training has finished it holds a diffusers DDPM pipeline
        (unet/, scheduler/, model_index.json), `training_log.json`, and the final checkpoint.
    """
    device = resolve_device(device)
    out = Path(out)
    checkpoint_path = out / CHECKPOINT
    state = _previous_state(checkpoint_path, resume)
    config = _run_config(config, state)
    if isinstance(images, (str, Path)):
        images = load_image_folder(images, channels=config.channels)
    run = TrainingRun.start(config, state, device)
    crops = RandomCrops([image if image.dtype == torch.uint8 else image.float() for image in images], config.crop_size,
                        run.generator, scale_range=config.scale_range, weighting=config.image_weighting,
                        channels=config.channels)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="training")
    steps_this_call = 0
    started = time.monotonic()
    run.model.train()
    with _stop_on_sigterm() as stop:
        while run.step < config.steps and (stop_after is None or steps_this_call < stop_after):
            if stop["signal"] is not None or (stop_after_seconds is not None and time.monotonic() - started >= stop_after_seconds):
                break
            loss = run.optimise(crops.batch(config.batch_size))
            steps_this_call += 1
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if run.step % config.checkpoint_every == 0 or run.step == config.steps:
                run.save_checkpoint(checkpoint_path)
            if snapshot_every and run.step % snapshot_every == 0:
                save_snapshot(run.ema, out, run.step)
    bar.close()
    if run.step < config.steps:
        run.save_checkpoint(checkpoint_path)
        return out
    _save_pipeline(copy.deepcopy(run.ema).cpu(), run.scheduler, out)
    (out / "training_log.json").write_text(json.dumps({"config": asdict(config), "loss": run.loss_log}))
    return out


def start_model_steps(run: Path, init_from: str | None) -> int:
    """The optimiser steps behind the model that run folder `run` started from (`init_from`; 0 for
    a run from scratch): as its training_data.json recorded them when the run began, else as the
    start folder says now (`total_steps`)."""
    if init_from is None:
        return 0
    record_path = Path(run) / "training_data.json"
    record = json.loads(record_path.read_text()).get("init_from", {}) if record_path.exists() else {}
    return int(record["total_steps"]) if "total_steps" in record else total_steps(Path(init_from))


def total_steps(folder: str | Path) -> int:
    """The optimiser steps behind a model folder, counting the model it started from: the
    training_log.json's "total_steps" where recorded, else its own steps plus `start_model_steps`
    (0 without a training_log.json)."""
    folder = Path(folder)
    if not (folder / "training_log.json").exists():
        return 0
    log = json.loads((folder / "training_log.json").read_text())
    if "total_steps" in log:
        return int(log["total_steps"])
    own = int(log.get("stopped_at_step", log["config"]["steps"]))
    return own + start_model_steps(folder, log["config"].get("init_from"))


SNAPSHOTS = "snapshots"


def save_snapshot(ema, out: Path, step: int) -> Path:
    """Write the EMA weights at `step` to out/snapshots/step_NNNNNN.safetensors (atomically)."""
    from safetensors.torch import save_file

    path = out / SNAPSHOTS / f"step_{step:06d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in ema.state_dict().items()}
    atomic_write(path, lambda temporary: save_file(weights, str(temporary)))
    return path


def load_snapshot(run: str | Path, path: str | Path):
    """The UNet of training run `run` (its checkpoint gives the architecture) with the weights of
    snapshot `path`."""
    from safetensors.torch import load_file

    config = TrainingConfig(**load_checkpoint(Path(run) / CHECKPOINT)["config"])
    unet = build_unet(config)
    unet.load_state_dict(load_file(str(path)))
    return unet.eval()


def _save_pipeline(unet, scheduler, out: Path) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
