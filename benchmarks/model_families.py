"""Cost of each model family: seconds per network forward and per restore step, on this machine.

For every format `posterior_diff.load_model` reads (posterior_diff/models/formats.py) this times a
UNet2DModel with the published architecture at its native size, with random weights (the cost
does not depend on the weights):

| family | architecture timed | native size |
|---|---|---|
| DDPM | google/ddpm-celebahq-256 (6 levels, 128-512 channels, attention at 16 x 16) | 256 |
| ADM | the DPS FFHQ-256 model as scripts/convert_adm_to_diffusers.py builds it (2C outputs, learned variance) | 256 |
| score-SDE VE | google/ncsnpp-celebahq-256 (NCSN++: 7 levels of skip blocks, fourier sigma embedding) | 256 |
| EDM | a DDPM++-style UNet as EDM's FFHQ-64 model (4 levels, 128-256 channels, 4 blocks each) | 64 |

Per family it reports the parameters, the seconds of one denoiser call D(x, t) (one network
forward, batch 1, no gradient) and of one restore step (x4 super-resolution, sigma_y = 0.05, one
sample): with the isotropic covariance (a forward and one VJP) and with the Tweedie covariance
with a CG cap of 4 (a forward and up to 5 VJPs), with the VJPs per step it spent. The step
times are restore's own `seconds / nfe` over a short run, so they include the guidance and the
solver. Each time is the median over `--repeats` runs (the forward after one warm-up call), on
`--threads` torch threads (1 by default: reproducible on a shared machine; the provenance block
names the count).

Run from the repository root:

    python -m benchmarks.model_families                    # writes docs/model_families.md (~15 min on 1 thread)
    python -m benchmarks.model_families --quick --out /tmp/model_families.md

`--quick` times the same block structures at 64 x 64 with 32 channels per level and one block
per level (seconds in all): a smoke run of the code, not a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from operators import SuperResolution
from posterior_diff import NonFiniteSampleError, restore
from posterior_diff.models.formats import denoiser_from_diffusers

from .reporting import log_row, markdown_table, number, write_report

SKIP, ATTN_SKIP = "SkipDownBlock2D", "AttnSkipDownBlock2D"
DDPM_CELEBAHQ_256 = dict(
    sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None)
ADM_FFHQ_256 = dict(  # SMALL_256_UNET_CONFIG of diffusers' scripts/convert_adm_to_diffusers.py
    sample_size=256, out_channels=6, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=1,
    attention_head_dim=64, down_block_types=("ResnetDownsampleBlock2D",) * 4 + ("AttnDownBlock2D", "ResnetDownsampleBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D") + ("ResnetUpsampleBlock2D",) * 4,
    resnet_time_scale_shift="scale_shift", upsample_type="resnet", downsample_type="resnet", norm_eps=1e-6)
NCSNPP_CELEBAHQ_256 = dict(
    sample_size=256, block_out_channels=(128, 128, 256, 256, 256, 256, 256), layers_per_block=2,
    down_block_types=(SKIP,) * 4 + (ATTN_SKIP,) + (SKIP,) * 2,
    up_block_types=("SkipUpBlock2D",) * 2 + ("AttnSkipUpBlock2D",) + ("SkipUpBlock2D",) * 4,
    time_embedding_type="fourier", center_input_sample=True, mid_block_scale_factor=1.41421356237, norm_eps=1e-6,
    norm_num_groups=None, attention_head_dim=None, flip_sin_to_cos=True, freq_shift=1)
EDM_FFHQ_64 = dict(
    sample_size=64, block_out_channels=(128, 256, 256, 256), layers_per_block=4,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=64)


def _schedulers() -> dict[str, Callable]:
    from diffusers import DDPMScheduler, EDMEulerScheduler, ScoreSdeVeScheduler

    return {
        "DDPM": lambda: DDPMScheduler(num_train_timesteps=1000),
        "ADM": lambda: DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range"),
        "score-SDE VE": lambda: ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0, num_train_timesteps=2000),
        "EDM": lambda: EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5),
    }


FAMILIES = {  # name: (the architecture it reproduces, its UNet2DModel config)
    "DDPM": ("google/ddpm-celebahq-256", DDPM_CELEBAHQ_256),
    "ADM": ("DPS FFHQ-256 (ADM)", ADM_FFHQ_256),
    "score-SDE VE": ("google/ncsnpp-celebahq-256", NCSNPP_CELEBAHQ_256),
    "EDM": ("EDM FFHQ-64 (DDPM++-like)", EDM_FFHQ_64),
}


def quick_config(config: dict) -> dict:
    """The same block structure at 64 x 64, 32 channels per level, one block per level."""
    levels = len(config["block_out_channels"])
    head = None if config.get("attention_head_dim") is None else 8
    return config | dict(sample_size=64, block_out_channels=(32,) * levels, layers_per_block=1, attention_head_dim=head)


@dataclass
class Row:
    """One family's timings (seconds; None where the run diverged)."""

    family: str
    source: str
    size: int
    parameters: float
    forward: float
    isotropic: float | None
    isotropic_vjps: float | None
    tweedie: float | None
    tweedie_vjps: float | None


