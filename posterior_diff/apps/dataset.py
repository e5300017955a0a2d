"""Dataset runs of `posterior-diff restore`: many images into a folder, resumable, across processes.

    posterior-diff restore photos/ extra/*.png --task sr4 -o restored/ [--batch-size 8] [--reference truth/]
    torchrun --nproc_per_node 8 -m posterior_diff restore photos/ --task sr4 -o restored/

- Inputs: files, folders (their image files, not recursive) and globs; outputs keep the inputs'
  file names in the folder -o (two inputs of one name are refused).
- Seeds: image `name` is drawn with `torch.Generator().manual_seed(image_seed(seed, name))`, a
  hash of --seed and the file name, so a result depends neither on the order, the batching nor
  the process that made it, and equals a single-file run of the same image.
- Batches: --batch-size images of one size go through one `restore_batch` call (one sampler
  run, a generator per image); a batch that fails is retried image by image.
- Resumable: every file is written atomically (a hidden temporary file in the same folder,
  renamed into place), an image whose outputs exist is skipped unless --force, so a killed
  run leaves no partial output and a rerun does only what is missing. MANIFEST records the
  settings; a rerun with other settings into the same folder is refused unless --force.
- Processes: under torchrun or accelerate launch, accelerate's `PartialState` shares the
  images out (`split_between_processes`), each process on its own device (cuda:LOCAL_RANK, or
  the CPU with gloo); after `wait_for_everyone` process 0 merges the per-process records
  into the manifest and the report.
- Report: with --reference DIR, METRICS (PSNR and SSIM per image, scikit-image, data range 1,
  of the written file against DIR/name) and SUMMARY (mean ± standard deviation over images).
- Bad inputs: a missing input, an empty folder, -o naming a file where a folder is needed: a
  UsageError (one line, exit 2) before any work. An unreadable image among good ones is
  reported on stderr and skipped; the rest are done and the run exits 1.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from posterior_diff.apps.command_options import UsageError, check_task, load_network, pick_device, task_operator
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.files import TEMPORARY, atomic_write, write_text_atomic
from posterior_diff.images import IMAGE_SUFFIXES, match_channels, read_image, write_image
from posterior_diff.restore import placed, restore_batch
from posterior_diff.sampling.samplers import NonFiniteSampleError
from posterior_diff.tasks import TASKS

MANIFEST, METRICS, SUMMARY = "manifest.json", "metrics.csv", "summary.txt"
PART = ".posterior-diff-process-{}.json"  # one process's records, merged by process 0
GLOB_CHARACTERS = set("*?[")
IMAGE_ERRORS = (UsageError, ValueError, TypeError, FileNotFoundError, RuntimeError, NonFiniteSampleError)
SEED_RULE = "int.from_bytes(sha256(f'{seed}:{name}').digest()[:8], 'little') >> 1"


@dataclass(frozen=True)
class Job:
    """One image of a dataset run: its input, its outputs and its seed."""

    name: str
    source: Path
    output: Path
    std: Path | None
    mask: Path | None
    seed: int

    def pending(self, force: bool) -> bool:
        """Whether the image still needs restoring: --force, or an output not there yet."""
        return force or not self.output.exists() or (self.std is not None and not self.std.exists())


# -- names, seeds and files ----------------------------------------------------------------


def image_seed(seed: int, name: str) -> int:
    """The generator seed of the image called `name` (a file name) under --seed `seed`: 63 bits of a hash."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def is_glob(text: str) -> bool:
    """Whether `text` holds glob characters (*, ?, [)."""
    return bool(GLOB_CHARACTERS & set(text))


def is_single_file(inputs: list[str], output: Path) -> bool:
    """One input that is a file (or names none, and is no glob) and an -o that is no folder: a single-file run."""
    if len(inputs) != 1 or output.is_dir():
        return False
    path = Path(inputs[0])
    return not path.is_dir() and (path.exists() or not is_glob(inputs[0]))


def needs_folder(path: Path, what: str) -> None:
    """A UsageError unless `path` is a folder that exists."""
    if not path.is_dir():
        raise UsageError(f"{what} ({path}) is not a folder" if path.exists() else f"{what} ({path}) does not exist")


def write_image_atomic(image: torch.Tensor, path: Path) -> None:
    """`images.write_image`, atomically."""
    atomic_write(path, lambda temporary: write_image(image, temporary))


