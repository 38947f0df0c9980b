"""The seed paper's ImageNet protocols (Zhang, ICML 2019, Sec. 4), on any stream of batches.

Both take images already resized to the shorter side R and centre-cropped R×R (the paper: 256),
and crop ``size``×``size`` windows (the paper: 224) out of them:

* :func:`consistency_protocol` ("zhang2019"): per image and epoch, two windows at independent
  random offsets (oh, ow), each coordinate uniform in 0..R−size−1 (the paper's evaluation draws
  ``randint(32)`` for R = 256, size = 224: 0..31, so the window at offset 32 is never drawn);
  consistency is P[both windows get the same top-1 class] over images × epochs pairs.
* :func:`diagonal_protocol`: windows at (t, t), t = 0..max_offset (the paper: 33 windows,
  t = 0..32), and the probability of the ground-truth class along t per image.

Differences from the paper's evaluation code, on purpose: offsets are drawn per image (the
paper draws one offset pair per batch, shared by its images: same expectation, but pairs of one
batch are not independent); the interval is a bootstrap over images; NaN/Inf outputs are left
out and counted. Streaming: one batch in memory at a time, only per-image numbers are kept.

>>> loader = DataLoader(ImageFolder("val", transform), batch_size=64)   # doctest: +SKIP
>>> consistency_protocol(model, loader, epochs=5).summary()["consistency"]   # doctest: +SKIP
"""
from __future__ import annotations

import collections.abc
import math
import os
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .checks import split_batch
from .defaults import PROTOCOLS as DEFAULT_PROTOCOLS
from .engine import resolve_device
from .errors import ShiftlabError, UsageError, one_line
from .files import read_archive, write_archive
from .invariance import (check_finite, classifier_logits, evaluation_mode, model_name,
                         top_class)
from .invariance_result import INVALID, bootstrap_interval
from .provenance import NamedByMeta

__all__ = ["DiagonalResult", "PROTOCOLS", "ProtocolResult", "ProtocolSettings",
           "consistency_protocol", "diagonal_protocol", "load_protocol"]

PROTOCOLS = tuple(p for p in DEFAULT_PROTOCOLS if p != "grid")  # the streamed ones
FORMAT_VERSION = 1
_KIND = "shiftlab.protocol"
_ARRAYS = ("image", "offsets", "predictions", "probability")


@dataclass(frozen=True)
class ProtocolSettings:
    """What defines a protocol run (saved with it). ``canvas`` is the input (R_h, R_w)."""

    protocol: str
    size: int
    canvas: tuple[int, int]
    epochs: int = 1
    seed: int = 0
    max_offset: int = 0
    n_bootstrap: int = 1000
    confidence: float = 0.95

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
                   n_bootstrap=int(data["n_bootstrap"]), confidence=float(data["confidence"]))


