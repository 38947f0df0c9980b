"""The result of :func:`shiftlab.invariance.dense.measure_dense`: per-image counts and distances
of a dense model's output map under every shift, the statistics derived from them, save/load.

Every comparison happens in the unshifted image's frame: the shifted output is moved back by
the shift (circular mode), or only the pixels both windows see are compared (crop mode). The
numbers (docs/semantics.md, "Dense outputs"):

* agreement per shift: the share of compared pixels whose argmax class equals the unshifted
  output's; mASSC: the same between the outputs of two random shifts of the grid (pairs drawn
  as for classifiers), compared on the pixels valid in both;
* output distances of the aligned maps per image (cosine, relative L2, PSNR as for layers) and
  StyleGAN3's EQ-T: 20·log10(peak-to-peak of the unshifted outputs) − 10·log10(MSE), the MSE
  pooled over images and compared values;
* with masks: mIoU and pixel accuracy of each shifted input's prediction against its own mask
  (pixels with the ignore index left out), per shift and pooled;
* the per-pixel agreement map: at each position of the unshifted frame, the share of (image,
  non-zero shift) whose prediction there agrees with the unshifted one.

Intervals come from a seeded bootstrap over images (the sampled unit); pixels of one image are
never treated as independent trials of their own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from ..equivariance.shifts import ShiftGrid
from ..errors import ShiftlabError
from ..results.files import read_archive, write_archive
from ..results.provenance import Provenance, WithProvenance
from .grid_result import bootstrap_interval

if TYPE_CHECKING:  # pandas is imported lazily: only tables need it
    import pandas

__all__ = ["DenseResult", "DenseSettings", "load_dense", "mean_iou"]

FORMAT_VERSION = 1
KIND = "shiftlab.dense"
_PER_IMAGE = ("agree", "valid", "cosine", "l2", "psnr")
_REQUIRED = _PER_IMAGE + ("diff_sq", "values", "pairs", "pair_agree", "pair_valid",
                          "agreement_sum", "agreement_count", "reference_classes")
_MASKED = ("correct", "labelled", "confusion", "image_confusion")


def mean_iou(confusion: np.ndarray) -> np.ndarray:
    """Mean intersection over union of confusion matrices (..., C, C) with rows = true class,
    columns = predicted class: IoU_c = TP / (TP + FP + FN), averaged over the classes that occur
    in the labels or the predictions (NaN when there is no labelled pixel).

    >>> mean_iou(np.array([[3, 1], [0, 4]]))             # IoU 3/4 and 4/5
    0.775
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        present = (union > 0).sum(-1)
        value = np.where(present > 0, np.nansum(iou, -1) / np.maximum(present, 1), np.nan)
    return float(value) if value.ndim == 0 else value


@dataclass(frozen=True)
class DenseSettings:
    """What defines a dense output-level measurement (saved with the result)."""

    grid: ShiftGrid
    mode: str = "circular"
    size: tuple[int, int] = (224, 224)
    margin: int = 0
    n_pairs: int = 1000
    seed: int = 0
    n_bootstrap: int = 1000
    confidence: float = 0.95
    padding: str = "as-trained"
    ignore_index: Optional[int] = 255
    output: str = "out"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["grid"] = self.grid.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DenseSettings":
        values = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        values["grid"] = ShiftGrid.from_dict(data["grid"])
        values["size"] = tuple(int(v) for v in data["size"])
        return cls(**values)


