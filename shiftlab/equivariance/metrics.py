"""Distances between a reference feature map and a shifted run, and their float64 accumulators.

Every distance is computed from the same per-(shift, image) sufficient statistics
(``ComparisonStats``), so the alignment code never needs to know which metric was asked for:

    cosine = 1 - <a,b>/(|a||b|) = (|a-b|^2 - (|a|-|b|)^2) / (2|a||b|)   (0 when both are zero)
    l2     = |a-b| / |a|                                                   (inf when only a is 0)
    psnr   = 10 log10(peak^2 / (|a-b|^2 / count)),  peak = max(a) - min(a)  (+inf when equal)

The cosine form built on |a-b|^2 stays accurate for nearly equal maps, where 1 - <a,b>/(...)
would lose everything to cancellation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

METRICS = ("cosine", "l2", "psnr")


@dataclass
class ComparisonStats:
    """Sufficient statistics of one comparison per (shift, image): float64 tensors of shape (S, B).

    ``valid`` (S,) is False where the comparison is undefined (exact alignment at a shift the
    stride does not divide, or an empty overlap); those entries become NaN distances.
    """

    ref_sq: torch.Tensor
    shifted_sq: torch.Tensor
    diff_sq: torch.Tensor
    count: torch.Tensor
    peak: Optional[torch.Tensor]
    valid: torch.Tensor


def concat(stats: list[ComparisonStats]) -> ComparisonStats:
    """Statistics of several comparisons with the same images, one after another along S."""
    if len(stats) == 1:
        return stats[0]
    fields = ("ref_sq", "shifted_sq", "diff_sq", "count")
    merged = {name: torch.cat([getattr(item, name) for item in stats]) for name in fields}
    peak = None if stats[0].peak is None else torch.cat([item.peak for item in stats])
    return ComparisonStats(**merged, peak=peak, valid=torch.cat([item.valid for item in stats]))


def distance(stats: ComparisonStats, metric: str) -> torch.Tensor:
    """Per-(shift, image) distance (S, B) in float64 from ``stats``; NaN where undefined."""
    ref_sq = stats.ref_sq.clamp_min(0)
    shifted_sq = stats.shifted_sq.clamp_min(0)
    diff_sq = stats.diff_sq.clamp_min(0)
    if metric == "cosine":
        ref_norm, shifted_norm = ref_sq.sqrt(), shifted_sq.sqrt()
        denom = 2 * ref_norm * shifted_norm
        value = (diff_sq - (ref_norm - shifted_norm) ** 2) / denom
        both_zero = (ref_sq == 0) & (shifted_sq == 0)
        one_zero = (denom == 0) & ~both_zero
        # cosine similarity with a zero vector is undefined; distance 1 = "no resemblance"
        value = torch.where(both_zero, torch.zeros_like(value), value)
        value = torch.where(one_zero, torch.ones_like(value), value)
        value = value.clamp(0.0, 2.0)
    elif metric == "l2":
        value = diff_sq.sqrt() / ref_sq.sqrt()
        value = torch.where((ref_sq == 0) & (diff_sq == 0), torch.zeros_like(value), value)
    elif metric == "psnr":
        mse = diff_sq / stats.count
        peak = stats.peak if stats.peak is not None else torch.ones_like(mse)
        value = 10 * torch.log10(peak**2 / mse)
        value = torch.where(mse == 0, torch.full_like(value, float("inf")), value)
    else:  # validated by the caller; kept for direct use
        raise ValueError(f"unknown metric {metric!r}")
    nan = torch.full_like(value, float("nan"))
    return torch.where(stats.valid[:, None], value, nan)


class DistanceAccumulator:
    """Streaming per-shift mean and std over images, in float64; memory is O(shifts).

    Non-finite distances are counted apart (``n_inf``: +inf, e.g. PSNR of identical maps;
    ``n_nan``: NaN features or distances) so a single NaN never silently poisons an average.
    The sums live on ``device`` (that of the distances): :meth:`add` never waits for a GPU, and
    values reach the host only through :meth:`mean`, :meth:`std` or an explicit copy.

    With ``n_layers`` the sums are (layers, shifts), filled by one :meth:`add` per forward pass
    for every layer at once (shift indices into the flattened sums); :meth:`layer` is one row.
    """

    FIELDS = ("total", "total_sq", "n", "n_inf", "n_nan")

    def __init__(self, n_shifts: int, device: Union[str, torch.device, None] = None,
                 n_layers: Optional[int] = None) -> None:
        shape = (n_shifts,) if n_layers is None else (n_layers, n_shifts)
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.n = torch.zeros(shape, dtype=torch.int64, device=device)
        self.n_inf = torch.zeros(shape, dtype=torch.int64, device=device)
        self.n_nan = torch.zeros(shape, dtype=torch.int64, device=device)

    def layer(self, index: int) -> "DistanceAccumulator":
        """The accumulator of one layer: a view that shares these sums."""
        view = DistanceAccumulator.__new__(DistanceAccumulator)
        for name in self.FIELDS:
            setattr(view, name, getattr(self, name)[index])
        return view

    def add(self, shift_index: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Add distances ``values`` (S, B) for the shifts at ``shift_index`` (S,).

        Shifts where ``valid`` (S,) is False are undefined by the alignment and not counted.
        """
        device = self.total.device
        # masks instead of boolean indexing: no data-dependent shape, so no wait for the device
        values = _on(values.detach(), device).to(torch.float64)
        keep = _on(valid, device)[:, None]
        shift_index = _on(shift_index, device)
        finite = torch.isfinite(values) & keep
        clean = torch.where(finite, values, torch.zeros_like(values))
        flat = lambda name: getattr(self, name).view(-1)  # noqa: E731
        flat("total").index_add_(0, shift_index, clean.sum(1))
        flat("total_sq").index_add_(0, shift_index, (clean**2).sum(1))
        flat("n").index_add_(0, shift_index, finite.sum(1))
        flat("n_inf").index_add_(0, shift_index, (torch.isposinf(values) & keep).sum(1))
        flat("n_nan").index_add_(0, shift_index,
                                 ((torch.isnan(values) | torch.isneginf(values)) & keep).sum(1))

    def merge(self, other: "DistanceAccumulator") -> None:
        for name in self.FIELDS:
            getattr(self, name).add_(getattr(other, name).to(self.total.device))

    def mean(self) -> torch.Tensor:
        """Mean over images per shift (on the CPU); +inf if any image gave +inf; NaN if none was
        finite."""
        mean = self.total / self.n.clamp_min(1)
        mean = torch.where(self.n == 0, torch.full_like(mean, float("nan")), mean)
        return torch.where(self.n_inf > 0, torch.full_like(mean, float("inf")), mean).cpu()

    def std(self) -> torch.Tensor:
        """Population std over the finite values per shift (0 for one image), on the CPU."""
        n = self.n.clamp_min(1).to(torch.float64)
        mean = self.total / n
        var = (self.total_sq / n - mean**2).clamp_min(0)
        std = var.sqrt()
        return torch.where(self.n == 0, torch.full_like(std, float("nan")), std).cpu()


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; asynchronous unless the copy goes to the host."""
    return tensor.to(device, non_blocking=device.type != "cpu")