@dataclass
class _Saved(NamedByMeta):
    """Save/load shared by the two results: arrays + JSON header in one ``.npz``, no pickle."""

    settings: ProtocolSettings
    image: np.ndarray
    offsets: np.ndarray
    predictions: np.ndarray
    probability: np.ndarray
    labels: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)

    @property
    def uninformative(self) -> Optional[str]:
        """'consistency is uninformative: every prediction is class K' when the finite
        predictions are all one class K; None otherwise."""
        classes = np.unique(self.predictions[self.predictions != INVALID])
        if len(classes) != 1:
            return None
        return f"consistency is uninformative: every prediction is class {int(classes[0])}"

    @property
    def n_nonfinite(self) -> int:
        """Forward outputs (one per window) whose logits held NaN or Inf; left out everywhere."""
        return int((self.predictions == INVALID).sum())

    def _bootstrap(self, successes, trials):
        return bootstrap_interval(successes, trials, n_resamples=self.settings.n_bootstrap,
                                  confidence=self.settings.confidence, seed=self.settings.seed)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON header, no pickle) atomically.

        >>> result.save("runs/zhang2019/protocol-resnet18.npz")   # doctest: +SKIP
        """
        header = {"format": FORMAT_VERSION, "kind": _KIND, "settings": asdict(self.settings),
                  "meta": self.meta}
        arrays = {name: getattr(self, name) for name in _ARRAYS + ("labels",)}
        return write_archive(path, header, arrays)


@dataclass
class ProtocolResult(_Saved):
    """The paper's consistency protocol: P pairs = images × epochs, two windows each.

    Arrays: ``image`` (P,) the image of each pair (epoch-major: pair e·N + i is image i in epoch
    e); ``offsets`` (P, 4) as (oh1, ow1, oh2, ow2); ``predictions`` (P, 2) top-1 of both
    windows (-1: non-finite logits); ``probability`` (P, 2) the ground-truth class's softmax
    probability (NaN without labels); ``labels`` (N,) or None.

    >>> result.consistency, result.consistency_interval, result.n_pairs   # doctest: +SKIP
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

    >>> result.mean_curve      # (D,) mean over images          # doctest: +SKIP
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

    >>> result = load_protocol("runs/zhang2019/protocol-resnet18.npz")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no protocol file at {path}; pass a protocol-<model>.npz written by"
                            " 'shiftlab consistency --protocol'")
    header, arrays = read_archive(path, _ARRAYS, ("labels",), what="protocol")
    labels = arrays.pop("labels", None)
    try:
        if header.get("kind") != _KIND or header.get("format") != FORMAT_VERSION:
            raise ValueError(f"kind {header.get('kind')!r}, format {header.get('format')!r}")
        settings = ProtocolSettings.from_dict(header["settings"])
    except Exception as exc:
        raise ShiftlabError(f"{path} is not a shiftlab protocol file of format {FORMAT_VERSION}"
                            f" ({type(exc).__name__}: {one_line(exc)}); re-run the protocol") from exc
    kind = DiagonalResult if settings.protocol == "diagonal" else ProtocolResult
    return kind(settings=settings, labels=labels, meta=header.get("meta", {}), **arrays)


# -- running the protocols -----------------------------------------------------------------
def consistency_protocol(model: nn.Module, batches: Iterable, *, size: int = 224, epochs: int = 1,
                         seed: int = 0, device: Union[str, torch.device, None] = "auto",
                         progress: Optional[bool] = None, meta: Optional[dict] = None,
                         n_bootstrap: int = 1000, confidence: float = 0.95) -> ProtocolResult:
    """The paper's consistency: two random ``size`` windows per image and epoch, one forward each.

    Args:
        model: a classifier returning (B, classes) logits; run in eval mode (restored after).
        batches: re-iterable (for epochs > 1) of ``(images, labels)`` or bare ``images``, with
            images (B, C, R, R) already resized and centre-cropped, labels (B,) class indices;
            the same images in the same order every epoch (a DataLoader with shuffle=False).
        size: the window side; offsets per axis are uniform in 0..R−size−1.
        epochs: passes over the images; n_pairs = images × epochs.
        seed: the offsets of image i in epoch e depend on (seed, e, i) only — not on batching —
            and the bootstrap.
        device, progress, meta: as for :func:`shiftlab.measure_invariance`.

    Example:
        >>> result = consistency_protocol(net, loader, size=224, epochs=5)   # doctest: +SKIP
        >>> result.summary()["consistency"], result.n_pairs                  # doctest: +SKIP
    """
    model, device, name = _prepare(model, device, meta, size, epochs, n_bootstrap, confidence)
    image, offsets, predictions, probability, labels = [], [], [], [], []
    canvas = None
    with evaluation_mode(model, name):
        for epoch, start, images, target in _stream(batches, epochs, progress, labels):
            canvas = _check_canvas(images, canvas, size, 1)
            rng = _epoch_rng(seed, epoch, start)
            draws = np.floor(rng.random((len(images), 4)) * np.tile(np.subtract(canvas, size), 2))
            draws = draws.astype(np.int64)
            pair_top, pair_prob = [], []
            for first in (0, 2):  # one forward per window: 2 per image and epoch
                windows = torch.stack([img[:, oh:oh + size, ow:ow + size] for img, (oh, ow)
                                       in zip(images, draws[:, first:first + 2].tolist())])
                top, prob = _predict(model, windows, target, device)
                pair_top.append(top)
                pair_prob.append(prob)
            image.append(np.arange(start, start + len(images)))
            offsets.append(draws)
            predictions.append(np.stack(pair_top, 1))
            probability.append(np.stack(pair_prob, 1))
    predictions = np.concatenate(predictions)
    check_finite(name, int((predictions == INVALID).sum()), predictions.size)
    settings = ProtocolSettings("zhang2019", int(size), canvas, int(epochs), int(seed), 0,
                                int(n_bootstrap), float(confidence))
    result = ProtocolResult(settings=settings, image=np.concatenate(image),
                            offsets=np.concatenate(offsets), predictions=predictions,
                            probability=np.concatenate(probability), labels=_labels(labels),
                            meta=_meta(meta, device))
    _warn_uninformative(result, name)
    return result


