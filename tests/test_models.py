import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DModel

from operators import SuperResolution
from posterior_diff import ModelLoadError, UNetDenoiser, denoiser_from_diffusers, load_model, restore
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
        assert torch.allclose(model(x, t), expected, atol=1e-5)  # float32: the same eps, x0 formed in another order


def test_any_image_size_works_by_padding(pipeline_folder):
    """A 7 x 9 image is padded by reflection at its bottom and right to the UNet's multiple of 2 (8 x 10)
    and cropped back: its output is the 8 x 10 output's top-left 7 x 9, the same network call on the
    same padded input, so equal to the last bit. Zero padding or a crop from elsewhere would differ."""
    model = load_model(pipeline_folder)
    x = torch.randn(1, 3, 7, 9)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="reflect")
    with torch.no_grad():
        out, whole = model(x, 0.5), model(padded, 0.5)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out, whole[..., :7, :9])


def test_restore_with_an_image_model_returns_clamped_images_in_unit_range(pipeline_folder):
    y = torch.rand(3, 5, 5)  # an x2 low-resolution image in [0, 1], odd size
    result = restore(y, SuperResolution(2, sigma_y=0.05), str(pipeline_folder), num_samples=2, steps=4,
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

    from posterior_diff.models.loading import DEFAULT_MODEL_DIR

    low = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0))  # x2 -> 10x12, not a multiple of 4
    result = restore(low, SuperResolution(2, sigma_y=0.05), num_samples=2, steps=3, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (2, 3, 10, 12)
    assert bool(torch.isfinite(result.samples).all())
    assert float(result.samples.min()) >= 0 and float(result.samples.max()) <= 1
    pipeline = DDPMPipeline.from_pretrained(DEFAULT_MODEL_DIR)  # the shipped folder is a diffusers pipeline
    assert pipeline.unet.config.in_channels == 3


def _spy_timesteps(unet):
    """Record the timestep argument of every UNet call."""
    seen = []
    forward = unet.forward

    def recording_forward(sample, timestep, *args, **kwargs):
        seen.append(timestep)
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = recording_forward
    return seen


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_matches_the_schedulers_own_x0(prediction):
    from conftest import tiny_unet

    unet = tiny_unet()
    scheduler = DDPMScheduler(prediction_type=prediction, clip_sample=False, beta_schedule="squaredcos_cap_v2")
    model = denoiser_from_diffusers(unet, scheduler)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    n = 300
    with torch.no_grad():
        output = unet(x, torch.full((2,), float(n))).sample
        expected = scheduler.step(output, n, x).pred_original_sample
        # float32, the scheduler's own x0 (divided by sqrt(alpha_bar) ~ 0.5): a few ulps of values up to ~10
        assert torch.allclose(model(x, (n + 1) / 1000), expected, atol=1e-4)


def test_fractional_times_reach_the_unet_as_float_timesteps():
    from conftest import tiny_unet

    unet = tiny_unet()
    seen = _spy_timesteps(unet)
    model = denoiser_from_diffusers(unet, DDPMScheduler())
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), 0.5005)  # between training steps 499 and 500
    assert seen[0].is_floating_point() and torch.allclose(seen[0], torch.full((2,), 499.5))


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler])
def test_unet_folders_with_any_ddpm_family_scheduler_config_load(tmp_path, scheduler_class):
    from conftest import tiny_unet

    tiny_unet().save_pretrained(tmp_path)
    scheduler_class(beta_schedule="scaled_linear", prediction_type="v_prediction").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    reference = DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod.double()
    knots = torch.tensor([0, 10, 500, 999])
    times = ((knots + 1) / 1000).double()
    assert model.prediction == "v_prediction"
    assert torch.allclose(model.schedule.alpha(times) ** 2, reference[knots], rtol=1e-5)  # float32 cumprod in diffusers


def test_class_conditional_unets_need_a_label_and_use_it():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=4)
    with pytest.raises(ValueError, match="class_label"):
        denoiser_from_diffusers(unet, DDPMScheduler())
    with pytest.raises(ValueError, match="unconditional"):
        denoiser_from_diffusers(UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                            down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                                DDPMScheduler(), class_label=1)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        outputs = [denoiser_from_diffusers(unet, DDPMScheduler(), class_label=label)(x, 0.5) for label in (0, 1)]
    assert not torch.allclose(outputs[0], outputs[1])


