"""Loading image models: a diffusers UNet + its noise schedule as a Denoiser, and the default.

`load_model(source)` takes a Denoiser (returned as is) or a local folder in the diffusers
layout: a pipeline folder (`model_index.json`, `unet/`, `scheduler/`) or a UNet folder
(`config.json` + weights) with a `scheduler/` subfolder or a `scheduler_config.json`.
`default_model()` is the UNet trained here by denoising score matching that ships inside the
package (`posterior_diff/default_model/`, reproduced by `scripts/train_default_model.py`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from .denoisers import Denoiser, ModuleDenoiser
from .schedules import DiscreteSchedule

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


class UNetDenoiser(ModuleDenoiser):
    """A diffusers UNet2DModel trained on a discrete DDPM schedule, as a Denoiser in [-1, 1].

    Args:
        unet: a `diffusers.UNet2DModel`.
        alphas_cumprod: the training schedule's cumulative alphas (T,), from the scheduler.
        prediction: the scheduler's `prediction_type` ("epsilon", "v_prediction" or "sample").

    Continuous t maps to the fractional training timestep T t - 1, passed as a float tensor
    (a Python float would be truncated to an integer by the UNet). Images whose height or
    width is not a multiple of the UNet's downsampling factor are padded by reflection and
    cropped back, so any size works. The conversion to E[x_0 | x_t] is ModuleDenoiser's.
    """

    data_range = (-1.0, 1.0)

    def __init__(self, unet, alphas_cumprod: Tensor, prediction: str = "epsilon"):
        super().__init__(unet.eval().requires_grad_(False), DiscreteSchedule(alphas_cumprod), prediction)
        self.channels = int(unet.config.in_channels)
        self.downsampling = 2 ** (len(unet.config.block_out_channels) - 1)

    def network_output(self, x_t: Tensor, t: Tensor) -> Tensor:
        height, width = x_t.shape[-2:]
        pad_h, pad_w = -height % self.downsampling, -width % self.downsampling
        padded = x_t
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            padded = F.pad(x_t, (0, pad_w, 0, pad_h), mode=mode)
        unet_dtype = next(self.module.parameters()).dtype
        output = self.module(padded.to(unet_dtype), self.time_input(t).to(unet_dtype)).sample
        return output[..., :height, :width].to(x_t.dtype)


def _load_folder(folder: Path) -> UNetDenoiser:
    from diffusers import DDPMScheduler, UNet2DModel

    if (folder / "unet").is_dir():
        unet_folder = folder / "unet"
    elif (folder / "config.json").is_file():
        unet_folder = folder
    else:
        raise ValueError(f"{folder} is not a diffusers model folder: expected unet/ (a pipeline) or config.json (a UNet)")
    if (folder / "scheduler").is_dir():
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    elif (folder / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(folder)
    else:
        raise ValueError(f"{folder} has no scheduler/ folder or scheduler_config.json: the noise schedule is unknown")
    unet = UNet2DModel.from_pretrained(unet_folder).float()
    return UNetDenoiser(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type)


def load_model(source: Denoiser | str | Path) -> Denoiser:
    """A Denoiser from a Denoiser or a local diffusers folder (see the module docstring)."""
    if isinstance(source, Denoiser):
        return source
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return _load_folder(Path(source))
    raise ValueError(f"model must be a Denoiser or a folder holding a diffusers model, got {source!r}")


@functools.lru_cache(maxsize=1)
def default_model() -> UNetDenoiser:
    """The embedded default image model (3-channel, [-1, 1]), loaded once per process."""
    if not (DEFAULT_MODEL_DIR / "unet").is_dir():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reproduce it with "
            "`python scripts/train_default_model.py --install`, or pass model=..."
        )
    return _load_folder(DEFAULT_MODEL_DIR)
