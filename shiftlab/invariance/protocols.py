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

Scale-out and resume: under ``torchrun`` each rank runs its share of the images (a stream from
``image_batches(..., shard=True)`` decodes only that share; any other stream is filtered to
images r, r+N, ...) and the per-image rows of every epoch are gathered, so every rank ends with
the result of a single process. With ``checkpoint=PATH`` the rows of each completed epoch are
saved (by rank 0), and ``resume=True`` continues after the last completed one; this is exact
because the offsets of an image depend on (seed, epoch, image) only.

A tiny classifier (it flattens its feature map: not shift-invariant) on 32 px windows of the
six shipped sample photos, decoded at R = 40 by a DataLoader; labels are made up:

>>> from torch.utils.data import DataLoader
>>> from shiftlab.data.sources import ImageDataset
>>> from shiftlab.data import sample_image_paths
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
>>> dataset = ImageDataset(sample_image_paths(), labels=[3, 3, 7, 1, 3, 3], size=40)
>>> loader = DataLoader(dataset, batch_size=3)
>>> consistency_protocol(model, loader, size=32, epochs=2).summary()["consistency"]
0.75
"""
from __future__ import annotations

import collections.abc
import os
import time
import warnings
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..checks import check_model_has_data, split_batch
from ..defaults import PROTOCOLS as DEFAULT_PROTOCOLS
from ..equivariance.engine import evaluation_mode, resolve_device
from ..errors import ShiftlabError, UsageError
from .grid import (check_finite, classifier_logits, given_provenance, measured_provenance,
                   model_name, top_class)
from .grid_result import INVALID
from ..results.progress import EpochProgress
from ..data.sources import ImageBatch
from ..results.provenance import Provenance
from .protocol_result import DiagonalResult, ProtocolResult, ProtocolSettings, load_protocol

__all__ = ["DiagonalResult", "PROTOCOLS", "ProtocolResult", "ProtocolSettings",
           "consistency_protocol", "diagonal_protocol", "load_protocol"]

PROTOCOLS = tuple(p for p in DEFAULT_PROTOCOLS if p != "grid")  # the streamed ones
Checkpoint = Union[str, "os.PathLike[str]", None]


def consistency_protocol(model: nn.Module, batches: Iterable, *, size: int = 224, epochs: int = 1,
                         seed: int = 0, device: Union[str, torch.device, None] = "auto",
                         progress: Optional[bool] = None, provenance: Optional[Provenance] = None,
                         meta: Optional[dict] = None, n_bootstrap: int = 1000,
                         confidence: float = 0.95, checkpoint: Checkpoint = None,
                         resume: bool = False, resume_key: Optional[dict] = None) -> ProtocolResult:
    """The paper's consistency: two random ``size`` windows per image and epoch, one forward each.

    Args:
        model: a classifier returning (B, classes) logits; run in eval mode (restored after).
        batches: re-iterable (for epochs > 1) of ``(images, labels)`` or bare ``images``, with
            images (B, C, R, R) already resized and centre-cropped, labels (B,) class indices;
            the same images in the same order every epoch (a DataLoader with shuffle=False).
        size: the window side; offsets per axis are uniform in 0..R−size−1.
        epochs: passes over the images; n_pairs = images × epochs.
        seed: the offsets of image i in epoch e depend on (seed, e, i) only — not on batching
            or torchrun sharding — and the bootstrap. i is the image's position in the source
            (``ImageBatch.indices`` for shiftlab's streams, else its place in the stream).
        device, progress, provenance, meta: as for :func:`shiftlab.measure_invariance` (the
            result's provenance gets the number of images, seconds, device and versions).
        checkpoint: a file for the rows of each completed epoch (written atomically, by rank 0);
            ``resume=True`` continues from it (a missing file starts at epoch 0), refused when
            the settings, the weights or the run's identity differ, naming what differs. The
            identity is ``resume_key`` when given (the pipeline passes the model spec, seed,
            images, padding and source), else what ``provenance`` says was measured (its
            fields but those the measurement fills) and ``meta``.

    Example:
        The six shipped sample photos at R = 40 as one batch (a list is re-iterable), with
        made-up labels, and a tiny classifier that sees 32 px windows:

        >>> from shiftlab.data import load_images, sample_image_paths
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> images = load_images(sample_image_paths(), size=40).tensor
        >>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]
        >>> result = consistency_protocol(net, batches, size=32, epochs=5)
        >>> result.summary()["consistency"], result.n_pairs, result.settings.n_offsets
        (0.8, 30, (8, 8))
    """
    model, device, named = _prepare(model, device, provenance, meta, size, epochs, n_bootstrap,
                                    confidence)
    name, started = model_name(model, named), time.perf_counter()
    saved = _progress(checkpoint, "zhang2019", size, seed, 0, model,
                      _identity(provenance, meta, resume_key))
    done = _restore(saved, resume, epochs)
    with evaluation_mode(model, name):
        for epoch, stream in _passes(batches, epochs, len(done), progress):
            rows, canvas, failure = [], _canvas_of(done), None
            try:
                for ids, images, target in stream:
                    canvas = _check_canvas(images, canvas, size, 1)
                    draws = _window_offsets(seed, epoch, ids, np.subtract(canvas, size))
                    pair_top, pair_prob = [], []
                    for first in (0, 2):  # one forward per window: 2 per image and epoch
                        windows = torch.stack([img[:, oh:oh + size, ow:ow + size] for img, (oh, ow)
                                               in zip(images, draws[:, first:first + 2].tolist())])
                        top, prob = _predict(model, windows, target, device)
                        pair_top.append(top)
                        pair_prob.append(prob)
                    rows.append(_row(ids, target, canvas, offsets=draws,
                                     predictions=np.stack(pair_top, 1),
                                     probability=np.stack(pair_prob, 1)))
            except ShiftlabError as exc:  # raised on every rank by _merge, not left waiting
                failure = exc
            done.append(_merge(rows, done[0] if done else None, failure))
            _save(saved, done)
    predictions = np.concatenate([record["predictions"] for record in done])
    check_finite(name, int((predictions == INVALID).sum()), predictions.size)
    settings = ProtocolSettings("zhang2019", int(size), _canvas_of(done), int(epochs), int(seed), 0,
                                int(n_bootstrap), float(confidence), _padding(model))
    image = np.arange(len(done[0]["ids"]))  # images numbered in source order, skips closed up
    result = ProtocolResult(settings=settings, image=np.tile(image, epochs),
                            offsets=np.concatenate([record["offsets"] for record in done]),
                            predictions=predictions,
                            probability=np.concatenate([record["probability"] for record in done]),
                            labels=done[0]["labels"],
                            provenance=measured_provenance(named, n_images=len(image),
                                                           started=started, device=device))
    _warn_uninformative(result, name)
    return result


def diagonal_protocol(model: nn.Module, batches: Iterable, *, size: int = 224, max_offset: int = 32,
                      device: Union[str, torch.device, None] = "auto",
                      progress: Optional[bool] = None, provenance: Optional[Provenance] = None,
                      meta: Optional[dict] = None, n_bootstrap: int = 1000,
                      confidence: float = 0.95, seed: int = 0, checkpoint: Checkpoint = None,
                      resume: bool = False, resume_key: Optional[dict] = None) -> DiagonalResult:
    """The paper's diagonal: the ground-truth class probability at windows (t, t), t = 0..max_offset.

    ``batches`` yields ``(images, labels)`` with images (B, C, R, R), R ≥ size + max_offset;
    one forward of B windows per t. The paper: R = 256, size = 224, max_offset = 32 (33 steps).
    ``seed`` seeds only the bootstrap. ``provenance``, ``meta``, ``checkpoint``, ``resume`` and
    ``resume_key`` as for :func:`consistency_protocol` (one pass: a finished run's file is
    reused whole).

    Example:
        >>> from shiftlab.data import load_images, sample_image_paths
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> images = load_images(sample_image_paths(), size=40).tensor   # R = 32 + 8
        >>> batches = [(images, torch.tensor([3, 3, 7, 1, 3, 3]))]
        >>> result = diagonal_protocol(net, batches, size=32, max_offset=8)
        >>> result.mean_curve.shape
        (9,)
        >>> result.mean_curve.round(3)
        array([0.178, 0.18 , 0.176, 0.187, 0.194, 0.199, 0.183, 0.188, 0.199])
    """
    if isinstance(max_offset, bool) or int(max_offset) != max_offset or max_offset < 0:
        raise UsageError(f"max_offset must be an integer >= 0, got {max_offset}")
    model, device, named = _prepare(model, device, provenance, meta, size, 1, n_bootstrap,
                                    confidence)
    name, started = model_name(model, named), time.perf_counter()
    saved = _progress(checkpoint, "diagonal", size, seed, int(max_offset), model,
                      _identity(provenance, meta, resume_key))
    done = _restore(saved, resume, 1)
    steps = range(int(max_offset) + 1)
    with evaluation_mode(model, name):
        for _, stream in _passes(batches, 1, len(done), progress):
            rows, canvas, failure = [], None, None
            try:
                for ids, images, target in stream:
                    if target is None:
                        raise UsageError("the diagonal protocol needs labels: batches must yield"
                                         " (images, labels)")
                    canvas = _check_canvas(images, canvas, size + int(max_offset), 0)
                    outputs = [_predict(model, images[..., t:t + size, t:t + size], target, device)
                               for t in steps]
                    rows.append(_row(ids, target, canvas,
                                     predictions=np.stack([top for top, _ in outputs], 1),
                                     probability=np.stack([prob for _, prob in outputs], 1)))
            except ShiftlabError as exc:  # raised on every rank by _merge, not left waiting
                failure = exc
            done.append(_merge(rows, None, failure))
            _save(saved, done)
    record = done[0]
    check_finite(name, int((record["predictions"] == INVALID).sum()), record["predictions"].size)
    settings = ProtocolSettings("diagonal", int(size), _canvas_of(done), 1, int(seed),
                                int(max_offset), int(n_bootstrap), float(confidence),
                                _padding(model))
    result = DiagonalResult(settings=settings, image=np.arange(len(record["ids"])),
                            offsets=np.arange(int(max_offset) + 1),
                            predictions=record["predictions"], probability=record["probability"],
                            labels=record["labels"],
                            provenance=measured_provenance(named, n_images=len(record["ids"]),
                                                           started=started, device=device))
    _warn_uninformative(result, name)
    return result


def _prepare(model, device, provenance, meta, size, epochs, n_bootstrap, confidence):
    """The model on its device, the device, and the caller's provenance (``meta`` folded in)."""
    for label, value in (("size", size), ("epochs", epochs), ("n_bootstrap", n_bootstrap)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise UsageError(f"{label} must be a positive integer, got {value}")
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be between 0 and 1, got {confidence}")
    device = resolve_device(device)
    check_model_has_data(model)
    return model.to(device), device, given_provenance(provenance, meta)


def _padding(model: nn.Module) -> str:
    return str(getattr(model, "shiftlab_padding", "as-trained"))


def _window_offsets(seed: int, epoch: int, ids: np.ndarray, bounds) -> np.ndarray:
    """(n, 4) offsets (oh1, ow1, oh2, ow2) of images ``ids`` in ``epoch``, each uniform in
    0..bound−1. Image i takes uniform doubles 4i..4i+3 of the stream seeded by (seed, epoch)
    (one 64-bit draw each), so its offsets do not depend on batching or sharding."""
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))
    generator, position = np.random.Generator(bits), 0
    uniform = np.empty((len(ids), 4))
    for row, index in enumerate(ids.tolist()):
        if index < position:  # out of order: start the stream again
            bits = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))
            generator, position = np.random.Generator(bits), 0
        bits.advance(4 * (index - position))
        uniform[row] = generator.random(4)
        position = index + 1
    return np.floor(uniform * np.tile(bounds, 2)).astype(np.int64)


