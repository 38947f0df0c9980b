"""Results of the seed paper's ImageNet protocols (:mod:`shiftlab.invariance.protocols` runs them).

:class:`ProtocolResult` (two random windows per image and epoch) and :class:`DiagonalResult`
(windows along (t, t)) keep only per-image numbers, save as one ``.npz`` (arrays + a JSON
header, no pickle) and give the summary numbers with bootstrap-over-images intervals.

A tiny classifier on 32 px windows of the six shipped sample photos (R = 40, labels made up):

>>> import torch
>>> from torch import nn
>>> from shiftlab.data import load_images, sample_image_paths
>>> from shiftlab.invariance.protocols import consistency_protocol, diagonal_protocol
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
>>> images = load_images(sample_image_paths(), size=40).tensor
>>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]     # labels made up
>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> result = consistency_protocol(net, batches, size=32, epochs=5)
>>> path = result.save(f"{tmp.name}/protocol-tiny.npz")
>>> result = load_protocol(path)
>>> result.summary()["consistency"], result.n_pairs
(0.8, 30)
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import ShiftlabError, one_line
from ..results.files import read_archive, write_archive
from .grid_result import INVALID, bootstrap_interval, single_class
from ..results.provenance import Provenance, WithProvenance

__all__ = ["DiagonalResult", "ProtocolResult", "ProtocolSettings", "load_protocol"]

FORMAT_VERSION = 2  # 2: a typed provenance instead of an untyped ``meta`` dict
_READABLE = (1, 2)  # format 1's ``meta`` is read into the provenance
_KIND = "shiftlab.protocol"
_ARRAYS = ("image", "offsets", "predictions", "probability")


@dataclass(frozen=True)
class ProtocolSettings:
    """What defines a protocol run (saved with it). ``canvas`` is the input (R_h, R_w);
    ``padding`` the model's ``shiftlab_padding`` (``shiftlab.runs`` sets it)."""

    protocol: str
    size: int
    canvas: tuple[int, int]
    epochs: int = 1
    seed: int = 0
    max_offset: int = 0
    n_bootstrap: int = 1000
    confidence: float = 0.95
    padding: str = "as-trained"

    @property
    def n_offsets(self) -> tuple[int, int]:
        """zhang2019: how many offsets each axis draws from (R − size); diagonal: steps."""
        if self.protocol == "diagonal":
            return (self.max_offset + 1,) * 2
        return self.canvas[0] - self.size, self.canvas[1] - self.size

    @classmethod
    def from_dict(cls, data: dict) -> "ProtocolSettings":
        return cls(protocol=str(data["protocol"]), size=int(data["size"]),
                   canvas=tuple(int(v) for v in data["canvas"]), epochs=int(data["epochs"]),
                   seed=int(data["seed"]), max_offset=int(data["max_offset"]),
                   n_bootstrap=int(data["n_bootstrap"]), confidence=float(data["confidence"]),
                   padding=str(data.get("padding", "as-trained")))


