r"""A denoiser made equivariant to the image's flips and quarter turns, across the sampler's levels.

The law of photographs hardly changes when an image is mirrored or turned by a quarter turn (at the
scale a denoiser sees, a patch), so for every element g of that group, the dihedral group of the
square,

    D_g(x, sigma) = g^{-1} D(g x, sigma)

is as good an approximation of the MMSE denoiser E[x_0 | x] as D itself, and the exact MMSE denoiser
is equivariant: D*_g = D*. A trained network is not, and its errors differ from one element to the
next. Averaging D_g over the whole group (the Reynolds average) removes the part of the error that
changes with g: on the validation photographs it denoises 0.13 to 0.64 dB better than FFDNet as it is
in one step, at every level from 0.02 to 5 (docs/contrast_scaling.md), for 8 network calls instead of one.

A sampler asks its denoiser at every level of its grid, so it can average the other way, over the
trajectory, for free (Terris, Moreau, Pustelnik & Tachella, "Equivariant plug-and-play image
reconstruction", CVPR 2024, draw g at random per iteration): `DihedralCycle` asks each noise level
through one element, chosen by the level, so that successive levels of a grid use different ones. The
element is a function of sigma alone, not drawn: the denoiser stays a deterministic function
D(x, sigma), the same for a row alone or in a batch, the forward and the VJPs of a guidance step see
the same function, and a run is reproducible from its seed.

Images that are not square keep their shape only under the four elements that do not swap height
and width (identity, the half turn, the two mirrors); those are the group used for them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posterior_diff.checks import choice, positive_int
from posterior_diff.models.deepinv_prior import DeepinvPrior, check_deepinv_prior

SQUARE_GROUP = tuple(range(8))  # element e: e % 4 quarter turns, then a left-right mirror where e >= 4
# every other element: identity, half turn, the two mirrors (no swap of height and width). Both groups are
# evenly spaced from 0 by construction, which `elements_at` relies on: the i-th member is i * 8 / |group|.
SHAPE_KEEPING_GROUP = SQUARE_GROUP[::2]
ELEMENTS_PER_CALL = (1, 2, 4, 8)  # divisors of the group's size, so the elements spread evenly
ELEMENTS_PER_OCTAVE = 16  # levels a factor 2^(1/16) apart already get different elements


def check_elements_per_call(value) -> int:
    """`value` if it is 1, 2, 4 or 8 (`ELEMENTS_PER_CALL`); else a ValueError naming elements_per_call."""
    return choice(positive_int(value, "elements_per_call"), ELEMENTS_PER_CALL, "elements_per_call")


def transform(x: Tensor, element: int) -> Tensor:
    """g x for the dihedral element `element` in 0..7, acting on the last two dims of x (..., H, W)."""
    turned = torch.rot90(x, element % 4, dims=(-2, -1))
    return turned.flip(-1) if element >= 4 else turned


def untransform(x: Tensor, element: int) -> Tensor:
    """g^{-1} x: the inverse of `transform(., element)`."""
    unmirrored = x.flip(-1) if element >= 4 else x
    return torch.rot90(unmirrored, -(element % 4), dims=(-2, -1))


def group_for(shape: torch.Size) -> tuple[int, ...]:
    """The elements that keep an image of shape (..., H, W) in shape: all 8 for a square image."""
    return SQUARE_GROUP if shape[-1] == shape[-2] else SHAPE_KEEPING_GROUP


def elements_at(sigma: Tensor, group: tuple[int, ...], count: int) -> Tensor:
    """The `count` elements asked at each noise level of sigma (B,) (> 0, [0, 1] units): a (count, B)
    long tensor of the group's members. The first is the group's index p = floor(16 log2 sigma) mod
    |group|, so any geometric grid coarser than 2^(1/16) per step (20 steps from 80 to 0.002 are
    2^0.8 apart) asks its successive levels through different elements; the others are spread evenly
    around the group from there, p + j |group| / count. A torch op, not a host branch: no GPU sync."""
    first = torch.floor(ELEMENTS_PER_OCTAVE * torch.log2(sigma.clamp_min(1e-30))).long()
    spread = torch.arange(count, device=sigma.device).unsqueeze(1) * (len(group) // count)
    # the i-th member by arithmetic (see SHAPE_KEEPING_GROUP): no lookup table copied to the device per call
    return (first.unsqueeze(0) + spread) % len(group) * (len(SQUARE_GROUP) // len(group))


def per_row(x: Tensor, elements: Tensor, group: tuple[int, ...], apply) -> Tensor:
    """apply(x, e) row by row, row b with elements[b] (an identity row passes bit for bit); torch.where
    over the group, so a batch of mixed levels stays one batch."""
    rows = elements.reshape(-1, *([1] * (x.dim() - 1)))
    result = x
    for element in group[1:]:
        result = torch.where(rows == element, apply(x, element), result)
    return result


class DihedralAverage(nn.Module):
    """`network(x, sigma)` (the deepinv contract, x (B, C, H, W) in [0, 1] units) made equivariant to the
    dihedral group: the mean of g^{-1} network(g x, sigma) over `elements_per_call` elements g chosen
    by each row's level (module docstring). 1: one element per level, at the network's own cost; the
    group's size (8 for square images, 4 otherwise): the Reynolds average, exactly equivariant.

    Args:
        network: the denoiser, called as `network(x, sigma)` with sigma a (B,) tensor.
        elements_per_call: 1, 2, 4 or 8; more than the group has (a non-square image's 4) means all.
    """

    def __init__(self, network: nn.Module, elements_per_call: int = 1):
        super().__init__()
        self.network = network
        self.elements_per_call = check_elements_per_call(elements_per_call)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        group = group_for(x.shape)
        elements = elements_at(sigma, group, min(self.elements_per_call, len(group)))
        # every element's image in one batch of (count B) rows: one network call, whatever the count
        turned = torch.cat([per_row(x, rows, group, transform) for rows in elements])
        denoised = self.network(turned, sigma.repeat(len(elements))).chunk(len(elements))
        return torch.stack([per_row(d, rows, group, untransform) for d, rows in zip(denoised, elements)]).mean(0)

    def extra_repr(self) -> str:
        return f"elements_per_call={self.elements_per_call}"


def dihedral_equivariant(prior: DeepinvPrior, elements_per_call: int = 1) -> DeepinvPrior:
    """`prior` made equivariant to flips and quarter turns (module docstring): each call the mean over
    `elements_per_call` elements of the dihedral group, chosen by the noise level, at that many times
    the network's cost (1: free; 8: the Reynolds average).

    Args:
        prior: a DeepinvPrior (e.g. `ffdnet()` or `contrast_scaled(ffdnet(), 2)`).
        elements_per_call: 1, 2, 4 or 8.

    Returns:
        A DeepinvPrior on the same network, schedule and `sigma_range`; eval mode as the prior's.

    Raises:
        TypeError: prior is not a DeepinvPrior.
        ValueError: elements_per_call is not 1, 2, 4 or 8.
    """
    return check_deepinv_prior(prior).wrapping(DihedralAverage(prior.denoiser, elements_per_call))