def _passes(batches: Iterable, epochs: int, first: int, progress: Optional[bool]
            ) -> Iterator[tuple[int, Iterator]]:
    """(epoch, this rank's (ids, images, labels) batches) for the epochs from ``first`` on,
    under one progress bar that counts images (rank 0's)."""
    if epochs - first > 1 and isinstance(batches, collections.abc.Iterator):
        raise UsageError("epochs > 1 needs batches that can be iterated again (a DataLoader or a"
                         " list), not a generator")
    per_epoch = getattr(batches, "total", None)
    if per_epoch is None and hasattr(getattr(batches, "dataset", None), "__len__"):
        per_epoch = len(batches.dataset)
    if distributed.active() and not getattr(batches, "sharded", False):
        per_epoch = None  # filtered here: this rank's count is not known up front
    show = progress if distributed.is_main() else False
    bar = tqdm(total=per_epoch * (epochs - first) if per_epoch else None, desc="protocol",
               unit="image", leave=False, disable=None if show is None else not show)
    with bar:
        for epoch in range(first, epochs):
            bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}", refresh=False)
            yield epoch, _mine(batches, bar)


def _mine(batches: Iterable, bar: tqdm) -> Iterator[tuple[np.ndarray, torch.Tensor, Optional[torch.Tensor]]]:
    """(source positions, images, labels) of this rank's images, batch by batch."""
    keep_all = getattr(batches, "sharded", False) or not distributed.active()
    start = 0
    for item in batches:
        images, target = _split(item)
        ids = np.asarray(item.indices, dtype=np.int64) if isinstance(item, ImageBatch) else \
            np.arange(start, start + len(images))
        start += len(images)
        if not keep_all:
            keep = distributed.owned(ids)
            ids, images = ids[keep], images[torch.from_numpy(keep)]
            target = None if target is None else target[torch.from_numpy(keep)]
        if len(ids):
            yield ids, images, target
            bar.update(len(ids))
    if start == 0 and not getattr(batches, "sharded", False):  # a rank's share may be empty
        raise UsageError("the batches hold no images")


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