def remove_leftovers(*folders: Path | None) -> None:
    """Delete the temporary files of a killed run and stale per-process records in `folders`."""
    for folder in filter(None, folders):
        for path in [*folder.glob(f".*{TEMPORARY}*"), *folder.glob(PART.format("*"))]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def terminate_cleanly():
    """Turn SIGTERM (sent by torchrun, schedulers, `kill`) into SystemExit so temporary files are removed."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- planning ------------------------------------------------------------------------------


def discover(inputs: list[str]) -> list[Path]:
    """The image files that the INPUT arguments name: files, folders (their image files) and globs;
    a UsageError for a missing path, an empty folder or a glob matching nothing."""
    found: dict[Path, Path] = {}
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(item for item in path.iterdir() if item.is_file() and not item.name.startswith(".")
                           and item.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.exists():
            files = [path]
        elif is_glob(text):
            files = sorted(Path(item) for item in glob.glob(text, recursive=True) if Path(item).is_file())
            if not files:
                raise UsageError(f"{text} matches no files")
        else:
            raise UsageError(f"no such image file or folder: {path}")
        for file in files:
            found.setdefault(file.resolve(), file)
    return list(found.values())


def check_folder(path: Path | None, what: str) -> Path | None:
    """`path` if it can be a dataset run's output folder (one that exists, or a new name); a UsageError if it is a file."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, but a dataset run needs a folder there")
    if not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"{what} {path} looks like a file name, but a dataset run writes into a folder")
    return path


def plan(args) -> list[Job]:
    """The run's jobs in name order, with the output folders made; a UsageError (before any folder is
    made) for an output path that is a file, clashing names, or outputs over their inputs."""
    sources = discover(args.input)
    out, std = check_folder(args.output, "-o"), check_folder(args.std_map, "--std-map")
    if std is not None and std.resolve() == out.resolve():
        raise UsageError("--std-map needs a folder of its own, not the output folder")
    masks = args.mask if args.mask is not None and args.mask.is_dir() else None
    jobs, seen = [], {}
    for source in sources:
        name = source.name
        if name in seen:
            raise UsageError(f"two inputs are called {name} ({seen[name]} and {source}); outputs keep their file names")
        seen[name] = source
        if (out / name).resolve() == source.resolve():
            raise UsageError(f"-o {out} would overwrite the input {source}; choose another folder")
        mask = masks / name if masks is not None else args.mask
        jobs.append(Job(name, source, out / name, std / name if std else None, mask, image_seed(args.seed, name)))
    for folder in filter(None, (out, std)):
        folder.mkdir(parents=True, exist_ok=True)
    return sorted(jobs, key=lambda job: job.name)


def check_options(args) -> None:
    """The options of a dataset run, checked before any work (each a UsageError)."""
    from operators.base import check_sigma_y

    check_task(args.task, args.mask, args.kernel)
    if args.mask is not None and not args.mask.exists():
        raise UsageError(f"no such mask file or folder: {args.mask}")
    if args.sigma_y is not None:
        check_sigma_y(args.sigma_y, auto=True)
    for value, name in ((args.batch_size, "--batch-size"), (args.samples, "--samples"), (args.steps, "--steps")):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if args.reference is not None:
        needs_folder(args.reference, "--reference")


# What a setting missing from a manifest written before it was recorded had been: every such run sampled
# with eta 1, so that a rerun at --eta 1 matches it and one at a default that has changed since does not
BEFORE_RECORDED = {"eta": 1.0}


def run_settings(args) -> dict:
    """The settings that decide the outputs' values (the manifest's record, compared on a rerun); the
    ladder's switch, elements and grey share where --model ladder; the start and its level where set;
    eta as set, or the image defaults' rule (so that a rerun after the default changed is refused)."""
    ladder = {"ladder_switch": args.ladder_switch, "ladder_elements": args.ladder_elements,
              "ladder_grey_share": args.ladder_grey_share} if args.model == "ladder" else {}
    # recorded where set, so that the manifests of runs made before these options still match
    start = {key: value for key, value in (("start", args.start), ("start_level", args.start_level))
             if value not in ("auto", None)}
    eta = args.eta if args.eta is not None else (f"default: {IMAGE_DEFAULTS.eta:g}, {IMAGE_DEFAULTS.large_hole_eta:g} "
                                                 "for large holes, 1 from the measurement")
    sigma_y = TASKS[args.task].sigma_y if args.sigma_y is None else args.sigma_y
    return {**ladder, **start, "eta": eta, "task": args.task, "sigma_y": sigma_y,
            "samples": args.samples, "steps": args.steps, "covariance": args.covariance,
            "cg_max_iter": args.cg_max_iter, "jacobian_s_max": args.jacobian_s_max, "particles": args.particles,
            "mean_level": args.mean_level, "antithetic": args.antithetic, "model": args.model or "embedded",
            "dtype": args.dtype, "seed": args.seed, "mask": None if args.mask is None else str(args.mask)}


