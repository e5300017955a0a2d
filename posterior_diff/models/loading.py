"""Loading image models: a diffusers UNet + its training scheduler as a Denoiser, and the default.

`load_model(source)` takes a Denoiser (returned as is), a local folder in the diffusers layout,
or a Hugging Face hub id ("org/name"). A folder is a pipeline folder (`model_index.json`,
`unet/`, `scheduler/`) or a UNet folder (`config.json` + weights) with a `scheduler/` subfolder
or a `scheduler_config.json`. A hub id is fetched (or found in the local cache) as such a
folder, then loaded by the same code, through diffusers' own `from_pretrained`.

The scheduler declares the model's time axis and the UNet's config its data range; the
network's call convention is translated into D = E[x_0 | x_t] in `model_formats`:

| family | scheduler | data range |
|---|---|---|
| DDPM (eps, v or x0; zero terminal SNR too) | DDPM, DDIM, PNDM, Euler, ... (`alphas_cumprod`) | [-1, 1] |
| ADM / guided-diffusion (2C outputs, learned variance) | DDPM family, variance_type "learned_range" | [-1, 1] |
| score-SDE VE (NCSN++) | ScoreSdeVeScheduler | [0, 1] (center_input_sample=True) |
| EDM | EDMEulerScheduler, EDMDPMSolverMultistepScheduler | [-1, 1] |

Only the scheduler's config is read, never its `step()`. Legacy scheduler names of old hub
folders are mapped (`LEGACY_SCHEDULERS`); consistency models and schedulers without a known
time axis are refused with a `ModelLoadError` naming the scheduler and the reason.

Weights: `variant` and `torch_dtype` go to `UNet2DModel.from_pretrained`; a folder holding only
a variant (e.g. `diffusion_pytorch_model.fp16.safetensors`) loads that variant. A hub download
fetches one copy of the weights: the plain ones before the fp16 variant, and of each the
safetensors, the `.bin` only where the repository has no safetensors (`hub_attempts`).

`default_model()` is the UNet trained here by denoising score matching that ships inside the
package (`posterior_diff/models/default_model/`, reproduced by `scripts/train_default_model.py`).
Its network runs in `default_network_dtype()`: bfloat16 on a CPU that computes it natively
(AVX512-BF16 or AMX), where it is about twice as fast as float32 at the same quality on every task
and covariance (docs/network_precision.md), float32 elsewhere; `default_model(torch.float32)` asks
for float32 anywhere. The sampler state stays float32 either way (`Denoiser.sampling_dtype`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from posterior_diff.denoisers import Denoiser
from posterior_diff.models.formats import (DiffusersUNetDenoiser, ModelLoadError, UNetDenoiser, check_diffusers_pair,
                            denoiser_from_diffusers, refuse_by_name, scheduler_family)

__all__ = ["DEFAULT_MODEL_DIR", "ModelLoadError", "UNetDenoiser", "DiffusersUNetDenoiser", "denoiser_from_diffusers",
           "check_diffusers_pair", "load_model", "resolve_model_folder", "default_model"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a pixel-space UNet pipeline needs from a hub repository besides the weights (not its latent or text parts).
HUB_CONFIG_FILES = ["model_index.json", "config.json", "scheduler_config.json", "unet/config.json", "scheduler/*"]
WEIGHTS = "diffusion_pytorch_model"
WEIGHT_FORMATS = ("safetensors", "bin")  # in order of preference
PLAIN_WEIGHTS = re.compile(rf"^{WEIGHTS}(-\d+-of-\d+)?\.(safetensors|bin)$|^{WEIGHTS}\.(safetensors|bin)\.index\.json$")
VARIANT_WEIGHTS = re.compile(rf"^{WEIGHTS}(?:-\d+-of-\d+)?\.([\w-]+)\.(?:safetensors|bin)$"
                             rf"|^{WEIGHTS}\.(?:safetensors|bin)\.index\.([\w-]+)\.json$")
# Scheduler class names of early diffusers releases, and the config keys they renamed since.
LEGACY_SCHEDULERS = {"GaussianDDPMScheduler": "DDPMScheduler"}
LEGACY_KEYS = {"timesteps": "num_train_timesteps", "clip_predicted_image": "clip_sample"}


def _scheduler_config(folder: Path) -> Path:
    for config_folder in (folder / "scheduler", folder):
        if (config_folder / "scheduler_config.json").is_file():
            return config_folder / "scheduler_config.json"
    raise ModelLoadError(f"{folder} has no scheduler/ folder or scheduler_config.json: the noise schedule is unknown")


def _modernised(config: dict) -> dict:
    """A scheduler config with early diffusers' key names renamed (timesteps -> num_train_timesteps, ...)."""
    renamed = {key: value for key, value in config.items() if not key.startswith("_")}
    for old, new in LEGACY_KEYS.items():
        if old in renamed and new not in renamed:
            renamed[new] = renamed.pop(old)
    return renamed


