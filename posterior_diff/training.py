r"""Denoising score matching (docs/theory.md §4): train a diffusers UNet2DModel to predict noise.

    L(theta) = E_{n, x_0, eps} || eps_theta(alpha_n x_0 + sigma_n eps, n) - eps ||^2,

over uniformly drawn DDPM timesteps n, with x_0 random crops (flipped and rotated by
multiples of 90 degrees) of training images in [-1, 1]. The optimum is
eps_theta = -sigma * score, so the trained network is a Denoiser through ModuleDenoiser.

Training keeps an exponential moving average (EMA) of the weights and writes a checkpoint
(model, EMA, optimiser, random-number states, step) every `checkpoint_every` steps to
`OUT/checkpoint.pt`, atomically (a temporary file renamed over the old one), so an
interrupted run resumes from the last checkpoint and loses at most the steps since. A
checkpoint holds only tensors, numbers, strings, bools, None, tuples, lists and dicts, and
`load_checkpoint` reads it with `torch.load(..., weights_only=True)`, which refuses pickled
objects of any other kind, so a checkpoint from an untrusted source cannot run code. At the
end the EMA weights are saved in the diffusers pipeline layout (`DDPMPipeline.save_pretrained`),
which both `diffusers.DDPMPipeline.from_pretrained(OUT)` and `posterior_diff.load_model(OUT)` read.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .images import load_image_folder

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainingConfig:
    """Everything that defines a training run (saved with every checkpoint).

    steps: optimiser steps. batch_size: crops per step. crop_size: crop side in pixels.
    channels: 3 (colour; grey images are repeated) or 1 (grey; colour images averaged).
    block_out_channels, layers_per_block: the UNet's width per resolution and depth.
    learning_rate: Adam step after a linear warm-up of `warmup_steps`. ema_decay: EMA factor.
    num_train_timesteps, beta_start, beta_end: the DDPM (linear-beta) noise schedule.
    checkpoint_every: steps between checkpoints. seed: initialisation, crops and noise.
    """

    steps: int = 20000
    batch_size: int = 32
    crop_size: int = 32
    channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.crop_size % factor:
            raise ValueError(f"crop_size must be a multiple of {factor} (the UNet's downsampling), got {self.crop_size}")


def build_unet(config: TrainingConfig):
    """A noise-predicting diffusers UNet2DModel of the configured width and depth (no attention)."""
    from diffusers import UNet2DModel

    depth = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.crop_size,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * depth,
        up_block_types=("UpBlock2D",) * depth,
        norm_num_groups=min(32, config.block_out_channels[0]),
    )


def build_scheduler(config: TrainingConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,  # for diffusers samplers (DDPMPipeline) on the saved folder; DSM training never clips
    )


class RandomCrops:
    """Batches of random square crops of images in [-1, 1], randomly flipped and rotated.

    Images are drawn in proportion to their area, so every pixel is equally likely to be seen.
    """

    def __init__(self, images: Sequence[Tensor], crop_size: int, generator: torch.Generator):
        usable = [image for image in images if min(image.shape[-2:]) >= crop_size]
        if not usable:
            raise ValueError(f"no training image is at least {crop_size}x{crop_size} pixels")
        self.images = usable
        self.crop_size = crop_size
        self.generator = generator
        areas = torch.tensor([float(image.shape[-2] * image.shape[-1]) for image in usable])
        self.weights = areas / areas.sum()

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def batch(self, size: int) -> Tensor:
        chosen = torch.multinomial(self.weights, size, replacement=True, generator=self.generator)
        crops = []
        for index in chosen.tolist():
            image = self.images[index]
            top = self._randint(image.shape[-2] - self.crop_size + 1)
            left = self._randint(image.shape[-1] - self.crop_size + 1)
            crop = image[:, top : top + self.crop_size, left : left + self.crop_size]
            if self._randint(2):
                crop = crop.flip(-1)
            crops.append(torch.rot90(crop, self._randint(4), dims=(-2, -1)))
        return torch.stack(crops)


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint onto the CPU without running any code it might carry.

    Uses `torch.load(path, map_location="cpu", weights_only=True)`: only tensors, numbers,
    strings, bools, None, tuples, lists and dicts are rebuilt; anything else pickled in the
    file (a class instance, a function call) is refused before it is imported or called.

    Returns:
        The checkpoint dict: "config" (TrainingConfig fields), "model" and "ema" (state dicts),
        "optimizer" (Adam state dict), "generator" (ByteTensor), "step" (int), "loss_log"
        ([step, loss] per step).

    Raises:
        ValueError: the file holds objects of other kinds.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        # torch reports a refused object as UnpicklingError (RuntimeError in older releases),
        # both starting "Weights only load failed"; other failures (a truncated file) pass through.
        if "Weights only load failed" not in str(error):
            raise
        raise ValueError(
            f"{path} holds objects other than tensors, numbers, strings, lists and dicts; "
            "pickled code is refused, so a checkpoint from an untrusted source cannot run code"
        ) from error


def _save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # atomic on POSIX: a reader sees the old or the new file


def _ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
            ema_parameter.lerp_(parameter, 1 - decay)


@dataclass
class TrainingRun:
    """The state of one training run: what a checkpoint holds, and one optimiser step.

    Attributes:
        config: the run's settings; model: the UNet being trained; ema: its moving average;
        optimizer, scheduler: Adam and the DDPM scheduler; generator: crops, timesteps, noise;
        step: optimiser steps done; loss_log: [step, loss] per step, kept across resumes.
    """

    config: TrainingConfig
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    step: int = 0
    loss_log: list = field(default_factory=list)

    @classmethod
    def start(cls, config: TrainingConfig, state: dict | None = None) -> "TrainingRun":
        """A fresh run for `config`, or the one a checkpoint `state` holds."""
        torch.manual_seed(config.seed)
        model = build_unet(config)
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        run = cls(config, model, ema, optimizer, build_scheduler(config), torch.Generator().manual_seed(config.seed))
        if state:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            run.generator.set_state(state["generator"])
            run.step, run.loss_log = state["step"], state["loss_log"]
        return run

    def save_checkpoint(self, path: Path) -> None:
        # Only tensors, numbers, strings, tuples, lists and dicts, so load_checkpoint's
        # weights_only=True reads it back (tests check the format with torch.load directly).
        _save_atomically(
            {"config": asdict(self.config), "model": self.model.state_dict(), "ema": self.ema.state_dict(),
             "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "step": self.step,
             "loss_log": self.loss_log},
            path,
        )

    def optimise(self, x0: Tensor) -> float:
        """One DSM step on the crops x0 (B, C, H, W) in [-1, 1]; returns the loss."""
        config = self.config
        timesteps = torch.randint(config.num_train_timesteps, (x0.shape[0],), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        alpha_bar = self.scheduler.alphas_cumprod.float()[timesteps].reshape(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        loss = F.mse_loss(self.model(x_t, timesteps).sample, noise)
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate * min(1.0, (self.step + 1) / config.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # EMA with a warm-up of its own, so early averages are not dominated by the initialisation.
        _ema_update(self.ema, self.model, min(config.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        self.loss_log.append([self.step, loss.item()])
        return self.loss_log[-1][1]


def _previous_state(checkpoint_path: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from (None for a new run); refuses to start over an existing run."""
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{checkpoint_path.parent} already holds a training run; pass resume=True (--resume) to continue it")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"nothing to resume: {checkpoint_path} does not exist")
    return load_checkpoint(checkpoint_path) if resume else None


