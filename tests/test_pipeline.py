import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from conftest import tiny_unet
from operators import Inpainting, SuperResolution, box_mask
from posterior_diff import DEFAULT_MODEL_DIR, PosteriorSamplingPipeline, ladder, load_model, restore

OPERATOR = SuperResolution(2, sigma_y=0.05)
MEASUREMENT = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))  # an 8x8 image at x2


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def run(pipe, **kwargs):
    settings = dict(num_inference_steps=4, num_samples=2, generator=seeded(), output_type="pt")
    settings.update(kwargs)
    return pipe(MEASUREMENT, OPERATOR, **settings).images


@pytest.fixture
def pipe(pipeline_folder):
    pipe = PosteriorSamplingPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_pipeline_and_restore_give_the_same_numbers(pipe, pipeline_folder):
    images = run(pipe)
    result = restore(MEASUREMENT, OPERATOR, str(pipeline_folder), num_samples=2, steps=4, generator=seeded())
    assert images.shape == (2, 3, 8, 8)
    assert torch.equal(images, result.samples)  # the pipeline calls restore: the same computation
    assert result.settings.antithetic  # 2 samples of an image model: one antithetic pair, as the pipeline drew
    independent = run(pipe, antithetic=False)
    assert torch.equal(independent, restore(MEASUREMENT, OPERATOR, str(pipeline_folder), num_samples=2, steps=4,
                                            generator=seeded(), antithetic=False).samples)
    assert not torch.equal(independent, images)
    from_estimate = run(pipe, start="estimate", start_level=0.3)
    assert torch.equal(from_estimate, restore(MEASUREMENT, OPERATOR, str(pipeline_folder), num_samples=2, steps=4,
                                              generator=seeded(), start="estimate", start_level=0.3).samples)
    assert not torch.equal(from_estimate, images)
    more_mixing = run(pipe, eta=3.0)
    assert torch.equal(more_mixing, restore(MEASUREMENT, OPERATOR, str(pipeline_folder), num_samples=2, steps=4,
                                            generator=seeded(), eta=3.0).samples)
    assert not torch.equal(more_mixing, images)


def test_ladder_pieces_take_their_noise_levels_as_restore_does_with_the_ladder(pipe, pipeline_folder):
    other = load_model(pipeline_folder)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.5)  # another network, so that a piece left unasked shows
    piece = (other, (other.sigma_range[0], 0.3))
    images = run(pipe, ladder_pieces=[piece])
    result = restore(MEASUREMENT, OPERATOR, ladder(load_model(pipeline_folder), piece), num_samples=2, steps=4,
                     generator=seeded())
    assert torch.equal(images, result.samples)  # one code path: the same computation
    assert not torch.allclose(images, run(pipe))  # and the piece held its levels


def test_generator_reproducibility(pipe):
    assert torch.equal(run(pipe), run(pipe))  # same seed, same computation
    assert not torch.allclose(run(pipe), run(pipe, generator=seeded(1)))  # other draws: O(1) apart


def test_output_types_and_tuple_return(pipe):
    tensor = run(pipe)
    array = run(pipe, output_type="np")
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 3)
    assert np.array_equal(array, tensor.permute(0, 2, 3, 1).numpy())  # the same float32 numbers, moved
    pictures = run(pipe, output_type="pil")
    assert len(pictures) == 2 and all(isinstance(p, Image.Image) and p.size == (8, 8) for p in pictures)
    # 8-bit rounding: half a level, plus float32 rounding of x * 255
    assert np.abs(np.asarray(pictures[0]) / 255.0 - array[0]).max() <= 0.5 / 255 + 1e-6
    as_tuple = pipe(MEASUREMENT, OPERATOR, num_inference_steps=4, num_samples=2, generator=seeded(),
                    output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], tensor)  # the same run, packed otherwise
    assert isinstance(pipe(MEASUREMENT, OPERATOR, num_inference_steps=2), ImagePipelineOutput)
    with pytest.raises(ValueError, match="output_type"):
        pipe(MEASUREMENT, OPERATOR, output_type="latent")