@dataclass
class _Saved(WithProvenance):
    """Save/load shared by the two results: arrays + JSON header in one ``.npz``, no pickle;
    ``provenance`` as for a per-layer ``Result`` (``label``, ``with_label``, ``meta`` read it)."""

    settings: ProtocolSettings
    image: np.ndarray
    offsets: np.ndarray
    predictions: np.ndarray
    probability: np.ndarray
    labels: Optional[np.ndarray] = None
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def uninformative(self) -> Optional[str]:
        """'consistency is uninformative: every prediction is class K' when the finite
        predictions are all one class K; None otherwise."""
        only = single_class([self.predictions])
        if only is None:
            return None
        return f"consistency is uninformative: every prediction is class {only}"

    @property
    def n_nonfinite(self) -> int:
        """Forward outputs (one per window) whose logits held NaN or Inf; left out everywhere."""
        return int((self.predictions == INVALID).sum())

    def _bootstrap(self, successes, trials):
        return bootstrap_interval(successes, trials, n_resamples=self.settings.n_bootstrap,
                                  confidence=self.settings.confidence, seed=self.settings.seed)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON header, no pickle) atomically.

        >>> import torch
        >>> from torch import nn
        >>> from shiftlab.data import load_images, sample_image_paths
        >>> from shiftlab.invariance.protocols import consistency_protocol, diagonal_protocol
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> images = load_images(sample_image_paths(), size=40).tensor
        >>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]     # labels made up
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> result = consistency_protocol(net, batches, size=32, epochs=5)
        >>> result.save(f"{tmp.name}/protocol-tiny.npz").name
        'protocol-tiny.npz'
        """
        header = {"format": FORMAT_VERSION, "kind": _KIND, "settings": asdict(self.settings),
                  "provenance": self.provenance.to_dict()}
        arrays = {name: getattr(self, name) for name in _ARRAYS + ("labels",)}
        return write_archive(path, header, arrays)


@dataclass
class ProtocolResult(_Saved):
    """The paper's consistency protocol: P pairs = images × epochs, two windows each.

    Arrays: ``image`` (P,) the image of each pair (epoch-major: pair e·N + i is image i in epoch
    e); ``offsets`` (P, 4) as (oh1, ow1, oh2, ow2); ``predictions`` (P, 2) top-1 of both
    windows (-1: non-finite logits); ``probability`` (P, 2) the ground-truth class's softmax
    probability (NaN without labels); ``labels`` (N,) or None.

    >>> import torch
    >>> from torch import nn
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> from shiftlab.invariance.protocols import consistency_protocol, diagonal_protocol
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> images = load_images(sample_image_paths(), size=40).tensor
    >>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]     # labels made up
    >>> result = consistency_protocol(net, batches, size=32, epochs=5)
    >>> result.consistency, result.consistency_interval, result.n_pairs
    (0.8, (0.5333333333333333, 1.0), 30)
    >>> result.offsets[:2].tolist(), result.predictions[:2].tolist()   # pairs 0, 1: images 0, 1
    ([[5, 2, 0, 0], [6, 7, 4, 5]], [[3, 3], [3, 3]])
    >>> result.per_image_consistency
    array([1. , 1. , 0.4, 0.4, 1. , 1. ])
    """

    @property
    def n_images(self) -> int:
        return int(self.image.max()) + 1 if self.image.size else 0

    @property
    def n_pairs(self) -> int:
        return int(len(self.image))

    @property
    def valid(self) -> np.ndarray:
        """(P,) both windows of the pair gave finite logits."""
        return (self.predictions != INVALID).all(1)

    @property
    def agree(self) -> np.ndarray:
        """(P,) both windows got the same (finite) top-1 class."""
        return (self.predictions[:, 0] == self.predictions[:, 1]) & self.valid

    def _per_image(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.image, values.astype(np.float64), minlength=self.n_images)

    @property
    def per_image_consistency(self) -> np.ndarray:
        """(N,) share of an image's (finite) pairs that agree, over the epochs."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._per_image(self.agree) / self._per_image(self.valid)

    @property
    def consistency(self) -> float:
        """P[argmax f(window 1) = argmax f(window 2)] over the finite pairs."""
        valid = self.valid
        return float(self.agree[valid].mean()) if valid.any() else math.nan

    @property
    def consistency_interval(self) -> tuple[float, float]:
        """Bootstrap over images, an image's pairs (one per epoch) resampled within it."""
        return self._bootstrap(self._per_image(self.agree), self._per_image(self.valid))

    def _correct(self) -> tuple[np.ndarray, np.ndarray]:
        finite = self.predictions != INVALID
        return (self.predictions == self.labels[self.image][:, None]) & finite, finite

    @property
    def accuracy(self) -> Optional[float]:
        """Top-1 accuracy over every (finite) window, or None without labels."""
        if self.labels is None:
            return None
        correct, finite = self._correct()
        return float(correct.sum() / finite.sum()) if finite.any() else math.nan

    def summary(self) -> dict:
        """consistency, ci_low, ci_high, n_pairs, n_images, epochs, offsets_per_axis, accuracy,
        accuracy_ci_low, accuracy_ci_high (None without labels), n_nonfinite, n_bootstrap."""
        low, high = self.consistency_interval
        summary = {"protocol": "zhang2019", "consistency": self.consistency, "ci_low": low,
                   "ci_high": high, "n_pairs": self.n_pairs, "n_images": self.n_images,
                   "epochs": self.settings.epochs,
                   "offsets_per_axis": list(self.settings.n_offsets),
                   "accuracy": self.accuracy, "accuracy_ci_low": None, "accuracy_ci_high": None,
                   "n_nonfinite": self.n_nonfinite, "n_bootstrap": self.settings.n_bootstrap}
        if self.labels is not None:
            correct, finite = self._correct()
            summary["accuracy_ci_low"], summary["accuracy_ci_high"] = self._bootstrap(
                self._per_image(correct.sum(1)), self._per_image(finite.sum(1)))
        return summary


