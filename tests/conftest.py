"""Shared fixtures, and the suite's environment: offline, and a chosen number of torch threads.

Both are set here, before anything imports torch's thread pool or a hub library, and they are
put in os.environ so that every subprocess a test starts (the CLI, torchrun) runs alike:

- HF_HUB_OFFLINE=1: huggingface_hub reads it at import, so no test can reach the network.
- POSTERIOR_DIFF_TEST_THREADS=N (default: torch's own choice): torch.set_num_threads(N) in this
  process and OMP_NUM_THREADS=N for subprocesses. The suite must pass with 1 and with 2 threads:
  a test that only passes at one thread count depends on how that count rounds reductions.
"""

import importlib.util
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
THREADS_VARIABLE = "POSTERIOR_DIFF_TEST_THREADS"
if os.environ.get(THREADS_VARIABLE):
    os.environ["OMP_NUM_THREADS"] = os.environ[THREADS_VARIABLE]

import pytest  # noqa: E402  (after the environment above, on purpose)
import torch  # noqa: E402

from posterior_diff import GaussianPrior  # noqa: E402
from posterior_diff.evaluation.metrics import gaussian_errors  # noqa: E402

# How far from exact a sampler may be and still pass as exact, in the exactness tests:
# - At 100 steps the reverse SDE's discretisation adds a little to the Monte Carlo error: on the
#   Gaussian exactness problems the Tweedie sampler's errors average 0.93-1.12x the exact-sample
#   floor over 3 seeds (docs/gaussian_exactness.md) and up to 1.23x over 6 (inpainting's mean).
# - One run's error varies from seed to seed as exact draws' do: a standard deviation of 6-19 % of
#   the floor on those problems. A bound of 1.2x the floor from 1-2 seeds held by luck (inpainting's
#   mean error is 1.63x at seed 16).
# So an exactness test compares the average over k seeds with the allowance times the floor plus
# SPREAD_Z standard deviations of exact sampling's k-seed average. The crude covariances it must
# reject sit at 14-42x the floor.
DISCRETISATION_ALLOWANCE = 1.25
SPREAD_Z = 4.0  # an exact sampler's average exceeds SPREAD_Z standard deviations ~1 run in 30,000


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


def exactness_bounds(posterior, num_samples: int, seeds: int, repeats: int = 30) -> dict[str, float]:
    """The bounds on the mean and covariance errors (metrics.gaussian_errors) of `num_samples` samples
    from `posterior`, averaged over `seeds` sampler seeds, that a sampler exact but for its
    discretisation stays under: DISCRETISATION_ALLOWANCE x the floor + SPREAD_Z x sd / sqrt(seeds),
    with floor and sd from `repeats` sets of exact draws."""
    generator = torch.Generator().manual_seed(0)
    draws = [gaussian_errors(posterior.sample(num_samples, generator).cpu(), posterior.mean.cpu(), posterior.cov.cpu())
             for _ in range(repeats)]
    bounds = {}
    for key in ("mean_error", "cov_error"):
        values = torch.tensor([errors[key] for errors in draws], dtype=torch.float64)
        bounds[key] = float(DISCRETISATION_ALLOWANCE * values.mean() + SPREAD_Z * values.std() / math.sqrt(seeds))
    return bounds


def grouped_floor_ratios(samples, posterior, group_size: int, floor: dict[str, float]) -> dict[str, float]:
    """Mean and covariance errors (metrics.gaussian_errors) of `samples` in groups of `group_size`,
    each over the exact-sample floor of that many draws, averaged over the groups.

    One group's ratio scatters whatever its size (the mean error is chi-like with few degrees of
    freedom: ~20-25 % for exact samples, ~10 % for the covariance error), so the number of groups
    is what narrows the average; one run drawing them all costs as much as one run of that size."""
    groups = samples.split(group_size)
    ratios = {"mean_error": 0.0, "cov_error": 0.0}
    for group in groups:
        errors = gaussian_errors(group, posterior.mean, posterior.cov)
        for key in ratios:
            ratios[key] += errors[key] / floor[key] / len(groups)
    return ratios


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