def _load_scheduler(folder: Path):
    """The folder's scheduler through diffusers' own class; legacy names and keys mapped."""
    import diffusers

    path = _scheduler_config(folder)
    config = json.loads(path.read_text())
    class_name = str(config.get("_class_name", "DDPMScheduler"))
    refuse_by_name(class_name)
    scheduler_class = getattr(diffusers, LEGACY_SCHEDULERS.get(class_name, class_name), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise ModelLoadError(f"{path} names an unknown scheduler class {class_name!r}")
    modern = _modernised(config)
    if class_name in LEGACY_SCHEDULERS or modern.keys() != {k for k in config if not k.startswith("_")}:
        return scheduler_class.from_config(modern)
    return scheduler_class.from_pretrained(path.parent)


def _unet_folder(folder: Path) -> Path:
    if (folder / "unet").is_dir():
        unet_folder = folder / "unet"
    elif (folder / "config.json").is_file():
        unet_folder = folder
    else:
        raise ModelLoadError(f"{folder} is not a diffusers model folder: expected unet/ (a pipeline) or config.json (a UNet)")
    class_name = json.loads((unet_folder / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ModelLoadError(f"{unet_folder} holds a {class_name}; pixel-space UNet2DModel models are supported")
    return unet_folder


def weight_variants(unet_folder: Path) -> tuple[bool, set[str]]:
    """(whether plain weights are there, the variants present) among a UNet folder's files."""
    names = [path.name for path in unet_folder.iterdir() if path.is_file()] if unet_folder.is_dir() else []
    variants = {group for name in names if (match := VARIANT_WEIGHTS.match(name)) for group in match.groups() if group}
    return any(PLAIN_WEIGHTS.match(name) for name in names), variants


def choose_variant(unet_folder: Path, variant: str | None) -> str | None:
    """The weights variant to load: `variant` if given and present; else None for plain weights,
    or "fp16" (else the only variant) where the folder holds variants only."""
    plain, variants = weight_variants(unet_folder)
    if variant is not None:
        if variant not in variants:
            raise ModelLoadError(f"{unet_folder} has no {WEIGHTS}.{variant}.* weights "
                                 f"(variants there: {sorted(variants) or 'none'})")
        return variant
    if plain:
        return None
    if "fp16" in variants or len(variants) == 1:
        return "fp16" if "fp16" in variants else next(iter(variants))
    if variants:
        raise ModelLoadError(f"{unet_folder} holds several weight variants {sorted(variants)} and no plain weights: "
                             "pass variant=...")
    raise ModelLoadError(f"{unet_folder} holds no UNet weights ({WEIGHTS}[.variant].safetensors or .bin)")


def names_legacy_scheduler(folder: Path) -> bool:
    """Whether a model folder's scheduler config uses an early diffusers class name (LEGACY_SCHEDULERS)."""
    try:
        config = json.loads(_scheduler_config(folder).read_text())
    except (ModelLoadError, ValueError):
        return False
    return config.get("_class_name") in LEGACY_SCHEDULERS


def load_diffusers_components(folder: Path, variant: str | None = None, torch_dtype: torch.dtype | None = None):
    """(UNet2DModel, scheduler) of a model folder through diffusers' own loaders, legacy scheduler
    names mapped and the weights variant chosen by `choose_variant`; float32 unless torch_dtype."""
    from diffusers import UNet2DModel

    unet_folder = _unet_folder(Path(folder))
    scheduler = _load_scheduler(Path(folder))
    scheduler_family(scheduler)  # an unusable scheduler fails here, before the weights are read
    unet = UNet2DModel.from_pretrained(unet_folder, variant=choose_variant(unet_folder, variant), torch_dtype=torch_dtype)
    return (unet.float() if torch_dtype is None else unet), scheduler


def _load_folder(folder: Path, class_label: int | None = None, variant: str | None = None,
                 torch_dtype: torch.dtype | None = None) -> DiffusersUNetDenoiser:
    unet, scheduler = load_diffusers_components(folder, variant, torch_dtype)
    return denoiser_from_diffusers(unet, scheduler, class_label)


def weight_patterns(extension: str, variant: str | None) -> list[str]:
    """Hub file patterns of the UNet weights in one format and variant (single file, shards, index)."""
    tag = f".{variant}" if variant else ""
    names = [f"{WEIGHTS}{tag}.{extension}", f"{WEIGHTS}-?????-of-?????{tag}.{extension}",
             f"{WEIGHTS}.{extension}.index{tag}.json"]
    return names + [f"unet/{name}" for name in names]


def hub_attempts(variant: str | None = None) -> list[list[str]]:
    """The allow_patterns of the successive hub downloads, in order of preference: without a
    variant asked for, the plain (full-precision) weights before the fp16 variant; for each,
    safetensors before .bin. The first download that brings weights ends the search, so one
    copy of the weights is fetched."""
    variants = [variant] if variant is not None else [None, "fp16"]
    return [HUB_CONFIG_FILES + weight_patterns(extension, v) for v in variants for extension in WEIGHT_FORMATS]


def _has_weights(folder: Path, variant: str | None) -> bool:
    unet_folder = folder / "unet" if (folder / "unet").is_dir() else folder
    plain, variants = weight_variants(unet_folder)
    return variant in variants if variant is not None else plain or bool(variants)


def resolve_model_folder(source: str | Path, *, cache_dir: str | Path | None = None,
                         local_files_only: bool = False, variant: str | None = None) -> Path:
    """The local folder for `source`: the folder itself, or a hub id's downloaded or cached copy.

    Args:
        source: a folder, or a hub id "org/name" (only the UNet and scheduler files are fetched,
            and of the weights one format: see `hub_attempts`).
        cache_dir: the Hugging Face cache to use (default: HF_HUB_CACHE).
        local_files_only: never touch the network, use the cache only (as HF_HUB_OFFLINE=1 does).
        variant: the weights variant to fetch (e.g. "fp16"); None: the plain weights, or the
            fp16 variant where the repository has no plain ones.

    Raises:
        ModelLoadError: a missing folder, or a hub id that can be neither downloaded nor found in
            the cache; the message says how to pass a folder instead.
    """
    path = Path(source)
    if path.is_dir():
        return path
    if not (isinstance(source, str) and HUB_ID.match(source)) or path.exists():
        raise ModelLoadError(f"model must be a Denoiser, a folder holding a diffusers model or a hub id 'org/name', got {source!r}")
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return _download(source, cache_dir, local_files_only, variant)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise ModelLoadError(
            f"cannot load {source!r}: there is no such folder, and as a Hugging Face hub id it is neither in the "
            f"local cache nor downloadable ({type(error).__name__}: no network?). Without network, pass a local folder instead: model='path/to/folder' "
            "(a diffusers pipeline or UNet folder, e.g. written by save_pretrained or copied from a machine with "
            "internet). To skip connection attempts set HF_HUB_OFFLINE=1 or pass local_files_only=True."
        ) from None


def _download(repo_id: str, cache_dir, local_files_only: bool, variant: str | None) -> Path:
    """The snapshot folder of the first of `hub_attempts` that brings UNet weights."""
    import huggingface_hub

    for patterns in hub_attempts(variant):
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir,
                                                        local_files_only=local_files_only))
        if _has_weights(folder, variant):
            return folder
    wanted = f"{WEIGHTS}.{variant}" if variant else WEIGHTS
    raise ModelLoadError(f"the hub repository {repo_id!r} has no UNet weights {wanted}[.safetensors|.bin] "
                         "at its root or in unet/")


def load_model(source: Denoiser | str | Path, *, class_label: int | None = None, cache_dir: str | Path | None = None,
               local_files_only: bool = False, variant: str | None = None,
               torch_dtype: torch.dtype | None = None) -> Denoiser:
    """A Denoiser from a Denoiser, a local diffusers folder or a hub id (see the module docstring).

    Args:
        source: the model.
        class_label: the class index for class-conditional UNets.
        cache_dir, local_files_only: as in `resolve_model_folder`, for hub ids.
        variant: the weights variant, passed to `UNet2DModel.from_pretrained` (None: the plain
            weights, or the only variant a folder holds, "fp16" first).
        torch_dtype: the dtype the UNet runs in (e.g. torch.float16); None: float32. The
            sampler state stays float32 either way (`Denoiser.sampling_dtype`).

    Raises:
        ModelLoadError: a bad folder or hub id, missing weights, or a scheduler that cannot
            define E[x_0 | x_t] (named, with the reason).
    """
    if isinstance(source, Denoiser):
        return source
    if not isinstance(source, (str, Path)):
        raise ModelLoadError(f"model must be a Denoiser, a folder or a hub id, got {type(source).__name__}")
    folder = resolve_model_folder(source, cache_dir=cache_dir, local_files_only=local_files_only, variant=variant)
    return _load_folder(folder, class_label, variant, torch_dtype)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles, as torch reports
    them). Without it torch emulates bfloat16, and a bfloat16 network is slower than float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def default_network_dtype() -> torch.dtype:
    """The embedded model's network precision when none is asked for: bfloat16 where the CPU has
    native bfloat16 (`native_bfloat16`), float32 elsewhere."""
    return torch.bfloat16 if native_bfloat16() else torch.float32


def default_model(dtype: torch.dtype | None = None) -> UNetDenoiser:
    """The embedded default image model (3-channel, [-1, 1]), loaded once per process and dtype.

    Args:
        dtype: the network's precision (torch.float32, torch.bfloat16, ...); None:
            `default_network_dtype()`. The sampler state is float32 in every case.
    """
    return _embedded_model(default_network_dtype() if dtype is None else dtype)


@functools.lru_cache(maxsize=2)
def _embedded_model(dtype: torch.dtype) -> UNetDenoiser:
    if not (DEFAULT_MODEL_DIR / "unet").is_dir():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reproduce it with "
            "`python scripts/train_default_model.py --install`, or pass model=..."
        )
    return _load_folder(DEFAULT_MODEL_DIR, torch_dtype=None if dtype == torch.float32 else dtype)
