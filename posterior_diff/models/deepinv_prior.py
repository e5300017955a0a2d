r"""deepinv denoisers as diffusion priors: `D(x, sigma)` behind our Denoiser contract.

deepinv's contract is variance-exploding, in [0, 1] image units:

    x = x_0 + sigma n,   n ~ N(0, I),   D(x, sigma) = E[x_0 | x],   x_0, x and D in [0, 1] units,

with sigma a float or a (B,) tensor, one noise level per sample. That is our contract
(docs/theory.md §2) for the variance-exploding schedule alpha(t) = 1 and the data range
(0, 1), so the adapter converts nothing:

    D(x_t, t) = denoiser(x_t, sigma(t)),    sigma(t) = sigma_min (sigma_max / sigma_min)^t

(`schedules.GeometricVESchedule`, the time axis of score-SDE and EDM models too). Time enters
only through sigma(t); x_t goes to the network unchanged and D comes back unchanged, so the
guidance's VJPs run straight through the network, and with data_range (0, 1) `restore`'s unit conversion (`images.measurement_to_model_units`) is the
identity: y and sigma_y stay in [0, 1] units.

The two ends of the schedule, in [0, 1] units:

- sigma_max (default 80): the sampler starts from N(0, (1 + sigma_max^2) I). For data in
  [0, 1] (E||x_0||^2 <= d), §1's bound on the start-up mismatch is about d / (2 sigma_max^2),
  a few times 1e-5 nats per pixel at 80. sigma_max = 80 is also s = 160 in [-1, 1] units,
  the top of the linear DDPM schedule (beta from 1e-4 to 0.02, T = 1000) that DiffUNet was
  trained on.
- sigma_min (default 0.002, half a grey level of an 8-bit image): the smallest noise level
  the network is asked about: sigma(0) = sigma_min, so the sampler's grid stops there (theory.md §3, time grids) and the last step returns
  D(x, sigma_min).

A deepinv denoiser is only asked about noise levels in [sigma_min, sigma_max]; levels it was
not trained on are extrapolation (see docs/deepinv_priors.md for DRUNet's and DiffUNet's).
deepinv is never imported here: its objects are recognised by the modules of their classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from operators.deepinv_interop import deepinv_classes

from posterior_diff.checks import check_sigma_range, positive_int
from posterior_diff.denoisers import Denoiser, as_time
from posterior_diff.schedules import GeometricVESchedule

DEEPINV_SIGMA_MIN = 0.002  # half a grey level of an 8-bit image in [0, 1]
DEEPINV_SIGMA_MAX = 80.0  # hides [0, 1] data; s = 160 in [-1, 1] units, the end of DDPM's schedule


def is_deepinv_object(obj) -> bool:
    """True for an instance of any class deepinv defines, or of a subclass of one."""
    return bool(deepinv_classes(obj))


def is_deepinv_denoiser(obj) -> bool:
    """True for a `deepinv.models.Denoiser` (DRUNet, DiffUNet, ... or a subclass of your own)."""
    return any(cls.__name__ == "Denoiser" and cls.__module__.startswith("deepinv.models") for cls in deepinv_classes(obj))


def not_a_deepinv_denoiser(obj, name: str) -> str:
    """The TypeError message for a deepinv object given as argument `name` that is not a denoiser."""
    families = {cls.__module__.split(".")[1] for cls in deepinv_classes(obj) if "." in cls.__module__}
    family = "physics" if "physics" in families else "model" if "models" in families else "object"
    hint = " (a deepinv physics is the operator, not the model)" if family == "physics" else ""
    return f"{name} must be a deepinv.models.Denoiser, got the deepinv {family} {type(obj).__name__}{hint}"


def deepinv_channels(denoiser) -> int | None:
    """The channels a deepinv denoiser declares: its `in_channels`, else its `out_channels`, else None.

    in_channels comes first: DiffUNet's out_channels is 6 (noise and variance for 3 channels).
    DRUNet declares neither, so pass `channels` for it.
    """
    for name in ("in_channels", "out_channels"):
        value = getattr(denoiser, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class DeepinvPrior(Denoiser):
    """A `deepinv.models.Denoiser` as a posterior_diff Denoiser (VE schedule, [0, 1] units).

    Args:
        denoiser: the deepinv denoiser, called as `denoiser(x, sigma)` with x (B, C, H, W) in
            [0, 1] units and sigma a (B,) tensor; registered as the submodule `denoiser`, so
            `.to(device)` moves it and its parameters decide the sampling device and dtype.
        schedule: the VE schedule giving sigma(t) (a GeometricVESchedule from sigma_min to sigma_max).
        channels: the image channels the denoiser takes, or None (any).
        x_shape: the shape of one x, if the denoiser takes only one, or None.
        sigma_range: the noise levels (low, high) in [0, 1] units the denoiser may be asked about,
            as declared by the user; None: the schedule's range [sigma_min, sigma_max].

    Attributes:
        data_range: (0.0, 1.0): an image model, so `restore` clamps its output to [0, 1] and
            the guidance clips D_y to [0, 1].
    """

    data_range = (0.0, 1.0)

    def __init__(self, denoiser: nn.Module, schedule: GeometricVESchedule, channels: int | None = None,
                 x_shape: tuple[int, ...] | None = None, sigma_range: tuple[float, float] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        self.channels = channels
        self.x_shape = None if x_shape is None else tuple(x_shape)
        self.declared_sigma_range = None if sigma_range is None else check_sigma_range(sigma_range, "sigma_range")

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The declared noise levels (`sigma_range` argument), else the schedule's [sigma_min, sigma_max]."""
        return self.declared_sigma_range if self.declared_sigma_range is not None else super().sigma_range

    def wrapping(self, network: nn.Module, schedule: GeometricVESchedule | None = None,
                 sigma_range: tuple[float, float] | None = None) -> "DeepinvPrior":
        """A DeepinvPrior on `network` (a module around this prior's `denoiser`) with this prior's channels,
        x_shape and train/eval mode; its schedule and declared sigma_range unless given. How
        `contrast_scaled` and `dihedral_equivariant` build theirs."""
        wrapped = DeepinvPrior(network, self.schedule if schedule is None else schedule, self.channels, self.x_shape,
                               self.declared_sigma_range if sigma_range is None else sigma_range)
        return wrapped.train(self.training)

    def noise_level(self, t: Tensor, x_t: Tensor) -> Tensor:
        """deepinv's sigma at times t: sigma(t) in [0, 1] units, a (B,) tensor on x_t's device and dtype."""
        return self.schedule.sigma(t).to(device=x_t.device, dtype=x_t.dtype)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """D(x_t, t) = denoiser(x_t, sigma(t)) for x_t (B, C, H, W) in [0, 1] units and t a float or (B,)."""
        t = as_time(t, x_t)
        denoised = self.denoiser(x_t, self.noise_level(t, x_t))
        if denoised.shape != x_t.shape:
            raise ValueError(f"the deepinv denoiser returned shape {tuple(denoised.shape)} for an input of shape "
                             f"{tuple(x_t.shape)}; it must return an image of the input's shape")
        return denoised.to(x_t.dtype)


