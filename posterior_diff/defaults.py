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
worse on inpainting. The two sets differ because a network's Jacobian costs a backward pass per
CG iteration: the exact Tweedie solve that analytic priors can afford would take minutes per image.

Image models also start every Tweedie solve cold, from the isotropic solve, not from the previous
step's solution. On a network's Jacobian the system at high noise is far from the one the warm
guess was made for and CG often cannot improve on the guess (its residual above ||b||, the
curvature test or the guard stopping it at once), so a stale solution is carried step after step.
On the held-out photographs at 64x64 (docs/warm_start.md, `python -m benchmarks.warm_start`),
70% random inpainting falls from 27.73 to 25.38 dB between 20 and 50 steps with the warm start,
while the cold start holds 27.53 and 27.57 at the same VJPs; SR x4 is within 0.1 dB either way.
The cold start gives up 0.2 dB on inpainting at the default 20 steps for a sampler that does not
get worse when a user asks for more steps. On the analytic priors the warm start halves the VJPs
at the same exactness and stays on.
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
        warm_start: whether each step's Tweedie solve starts from the previous step's solution.
    """

    steps: int
    covariance: str
    cg_max_iter: int
    warm_start: bool


EXACT_DEFAULTS = SamplerDefaults(steps=100, covariance="tweedie", cg_max_iter=50, warm_start=True)
IMAGE_DEFAULTS = SamplerDefaults(steps=20, covariance="tweedie", cg_max_iter=4, warm_start=False)


def defaults_for(model) -> SamplerDefaults:
    """IMAGE_DEFAULTS for models with an image data range, EXACT_DEFAULTS for the others."""
    return IMAGE_DEFAULTS if getattr(model, "data_range", None) is not None else EXACT_DEFAULTS
