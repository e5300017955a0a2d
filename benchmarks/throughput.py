"""Throughput: images per second, one by one, batched, and across processes, against the network-bound limit.

--images (default 32) crops of --size x --size (default 64) from the held-out scikit-image
photographs (`evaluation.HELD_OUT_PHOTOGRAPHS`: astronaut, camera, coffee, chelsea; each shrunk
by --downscale, then an evenly spaced grid of crops per photograph; no matplotlib data) are
measured by one task (--task, default sr4, `evaluation.measure`) and written as 8-bit PNGs;
all the ways below restore those very files (read back), with the embedded default model, the
image defaults (`posterior_diff.defaults.IMAGE_DEFAULTS`: steps, covariance, CG cap) unless
--steps / --covariance are given, --samples posterior samples per image, and image i's
generator seeded with `dataset.image_seed(--seed, its file name)`, as the command line seeds it:

1. **one by one**: `restore` per image;
2. **batched**: one `restore_batch` call over all the images with the list of per-image
   generators and --batch-size images (batch_size x samples rows) per sampler run;
3. **--processes processes** (default 2): `torchrun --nproc_per_node 2 -m posterior_diff restore
   IN -o OUT --task ... --batch-size ...` on the PNG folder, one thread per process
   (OMP_NUM_THREADS=1), timed as the wall seconds of the subprocess; its start-up cost is the
   wall time of the same command run again into the finished folder (every output exists, so
   it restores 0 images: launch, imports, model load, process group, manifest).

Beside them, deepinv's loop over the same images with its fastest comparable method at the
same NFE (`peers.run_peer`): DDRM where it runs on the task, else DiffPIR (both Jacobian-free).

For each way: images per second, and the fraction of the network-bound limit it reaches, the
limit being the time of the bare network forwards alone (no graph, `speed.bare_forward_seconds`
at 64x64 for the batch of each sampler run): sum over sampler runs of NFE x forward(rows), i.e.
images x NFE per image x forward(batch) / images per batch. The processes row takes each
process's share (the largest), as they run in parallel, with the one-thread forward. Where the
covariance spends VJPs (isotropic: one per step) the limit counts the forwards only, so 1.0 is
out of reach. The in-process runs use --threads torch threads (default 1); each way is warmed
up with a 2-step run first.

    python -m benchmarks.throughput                                        # writes docs/throughput.md
    python -m benchmarks.throughput --quick --out /tmp/throughput.md       # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posterior_diff import Denoiser, default_model, restore, restore_batch
from posterior_diff.apps.dataset import MANIFEST, image_seed
from posterior_diff.defaults import IMAGE_DEFAULTS
from posterior_diff.evaluation.harness import HELD_OUT_PHOTOGRAPHS, load_photograph, measure, photograph, psnr_ssim
from posterior_diff.images import read_image, write_image
from posterior_diff.restore import plan_runs
from posterior_diff.tasks import TASKS

from .peers import decomposable_physics, run_peer
from .reporting import REPOSITORY, log_row, markdown_table, write_report
from .speed import bare_forward_seconds

TASK_CHOICES = ("sr4", "sr2", "sr4-bicubic", "denoise")  # tasks the command line takes without a mask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 images of 16x16, 2 steps, batch 2, 2 samples")
    parser.add_argument("--images", type=int, default=32, help="how many crops to restore (default 32)")
    parser.add_argument("--size", type=int, default=64, help="side of the crops (default 64)")
    parser.add_argument("--downscale", type=float, default=2.0, help="shrink each photograph by this factor first")
    parser.add_argument("--task", default="sr4", choices=TASK_CHOICES, help="the measurement (default sr4)")
    parser.add_argument("--samples", type=int, default=4, help="posterior samples per image (default 4, the CLI's)")
    parser.add_argument("--steps", type=int, default=IMAGE_DEFAULTS.steps,
                        help=f"sampler steps (default {IMAGE_DEFAULTS.steps}, IMAGE_DEFAULTS)")
    parser.add_argument("--covariance", default=IMAGE_DEFAULTS.covariance,
                        help=f"covariance (default {IMAGE_DEFAULTS.covariance}, IMAGE_DEFAULTS)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampler run when batched (default 8)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes of way 3 (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process runs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the CLI's --seed: image generators and noise")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each bare forward (median)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each torchrun subprocess")
    parser.add_argument("--out", type=Path, default=Path("docs/throughput.md"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.images, args.size, args.steps, args.batch_size, args.samples, args.repeats = 4, 16, 2, 2, 2, 2
        args.downscale = 8.0
    if min(args.images, args.samples, args.steps, args.batch_size, args.processes, args.threads) < 1 or args.size < 8:
        parser.error("--images, --samples, --steps, --batch-size, --processes and --threads must be >= 1, --size >= 8")
    return args


# -- images ---------------------------------------------------------------------------------


@dataclass
class Item:
    """One image of the run: its file name, the crop it comes from, the truth and the measurement (read back)."""

    name: str
    source: str
    truth: torch.Tensor
    y: torch.Tensor | None = None
    operator: object = None


def crop_positions(side: int, size: int, count: int) -> list[tuple[int, int]]:
    """`count` (top, left) corners of size x size crops, an evenly spaced grid over a side x side square
    (a single crop is the centre one)."""
    rows = max(1, math.isqrt(count))
    columns = math.ceil(count / rows)

    def spaced(n: int) -> list[int]:
        return [(side - size) // 2] if n == 1 else [round(k * (side - size) / (n - 1)) for k in range(n)]

    return [(top, left) for top in spaced(rows) for left in spaced(columns)][:count]


def photograph_crops(count: int, size: int, downscale: float,
                     names: tuple[str, ...] = HELD_OUT_PHOTOGRAPHS) -> list[Item]:
    """`count` crops, ceil(count / len(names)) per photograph: each photograph shrunk by `downscale`,
    its largest centre square (`evaluation.load_photograph`), then a grid of crops of that square."""
    per_photograph = math.ceil(count / len(names))
    items = []
    for name in names:
        height, width = photograph(name).shape[-2:]
        side = min(round(height / downscale), round(width / downscale))
        square = load_photograph(name, side, downscale)
        for top, left in crop_positions(side, size, per_photograph):
            truth = square[:, top:top + size, left:left + size].clone()
            items.append(Item(f"{len(items):03d}.png", f"{name} ({top},{left})", truth))
    return items[:count]


def write_measurements(items: list[Item], task: str, folder: Path) -> None:
    """Measure every item (noise seeded by its index), write y as an 8-bit PNG into `folder` and
    keep the file's content (what the command line reads) as the item's y, with its operator."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        measurement = measure(task, item.truth, generator=torch.Generator().manual_seed(index))
        write_image(measurement.y, folder / item.name)
        item.y = read_image(folder / item.name)
        item.operator = measurement.operator