def check_deepinv_prior(prior, name: str = "prior") -> "DeepinvPrior":
    """`prior` if it is a DeepinvPrior (a denoiser D(x, sigma) in [0, 1] units, e.g. `ffdnet()`); else a
    TypeError naming `name`."""
    if not isinstance(prior, DeepinvPrior):
        raise TypeError(f"{name} must be a DeepinvPrior (a denoiser D(x, sigma) in [0, 1] units, e.g. ffdnet()), "
                        f"got {type(prior).__name__}")
    return prior


def from_deepinv_denoiser(denoiser, channels: int | None = None, *, sigma_min: float = DEEPINV_SIGMA_MIN,
                          sigma_max: float = DEEPINV_SIGMA_MAX, x_shape: tuple[int, ...] | None = None,
                          sigma_range: tuple[float, float] | None = None) -> DeepinvPrior:
    """A `deepinv.models.Denoiser` as our Denoiser, a prior for `restore` and the samplers.

    Args:
        denoiser: a deepinv denoiser (e.g. `deepinv.models.DRUNet(pretrained="download")` or
            `deepinv.models.DiffUNet(pretrained="download")`); put in eval mode here (dropout off),
            as `load_model` does with diffusers UNets.
        channels: the image channels it takes; None reads `in_channels` / `out_channels` from
            the denoiser where it has them (`deepinv_channels`), else leaves it open.
        sigma_min, sigma_max: the schedule's noise levels in [0, 1] units (see the module
            docstring): the smallest noise level the network is asked about, and the start.
        x_shape: the shape of one x, if the denoiser takes only one.
        sigma_range: the noise levels (low, high), in [0, 1] units, the denoiser was trained on,
            declared by the user (deepinv does not say); None: the schedule's range [sigma_min,
            sigma_max], as before. `restore` refuses a run that would leave it, and `ladder` gives
            the denoiser exactly these levels.

    Returns:
        A DeepinvPrior: D(x_t, t) = denoiser(x_t, sigma(t)), data_range (0, 1).
    """
    if not is_deepinv_denoiser(denoiser):
        raise TypeError(not_a_deepinv_denoiser(denoiser, "denoiser") if is_deepinv_object(denoiser) else
                        f"denoiser must be a deepinv.models.Denoiser, got {type(denoiser).__name__}")
    channels = deepinv_channels(denoiser) if channels is None else positive_int(channels, "channels")
    return DeepinvPrior(denoiser.eval(), GeometricVESchedule(sigma_min, sigma_max), channels, x_shape, sigma_range)
