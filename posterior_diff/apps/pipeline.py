"""`PosteriorSamplingPipeline`: posterior sampling as a diffusers pipeline.

    from posterior_diff import PosteriorSamplingPipeline, DEFAULT_MODEL_DIR
    from operators import SuperResolution
    pipe = PosteriorSamplingPipeline.from_pretrained(DEFAULT_MODEL_DIR)   # or any supported folder / hub id
    images = pipe(low_resolution, SuperResolution(4, sigma_y=0.025), num_samples=4).images

It registers a `unet` (a pixel-space `UNet2DModel`) and its training `scheduler`: the DDPM family
(DDPM, ADM), ScoreSdeVeScheduler (score-SDE VE) or an EDM scheduler, of which only the config is
read (`posterior_diff.models.formats`). A pair that defines no posterior mean E[x_0 | x_t]
(consistency models, unknown schedulers, a UNet that does not fit its scheduler) is refused when
the pipeline is built, by `__init__` and so by `from_pretrained`. The sampling itself is
`restore()`'s: one code path, so the pipeline and `restore()` give the same numbers for the same
generator. Everything diffusers gives a pipeline comes with it: `save_pretrained`,
`from_pretrained` (with `torch_dtype`), `from_pipe`, `.to(device)`, `enable_model_cpu_offload`,
`set_progress_bar_config`.

This file imports only absolute names, so diffusers can also load it as a community pipeline:
`DiffusionPipeline.from_pretrained(folder, custom_pipeline="path/to/posterior_diff/apps/pipeline.py")`.
"""

# No `from __future__ import annotations`: diffusers reads __init__'s annotations at run time
# (from_pipe matches components by type).
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel

from posterior_diff.models.formats import check_diffusers_pair, denoiser_from_diffusers
from posterior_diff.models.ladder import ladder
from posterior_diff.models.loading import load_diffusers_components, names_legacy_scheduler
from posterior_diff.restore import restore

OUTPUT_TYPES = ("pil", "np", "pt")


class PosteriorSamplingPipeline(DiffusionPipeline):
    """Posterior samples of an image x from a measurement y = A x + noise, with a diffusion prior.

    Args:
        unet: a `diffusers.UNet2DModel` (eps, v or x0 prediction; ADM's learned variance; a
            score-SDE score network; an EDM-preconditioned network).
        scheduler: its training scheduler (DDPMScheduler, DDIMScheduler, PNDMScheduler,
            EulerDiscreteScheduler, ..., ScoreSdeVeScheduler, EDMEulerScheduler, ...).

    Raises:
        ModelLoadError: (a ValueError) a scheduler that cannot define E[x_0 | x_t], or a UNet that
            does not fit it, named with the reason.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if unet is not None and scheduler is not None:
            check_diffusers_pair(unet, scheduler)
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, except for a local folder whose scheduler config uses an
        early diffusers class name (e.g. GaussianDDPMScheduler), which diffusers no longer knows:
        that one is read by `models.load_diffusers_components`, which maps the name (it takes
        `torch_dtype` and `variant` only)."""
        folder = Path(str(pretrained_model_name_or_path))
        if not (folder.is_dir() and names_legacy_scheduler(folder)):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        unknown = sorted(set(kwargs) - {"torch_dtype", "variant"})
        if unknown:
            raise TypeError(f"a folder with a legacy scheduler name loads with torch_dtype and variant only, got {unknown}")
        unet, scheduler = load_diffusers_components(folder, kwargs.get("variant"), kwargs.get("torch_dtype"))
        return cls(unet=unet, scheduler=scheduler)

    def __call__(
        self,
        measurement,
        operator,
        num_inference_steps: int | None = None,
        num_samples: int = 1,
        covariance: str | None = None,
        eta: float | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        class_label: int | None = None,
        solver: str = "multistep",
        cg_max_iter: int | None = None,
        jacobian_s_max: float | None = None,
        batch_size: int | None = None,
        ladder_pieces: tuple = (),
        allow_extrapolation: bool = False,
        antithetic: bool | None = None,
        start: str = "auto",
        start_level: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Draw `num_samples` posterior samples.

        Args:
            measurement: y in [0, 1] units: a tensor (C, h, w), a numpy array (h, w[, C]) or a
                PIL image (one measurement, no batch dimension).
            operator: an `operators.LinearOperator` (or a deepinv physics, once adapted) with
                sigma_y in [0, 1] units.
            num_inference_steps: sampler steps (network evaluations per sample for the default solver);
                None: `defaults.IMAGE_DEFAULTS`, as for covariance, eta, cg_max_iter and jacobian_s_max.
            num_samples: how many posterior samples to return.
            covariance, eta, guidance_scale, solver, cg_max_iter, jacobian_s_max, batch_size: as in `restore()`.
            generator: a torch.Generator for reproducible draws.
            output_type: "pil" (list of PIL images), "np" (array (B, H, W, C)) or "pt" (tensor
                (B, C, H, W)); all in [0, 1].
            return_dict: return an `ImagePipelineOutput` (else the tuple `(images,)`).
            class_label: the class index for a class-conditional UNet.
            ladder_pieces: further priors that take over some noise levels from the UNet, as
                `posterior_diff.ladder` takes them: Denoisers or pairs (Denoiser, (low, high)) in
                [0, 1] image units, e.g. `[(ffdnet(), (0.0, 0.2))]` for FFDNet below 0.2
                (docs/theory.md, "A ladder of priors"). Empty: the UNet alone.
            allow_extrapolation: as in `restore()`: run even where a prior would be asked about a
                noise level outside its `sigma_range`.
            antithetic: as in `restore()`: None pairs the samples antithetically where
                num_samples is even (each is still a posterior sample; False for independent ones).
            start, start_level: as in `restore()`: where the sampler starts ("auto": the measurement
                for denoising, a classical estimate for scattered holes, else the prior) and an
                estimate start's noise level in [0, 1] units.

        Returns:
            `ImagePipelineOutput(images=...)`, or `(images,)` when `return_dict` is False.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        denoiser = denoiser_from_diffusers(self.unet, self.scheduler, class_label)
        if ladder_pieces:
            denoiser = ladder(denoiser, *ladder_pieces)
        result = restore(
            measurement, operator, denoiser, num_samples=num_samples, steps=num_inference_steps,
            covariance=covariance, eta=eta, solver=solver, guidance_scale=guidance_scale, generator=generator,
            device=self._execution_device, progress=lambda total: self.progress_bar(total=total),
            cg_max_iter=cg_max_iter, jacobian_s_max=jacobian_s_max, batch_size=batch_size,
            allow_extrapolation=allow_extrapolation, antithetic=antithetic, start=start, start_level=start_level,
        )
        self.maybe_free_model_hooks()
        images = result.samples
        if output_type != "pt":
            images = images.detach().cpu().float().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(np.clip(images, 0, 1))
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