def _row(ids: np.ndarray, target: Optional[torch.Tensor], canvas, **arrays) -> dict:
    return {"ids": ids, "labels": None if target is None else target.numpy(), "canvas": canvas,
            **arrays}


def _merge(rows: list[dict], first: Optional[dict], failure: Optional[ShiftlabError]) -> dict:
    """One epoch's rows of every rank, in source order; checked against epoch 0 (``first``).

    A rank's ``failure`` is raised on every rank (the lowest rank's, if several failed), so
    no rank is left waiting in a collective for one that gave up.
    """
    gathered = [part for parts in distributed.gather_checked(rows, failure) for part in parts]
    if not gathered:
        raise UsageError("the batches hold no images")
    canvases = {tuple(part["canvas"]) for part in gathered}
    if len(canvases) > 1:
        raise UsageError(f"batches have images of {' and '.join(map(str, sorted(canvases)))};"
                         " resize and centre-crop every image to the same R×R")
    ids = np.concatenate([part["ids"] for part in gathered])
    order = np.argsort(ids, kind="stable")
    record = {"ids": ids[order], "canvas": canvases.pop(), "labels": None}
    if all(part["labels"] is not None for part in gathered):
        record["labels"] = np.concatenate([part["labels"] for part in gathered])[order].astype(np.int64)
    for name in gathered[0]:
        if name not in record:
            record[name] = np.concatenate([part[name] for part in gathered])[order]
    if first is not None and not (np.array_equal(first["ids"], record["ids"]) and _same(
            first["labels"], record["labels"])):
        raise UsageError("the batches changed between epochs; iterate the same images in the same"
                         " order (DataLoader(..., shuffle=False))")
    return record


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _canvas_of(done: list[dict]) -> Optional[tuple[int, int]]:
    return tuple(int(v) for v in done[0]["canvas"]) if done else None