def _run_config(config: TrainingConfig | None, state: dict | None) -> TrainingConfig:
    """The checkpoint's own config on resume (a given config's `steps` replacing its total), else `config`."""
    if not state:
        return config or TrainingConfig()
    saved = TrainingConfig(**state["config"])
    if config is not None:
        saved.steps = config.steps
    return saved


def train(
    images: Sequence[Tensor] | str | Path,
    out: str | Path,
    config: TrainingConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train a noise-predicting UNet by denoising score matching and save it to `out`.

    Args:
        images: tensors (C, H, W) in [-1, 1], or a folder of image files (read in [0, 1] and
            converted to [-1, 1]).
        out: output folder. It must not hold a run already unless `resume` is set.
        config: the run's settings. On resume the checkpoint's own config is used, except
            that a given config's `steps` replaces the total (to extend or shorten a run).
        resume: continue from `out/checkpoint.pt`, read by `load_checkpoint` (weights_only=True:
            a checkpoint carrying other pickled objects raises ValueError and runs no code).
        progress: show a tqdm bar with the loss.
        stop_after: stop (after checkpointing) once this many steps have run in this call,
            to split long runs; the final model is written only when config.steps is reached.

    Returns:
        The output folder. When training has finished it holds a diffusers DDPM pipeline
        (unet/, scheduler/, model_index.json), `training_log.json`, and the final checkpoint.
    """
    out = Path(out)
    checkpoint_path = out / CHECKPOINT
    state = _previous_state(checkpoint_path, resume)
    config = _run_config(config, state)
    if isinstance(images, (str, Path)):
        images = load_image_folder(images, channels=config.channels)
    run = TrainingRun.start(config, state)
    crops = RandomCrops([image.float() for image in images], config.crop_size, run.generator)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="training")
    steps_this_call = 0
    run.model.train()
    while run.step < config.steps and (stop_after is None or steps_this_call < stop_after):
        loss = run.optimise(crops.batch(config.batch_size))
        steps_this_call += 1
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        if run.step % config.checkpoint_every == 0 or run.step == config.steps:
            run.save_checkpoint(checkpoint_path)
    bar.close()
    if run.step < config.steps:
        run.save_checkpoint(checkpoint_path)
        return out
    _save_pipeline(run.ema, run.scheduler, out)
    (out / "training_log.json").write_text(json.dumps({"config": asdict(config), "loss": run.loss_log}))
    return out


def _save_pipeline(unet, scheduler, out: Path) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)

