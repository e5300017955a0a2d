r"""Images and their units: the one place where [0, 1] and a model's own data range meet.

The public API takes images in [0, 1] as scikit-image, PIL and deepinv do, with sigma_y in
those units. An image model declares its `data_range` (low, high): [-1, 1] for DDPM and ADM
networks, [0, 1] for score-SDE and deepinv denoisers. With width w = high - low,
x_model = low + w x and a linear A,

    y_model = A x_model + sigma_model n = w y + low A 1,      sigma_model = w sigma_y,

so a measurement converts exactly (A 1 = 1 for super-resolution, the mask for inpainting);
for [-1, 1] that is 2 y - A 1 and a sigma_y of 0.05 in [0, 1] is 0.1 in model units. Results
convert back with x = (x_model - low) / w and std = std_model / w.

Noise levels convert the same way (`noise_to_model_units`, `noise_from_model_units`): a prior's
declared `sigma_range` is in [0, 1] units, s_image = s_model / w. A ladder of priors
(`posterior_diff.ladder`) moves a noisy point from one model's time axis and units to another's
with `change_axis`: x' = alpha' change_range(x_t / alpha), at the same noise level.

Accepted image inputs: torch tensors (C, H, W), numpy arrays (H, W) or (H, W, C) of floats in
[0, 1] or integers (uint8 / uint16, scaled by their maximum), and PIL images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def to_image_tensor(image, name: str = "image") -> Tensor:
    """A (C, H, W) float tensor in [0, 1] from a tensor, numpy array or PIL image."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.dtype == bool:
            array = image.astype(np.float32)
        elif np.issubdtype(image.dtype, np.integer):
            array = image.astype(np.float32) / np.iinfo(image.dtype).max
        elif np.issubdtype(image.dtype, np.floating):
            array = image.astype(np.float32, copy=False)
        else:
            raise TypeError(f"{name} has unsupported dtype {image.dtype}")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"{name} must be a numpy array (H, W) or (H, W, C) with C in 1, 3, 4; got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array[:, :, :3].transpose(2, 0, 1)))
    elif isinstance(image, Tensor):
        if image.dim() != 3:
            raise ValueError(f"{name} must be a tensor of shape (C, H, W), got {tuple(image.shape)}")
        tensor = image if image.is_floating_point() else image.float() / 255
    else:
        raise TypeError(f"{name} must be a torch.Tensor (C, H, W), a numpy array or a PIL image, got {type(image).__name__}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def match_channels(image: Tensor, channels: int) -> Tensor:
    """Repeat a grey image to 3 channels or average a colour image to 1."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1 and channels == 3:
        return image.expand(3, *image.shape[1:]).clone()
    if image.shape[0] == 3 and channels == 1:
        return image.mean(0, keepdim=True)
    raise ValueError(f"cannot convert a {image.shape[0]}-channel image to {channels} channels")


def read_image(path: str | Path) -> Tensor:
    """Read an image file as a (C, H, W) tensor in [0, 1]; a clear error for unreadable files."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.convert("RGB") if handle.mode not in ("L", "RGB", "I;16") else handle.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path} as an image ({error})") from None
    return to_image_tensor(image, str(path))


