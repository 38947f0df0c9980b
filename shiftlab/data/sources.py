"""Streamed image sources: decode a dataset batch by batch, never all of it at once.

:func:`image_batches` turns a source into batches of preprocessed images, decoded in DataLoader
workers. A source is a folder (its images, or its class folders), a ``file,label`` CSV, a list of
files, :class:`~shiftlab.data.labels.LabelledImages`, or any torch ``Dataset``/``DataLoader``. The
per-image work is :class:`shiftlab.data.ImagePreprocess`, the same as :func:`~shiftlab.data.load_images`,
so a streamed batch equals the loaded one bit for bit. ImageNet's validation set as one tensor
is 30 GB; streamed, memory holds a few batches per worker.

Example:
    >>> from shiftlab.data import sample_image_paths
    >>> stream = image_batches(sample_image_paths(), size=32, batch_size=4)
    >>> [tuple(b.tensor.shape) for b in stream]
    [(4, 3, 32, 32), (2, 3, 32, 32)]
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from .images import (IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess,
                   UnreadableImageError, find_images, no_images_error, unreadable_folder_error,
                   unsearchable_path_error)
from ..checks import check_count
from ..errors import ShiftlabError, UsageError
from .labels import LabelledImages, read_labels

__all__ = ["ImageBatch", "ImageDataset", "ImageStream", "image_batches"]

PathLike = Union[str, "os.PathLike[str]"]
#: What :func:`image_batches` accepts.
Source = Union[PathLike, Sequence[PathLike], LabelledImages, Dataset, DataLoader]


@dataclass(frozen=True)
class ImageBatch:
    """One batch of a stream.

    Attributes:
        tensor: float32 ``(B, C, S, S)`` with ``S = size + 2 * margin``.
        labels: int64 ``(B,)`` class indices, or None when the source has no labels.
        paths: each image's file; None for items of a Dataset that has no files.
        indices: each image's position in the source (skipped files leave gaps).
    """

    tensor: torch.Tensor
    labels: Optional[torch.Tensor]
    paths: list[Optional[Path]]
    indices: list[int]


class ImageDataset(Dataset):
    """Image files as a torch ``Dataset``: item i is file i, decoded by :class:`ImagePreprocess`.

    Items are ``(3, S, S)`` float32 tensors, or ``(tensor, label)`` when labels are given. An
    unusable file raises :class:`~shiftlab.data.UnreadableImageError` (:func:`image_batches` skips it).

    Example:
        >>> from shiftlab.data import sample_image_paths
        >>> dataset = ImageDataset(sample_image_paths(), labels=[0, 1, 2, 3, 4, 5], size=32)
        >>> image, label = dataset[1]
        >>> tuple(image.shape), label
        ((3, 32, 32), 1)
    """

    def __init__(self, paths: Sequence[PathLike], labels: Optional[Sequence[int]] = None, *,
                 size: int, resize: Optional[int] = None, margin: int = 0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.paths = [Path(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise UsageError(f"{len(labels)} labels for {len(self.paths)} images; pass one label per image")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.prepare = ImagePreprocess(size=size, margin=margin, mean=mean, std=std, resize=resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Union[torch.Tensor, tuple[torch.Tensor, int]]:
        image = self.prepare(self.paths[index])
        return image if self.labels is None else (image, self.labels[index])


class ImageStream:
    """The batches of one source; iterate it (again) to decode (again).

    ``skipped`` lists ``(path, reason)`` for the files left out by the last pass, each reported
    once to ``on_skip`` as it happens (or, without ``on_skip``, in one warning at the end).
    ``total`` is the number of items this stream reads (before skips; None for a DataLoader):
    under torchrun with ``shard=True``, this rank's share. ``sharded`` says whether the stream
    holds only this rank's share; batch ``indices`` are positions in the whole source either way.
    """

    sharded = False

    def __init__(self, dataset: Optional[Dataset], loader: Optional[DataLoader], total: Optional[int],
                 crop: int, batch_size: int, workers: int,
                 on_skip: Optional[Callable[[Optional[Path], str], None]]) -> None:
        self._dataset, self._loader, self.total = dataset, loader, total
        self._crop, self._batch_size, self._workers, self._on_skip = crop, batch_size, workers, on_skip
        self.skipped: list[tuple[Optional[Path], str]] = []

    def __iter__(self) -> Iterator[ImageBatch]:
        self.skipped = []
        batches = self._passthrough() if self._loader is not None else self._decoded()
        yielded = 0
        for batch in batches:
            yielded += len(batch.indices)
            yield batch
        if not yielded and not self.sharded:  # a rank's share may be empty: its caller decides
            raise no_images_error(self.skipped)
        if self.skipped and self._on_skip is None:
            path, reason = self.skipped[0]
            warnings.warn(f"skipped {len(self.skipped)} of {self.total} images (first: {path}: {reason})",
                          stacklevel=2)

    def _decoded(self) -> Iterator[ImageBatch]:
        loader = DataLoader(self._dataset, batch_size=self._batch_size, shuffle=False,
                            num_workers=self._workers, collate_fn=_collate)
        for batch in loader:
            if batch.failure is not None:
                raise batch.failure
            for path, reason in batch.skipped:
                self.skipped.append((path, reason))
                if self._on_skip is not None:
                    self._on_skip(path, reason)
            if batch.tensor is not None:
                yield ImageBatch(batch.tensor,
                                 None if batch.labels is None else torch.tensor(batch.labels, dtype=torch.int64),
                                 batch.paths, batch.indices)

    def _passthrough(self) -> Iterator[ImageBatch]:
        start = 0
        for raw in self._loader:
            tensor, labels = raw, None
            if isinstance(raw, (tuple, list)) and raw:
                tensor, labels = raw[0], raw[1] if len(raw) > 1 else None
            if not torch.is_tensor(tensor) or tensor.ndim != 4:
                raise UsageError("a DataLoader source must yield (N, C, H, W) tensors or (tensors, labels);"
                                 " pass its Dataset instead to use shiftlab's preprocessing")
            _check_shape(tensor.shape[1:], self._crop)
            if self.total is not None:
                tensor = tensor[:self.total - start]
            count = len(tensor)
            if labels is not None:
                labels = torch.as_tensor(labels, dtype=torch.int64)[:count]
            yield ImageBatch(tensor.float(), labels, [None] * count, list(range(start, start + count)))
            start += count
            if self.total is not None and start >= self.total:
                return


def image_batches(source: Source, *, size: int, resize: Optional[int] = None, margin: int = 0,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  batch_size: int = 32, workers: int = 0, max_images: Optional[int] = None,
                  with_labels: bool = True, categories: Optional[Sequence[str]] = None,
                  class_order: str = "auto",
                  on_skip: Optional[Callable[[Optional[Path], str], None]] = None,
                  shard: bool = False) -> ImageStream:
    """Stream a source as batches of preprocessed images, decoded in ``workers`` processes.

    Sources, in the order they are recognised:

    * a ``DataLoader``: its batches pass through as they are (``(N, C, S, S)`` tensors or
      ``(tensors, labels)``); ``batch_size`` and ``workers`` are the loader's own.
    * a ``Dataset``: items are PIL images (preprocessed like files, e.g. torchvision's
      ``ImageFolder`` without a transform) or float ``(C, S, S)`` tensors, alone or as
      ``(image, label)``.
    * :class:`~shiftlab.data.labels.LabelledImages` (from :func:`~shiftlab.data.labels.read_labels`).
    * a ``.csv`` file of ``file,label`` rows (labels read with ``categories`` and ``class_order``).
    * a folder: its images when it holds some directly; otherwise its class folders, labelled
      as :func:`~shiftlab.data.labels.read_labels` does (ImageNet WNID folders in sorted order), or
      with ``with_labels=False`` every image in the tree, unlabelled.
    * an image file or a list of files (unlabelled, in order).

    Args:
        size, resize, margin, mean, std: the preprocessing (see :func:`shiftlab.data.load_images`).
        batch_size: images per batch; a batch is smaller where files were skipped.
        workers: DataLoader worker processes that decode (0: decode in this process).
        max_images: use only the first ``max_images`` items of the source.
        with_labels: read labels from class folders and CSVs; False streams their images only.
        categories, class_order: how class names become indices (:func:`~shiftlab.data.labels.read_labels`).
        on_skip: called once with ``(path, reason)`` for each unusable file, in this process.
        shard: under ``torchrun``, decode only this rank's share of the source (items r, r+N,
            ...; batch ``indices`` stay positions in the whole source; a rank's share may be
            empty). Not for a DataLoader: shiftlab's protocols and ``measure_invariance`` split an
            unsharded stream per rank themselves, so never give them a ``DistributedSampler``.

    Returns:
        An :class:`ImageStream`: iterable of :class:`ImageBatch`, with ``skipped`` and ``total``.
        Iterating raises :class:`~shiftlab.errors.ImageError` when no image could be used.

    Raises:
        UsageError: a parameter or the source is invalid.
        ImageError: a path does not exist or holds no images.

    Example:
        >>> from shiftlab.data import sample_image_paths
        >>> batch = next(iter(image_batches(sample_image_paths(), size=32, batch_size=2)))
        >>> tuple(batch.tensor.shape), batch.labels, [p.name for p in batch.paths]
        ((2, 3, 32, 32), None, ['astronaut.jpg', 'camera.jpg'])
    """
    check_count("batch_size", batch_size)
    check_count("workers", workers, 0)
    if max_images is not None:
        check_count("max_images", max_images)
    prepare = ImagePreprocess(size=size, margin=margin, mean=mean, std=std, resize=resize)
    if isinstance(source, DataLoader):
        if shard and distributed.active():
            raise UsageError("shard=True cannot split a DataLoader; pass its Dataset instead (a"
                             " DataLoader given to shiftlab under torchrun is split per rank by"
                             " shiftlab: do not give it a DistributedSampler)")
        return ImageStream(None, source, max_images, prepare.crop, batch_size, workers, on_skip)
    if not isinstance(source, Dataset):
        paths, labels = _files_and_labels(source, with_labels, categories, class_order)
        source = ImageDataset(paths, labels if with_labels else None, size=size, resize=resize,
                              margin=margin, mean=mean, std=std)
    total = len(source) if max_images is None else min(len(source), max_images)
    positions = range(total)
    if shard and distributed.active():
        positions = range(distributed.rank(), total, distributed.world_size())
    stream = ImageStream(_Tolerant(source, positions, prepare), None, len(positions), prepare.crop,
                         batch_size, workers, on_skip)
    stream.sharded = bool(shard and distributed.active())
    return stream


def _files_and_labels(source: Any, with_labels: bool, categories: Optional[Sequence[str]],
                      class_order: str) -> tuple[list[Path], Optional[list[int]]]:
    if isinstance(source, LabelledImages):
        return list(source.paths), list(source.labels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError as exc:  # PermissionError: a parent folder that may not be searched
            raise unsearchable_path_error(path, exc) from None
        if is_file and path.suffix.lower() == ".csv" or is_dir and not _holds_images(path):
            if is_dir and not with_labels:
                return find_images(path, recursive=True), None
            labelled = read_labels(path, categories, class_order)
            return list(labelled.paths), list(labelled.labels)
        return find_images(path), None
    if isinstance(source, Iterable):
        return find_images(list(source)), None
    raise UsageError(f"cannot stream images from a {type(source).__name__}; pass a folder, a CSV,"
                     " image files, LabelledImages, a torch Dataset or a DataLoader")


def _holds_images(folder: Path) -> bool:
    try:
        return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    except OSError as exc:  # PermissionError: a folder that may not be listed or searched
        raise unreadable_folder_error(folder, exc) from None


def _check_shape(shape: Sequence[int], crop: int) -> None:
    if len(shape) != 3 or tuple(shape[1:]) != (crop, crop):
        raise UsageError(f"dataset images have shape {tuple(shape)}, expected (C, {crop}, {crop}) ="
                         " size + 2*margin; return PIL images to use shiftlab's preprocessing, or"
                         " crop to that size in your transform")


@dataclass
class _Item:
    index: int
    path: Optional[Path]
    image: Optional[torch.Tensor] = None
    label: Optional[int] = None
    skipped: Optional[str] = None
    failure: Optional[ShiftlabError] = None


class _Tolerant(Dataset):
    """Wraps a Dataset so that an unusable file becomes a skip record, not a dead worker."""

    def __init__(self, dataset: Dataset, positions: range, prepare: ImagePreprocess) -> None:
        """``positions``: the items of ``dataset`` to read (all, or one torchrun rank's share)."""
        self.dataset, self.positions, self.prepare = dataset, positions, prepare

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position: int) -> _Item:
        index = self.positions[position]
        item = _Item(index, _item_path(self.dataset, index))
        try:
            raw = self.dataset[index]
            image, label = (raw[0], raw[1] if len(raw) > 1 else None) if isinstance(raw, (tuple, list)) \
                else (raw, None)
            if isinstance(image, Image.Image):
                image = self.prepare(image)
            elif not (torch.is_tensor(image) and image.is_floating_point()):
                raise UsageError(f"dataset item {index} is a {type(image).__name__}; return PIL images"
                                 " or normalised float (C, H, W) tensors, alone or as (image, label)")
            _check_shape(image.shape, self.prepare.crop)
            item.image = image.float()
            item.label = None if label is None else int(label)
        except UnreadableImageError as exc:
            item.skipped = exc.reason
        except ShiftlabError as exc:
            # Raised again in the main process: DataLoader would wrap it in a traceback text.
            item.failure = exc
        return item