def check_manifest(folder: Path, settings: dict, force: bool) -> None:
    """A UsageError if `folder` holds the outputs of a run with other settings (unless --force)."""
    path = folder / MANIFEST
    if force or not path.exists():
        return
    try:
        earlier = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"{path} is not a manifest of posterior-diff; pass --force or choose another folder") from None
    # over both runs' keys: a setting recorded only where set (the start) must not vanish unnoticed
    earlier = {**BEFORE_RECORDED, **earlier}
    keys = [*settings, *(key for key in earlier if key not in settings)]
    changed = [f"{key} {earlier.get(key)!r} -> {settings.get(key)!r}" for key in keys
               if earlier.get(key) != settings.get(key)]
    if changed:
        raise UsageError(f"{folder} holds the outputs of a run with other settings ({', '.join(changed)}); "
                         "pass --force to redo them, or choose another folder")


# -- restoring -----------------------------------------------------------------------------


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header; a ValueError for an unreadable one."""
    try:
        with Image.open(path) as handle:
            return handle.size
    except FileNotFoundError:
        raise ValueError(f"no such image file: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path} as an image ({error})") from None


def record(job: Job, status: str, error: str | None = None, nfe: int | None = None, seconds: float | None = None) -> dict:
    """One image's line in the manifest; a failure is also reported on stderr as one line."""
    if error is not None:
        error = " ".join(str(error).split())
        print(f"posterior-diff restore: skipped {job.source}: {error}", file=sys.stderr)
    return {"name": job.name, "seed": job.seed, "status": status, "error": error, "nfe": nfe, "seconds": seconds}


def batches(jobs: list[Job], batch_size: int) -> tuple[list[list[Job]], list[dict]]:
    """Jobs grouped by image size, `batch_size` at a time, and the records of unreadable ones."""
    groups: dict[tuple[int, int], list[Job]] = {}
    failed = []
    for job in jobs:
        try:
            groups.setdefault(image_size(job.source), []).append(job)
        except ValueError as error:
            failed.append(record(job, "failed", error))
    chunks = [group[first:first + batch_size] for group in groups.values() for first in range(0, len(group), batch_size)]
    return chunks, failed


def prepare(job: Job, model, args) -> tuple[int, torch.Tensor, object]:
    """(the file's channel count, the measurement in the model's channels, its forward model)."""
    image = read_image(job.source)
    channels = image.shape[0]
    image = match_channels(image, model.channels)
    return channels, image, task_operator(args.task, args.sigma_y, image, job.mask, args.kernel)


def save(job: Job, result, channels: int, force: bool) -> dict:
    """Write the std map (if asked) and then the mean, each unless it exists already (or --force)."""
    if job.std is not None and (force or not job.std.exists()):
        std = match_channels(result.std, channels)
        write_image_atomic(std / (float(std.max()) or 1.0), job.std)
    if force or not job.output.exists():
        write_image_atomic(match_channels(result.mean, channels), job.output)
    return record(job, "restored", nfe=result.nfe, seconds=result.seconds)


