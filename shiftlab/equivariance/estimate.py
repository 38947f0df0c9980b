"""Peak-memory sampling and a short calibration that predicts a run's time and memory."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .shifts import ShiftGrid

_PAGE = 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the process maximum
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory (MB) above the level at entry, in ``out['peak_mb']``.

    CUDA: ``max_memory_allocated``; CPU: resident set size sampled every 5 ms.
    """
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    start = _rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out["peak_mb"] = (max(peak[0], _rss_bytes()) - start) / 2**20


@dataclass(frozen=True)
class RunEstimate:
    """What a measurement will cost, from a calibration on a few images and shifts."""

    forward_passes: int
    seconds: float
    peak_mb: float
    calibration_seconds: float

    def describe(self) -> str:
        minutes = self.seconds / 60
        return (f"{self.forward_passes} forward passes; estimated {self.seconds:.0f} s"
                f" ({minutes:.1f} min) and about {self.peak_mb:.0f} MB of extra memory"
                f" (calibrated in {self.calibration_seconds:.1f} s)")


def estimate_run(model: torch.nn.Module, images: torch.Tensor, grid: ShiftGrid,
                 batch_size: int = 16, calibration_passes: int = 3, **measure_kwargs) -> RunEstimate:
    """Time ``calibration_passes`` batched passes of ``measure`` and scale to the whole run.

    Memory does not grow with the number of shifts, so the calibration's peak (same batch size)
    is the estimate.

    Example:
        Four images under the 1024 shifts of a 32 x 32 grid, 16 inputs per pass; the times
        and memory depend on the machine:

        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                     nn.MaxPool2d(2)).eval()
        >>> images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> estimate = estimate_run(net, images, ShiftGrid.square(32))
        >>> estimate.forward_passes
        257
        >>> print(estimate.describe())     # doctest: +ELLIPSIS
        257 forward passes; estimated ... s (... min) and about ... MB of extra memory (...)
    """
    from ..checks import batch_layout, count_passes
    from .engine import measure, resolve_device

    images_per_batch, per_pass = batch_layout(len(images), batch_size)
    forward_shifts = sum(1 for s in grid.shifts if s != (0.0, 0.0))
    total_passes = count_passes(len(images), forward_shifts, batch_size)
    sample = images[:images_per_batch]
    n_shifts = min(len(grid), per_pass * calibration_passes)
    calibration = ShiftGrid.explicit(grid.shifts[:n_shifts])
    device = measure_kwargs.get("device", "auto")
    with peak_memory(resolve_device(device)) as memory:
        started = time.perf_counter()
        measure(model, sample, calibration, batch_size=batch_size, **measure_kwargs)
        seconds = time.perf_counter() - started
    calibration_passes_done = count_passes(len(sample), sum(1 for s in calibration.shifts
                                                             if s != (0.0, 0.0)), batch_size)
    per_forward = seconds / max(1, calibration_passes_done)
    return RunEstimate(total_passes, per_forward * total_passes, memory["peak_mb"], seconds)