def generators(items: list[Item], seed: int) -> list[torch.Generator]:
    """Each image's generator, seeded as the command line seeds it (`dataset.image_seed`)."""
    return [torch.Generator().manual_seed(image_seed(seed, item.name)) for item in items]


# -- the ways -------------------------------------------------------------------------------


@dataclass
class Way:
    """One way of restoring the images: its wall seconds and the sampler runs' (NFE, rows) for the limit."""

    label: str
    seconds: float
    runs: list[tuple[int, int]]  # (NFE, rows per forward) of each sampler run, on the busiest process
    vjps_per_image: float = math.nan
    psnr: float = math.nan
    threads: int = 1
    note: str = ""
    restorations: list = field(default_factory=list, repr=False)  # the Restorations of ours in process


def options(args) -> dict:
    return dict(num_samples=args.samples, steps=args.steps, covariance=args.covariance,
                cg_max_iter=IMAGE_DEFAULTS.cg_max_iter)


def mean_psnr(estimates: list[torch.Tensor], items: list[Item]) -> float:
    return statistics.mean(psnr_ssim(estimate.cpu(), item.truth)[0] for estimate, item in zip(estimates, items))


def one_by_one(model: Denoiser, items: list[Item], args) -> Way:
    """Way 1: `restore` per image, each with its own generator."""
    restore(items[0].y, items[0].operator, model, **dict(options(args), steps=2))  # warm-up
    start = time.perf_counter()
    results = [restore(item.y, item.operator, model, generator=g, **options(args))
               for item, g in zip(items, generators(items, args.seed))]
    seconds = time.perf_counter() - start
    return Way("ours, one by one (restore)", seconds, [(r.nfe, args.samples) for r in results],
               statistics.mean(r.vjps for r in results), mean_psnr([r.mean for r in results], items), args.threads,
               restorations=results)


