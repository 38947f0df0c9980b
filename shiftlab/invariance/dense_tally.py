"""What dense consistency keeps of a run, and how one shift's output is tallied into it.

:class:`Tally` holds per-image counts and distances, the pooled sums of EQ-T, the pairs, the
(H, W) agreement map and, with masks, the confusion matrices; :func:`tally_shift` brings one
shift's output back to the unshifted frame (:func:`align`) and adds it; :func:`tally_pairs`
scores mASSC's pairs of a batch. :func:`shiftlab.invariance.dense.measure_dense` drives them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..equivariance.metrics import ComparisonStats, distance
from ..equivariance.shifts import apply_shifts
from ..errors import UsageError
from ..results.provenance import Provenance
from .dense_result import DenseResult, DenseSettings
from .grid_result import INVALID

__all__ = ["Tally", "align", "tally_pairs", "tally_shift"]

_PAIR_CHUNK = 64  # pairs compared per step: 64 pairs of 224x224 class maps hold about 26 MB


@dataclass
class _Shifted:
    """One shift's output for a batch, brought back to the unshifted frame."""

    classes: torch.Tensor      # (B, H, W) class per pixel of the unshifted frame, -1: not seen
    rows: slice                # where the shifted window overlaps, in the unshifted frame
    cols: slice
    source_rows: slice         # the same pixels in the shifted output
    source_cols: slice


def align(out_classes: torch.Tensor, dh: int, dw: int, mode: str) -> _Shifted:
    """Bring a shifted output's classes (B, H, W) back to the unshifted frame."""
    height, width = out_classes.shape[-2:]
    if mode == "circular":
        return _Shifted(torch.roll(out_classes, (-dh, -dw), (-2, -1)), slice(None), slice(None),
                        slice(None), slice(None))
    # the crop window shifted by d shows at its pixel p what the unshifted window shows at p - d
    rows = slice(max(0, -dh), height - max(0, dh))
    cols = slice(max(0, -dw), width - max(0, dw))
    source_rows = slice(rows.start + dh, rows.stop + dh)
    source_cols = slice(cols.start + dw, cols.stop + dw)
    aligned = torch.full_like(out_classes, INVALID)
    aligned[:, rows, cols] = out_classes[:, source_rows, source_cols]
    return _Shifted(aligned, rows, cols, source_rows, source_cols)


def _aligned_maps(maps: torch.Tensor, shifted: _Shifted, dh: int, dw: int, mode: str
                  ) -> tuple[torch.Tensor, slice, slice]:
    """A shifted output map (B, C, H, W) on the overlap, and where that is in the unshifted
    frame."""
    if mode == "circular":
        return torch.roll(maps, (-dh, -dw), (-2, -1)), slice(None), slice(None)
    return maps[..., shifted.source_rows, shifted.source_cols], shifted.rows, shifted.cols


class Tally:
    """Everything kept of a run: per-image counts, pooled sums, the map, the confusions."""

    def __init__(self, settings: DenseSettings, n_images: int, pairs: np.ndarray) -> None:
        n_shifts = len(settings.grid)
        self.settings, self.pairs = settings, pairs
        self.agree = np.zeros((n_images, n_shifts), dtype=np.int64)
        self.valid = np.zeros((n_images, n_shifts), dtype=np.int64)
        self.distances = {m: np.full((n_images, n_shifts), np.nan) for m in ("cosine", "l2", "psnr")}
        self.diff_sq = np.zeros(n_shifts)
        self.values = np.zeros(n_shifts)
        self.low, self.high = math.inf, -math.inf
        self.pair_agree = np.zeros(len(pairs), dtype=np.int64)
        self.pair_valid = np.zeros(len(pairs), dtype=np.int64)
        self.map_sum = np.zeros(settings.size)
        self.map_count = np.zeros(settings.size)
        self.n_classes: Optional[int] = None
        self.reference_classes: Optional[np.ndarray] = None
        self.correct = self.labelled = self.confusion = self.image_confusion = None
        self.nonfinite_pixels = 0

    def start(self, n_classes: int, with_masks: bool, n_images: int) -> None:
        """Size the class-dependent arrays at the first batch (the model tells C)."""
        if self.n_classes is not None:
            if with_masks != (self.confusion is not None):
                raise UsageError("every batch must carry masks, or none")
            return
        self.n_classes = n_classes
        self.reference_classes = np.zeros(n_classes, dtype=np.int64)
        if with_masks:
            n_shifts = len(self.settings.grid)
            self.correct = np.zeros((n_images, n_shifts), dtype=np.int64)
            self.labelled = np.zeros((n_images, n_shifts), dtype=np.int64)
            self.confusion = np.zeros((n_shifts, n_classes, n_classes), dtype=np.int64)
            self.image_confusion = np.zeros((n_images, n_classes, n_classes), dtype=np.int64)

    def result(self, provenance: Provenance) -> DenseResult:
        return DenseResult(
            settings=self.settings, agree=self.agree, valid=self.valid,
            cosine=self.distances["cosine"], l2=self.distances["l2"],
            psnr=self.distances["psnr"], diff_sq=self.diff_sq, values=self.values,
            peak_to_peak=float(self.high - self.low) if self.high >= self.low else math.nan,
            pairs=self.pairs, pair_agree=self.pair_agree, pair_valid=self.pair_valid,
            agreement_sum=self.map_sum, agreement_count=self.map_count,
            reference_classes=self.reference_classes, n_classes=int(self.n_classes),
            n_nonfinite=int(self.nonfinite_pixels), correct=self.correct,
            labelled=self.labelled, confusion=self.confusion,
            image_confusion=self.image_confusion, provenance=provenance)


