import pytest
import torch
from diffusers import DDPMPipeline

from posterior_diff import load_model
from posterior_diff.images import write_image
from posterior_diff.training import RandomCrops, TrainingConfig, load_checkpoint, train


def smooth_images(count=3, size=24):
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    return list(torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") * 2 - 1)


def tiny_config(**changes):
    settings = dict(steps=8, batch_size=8, crop_size=8, block_out_channels=(8, 16), checkpoint_every=2, learning_rate=2e-3, warmup_steps=1)
    settings.update(changes)
    return TrainingConfig(**settings)


def test_training_lowers_the_loss_and_saves_a_diffusers_pipeline(tmp_path):
    out = train(smooth_images(), tmp_path / "run", tiny_config(steps=60), progress=False)
    log = load_checkpoint(out / "checkpoint.pt")["loss_log"]
    losses = torch.tensor([loss for _, loss in log])
    assert losses[-10:].mean() < 0.7 * losses[:10].mean()
    pipeline = DDPMPipeline.from_pretrained(out)  # diffusers reads it
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert load_model(out).channels == 3  # and so do we


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
