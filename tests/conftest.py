"""Shared fixtures, and the suite's environment: offline, and a chosen number of torch threads.

Both are set here, before anything imports torch's thread pool or a hub library, and they are
put in os.environ so that every subprocess a test starts (the CLI, torchrun) runs alike:

- HF_HUB_OFFLINE=1: huggingface_hub reads it at import, so no test can reach the network.
- POSTERIOR_DIFF_TEST_THREADS=N (default: torch's own choice): torch.set_num_threads(N) in this
  process and OMP_NUM_THREADS=N for subprocesses. The suite must pass with 1 and with 2 threads:
  a test that only passes at one thread count depends on how that count rounds reductions.
"""

import importlib.util
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
THREADS_VARIABLE = "POSTERIOR_DIFF_TEST_THREADS"
if os.environ.get(THREADS_VARIABLE):
    os.environ["OMP_NUM_THREADS"] = os.environ[THREADS_VARIABLE]

import pytest  # noqa: E402  (after the environment above, on purpose)
import torch  # noqa: E402

from posterior_diff import GaussianPrior  # noqa: E402


def requested_threads() -> int | None:
    """The thread count POSTERIOR_DIFF_TEST_THREADS asks for, None if unset; a bad value is a usage error."""
    value = os.environ.get(THREADS_VARIABLE)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_VARIABLE} must be a positive integer, got {value!r}")
    return int(value)


def pytest_configure(config):
    threads = requested_threads()
    if threads is not None:
        torch.set_num_threads(threads)


def pytest_report_header(config):
    return f"torch threads: {torch.get_num_threads()} ({THREADS_VARIABLE}={os.environ.get(THREADS_VARIABLE, 'unset')})"


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