def _identity(provenance: Optional[Provenance], meta: Optional[dict],
              resume_key: Optional[dict]) -> dict:
    """What a resumed run must share with the interrupted one beyond the protocol settings:
    ``resume_key`` when given, else the provenance's identity fields and ``meta``."""
    if resume_key is not None:
        return dict(resume_key)
    return {**(provenance.identity() if provenance is not None else {}), **(meta or {})}


def _progress(checkpoint: Checkpoint, protocol: str, size: int, seed: int, max_offset: int,
              model: nn.Module, identity: dict) -> Optional[EpochProgress]:
    if checkpoint is None:
        return None
    # the protocol's own settings win over a same-named identity field (a provenance's seed is
    # the model's; the pipeline's is the same number)
    identity = {**identity, "protocol": protocol, "size": int(size), "seed": int(seed),
                "max_offset": int(max_offset)}
    return EpochProgress(checkpoint, model, identity)


def _restore(saved: Optional[EpochProgress], resume: bool, epochs: int) -> list[dict]:
    """The completed epochs to continue from (rank 0 reads; every rank gets them)."""
    if saved is None or not resume:
        return []
    found, failure = [], None
    if distributed.is_main():
        try:
            found = saved.restore()
        except ShiftlabError as exc:
            failure = exc
    return distributed.broadcast_checked(found, failure)[:epochs]


def _save(saved: Optional[EpochProgress], done: list[dict]) -> None:
    if saved is not None and distributed.is_main():
        saved.save(done)


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


def _warn_uninformative(result: Union[ProtocolResult, DiagonalResult], name: str) -> None:
    if result.uninformative:
        warnings.warn(f"{name}: {result.uninformative}", stacklevel=3)