@dataclass
class DenseResult(WithProvenance):
    """Per-image counts and distances of a dense model's output under every shift of a grid.

    Arrays (N images, S grid shifts, P pairs, C classes, H×W the measured window):

    * ``agree``, ``valid`` (N, S): pixels whose aligned argmax equals the unshifted one, and
      pixels compared (the overlap of the two windows in crop mode; finite outputs only).
    * ``cosine``, ``l2``, ``psnr`` (N, S): distances of the aligned output maps per image.
    * ``diff_sq``, ``values`` (S,): Σ squared difference and the number of values compared,
      pooled over images (EQ-T).
    * ``pairs`` (P, 3) as (image, grid index of δ1, grid index of δ2); ``pair_agree``,
      ``pair_valid`` (P,): agreeing and compared pixels of each pair.
    * ``agreement_sum``, ``agreement_count`` (H, W): the per-pixel agreement map's counts.
    * ``reference_classes`` (C,): how many unshifted pixels each class won.
    * with masks: ``correct``, ``labelled`` (N, S) pixel counts, ``confusion`` (S, C, C) per
      shift and ``image_confusion`` (N, C, C) per image over all shifts (rows: true class).
    """

    settings: DenseSettings
    agree: np.ndarray
    valid: np.ndarray
    cosine: np.ndarray
    l2: np.ndarray
    psnr: np.ndarray
    diff_sq: np.ndarray
    values: np.ndarray
    peak_to_peak: float
    pairs: np.ndarray
    pair_agree: np.ndarray
    pair_valid: np.ndarray
    agreement_sum: np.ndarray
    agreement_count: np.ndarray
    reference_classes: np.ndarray
    n_classes: int
    n_nonfinite: int = 0
    correct: Optional[np.ndarray] = None
    labelled: Optional[np.ndarray] = None
    confusion: Optional[np.ndarray] = None
    image_confusion: Optional[np.ndarray] = None
    provenance: Provenance = field(default_factory=Provenance)

    kind = "dense"  # how tables and reports tell it from a classifier's result

    # -- basics ------------------------------------------------------------------------
    @property
    def grid(self) -> ShiftGrid:
        return self.settings.grid

    @property
    def n_images(self) -> int:
        return int(self.agree.shape[0])

    @property
    def has_masks(self) -> bool:
        return self.confusion is not None

    @property
    def _moved(self) -> np.ndarray:
        """(S,) True for the grid's non-zero shifts."""
        return np.array([tuple(s) != (0, 0) for s in self.grid.shifts])

    def _bootstrap(self, successes, trials):
        return bootstrap_interval(successes, trials, n_resamples=self.settings.n_bootstrap,
                                  confidence=self.settings.confidence, seed=self.settings.seed)

    @property
    def uninformative(self) -> Optional[str]:
        """A one-line warning when every unshifted pixel of every image is one class: agreement
        then says little about shifts. None otherwise."""
        won = np.flatnonzero(self.reference_classes)
        if len(won) != 1:
            return None
        return (f"agreement is uninformative: every unshifted pixel is class {int(won[0])};"
                " trained weights give a meaningful number")

    # -- per shift ---------------------------------------------------------------------
    @property
    def agreement(self) -> np.ndarray:
        """(S,) share of compared pixels whose class agrees with the unshifted output's."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.agree.sum(0) / self.valid.sum(0)

    @property
    def eq_t(self) -> np.ndarray:
        """(S,) EQ-T in dB: 20·log10(peak-to-peak) − 10·log10(pooled MSE); inf when equal."""
        return _eq_t(self.peak_to_peak, self.diff_sq, self.values)

    def distance(self, metric: str) -> np.ndarray:
        """(S,) mean over images of the aligned output maps' ``metric`` (cosine, l2, psnr)."""
        values = getattr(self, metric)
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isnan(values), 0.0, values)
            count = (~np.isnan(values)).sum(0)
            return np.where(count > 0, finite.sum(0) / np.maximum(count, 1), np.nan)

    @property
    def miou(self) -> Optional[np.ndarray]:
        """(S,) mIoU of each shifted input's prediction against its mask; None without masks."""
        return None if self.confusion is None else mean_iou(self.confusion)

    @property
    def pixel_accuracy(self) -> Optional[np.ndarray]:
        """(S,) share of labelled pixels predicted right, per shift; None without masks."""
        if self.correct is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct.sum(0) / self.labelled.sum(0)

    # -- pooled ------------------------------------------------------------------------
    def pooled_agreement(self) -> tuple[float, float, float]:
        """Agreement over every non-zero shift: (value, interval low, interval high)."""
        agree, valid = self.agree[:, self._moved].sum(1), self.valid[:, self._moved].sum(1)
        total = valid.sum()
        value = agree.sum() / total if total else math.nan
        return (float(value), *self._bootstrap(agree, valid))

    def massc(self) -> tuple[float, float, float]:
        """mASSC over the random pairs of shifts: (value, interval low, interval high)."""
        images = self.pairs[:, 0]
        agree = np.bincount(images, weights=self.pair_agree, minlength=self.n_images)
        valid = np.bincount(images, weights=self.pair_valid, minlength=self.n_images)
        total = valid.sum()
        value = agree.sum() / total if total else math.nan
        return (float(value), *self._bootstrap(np.rint(agree), np.rint(valid)))

    def massc_by_distance(self) -> tuple[np.ndarray, np.ndarray]:
        """mASSC of the random pairs grouped by the length |δ1 − δ2| (px) of the shift between
        their two inputs: (lengths, mASSC), sorted by length."""
        shifts = np.asarray(self.grid.shifts, dtype=np.float64).reshape(-1, 2)
        between = shifts[self.pairs[:, 2]] - shifts[self.pairs[:, 1]]
        length = np.round(np.hypot(between[:, 0], between[:, 1]), 6)
        lengths, group = np.unique(length, return_inverse=True)
        agree = np.bincount(group, weights=self.pair_agree, minlength=len(lengths))
        valid = np.bincount(group, weights=self.pair_valid, minlength=len(lengths))
        with np.errstate(invalid="ignore", divide="ignore"):
            return lengths, agree / valid

    def pooled_miou(self) -> tuple[float, float, float]:
        """mIoU over every shift's prediction (the unshifted one included), with a percentile
        bootstrap over images of the summed confusion matrices; NaNs without masks."""
        if self.image_confusion is None:
            return math.nan, math.nan, math.nan
        value = mean_iou(self.image_confusion.sum(0))
        rng = np.random.default_rng(self.settings.seed)
        draws = rng.integers(0, self.n_images, size=(self.settings.n_bootstrap, self.n_images))
        counts = np.stack([np.bincount(row, minlength=self.n_images) for row in draws])
        flat = self.image_confusion.reshape(self.n_images, -1).astype(np.float64)
        resampled = (counts @ flat).reshape(-1, *self.image_confusion.shape[1:])
        tail = (1 - self.settings.confidence) / 2
        low, high = np.nanquantile(mean_iou(resampled), [tail, 1 - tail])
        return float(value), float(low), float(high)

    def agreement_map(self) -> np.ndarray:
        """(H, W) share of (image, non-zero shift) whose class at each pixel of the unshifted
        frame agrees with the unshifted prediction; NaN where no shift compares that pixel."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.agreement_sum / self.agreement_count

    def summary(self) -> dict:
        """Every pooled number of the measurement as one flat dict (one table row)."""
        agreement, agreement_low, agreement_high = self.pooled_agreement()
        massc, massc_low, massc_high = self.massc()
        moved = self._moved
        per_shift = self.agreement[moved]
        row = {
            "n_images": self.n_images, "n_shifts": len(self.grid), "n_pairs": len(self.pairs),
            "massc": massc, "massc_ci_low": massc_low, "massc_ci_high": massc_high,
            "agreement": agreement, "agreement_ci_low": agreement_low,
            "agreement_ci_high": agreement_high,
            "worst_shift_agreement": float(np.nanmin(per_shift)) if per_shift.size else math.nan,
        }
        # PSNR is left out: one exactly equal shift makes its mean infinite; EQ-T is the
        # pooled number of that kind
        for metric in ("cosine", "l2"):
            row[f"output_{metric}"] = _finite_mean(getattr(self, metric)[:, moved])
        row["eq_t_db"] = float(_eq_t(self.peak_to_peak, self.diff_sq[moved].sum(),
                                     self.values[moved].sum())) if moved.any() else math.nan
        if self.has_masks:
            miou, miou_low, miou_high = self.pooled_miou()
            accuracy = self.correct.sum() / max(int(self.labelled.sum()), 1)
            accuracy_low, accuracy_high = self._bootstrap(self.correct.sum(1),
                                                          self.labelled.sum(1))
            row.update(miou=miou, miou_ci_low=miou_low, miou_ci_high=miou_high,
                       miou_worst_shift=float(np.nanmin(self.miou)),
                       pixel_accuracy=float(accuracy), pixel_accuracy_ci_low=accuracy_low,
                       pixel_accuracy_ci_high=accuracy_high)
        row["n_nonfinite"] = int(self.n_nonfinite)
        return row

    def to_frame(self) -> "pandas.DataFrame":
        """One row per grid shift: dh, dw, agreement with its bootstrap interval, the pixels
        compared, the output distances, EQ-T, and mIoU / pixel accuracy with masks."""
        import pandas as pd

        low, high = self._bootstrap(self.agree, self.valid)
        shifts = np.array(self.grid.shifts, dtype=np.float64).reshape(-1, 2)
        frame = pd.DataFrame({"dh": shifts[:, 0], "dw": shifts[:, 1],
                              "agreement": self.agreement, "ci_low": low, "ci_high": high,
                              "pixels": self.valid.sum(0)})
        for metric in ("cosine", "l2", "psnr"):
            frame[metric] = self.distance(metric)
        frame["eq_t_db"] = self.eq_t
        if self.has_masks:
            frame["miou"] = self.miou
            frame["pixel_accuracy"] = self.pixel_accuracy
        return frame

    # -- files -------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the result as one ``.npz`` (JSON header + arrays; no pickle), atomically."""
        header = {"kind": KIND, "format": FORMAT_VERSION, "settings": self.settings.to_dict(),
                  "peak_to_peak": self.peak_to_peak, "n_classes": self.n_classes,
                  "n_nonfinite": self.n_nonfinite, "provenance": self.provenance.to_dict()}
        arrays = {name: getattr(self, name) for name in _REQUIRED + _MASKED}
        return write_archive(path, header, arrays)