def batched(model: Denoiser, items: list[Item], args) -> Way:
    """Way 2: one `restore_batch` over every image, a generator per image, batch_size images per sampler run."""
    rows = args.batch_size * args.samples
    warm = items[:args.batch_size]
    restore_batch([i.y for i in warm], [i.operator for i in warm], model, batch_size=rows,
                  **dict(options(args), steps=2))
    start = time.perf_counter()
    results = restore_batch([i.y for i in items], [i.operator for i in items], model, batch_size=rows,
                            generator=generators(items, args.seed), **options(args))
    seconds = time.perf_counter() - start
    runs = [(results[run[0].item].nfe, sum(s.rows for s in run))
            for run in plan_runs(len(items), args.samples, rows, per_item=True)]
    # each image takes part in one run (samples <= rows): its VJPs are that run's, on the run's batch
    return Way(f"ours, batched (restore_batch, {args.batch_size} images per run)", seconds, runs,
               statistics.mean(r.vjps for r in results), mean_psnr([r.mean for r in results], items), args.threads,
               restorations=results)


def launch(args, folder: Path, out: Path) -> tuple[float, subprocess.CompletedProcess]:
    """The command line under torchrun on `folder` into `out`: (wall seconds, the finished process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
               "-m", "posterior_diff", "restore", str(folder), "-o", str(out), "--task", args.task,
               "--samples", str(args.samples), "--steps", str(args.steps), "--covariance", args.covariance,
               "--cg-max-iter", str(IMAGE_DEFAULTS.cg_max_iter), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--device", "cpu", "--dtype", "float32"]  # the float32 network, as ours
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"torchrun exited {result.returncode}: {result.stderr[-3000:]}")
    return seconds, result


@dataclass
class Launch:
    """Way 3's numbers: the wall-clock way, the way less start-up, the start-up seconds, the busiest
    process's sampler seconds (from the manifest) and the written posterior means."""

    wall: Way
    net: Way
    startup: float
    sampler: float
    means: list[torch.Tensor]


def processes(items: list[Item], args, folder: Path, out: Path) -> Launch:
    """Way 3: the command line under torchrun, then again into its finished folder (the start-up)."""
    seconds, _ = launch(args, folder, out)
    manifest = json.loads((out / MANIFEST).read_text())  # read now: the rerun rewrites it
    lines = manifest["images"]
    if manifest["run"]["processes"] != args.processes or any(line["status"] != "restored" for line in lines):
        raise RuntimeError(f"the torchrun run did not restore every image in {args.processes} processes: "
                           f"{manifest['run']}")
    startup, rerun = launch(args, folder, out)  # every output exists now: 0 images restored
    if "restored 0 of" not in rerun.stdout:
        raise RuntimeError(f"the start-up run restored images: {rerun.stdout[-500:]}")
    runs_per_process, sampler = [], 0.0
    for process in range(args.processes):
        mine = [line for line in lines if line["process"] == process]
        firsts = range(0, len(mine), args.batch_size)  # each batch of a process is one sampler run
        runs_per_process.append([(mine[first]["nfe"], len(mine[first:first + args.batch_size]) * args.samples)
                                 for first in firsts])
        sampler = max(sampler, sum(mine[first]["seconds"] for first in firsts))  # a run's seconds, once
    busiest = max(runs_per_process, key=lambda runs: sum(nfe * rows for nfe, rows in runs))
    means = [read_image(out / item.name) for item in items]
    psnr = mean_psnr(means, items)
    label = f"ours, {args.processes} processes (torchrun CLI, {args.batch_size} images per run)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    note = f"; only {cores} core(s) free for {args.processes} processes" if cores < args.processes else ""
    wall = Way(f"{label}, wall", seconds, busiest, psnr=psnr, note="8-bit PNG output" + note)
    net = Way(f"{label}, wall - start-up", seconds - startup, busiest, psnr=psnr, note=f"less {startup:.1f} s" + note)
    return Launch(wall, net, startup, sampler, means)


def peer_method(item: Item) -> str:
    """DDRM where deepinv has an SVD of the task's A (denoising, inpainting, small images), else DiffPIR."""
    try:
        decomposable_physics(item.operator, tuple(item.truth.shape))
    except ValueError:
        return "diffpir"
    return "ddrm"


