import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from operators import SuperResolution
from posterior_diff import UNetDenoiser, load_model, restore
from posterior_diff.denoisers import x0_from_epsilon


def test_folder_loads_into_a_denoiser_that_matches_the_unet(pipeline_folder):
    model = load_model(pipeline_folder)
    assert isinstance(model, UNetDenoiser) and model.channels == 3
    unet = UNet2DModel.from_pretrained(pipeline_folder / "unet")
    scheduler = DDPMScheduler.from_pretrained(pipeline_folder / "scheduler")
    x = torch.randn(2, 3, 8, 8)
    n = 499
    t = torch.full((2,), (n + 1) / 1000)
    with torch.no_grad():
        eps = unet(x, torch.full((2,), float(n))).sample
    alpha_bar = scheduler.alphas_cumprod[n]
    expected = x0_from_epsilon(x, eps, alpha_bar.sqrt(), (1 - alpha_bar).sqrt())
    with torch.no_grad():
        assert torch.allclose(model(x, t), expected, atol=1e-5)


def test_any_image_size_works_by_padding(pipeline_folder):
    model = load_model(pipeline_folder)
    x = torch.randn(1, 3, 7, 9)
    with torch.no_grad():
        out = model(x, 0.5)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_restore_with_an_image_model_returns_clamped_images_in_unit_range(pipeline_folder):
    y = torch.rand(3, 5, 5)  # an x2 low-resolution image in [0, 1], odd size
    result = restore(y, SuperResolution(2, sigma=0.05), str(pipeline_folder), num_samples=2, steps=4,
                     generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (2, 3, 10, 10)
    assert bool(torch.isfinite(result.samples).all()) and float(result.samples.min()) >= 0 and float(result.samples.max()) <= 1


def test_channel_mismatch_and_bad_folders_are_clear_errors(pipeline_folder, tmp_path):
    with pytest.raises(ValueError, match="channel"):
        restore(torch.rand(1, 4, 4), SuperResolution(2, 0.05), str(pipeline_folder), steps=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="model must be"):
        load_model(tmp_path / "missing")


def test_the_embedded_default_model_restores_a_small_image_of_any_size():
    from diffusers import DDPMPipeline

    from posterior_diff.models import DEFAULT_MODEL_DIR

    low = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0))  # x2 -> 10x12, not a multiple of 4
    result = restore(low, SuperResolution(2, sigma=0.05), num_samples=2, steps=3, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (2, 3, 10, 12)
    assert bool(torch.isfinite(result.samples).all())
    assert float(result.samples.min()) >= 0 and float(result.samples.max()) <= 1
    pipeline = DDPMPipeline.from_pretrained(DEFAULT_MODEL_DIR)  # the shipped folder is a diffusers pipeline
    assert pipeline.unet.config.in_channels == 3
