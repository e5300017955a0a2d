import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import load_script
from posterior_diff import load_model
from posterior_diff.images import write_image
from posterior_diff.models.loading import DEFAULT_MODEL_DIR
from posterior_diff.training.data import Photograph
from posterior_diff.training.score_matching import (RandomCrops, TrainingConfig, TrainingRun, build_scheduler,
                                                    config_from_init, learning_rate, load_checkpoint, loss_weights,
                                                    min_snr_weights, train)


def smooth_images(count=3, size=24):
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    return list(torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") * 2 - 1)


def tiny_config(**changes):
    settings = dict(steps=8, batch_size=8, crop_size=8, block_out_channels=(8, 16), checkpoint_every=2, learning_rate=2e-3, warmup_steps=1)
    settings.update(changes)
    return TrainingConfig(**settings)


def evaluation_loss(unet, scheduler, images) -> tuple[float, float]:
    """(the UNet's noise-prediction MSE, the zero predictor's) on a fixed set of 216 noisy 8 x 8 crops:
    the same crops, timesteps and noise for every network, so two scores differ by the networks alone."""
    generator = torch.Generator().manual_seed(99)
    crops = torch.stack([image[:, i:i + 8, j:j + 8] for image in images for i in (0, 8, 16) for j in (0, 8, 16)])
    x0 = crops.repeat(8, 1, 1, 1)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    alpha_bar = scheduler.alphas_cumprod.float()[timesteps].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        predicted = unet(alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, timesteps).sample
    return float((predicted - noise).square().mean()), float(noise.square().mean())


def test_training_lowers_the_loss_and_saves_a_diffusers_pipeline(tmp_path):
    images = smooth_images()
    out = train(images, tmp_path / "run", tiny_config(steps=60), progress=False)
    pipeline = DDPMPipeline.from_pretrained(out)  # diffusers reads it
    trained, zero_predictor = evaluation_loss(pipeline.unet, pipeline.scheduler, images)
    # The zero predictor scores E[eps^2] = 1 (1.008 on this set); the initial networks of seeds 0-3
    # score 1.09-1.17, and the saved (EMA) networks after 60 steps 0.38-0.40. A run that did not
    # learn, or saved the initial weights, stays near or above 1.
    assert trained < 0.6 * zero_predictor, (trained, zero_predictor)
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert load_model(out).channels == 3  # and so do we


def test_snapshots_keep_the_ema_weights_at_their_steps(tmp_path):
    from safetensors.torch import load_file

    from posterior_diff.training.score_matching import load_snapshot

    out = train(smooth_images(), tmp_path / "run", tiny_config(steps=6), progress=False, snapshot_every=3)
    snapshots = sorted(path.name for path in (out / "snapshots").iterdir())
    assert snapshots == ["step_000003.safetensors", "step_000006.safetensors"]
    final = DDPMPipeline.from_pretrained(out).unet.state_dict()
    last = load_snapshot(out, out / "snapshots" / snapshots[-1]).state_dict()
    assert all(torch.equal(last[name], final[name]) for name in final)  # the last snapshot is the saved EMA model
    first = load_file(str(out / "snapshots" / snapshots[0]))
    assert any(not torch.equal(first[name], final[name]) for name in final)


def test_resume_after_a_crash_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    images = smooth_images()
    reference = train(images, tmp_path / "whole", tiny_config(), progress=False)
    original_batch = RandomCrops.batch
    calls = {"n": 0}

    def crashing_batch(self, size):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6; the last checkpoint is step 4
            raise KeyboardInterrupt
        return original_batch(self, size)

    monkeypatch.setattr(RandomCrops, "batch", crashing_batch)
    with pytest.raises(KeyboardInterrupt):
        train(images, tmp_path / "crashed", tiny_config(), progress=False)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["step"] == 4
    monkeypatch.setattr(RandomCrops, "batch", original_batch)
    resumed = train(images, tmp_path / "crashed", resume=True, progress=False)
    whole = DDPMPipeline.from_pretrained(reference).unet.state_dict()
    after_crash = DDPMPipeline.from_pretrained(resumed).unet.state_dict()
    assert all(torch.equal(whole[key], after_crash[key]) for key in whole)  # bit-identical to an uninterrupted run


def test_training_from_a_folder_and_refusing_to_overwrite(tmp_path):
    (tmp_path / "data").mkdir()
    for index, image in enumerate(smooth_images()):
        write_image((image + 1) / 2, tmp_path / "data" / f"{index}.png")
    train(tmp_path / "data", tmp_path / "run", tiny_config(steps=2), progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(tmp_path / "data", tmp_path / "run", tiny_config(steps=2), progress=False)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny_config(crop_size=9)


def test_a_checkpoint_holds_only_what_weights_only_loading_accepts(tmp_path):
    train(smooth_images(), tmp_path / "run", tiny_config(steps=2), progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # torch itself, not our wrapper
    assert set(state) == {"config", "model", "ema", "optimizer", "generator", "step", "loss_log"}
    assert TrainingConfig(**state["config"]) == tiny_config(steps=2)
    assert state["step"] == 2 and len(state["loss_log"]) == 2


UNPICKLED = []  # set by _record_unpickling if a checkpoint's pickled code ever runs


def _record_unpickling():
    UNPICKLED.append(True)
    return "payload"


class CodeCarryingPayload:
    """Unpickling this calls _record_unpickling (harmless stand-in for arbitrary code)."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_checkpoint_carrying_pickled_code_is_refused_without_running_it(tmp_path):
    train(smooth_images(), tmp_path / "run", tiny_config(steps=2), progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["loss_log"] = CodeCarryingPayload()
    torch.save(state, path)
    UNPICKLED.clear()
    with pytest.raises(ValueError, match="checkpoint.pt holds objects other than tensors") as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)
    with pytest.raises(ValueError, match="cannot run code") as refused:
        train(smooth_images(), tmp_path / "run", resume=True, progress=False)
    assert str(path) in str(refused.value)
    assert not UNPICKLED  # the payload's code never ran
    assert torch.load(path, weights_only=False)["loss_log"] == "payload" and UNPICKLED  # control: it is live


# -- multi-scale crops, the recipe, continuing from trained weights, devices, the script --



def ramp(height=96, width=300):
    """An image whose value rises linearly from -1 to 1 across its width: a crop's slope tells its scale."""
    row = torch.linspace(-1, 1, width)
    return row.expand(3, height, width).clone()


def measured_scales(crops, width):
    centre = crops[:, 0, 2:-2, 2:-2]
    slope = torch.maximum(centre.diff(dim=-1).mean(dim=(-2, -1)).abs(), centre.diff(dim=-2).mean(dim=(-2, -1)).abs())
    return slope * (width - 1) / 2


def test_multiscale_crops_have_the_requested_size_and_vary_in_scale():
    image = ramp()
    for dtype_image in (image, ((image + 1) * 127.5).round().to(torch.uint8)):
        crops = RandomCrops([dtype_image], 16, torch.Generator().manual_seed(0), scale_range=(1.0, 4.0)).batch(64)
        assert crops.shape == (64, 3, 16, 16) and crops.dtype == torch.float32
        assert crops.min() >= -1.001 and crops.max() <= 1.001
        scales = measured_scales(crops, image.shape[-1])
        assert scales.min() > 0.9 and scales.max() < 4.3  # shrunk by 1..4
        assert scales.max() / scales.min() > 2.5 and scales.std() > 0.4  # and by many factors between
    # a small image caps the factor at what fits: 96 / 16 = 6 at most, even when 20 is asked for
    capped = measured_scales(RandomCrops([image], 16, torch.Generator().manual_seed(1), scale_range=(4.0, 20.0)).batch(32), 300)
    assert capped.min() > 3.7 and capped.max() < 6.4
    native = measured_scales(RandomCrops([image], 16, torch.Generator().manual_seed(0)).batch(16), 300)
    assert torch.allclose(native, torch.ones(16), atol=1e-3)  # (1, 1): the photographs' own scale


def test_uint8_and_grey_images_give_the_same_crops_as_float_colour_ones():
    grey = torch.randint(256, (1, 40, 50), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    as_float = (grey.float() / 127.5 - 1).expand(3, 40, 50)
    for scale_range in ((1.0, 1.0), (1.0, 2.0)):
        a = RandomCrops([grey], 8, torch.Generator().manual_seed(3), scale_range=scale_range, channels=3).batch(5)
        b = RandomCrops([as_float], 8, torch.Generator().manual_seed(3), scale_range=scale_range, channels=3).batch(5)
        # At scale 1 the same values (float rounding of the [-1, 1] conversion); shrunk, the uint8 image is
        # resized in 8 bits, so each pixel may land a level or two (2/255 = 0.008 each) from the float one.
        assert a.shape == (5, 3, 8, 8) and torch.allclose(a, b, atol=2e-2 if scale_range[1] > 1 else 1e-6)


def test_image_weightings():
    small, large = torch.zeros(3, 10, 10), torch.zeros(3, 40, 40)
    def weights(kind):
        return RandomCrops([small, large], 8, torch.Generator(), weighting=kind).weights.tolist()
    assert weights("area") == pytest.approx([1 / 17, 16 / 17])
    assert weights("sqrt_area") == pytest.approx([0.2, 0.8])
    assert weights("equal") == pytest.approx([0.5, 0.5])


def test_min_snr_weights_equal_the_formula():
    config = tiny_config(loss_weighting="min_snr", min_snr_gamma=5.0)
    alphas_cumprod = build_scheduler(config).alphas_cumprod
    timesteps = torch.tensor([0, 10, 50, 100, 200, 500, 999])
    weights = loss_weights(config, alphas_cumprod, timesteps)
    for t, w in zip(timesteps.tolist(), weights.tolist()):
        a = float(alphas_cumprod[t])
        snr = a / (1 - a)
        assert w == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    assert weights[0] < 1e-3 and weights[-1] == 1.0  # low noise down-weighted, high noise (SNR < 5) untouched
    assert torch.allclose(min_snr_weights(alphas_cumprod, timesteps, 1e9), torch.ones(7))
    assert loss_weights(tiny_config(), alphas_cumprod, timesteps) is None  # uniform


def test_learning_rate_warm_up_and_cosine():
    config = tiny_config(steps=110, warmup_steps=10, learning_rate=1.0, lr_schedule="cosine", final_lr_fraction=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(config, 110) == pytest.approx(0.1)
    assert learning_rate(tiny_config(warmup_steps=4, learning_rate=1.0), 100) == 1.0  # constant


# The recipe's options and the plain run each one replaces.
RECIPE = dict(scale_range=(1.0, 2.0), loss_weighting="min_snr", lr_schedule="cosine", max_grad_norm=1.0, dropout=0.1,
              image_weighting="sqrt_area")
PLAIN = dict(scale_range=(1.0, 1.0), loss_weighting="uniform", lr_schedule="constant", max_grad_norm=0.0, dropout=0.0,
             image_weighting="area")


def recipe_images():
    """Two sizes, so that weighting images by area or by its square root draws them differently."""
    return smooth_images(2, size=32) + smooth_images(1, size=48)


def recipe_config(**changes):
    return tiny_config(steps=3, crop_size=8, attention_levels=(1,), block_out_channels=(8, 16), **{**RECIPE, **changes})


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    return train(recipe_images(), tmp_path_factory.mktemp("recipe") / "run", recipe_config(), progress=False)


def test_the_recipe_options_train(recipe_run):
    unet = DDPMPipeline.from_pretrained(recipe_run).unet
    assert list(unet.config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D"]
    assert list(unet.config.up_block_types) == ["AttnUpBlock2D", "UpBlock2D"]
    assert unet.config.dropout == 0.1
    assert TrainingConfig(**json.loads((recipe_run / "training_log.json").read_text())["config"]) == recipe_config()
    with pytest.raises(ValueError, match="loss_weighting"):
        tiny_config(loss_weighting="snr")
    with pytest.raises(ValueError, match="scale_range"):
        tiny_config(scale_range=(0.5, 2.0))


@pytest.mark.parametrize("option", list(RECIPE))
def test_each_recipe_option_changes_what_is_trained(tmp_path, recipe_run, option):
    """The same seed with one option set back to the plain run's: an option train() ignored would
    leave the same computation, so weights equal to the last bit."""
    plain = train(recipe_images(), tmp_path / "run", recipe_config(**{option: PLAIN[option]}), progress=False)
    trained, without = (load_checkpoint(run / "checkpoint.pt")["model"] for run in (recipe_run, plain))
    assert any(not torch.equal(trained[key], without[key]) for key in trained), option


def state_of(folder):
    return {key: value.float() for key, value in DDPMPipeline.from_pretrained(folder).unet.state_dict().items()}


def test_init_from_loads_the_source_weights_then_trains(tmp_path):
    images = smooth_images()
    source = train(images, tmp_path / "source", tiny_config(steps=3, seed=1), progress=False)
    config = config_from_init(tiny_config(steps=3, seed=7, init_from=str(source), block_out_channels=(16, 32)))
    assert config.block_out_channels == (8, 16) and config.unet_config["block_out_channels"] == [8, 16]  # the source's
    run = TrainingRun.start(config)
    expected = state_of(source)
    assert all(torch.equal(run.model.state_dict()[key], expected[key]) for key in expected)
    assert run.step == 0 and not run.optimizer.state  # a fresh optimiser, warm-up from step 0
    continued = train(images, tmp_path / "continued", tiny_config(steps=3, seed=7, init_from=str(source)), progress=False)
    after = state_of(continued)
    assert any(not torch.equal(after[key], expected[key]) for key in expected)  # it trained
    assert load_model(continued).channels == 3
    saved = json.loads((continued / "training_log.json").read_text())["config"]
    assert saved["init_from"] == str(source)


def test_init_from_the_package_model_folder(tmp_path):
    config = config_from_init(TrainingConfig(steps=1, batch_size=2, crop_size=8, init_from=str(DEFAULT_MODEL_DIR)))
    shipped = load_file(DEFAULT_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert config.block_out_channels == tuple(json.loads((DEFAULT_MODEL_DIR / "unet" / "config.json").read_text())["block_out_channels"])
    model = TrainingRun.start(config).model.state_dict()
    assert all(torch.equal(model[key], value.float()) for key, value in shipped.items())
    with pytest.raises(FileNotFoundError, match="no diffusers UNet2DModel"):
        config_from_init(tiny_config(init_from=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_device_cuda_without_cuda_is_a_clear_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="no CUDA GPU is available") as error:
        train(smooth_images(), tmp_path / "run", tiny_config(), progress=False, device="cuda")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # it failed before doing anything


def test_stopping_on_time_or_sigterm_checkpoints_and_resumes(tmp_path, monkeypatch):
    images = smooth_images()
    out = train(images, tmp_path / "run", tiny_config(), progress=False, stop_after_seconds=0)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 0 and not (out / "unet").exists()
    original_batch = RandomCrops.batch
    calls = {"n": 0}

    def terminated_batch(self, size):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does: the step finishes, then it checkpoints
        return original_batch(self, size)

    monkeypatch.setattr(RandomCrops, "batch", terminated_batch)
    train(images, out, resume=True, progress=False)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(RandomCrops, "batch", original_batch)
    train(images, out, resume=True, progress=False)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8 and (out / "unet").exists()


# -- scripts/train_default_model.py ------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    return load_script("train_default_model")


TINY_ARGS = ["--recipe", "v1", "--steps", "2", "--crop-size", "8", "--batch-size", "2", "--block-out-channels", "8", "16",
             "--checkpoint-every", "1", "--scale-range", "1", "2"]


def fake_photographs():
    generator = np.random.default_rng(0)
    return [Photograph("fake-package", f"photo{i}.png", f"{i:064x}",
                       Image.fromarray(generator.integers(0, 256, (24, 32, 3), dtype=np.uint8)), "1.0") for i in range(2)] + [
        Photograph("fake-package", "grey.png", "f" * 64, Image.fromarray(generator.integers(0, 256, (20, 20), dtype=np.uint8)), "1.0")]



def test_the_script_records_what_it_trained_on(tmp_path, monkeypatch, capsys, script):
    monkeypatch.setattr(script, "gather", lambda sources, install: (fake_photographs(), ["left out x: held out"]))
    out = tmp_path / "model"
    assert script.main(["--out", str(out), *TINY_ARGS]) == 0
    record = json.loads((out / "training_data.json").read_text())
    assert [p["file"] for p in record["photographs"]] == ["photo0.png", "photo1.png", "grey.png"]
    assert record["photographs"][0] == {"package": "fake-package", "version": "1.0", "file": "photo0.png",
                                        "sha256": f"{0:064x}", "size": [32, 24], "mode": "RGB"}
    assert record["left_out"] == ["left out x: held out"] and record["totals"]["photographs"] == 3
    assert record["validation"] == []
    assert load_model(out).channels == 3  # trained on the CPU, loads with posterior_diff.load_model
    # continuing from it records where it started
    assert script.main(["--out", str(tmp_path / "more"), "--init-from", str(out), *TINY_ARGS]) == 0
    more = json.loads((tmp_path / "more" / "training_data.json").read_text())
    assert more["init_from"]["folder"] == str(out) and len(more["init_from"]["weights"]) == 1
    assert more["init_from"]["total_steps"] == 2  # the steps behind the start model
    script.install(tmp_path / "more", destination=tmp_path / "installed")
    assert json.loads((tmp_path / "installed" / "training_log.json").read_text())["total_steps"] == 4
    assert script.total_steps(tmp_path / "installed") == 4 and load_model(tmp_path / "installed").channels == 3
    # resuming on other photographs is refused
    monkeypatch.setattr(script, "gather", lambda sources, install: (fake_photographs()[:1], []))
    assert script.main(["--out", str(out), "--resume", "--steps", "3"]) == 2
    assert "the photographs differ from those" in capsys.readouterr().err


def test_the_script_keeps_the_validation_photographs_out_of_training(tmp_path, monkeypatch, script):
    photographs = fake_photographs()
    monkeypatch.setattr(script, "gather", lambda sources, install: (photographs, []))
    monkeypatch.setattr("posterior_diff.training.data.VALIDATION_FILES", ("photo1.png",))
    out = tmp_path / "model"
    assert script.main(["--out", str(out), *TINY_ARGS]) == 0
    record = json.loads((out / "training_data.json").read_text())
    assert [p["file"] for p in record["photographs"]] == ["photo0.png", "grey.png"]
    assert [p["file"] for p in record["validation"]] == ["photo1.png"]
    assert script.main(["--out", str(tmp_path / "all"), "--include-validation", *TINY_ARGS]) == 0
    assert json.loads((tmp_path / "all" / "training_data.json").read_text())["totals"]["photographs"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_the_script_with_device_cuda_and_no_cuda_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys, script):
    def must_not_gather(*args):
        raise AssertionError("gathered photographs before checking the device")

    monkeypatch.setattr(script, "gather", must_not_gather)
    assert script.main(["--out", str(tmp_path / "model"), "--device", "cuda", *TINY_ARGS]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no CUDA GPU is available" in error and error.startswith("train_default_model: error:")


def test_install_refuses_a_model_over_30_mb(tmp_path, script):
    big = TrainingConfig(steps=1, block_out_channels=(128, 256, 512), layers_per_block=2)
    assert script.shipped_megabytes(big) > 30
    assert script.shipped_megabytes(TrainingConfig(**{k: v for k, v in script.RECIPES["v2"].items() if k != "sources"})) <= 30


def test_the_script_trains_on_exported_photographs(tmp_path, script):
    from posterior_diff.training.data import Source, export_photographs, gather_photographs

    subset = Source("scikit-image", "pypi", ("data/coins.png", "data/text.png"), "skimage")
    export_photographs(gather_photographs([subset], install=False), tmp_path / "photos", "scikit-image")
    assert script.main(["--data", str(tmp_path / "photos"), "--out", str(tmp_path / "model"), *TINY_ARGS]) == 0
    record = json.loads((tmp_path / "model" / "training_data.json").read_text())
    assert record["sources"] == "scikit-image"
    assert [p["file"] for p in record["photographs"]] == ["skimage/data/coins.png", "skimage/data/text.png"]
