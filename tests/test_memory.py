"""The memory check: a run that would not fit in the CPU's memory is split or refused before any sampling."""

import pytest
import torch

from conftest import tiny_unet
from operators import SuperResolution
from diffusers import DDPMScheduler

from posterior_diff import denoiser_from_diffusers, ladder, restore
from posterior_diff import memory
from posterior_diff.memory import MemoryEstimateError, peak_bytes_per_row, plan_memory

OPERATOR = SuperResolution(2, sigma_y=0.05)


def image_model():
    """A tiny random UNet as an image model ([-1, 1] units), its weights frozen as loaded models' are."""
    return denoiser_from_diffusers(tiny_unet().requires_grad_(False), DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="module")
def model():
    return image_model()


def measurement():
    return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))  # a 16x16 image at x2


def test_the_estimate_grows_with_the_pixels_and_the_vjp_and_allocates_nothing(model):
    forward = peak_bytes_per_row(model, (3, 16, 16), needs_vjp=False)
    with_vjp = peak_bytes_per_row(model, (3, 16, 16), needs_vjp=True)
    larger = peak_bytes_per_row(model, (3, 64, 64), needs_vjp=True)
    assert 0 < forward < with_vjp  # the VJP keeps the activations
    # a convolutional network's activations scale with the pixel count: 16 times the pixels, within
    # the fixed part (time embedding, parameter gradients the tracker counts)
    assert 8 * with_vjp < larger < 17 * with_vjp
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # left as it was


def test_a_ladder_is_estimated_by_its_largest_piece(model):
    other = image_model()
    prior = ladder(model, (other, (other.sigma_range[0], 0.2)))
    # forwards only: a probe with its VJP costs seconds even for a tiny network (every op is dispatched twice)
    assert peak_bytes_per_row(prior, (3, 16, 16), False) == max(peak_bytes_per_row(model, (3, 16, 16), False),
                                                                peak_bytes_per_row(other, (3, 16, 16), False))


def test_a_run_that_does_not_fit_is_split_into_runs_that_do(model, monkeypatch):
    per_row = peak_bytes_per_row(model, (3, 16, 16), True)
    monkeypatch.setattr(memory, "PROBE_ROW_PIXELS", 0)
    room = memory.OVERHEAD * per_row / memory.HEADROOM  # the memory one row may take
    monkeypatch.setattr(memory, "available_bytes", lambda: int(2.5 * room))  # room for 2 rows
    options = dict(num_samples=5, steps=3, covariance="isotropic")
    split = restore(measurement(), OPERATOR, model, generator=torch.Generator().manual_seed(0), **options)
    assert split.settings.batch_size == 2 and split.settings.memory_limited
    asked = restore(measurement(), OPERATOR, model, generator=torch.Generator().manual_seed(0), batch_size=2, **options)
    assert torch.equal(split.samples, asked.samples)  # the draws batch_size=2 gives
    assert not asked.settings.memory_limited


def test_a_run_that_cannot_fit_is_refused_before_any_network_call(model, monkeypatch):
    per_row = peak_bytes_per_row(model, (3, 16, 16), True)
    monkeypatch.setattr(memory, "PROBE_ROW_PIXELS", 0)
    room = memory.OVERHEAD * per_row / memory.HEADROOM
    monkeypatch.setattr(memory, "available_bytes", lambda: int(0.5 * room))
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(MemoryEstimateError, match="even one sample at a time.*smaller image"):
            restore(measurement(), OPERATOR, model, num_samples=2, steps=3)
        monkeypatch.setattr(memory, "available_bytes", lambda: int(2.5 * room))
        with pytest.raises(MemoryEstimateError, match="batch_size=4 needs.*pass batch_size=2 or less"):
            restore(measurement(), OPERATOR, model, num_samples=4, steps=3, batch_size=4)
    finally:
        handle.remove()
    assert not calls


def test_small_runs_and_runs_elsewhere_are_not_probed(model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 0)  # would refuse anything probed
    assert plan_memory(model, (3, 16, 16), 4, None, torch.device("cpu"), True).per_row is None  # below the threshold
    monkeypatch.setattr(memory, "PROBE_ROW_PIXELS", 0)
    assert plan_memory(model, (3, 16, 16), 4, None, torch.device("meta"), True).batch_size is None  # not the CPU