def restore_group(jobs: list[Job], model, args, device: torch.device) -> list[dict]:
    """Restore one batch of same-size images in one sampler run (`restore_batch`, a generator per
    image) and write them; a batch that fails is retried image by image, so one bad image costs only itself."""
    prepared, records = [], []
    for job in jobs:
        try:
            prepared.append((job, *prepare(job, model, args)))
        except IMAGE_ERRORS as error:
            records.append(record(job, "failed", error))
    if not prepared:
        return records
    options = dict(num_samples=args.samples, steps=args.steps, covariance=args.covariance,
                   cg_max_iter=args.cg_max_iter, jacobian_s_max=args.jacobian_s_max, eta=args.eta,
                   particles=args.particles, device=device, allow_extrapolation=args.allow_extrapolation,
                   mean_level=args.mean_level, antithetic=args.antithetic, start=args.start, start_level=args.start_level)
    try:
        results = restore_batch([y for _, _, y, _ in prepared], [A for _, _, _, A in prepared], model,
                                generator=[torch.Generator().manual_seed(job.seed) for job, *_ in prepared], **options)
    except IMAGE_ERRORS as error:
        if len(prepared) == 1:
            return records + [record(prepared[0][0], "failed", error)]
        return records + [line for job, *_ in prepared for line in restore_group([job], model, args, device)]
    return records + [save(job, result, channels, args.force) for (job, channels, _, _), result in zip(prepared, results)]


def restore_jobs(jobs: list[Job], model, args, device: torch.device, bar) -> list[dict]:
    """Restore this process's share, batch by batch, counting images on `bar`; the records."""
    chunks, records = batches(jobs, args.batch_size)
    bar.update(len(records))
    for chunk in chunks:
        records += restore_group(chunk, model, args, device)
        bar.update(len(chunk))
    return records


# -- scores and report ---------------------------------------------------------------------


def score(job: Job, reference: Path) -> dict:
    """The written output of `job` against reference/name: {name, psnr, ssim}, or {name, error}."""
    truth_path = reference / job.name
    try:
        output = read_image(job.output)
        truth = match_channels(read_image(truth_path), output.shape[0])
        if truth.shape != output.shape:
            raise ValueError(f"the reference {truth_path} is {truth.shape[-1]}x{truth.shape[-2]} pixels "
                             f"but the output is {output.shape[-1]}x{output.shape[-2]}")
    except (ValueError, FileNotFoundError) as error:
        print(f"posterior-diff restore: no score for {job.name}: {error}", file=sys.stderr)
        return {"name": job.name, "error": str(error)}
    # scikit-image's metrics, loaded only when there is a reference
    from posterior_diff.evaluation.harness import psnr_ssim

    psnr, ssim = psnr_ssim(output, truth)
    return {"name": job.name, "psnr": psnr, "ssim": ssim}


def summary(scores: list[dict]) -> dict:
    """Mean and standard deviation (over images; 0 for one image) of PSNR and SSIM."""
    result = {"images": len(scores)}
    for key in ("psnr", "ssim"):
        values = np.array([line[key] for line in scores], dtype=float)
        result[key] = {"mean": float(values.mean()) if len(values) else None,
                       "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return result


def summary_text(numbers: dict) -> str:
    """The report's summary as lines of text."""
    if not numbers["images"]:
        return "images 0 (none scored)\n"
    psnr, ssim = numbers["psnr"], numbers["ssim"]
    return (f"images {numbers['images']}\nPSNR   {psnr['mean']:.2f} ± {psnr['std']:.2f} dB\n"
            f"SSIM   {ssim['mean']:.4f} ± {ssim['std']:.4f}\n(mean ± standard deviation over images)\n")


def write_report(folder: Path, scores: list[dict]) -> dict:
    """METRICS (name, psnr, ssim per scored image) and SUMMARY in `folder`; the summary numbers."""
    scored = sorted((line for line in scores if "psnr" in line), key=lambda line: line["name"])
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["name", "psnr", "ssim"])
    writer.writerows([line["name"], f"{line['psnr']:.4f}", f"{line['ssim']:.6f}"] for line in scored)
    write_text_atomic(table.getvalue(), folder / METRICS)
    numbers = summary(scored)
    write_text_atomic(summary_text(numbers), folder / SUMMARY)
    return numbers


def write_manifest(folder: Path, settings: dict, run: dict, images: list[dict] | None = None,
                   metrics: dict | None = None) -> None:
    """The run's record: settings, how it ran, and each image's seed and status."""
    from posterior_diff.version import __version__

    counts = {status: sum(line["status"] == status for line in images or [])
              for status in ("restored", "existing", "failed")}
    manifest = {"tool": f"posterior-diff {__version__}", "settings": settings, "seed_rule": SEED_RULE, "run": run,
                "counts": counts, "images": images or [], "metrics": metrics}
    write_text_atomic(json.dumps(manifest, indent=2) + "\n", folder / MANIFEST)