def test_a_half_precision_unet_runs_in_half_while_sampling_stays_float32():
    from conftest import tiny_unet

    full = denoiser_from_diffusers(tiny_unet(), DDPMScheduler())
    half = denoiser_from_diffusers(tiny_unet().to(torch.bfloat16), DDPMScheduler())
    assert half.sampling_dtype() == torch.float32 and next(half.module.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = half(x, 0.3)
        assert out.dtype == torch.float32
        assert torch.allclose(out, full(x, 0.3), atol=0.1)  # bfloat16 weights: 8 mantissa bits, ~0.4 % per layer


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_the_embedded_model_defaults_to_bfloat16_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    from posterior_diff.models import loading

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert loading.native_bfloat16() is (avx512_bf16 or amx)
    assert loading.default_network_dtype() == expected
    assert loading.default_model().network_dtypes() == (str(expected).removeprefix("torch."),)
    assert loading.default_model(torch.float32).network_dtypes() == ("float32",)  # asked for: any CPU


def test_the_result_says_which_precision_the_network_ran_in():
    from conftest import tiny_unet
    from posterior_diff import ladder

    operator = SuperResolution(2, sigma_y=0.05)
    y = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    half = denoiser_from_diffusers(tiny_unet().to(torch.bfloat16), DDPMScheduler())
    full = denoiser_from_diffusers(tiny_unet(), DDPMScheduler())
    for model, expected in ((half, "bfloat16"), (full, "float32")):
        result = restore(y, operator, model, steps=2, covariance="isotropic")
        assert result.settings.network_dtype == expected
    # a ladder of a bfloat16 piece above a float32 one names both
    both = ladder(half, (full, (0.01, 0.2)))
    assert both.network_dtypes() == ("bfloat16", "float32")


def test_the_command_line_dtype_auto_is_the_embedded_models_default():
    from posterior_diff.apps.command_options import load_network
    from posterior_diff.models.loading import default_model

    assert load_network(None, "auto") is default_model()
    assert load_network(None, "float32") is default_model(torch.float32)


def _fake_hub_cache(cache, repo_id, folder):
    """Lay out `folder` as the cached snapshot of `repo_id`, as huggingface_hub stores downloads."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_load_through_the_same_code_from_the_cache(pipeline_folder, tmp_path):
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-ddpm", pipeline_folder)
    from_hub = load_model("someone/tiny-ddpm", cache_dir=tmp_path / "cache", local_files_only=True)
    from_folder = load_model(pipeline_folder)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(from_hub(x, 0.4), from_folder(x, 0.4))


def test_an_uncached_hub_id_offline_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="pass a local folder") as error:
        load_model("someone/missing", cache_dir=tmp_path, local_files_only=True)
    assert "HF_HUB_OFFLINE" in str(error.value) and "local_files_only" in str(error.value)
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest.py sets HF_HUB_OFFLINE=1 before any import
    with pytest.raises(ModelLoadError, match="someone/missing"):
        restore(torch.rand(3, 4, 4), SuperResolution(2, 0.05), "someone/missing")


# --- Weight variants, legacy scheduler names, refusals and hub downloads of one format. ----------

import json  # noqa: E402
from fnmatch import fnmatch  # noqa: E402

from posterior_diff.models.loading import hub_attempts  # noqa: E402


def test_a_folder_with_only_fp16_weights_loads_that_variant(tmp_path):
    from conftest import tiny_unet

    tiny_unet().half().save_pretrained(tmp_path / "unet", variant="fp16")
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    model = load_model(tmp_path)  # no plain weights: the fp16 variant, run in float32 by default
    reference = UNet2DModel.from_pretrained(tmp_path / "unet", variant="fp16").float()
    assert next(model.module.parameters()).dtype == torch.float32
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        # the same fp16 weights run in float32 both ways: equal to float32 rounding (allclose's default rtol 1e-5)
        assert torch.allclose(model(x, 0.5), denoiser_from_diffusers(reference, DDPMScheduler())(x, 0.5))
    half = load_model(tmp_path, variant="fp16", torch_dtype=torch.bfloat16)
    assert next(half.module.parameters()).dtype == torch.bfloat16 and half.sampling_dtype() == torch.float32
    with pytest.raises(ModelLoadError, match="no diffusion_pytorch_model.ema"):
        load_model(tmp_path, variant="ema")


def test_legacy_scheduler_names_and_keys_are_mapped(tmp_path):
    from conftest import tiny_unet

    tiny_unet().save_pretrained(tmp_path)
    legacy = {"_class_name": "GaussianDDPMScheduler", "_diffusers_version": "0.0.1", "timesteps": 500, "beta_start": 1e-4,
              "beta_end": 0.02, "beta_schedule": "linear", "variance_type": "fixed_small", "clip_predicted_image": True}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(legacy))
    model = load_model(tmp_path)
    expected = DDPMScheduler(num_train_timesteps=500, beta_start=1e-4, beta_end=0.02).alphas_cumprod.double()
    n = torch.tensor([0, 250, 499])
    assert model.schedule.num_train_timesteps == 500 and model.prediction == "epsilon"
    assert torch.allclose(model.schedule.alpha(((n + 1) / 500).double()) ** 2, expected[n], rtol=1e-5)  # float32 cumprod


@pytest.mark.parametrize("scheduler_config, message", [
    ({"_class_name": "CMStochasticIterativeScheduler"}, r"CMStochasticIterativeScheduler cannot define a posterior-mean denoiser: .*E\[x_0 \| x_t\]"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, r"FlowMatchEulerDiscreteScheduler cannot define a posterior-mean denoiser: it has no alphas_cumprod"),
    ({"_class_name": "ScoreSdeVpScheduler"}, r"ScoreSdeVpScheduler cannot define a posterior-mean denoiser"),
    ({"_class_name": "NoSuchScheduler"}, r"unknown scheduler class 'NoSuchScheduler'"),
])
def test_a_folder_whose_scheduler_defines_no_posterior_mean_is_one_clear_error(tmp_path, scheduler_config, message):
    from conftest import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # refused before the weights are read
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path)


def _fake_hub(monkeypatch, repositories, fetched):
    """Replace snapshot_download by a copy of the files of repositories[repo_id] that match the
    allow_patterns (fnmatch, as huggingface_hub filters them); each call's files go to `fetched`."""
    import huggingface_hub

    def snapshot_download(repo_id, *, allow_patterns, cache_dir=None, local_files_only=False):
        source = repositories[repo_id]
        target = cache_dir / repo_id.replace("/", "--")
        names = []
        for path in sorted(source.rglob("*")):
            name = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch(name, pattern) for pattern in allow_patterns):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / name)
                names.append(name)
        fetched.append(names)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_downloads_fetch_one_weight_format_safetensors_first(tmp_path, monkeypatch):
    from conftest import tiny_unet

    repositories = {}
    for name, formats in {"both": (True, False), "bin-only": (False,), "fp16-only": ("fp16",)}.items():
        folder = tmp_path / "repos" / name
        DDPMScheduler().save_pretrained(folder / "scheduler")
        for form in formats:
            if form == "fp16":
                tiny_unet().half().save_pretrained(folder / "unet", variant="fp16")
            else:
                tiny_unet().save_pretrained(folder / "unet", safe_serialization=form)
        repositories[f"someone/{name}"] = folder
    fetched = []
    _fake_hub(monkeypatch, repositories, fetched)
    cache = tmp_path / "cache"
    load_model("someone/both", cache_dir=cache)
    assert len(fetched) == 1 and "unet/diffusion_pytorch_model.safetensors" in fetched[0]
    assert not any(name.endswith(".bin") for name in fetched[0])
    fetched.clear()
    load_model("someone/bin-only", cache_dir=cache)
    assert len(fetched) == 2 and fetched[-1][-1] == "unet/diffusion_pytorch_model.bin"  # safetensors, then .bin
    fetched.clear()
    load_model("someone/fp16-only", cache_dir=cache)  # no plain weights in either format: the fp16 variant
    assert len(fetched) == 3 and "unet/diffusion_pytorch_model.fp16.safetensors" in fetched[-1]
    assert all(len(patterns) == len(hub_attempts()[0]) for patterns in hub_attempts())