def test_measurements_as_numpy_and_pil_match_the_tensor(pipe):
    mask = box_mask((3, 8, 8), 2, 2, 4, 4)
    operator = Inpainting(mask, sigma_y=0.05)
    image = torch.rand(3, 8, 8, generator=seeded(5)) * mask
    as_uint8 = (image * 255).round() / 255
    outputs = [pipe(form, operator, num_inference_steps=3, generator=seeded(), output_type="pt").images
               for form in (as_uint8, (as_uint8.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                            Image.fromarray((as_uint8.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))]
    # k / 255 in float32 is the same number from a uint8 array, a PIL image or the tensor above:
    # the same measurement, so the same computation
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_save_and_load_round_trip_and_from_pipe(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = PosteriorSamplingPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(reloaded), run(pipe))  # the same weights, saved and read back exactly
    ddpm = DDPMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())
    converted = PosteriorSamplingPipeline.from_pipe(ddpm)
    assert converted.unet is ddpm.unet and converted.scheduler is ddpm.scheduler


def test_diffusers_loads_it_as_a_custom_pipeline(pipe, pipeline_folder):
    import posterior_diff.apps.pipeline

    custom = DiffusionPipeline.from_pretrained(pipeline_folder, custom_pipeline=posterior_diff.apps.pipeline.__file__,
                                               trust_remote_code=True)
    assert type(custom).__name__ == "PosteriorSamplingPipeline"
    custom.set_progress_bar_config(disable=True)
    assert torch.equal(run(custom), run(pipe))  # the same class and weights: the same computation


def test_half_precision_weights_and_cpu_offload(pipeline_folder, pipe):
    half = PosteriorSamplingPipeline.from_pretrained(pipeline_folder, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.unet.dtype == torch.bfloat16
    images = run(half)
    assert images.dtype == torch.float32 and bool(torch.isfinite(images).all())
    pipe.enable_model_cpu_offload(device="cpu")  # the offload hooks; on a GPU machine device="cuda"
    # the hooks only move the weights: the same computation
    assert torch.equal(run(pipe), run(PosteriorSamplingPipeline.from_pretrained(pipeline_folder)))


def test_the_embedded_default_model_folder_loads_into_the_pipeline():
    pipe = PosteriorSamplingPipeline.from_pretrained(DEFAULT_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    images = run(pipe, num_samples=1, num_inference_steps=2)
    assert images.shape == (1, 3, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1


def test_bad_arguments_fail_before_any_sampling(pipe):
    with pytest.raises(TypeError, match="generator"):
        pipe(MEASUREMENT, OPERATOR, generator=[seeded()])
    with pytest.raises(ValueError, match="covariance"):
        pipe(MEASUREMENT, OPERATOR, covariance="full")
    with pytest.raises(ValueError, match="channel"):
        pipe(torch.rand(1, 4, 4), OPERATOR)


def test_an_unusable_scheduler_is_refused_when_the_pipeline_is_built(tmp_path):
    from diffusers import CMStochasticIterativeScheduler

    from posterior_diff import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"CMStochasticIterativeScheduler cannot define a posterior-mean denoiser"):
        PosteriorSamplingPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler())
    DDPMPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler()).save_pretrained(tmp_path / "consistency")
    with pytest.raises(ModelLoadError, match="CMStochasticIterativeScheduler"):
        PosteriorSamplingPipeline.from_pretrained(tmp_path / "consistency")


def test_a_score_sde_folder_runs_in_the_pipeline_as_in_restore(tmp_path):
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

    from test_model_formats import ncsnpp_unet

    scheduler = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0)
    ScoreSdeVePipeline(unet=ncsnpp_unet(), scheduler=scheduler).save_pretrained(tmp_path / "ve")
    pipe = PosteriorSamplingPipeline.from_pretrained(tmp_path / "ve")
    pipe.set_progress_bar_config(disable=True)
    images = run(pipe, num_inference_steps=2)
    result = restore(MEASUREMENT, OPERATOR, str(tmp_path / "ve"), num_samples=2, steps=2, generator=seeded())
    assert torch.equal(images, result.samples) and float(images.min()) >= 0 and float(images.max()) <= 1  # same computation


def test_the_pipeline_loads_a_folder_with_a_legacy_scheduler_name(pipeline_folder):
    """An early-diffusers folder (scheduler "GaussianDDPMScheduler", old config keys) loads through
    the pipeline as through load_model, and both give the same samples."""
    import json

    from posterior_diff.models.loading import load_model

    config_path = pipeline_folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="GaussianDDPMScheduler", timesteps=config.pop("num_train_timesteps"))
    config_path.write_text(json.dumps(config))
    index = json.loads((pipeline_folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "GaussianDDPMScheduler"]
    (pipeline_folder / "model_index.json").write_text(json.dumps(index))
    pipe = PosteriorSamplingPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = pipe(low, OPERATOR, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    same = restore(low, OPERATOR, load_model(pipeline_folder), steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, same.samples)  # the pipeline calls restore on the same weights: the same computation
    with pytest.raises(TypeError, match="torch_dtype and variant only"):
        PosteriorSamplingPipeline.from_pretrained(pipeline_folder, low_cpu_mem_usage=True)