def median_seconds(run: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """The median wall time of `run()` over `repeats` calls, after one warm-up call if `warm_up`."""
    if warm_up:
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(model, size: int, covariance: str, steps: int, repeats: int) -> tuple[float | None, float | None]:
    """(seconds per restore step, VJPs per step) of x4 super-resolution of one sample at `size`."""
    y = torch.rand(3, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    results = []

    def run():
        results.append(restore(y, SuperResolution(4, sigma_y=0.05), model, steps=steps, covariance=covariance,
                               cg_max_iter=4, generator=torch.Generator().manual_seed(0)))

    try:
        median_seconds(run, repeats, warm_up=False)  # the forward timing has warmed the network up
    except NonFiniteSampleError:
        return None, None
    seconds = statistics.median(result.seconds / result.nfe for result in results)
    return seconds, results[-1].vjps / results[-1].nfe


def measure(family: str, quick: bool, steps: int, repeats: int) -> Row:
    """Build `family`'s UNet (random weights) as the loader's Denoiser and time it."""
    from diffusers import UNet2DModel

    source, config = FAMILIES[family]
    config = quick_config(config) if quick else config
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    model = denoiser_from_diffusers(unet, _schedulers()[family]())
    size = config["sample_size"]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        forward = median_seconds(lambda: model(x, 0.5), repeats)
    isotropic, isotropic_vjps = step_seconds(model, size, "isotropic", steps, repeats)
    tweedie, tweedie_vjps = step_seconds(model, size, "tweedie", steps, repeats)
    parameters = sum(p.numel() for p in unet.parameters()) / 1e6
    return Row(family, source, size, parameters, forward, isotropic, isotropic_vjps, tweedie, tweedie_vjps)


def table(rows: list[Row]) -> str:
    header = ["family", "architecture", "size", "parameters (M)", "forward (s)", "step, isotropic (s)", "VJPs/step",
              "step, tweedie CG<=4 (s)", "VJPs/step"]
    return markdown_table(header, [[r.family, r.source, f"{r.size}", f"{r.parameters:.1f}", f"{r.forward:.3f}",
                                    number(r.isotropic, ".3f"), number(r.isotropic_vjps, ".1f"),
                                    number(r.tweedie, ".3f"), number(r.tweedie_vjps, ".1f")] for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the block structures at 64 x 64, 32 channels")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=2, help="restore steps per timed run (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU extra threads wait on each other)")
    parser.add_argument("--out", type=Path, default=Path("docs/model_families.md"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, rows = time.perf_counter(), []
    for family in args.families:
        rows.append(measure(family, args.quick, args.steps, args.repeats))
        row = rows[-1]
        log_row(family, f"{row.size}px", f"forward {row.forward:.3f} s", f"isotropic {number(row.isotropic, '.3f')} s",
                f"tweedie {number(row.tweedie, '.3f')} s")
    report = table(rows)
    print(report)
    scope = "quick run: block structures at 64 x 64, 32 channels, one block per level" if args.quick else "native sizes"
    intro = __doc__.split("\n\n", 1)[1].split("Run from")[0]
    section = f"## Timings ({scope}; {args.steps} restore steps per run, median of {args.repeats})"
    return write_report(args.out, "Model families: seconds per network forward and per restore step", intro,
                        [section, report], module="benchmarks.model_families", argv=args.argv,
                        minutes=(time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