def _item_path(dataset: Dataset, index: int) -> Optional[Path]:
    paths = getattr(dataset, "paths", None)
    if isinstance(paths, list) and index < len(paths):
        return Path(paths[index])
    samples = getattr(dataset, "samples", None)  # torchvision's ImageFolder / DatasetFolder
    if isinstance(samples, list) and index < len(samples) and isinstance(samples[index], tuple):
        return Path(samples[index][0])
    return None


@dataclass
class _Collated:
    tensor: Optional[torch.Tensor] = None
    labels: Optional[list[int]] = None
    paths: list[Optional[Path]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    skipped: list[tuple[Optional[Path], str]] = field(default_factory=list)
    failure: Optional[ShiftlabError] = None


def _collate(items: list[_Item]) -> _Collated:
    """Runs in the worker: keeps decoded items, turns skips into records for the main process."""
    out = _Collated()
    kept = []
    for item in items:
        if item.failure is not None:
            out.failure = out.failure or item.failure
        elif item.skipped is not None:
            out.skipped.append((item.path, item.skipped))
        else:
            kept.append(item)
    # Stacked here, in the worker: one shared-memory block per batch instead of one per image.
    out.tensor = torch.stack([item.image for item in kept]) if kept else None
    out.paths = [item.path for item in kept]
    out.indices = [item.index for item in kept]
    if kept and all(item.label is not None for item in kept):
        out.labels = [item.label for item in kept]
    return out