def deepinv_loop(model: Denoiser, items: list[Item], args) -> Way:
    """deepinv's fastest Jacobian-free method, image by image, with our NFE."""
    method = peer_method(items[0])
    run_peer(method, model, items[0].operator, items[0].y, args.samples, 2)  # warm-up
    start = time.perf_counter()
    runs = [run_peer(method, model, item.operator, item.y, args.samples, args.steps, seed=index)
            for index, item in enumerate(items)]
    seconds = time.perf_counter() - start
    return Way(f"deepinv {method}, one by one", seconds, [(run.nfe, args.samples) for run in runs], 0.0,
               mean_psnr([run.samples.mean(0) for run in runs], items), args.threads)


# -- the limit and the report -----------------------------------------------------------------


class Forwards:
    """Bare-forward seconds (no graph) of the model at the run's image size, by (rows, threads), measured once each."""

    def __init__(self, model: Denoiser, size: int, repeats: int):
        self.model, self.size, self.repeats, self.seconds = model, size, repeats, {}

    def __call__(self, rows: int, threads: int) -> float:
        if (rows, threads) not in self.seconds:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                self.seconds[rows, threads] = bare_forward_seconds(self.model, rows, self.size, self.repeats)
            finally:
                torch.set_num_threads(previous)
            log_row("bare forward", f"{rows} rows", f"{threads} thread(s)", f"{self.seconds[rows, threads]:.4f} s")
        return self.seconds[rows, threads]

    def limit(self, way: Way) -> float:
        """The network-bound seconds of a way: its sampler runs' NFE x bare forward at their rows."""
        return sum(nfe * self(rows, way.threads) for nfe, rows in way.runs)


def seconds_cell(seconds: float) -> str:
    """Seconds with three significant figures or more, without an exponent."""
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3f}"


def table(ways: list[Way], forwards: Forwards, count: int) -> str:
    reference = ways[0].seconds
    rows = []
    for way in ways:
        limit = forwards.limit(way)
        batch_rows = way.runs[0][1]
        timed = way.seconds > 0  # wall - start-up can come out <= 0 when the work is within the start-up's noise
        missing = "n/a (start-up noise)"
        rows.append([way.label, str(count), str(batch_rows), str(way.runs[0][0]), f"{way.vjps_per_image:.0f}"
                     if math.isfinite(way.vjps_per_image) else "", seconds_cell(way.seconds) if timed else missing,
                     f"{count / way.seconds:.3f}" if timed else missing,
                     f"{reference / way.seconds:.2f}" if timed else missing, f"{forwards(batch_rows, way.threads):.4f}",
                     seconds_cell(limit), f"{limit / way.seconds:.2f}" if timed else missing, f"{way.psnr:.2f}",
                     way.note])
    return markdown_table(["way", "images", "rows per forward", "NFE per run", "VJPs per image", "seconds", "images / s",
                           "x one by one", "bare forward s", "network-bound s", "x network-bound", "mean PSNR (dB)",
                           "note"], rows)