@dataclass
class DiagonalResult(_Saved):
    """The paper's diagonal protocol: windows at (t, t), t = 0..max_offset, per image.

    Arrays: ``image`` (N,); ``offsets`` (D,) the t values; ``predictions`` (N, D) top-1 (-1:
    non-finite); ``probability`` (N, D) ground-truth class probability (NaN where non-finite);
    ``labels`` (N,).

    >>> import torch
    >>> from torch import nn
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> from shiftlab.invariance.protocols import consistency_protocol, diagonal_protocol
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> images = load_images(sample_image_paths(), size=40).tensor
    >>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]     # labels made up
    >>> result = diagonal_protocol(net, batches, size=32, max_offset=8)
    >>> result.offsets.tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    >>> result.mean_curve.round(3)      # (D,) mean over images
    array([0.178, 0.18 , 0.176, 0.187, 0.194, 0.199, 0.183, 0.188, 0.199])
    """

    @property
    def n_images(self) -> int:
        return int(len(self.image))

    @property
    def mean_curve(self) -> np.ndarray:
        """(D,) ground-truth probability at each t, mean over the images finite there."""
        finite = np.isfinite(self.probability)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(finite, self.probability, 0.0).sum(0) / finite.sum(0)

    @property
    def accuracy_curve(self) -> np.ndarray:
        """(D,) top-1 accuracy at each t (finite outputs only)."""
        finite = self.predictions != INVALID
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((self.predictions == self.labels[:, None]) & finite).sum(0) / finite.sum(0)

    def summary(self) -> dict:
        """probability (mean over t and images), probability_min_t (lowest point of the mean
        curve), accuracy (pooled) with accuracy_ci_low/high, correct_all_offsets and
        consistent_all_offsets (share of images correct / with one prediction at every t),
        steps, n_images, n_nonfinite, n_bootstrap."""
        finite = self.predictions != INVALID
        correct = (self.predictions == self.labels[:, None]) & finite
        counted = finite.any(1)
        first = np.take_along_axis(self.predictions, finite.argmax(1)[:, None], 1)
        same = ((self.predictions == first) | ~finite).all(1)
        low, high = self._bootstrap(correct.sum(1), finite.sum(1))
        curve = self.mean_curve
        return {"protocol": "diagonal",
                "probability": float(np.nanmean(self.probability)) if counted.any() else math.nan,
                "probability_min_t": float(np.nanmin(curve)) if counted.any() else math.nan,
                "accuracy": float(correct.sum() / finite.sum()) if counted.any() else math.nan,
                "accuracy_ci_low": low, "accuracy_ci_high": high,
                "correct_all_offsets": float((correct | ~finite).all(1)[counted].mean())
                if counted.any() else math.nan,
                "consistent_all_offsets": float(same[counted].mean()) if counted.any() else math.nan,
                "steps": int(len(self.offsets)), "n_images": self.n_images,
                "n_nonfinite": self.n_nonfinite, "n_bootstrap": self.settings.n_bootstrap}


def load_protocol(path: Union[str, os.PathLike]) -> Union[ProtocolResult, DiagonalResult]:
    """Read a file written by ``ProtocolResult.save`` / ``DiagonalResult.save`` (no pickle).

    >>> import torch
    >>> from torch import nn
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> from shiftlab.invariance.protocols import consistency_protocol, diagonal_protocol
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> images = load_images(sample_image_paths(), size=40).tensor
    >>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]     # labels made up
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = diagonal_protocol(net, batches, size=32, max_offset=8).save(f"{tmp.name}/diag.npz")
    >>> result = load_protocol(path)
    >>> type(result).__name__, result.settings.protocol, result.summary()["steps"]
    ('DiagonalResult', 'diagonal', 9)
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no protocol file at {path}; pass a protocol-<model>.npz written by"
                            " 'shiftlab consistency --protocol'")
    header, arrays = read_archive(path, _ARRAYS, ("labels",), what="protocol")
    labels = arrays.pop("labels", None)
    try:
        if header.get("kind") != _KIND or header.get("format") not in _READABLE:
            raise ValueError(f"kind {header.get('kind')!r}, format {header.get('format')!r}")
        settings = ProtocolSettings.from_dict(header["settings"])
        if header["format"] >= 2:
            provenance = Provenance.from_dict(header["provenance"])
        else:
            settings, provenance = _from_meta(settings, header.get("meta") or {})
    except Exception as exc:
        raise ShiftlabError(f"{path} is not a shiftlab protocol file of format {FORMAT_VERSION}"
                            f" ({type(exc).__name__}: {one_line(exc)}); re-run the protocol") from exc
    kind = DiagonalResult if settings.protocol == "diagonal" else ProtocolResult
    return kind(settings=settings, labels=labels, provenance=provenance, **arrays)


def _from_meta(settings: ProtocolSettings, meta: dict) -> tuple[ProtocolSettings, Provenance]:
    """Settings and provenance of a format-1 file, whose header held an untyped ``meta`` dict:
    the pipeline's ``padding`` goes to the settings, its ``protocol`` (already there) is
    dropped; the rest (the source digest, the model spec, ...) stays in ``extra``."""
    provenance = Provenance.from_header_meta(meta)
    extra = dict(provenance.extra)
    if extra.get("protocol") == settings.protocol:
        del extra["protocol"]
    if "padding" in extra:
        settings = dataclasses.replace(settings, padding=str(extra.pop("padding")))
    return settings, provenance.replace(extra=extra)
