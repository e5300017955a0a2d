"""Sampler defaults: one set for image models, one for analytic priors.

`restore`, the pipeline, the command line and the demos read their defaults from here.
Analytic priors (Gaussian, mixture) keep the exact settings: the Tweedie covariance solved to
a tight tolerance with enough steps that the posterior is reproduced to the noise floor of exact
samples. Image models get settings that finish a restoration in reasonable time on a CPU: the
Tweedie covariance costs one VJP per CG iteration, which dominates a step on a network.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerDefaults:
    """Default sampler settings.

    Attributes:
        steps: grid times of the sampler.
        covariance: V_t of the averaged likelihood (see `guidance.COVARIANCES`).
        cg_max_iter: cap on the Tweedie conjugate-gradient iterations per step.
    """

    steps: int
    covariance: str
    cg_max_iter: int


EXACT_DEFAULTS = SamplerDefaults(steps=100, covariance="tweedie", cg_max_iter=50)
IMAGE_DEFAULTS = SamplerDefaults(steps=50, covariance="isotropic", cg_max_iter=4)


def defaults_for(model) -> SamplerDefaults:
    """IMAGE_DEFAULTS for models with an image data range, EXACT_DEFAULTS for the others."""
    return IMAGE_DEFAULTS if getattr(model, "data_range", None) is not None else EXACT_DEFAULTS
