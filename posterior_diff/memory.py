"""Will a restoration fit in the CPU's memory? An estimate before any sampling, and the batch that fits.

On the CPU an allocation the machine cannot hold does not fail cleanly: Linux over-commits, and
the kernel's out-of-memory handler kills the process (or another one) part-way through the run.
So `restore` estimates a run's peak before it samples, for image models on the CPU:

    peak(rows) = OVERHEAD * rows * per_row,    per_row = the peak of one network evaluation of one
                                                         row, with the VJP the guidance takes (a
                                                         forward alone where it takes none)

measured without allocating anything: the network runs on fake tensors (torch's FakeTensorMode,
shapes and dtypes only) under torch's `MemTracker`, which adds up the activations it would keep.
The network's evaluation dominates a step; the rest (the sampler's state, the CG's vectors, the
allocator's slack) is what OVERHEAD allows for: the peaks measured by `benchmarks.large_images`
(docs/large_images.md) were 1.39 to 1.64 times the tracker's estimate, from 512x512 to 128x128. The estimate is compared
with the memory available now (`MemAvailable`, and a cgroup limit where one is set), of which
`HEADROOM` may be used: where `rows` do not fit, the samples are split into runs of what does
(the same draws as `batch_size` gives them), and where one row does not fit the call is refused
with the estimate and what would make it fit.

Small runs are not probed (the probe takes a few seconds for a large UNet): below
`PROBE_ROW_PIXELS` rows x pixels every pixel-space model this package loads fits in a few GB.
CUDA runs are not probed either: a CUDA allocation that fails raises an OutOfMemoryError, which
kills nothing.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PROBE_ROW_PIXELS = 4 * 128 * 128  # rows x pixels up to which a run is not probed (the demo's size)
HEADROOM = 0.8  # the share of the available memory a run may take: the rest for the process around it
OVERHEAD = 1.7  # measured peak / tracked network peak: 1.39-1.64 at one sample (docs/large_images.md)


@dataclass(frozen=True)
class MemoryPlan:
    """What the memory check decided for one call.

    Attributes:
        batch_size: rows per sampler run: the caller's, or a smaller one that fits (None: all at once).
        per_row: the estimated peak bytes of one row, OVERHEAD included (None where the run was not probed).
        available: the bytes available when the call was checked (None where not probed).
    """

    batch_size: int | None
    per_row: int | None = None
    available: int | None = None


class MemoryEstimateError(MemoryError):
    """A restoration that cannot fit in memory even one sample at a time: raised before any sampling."""


def available_bytes() -> int | None:
    """The memory this process may still take on the CPU: MemAvailable (Linux), capped by the room
    left under a cgroup v2 limit; None where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


_PER_ROW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(x_shape, needs_vjp): bytes}


def peak_bytes_per_row(model: nn.Module, x_shape: tuple[int, ...], needs_vjp: bool) -> int | None:
    """The peak bytes of one network evaluation of one row of shape x_shape (its VJP included when
    `needs_vjp`), measured on fake tensors: nothing is allocated. None where the model cannot run on
    fake tensors (or torch lacks the tracker). Cached per model, shape and kind."""
    known = _PER_ROW.setdefault(model, {})
    key = (tuple(x_shape), needs_vjp)
    if key not in known:
        known[key] = _probe(model, tuple(x_shape), needs_vjp)
    return known[key]


def _probe(model: nn.Module, x_shape: tuple[int, ...], needs_vjp: bool) -> int | None:
    pieces = getattr(model, "pieces", None)
    if pieces is not None:  # a ladder: it routes on t's value, so its pieces are probed one by one
        peaks = [peak_bytes_per_row(piece, x_shape, needs_vjp) for piece in pieces]
        return None if None in peaks else max(peaks)
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in parameters if not p.requires_grad]
    reference = parameters[0] if parameters else torch.empty(0)
    try:
        for parameter in frozen:  # the tracker hooks every parameter's gradient
            parameter.requires_grad_(True)
        # t stays a real tensor: a model may route on its value (a ladder picks its piece on the host)
        t = torch.full((1,), 0.5 * float(model.schedule.t_max), dtype=torch.float64)
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.zeros(1, *x_shape, dtype=reference.dtype, requires_grad=needs_vjp)
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker, torch.set_grad_enabled(needs_vjp):
                denoised = model(x, t)
                if needs_vjp:
                    denoised.backward(torch.ones_like(denoised))
            peak = tracker.get_tracker_snapshot("peak")
        return int(sum(stats.get("Total", 0) for stats in peak.values()))
    except Exception:  # a model fake tensors cannot run (data-dependent shapes, custom kernels): no estimate
        return None
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)
            parameter.grad = None


def plan_memory(model: nn.Module, x_shape: tuple[int, ...], rows: int, batch_size: int | None, device: torch.device,
                needs_vjp: bool) -> MemoryPlan:
    """The batch size a call may run with, checked against the memory available (see the module docstring).

    Args:
        model: the prior (an image model: others are not probed).
        x_shape: one sample's shape, (C, H, W).
        rows: the rows the call would sample at once without a batch size (measurements x samples).
        batch_size: the caller's batch size (None: all rows at once).
        device: where the run samples.
        needs_vjp: whether the guidance takes a VJP of the network.

    Raises:
        MemoryEstimateError: one row does not fit, or the caller's batch_size does not; the message
            gives the estimate, the memory available and the option that makes it fit.
    """
    asked = rows if batch_size is None else min(batch_size, rows)
    if device.type != "cpu" or getattr(model, "data_range", None) is None or asked * math.prod(x_shape[1:]) <= PROBE_ROW_PIXELS:
        return MemoryPlan(batch_size)
    available, network = available_bytes(), peak_bytes_per_row(model, x_shape, needs_vjp)
    if available is None or not network:
        return MemoryPlan(batch_size)
    per_row = int(OVERHEAD * network)
    fits = int(HEADROOM * available // per_row)
    if fits >= asked:
        return MemoryPlan(batch_size, per_row, available)
    estimate = f"about {per_row / 2**30:.2f} GiB per sample at {'x'.join(map(str, x_shape))}"
    room = f"{available / 2**30:.1f} GiB available ({HEADROOM:.0%} of it usable)"
    if fits == 0:
        raise MemoryEstimateError(f"this restoration needs {estimate}, more than the {room}, even one sample at a time: "
                                  "restore a smaller image (or crop it), run on a GPU (device=\"cuda\"), or use a model "
                                  "in bfloat16 (dtype) where it has one")
    if batch_size is not None:
        raise MemoryEstimateError(f"batch_size={batch_size} needs {estimate}, {batch_size * per_row / 2**30:.1f} GiB "
                                  f"in all, more than the {room}: pass batch_size={fits} or less (or leave it None "
                                  "and restore picks what fits)")
    return MemoryPlan(fits, per_row, available)