def diagonal_protocol(model: nn.Module, batches: Iterable, *, size: int = 224, max_offset: int = 32,
                      device: Union[str, torch.device, None] = "auto",
                      progress: Optional[bool] = None, meta: Optional[dict] = None,
                      n_bootstrap: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> DiagonalResult:
    """The paper's diagonal: the ground-truth class probability at windows (t, t), t = 0..max_offset.

    ``batches`` yields ``(images, labels)`` with images (B, C, R, R), R ≥ size + max_offset;
    one forward of B windows per t. The paper: R = 256, size = 224, max_offset = 32 (33 steps).
    ``seed`` seeds only the bootstrap.

    Example:
        >>> result = diagonal_protocol(net, loader, size=224, max_offset=32)   # doctest: +SKIP
        >>> result.mean_curve.shape                                           # doctest: +SKIP
        (33,)
    """
    if isinstance(max_offset, bool) or int(max_offset) != max_offset or max_offset < 0:
        raise UsageError(f"max_offset must be an integer >= 0, got {max_offset}")
    model, device, name = _prepare(model, device, meta, size, 1, n_bootstrap, confidence)
    predictions, probability, labels = [], [], []
    canvas = None
    steps = range(int(max_offset) + 1)
    with evaluation_mode(model, name):
        for _, _, images, target in _stream(batches, 1, progress, labels):
            if target is None:
                raise UsageError("the diagonal protocol needs labels: batches must yield"
                                 " (images, labels)")
            canvas = _check_canvas(images, canvas, size + int(max_offset), 0)
            outputs = [_predict(model, images[..., t:t + size, t:t + size], target, device)
                       for t in steps]
            predictions.append(np.stack([top for top, _ in outputs], 1))
            probability.append(np.stack([prob for _, prob in outputs], 1))
    predictions = np.concatenate(predictions)
    check_finite(name, int((predictions == INVALID).sum()), predictions.size)
    settings = ProtocolSettings("diagonal", int(size), canvas, 1, int(seed), int(max_offset),
                                int(n_bootstrap), float(confidence))
    result = DiagonalResult(settings=settings, image=np.arange(len(predictions)),
                            offsets=np.arange(int(max_offset) + 1), predictions=predictions,
                            probability=np.concatenate(probability), labels=_labels(labels),
                            meta=_meta(meta, device))
    _warn_uninformative(result, name)
    return result


def _prepare(model, device, meta, size, epochs, n_bootstrap, confidence):
    for label, value in (("size", size), ("epochs", epochs), ("n_bootstrap", n_bootstrap)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise UsageError(f"{label} must be a positive integer, got {value}")
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be between 0 and 1, got {confidence}")
    device = resolve_device(device)
    return model.to(device), device, model_name(model, meta)


def _epoch_rng(seed: int, epoch: int, start: int) -> np.random.Generator:
    """The generator for the images from ``start`` on in ``epoch``: each uniform double uses one
    64-bit draw, so skipping ``4·start`` draws makes the offsets independent of batching."""
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))
    bits.advance(4 * int(start))
    return np.random.Generator(bits)


