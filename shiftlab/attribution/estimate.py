"""What an attribution costs, from a short calibration: ``shiftlab attribute --dry-run``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from ..equivariance.capture import LayerSelection
from ..equivariance.engine import evaluation_mode, resolve_device
from .engine import _DTYPES, _prepared, _Run
from .inject import forward_mode
from .settings import AttributionSettings


@dataclass(frozen=True)
class AttributionEstimate:
    """Forward-mode passes of a whole run and the time they take, from one calibration."""

    passes: int
    layer_calls: int
    batches: int
    axes: int
    seconds: float

    def describe(self) -> str:
        """One line: the passes and the estimated time."""
        return (f"{self.passes} forward-mode passes ({self.layer_calls} layer calls + 1, x"
                f" {self.axes} {'axes' if self.axes > 1 else 'axis'}, x {self.batches} image"
                f" batch{'es' if self.batches > 1 else ''}); estimated {self.seconds:.0f} s"
                f" ({self.seconds / 60:.1f} min)")


def estimate_attribution(model: nn.Module, images: torch.Tensor, *, axis: str = "both",
                         layers: LayerSelection = None, batch_size: int = 16,
                         device: Union[str, torch.device, None] = "auto",
                         dtype: str = "float32") -> AttributionEstimate:
    """Time the output's pass and the first and last layer calls' passes on the first batch.

    A call's pass is plain up to the call and forward-mode after it, so passes get cheaper
    with depth; the estimate takes the mean of the first and the last call's time for every
    call (exact for a network of equal layers, an overestimate where late layers are cheap).

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    >>> estimate = estimate_attribution(net, torch.randn(5, 3, 16, 16), batch_size=2,
    ...                                 device="cpu")
    >>> estimate.passes, estimate.layer_calls, estimate.batches
    (24, 3, 3)
    """
    device = resolve_device(device)
    axes = AttributionSettings(axis=axis).axes
    batch = images[:batch_size]
    batches = -(-len(images) // batch_size)
    with evaluation_mode(model, None):
        work = _prepared(model, device, _DTYPES[dtype])
        run = _Run(work, batch, layers, "logits", device, _DTYPES[dtype])
        active = [call for call in run.calls if call.active]
        batch = batch.to(device=device, dtype=_DTYPES[dtype])
        with forward_mode():
            out, _, _ = run.total(batch, axes[0])  # warm-up (allocator, kernels)
            started = time.perf_counter()
            out, _, _ = run.total(batch, axes[0])
            total = _synced(started, device)
            times = []
            for call in (active[:1] + active[-1:]) if active else []:
                started = time.perf_counter()
                run.tangent(batch, call, axes[0], out)
                times.append(_synced(started, device))
    per_call = sum(times) / len(times) if times else 0.0
    per_batch = total + len(active) * per_call
    # the last batch may be smaller; time scales with the images in it
    seconds = per_batch * len(axes) * len(images) / len(batch)
    return AttributionEstimate(passes=len(axes) * (len(active) + 1) * batches,
                               layer_calls=len(active), batches=batches, axes=len(axes),
                               seconds=seconds)


def _synced(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
