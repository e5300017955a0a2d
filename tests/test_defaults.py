import torch

from operators import SuperResolution
from posterior_diff import GaussianPrior, PosteriorSamplingPipeline, restore
from posterior_diff.apps.cli import _parser
from posterior_diff.defaults import EXACT_DEFAULTS, IMAGE_DEFAULTS, defaults_for
from posterior_diff.models.loading import load_model


def test_image_models_and_analytic_priors_get_their_own_defaults(pipeline_folder):
    image_model = load_model(pipeline_folder)
    prior = GaussianPrior(torch.zeros(1, 4, 4, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    assert defaults_for(image_model) == IMAGE_DEFAULTS and defaults_for(prior) == EXACT_DEFAULTS
    assert IMAGE_DEFAULTS != EXACT_DEFAULTS
    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = restore(low, SuperResolution(2, 0.05), image_model)
    assert result.settings.sampler.steps == IMAGE_DEFAULTS.steps == result.nfe
    assert result.settings.guidance.covariance == IMAGE_DEFAULTS.covariance
    assert result.settings.guidance.cg_max_iter == IMAGE_DEFAULTS.cg_max_iter
    assert result.settings.guidance.warm_start is IMAGE_DEFAULTS.warm_start is False  # docs/speed.md
    assert result.settings.guidance.jacobian_s_max == IMAGE_DEFAULTS.jacobian_s_max == float("inf")  # docs/jacobian_range.md
    exact = restore(torch.zeros(1, 2, 2, dtype=torch.float64), SuperResolution(2, 0.1), prior)
    assert exact.settings.sampler.steps == EXACT_DEFAULTS.steps == exact.nfe
    assert exact.settings.guidance.covariance == EXACT_DEFAULTS.covariance
    assert exact.settings.guidance.warm_start is EXACT_DEFAULTS.warm_start is True
    assert exact.settings.guidance.jacobian_s_max == EXACT_DEFAULTS.jacobian_s_max == float("inf")
    assert restore(low, SuperResolution(2, 0.05), image_model, steps=2, warm_start=True).settings.guidance.warm_start


def test_the_command_line_and_the_pipeline_read_the_same_defaults(pipeline_folder):
    args = _parser().parse_args(["restore", "in.png", "--task", "sr4", "-o", "out.png"])
    assert (args.steps, args.covariance, args.cg_max_iter) == (IMAGE_DEFAULTS.steps, IMAGE_DEFAULTS.covariance,
                                                                IMAGE_DEFAULTS.cg_max_iter)
    pipe = PosteriorSamplingPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = pipe(low, SuperResolution(2, 0.05), generator=torch.Generator().manual_seed(1), output_type="pt").images
    same = restore(low, SuperResolution(2, 0.05), load_model(pipeline_folder), generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, same.samples)  # the pipeline calls restore on the same weights: the same computation