def _stream(batches: Iterable, epochs: int, progress: Optional[bool], labels: list
            ) -> Iterator[tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
    """(epoch, index of the batch's first image, images, labels) over every epoch; checks that
    each epoch brings the same labels in the same order, and fills ``labels`` from epoch 0."""
    if epochs > 1 and isinstance(batches, collections.abc.Iterator):
        raise UsageError("epochs > 1 needs batches that can be iterated again (a DataLoader or a"
                         " list), not a generator")
    # count images, so the bar shows images/s (the number to compare with a bare forward)
    per_epoch = getattr(batches, "total", None)
    if per_epoch is None and hasattr(getattr(batches, "dataset", None), "__len__"):
        per_epoch = len(batches.dataset)
    bar = tqdm(total=per_epoch * epochs if per_epoch else None, desc="protocol", unit="image",
               leave=False, disable=None if progress is None else not progress)
    with bar:
        for epoch in range(epochs):
            start, seen = 0, []
            for item in batches:
                images, target = _split(item)
                (labels if epoch == 0 else seen).append(None if target is None else target.numpy())
                yield epoch, start, images, target
                start += len(images)
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}", refresh=False)
                bar.update(len(images))
            if start == 0:
                raise UsageError("the batches hold no images")
            if epoch and not _same_labels(labels, seen):
                raise UsageError("the batches changed between epochs; iterate the same images in"
                                 " the same order (DataLoader(..., shuffle=False))")


def _split(item) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    images, target = split_batch(item)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UsageError("each batch must be images (B, C, R, R) or (images, labels)")
    if target is not None:
        target = torch.as_tensor(target).cpu().long().flatten()
        if target.shape[0] != images.shape[0] or (target < 0).any():
            raise UsageError(f"labels must be {images.shape[0]} class indices >= 0 per batch, got"
                             f" {tuple(target.shape)}")
    return images, target


def _same_labels(first: list, later: list) -> bool:
    if len(first) != len(later):
        return False
    return all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
               for a, b in zip(first, later))


def _check_canvas(images: torch.Tensor, canvas, needed: int, spare: int) -> tuple[int, int]:
    """The input's (R_h, R_w), the same for every batch and ≥ ``needed + spare``."""
    shape = (int(images.shape[-2]), int(images.shape[-1]))
    if canvas is not None and shape != tuple(canvas):
        raise UsageError(f"batches have images of {shape} and {tuple(canvas)}; resize and"
                         " centre-crop every image to the same R×R")
    if min(shape) < needed + spare:
        raise UsageError(f"images of {shape[0]}×{shape[1]} px are too small: need at least"
                         f" {needed + spare} px per side (resize the shorter side larger, e.g."
                         " 256 for 224 windows)")
    return shape


def _predict(model: nn.Module, windows: torch.Tensor, target: Optional[torch.Tensor],
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """top-1 (B,) with -1 for non-finite logits, and the label's probability (B,) (NaN without
    labels or where non-finite)."""
    with torch.inference_mode():
        logits = classifier_logits(model, windows.to(device, non_blocking=True))
        top = top_class(logits).cpu().numpy()
        if target is None:
            return top, np.full(len(top), np.nan)
        if int(target.max()) >= logits.shape[1]:
            raise UsageError(f"label {int(target.max())} is out of range: the model has"
                             f" {logits.shape[1]} classes")
        prob = torch.softmax(logits, 1).gather(1, target.to(logits.device)[:, None])[:, 0]
    prob = prob.cpu().numpy()
    return top, np.where(top == INVALID, np.nan, prob)


def _warn_uninformative(result: _Saved, name: str) -> None:
    if result.uninformative:
        warnings.warn(f"{name}: {result.uninformative}", stacklevel=3)


def _labels(parts: list) -> Optional[np.ndarray]:
    if not parts or any(p is None for p in parts):
        return None
    return np.concatenate(parts).astype(np.int64)


def _meta(meta: Optional[dict], device: torch.device) -> dict:
    return {**(meta or {}), "device": str(device), "shiftlab": __version__,
            "torch": torch.__version__, "python": platform.python_version()}
