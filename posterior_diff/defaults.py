"""Sampler defaults: one set for image models, one for analytic priors.

`restore`, the pipeline, the command line and the demos read their defaults from here.
Analytic priors (Gaussian, mixture) keep the exact settings: the Tweedie covariance solved to
a tight tolerance with enough steps that the posterior is reproduced to the noise floor of exact
samples. Image models get the settings chosen in docs/speed.md (`python -m benchmarks.speed`):
of every covariance at 20, 50 and 100 steps, the fastest within 0.05 dB of the best posterior-mean
PSNR on the held-out photographs, over SR x4 and 70% random inpainting, that restores 128x128 with
4 samples in about a minute on 2 CPU cores and is no worse than isotropic at 50 steps (the defaults
before it) on either task. (Denoising is not in the choice: restore starts it from the measurement,
unguided.) Tweedie at 20 steps with CG capped at 4 is that setting: +0.1 dB on SR x4 and +1.6 dB on
inpainting over isotropic at 50 steps, in 12 s against 20 s (tweedie at 50 steps is 0.04 dB better
on average in 2.5 times the time). That run took jacobian_s_max = 2 (below); the run before it, with
the network's Jacobian at every step, chose the same setting. Diagonal at 20 steps is 0.1-0.2 dB worse on both tasks in the
same time, projection level on SR in less than half the time but 4.2 dB worse on inpainting. The two sets differ because a network's Jacobian costs a backward pass per
CG iteration: the exact Tweedie solve that analytic priors can afford would take minutes per image.
The cap of 4 truncates most image solves before their stopping rule, so the Tweedie covariance is then
approximate: `restore` counts such solves (`Restoration.cg_truncated`), and warns of them
(`CGTruncatedWarning`) where the caller named the covariance but left this cap to the defaults;
a larger `cg_max_iter` (e.g. 50) gives the exact one.

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

Both sets take the network's Jacobian at every step (`jacobian_s_max` = inf). Above a noise ratio
`jacobian_s_max` every covariance would take the Jacobian-free projection step instead: at high noise a
network's Jacobian is learned poorly and the guidance amplifies its errors by s^2, so the guided mean
sits at the clipping bounds there (docs/theory.md §5). docs/jacobian_range.md (`python -m
benchmarks.jacobian_range`) chose among 0.5, 1, 2, 4, 8 and inf the value of fewest VJPs within 0.05 dB
of the best on the validation photographs (SR x4, 70% random and a box hole) that is no more than 0.1
dB below inf on any task on the held-out photographs: inf. 2 is as good as inf on SR x4 and random
inpainting for less than half the VJPs and keeps runs of 5-10 steps from collapsing, but loses 2 dB on
the held-out box hole, which needs the network's Jacobian at high noise to carry the surroundings
into the hole; 8 passes the guard but falls 0.05 dB short on the validation photographs. Pass
`jacobian_s_max=2` for SR and scattered missing pixels, or few steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerDefaults:
    """Default sampler settings.

    Attributes:
        steps: grid times of the sampler.
        covariance: V_t of the averaged likelihood (see `guidance.COVARIANCES`).
        cg_max_iter: cap on the Tweedie conjugate-gradient iterations per step.
        warm_start: whether each step's Tweedie solve starts from the previous step's solution.
        jacobian_s_max: the noise ratio sigma / alpha above which the guidance takes the Jacobian its
            Gaussian approximation implies (the projection step, no VJP) instead of the network's.
        mean_level: the noise level (image units in [0, 1]; the prior's own without a data range)
            whose guided means, averaged over the samples, make the posterior mean
            (`sampling.mean_estimates`); 0: the samples' own mean.
        antithetic: whether the samples come in antithetic pairs, the second of each drawn with
            the first one's noise negated (`sampling.antithetic`), where the number of samples
            and the batch size are even.
        eta: the sampler's noise (`sampling.samplers`): 1 the reverse SDE, above 1 more mixing toward
            each time's marginal (the same marginals).
        large_hole_eta: eta where the operator leaves holes wider than `start_estimates.SMALL_GAP`
            (`start_estimates.has_large_gaps`), whose inside the prior alone fills.
    """

    steps: int
    covariance: str
    cg_max_iter: int
    warm_start: bool
    jacobian_s_max: float
    mean_level: float = 0.0
    antithetic: bool = False
    eta: float = 1.0
    large_hole_eta: float = 1.0


# Image models' posterior mean averages the guided means E[x | x_t, y] at the first grid time at or
# below this noise level ([0, 1] units; `sampling.mean_estimates`). Chosen on the validation
# photographs among 0 (the samples' own mean) and 0.01 to 0.3 (docs/mean_level.md,
# `python -m benchmarks.mean_level`): the best mean PSNR over the ladder and the embedded model on
# SR x4, 70% random inpainting, the box hole and Gaussian deblurring, +0.26 dB over the samples' mean
# (+0.10 to +0.38 per model and task; the same level with each ladder so far: the switch at 75/255, at 2, and
# FFDNet averaged over flips and turns); on the held-out photographs +0.02 to +0.12 dB per model and task, for no extra
# network evaluation. SR x4 and Gaussian deblurring alone would take 0.1 (+0.06 to +0.19 dB more on the
# held-out photographs), but motion deblurring there loses up to 1.6 dB at 0.1, so one level serves all.
# The analytic priors keep the samples' own mean, which their benchmarks measure.
MEAN_LEVEL = 0.03
# Image models draw their samples in antithetic pairs (`sampling.antithetic`) where num_samples and the
# batch size are even. Chosen on the validation photographs (docs/antithetic.md, `python -m
# benchmarks.antithetic`): over the ladder and the embedded model on SR x4, 70% random inpainting, the box
# hole, Gaussian and motion deblurring, +0.44 dB over independent samples at the same cost (+0.08 to +0.67
# per model and task, with today's ladder: switch 2, FFDNet averaged over 4 flips and turns; +0.47 with FFDNet
# as it is, +0.32 at switch 75/255); on the held-out photographs +0.36 to +0.54 dB per model and task. The analytic priors keep independent samples, which their exactness benchmarks measure.
ANTITHETIC = True
# Image models sample with eta = 2 (`sampling.samplers`: more mixing than the reverse SDE, the same
# marginals; docs/theory.md §3), but with the reverse SDE where the operator leaves holes wider than
# `start_estimates.SMALL_GAP` pixels (a box hole), whose inside the prior alone fills from the structure it
# settles at high noise, which more mixing forgets. Chosen on the validation photographs (docs/eta.md,
# `python -m benchmarks.eta`) among eta 1 everywhere, 2 everywhere and this rule, over the ladder and the
# embedded model on SR x4, 70% random inpainting and the box hole, for the same network calls: the ladder
# +0.52 dB on SR x4 and random inpainting, the embedded model +0.17 / +0.20, while 2 on the box hole loses
# 0.97 / 1.68 dB. The measurement start (denoising) and particle mode keep the reverse SDE
# (`restore.resolve_eta`), as do the analytic priors, whose guidance is exact.
IMAGE_ETA = 2.0
EXACT_DEFAULTS = SamplerDefaults(steps=100, covariance="tweedie", cg_max_iter=50, warm_start=True,
                                 jacobian_s_max=math.inf)
IMAGE_DEFAULTS = SamplerDefaults(steps=20, covariance="tweedie", cg_max_iter=4, warm_start=False,
                                 jacobian_s_max=math.inf, mean_level=MEAN_LEVEL, antithetic=ANTITHETIC, eta=IMAGE_ETA,
                                 large_hole_eta=1.0)


# Where an "estimate" start (Come-Closer-Diffuse-Faster, `start_estimates`) begins, in [0, 1] image units.
# Chosen on the validation photographs among 75/255 (FFDNet's top trained level), 0.6 and 1.0
# (docs/start_estimates.md, `python -m benchmarks.start_estimates`, at the image defaults: the default
# ladder, restore's own mean, antithetic pairs): on 70% random inpainting the ladder gains +1.00 / +1.16 /
# +0.96 dB over the prior start and the embedded model +0.26 / +0.27 / +0.14, so 0.6 has the best mean
# gain over the two, 0.09 dB above 75/255 (more than the reports' TIE_DB). The levels from 75/255 to 0.6
# are FFDNet's through contrast scaling in the default ladder. SR x4 and the box hole lose at every level
# with the ladder, so `start="auto"` takes the estimate start for scattered missing pixels only.
ESTIMATE_START_LEVEL = 0.6


def defaults_for(model) -> SamplerDefaults:
    """IMAGE_DEFAULTS for models with an image data range, EXACT_DEFAULTS for the others."""
    return IMAGE_DEFAULTS if getattr(model, "data_range", None) is not None else EXACT_DEFAULTS
