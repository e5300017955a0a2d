"""posterior-diff: posterior sampling for inverse problems with unconditional diffusion priors.

    from posterior_diff import restore, restore_batch, GaussianPrior
    from operators import SuperResolution
    result = restore(y, SuperResolution(2, sigma_y=0.05), GaussianPrior(mean, cov), num_samples=8)
    results = restore_batch([y1, y2], SuperResolution(2, sigma_y=0.05), prior, generator=[g1, g2])  # one per y
"""

# `posterior_diff.ladder` is both a function (below) and an old module path (a deprecated shim, see
# posterior_diff/_moved.py). Loading the shim first keeps the name on the function: the import of a
# submodule binds its name in the package, so a shim imported later would take it over.
import posterior_diff.ladder as _old_ladder_path  # noqa: F401
from posterior_diff.denoisers import Denoiser, ModuleDenoiser
from posterior_diff.models.contrast import contrast_scaled
from posterior_diff.models.deepinv_prior import DeepinvPrior, from_deepinv_denoiser
from posterior_diff.models.ensemble import per_channel, weighted_mean
from posterior_diff.models.equivariance import dihedral_equivariant
from posterior_diff.models.ffdnet_prior import ffdnet
from posterior_diff.models.ladder import Ladder, default_ladder, ladder
from posterior_diff.models.loading import (DEFAULT_MODEL_DIR, ModelLoadError, UNetDenoiser, default_model,
                                           denoiser_from_diffusers, load_model)
from posterior_diff.models.priors import GaussianMixturePrior, GaussianPrior
from posterior_diff.noise_estimate import SigmaYEstimate, estimate_sigma_y
from posterior_diff.restore import Restoration, restore, restore_batch
from posterior_diff.sampling.guidance import COVARIANCES, AveragedLikelihoodGuidance, CGTruncatedWarning
from posterior_diff.sampling.samplers import SOLVERS, NonFiniteSampleError, sample
from posterior_diff.sampling.time_grids import GRIDS, time_grid
from posterior_diff.schedules import (DiscreteSchedule, GeometricVESchedule, RectifiedFlow, Schedule, SubVPSchedule,
                                      VESchedule, VPSchedule)
from posterior_diff.version import __version__

del _old_ladder_path

__all__ = [
    "restore",
    "restore_batch",
    "Restoration",
    "estimate_sigma_y",
    "SigmaYEstimate",
    "Denoiser",
    "ModuleDenoiser",
    "DeepinvPrior",
    "from_deepinv_denoiser",
    "ffdnet",
    "contrast_scaled",
    "dihedral_equivariant",
    "per_channel",
    "weighted_mean",
    "ladder",
    "default_ladder",
    "Ladder",
    "GaussianPrior",
    "GaussianMixturePrior",
    "AveragedLikelihoodGuidance",
    "CGTruncatedWarning",
    "UNetDenoiser",
    "load_model",
    "denoiser_from_diffusers",
    "ModelLoadError",
    "DEFAULT_MODEL_DIR",
    "PosteriorSamplingPipeline",
    "default_model",
    "sample",
    "NonFiniteSampleError",
    "time_grid",
    "Schedule",
    "VPSchedule",
    "VESchedule",
    "GeometricVESchedule",
    "SubVPSchedule",
    "RectifiedFlow",
    "DiscreteSchedule",
    "COVARIANCES",
    "SOLVERS",
    "GRIDS",
]


def __getattr__(name: str):
    # The pipeline imports diffusers' pipeline machinery (about a second); load it on first use.
    if name == "PosteriorSamplingPipeline":
        from posterior_diff.apps.pipeline import PosteriorSamplingPipeline

        return PosteriorSamplingPipeline
    raise AttributeError(f"module 'posterior_diff' has no attribute {name!r}")