def load_dense(path: Union[str, Path]) -> DenseResult:
    """Read a result written by :meth:`DenseResult.save`."""
    header, arrays = read_archive(path, _REQUIRED, optional=_MASKED, what="dense result")
    if header.get("kind") != KIND:
        raise ShiftlabError(f"{path} is not a dense consistency result (kind"
                            f" {header.get('kind')!r})")
    if int(header.get("format", 0)) > FORMAT_VERSION:
        raise ShiftlabError(f"{path} was written by a newer shiftlab (format"
                            f" {header['format']}); upgrade shiftlab to read it")
    try:
        return DenseResult(settings=DenseSettings.from_dict(header["settings"]),
                           peak_to_peak=float(header["peak_to_peak"]),
                           n_classes=int(header["n_classes"]),
                           n_nonfinite=int(header.get("n_nonfinite", 0)),
                           provenance=Provenance.from_dict(header.get("provenance", {})),
                           **arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise ShiftlabError(f"{path} has a damaged header ({exc})") from exc


def _eq_t(peak_to_peak: float, diff_sq, values):
    diff_sq = np.asarray(diff_sq, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = diff_sq / values
        value = 20 * np.log10(peak_to_peak) - 10 * np.log10(mse)
        value = np.where(mse == 0, np.inf, value)
        return np.where(values > 0, value, np.nan)


def _finite_mean(values: np.ndarray) -> float:
    """Mean of the non-NaN values (inf kept: a PSNR of equal maps); NaN when none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan
