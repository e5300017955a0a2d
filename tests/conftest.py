import importlib.util
from pathlib import Path

import pytest
import torch

from posterior_diff import GaussianPrior


class CountingPrior(GaussianPrior):
    """A Gaussian prior that counts its denoiser calls (class-wide): work done shows up as calls > 0."""

    calls = 0

    def forward(self, x_t, t):
        CountingPrior.calls += 1
        return super().forward(x_t, t)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def tiny_unet(channels=3):
    """A randomly initialised two-level UNet2DModel: fast enough for any test."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=8)


@pytest.fixture
def pipeline_folder(tmp_path):
    """A diffusers DDPM pipeline folder holding a tiny random UNet (no network needed)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def load_script(name: str):
    """The module of scripts/NAME.py (scripts are not a package), executed fresh."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