def tally_shift(tally: Tally, k: int, shift: tuple[int, int], reference: torch.Tensor,
                ref_classes: torch.Tensor, out: torch.Tensor, out_classes: torch.Tensor,
                masks: Optional[torch.Tensor], ids: np.ndarray, aligned: torch.Tensor,
                moved: bool) -> None:
    """Add grid shift ``k`` of a batch (images ``ids``): its classes go to ``aligned[k]`` (in
    the unshifted frame) for the pairs; agreement, distances, EQ-T sums, the map (``moved``:
    a non-zero shift) and, with ``masks``, the confusions go to ``tally``."""
    settings = tally.settings
    dh, dw = shift
    shifted = align(out_classes, dh, dw, settings.mode)
    aligned[k] = shifted.classes
    compared = (shifted.classes != INVALID) & (ref_classes != INVALID)
    agrees = compared & (shifted.classes == ref_classes)
    tally.agree[ids, k] = agrees.flatten(1).sum(1).cpu().numpy()
    tally.valid[ids, k] = compared.flatten(1).sum(1).cpu().numpy()
    if moved:
        tally.map_sum += agrees.sum(0).double().cpu().numpy()
        tally.map_count += compared.sum(0).double().cpu().numpy()
    # output distances over the overlap, finite pixels only (as the agreement counts them)
    maps, rows, cols = _aligned_maps(out, shifted, dh, dw, settings.mode)
    ref = reference[..., rows, cols]
    keep = compared[:, rows, cols][:, None].expand_as(ref)
    a = torch.where(keep, ref, torch.zeros_like(ref)).flatten(1)
    b = torch.where(keep, maps, torch.zeros_like(maps)).flatten(1)
    count = keep.flatten(1).sum(1).double()
    diff_sq = ((a - b) ** 2).sum(1)
    peak = torch.where(keep, ref, torch.full_like(ref, -math.inf)).flatten(1).amax(1) - \
        torch.where(keep, ref, torch.full_like(ref, math.inf)).flatten(1).amin(1)
    stats = ComparisonStats(ref_sq=(a * a).sum(1)[None], shifted_sq=(b * b).sum(1)[None],
                            diff_sq=diff_sq[None], count=count[None], peak=peak[None],
                            valid=torch.ones(1, dtype=torch.bool, device=a.device))
    for metric in ("cosine", "l2", "psnr"):
        values = distance(stats, metric)[0]
        values = torch.where(count > 0, values, torch.full_like(values, math.nan))
        tally.distances[metric][ids, k] = values.cpu().numpy()
    tally.diff_sq[k] += float(diff_sq.sum())
    tally.values[k] += float(count.sum())
    if masks is not None:
        _tally_masks(tally, k, shift, out_classes, masks, ids)


def _tally_masks(tally: Tally, k: int, shift: tuple[int, int], out_classes: torch.Tensor,
                 masks: torch.Tensor, ids: np.ndarray) -> None:
    """The shifted input's prediction against its own mask (the mask shifted alike)."""
    settings = tally.settings
    table = torch.tensor([shift], dtype=torch.float64)
    mask = apply_shifts(masks[:, None], table, settings.mode, settings.margin)[0, :, 0]
    labelled = mask != settings.ignore_index if settings.ignore_index is not None \
        else torch.ones_like(mask, dtype=torch.bool)
    correct = labelled & (out_classes == mask)
    tally.correct[ids, k] = correct.flatten(1).sum(1).cpu().numpy()
    tally.labelled[ids, k] = labelled.flatten(1).sum(1).cpu().numpy()
    n_classes = tally.n_classes
    counted = labelled & (out_classes != INVALID)
    image = torch.arange(len(ids), device=mask.device)[:, None, None].expand_as(mask)
    index = (image * n_classes + mask) * n_classes + out_classes
    counts = torch.bincount(index[counted], minlength=len(ids) * n_classes * n_classes)
    counts = counts.reshape(len(ids), n_classes, n_classes).cpu().numpy()
    tally.image_confusion[ids] += counts
    tally.confusion[k] += counts.sum(0)


def tally_pairs(tally: Tally, aligned: torch.Tensor, ids: np.ndarray) -> None:
    """mASSC's pairs of this batch's images: agreement on the pixels both shifts see."""
    rows = np.flatnonzero((tally.pairs[:, 0] >= ids[0]) & (tally.pairs[:, 0] <= ids[-1]))
    # a few pairs at a time: one transfer per chunk (not two per pair), memory bounded
    for start in range(0, len(rows), _PAIR_CHUNK):
        chunk = rows[start:start + _PAIR_CHUNK]
        image, first, second = (torch.as_tensor(tally.pairs[chunk, k], device=aligned.device)
                                for k in range(3))
        a, b = aligned[first, image - int(ids[0])], aligned[second, image - int(ids[0])]
        both = (a != INVALID) & (b != INVALID)
        tally.pair_agree[chunk] = (both & (a == b)).flatten(1).sum(1).cpu().numpy()
        tally.pair_valid[chunk] = both.flatten(1).sum(1).cpu().numpy()
