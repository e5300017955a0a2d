"""Shared pieces of the benchmark reports: markdown tables and the provenance lines."""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import shlex
import sys

import torch

import posterior_diff


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of already formatted strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(invocation: list[str], minutes: float) -> list[str]:
    """Markdown bullet lines: the command (`python *invocation *argv`), date, run time, versions, machine."""
    command = "PYTHONPATH=. python " + shlex.join(invocation + sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    try:
        import deepinv

        peer = f", deepinv {deepinv.__version__}"
    except ImportError:
        peer = ""
    return [
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; total run time {minutes:.1f} min",
        f"- posterior-diff {posterior_diff.__version__}, torch {torch.__version__} ({torch.get_num_threads()} thread(s)){peer}",
        f"- machine: {machine}",
    ]


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
