"""The result of :func:`shiftlab.invariance.measure_invariance`: settings, per-image predictions,
and the statistics derived from them (intervals, worst-case shares, warnings), with save/load.

Intervals are over *images*, the sampled unit (one image's shifts are not independent trials):
pooled numbers (pairwise consistency, consistency vs. reference, accuracy) get a seeded
two-stage bootstrap (:func:`bootstrap_interval`); per-shift numbers, one trial per image, a
Wilson interval with n = the number of images.

A prediction whose logits hold NaN or Inf is stored as class ``-1`` (probability NaN) and never
counts as agreement: it is left out of every statistic, and :attr:`InvarianceResult.n_nonfinite`
counts them.

>>> import tempfile
>>> import torch
>>> from torch import nn
>>> from shiftlab import ShiftGrid, load_images, measure_invariance, sample_image_paths
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
>>> images = load_images(sample_image_paths(), size=32).tensor
>>> tmp = tempfile.TemporaryDirectory()
>>> path = measure_invariance(model, images, ShiftGrid.square(8)).save(f"{tmp.name}/inv-tiny.npz")
>>> result = load_invariance(path)
>>> round(result.summary()["pairwise_ci_low"], 3), round(result.summary()["pairwise_ci_high"], 3)
(0.543, 0.881)
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from ..errors import ShiftlabError, UsageError, one_line
from ..results.files import read_archive, write_archive
from ..results.provenance import Provenance, WithProvenance
from ..equivariance.shifts import ShiftGrid

if TYPE_CHECKING:  # pandas is imported lazily: only tables need it
    import pandas

__all__ = ["InvarianceResult", "InvarianceSettings", "bootstrap_interval", "load_invariance",
           "uninformative_across", "wilson_interval"]

FORMAT_VERSION = 3  # 2: class -1 marks a non-finite output; bootstrap settings; 3: typed provenance
_READABLE = (1, 2, 3)  # 1 and 2 held an untyped ``meta`` dict: read into the provenance
_KIND = "shiftlab.invariance"
_ARRAYS = ("reference_argmax", "grid_argmax", "grid_prob", "diagonal_argmax", "diagonal_prob",
           "pairs")
INVALID = -1  # the class stored for an (image, shift) whose logits are not all finite


# -- statistics --------------------------------------------------------------------------
def wilson_interval(successes, n, confidence: float = 0.95):
    """Wilson score interval for a binomial proportion: (low, high), NaN where n = 0.

    Valid for independent trials only (one per image); pooled numbers use
    :func:`bootstrap_interval`. Works elementwise on arrays; scalars in, floats out.

    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be between 0 and 1, got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    k = np.asarray(successes, dtype=np.float64)
    total = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / total
        denominator = 1 + z * z / total
        centre = (p + z * z / (2 * total)) / denominator
        half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
        low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    low = np.where(k <= 0, 0.0, low)  # exact ends: rounding must not move them off 0 and 1
    high = np.where(k >= total, 1.0, high)
    low, high = np.where(total > 0, low, np.nan), np.where(total > 0, high, np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def bootstrap_interval(successes, trials, *, n_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0):
    """Two-stage percentile bootstrap of a pooled proportion Σ successes / Σ trials.

    ``successes`` and ``trials`` are per image, (N,) or (N, K) for K proportions sharing the
    image draws. Each resample draws N images with replacement, then resamples each drawn
    image's own trials with replacement (a Binomial(trials, successes / trials) draw): the
    interval carries the spread between images and the noise inside one. Seeded.

    Returns (low, high) as floats for (N,) input, (K,) arrays for (N, K); NaN without trials.

    >>> bootstrap_interval([3, 3, 3], [3, 3, 3])      # every image agrees on every pair
    (1.0, 1.0)
    """
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be between 0 and 1, got {confidence}")
    if isinstance(n_resamples, bool) or int(n_resamples) < 1:
        raise UsageError(f"n_resamples must be >= 1, got {n_resamples}")
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if k.shape != n.shape or k.ndim not in (1, 2) or (n < 0).any() or (k < 0).any() or (k > n).any():
        raise UsageError(f"successes and trials must be matching (N,) or (N, K) counts with"
                         f" 0 <= successes <= trials, got shapes {k.shape} and {n.shape}")
    single = k.ndim == 1
    k, n = k.reshape(len(k), -1), n.reshape(len(n), -1)
    n_images, n_columns = k.shape
    if n_images == 0 or not (n > 0).any():
        nan = np.full(n_columns, np.nan)
        return (math.nan, math.nan) if single else (nan, nan.copy())
    # images with the same (successes, trials) in every column are exchangeable: resample the
    # counts of each such type, then Σ of c draws of Binomial(n, p) is one Binomial(c·n, p)
    types, inverse, frequency = np.unique(np.concatenate([k, n], 1), axis=0, return_inverse=True,
                                          return_counts=True)
    k, n, inverse = types[:, :n_columns], types[:, n_columns:], inverse.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(n > 0, k / np.where(n > 0, n, 1), 0.0)
    mixed = (p > 0) & (p < 1)  # only these types have within-image noise to draw
    rng = np.random.default_rng(int(seed))
    estimates = np.empty((int(n_resamples), n_columns))
    n_types = len(types)
    chunk = max(1, min(int(n_resamples), 2_000_000 // max(1, n_images + n_types * n_columns)))
    for start in range(0, int(n_resamples), chunk):
        size = min(chunk, int(n_resamples) - start)
        if n_types <= 256:  # few types: draw their counts directly
            counts = rng.multinomial(n_images, frequency / n_images, size=size)
        else:
            drawn = inverse[rng.integers(0, n_images, (size, n_images))] + n_types * np.arange(size)[:, None]
            counts = np.bincount(drawn.ravel(), minlength=size * n_types).reshape(size, n_types)
        counts = counts.astype(np.float64)
        total, hits = counts @ n, counts @ np.where(mixed, 0.0, k)
        for column in np.flatnonzero(mixed.any(0)):
            which = mixed[:, column]
            draws = rng.binomial((counts[:, which] * n[which, column]).astype(np.int64),
                                 p[which, column])
            hits[:, column] += draws.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            estimates[start:start + size] = hits / total
    tail = 100 * (1 - confidence) / 2
    with np.errstate(invalid="ignore"):
        low, high = np.nanpercentile(estimates, [tail, 100 - tail], axis=0)
    low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
    return (float(low[0]), float(high[0])) if single else (low, high)


def single_class(arrays: Sequence[np.ndarray]) -> Optional[int]:
    """The one class every finite prediction has, or None (several, or none finite)."""
    classes = np.unique(np.concatenate([np.asarray(a).ravel() for a in arrays]))
    classes = classes[classes != INVALID]
    return int(classes[0]) if len(classes) == 1 else None


def uninformative_across(results: Sequence["InvarianceResult"]) -> Optional[str]:
    """A one-line warning when all models make the same predictions for every image and shift
    (consistency then tells them apart by nothing); None when they differ somewhere.

    >>> import torch
    >>> from torch import nn
    >>> from shiftlab import ShiftGrid, load_images, measure_invariance, sample_image_paths
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> images = load_images(sample_image_paths(), size=32).tensor
    >>> from shiftlab import antialias
    >>> base = measure_invariance(model, images, ShiftGrid.square(4))
    >>> antialiased = measure_invariance(antialias(model, 4), images, ShiftGrid.square(4))
    >>> uninformative_across([base, antialiased]) is None      # their predictions differ
    True
    >>> same = nn.Sequential(model, nn.Dropout()).eval()       # eval: dropout does nothing
    >>> with_dropout = measure_invariance(same, images, ShiftGrid.square(4))
    >>> uninformative_across([base, with_dropout])
    'consistency is uninformative: all 2 models predict the same class for every image and shift'
    """
    results = list(results)
    if len(results) < 2:
        return results[0].uninformative if results else None
    names = ("reference_argmax", "grid_argmax", "diagonal_argmax", "predictions")  # or protocols'
    first = [getattr(results[0], name, None) for name in names]
    for other in results[1:]:
        for a, b in zip(first, [getattr(other, name, None) for name in names]):
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return None
    return (f"consistency is uninformative: all {len(results)} models predict the same class for"
            " every image and shift")


# -- settings and result -----------------------------------------------------------------
@dataclass(frozen=True)
class InvarianceSettings:
    """What defines an output-level measurement (saved with the result)."""

    grid: ShiftGrid
    diagonal: ShiftGrid
    mode: str = "circular"
    size: tuple[int, int] = (224, 224)
    margin: int = 0
    n_pairs: int = 1000
    seed: int = 0
    n_bootstrap: int = 1000
    confidence: float = 0.95
    padding: str = "as-trained"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["grid"], data["diagonal"] = self.grid.to_dict(), self.diagonal.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "InvarianceSettings":
        return cls(grid=ShiftGrid.from_dict(data["grid"]),
                   diagonal=ShiftGrid.from_dict(data["diagonal"]), mode=data["mode"],
                   size=tuple(data["size"]), margin=int(data["margin"]),
                   n_pairs=int(data["n_pairs"]), seed=int(data["seed"]),
                   n_bootstrap=int(data.get("n_bootstrap", 1000)),
                   confidence=float(data.get("confidence", 0.95)),
                   padding=str(data.get("padding", "as-trained")))


@dataclass
class InvarianceResult(WithProvenance):
    """Per-image predictions under every shift, and the invariance numbers derived from them.

    Arrays (N images, S grid shifts, D diagonal steps, P pairs); class -1 / probability NaN mark
    an output with NaN or Inf, left out of every statistic:

    * ``reference_argmax`` (N,): argmax f(x) of the unshifted image.
    * ``grid_argmax`` (N, S), ``grid_prob`` (N, S): argmax f(T_δ x), and the softmax
      probability of the reference class, for each grid shift.
    * ``diagonal_argmax`` (N, D), ``diagonal_prob`` (N, D): the same along the diagonal sweep.
    * ``pairs`` (P, 3): the random pairs as (image, grid index of δ1, grid index of δ2).
    * ``labels`` (N,) class indices, or None.

    ``n_classes`` is the model's number of outputs (None when unknown) and ``provenance``
    (:class:`~shiftlab.results.provenance.Provenance`) where the model and images came from,
    as for a per-layer ``Result``; ``label``, ``with_label`` and the read-only ``meta`` view
    read it.

    >>> import torch
    >>> from torch import nn
    >>> from shiftlab import ShiftGrid, load_images, measure_invariance, sample_image_paths
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> images = load_images(sample_image_paths(), size=32).tensor
    >>> result = measure_invariance(model, images, ShiftGrid.square(8))
    >>> result.reference_argmax.tolist(), result.grid_argmax.shape, result.pairs.shape
    ([3, 3, 7, 1, 3, 3], (6, 64), (1000, 3))
    >>> result.to_frame().head(3).round(3)
        dh   dw  consistency  ci_low  ci_high  n  probability
    0  0.0  0.0          1.0    0.61      1.0  6        0.195
    1  0.0  1.0          1.0    0.61      1.0  6        0.190
    2  0.0  2.0          1.0    0.61      1.0  6        0.191
    >>> round(result.summary()["flip_rate"], 3)
    0.19
    """

    settings: InvarianceSettings
    reference_argmax: np.ndarray
    grid_argmax: np.ndarray
    grid_prob: np.ndarray
    diagonal_argmax: np.ndarray
    diagonal_prob: np.ndarray
    pairs: np.ndarray
    labels: Optional[np.ndarray] = None
    n_classes: Optional[int] = None
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def grid(self) -> ShiftGrid:
        return self.settings.grid

    @property
    def n_images(self) -> int:
        return int(self.reference_argmax.shape[0])

    def _bootstrap(self, successes, trials):
        return bootstrap_interval(successes, trials, n_resamples=self.settings.n_bootstrap,
                                  confidence=self.settings.confidence, seed=self.settings.seed)

    # -- validity --------------------------------------------------------------------
    @property
    def grid_valid(self) -> np.ndarray:
        """(N, S) whether both the shifted and the unshifted output of an image are finite."""
        return (self.grid_argmax != INVALID) & (self.reference_argmax[:, None] != INVALID)

    @property
    def n_nonfinite(self) -> int:
        """Number of (image, shift) forward passes whose logits held NaN or Inf (each counted
        once: the unshifted pass, the grid's other shifts, the sweep's own extra steps)."""
        grid_shifts = set(self.grid.shifts)
        own = [k for k, s in enumerate(self.grid.shifts) if tuple(s) != (0, 0)]
        extra = [k for k, s in enumerate(self.settings.diagonal.shifts)
                 if tuple(s) != (0, 0) and s not in grid_shifts]
        return int((self.reference_argmax == INVALID).sum()
                   + (self.grid_argmax[:, own] == INVALID).sum()
                   + (self.diagonal_argmax[:, extra] == INVALID).sum())

    @property
    def uninformative(self) -> Optional[str]:
        """A one-line warning when every finite prediction (all images, all shifts) is one class
        K: consistency is then 1 whatever the model does with shifts. None otherwise."""
        only = single_class([self.reference_argmax, self.grid_argmax, self.diagonal_argmax])
        if only is None:
            return None
        return f"consistency is uninformative: every prediction is class {only}"

    # -- per shift -------------------------------------------------------------------
    @property
    def agreement(self) -> np.ndarray:
        """(S,) number of images whose shifted argmax equals the unshifted one (finite only)."""
        return ((self.grid_argmax == self.reference_argmax[:, None]) & self.grid_valid).sum(0)

    @property
    def consistency(self) -> np.ndarray:
        """(S,) consistency vs. reference, P[argmax f(T_δ x) = argmax f(x)], per grid shift."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.agreement / self.grid_valid.sum(0)

    @property
    def consistency_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(S,) Wilson interval of :attr:`consistency`: one independent trial per image."""
        return wilson_interval(self.agreement, self.grid_valid.sum(0), self.settings.confidence)

    def _correct(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, S) correct, (N, S) finite: grid predictions against the labels."""
        valid = self.grid_argmax != INVALID
        return (self.grid_argmax == self.labels[:, None]) & valid, valid

    @property
    def accuracy(self) -> Optional[np.ndarray]:
        """(S,) top-1 accuracy per grid shift (finite outputs only), or None without labels."""
        if self.labels is None:
            return None
        correct, valid = self._correct()
        with np.errstate(invalid="ignore", divide="ignore"):
            return correct.sum(0) / valid.sum(0)

    @property
    def reference_accuracy(self) -> Optional[float]:
        """Top-1 accuracy on the unshifted images, or None without labels."""
        if self.labels is None:
            return None
        valid = self.reference_argmax != INVALID
        return float((self.reference_argmax == self.labels)[valid].mean()) if valid.any() else math.nan

    # -- worst case over the grid (Michaeli et al. 2023) -------------------------------
    @property
    def consistent_all_shifts(self) -> float:
        """Share of images whose top-1 is the unshifted one under every (finite) grid shift."""
        valid = self.grid_valid
        agree = (self.grid_argmax == self.reference_argmax[:, None]) | ~valid
        counted = valid.any(1)
        return float(agree.all(1)[counted].mean()) if counted.any() else math.nan

    @property
    def correct_all_shifts(self) -> Optional[float]:
        """Share of images classified correctly under every (finite) grid shift; None without
        labels."""
        if self.labels is None:
            return None
        correct, valid = self._correct()
        counted = valid.any(1)
        return float((correct | ~valid).all(1)[counted].mean()) if counted.any() else math.nan

    # -- pairs -----------------------------------------------------------------------
    @property
    def pair_valid(self) -> np.ndarray:
        """(P,) whether both outputs of each random pair are finite."""
        image, first, second = self.pairs.T
        return (self.grid_argmax[image, first] != INVALID) & (self.grid_argmax[image, second] != INVALID)

    @property
    def pair_agreement(self) -> np.ndarray:
        """(P,) whether the two shifts of each random pair give the same (finite) argmax."""
        image, first, second = self.pairs.T
        return (self.grid_argmax[image, first] == self.grid_argmax[image, second]) & self.pair_valid

    @property
    def pairwise_consistency(self) -> float:
        """The paper's consistency: fraction of the (finite) random pairs that agree."""
        valid = self.pair_valid
        return float(self.pair_agreement[valid].mean()) if valid.any() else math.nan

    @property
    def pairwise_interval(self) -> tuple[float, float]:
        """Bootstrap interval of :attr:`pairwise_consistency` over images (pairs resampled
        within each resampled image)."""
        image = self.pairs[:, 0]
        agree = np.bincount(image, self.pair_agreement, minlength=self.n_images)
        valid = np.bincount(image, self.pair_valid, minlength=self.n_images)
        return self._bootstrap(agree, valid)

    @property
    def pairwise_consistency_all_pairs(self) -> float:
        """The expectation the random pairs estimate: all S² ordered pairs of every image.

        For one image whose argmax takes class c at n_c of its S finite shifts, the share of
        agreeing ordered pairs (δ1, δ2), both drawn uniformly, is Σ_c (n_c / S)²; this is its
        mean over images. No sampling noise.
        """
        values = []
        for row in self.grid_argmax:
            row = row[row != INVALID]
            if row.size:
                counts = np.unique(row, return_counts=True)[1]
                values.append(float(((counts / row.size) ** 2).sum()))
        return float(np.mean(values)) if values else math.nan

    # -- diagonal sweep --------------------------------------------------------------
    @property
    def diagonal_steps(self) -> np.ndarray:
        """(D,) the sweep's position: t for a diagonal (t, t), the step index otherwise."""
        shifts = np.asarray(self.settings.diagonal.shifts, dtype=np.float64)
        return shifts[:, 0] if np.all(shifts[:, 0] == shifts[:, 1]) else np.arange(len(shifts), dtype=float)

    @property
    def flips(self) -> np.ndarray:
        """(N, D-1) whether the argmax changes between consecutive steps (False if either
        step is non-finite; see :attr:`flip_valid`)."""
        return (self.diagonal_argmax[:, 1:] != self.diagonal_argmax[:, :-1]) & self.flip_valid

    @property
    def flip_valid(self) -> np.ndarray:
        """(N, D-1) whether both outputs of a consecutive step are finite."""
        valid = self.diagonal_argmax != INVALID
        return valid[:, 1:] & valid[:, :-1]

    @property
    def flip_rate(self) -> float:
        """Fraction of consecutive (finite) sweep steps where the argmax changes; NaN if none."""
        valid = self.flip_valid
        return float(self.flips[valid].mean()) if valid.any() else math.nan

    @property
    def mac(self) -> float:
        """Mean absolute change of the reference class's probability between consecutive steps."""
        change = np.abs(np.diff(self.diagonal_prob, axis=1))
        change = change[np.isfinite(change)]
        return float(change.mean()) if change.size else math.nan

    @property
    def mean_probability(self) -> np.ndarray:
        """(D,) probability of the unshifted top class along the sweep, mean over finite images."""
        prob = self.diagonal_prob
        finite = np.isfinite(prob)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(finite, prob, 0.0).sum(0) / finite.sum(0)

    # -- tables ----------------------------------------------------------------------
    def to_frame(self) -> "pandas.DataFrame":
        """One row per grid shift: dh, dw, consistency, ci_low, ci_high (Wilson, one trial per
        image), n (images with finite outputs), probability (mean softmax probability of the
        unshifted top class) and accuracy (with labels)."""
        import pandas as pd

        shifts = np.asarray(self.grid.shifts, dtype=np.float64)
        low, high = self.consistency_interval
        prob = np.where(np.isfinite(self.grid_prob), self.grid_prob, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            probability = prob.sum(0) / np.isfinite(self.grid_prob).sum(0)
        frame = pd.DataFrame({
            "dh": shifts[:, 0], "dw": shifts[:, 1], "consistency": self.consistency,
            "ci_low": low, "ci_high": high, "n": self.grid_valid.sum(0),
            "probability": probability,
        })
        if self.labels is not None:
            frame["accuracy"] = self.accuracy
        return frame

    def summary(self) -> dict:
        """The headline numbers as a flat dict (JSON-friendly floats and ints).

        Keys: pairwise_consistency with pairwise_ci_low/high (bootstrap over images), n_pairs,
        pairwise_consistency_all_pairs, consistency_vs_reference (pooled over grid shifts) with
        its ci_low/high, consistency_vs_reference_min, consistent_all_shifts (share of images
        consistent under every shift), flip_rate, mac, diagonal_steps, step_px, accuracy
        (pooled over shifts) with accuracy_ci_low/high, accuracy_unshifted, accuracy_min,
        correct_all_shifts (share of images correct under every shift) — the accuracy keys None
        without labels — n_images, n_shifts, n_nonfinite, n_bootstrap.
        """
        low, high = self.pairwise_interval
        valid = self.grid_valid
        agree = (self.grid_argmax == self.reference_argmax[:, None]) & valid
        ref_low, ref_high = self._bootstrap(agree.sum(1), valid.sum(1))
        steps = self.diagonal_steps
        accuracy = self.accuracy
        summary = {
            "pairwise_consistency": self.pairwise_consistency,
            "pairwise_ci_low": low, "pairwise_ci_high": high, "n_pairs": int(len(self.pairs)),
            "pairwise_consistency_all_pairs": self.pairwise_consistency_all_pairs,
            "consistency_vs_reference": float(agree.sum() / valid.sum()) if valid.any() else math.nan,
            "consistency_vs_reference_ci_low": ref_low, "consistency_vs_reference_ci_high": ref_high,
            "consistency_vs_reference_min": float(np.nanmin(self.consistency)) if valid.any() else math.nan,
            "consistent_all_shifts": self.consistent_all_shifts,
            "flip_rate": self.flip_rate, "mac": self.mac,
            "diagonal_steps": int(len(steps)),
            "step_px": float(np.diff(steps).min()) if len(steps) > 1 else math.nan,
            "accuracy": None, "accuracy_ci_low": None, "accuracy_ci_high": None,
            "accuracy_unshifted": self.reference_accuracy,
            "accuracy_min": None if accuracy is None else float(np.nanmin(accuracy)),
            "correct_all_shifts": self.correct_all_shifts,
            "n_images": self.n_images, "n_shifts": len(self.grid),
            "n_nonfinite": self.n_nonfinite, "n_bootstrap": self.settings.n_bootstrap,
        }
        if self.labels is not None:
            correct, finite = self._correct()
            summary["accuracy"] = float(correct.sum() / finite.sum()) if finite.any() else math.nan
            summary["accuracy_ci_low"], summary["accuracy_ci_high"] = self._bootstrap(
                correct.sum(1), finite.sum(1))
        return summary

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON header, no pickle) atomically: temp file, then rename."""
        header = {"format": FORMAT_VERSION, "kind": _KIND, "settings": self.settings.to_dict(),
                  "n_classes": self.n_classes, "provenance": self.provenance.to_dict()}
        arrays = {name: getattr(self, name) for name in _ARRAYS + ("labels",)}
        return write_archive(path, header, arrays)


def load_invariance(path: Union[str, os.PathLike]) -> InvarianceResult:
    """Read a result written by :meth:`InvarianceResult.save` (no pickle involved).

    >>> import tempfile
    >>> import torch
    >>> from torch import nn
    >>> from shiftlab import ShiftGrid, load_images, measure_invariance, sample_image_paths
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> images = load_images(sample_image_paths(), size=32).tensor
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = measure_invariance(model, images, ShiftGrid.square(4)).save(f"{tmp.name}/inv.npz")
    >>> result = load_invariance(path)
    >>> result.n_images, len(result.grid), result.n_classes, result.provenance.n_images
    (6, 16, 10, 6)
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no invariance file at {path}; pass an invariance-<model>.npz written"
                            " by 'shiftlab consistency'")
    header, arrays = read_archive(path, _ARRAYS, ("labels",), what="invariance")
    labels = arrays.pop("labels", None)
    if not isinstance(header, dict) or header.get("kind") != _KIND \
            or header.get("format") not in _READABLE:
        found = header.get("format") if isinstance(header, dict) else None
        raise ShiftlabError(f"{path} is not an invariance file of format {FORMAT_VERSION} (found"
                            f" {found}); re-run 'shiftlab consistency'")
    try:
        settings = InvarianceSettings.from_dict(header["settings"])
        if header["format"] >= 3:
            provenance = Provenance.from_dict(header["provenance"])
            n_classes = header.get("n_classes")
        else:
            settings, provenance, n_classes = _from_meta(settings, header.get("meta") or {})
        n_classes = None if n_classes is None else int(n_classes)
    except ShiftlabError as exc:
        raise ShiftlabError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShiftlabError(f"{path} has an incomplete or damaged header ({type(exc).__name__}:"
                            f" {one_line(exc)}); re-run the measurement") from exc
    return InvarianceResult(settings=settings, labels=labels, n_classes=n_classes,
                            provenance=provenance, **arrays)


def _from_meta(settings: InvarianceSettings, meta: dict
               ) -> tuple[InvarianceSettings, Provenance, Optional[int]]:
    """Settings, provenance and number of classes of a format 1-2 file, whose header held an
    untyped ``meta`` dict: a Provenance dict (or free-form keys) plus ``n_classes`` and the
    pipeline's ``padding``, which now have their own places."""
    provenance = Provenance.from_header_meta(meta)
    extra = dict(provenance.extra)
    n_classes = extra.pop("n_classes", None)
    if "padding" in extra:
        settings = dataclasses.replace(settings, padding=str(extra.pop("padding")))
    return settings, provenance.replace(extra=extra), n_classes
