"""Priors: every Denoiser that is a model of data, and the adapters that make one.

- `loading`: diffusers folders and hub ids, the embedded default (`default_model/`), `load_model`.
- `formats`: one adapter per diffusers model family (DDPM, ADM, score-SDE VE, EDM) into a Denoiser.
- `priors`: the analytic Gaussian and Gaussian-mixture priors, with closed-form posteriors.
- `deepinv_prior`, `ffdnet_prior`: deepinv denoisers and FFDNet as Denoisers.
- `contrast`: such a denoiser asked above its trained range, on the image at reduced contrast.
- `equivariance`: such a denoiser averaged over the image's flips and quarter turns.
- `ensemble`: such denoisers mixed as a weighted mean, and a grey one asked per colour channel.
- `ladder`: several Denoisers as one, each at the noise levels it was trained for.

This room imports only the contracts below it (denoisers, schedules, images, checks) and
`operators`; the sampling room beside it does not import it, nor does it import sampling.

`posterior_diff.models` was one module (today's `loading`, with `formats`' public names); its
public names are still importable from here.
"""

from posterior_diff.models.formats import (DiffusersUNetDenoiser, ModelLoadError, UNetDenoiser, check_diffusers_pair,
                                           denoiser_from_diffusers)
from posterior_diff.models.loading import (DEFAULT_MODEL_DIR, HUB_CONFIG_FILES, HUB_ID, LEGACY_KEYS, LEGACY_SCHEDULERS,
                                           PLAIN_WEIGHTS, VARIANT_WEIGHTS, WEIGHT_FORMATS, WEIGHTS, choose_variant,
                                           default_model, hub_attempts, load_diffusers_components, load_model,
                                           names_legacy_scheduler, resolve_model_folder, weight_patterns,
                                           weight_variants)

__all__ = ["DEFAULT_MODEL_DIR", "ModelLoadError", "UNetDenoiser", "DiffusersUNetDenoiser", "denoiser_from_diffusers",
           "check_diffusers_pair", "load_model", "resolve_model_folder", "default_model", "load_diffusers_components",
           "names_legacy_scheduler", "weight_variants", "choose_variant", "weight_patterns", "hub_attempts", "HUB_ID",
           "HUB_CONFIG_FILES", "WEIGHTS", "WEIGHT_FORMATS", "PLAIN_WEIGHTS", "VARIANT_WEIGHTS", "LEGACY_SCHEDULERS",
           "LEGACY_KEYS"]