# -- processes -----------------------------------------------------------------------------


def process_state(args):
    """accelerate's PartialState (one process, or those of torchrun / accelerate launch) and this process's device."""
    from accelerate import PartialState

    wanted = pick_device(args.device)
    state = PartialState(cpu=wanted.type == "cpu")
    if state.num_processes > 1 and args.device in ("auto", "cuda"):
        wanted = state.device  # cuda:LOCAL_RANK, or the CPU
    if wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", torch.cuda.current_device())
    return state, torch.device("cpu") if wanted.type == "cpu" else wanted


def merge(args, jobs: list[Job], settings: dict, run: dict, processes: int) -> int:
    """Process 0: the per-process records into the manifest and the report; the exit status."""
    folder = args.output
    parts = [json.loads((folder / PART.format(index)).read_text()) for index in range(processes)]
    done = {line["name"]: line for part in parts for line in part["records"]}
    images = [done.get(job.name) or record(job, "existing") for job in jobs]
    scores = [line for part in parts for line in part["scores"]]
    metrics = write_report(folder, scores) if args.reference is not None else None
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_manifest(folder, settings, run, images, metrics)
    for index in range(processes):
        (folder / PART.format(index)).unlink()
    failed = sum(line["status"] == "failed" for line in images)
    restored = sum(line["status"] == "restored" for line in images)
    print(f"restored {restored} of {len(images)} images into {folder} ({len(images) - restored - failed} already there, "
          f"{failed} failed); settings in {folder / MANIFEST}")
    if metrics is not None and metrics["images"]:
        psnr, ssim = metrics["psnr"], metrics["ssim"]
        print(f"PSNR {psnr['mean']:.2f} ± {psnr['std']:.2f} dB, SSIM {ssim['mean']:.4f} ± {ssim['std']:.4f} "
              f"over {metrics['images']} images: {folder / METRICS}, {folder / SUMMARY}")
    unscored = sum("error" in line for line in scores)
    if failed or unscored:
        print(f"posterior-diff restore: {failed} image(s) failed and {unscored} could not be scored (see above); "
              "a rerun of the same command does only what is missing", file=sys.stderr)
    return 1 if failed or unscored else 0


def run_dataset(args) -> int:
    """A dataset run (see the module docstring); the exit status: 0, or 1 if images were skipped."""
    check_options(args)
    jobs = plan(args)
    settings = run_settings(args)
    check_manifest(args.output, settings, args.force)
    state, device = process_state(args)
    todo = [job for job in jobs if job.pending(args.force)]  # seen alike by every process: nothing is written yet
    # moved once, not once per batch
    model = placed(load_network(args.model, args.dtype, args.ladder_switch, args.ladder_elements,
                                args.ladder_grey_share), device)
    run = {"processes": state.num_processes, "device": device.type, "batch_size": args.batch_size,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if state.is_main_process:
        remove_leftovers(args.output, args.std_map)
        write_manifest(args.output, settings, dict(run, status="running"))
    state.wait_for_everyone()
    records, scores = share(state, todo, jobs, model, args, device)
    write_text_atomic(json.dumps({"records": records, "scores": scores}), args.output / PART.format(state.process_index))
    state.wait_for_everyone()
    status = merge(args, jobs, settings, dict(run, status="finished"), state.num_processes) if state.is_main_process \
        else int(any(line["status"] == "failed" for line in records))
    state.destroy_process_group()
    return status


def share(state, todo: list[Job], jobs: list[Job], model, args, device: torch.device) -> tuple[list[dict], list[dict]]:
    """This process's part: it restores its share of `todo`, then (after every process has) scores
    its share of all the outputs against --reference. (records, scores)."""
    from tqdm.auto import tqdm

    with state.split_between_processes(todo) as mine:
        description = "images" if state.num_processes == 1 else f"images (process {state.process_index})"
        with tqdm(total=len(mine), unit="image", desc=description, disable=not state.is_local_main_process) as bar:
            records = [dict(line, process=state.process_index) for line in restore_jobs(mine, model, args, device, bar)]
    state.wait_for_everyone()
    with state.split_between_processes(jobs) as mine:
        scores = [score(job, args.reference) for job in mine if job.output.exists()] if args.reference else []
    return records, scores