def write_image(image: Tensor, path: str | Path) -> None:
    """Write a (C, H, W) tensor in [0, 1] (clamped) as an 8-bit image file."""
    array = (image.detach().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def load_image_folder(folder: str | Path, channels: int = 3) -> list[Tensor]:
    """Every image file in `folder` (not recursive) as (channels, H, W) tensors in [-1, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [to_model_range(match_channels(read_image(path), channels)) for path in files]


MODEL_RANGE = (-1.0, 1.0)  # the data range of DDPM / ADM networks, the default here


def to_model_range(x: Tensor, data_range: tuple[float, float] = MODEL_RANGE) -> Tensor:
    """[0, 1] -> data_range (default [-1, 1])."""
    low, high = data_range
    return low + (high - low) * x


def from_model_range(x: Tensor, data_range: tuple[float, float] = MODEL_RANGE) -> Tensor:
    """data_range (default [-1, 1]) -> [0, 1] (not clamped)."""
    low, high = data_range
    return (x - low) / (high - low)


def noise_to_model_units(sigma, data_range: tuple[float, float] | None):
    """A noise level (standard deviation, or noise ratio s = sigma / alpha) in [0, 1] image units ->
    the model's units: w sigma with w = high - low (2 sigma for [-1, 1]); unchanged where the
    model has no data range (analytic priors). A float or a tensor."""
    if data_range is None:
        return sigma
    low, high = data_range
    return (high - low) * sigma


def noise_from_model_units(sigma, data_range: tuple[float, float] | None):
    """The inverse of `noise_to_model_units`: a noise level in the model's units -> [0, 1] image units."""
    if data_range is None:
        return sigma
    low, high = data_range
    return sigma / (high - low)


def change_range(x: Tensor, source: tuple[float, float] | None, target: tuple[float, float] | None) -> Tensor:
    """An image (clean, noisy z = x_0 + s n, or a denoised estimate) from one data range to another:
    target_low + w_target (x - source_low) / w_source, the noise std scaling by w_target / w_source as
    `noise_to_model_units` says. Unchanged where the ranges are equal (both None: analytic priors);
    a ValueError where only one of them is None (no image units to convert from or to)."""
    if source == target:
        return x
    if source is None or target is None:
        raise ValueError(f"cannot convert between data range {source} and {target}: an analytic prior (no data "
                         "range) has no image units")
    return to_model_range(from_model_range(x, source), target)


def change_axis(x_t: Tensor, alpha, data_range: tuple[float, float] | None, new_alpha,
                new_range: tuple[float, float] | None) -> Tensor:
    """A point x_t = alpha z of one model's time axis and units -> the point new_alpha z' of another
    model's at the same noise level, z' = change_range(z): the variance-exploding z = x_t / alpha
    = x_0 + s n is what both share (docs/theory.md, "A ladder of priors"). alpha and new_alpha are
    floats or tensors broadcastable against x_t (e.g. `per_sample`)."""
    return new_alpha * change_range(x_t / alpha, data_range, new_range)


def measurement_to_model_units(y: Tensor, operator, data_range: tuple[float, float] = MODEL_RANGE):
    """(y, operator) in [0, 1] units -> (w y + low A 1, the operator with sigma_y times w),
    w = high - low of the model's data_range (default [-1, 1]: 2 y - A 1 and 2 sigma_y).

    y has shape y_shape (one measurement, no batch). The caller's operator is not modified
    (`LinearOperator.with_sigma_y` shares its tensors).
    """
    low, high = data_range
    x_shape = operator.x_shape(tuple(y.shape))
    ones = torch.ones((1, *x_shape), dtype=y.dtype, device=y.device)
    return (high - low) * y + low * operator.A(ones)[0], operator.with_sigma_y(noise_to_model_units(operator.sigma_y,
                                                                                                   data_range))


def save_panels(rows: list[list[Tensor]], titles: list[str], path: str | Path, zoom: int = 1) -> None:
    """Write a grid of (C, H, W) images in [0, 1] (one list per row, equal sizes) with column titles.

    Each panel is enlarged `zoom` times by pixel repetition; grey panels are shown in grey.
    """
    from PIL import ImageDraw

    gutter, title_height = 4, 14
    height, width = rows[0][0].shape[-2] * zoom, rows[0][0].shape[-1] * zoom
    canvas = Image.new("RGB", (len(titles) * (width + gutter) - gutter, title_height + len(rows) * (height + gutter)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((column * (width + gutter) + 2, 1), title, fill="black")
    for row_index, row in enumerate(rows):
        for column, panel in enumerate(row):
            panel = match_channels(panel.detach().cpu().float().clamp(0, 1), 3)
            panel = panel.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)
            array = (panel.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(array), (column * (width + gutter), title_height + row_index * (height + gutter)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
