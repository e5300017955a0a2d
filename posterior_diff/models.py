"""Loading image models: a diffusers UNet + its noise schedule as a Denoiser, and the default.

`load_model(source)` takes a Denoiser (returned as is), a local folder in the diffusers layout,
or a Hugging Face hub id ("org/name"). A folder is a pipeline folder (`model_index.json`,
`unet/`, `scheduler/`) or a UNet folder (`config.json` + weights) with a `scheduler/` subfolder
or a `scheduler_config.json`. A hub id is fetched (or found in the local cache) as such a
folder, then loaded by the same code, through diffusers' own `from_pretrained`.

Any scheduler of the DDPM family defines the model's time axis: DDPM, DDIM, PNDM, Euler
discrete, ... all carry the training `alphas_cumprod` and `prediction_type`; only those two
are read, never the scheduler's `step()`.

`default_model()` is the UNet trained here by denoising score matching that ships inside the
package (`posterior_diff/default_model/`, reproduced by `scripts/train_default_model.py`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoisers import Denoiser, ModuleDenoiser
from .schedules import DiscreteSchedule

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a pixel-space UNet pipeline needs from a hub repository (not its latent or text parts).
HUB_FILES = ["model_index.json", "config.json", "scheduler_config.json", "diffusion_pytorch_model*",
             "unet/*", "scheduler/*"]


class ModelLoadError(ValueError):
    """A model source that cannot be loaded: a bad folder, or a hub id with no network or cache."""


class UNetDenoiser(ModuleDenoiser):
    """A diffusers UNet2DModel trained on a discrete DDPM schedule, as a Denoiser in [-1, 1].

    Args:
        unet: a `diffusers.UNet2DModel` (any dtype; it runs in its own dtype).
        alphas_cumprod: the training schedule's cumulative alphas (T,), from the scheduler.
        prediction: the scheduler's `prediction_type` ("epsilon", "v_prediction" or "sample").
        class_label: the class for a class-conditional UNet (required there), else None.

    Continuous t maps to the fractional training timestep T t - 1, passed as a float tensor
    (a Python float would be truncated to an integer by the UNet). Images whose height or
    width is not a multiple of the UNet's downsampling factor are padded by reflection and
    cropped back, so any size works. The conversion to E[x_0 | x_t] is ModuleDenoiser's.
    """

    data_range = (-1.0, 1.0)

    def __init__(self, unet, alphas_cumprod: Tensor, prediction: str = "epsilon", class_label: int | None = None):
        super().__init__(unet.eval().requires_grad_(False), DiscreteSchedule(alphas_cumprod), prediction)
        self.channels = int(unet.config.in_channels)
        self.downsampling = 2 ** (len(unet.config.block_out_channels) - 1)
        conditional = getattr(unet, "class_embedding", None) is not None
        if conditional and class_label is None:
            raise ValueError("this UNet is class-conditional: pass class_label=<an int class index>")
        if not conditional and class_label is not None:
            raise ValueError(f"class_label={class_label!r} was given but this UNet is unconditional")
        if class_label is not None and (isinstance(class_label, bool) or not isinstance(class_label, int)):
            raise ValueError(f"class_label must be an int class index, got {class_label!r}")
        self.class_label = class_label

    def network_output(self, x_t: Tensor, t: Tensor) -> Tensor:
        height, width = x_t.shape[-2:]
        pad_h, pad_w = -height % self.downsampling, -width % self.downsampling
        padded = x_t
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            padded = F.pad(x_t, (0, pad_w, 0, pad_h), mode=mode)
        unet_dtype = next(self.module.parameters()).dtype
        labels = None
        if self.class_label is not None:
            labels = torch.full((x_t.shape[0],), self.class_label, dtype=torch.long, device=x_t.device)
        output = self.module(padded.to(unet_dtype), self.time_input(t).to(unet_dtype), class_labels=labels).sample
        return output[..., :height, :width].to(x_t.dtype)


def denoiser_from_diffusers(unet, scheduler, class_label: int | None = None) -> UNetDenoiser:
    """A UNetDenoiser from a diffusers UNet2DModel and any scheduler carrying `alphas_cumprod`.

    Raises:
        ModelLoadError: for a scheduler without a discrete training schedule (e.g. score-SDE VE).
    """
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ModelLoadError(
            f"{type(scheduler).__name__} has no alphas_cumprod: only schedulers of the DDPM family "
            "(DDPM, DDIM, PNDM, Euler discrete, ...) define the discrete training schedule read here"
        )
    prediction = scheduler.config.get("prediction_type", "epsilon")
    return UNetDenoiser(unet, torch.as_tensor(alphas_cumprod, dtype=torch.float64), prediction, class_label)


def _load_scheduler(folder: Path):
    import diffusers

    for config_folder in (folder / "scheduler", folder):
        if (config_folder / "scheduler_config.json").is_file():
            break
    else:
        raise ModelLoadError(f"{folder} has no scheduler/ folder or scheduler_config.json: the noise schedule is unknown")
    class_name = json.loads((config_folder / "scheduler_config.json").read_text()).get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_pretrained"):
        raise ModelLoadError(f"{config_folder / 'scheduler_config.json'} names an unknown scheduler class {class_name!r}")
    return scheduler_class.from_pretrained(config_folder)


def _load_folder(folder: Path, class_label: int | None = None) -> UNetDenoiser:
    from diffusers import UNet2DModel

    if (folder / "unet").is_dir():
        unet_folder = folder / "unet"
    elif (folder / "config.json").is_file():
        unet_folder = folder
    else:
        raise ModelLoadError(f"{folder} is not a diffusers model folder: expected unet/ (a pipeline) or config.json (a UNet)")
    class_name = json.loads((unet_folder / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ModelLoadError(f"{unet_folder} holds a {class_name}; pixel-space UNet2DModel models are supported")
    scheduler = _load_scheduler(folder)
    unet = UNet2DModel.from_pretrained(unet_folder).float()
    return denoiser_from_diffusers(unet, scheduler, class_label)


def resolve_model_folder(source: str | Path, *, cache_dir: str | Path | None = None,
                         local_files_only: bool = False) -> Path:
    """The local folder for `source`: the folder itself, or a hub id's downloaded or cached copy.

    Args:
        source: a folder, or a hub id "org/name" (only the UNet and scheduler files are fetched).
        cache_dir: the Hugging Face cache to use (default: HF_HUB_CACHE).
        local_files_only: never touch the network, use the cache only (as HF_HUB_OFFLINE=1 does).

    Raises:
        ModelLoadError: a missing folder, or a hub id that can be neither downloaded nor found in
            the cache; the message says how to pass a folder instead.
    """
    path = Path(source)
    if path.is_dir():
        return path
    if not (isinstance(source, str) and HUB_ID.match(source)) or path.exists():
        raise ModelLoadError(f"model must be a Denoiser, a folder holding a diffusers model or a hub id 'org/name', got {source!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES, cache_dir=cache_dir, local_files_only=local_files_only))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise ModelLoadError(
            f"cannot load {source!r}: there is no such folder, and as a Hugging Face hub id it is neither in the "
            f"local cache nor downloadable ({type(error).__name__}: no network?). Without network, pass a local folder instead: model='path/to/folder' "
            "(a diffusers pipeline or UNet folder, e.g. written by save_pretrained or copied from a machine with "
            "internet). To skip connection attempts set HF_HUB_OFFLINE=1 or pass local_files_only=True."
        ) from None


def load_model(source: Denoiser | str | Path, *, class_label: int | None = None, cache_dir: str | Path | None = None,
               local_files_only: bool = False) -> Denoiser:
    """A Denoiser from a Denoiser, a local diffusers folder or a hub id (see the module docstring).

    Args:
        source: the model.
        class_label: the class index for class-conditional UNets.
        cache_dir, local_files_only: as in `resolve_model_folder`, for hub ids.
    """
    if isinstance(source, Denoiser):
        return source
    if not isinstance(source, (str, Path)):
        raise ModelLoadError(f"model must be a Denoiser, a folder or a hub id, got {type(source).__name__}")
    folder = resolve_model_folder(source, cache_dir=cache_dir, local_files_only=local_files_only)
    return _load_folder(folder, class_label)


@functools.lru_cache(maxsize=1)
def default_model() -> UNetDenoiser:
    """The embedded default image model (3-channel, [-1, 1]), loaded once per process."""
    if not (DEFAULT_MODEL_DIR / "unet").is_dir():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reproduce it with "
            "`python scripts/train_default_model.py --install`, or pass model=..."
        )
    return _load_folder(DEFAULT_MODEL_DIR)
