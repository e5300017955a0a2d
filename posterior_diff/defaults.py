"""Sampler defaults: one set for image models, one for analytic priors.

`restore`, the pipeline, the command line and the demos read their defaults from here.
Analytic priors (Gaussian, mixture) keep the exact settings: the Tweedie covariance solved to
a tight tolerance with enough steps that the posterior is reproduced to the noise floor of exact
samples. Image models get the settings chosen in docs/speed.md (`python -m benchmarks.speed`):
of every covariance at 20, 50 and 100 steps, the best posterior-mean PSNR on the held-out
photographs, over SR x4 and 70% random inpainting, that restores 128x128 with 4 samples in about
a minute on 2 CPU cores and is no worse than isotropic at 50 steps (the defaults before it) on
either task. (Denoising is not in the choice: restore starts it from the measurement, unguided.)
Tweedie at 20 steps with CG capped at 4 is that setting: +0.1 dB on SR x4 and +1.7 dB on
inpainting over isotropic at 50 steps, in about the same time. Diagonal at 20 steps is as good on
inpainting but 0.2 dB worse on SR, projection as good on SR in a sixth of the time but 2.4 dB
worse on inpainting. More steps do not help Tweedie on images: random inpainting loses 3.9 dB at
50 steps (not yet understood; it is not a diverging solve, which `operators.linalg` guards
against). The two sets differ because a network's Jacobian costs a
backward pass per CG iteration: the exact Tweedie solve that analytic priors can afford would
take minutes per image.
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
IMAGE_DEFAULTS = SamplerDefaults(steps=20, covariance="tweedie", cg_max_iter=4)


def defaults_for(model) -> SamplerDefaults:
    """IMAGE_DEFAULTS for models with an image data range, EXACT_DEFAULTS for the others."""
    return IMAGE_DEFAULTS if getattr(model, "data_range", None) is not None else EXACT_DEFAULTS