def consistency(single: Way, batch: Way, cli_means: list[torch.Tensor]) -> str:
    """How closely the ways agree, the largest and the mean absolute difference over pixels and images: batched vs
    one by one (samples), the CLI's PNGs vs one by one's mean (8-bit levels). A CG solve that stops one iteration
    sooner or later under another batch's round-off moves a few pixels by more than the rest: the mean tells such
    a pixel from a mismatch (another generator moves every pixel by the sampler's noise)."""
    samples = torch.stack([(b.samples - s.samples).abs() for b, s in zip(batch.restorations, single.restorations)])
    levels = torch.stack([((s.mean.clamp(0, 1) * 255).round() - (png * 255).round()).abs()
                          for s, png in zip(single.restorations, cli_means)])
    return markdown_table(["comparison", "max abs difference", "mean abs difference"], [
        ["batched samples vs one-by-one samples (same per-image generators)", f"{float(samples.max()):.2e}",
         f"{float(samples.mean()):.2e}"],
        ["CLI posterior-mean PNGs vs one-by-one means, in 8-bit levels", f"{float(levels.max()):.0f}",
         f"{float(levels.mean()):.2e}"]])


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write the report; returns {"report": text, "ways": [Way, ...]} (the ways
    in table order: one by one, batched, processes wall, processes less start-up, deepinv)."""
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args) -> dict:
    start = time.perf_counter()
    model = default_model(torch.float32)
    forwards = Forwards(model, args.size, args.repeats)
    items = photograph_crops(args.images, args.size, args.downscale)
    with tempfile.TemporaryDirectory(prefix="throughput-") as temporary:
        folder, out = Path(temporary) / "measurements", Path(temporary) / "restored"
        write_measurements(items, args.task, folder)
        single = one_by_one(model, items, args)
        log_row("one by one", f"{len(items)} images", single.seconds, f"{len(items) / single.seconds:.3f} images/s")
        batch = batched(model, items, args)
        log_row("batched", f"{len(items)} images", batch.seconds, f"{len(items) / batch.seconds:.3f} images/s")
        launched = processes(items, args, folder, out)
        wall, net, startup = launched.wall, launched.net, launched.startup
        log_row(f"{args.processes} processes", f"{len(items)} images", wall.seconds, f"start-up {startup:.1f} s")
    peer = deepinv_loop(model, items, args)
    log_row(peer.label, f"{len(items)} images", peer.seconds, f"{len(items) / peer.seconds:.3f} images/s")
    ways = [single, batch, wall, net, peer]
    results = table(ways, forwards, len(items))
    photographs = sorted({item.source.split()[0] for item in items})
    vjp_note = (f"The {args.covariance} covariance spends {single.vjps_per_image:.0f} VJPs per image "
                f"({single.vjps_per_image / args.steps:.0f} per step): the limit counts forwards only, and a VJP costs "
                "about two forwards, so x network-bound = 1 is out of reach for ours; deepinv's method spends none."
                if single.vjps_per_image > 0 else "This covariance spends no VJPs: the limit is the whole network work.")
    sections = [
        "## Images per second\n\n"
        f"{len(items)} crops of {args.size}x{args.size}, task {args.task} (sigma_y {TASKS[args.task].sigma_y}), "
        f"{args.samples} samples per image, {args.steps} steps, covariance {args.covariance}; in-process runs on "
        f"{args.threads} torch thread(s), the {args.processes} processes on one thread each. *rows per forward*: the "
        "batch of each network call (the first sampler run's); *network-bound s*: the bare forwards alone, summed "
        "over the sampler runs (for the processes, those of the busiest process, the processes running in "
        "parallel); *x network-bound* = network-bound s / seconds. *x one by one*: speed against way 1.\n\n"
        + results + "\n\n" + vjp_note,
        f"## Start-up of the command line\n\nThe torchrun command run again into its finished folder (0 images to "
        f"restore: launch, imports, model load in each process, process group, manifest) takes **{startup:.1f} s**; "
        f"the run that restored the images took {wall.seconds:.1f} s wall time. The row *wall - start-up* leaves it "
        "out (n/a where the difference is within the noise of the start-up's timing). The sampler runs themselves "
        f"took {launched.sampler:.2f} s in the busiest process (the seconds the manifest records per run).",
        "## The ways restore the same images\n\nEvery way reads the same 8-bit PNG measurements; ours seed image i "
        "with `dataset.image_seed(seed, name)` as the command line does, so batched and one-by-one restorations are "
        "equal to round-off and the command line's PNGs equal the one-by-one means to 8-bit rounding.\n\n"
        + consistency(single, batch, launched.means),
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    details = [f"model: the embedded default; images: {len(items)} crops from the scikit-image photographs "
               f"{', '.join(photographs)} (held out of training), each shrunk by {args.downscale:g}, an evenly spaced "
               "grid of crops of its largest centre square",
               f"cores available to this process: {cores}; torch threads of the in-process runs: {args.threads}; "
               f"torchrun processes: {args.processes} with OMP_NUM_THREADS=1"]
    intro = "\n\n".join(__doc__.split("\n\n")[1:5])  # the images, the ways, deepinv, the limit
    report = write_report(args.out, "Throughput: one by one, batched, and across processes", intro, sections,
                          module="benchmarks.throughput", argv=args.argv, minutes=(time.perf_counter() - start) / 60,
                          details=details)
    return {"report": report, "ways": ways}


if __name__ == "__main__":
    main()
